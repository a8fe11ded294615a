"""The model-independent sections of every trainer's config, and what they determine.

A trainer's config (e.g. :class:`know3d.training.config.TrainBackviewConfig`) composes these
sections under fixed keys (``optim``, ``schedule``, ``deepspeed``, ``ray``, ``mlflow``) beside its
model-specific ones; the engine reads only these, so :class:`TrainerConfig` is all it assumes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, model_validator

from know3d.core.config import RayConfig, StrictModel, TrackingConfig

if TYPE_CHECKING:  # configs load without torch (the CLI, cluster-file checks)
    import torch


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(default=100, ge=0)
    decay: Literal["constant", "cosine"] = Field(
        default="constant", description="After warmup: keep lr, or cosine-decay it to min_lr_ratio·lr at max_steps."
    )
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)


class ScheduleConfig(StrictModel):
    max_steps: int = Field(default=10_000, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(default=1, ge=1, description="Samples per worker per forward.")
    grad_accum: int = Field(default=1, ge=1)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    validate_every: int = Field(default=500, ge=0, description="0 = no validation grids.")
    num_validation: int = Field(default=4, ge=1, description="Validation pairs per grid.")
    validation_steps: int = Field(default=28, ge=2, description="Sampling steps of validation generations (>= 2).")

    def due(self, step: int, every: int) -> bool:
        """Whether a periodic action (log, validation, checkpoint) runs after ``step``: every
        ``every``-th step and the last one, never when ``every`` is 0."""
        return every > 0 and (step % every == 0 or step == self.max_steps)

    def samples_per_step(self, world_size: int) -> int:
        return self.micro_batch_size * self.grad_accum * world_size


class DeepSpeedConfig(StrictModel):
    zero_stage: int = Field(default=2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on with GPUs.")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of the optimizer state to CPU.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged into the generated DeepSpeed config.")


class TrainRayConfig(RayConfig):
    launcher: Literal["ray", "local"] = Field(
        default="ray",
        description="ray = Ray Train workers (TorchTrainer) on the Ray cluster; local = this process as the "
        "only rank, no Ray Train: for debug-size runs, where starting Ray Train's controller and worker "
        "costs about a CPU-minute (benchmarks/RESULTS.md). Its checkpoints are in <output>/checkpoints, "
        "as under torchrun; a run resumes from those of the launcher it ran under.",
    )
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on if the cluster has GPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    storage_path: str | None = Field(
        default=None, description="Where Ray Train keeps checkpoints (shared storage on clusters); None = <output>/ray."
    )
    max_failures: int = Field(default=0, ge=-1, description="Worker-group restarts on failure (-1 = unlimited).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How Ray Train places the workers' bundles on nodes: PACK = as few nodes as possible "
        "(fastest collectives), SPREAD = over as many nodes as possible, STRICT_SPREAD = every worker on "
        "its own node (a restart after a lost node then needs num_workers nodes with room), STRICT_PACK = "
        "all on one node.",
    )

    @model_validator(mode="after")
    def _one_local_rank(self) -> TrainRayConfig:
        if self.launcher == "local" and self.num_workers != 1:
            raise ValueError(
                f"ray.launcher=local trains in this process (one rank), not ray.num_workers={self.num_workers}: "
                "use ray.launcher=ray or torchrun for more"
            )
        return self


class TrainMlflowConfig(TrackingConfig):
    experiment: str = "know3d-train-backview"


class TrainerConfig(Protocol):
    """What the engine reads of a trainer's config (a pydantic model with these sections)."""

    seed: int
    output: str
    optim: OptimConfig
    schedule: ScheduleConfig
    deepspeed: DeepSpeedConfig
    ray: TrainRayConfig
    mlflow: TrainMlflowConfig

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]: ...


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, rank, step, ...): every random draw of a run is a
    function of where it happens, which is what makes resumed runs reproduce uninterrupted ones."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def use_bf16(ds: DeepSpeedConfig, device: torch.device) -> bool:
    if ds.bf16 == "auto":
        return device.type == "cuda"
    return ds.bf16 == "on"


def deepspeed_config(
    optim: OptimConfig, schedule: ScheduleConfig, ds: DeepSpeedConfig, world_size: int, bf16: bool
) -> dict:
    """The DeepSpeed config a run passes to ``deepspeed.initialize`` (no json file needed)."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    if ds.offload_optimizer and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": schedule.micro_batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "train_batch_size": schedule.samples_per_step(world_size),
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(warmup: int, decay: str = "constant", total: int = 1, min_ratio: float = 0.1) -> Callable[[int], float]:
    """The lr multiplier of optimizer step ``step``: linear warmup, then constant or cosine decay
    to ``min_ratio`` at step ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
