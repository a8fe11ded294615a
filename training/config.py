"""Config of the back-view LoRA trainer (``know3d train backview``).

The model-independent sections (optimizer, schedule, DeepSpeed, Ray workers, tracking) live in
:mod:`know3d.training.engine.config` and are shared with every trainer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from know3d.core.config import RayConfig, StrictModel, TrackingConfig
from know3d.training.prompting import DEFAULT_INSTRUCTION

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class EditModelConfig(StrictModel):
    name: str = Field(
        default="Qwen/Qwen-Image-Edit-2511",
        description="Hub id, local folder of a diffusers pipeline, or 'debug:tiny-qwen-image-edit' (built in code).",
    )
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPUs, float32 on CPUs."
    )
    gradient_checkpointing: bool = Field(default=True, description="Non-reentrant activation checkpointing.")


class LoraConfig(StrictModel):
    rank: int = Field(default=64, ge=1)
    alpha: float = Field(default=64.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


class TrainDataConfig(StrictModel):
    shards: list[str] = Field(
        default_factory=list,
        description="Data-build output folders (their shard_index.json lists the shards), shard files, globs or "
        "fsspec URIs (s3://..., gs://...).",
    )
    val_shards: list[str] = Field(
        default_factory=list, description="Validation shards; empty = the 'val' split of the shard indexes."
    )
    image_size: int = Field(default=512, ge=16, le=2048, description="Training resolution (square).")
    shuffle_buffer: int = Field(default=256, ge=1)
    prompt_probability: float = Field(
        default=0.5, ge=0, le=1, description="p: chance that a description is appended to the instruction."
    )
    instruction: str = DEFAULT_INSTRUCTION
    keys: list[str] = Field(
        default_factory=list, description="Train only on these sample keys ('<asset>/<pair>'); empty = all."
    )
    max_pairs: int | None = Field(
        default=None, ge=1, description="Train only on the first N pairs (shard order, after `keys`); overfit checks."
    )
    max_pairs_per_asset: int | None = Field(
        default=None,
        ge=1,
        description="At most N pairs of each asset (applied before max_pairs): 1 = distinct objects.",
    )
    validation_split: Literal["val", "train"] = Field(
        default="val",
        description="Where validation pairs come from; 'train' = the training selection itself "
        "(overfit checks: the grid shows what the model memorized).",
    )


class FlowConfig(StrictModel):
    timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = Field(default=3.0, gt=0)


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


class DeepSpeedConfig(StrictModel):
    zero_stage: int = Field(default=2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on with GPUs.")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of the optimizer state to CPU.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged into the generated DeepSpeed config.")


class TrainRayConfig(RayConfig):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on if the cluster has GPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    storage_path: str | None = Field(
        default=None, description="Where Ray Train keeps checkpoints (shared storage on clusters); None = <output>/ray."
    )
    max_failures: int = Field(default=0, ge=-1, description="Worker-group restarts on failure (-1 = unlimited).")


class LatentCacheConfig(StrictModel):
    enabled: bool = Field(default=False, description="Pre-compute VAE latents and prompt embeddings (Ray Data).")
    dir: str | None = Field(default=None, description="None = <output>/latent_cache.")
    batch_size: int = Field(default=4, ge=1)
    num_gpus_per_worker: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")
    concurrency: int = Field(default=1, ge=1)


class TrainMlflowConfig(TrackingConfig):
    experiment: str = "know3d-train-backview"


class TrainBackviewConfig(StrictModel):
    seed: int = 0
    output: str = Field(default="runs/train-backview", description="Run folder: checkpoints, exported LoRA.")
    model: EditModelConfig = Field(default_factory=EditModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    ray: TrainRayConfig = Field(default_factory=TrainRayConfig)
    cache: LatentCacheConfig = Field(default_factory=LatentCacheConfig)
    mlflow: TrainMlflowConfig = Field(default_factory=TrainMlflowConfig)
