"""Typed, strict configuration for the data-build and training stages.

A run is described by the defaults below, an optional YAML file of differences and
`--set dotted.key=value` overrides, applied in that order. Unknown keys are errors that name
the valid keys; the resolved config is written next to every run's outputs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from know3d.training.prompting import DEFAULT_INSTRUCTION


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sources


class LocalSourceConfig(_Strict):
    input: list[str] = Field(default_factory=list, description="Folders, files or glob patterns.")
    extensions: list[str] = Field(
        default_factory=lambda: ["glb", "gltf", "obj", "ply", "stl", "off"],
        description="File extensions picked up when scanning folders.",
    )
    recursive: bool = True


class ObjaverseSourceConfig(_Strict):
    uids: list[str] = Field(default_factory=list)
    uids_file: str | None = Field(default=None, description="Text file, one uid per line.")
    download_dir: str = Field(
        default="~/.objaverse",
        description="Root of the objaverse cache (the package hard-codes ~/.objaverse).",
    )
    metadata_shards: list[str] = Field(
        default_factory=list,
        description="Annotation shards ('000-000' ...) scanned when no uids are given; empty = all 160.",
    )
    licenses: list[str] = Field(default_factory=list, description="Allowed licenses; empty = any.")
    categories: list[str] = Field(default_factory=list, description="Keep assets in any of these.")
    tags: list[str] = Field(default_factory=list, description="Keep assets having any of these tags.")
    max_face_count: int | None = None
    limit: int | None = None


class TexVerseSourceConfig(_Strict):
    repo_id: str = "YiboZhang2001/TexVerse"
    repo_id_1k: str = "YiboZhang2001/TexVerse-1K"
    revision: str | None = None
    resolution: Literal["1k", "2k", "4k", "8k"] = "1k"
    cache_dir: str | None = Field(default=None, description="huggingface_hub cache; None = HF default.")
    uids: list[str] = Field(default_factory=list)
    uids_file: str | None = None
    licenses: list[str] = Field(default_factory=list)
    max_face_count: int | None = None
    max_texture: int | None = Field(default=None, description="Drop assets whose max_texture is larger.")
    require_pbr: bool = False
    with_captions: bool = True
    limit: int | None = None


class ProceduralSourceConfig(_Strict):
    num_assets: int = Field(default=24, ge=1, le=10_000)
    seed: int = 0


class SourceConfig(_Strict):
    kind: Literal["local", "objaverse", "texverse", "procedural"] = "local"
    local: LocalSourceConfig = Field(default_factory=LocalSourceConfig)
    objaverse: ObjaverseSourceConfig = Field(default_factory=ObjaverseSourceConfig)
    texverse: TexVerseSourceConfig = Field(default_factory=TexVerseSourceConfig)
    procedural: ProceduralSourceConfig = Field(default_factory=ProceduralSourceConfig)


# --------------------------------------------------------------------------- loading


class LoadConfig(_Strict):
    max_file_bytes: int = Field(default=512 * 2**20, description="Larger files are filtered.")
    max_faces: int = Field(
        default=2_000_000,
        description="Assets with more faces are filtered (read from headers/accessors before parsing where possible).",
    )
    max_texture_size: int = Field(default=2048, description="Textures above this are downsampled.")
    max_image_pixels: int = Field(
        default=8192 * 8192, description="Decoding bound per image; larger images fail the asset."
    )
    allow_relative_obj_indices: bool = Field(
        default=True,
        description="Accept OBJ faces with negative (relative) indices (valid OBJ); out-of-range ones are always refused.",
    )


# --------------------------------------------------------------------------- rendering


class PerturbConfig(_Strict):
    fov_scale_range: tuple[float, float] = (0.85, 1.15)
    azimuth_jitter_deg: float = 7.5
    elevation_jitter_deg: float = 5.0


class RenderOutputsConfig(_Strict):
    depth: bool = True
    normal: bool = True
    mask: bool = True


class RenderConfig(_Strict):
    profile: Literal["backview", "geometry"] = "backview"
    resolution: int = Field(default=512, ge=16, le=4096)
    backend: Literal["egl", "osmesa"] = "egl"
    background: Literal["white", "transparent"] = "white"
    fov_range_deg: tuple[float, float] = (30.0, 60.0)
    elevation_range_deg: tuple[float, float] = (-10.0, 30.0)
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)
    outputs: RenderOutputsConfig = Field(default_factory=RenderOutputsConfig)
    light_intensity: float = Field(default=3.0, gt=0)
    ambient: float = Field(default=0.3, ge=0, le=1)
    timeout_s: float = Field(default=300.0, gt=0, description="Per-asset time limit.")
    part_visibility: bool = Field(
        default=True, description="Count visible pixels per named part in every view (parts annotator)."
    )
    gl_threads: int = Field(
        default=1, ge=0, description="llvmpipe threads per renderer (CPU GL; 0 = Mesa default); scale with workers."
    )

    @model_validator(mode="after")
    def _ranges(self) -> RenderConfig:
        lo, hi = self.fov_range_deg
        if not 1.0 <= lo <= hi < 179.0:
            raise ValueError(f"fov_range_deg must satisfy 1 <= lo <= hi < 179, got {self.fov_range_deg}")
        lo, hi = self.elevation_range_deg
        if not -90.0 < lo <= hi < 90.0:
            raise ValueError(f"elevation_range_deg must lie in (-90, 90), got {self.elevation_range_deg}")
        return self


# --------------------------------------------------------------------------- shards / infra


class ShardConfig(_Strict):
    min_view_coverage: float = Field(
        default=0.002,
        ge=0.0,
        le=1.0,
        description="A pair whose front or back view covers less of the image (mask fraction) is filtered.",
    )
    max_samples: int = Field(default=1000, ge=1)
    max_bytes: int = Field(default=1 << 30, ge=1 << 16)
    val_fraction: float = Field(default=0.02, ge=0.0, le=1.0)
    include_depth: bool = True
    include_normal: bool = True
    include_mask: bool = True


class RayConnectionConfig(_Strict):
    """Where a stage's Ray runs (shared by the data build, training and evaluation)."""

    address: str | None = Field(default=None, description="None = start a local Ray; 'auto' or ray://...")
    connect_timeout_s: float = Field(
        default=30.0, gt=0, description="Give up joining the cluster at `address` after this long (one-line error)."
    )


class RayConfig(RayConnectionConfig):
    num_cpus: int | None = Field(default=None, description="CPUs of the local Ray (None = all).")
    render_concurrency: int = Field(default=2, ge=1)
    fetch_concurrency: int = Field(default=4, ge=1)
    shard_concurrency: int = Field(default=2, ge=1)
    object_store_memory: int | None = None


class TrackingConfig(_Strict):
    """Where a stage's MLflow run goes (every stage); stage sections add their own options."""

    enabled: bool = True
    tracking_uri: str | None = Field(default=None, description="None = sqlite file 'mlflow.db' in the working folder.")
    experiment: str = "know3d-data"
    run_name: str | None = None


class MlflowConfig(TrackingConfig):
    num_contact_pairs: int = Field(default=8, ge=0, description="Pairs on the build's contact sheet.")


DEFAULT_PROMPT = (
    "The first image shows an object from the front, the second shows the same object from the back. "
    "List the salient components of the object that are visible in the back view, especially those "
    "hidden or less visible from the front. Answer with a JSON list of at most {max_items} short noun "
    'phrases of at most {max_words} words each, e.g. ["two padded shoulder straps", "a zipper pocket"]. '
    "Describe the object's parts only, never the picture or the camera.{hint}"
)


class OpenAIBackendConfig(_Strict):
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI-compatible server.")
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Environment variable with the key.")
    concurrency: int = Field(default=16, ge=1, le=1024)
    timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, description="HTTP attempts per request (429/5xx/timeouts).")
    backoff_s: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=256, ge=8)
    temperature: float = Field(default=0.2, ge=0)


class TransformersBackendConfig(_Strict):
    model: str = Field(default="Qwen/Qwen2.5-VL-7B-Instruct", description="Hub id or local folder.")
    revision: str | None = None
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=128, ge=8)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPUs, float32 on CPU."
    )
    num_actors: int = Field(default=1, ge=1, description="Ray actors (model replicas).")
    num_gpus_per_actor: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")
    min_pixels: int = Field(default=256 * 28 * 28, ge=4 * 28 * 28)
    max_pixels: int = Field(default=512 * 28 * 28, ge=4 * 28 * 28)


class AnnotateConfig(_Strict):
    backend: Literal["none", "parts", "transformers", "openai"] = "parts"
    prompt_version: str = "v1"
    prompt: str = DEFAULT_PROMPT
    max_items: int = Field(default=6, ge=1, description="K: at most this many descriptions per pair.")
    max_words: int = Field(default=6, ge=1, description="N: at most this many words per description.")
    max_retries: int = Field(default=2, ge=0, description="Re-asks with the validation error.")
    parts_hint: bool = Field(default=False, description="Give the VLM the part list of the parts backend.")
    parts_min_fraction: float = Field(default=0.002, ge=0, le=1, description="Min. share of the image a part covers.")
    parts_back_ratio: float = Field(default=1.5, ge=1, description="A part must show this much more from the back.")
    parts_skip_body: bool = Field(default=True, description="Leave out the part seen most over all views (the body).")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    transformers: TransformersBackendConfig = Field(default_factory=TransformersBackendConfig)


class BuildConfig(_Strict):
    seed: int = 0
    output: str = Field(default="", description="Output folder (CLI --output).")
    strict: bool = Field(default=False, description="Exit non-zero when any asset failed.")
    source: SourceConfig = Field(default_factory=SourceConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


# --------------------------------------------------------------------------- training: back-view LoRA

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class EditModelConfig(_Strict):
    name: str = Field(
        default="Qwen/Qwen-Image-Edit-2511",
        description="Hub id, local folder of a diffusers pipeline, or 'debug:tiny-qwen-image-edit' (built in code).",
    )
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="auto = bfloat16 on GPUs, float32 on CPUs."
    )
    gradient_checkpointing: bool = Field(default=True, description="Non-reentrant activation checkpointing.")


class LoraConfig(_Strict):
    rank: int = Field(default=64, ge=1)
    alpha: float = Field(default=64.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


class TrainDataConfig(_Strict):
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


class FlowConfig(_Strict):
    timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = Field(default=3.0, gt=0)


class OptimConfig(_Strict):
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


class ScheduleConfig(_Strict):
    max_steps: int = Field(default=10_000, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(default=1, ge=1, description="Samples per worker per forward.")
    grad_accum: int = Field(default=1, ge=1)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    validate_every: int = Field(default=500, ge=0, description="0 = no validation grids.")
    num_validation: int = Field(default=4, ge=1, description="Validation pairs per grid.")
    validation_steps: int = Field(default=28, ge=2, description="Sampling steps of validation generations (>= 2).")


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(default=2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on with GPUs.")
    offload_optimizer: bool = Field(default=False, description="ZeRO-Offload of the optimizer state to CPU.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged into the generated DeepSpeed config.")


class TrainRayConfig(RayConnectionConfig):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: Literal["auto", "on", "off"] = Field(default="auto", description="auto = on if the cluster has GPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    storage_path: str | None = Field(
        default=None, description="Where Ray Train keeps checkpoints (shared storage on clusters); None = <output>/ray."
    )
    max_failures: int = Field(default=0, ge=-1, description="Worker-group restarts on failure (-1 = unlimited).")


class LatentCacheConfig(_Strict):
    enabled: bool = Field(default=False, description="Pre-compute VAE latents and prompt embeddings (Ray Data).")
    dir: str | None = Field(default=None, description="None = <output>/latent_cache.")
    batch_size: int = Field(default=4, ge=1)
    num_gpus_per_worker: float = Field(default=1.0, ge=0, description="Used only when the cluster has GPUs.")
    concurrency: int = Field(default=1, ge=1)


class TrainMlflowConfig(TrackingConfig):
    experiment: str = "know3d-train-backview"


class TrainBackviewConfig(_Strict):
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


# --------------------------------------------------------------------------- evaluation


class EvalMeshConfig(_Strict):
    allow_non_manifold: bool = Field(
        default=False, description="Evaluate meshes with edges shared by >2 faces instead of failing them."
    )
    load: LoadConfig = Field(default_factory=LoadConfig)


class EvalPointsConfig(_Strict):
    """The HY3D-Bench point cloud for the semantic scores."""

    surface_samples: int = Field(default=300_000, ge=1)
    fps_points: int = Field(default=8192, ge=1)
    fps_h: int = Field(default=5, ge=1, le=16, description="fpsample bucket kd-line tree height.")


class EvalGeometryConfig(_Strict):
    samples: int = Field(default=100_000, ge=1, description="Surface samples per mesh for CD / F-score / NC.")
    fscore_thresholds: list[float] = Field(default_factory=lambda: [0.01, 0.02])
    voxel_resolution: int = Field(default=64, ge=2)
    icp: bool = Field(default=False, description="Rigidly align the prediction to the GT (ICP) first.")
    icp_iterations: int = Field(default=30, ge=1)


class UlipConfig(_Strict):
    enabled: bool = True
    checkpoint: str | None = Field(
        default=None,
        description="ULIP-2 PointBERT checkpoint (.pt with 'state_dict', or .safetensors).",
    )


class Uni3dConfig(_Strict):
    enabled: bool = True
    checkpoint: str | None = Field(default=None, description="Uni3D-g model.pt ('module' entry) or .safetensors.")
    clip_checkpoint: str | None = Field(
        default=None, description="open_clip EVA02-E-14-plus weights (open_clip_pytorch_model.bin or .safetensors)."
    )
    batchnorm: Literal["batch", "running"] = Field(
        default="batch",
        description="HY3D-Bench runs Uni3D without model.eval(), so its point tokenizer's BatchNorm "
        "uses per-cloud batch statistics; 'batch' reproduces that, 'running' uses the stored stats.",
    )


class EvalSemanticConfig(_Strict):
    enabled: bool = True
    arch: Literal["full", "tiny"] = Field(
        default="full", description="'tiny': debug-size ULIP/Uni3D architectures (tests, tiny checkpoints)."
    )
    ulip: UlipConfig = Field(default_factory=UlipConfig)
    uni3d: Uni3dConfig = Field(default_factory=Uni3dConfig)
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu' or 'cuda[:i]'.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per scoring actor on a Ray cluster.")


class EvalImagesConfig(_Strict):
    background: Literal["white", "black", "gray"] = "white"
    max_pixels: int = Field(default=4096 * 4096, ge=1, description="Decoding bound per image.")
    lpips: bool = True
    lpips_backbone: str | None = Field(
        default=None,
        description="AlexNet weights for LPIPS (None = $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth).",
    )


class EvalReportConfig(_Strict):
    renders: bool = True
    resolution: int = Field(default=256, ge=32)
    backend: Literal["egl", "osmesa"] = "egl"
    max_rows: int = Field(default=200, ge=0, description="uids shown with renders in the HTML report.")


class EvalRayConfig(RayConnectionConfig):
    num_cpus: int | None = None
    object_store_memory: int | None = None
    concurrency: int = Field(default=2, ge=1, description="Meshes measured in parallel (one core each).")


class EvalMlflowConfig(TrackingConfig):
    experiment: str = "know3d-eval"


class EvalConfig(_Strict):
    """`know3d eval shapes|backviews` (defaults: the HY3D-Bench protocol)."""

    seed: int = Field(default=0, description="Keys every surface sample and FPS start point (with the uid).")
    mesh: EvalMeshConfig = Field(default_factory=EvalMeshConfig)
    points: EvalPointsConfig = Field(default_factory=EvalPointsConfig)
    geometry: EvalGeometryConfig = Field(default_factory=EvalGeometryConfig)
    semantic: EvalSemanticConfig = Field(default_factory=EvalSemanticConfig)
    images: EvalImagesConfig = Field(default_factory=EvalImagesConfig)
    report: EvalReportConfig = Field(default_factory=EvalReportConfig)
    ray: EvalRayConfig = Field(default_factory=EvalRayConfig)
    mlflow: EvalMlflowConfig = Field(default_factory=EvalMlflowConfig)

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.points.surface_samples <= self.points.fps_points:
            raise ValueError(
                f"points.surface_samples ({self.points.surface_samples}) must exceed points.fps_points "
                f"({self.points.fps_points})"
            )
        if not self.geometry.fscore_thresholds or min(self.geometry.fscore_thresholds) <= 0:
            raise ValueError("geometry.fscore_thresholds must be positive distances")
        return self


# --------------------------------------------------------------------------- loading helpers


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _check_keys(data: Any, model: type[BaseModel], prefix: str) -> None:
    """Raise on unknown keys, naming the valid ones and the closest match."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in model.model_fields:
            valid = _valid_keys(model)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'.{hint} Valid keys here: {', '.join(valid)}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{path}.")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'render.resolution=256' -> (['render', 'resolution'], 256); values parse as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': '{part}' is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = BuildConfig,
) -> Any:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded or {}
    for item in overrides or []:
        key_path, value = parse_override(item)
        apply_override(data, key_path, value)
    _check_keys(data, model, "")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
