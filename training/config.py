"""Config of the back-view LoRA trainer (``know3d train backview``).

The model-independent sections (optimizer, schedule, DeepSpeed, Ray workers, tracking) live in
:mod:`know3d.training.engine.config` and are shared with every trainer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from know3d.core.config import StrictModel
from know3d.training.engine.config import (
    DeepSpeedConfig,
    OptimConfig,
    ScheduleConfig,
    TrainMlflowConfig,
    TrainRayConfig,
)
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
    lora_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto",
        description="LoRA weights' dtype: auto = bfloat16 under DeepSpeed bf16 (its optimizer keeps fp32 master "
        "copies), else float32.",
    )
    random_weights: bool = Field(
        default=False,
        description="Build the MMDiT from its transformer/config.json with random weights on the device instead "
        "of loading them: throughput and memory runs of the real architecture (the LoRA learns nothing useful). "
        "'debug:full-size-qwen-image-edit' is 2511's configuration with no weights, for offline machines.",
    )


class LoraConfig(StrictModel):
    rank: int = Field(default=64, ge=1)
    alpha: float = Field(default=64.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    init_from: str | None = Field(
        default=None,
        description="An exported LoRA folder to start from (warm start; `know3d run` sets the champion's); "
        "None = a fresh LoRA. A resumed run's checkpoint takes precedence.",
    )


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


class LatentCacheConfig(StrictModel):
    enabled: bool = Field(
        default=False, description="Pre-compute VAE latents and prompt embeddings (encoder actors on Ray)."
    )
    dir: str | None = Field(default=None, description="None = <output>/latent_cache.")
    batch_size: int = Field(default=4, ge=1, description="Pairs per VAE call.")
    num_gpus_per_worker: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")
    concurrency: int = Field(default=1, ge=1, description="Encoder actors (one shard at a time each).")


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
