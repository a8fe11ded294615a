"""Render one asset into its work folder: the pure per-asset stage, usable without Ray.

Layout of one finished asset (written to a temporary folder, then renamed, so a folder that
exists is always complete)::

    <work>/<sha[:2]>/<sha>/
        asset.json            cameras (OpenCV c2w + K), pairs, normalization, lights, timings
        rgba/000.png ...      RGBA views (straight alpha; background per config)
        depth/000.png ...     uint16 z-depth, metres = value * asset.json["depth_scale"]
        normal/000.png ...    camera-frame (OpenCV) normals encoded as (n + 1) / 2 * 255
        mask/000.png ...      foreground mask
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from know3d.core.io import atomic_dir, atomic_write
from know3d.rendering.assets import load_asset
from know3d.rendering.camera import ViewPlan, backview_plan, geometry_plan
from know3d.rendering.config import RenderJob
from know3d.rendering.encode import ViewWriter
from know3d.rendering.render import View, ViewRenderer, light_setup

RESULT_FILE = "asset.json"


def render_fingerprint(cfg: RenderJob) -> str:
    """Hash of every setting that changes rendered pixels; names the work folder."""
    payload = {
        "seed": cfg.seed,
        "load": cfg.load.model_dump(mode="json"),
        "render": cfg.render.model_dump(
            mode="json", exclude={"timeout_s", "backend", "gpu_backend", "gl_threads", "png_encoder", "encode_threads"}
        ),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def view_plan(sha: str, cfg: RenderJob) -> ViewPlan:
    r = cfg.render
    if r.profile == "backview":
        return backview_plan(sha, cfg.seed, r.resolution, r.fov_range_deg, r.elevation_range_deg)
    return geometry_plan(
        sha,
        cfg.seed,
        r.resolution,
        r.fov_range_deg,
        r.elevation_range_deg,
        r.perturb.fov_scale_range,
        r.perturb.azimuth_jitter_deg,
        r.perturb.elevation_jitter_deg,
    )


def asset_dir(work: Path, sha: str) -> Path:
    return work / sha[:2] / sha


def compose_background(rgba: np.ndarray, background: str) -> np.ndarray:
    if background == "transparent":
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return np.concatenate([rgb.astype(np.uint8), rgba[..., 3:4]], axis=-1)


def view_writer(out: Path, cfg: RenderJob, depth_scale: float) -> ViewWriter:
    """The writer of this job's views into ``out`` (encoder and threads from the config)."""
    r = cfg.render
    return ViewWriter(out, depth_scale, r.outputs, r.background, r.png_encoder, r.encode_threads)


def write_views(views: list[View], out: Path, cfg: RenderJob, depth_scale: float) -> None:
    with view_writer(out, cfg, depth_scale) as writer:
        for i, view in enumerate(views):
            writer.submit(i, view)


def render_asset(path: Path, sha: str, record: dict, cfg: RenderJob, work: Path, renderer: ViewRenderer) -> dict:
    """Load, render and write one asset; returns the summary stored in ``asset.json``.

    Raises AssetError / AssetFiltered for the asset's own problems; the caller records them.
    """
    final = asset_dir(work, sha)
    t0 = time.perf_counter()
    asset = load_asset(path, cfg.load)
    t1 = time.perf_counter()
    plan = view_plan(sha, cfg)
    depth_scale = max(cam.distance + 1.0 for cam in plan.cameras) / 65535.0
    with atomic_dir(final) as tmp:  # another worker finishing first is fine: same content
        # each view is encoded on the writer's threads while the next one renders
        with view_writer(tmp, cfg, depth_scale) as writer:
            views = renderer.render(
                asset, plan.cameras, part_visibility=cfg.render.part_visibility, on_view=writer.submit
            )
            t2 = time.perf_counter()
        t3 = time.perf_counter()  # write_s: the encoding still left when the last view was read back
        summary = {
            **record,
            "sha256": sha,
            "profile": cfg.render.profile,
            "resolution": cfg.render.resolution,
            "background": cfg.render.background,
            "fov_deg": plan.fov_deg,
            "elevation_deg": plan.elevation_deg,
            "num_faces": asset.num_faces,
            "parts": asset.part_names,
            "normalization": asset.normalization_json(),
            "lights": light_setup(renderer.light_intensity, renderer.ambient),
            "depth_scale": depth_scale,
            "normal_frame": "camera, OpenCV (x right, y down, z forward), encoded (n + 1) / 2 * 255",
            "cameras": [cam.to_json() for cam in plan.cameras],
            "pairs": [list(p) for p in plan.pairs],
            "coverage": [float(v.mask.mean()) for v in views],
            "part_pixels": [v.part_pixels for v in views] if cfg.render.part_visibility else None,
            "timings": {"load_s": t1 - t0, "render_s": t2 - t1, "write_s": t3 - t2},
            "gl_backend": renderer.backend,
        }
        (tmp / RESULT_FILE).write_text(json.dumps(summary))
    return summary


def read_asset(work: Path, sha: str) -> dict | None:
    file = asset_dir(work, sha) / RESULT_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def usable_pairs(summary: dict, min_coverage: float) -> tuple[list[int], list[tuple[int, str]]]:
    """Pair indices whose front and back views both cover at least ``min_coverage`` of the image,
    and the others with the reason (a one-sided quad seen from behind, a plate edge-on)."""
    coverage = summary.get("coverage") or []
    kept: list[int] = []
    dropped: list[tuple[int, str]] = []
    for pair_index, views in enumerate(summary["pairs"]):
        low = [
            (side, view, coverage[view])
            for side, view in zip(("front", "back"), views)
            if view < len(coverage) and coverage[view] < min_coverage
        ]
        if low:
            detail = ", ".join(f"{side} view {view} covers {100 * c:.2f}%" for side, view, c in low)
            dropped.append((pair_index, f"pair {pair_index}: {detail} of the image < {100 * min_coverage:.2f}%"))
        else:
            kept.append(pair_index)
    return kept, dropped


# --------------------------------------------------------------------------- remembered failures
# A render failure is remembered per content hash, so a re-run skips the asset (like a success)
# unless --retry-failed.


@dataclass(frozen=True, slots=True)
class Rendered:
    """The outcome of rendering one asset (its views and asset.json are in the work folder)."""

    status: Literal["ok", "filtered", "failed"]
    reason: str | None = None
    filter: str | None = None
    traceback: str | None = None  # short, redacted; only for unexpected errors
    timings: dict[str, float] | None = None
    num_pairs: int = 0
    wall_s: float | None = None
    skipped: bool = False  # finished (or failed) in an earlier run

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "skipped"}

    @classmethod
    def from_json(cls, data: dict) -> Rendered:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def failure_file(work: Path, sha: str) -> Path:
    return work / "_failed" / f"{sha}.json"


def read_failure(path: Path) -> Rendered | None:
    """A remembered render failure; None if absent or torn (the asset is then tried again)."""
    try:
        failure = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(failure, dict) or failure.get("status") not in ("failed", "filtered"):
        return None
    try:
        return Rendered.from_json(failure)
    except TypeError:
        return None


def remember_failure(path: Path, result: Rendered) -> None:
    atomic_write(path, json.dumps(result.to_json()))
