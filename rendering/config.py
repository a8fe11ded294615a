"""Config of the rendering stage: asset sources, safe loading and the renderer.

``RenderJob`` is what a rendered asset depends on (seed, loading limits, render settings); its
fingerprint names the work folder the views are stored in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from know3d.core.config import StrictModel

# --------------------------------------------------------------------------- sources


class LocalSourceConfig(StrictModel):
    input: list[str] = Field(default_factory=list, description="Folders, files or glob patterns.")
    extensions: list[str] = Field(
        default_factory=lambda: ["glb", "gltf", "obj", "ply", "stl", "off"],
        description="File extensions picked up when scanning folders.",
    )
    recursive: bool = True


class ObjaverseSourceConfig(StrictModel):
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


class TexVerseSourceConfig(StrictModel):
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


class ProceduralSourceConfig(StrictModel):
    num_assets: int = Field(default=24, ge=1, le=10_000)
    seed: int = 0


class SourceConfig(StrictModel):
    kind: Literal["local", "objaverse", "texverse", "procedural"] = "local"
    local: LocalSourceConfig = Field(default_factory=LocalSourceConfig)
    objaverse: ObjaverseSourceConfig = Field(default_factory=ObjaverseSourceConfig)
    texverse: TexVerseSourceConfig = Field(default_factory=TexVerseSourceConfig)
    procedural: ProceduralSourceConfig = Field(default_factory=ProceduralSourceConfig)


# --------------------------------------------------------------------------- loading


class LoadConfig(StrictModel):
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


class PerturbConfig(StrictModel):
    fov_scale_range: tuple[float, float] = (0.85, 1.15)
    azimuth_jitter_deg: float = 7.5
    elevation_jitter_deg: float = 5.0


class RenderOutputsConfig(StrictModel):
    depth: bool = True
    normal: bool = True
    mask: bool = True


class RenderConfig(StrictModel):
    profile: Literal["backview", "geometry"] = "backview"
    resolution: int = Field(default=512, ge=16, le=4096)
    backend: Literal["egl", "osmesa"] = Field(
        default="egl", description="GL platform of CPU render actors (EGL on Mesa's llvmpipe, or OSMesa)."
    )
    gpu_backend: Literal["egl", "osmesa"] = Field(
        default="egl", description="GL platform of render actors holding a GPU (ray.render_gpus_per_actor > 0)."
    )
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
    png_encoder: Literal["fast", "pillow"] = Field(
        default="fast",
        description="Lossless PNG encoder: 'fast' = zlib-ng level 1, RLE, SUB filter (imagecodecs); 'pillow' = "
        "Pillow level 3. Decoded pixels are identical.",
    )
    encode_threads: int = Field(
        default=0,
        ge=0,
        description="PNG encoder threads per render actor, encoding views while the next renders "
        "(0 = the actor's cores, at most 4; 1 = in the render loop).",
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


class RenderJob(StrictModel):
    """Everything the views of one asset depend on (the render worker's whole input config)."""

    seed: int = 0
    load: LoadConfig = Field(default_factory=LoadConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
