"""Settings of the 3D generator's inputs computed by frozen models (Know3D §3.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from know3d.core.config import RayConfig, StrictModel, TrackingConfig
from know3d.training.engine.config import (
    DeepSpeedConfig,
    OptimConfig,
    ScheduleConfig,
    TrainMlflowConfig,
    TrainRayConfig,
)
from know3d.training.prompting import DEFAULT_INSTRUCTION

# Our choice (the paper does not name the blocks): four intermediate blocks spread evenly over the
# 60-block Qwen-Image-Edit-2511 MMDiT, skipping the first and the last quarter-block where the
# features are closest to the patch embedding / to the velocity output.
DEFAULT_LAYERS = [12, 24, 36, 48]
SIGMA_MIN = 1e-5
DropMode = Literal["joint", "independent"]
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


class FlowConfig(StrictModel):
    """Training-side flow matching (TRELLIS.2 ss_flow_img_dit_1_3B_64_bf16 trainer args)."""

    model_config = ConfigDict(frozen=True)

    sigma_min: float = Field(default=SIGMA_MIN, ge=0.0, lt=1.0, description="Noise left at t = 0.")
    timesteps: Literal["logit_normal", "uniform"] = Field(
        default="logit_normal",
        description="Training timesteps: logitNormal (stage 1, TRELLIS.2's ss flow) or uniform in (0, 1) (stage 2).",
    )
    t_mean: float = Field(default=1.0, description="logitNormal timesteps: t = sigmoid(N(t_mean, t_std)).")
    t_std: float = Field(default=1.0, gt=0.0)
    p_uncond: float = Field(default=0.1, ge=0.0, le=1.0, description="Per-sample condition drop rate (CFG).")
    drop_mode: DropMode = Field(
        default="joint",
        description="joint: one coin per sample drops cond and hidden together; independent: one coin each.",
    )


class SamplerConfig(StrictModel):
    """Sparse-structure sampler (TRELLIS.2 pipeline.json, sparse_structure_sampler params)."""

    model_config = ConfigDict(frozen=True)

    steps: int = Field(default=12, ge=1)
    guidance_strength: float = Field(default=7.5, description="w in w * v_pos + (1 - w) * v_neg; 1 = no guidance.")
    guidance_interval: tuple[float, float] = Field(
        default=(0.6, 1.0), description="CFG only while lo <= t <= hi (t after rescale_t)."
    )
    guidance_rescale: float = Field(default=0.7, ge=0.0, le=1.0, description="Std-ratio rescale of the CFG x0.")
    rescale_t: float = Field(
        default=5.0, gt=0.0, description="t <- r t / (1 + (r - 1) t); > 1 spends steps at high noise."
    )

    @model_validator(mode="after")
    def _interval_ordered(self) -> SamplerConfig:
        lo, hi = self.guidance_interval
        if lo > hi:
            raise ValueError(f"guidance_interval must be (lo, hi) with lo <= hi, got {self.guidance_interval}")
        return self


# --------------------------------------------------------------------------- the generator trainer

# TRELLIS.2 keeps the sparse-structure flow in microsoft/TRELLIS.2-4B (ckpts/ss_flow_img_dit_1_3B_64_bf16.*)
# and reuses TRELLIS v1's decoder (microsoft/TRELLIS-image-large, ckpts/ss_dec_conv3d_16l8_fp16.*).
TRELLIS2_HUB_ID = "microsoft/TRELLIS.2-4B"
TRELLIS_SS_VAE_HUB_ID = "microsoft/TRELLIS-image-large"
# peft LoRA on the backbone's attention linears (self: to_qkv/to_out, image cross: to_q/to_kv/to_out);
# the know3d_* branch is trained in full, so it is not a LoRA target.
GENERATOR_LORA_TARGETS = r"^blocks\.\d+\.(self_attn\.(to_qkv|to_out)|cross_attn\.(to_q|to_kv|to_out))$"
CONDITIONS = ("hidden", "vae_latent", "dino_back", "none")


class GeneratorModelConfig(StrictModel):
    stage: Literal["ss", "shape"] = Field(
        default="ss",
        description="ss: stage 1, the sparse-structure flow (occupancy); shape: stage 2, the shape structured-latent "
        "flow (ElasticSLatFlowModel img2shape) on the shape SC-VAE's sparse latents.",
    )
    base: str = Field(
        default=TRELLIS2_HUB_ID,
        description="The official flow of the stage (ss_flow_img_dit_1_3B_64 or slat_flow_img2shape_dit_1_3B_512): "
        "hub id, folder or .safetensors file; 'debug[:seed]' = the CPU-size model built in code (a stand-in base: "
        "random weights, non-zero output layer).",
    )
    condition: Literal["hidden", "vae_latent", "dino_back", "none"] = Field(
        default="hidden",
        description="What the parallel cross-attention reads (paper §4.3): H, the generated back view's VAE "
        "latent, its DINOv3 features, or none (plain TRELLIS.2 fine-tuning with the same LoRA).",
    )
    finetune: Literal["lora", "full"] = Field(
        default="lora", description="lora: LoRA on the backbone's attention + the branch; full: every weight."
    )
    lora_rank: int = Field(default=64, ge=1)
    lora_alpha: float = Field(default=64.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    gradient_checkpointing: bool = Field(default=True, description="Per-block activation checkpointing.")
    ema_decay: float = Field(default=0.9999, ge=0, le=1, description="EMA of the trainable weights (sampling, export).")
    ss_decoder: str = Field(
        default=TRELLIS_SS_VAE_HUB_ID, description="SS-VAE decoder: hub id or folder; 'debug' = the shipped one."
    )
    shape_vae: str = Field(
        default=TRELLIS2_HUB_ID,
        description="Stage 2: the shape SC-VAE (decoder + latent normalization) for validation and generation: "
        "hub id or folder; 'debug' = the shipped CPU one.",
    )
    dino: str = Field(default=DINOV3_VITL16_HUB_ID, description="Front-view DINOv3: hub id, folder or 'debug[:seed]'.")
    dino_resolution: int = Field(default=512, ge=16)


class GeneratorDataConfig(StrictModel):
    dataset: str = Field(default="", description="A data build folder (geometry profile) with its targets.")
    targets: str | None = Field(
        default=None, description="Target store folder; None = the one folder under <dataset>/targets."
    )
    hidden: HiddenStatesConfig = Field(
        default_factory=HiddenStatesConfig,
        description="The back-view model's capture settings: where the cached pre-pass lives (cache_dir + tag) "
        "or what online mode runs.",
    )
    hidden_mode: Literal["cached", "online"] = Field(
        default="cached",
        description="cached: read the pre-pass (`know3d data hidden-states`); online: capture H in the training "
        "step on the same GPU (compute instead of storage; condition 'hidden' only).",
    )
    keys: list[str] = Field(default_factory=list, description="Train only on these pair keys; empty = all.")
    max_assets: int | None = Field(default=None, ge=1, description="Only the first N assets (overfit checks).")
    validation_split: Literal["val", "train"] = Field(
        default="val", description="Held-out assets for validation IoU/Chamfer, or the training assets (overfit)."
    )
    num_validation: int = Field(default=4, ge=1, description="Validation assets (their first pair each).")


class TrainGeneratorConfig(StrictModel):
    seed: int = 0
    output: str = Field(default="runs/train-generator", description="Run folder: checkpoints, the exported generator.")
    model: GeneratorModelConfig = Field(default_factory=GeneratorModelConfig)
    data: GeneratorDataConfig = Field(default_factory=GeneratorDataConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    clip_percentile: float = Field(
        default=95.0, gt=0, le=100, description="Adaptive clipping: min(optim.max_grad_norm, this percentile)."
    )
    clip_buffer: int = Field(default=1000, ge=1, description="Recent gradient norms the percentile is taken over.")
    export_merged: bool = Field(
        default=False, description="Also write <output>/generator/merged: the LoRA folded into one ss_flow checkpoint."
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=0)
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    ray: TrainRayConfig = Field(default_factory=TrainRayConfig)
    mlflow: TrainMlflowConfig = Field(default_factory=lambda: TrainMlflowConfig(experiment="know3d-train-generator"))

    @model_validator(mode="after")
    def _modes(self) -> TrainGeneratorConfig:
        if self.data.hidden_mode == "online" and self.model.condition != "hidden":
            raise ValueError(f"data.hidden_mode=online captures H only; condition '{self.model.condition}' is cached")
        return self
