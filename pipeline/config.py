"""The data build's config, composed of the stages' own sections (top floor only).

Each stage owns its config beside its code: sources, loading and rendering in
:mod:`know3d.rendering.config`, annotation in :mod:`know3d.annotation.config`, the shard format in
:mod:`know3d.core.shards`, training in :mod:`know3d.training.config`, evaluation in
:mod:`know3d.evaluation.config`. The loader (YAML + dotted overrides, "did you mean") is
:func:`know3d.core.config.load_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from know3d.annotation.config import AnnotateConfig
from know3d.core import config as _core
from know3d.core.config import ConfigError, RayConfig, StrictModel, TrackingConfig, dump_config
from know3d.core.shards import ShardConfig
from know3d.rendering.config import LoadConfig, RenderConfig, RenderJob, SourceConfig

__all__ = ["BuildConfig", "BuildRayConfig", "BuildTrackingConfig", "ConfigError", "dump_config", "load_config"]


class BuildRayConfig(RayConfig):
    render_concurrency: int = Field(default=2, ge=1, description="Render actors.")
    render_cpus_per_actor: float = Field(
        default=1.0, gt=0, description="CPUs per render actor (its GL loop and PNG encoder threads)."
    )
    render_gpus_per_actor: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="GPU share per render actor: 0 = CPU rendering (render.backend); e.g. 0.25 = 4 actors per GPU, "
        "on GPU nodes, with render.gpu_backend and the NVIDIA EGL vendor.",
    )
    render_egl_vendor: str = Field(
        default="/usr/share/glvnd/egl_vendor.d/10_nvidia.json",
        description="GLVND EGL vendor file for GPU render actors (the NVIDIA container toolkit mounts it with "
        "the 'graphics' driver capability); empty = GLVND's own choice.",
    )
    fetch_concurrency: int = Field(default=4, ge=1)
    shard_concurrency: int = Field(default=2, ge=1)


class BuildTrackingConfig(TrackingConfig):
    num_contact_pairs: int = Field(default=8, ge=0, description="Pairs on the build's contact sheet.")


class BuildConfig(StrictModel):
    seed: int = 0
    output: str = Field(default="", description="Output folder (CLI --output).")
    strict: bool = Field(default=False, description="Exit non-zero when any asset failed.")
    source: SourceConfig = Field(default_factory=SourceConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    ray: BuildRayConfig = Field(default_factory=BuildRayConfig)
    mlflow: BuildTrackingConfig = Field(default_factory=BuildTrackingConfig)

    def render_job(self) -> RenderJob:
        """What the rendered views depend on (the render workers' input)."""
        return RenderJob(seed=self.seed, load=self.load, render=self.render)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, model: type[BaseModel] = BuildConfig
) -> Any:
    """:func:`know3d.core.config.load_config`, for the data build unless another model is given."""
    return _core.load_config(path, overrides, model)
