"""Config of ``know3d eval shapes|backviews`` (defaults: the HY3D-Bench protocol)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from know3d.core.config import RayConfig, StrictModel, TrackingConfig
from know3d.rendering.config import LoadConfig


class EvalMeshConfig(StrictModel):
    allow_non_manifold: bool = Field(
        default=False, description="Evaluate meshes with edges shared by >2 faces instead of failing them."
    )
    load: LoadConfig = Field(default_factory=LoadConfig)


class EvalPointsConfig(StrictModel):
    """The HY3D-Bench point cloud for the semantic scores."""

    surface_samples: int = Field(default=300_000, ge=1)
    fps_points: int = Field(default=8192, ge=1)
    fps_h: int = Field(default=5, ge=1, le=16, description="fpsample bucket kd-line tree height.")


class EvalGeometryConfig(StrictModel):
    samples: int = Field(default=100_000, ge=1, description="Surface samples per mesh for CD / F-score / NC.")
    fscore_thresholds: list[float] = Field(default_factory=lambda: [0.01, 0.02])
    voxel_resolution: int = Field(default=64, ge=2)
    icp: bool = Field(default=False, description="Rigidly align the prediction to the GT (ICP) first.")
    icp_iterations: int = Field(default=30, ge=1)


class UlipConfig(StrictModel):
    enabled: bool = True
    checkpoint: str | None = Field(
        default=None,
        description="ULIP-2 PointBERT checkpoint (.pt with 'state_dict', or .safetensors).",
    )


class Uni3dConfig(StrictModel):
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


class EvalSemanticConfig(StrictModel):
    enabled: bool = True
    arch: Literal["full", "tiny"] = Field(
        default="full", description="'tiny': debug-size ULIP/Uni3D architectures (tests, tiny checkpoints)."
    )
    ulip: UlipConfig = Field(default_factory=UlipConfig)
    uni3d: Uni3dConfig = Field(default_factory=Uni3dConfig)
    device: str = Field(default="auto", description="'auto' (cuda if available), 'cpu' or 'cuda[:i]'.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per scoring actor on a Ray cluster.")


class EvalImagesConfig(StrictModel):
    background: Literal["white", "black", "gray"] = "white"
    max_pixels: int = Field(default=4096 * 4096, ge=1, description="Decoding bound per image.")
    lpips: bool = True
    lpips_backbone: str | None = Field(
        default=None,
        description="AlexNet weights for LPIPS (None = $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth).",
    )


class EvalReportConfig(StrictModel):
    renders: bool = True
    resolution: int = Field(default=256, ge=32)
    backend: Literal["egl", "osmesa"] = "egl"
    max_rows: int = Field(default=200, ge=0, description="uids shown with renders in the HTML report.")


class EvalRayConfig(RayConfig):
    concurrency: int = Field(default=2, ge=1, description="Meshes measured in parallel (one core each).")


class EvalMlflowConfig(TrackingConfig):
    experiment: str = "know3d-eval"


class EvalConfig(StrictModel):
    """`know3d eval shapes|backviews` (defaults: the HY3D-Bench protocol)."""

    seed: int = Field(default=0, description="Keys every surface sample and FPS start point (with the uid).")
    model: str | None = Field(
        default=None,
        description="The model whose outputs are evaluated (an exported model folder or runs:/ URI); recorded in "
        "MLflow to link the evaluation to its training run. Not part of the protocol.",
    )
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
