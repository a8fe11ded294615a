"""What every run needs before it starts: a usable output folder and a Ray to run on.

Both fail *before* anything is written — no output skeleton, no MLflow run — with one line
(:class:`UsageError`, exit 2 in the CLI) instead of a traceback or an endless retry loop.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from know3d.core.config import RayConfig
from know3d.core.errors import describe_exception


class UsageError(RuntimeError):
    """A run cannot start as configured (not any asset's fault); the message is one line."""


class ClusterUnreachable(UsageError):
    """The configured Ray cluster cannot be reached in time; nothing was started or written."""


class OutputUnusable(UsageError):
    """The output folder is a file, or cannot be created or written."""


def check_output(output: str | None) -> Path:
    """The output folder, resolved; refused in one line when it cannot be a writable folder.
    Writes nothing (a run that never starts leaves no trace)."""
    if not output:
        raise OutputUnusable("no output folder (use --output DIR)")
    try:
        out = Path(output).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise OutputUnusable(f"--output {output}: cannot be resolved ({describe_exception(exc)})") from None
    try:
        if out.exists() and not out.is_dir():
            raise OutputUnusable(f"--output {out}: exists and is not a folder")
        existing = next(p for p in (out, *out.parents) if p.exists())
    except OSError as exc:  # a name too long, a folder we may not look into
        raise OutputUnusable(f"--output {out}: cannot be used ({exc.strerror or type(exc).__name__})") from None
    if not existing.is_dir():
        raise OutputUnusable(f"--output {out}: {existing} is not a folder")
    try:  # os.access says yes to root on read-only or virtual file systems (/proc): try it
        os.rmdir(tempfile.mkdtemp(prefix=".know3d-probe-", dir=existing))
    except OSError as exc:
        raise OutputUnusable(
            f"--output {out}: cannot create folders in {existing} ({exc.strerror or type(exc).__name__})"
        ) from None
    return out


def _ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    return ray


def _bootstrap_target(address: str) -> tuple[str, int]:
    """host and port that ``ray.init(address)`` would connect to first."""
    if address.startswith("ray://"):
        hostport = address[len("ray://") :].split("/", 1)[0]
    elif address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address(address)
        except Exception:  # noqa: BLE001 - Ray says why in a long message; ours is one line
            found = None
        if not found:
            raise ClusterUnreachable(
                "address 'auto': no running Ray cluster found on this machine (start one "
                "with `ray start --head`, or leave --address out for a local Ray)"
            )
        hostport = found
    else:
        hostport = address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"Ray address '{address}' is not host:port, 'auto' or ray://host:port")
    return host.strip("[]"), int(port)


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, in one line, unless a gRPC server (Ray's GCS or client server) answers at the
    cluster's address within ``timeout_s``. ``ray.init`` itself retries for minutes, logging
    "Failed to connect to GCS", when nothing — or something else — listens there."""
    host, port = _bootstrap_target(address)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first; Ray checks the rest
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(_HTTP2_PREFACE)
            head = conn.recv(9)
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address} ({host}:{port}) within {timeout_s:g} s: {why}"
        ) from None
    if len(head) < 4 or head[3] != 0x04:  # a gRPC server answers the preface with SETTINGS
        raise ClusterUnreachable(f"{address} ({host}:{port}) answers, but not as a Ray cluster (no gRPC)")


def _local_auth() -> None:
    """Say explicitly what Ray does by default for a cluster started here: token authentication
    (a token in ~/.ray/auth_token, made on first use); left unset, Ray warns on every start.
    ``RAY_AUTH_MODE`` from the environment wins (e.g. ``disabled``). Ray reads the mode once, at
    import, so its config is read again, as ``ray.init`` does when it picks token auth itself
    (``ray==2.60.0`` is pinned)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config

    Config.initialize("")


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Join ``cfg.address`` or start a local Ray (shut down again on exit if started here).

    A cluster that does not answer within ``cfg.connect_timeout_s`` raises
    :class:`ClusterUnreachable` before anything else happens: :func:`check_reachable` is the
    bound, since ``ray.init`` waits inside Ray's C++ core, where no Python timer can interrupt it."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False}
        address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            _local_auth()
            kwargs["num_cpus"] = cfg.num_cpus
            if cfg.object_store_memory:
                kwargs["object_store_memory"] = cfg.object_store_memory
        else:
            check_reachable(address, cfg.connect_timeout_s)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            ray.shutdown()
            raise ClusterUnreachable(f"cannot join the Ray cluster at {address}: {describe_exception(exc)}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
