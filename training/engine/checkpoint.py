"""Checkpoints that resume a run exactly where it stopped.

A checkpoint folder holds DeepSpeed's files (tag ``ds``: trainable weights, optimizer and lr
scheduler state, one optimizer shard per rank under ZeRO) and ``know3d_state.json``: the step,
the world size, every rank's data-stream position, the metrics last logged and the MLflow run
id. Every random draw of a step is seeded by (seed, rank, step) and the streams replay from their
saved position, so a resumed run logs the losses of an uninterrupted one; that needs the same
number of workers.

Ray Train persists and prunes what workers report; under torchrun :class:`CheckpointStore` keeps
``<output>/checkpoints/step_XXXXXXXX`` itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from know3d.core.io import atomic_dir, atomic_write, remove_temps
from know3d.training.engine import dist
from know3d.training.engine.env import WorkerEnv

log = logging.getLogger(__name__)
STATE_FILE = "know3d_state.json"
DS_TAG = "ds"
COMPLETE = "COMPLETE"


class Stream(Protocol):
    """A data stream's position (e.g. :class:`know3d.training.data.StreamState`)."""

    def to_dict(self) -> dict: ...


@dataclass
class TrainState:
    """Where this rank resumes: the step done, its stream position, the run's MLflow id, and
    what the trainer stored beside the engine (``client_state``, e.g. EMA weights)."""

    step: int = 0
    stream: dict = field(default_factory=dict)
    mlflow_run_id: str | None = None
    client_state: dict = field(default_factory=dict)


def save(
    engine, env: WorkerEnv, step: int, stream: Stream, metrics: dict, record: dict, client_state: dict | None = None
) -> None:
    """Write a checkpoint of ``step`` (a collective: every rank calls it) and report it with
    ``metrics``; those and ``record`` (MLflow run id, data digest, ...) go into the state file
    (a finished run's rerun answers with them, without starting anything)."""
    streams = dist.all_gather_object(stream.to_dict())
    with tempfile.TemporaryDirectory(prefix="know3d-ckpt-") as tmp:
        folder = Path(tmp)
        engine.save_checkpoint(str(folder), tag=DS_TAG, client_state=client_state or {}, exclude_frozen_parameters=True)
        if env.is_main:
            state = {"step": step, "world_size": env.world_size, "streams": streams, "metrics": metrics, **record}
            atomic_write(folder / STATE_FILE, json.dumps(state))
        env.report({"step": step, **metrics}, folder)


def _deepspeed_state_classes() -> list[type]:
    """The classes DeepSpeed pickles into its optimizer state files besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """DeepSpeed's torch checkpoint engine unpickles with ``weights_only=False``: a checkpoint
    planted on shared storage (``ray.storage_path``, ``<output>/checkpoints``) would run its code on
    every rank that resumes. Within this block the engine loads with ``weights_only=True``, only
    DeepSpeed's own state classes allowed besides tensors and builtins."""
    import torch

    ckpt = getattr(engine, "checkpoint_engine", None)
    if type(ckpt).__name__ != "TorchCheckpointEngine":  # another engine (or a test double): its own loader
        yield
        return

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt.load = load
    try:
        yield
    finally:
        del ckpt.load  # the class's own method again


def resume(engine, env: WorkerEnv) -> TrainState:
    """Load ``env.resume_from`` into ``engine``; a fresh :class:`TrainState` when there is none."""
    if env.resume_from is None:
        return TrainState()
    saved = json.loads((env.resume_from / STATE_FILE).read_text())
    if saved["world_size"] != env.world_size:
        raise ValueError(
            f"checkpoint {env.resume_from} was written by {saved['world_size']} workers, "
            f"this run has {env.world_size}: resuming mid-epoch needs the same number"
        )
    with weights_only_loads(engine):
        _, client_state = engine.load_checkpoint(str(env.resume_from), tag=DS_TAG, load_module_strict=False)
    state = TrainState(saved["step"], saved["streams"][env.rank], saved.get("mlflow_run_id"), client_state or {})
    log.info("rank %d resumed at step %d (%s)", env.rank, state.step, state.stream)
    return state


class CheckpointStore:
    """torchrun's checkpoints: ``<root>/step_XXXXXXXX``, each complete or absent, newest ``keep``
    kept. The root must be on storage every node sees (multi-node runs)."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (folders of older versions without the marker are
        partial copies)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def report(self, metrics: dict, folder: Path | None) -> None:
        """:attr:`WorkerEnv.report` under torchrun (a collective): every rank copies its files
        into one staging folder, which rank 0 renames into place once all have."""
        if folder is None:
            return
        final = self.root / f"step_{metrics['step']:08d}"
        if dist.rank() == 0:
            with atomic_dir(final, replace=True) as staging:
                self._collect(folder, dist.broadcast_object(staging))
                atomic_write(staging / COMPLETE, "ok")
            self._prune()
        else:
            self._collect(folder, dist.broadcast_object(None))
        dist.barrier()

    def _collect(self, folder: Path, staging: Path) -> None:
        for item in folder.rglob("*"):  # every rank its own files; rank 0 the shared ones too
            if item.is_file():
                target = staging / item.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
        dist.barrier()

    def _prune(self) -> None:
        """Drop all but the newest ``keep`` checkpoints and the staging folders of killed runs
        (rank 0, while no staging folder of this run is in flight)."""
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        remove_temps(self.root, ".step_*")
