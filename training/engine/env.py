"""Where a worker runs, whoever launched it: Ray Train's ``TorchTrainer`` or ``torchrun``.

A trainer's worker function takes a :class:`WorkerEnv` and never asks the launcher anything
else: its rank and device, the checkpoint folder to resume from, and how to hand over a written
checkpoint (Ray Train persists and prunes it; under torchrun a
:class:`~know3d.training.engine.checkpoint.CheckpointStore` does).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

Report = Callable[[dict, Path | None], None]  # (metrics, checkpoint folder or None); called on every rank
Say = Callable[[str], None]  # one line for the user's terminal


def _ignore(metrics: dict, folder: Path | None) -> None:
    """The report of a worker nobody collects checkpoints from (unit tests, single-process runs)."""


def print_line(line: str) -> None:
    """To stdout at once (piped stdout is block-buffered; a progress line must not wait)."""
    print(line, flush=True)


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    resume_from: Path | None = None  # a checkpoint folder written by engine.checkpoint, or None
    report: Report = field(default=_ignore)
    sink: Say = field(default=print_line)  # where :meth:`say` sends rank 0's lines

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what exists once per run: metrics.jsonl, MLflow, exports."""
        return self.rank == 0

    def say(self, line: str) -> None:
        """Tell the user ``line`` (progress, where things are), once per run: rank 0 only, so every
        rank may call it. Under Ray Train it reaches the driver's terminal, not a worker log."""
        if self.is_main:
            self.sink(line)

    @classmethod
    def from_torchrun(
        cls, resume_from: Path | None = None, report: Report = _ignore, environ: Mapping[str, str] = os.environ
    ) -> WorkerEnv:
        """From the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR/PORT are read
        by ``init_process_group``); a lone process without them is rank 0 of 1."""
        rank, world_size = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
        if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
            raise ValueError(
                f"WORLD_SIZE={world_size} without MASTER_ADDR/MASTER_PORT: start the workers with torchrun"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
        local_rank = int(environ.get("LOCAL_RANK", 0))
        return cls(rank, world_size, local_rank, local_device(local_rank), resume_from, report)


def local_device(local_rank: int) -> torch.device:
    """The GPU of this local rank (made the current one), or the CPU on machines without GPUs."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def ray_worker_env(sink: Say) -> Iterator[WorkerEnv]:
    """This Ray Train worker's env (process group already set up by ``TorchTrainer``); the
    checkpoint Ray restores is downloaded to a temporary folder that lives as long as the block.
    ``sink`` carries rank 0's lines to the driver."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)) if folder else None)

    with tempfile.TemporaryDirectory(prefix="know3d-resume-", ignore_cleanup_errors=True) as tmp:
        resume = Path(checkpoint.to_directory(tmp)) if checkpoint is not None else None
        rank, world_size, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        yield WorkerEnv(rank, world_size, local_rank, device, resume, report, sink)
