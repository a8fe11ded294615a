"""How chatty a run is: our own progress lines always, third-party noise only with --verbose.

``configure(verbose)`` is called once by the CLI (``know3d --verbose ...``) and is inherited by
Ray workers and child processes through ``KNOW3D_VERBOSE``; :func:`quiet_third_party` is what a
worker calls at start-up to apply the same choice in its own process.
"""

from __future__ import annotations

import logging
import math
import os

VERBOSE_ENV = "KNOW3D_VERBOSE"
#: loggers that print set-up chatter on every run (MLflow's first-use database migration,
#: alembic, diffusers/transformers loading bars, Ray's start-up)
NOISY = ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "diffusers", "transformers", "ray", "filelock")


def format_duration(seconds: float) -> str:
    """``8s``, ``3m50s``, ``2h05m``: short enough for a progress line, precise where it matters."""
    if not math.isfinite(seconds):
        return "?"  # no rate yet
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false")


def configure(is_verbose: bool = False) -> None:
    """Set the run's verbosity for this process and every process it starts."""
    os.environ[VERBOSE_ENV] = "1" if is_verbose else "0"
    logging.basicConfig(level=logging.INFO if is_verbose else logging.WARNING, format="%(name)s: %(message)s")
    quiet_third_party()


def quiet_third_party() -> None:
    """Third-party loggers at WARNING and their progress bars off, unless verbose."""
    if verbose():
        return
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
