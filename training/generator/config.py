"""Settings of the 3D generator's inputs computed by frozen models (Know3D §3.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from know3d.core.config import RayConfig, StrictModel, TrackingConfig
from know3d.training.prompting import DEFAULT_INSTRUCTION

# Our choice (the paper does not name the blocks): four intermediate blocks spread evenly over the
# 60-block Qwen-Image-Edit-2511 MMDiT, skipping the first and the last quarter-block where the
# features are closest to the patch embedding / to the velocity output.
DEFAULT_LAYERS = [12, 24, 36, 48]
DINOV3_VITL16_HUB_ID = "facebook/dinov3-vitl16-pretrain-lvd1689m"


class HiddenStatesConfig(StrictModel):
    """H: hidden states of the frozen back-view model (base + our LoRA) while it generates the back
    view from the front view, captured at one denoising step (early exit after it)."""

    model: str = Field(
        default="Qwen/Qwen-Image-Edit-2511", description="Base pipeline: hub id, local folder or 'debug:<name>'."
    )
    revision: str | None = None
    lora: str | None = Field(
        default=None, description="Exported back-view LoRA folder (pytorch_lora_weights.safetensors); None = base only."
    )
    image_size: int = Field(default=512, ge=16, description="Front view and generated back view resolution.")
    layers: list[int] = Field(
        default_factory=lambda: list(DEFAULT_LAYERS),
        min_length=1,
        description="Indices into transformer.transformer_blocks whose image-stream outputs are captured "
        "(our choice for the 60-block model; the debug models have 2 or 4 blocks).",
    )
    fraction: float = Field(
        default=0.25,
        ge=0.0,
        lt=1.0,
        description="Capture at step floor(fraction * steps) (0-based) of the sampler: 0.25 = the quarter mark.",
    )
    steps: int = Field(default=50, ge=2, description="Sampler steps (sets the schedule; early exit runs fewer).")
    cfg_scale: float = Field(
        default=4.0, ge=0.0, description="> 1: true CFG (the captured states are the conditional pass's)."
    )
    seed: int = Field(default=0, description="Noise and prompt choice per pair derive from (seed, pair key).")
    prompt_probability: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Probability of adding one of the pair's descriptions to the prompt."
    )
    instruction: str = DEFAULT_INSTRUCTION
    dtype: Literal["bf16", "fp16", "fp32"] = Field(default="bf16", description="Storage dtype of the states.")
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="Model dtype: auto = bfloat16 on GPUs, float32 on CPUs."
    )
    pooling: Literal["none", "avg"] = Field(
        default="none", description="avg = average pool_k×pool_k groups of target tokens on their 2D grid."
    )
    pool_k: int = Field(default=2, ge=1)
    variants: list[Literal["hidden", "vae_latent", "dino_back"]] = Field(
        default_factory=lambda: ["hidden"],
        min_length=1,
        description="What the pass stores (paper §4.3): hidden = H at the capture step (early exit); "
        "vae_latent = the fully denoised back-view latent tokens; dino_back = DINOv3 features of the decoded "
        "generated back view. Either ablation variant runs the sampler to the end.",
    )
    dino: str = Field(
        default=DINOV3_VITL16_HUB_ID, description="DINOv3 for dino_back: hub id, local folder or 'debug[:seed]'."
    )
    dino_resolution: int = Field(default=512, ge=16, description="DINOv3 input side (TRELLIS.2: 512).")
    cache_dir: str = Field(default="hidden_cache", description="Root of the cache; a tag folder per setting.")
    concurrency: int = Field(default=1, ge=1, description="Capture actors (one shard at a time each).")
    num_gpus_per_worker: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError(f"layers must be distinct non-negative block indices, got {value}")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"variants must be distinct, got {value}")
        return value

    @property
    def pool(self) -> int:
        return self.pool_k if self.pooling == "avg" else 1

    @property
    def full_run(self) -> bool:
        """The ablation variants need the finished back view: no early exit."""
        return any(v != "hidden" for v in self.variants)

    def capture_step(self) -> int:
        return min(self.steps - 1, int(self.fraction * self.steps))


class HiddenPrepassConfig(StrictModel):
    """``know3d data hidden-states``: the cached pre-pass over a data build's shards."""

    shards: list[str] = Field(default_factory=list, description="Data-build folders, shard files or globs.")
    split: Literal["train", "val"] = "train"
    hidden: HiddenStatesConfig = Field(default_factory=HiddenStatesConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: TrackingConfig = Field(default_factory=TrackingConfig)
