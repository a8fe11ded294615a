"""Per-uid shape evaluation: everything that needs the mesh (no torch, runs in any worker).

:func:`measure_shape` loads and validates the prediction (and the ground truth when given),
normalizes both, draws the seeded point cloud for the semantic scores, computes the geometry
metrics and renders the normal-shaded report views. A bad mesh never raises: it becomes a result
with ``status: "error"``, the stage (``prediction`` / ``ground_truth``) and the reason.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from know3d.evaluation.config import EvalConfig
from know3d.evaluation.geometry import GeometryOptions, compare_meshes
from know3d.evaluation.meshes import MeshError, load_mesh, normalize, semantic_points
from know3d.evaluation.results import uid_filename
from know3d.evaluation.scoring import add_scores

VIEW_ANGLES = {"front": (0.0, 15.0), "back": (180.0, 15.0)}  # azimuth, elevation (degrees)


@dataclass
class ShapeJob:
    uid: str
    pred: str | None  # mesh path (None: the uid has an image but no prediction)
    gt: str | None = None
    image: str | None = None


def geometry_options(cfg: EvalConfig, threads: int = -1) -> GeometryOptions:
    g = cfg.geometry
    return GeometryOptions(g.samples, tuple(g.fscore_thresholds), g.voxel_resolution, g.icp, g.icp_iterations, threads)


_RENDERERS: dict[tuple[int, str], object] = {}


def process_renderer(resolution: int, backend: str) -> object:
    """One renderer per worker process and size, reused across uids (creating one costs ~50 ms
    plus a GL context)."""
    from know3d.rendering.render import ViewRenderer

    key = (resolution, backend)
    if key not in _RENDERERS:
        _RENDERERS[key] = ViewRenderer(resolution, backend)
    return _RENDERERS[key]


def normal_image(normal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Camera-frame normals (OpenCV) -> the usual normal-map colours on white."""
    n = normal * np.array([1.0, -1.0, -1.0])  # x right, y up, z towards the viewer
    rgb = ((n + 1.0) * 0.5 * 255.0).clip(0, 255).astype(np.uint8)
    rgb[~mask] = 255
    return rgb


def mesh_asset(mesh: object) -> object:
    """A normalized mesh (longest side 1.96) as a renderable asset in the unit cube."""
    import trimesh

    from know3d.rendering.assets import LoadedAsset

    scene = trimesh.Scene()
    scene.add_geometry(mesh, node_name="mesh", geom_name="mesh")
    to_unit_cube = np.diag([0.5, 0.5, 0.5, 1.0])  # [-0.98, 0.98] -> [-0.49, 0.49]
    return LoadedAsset(scene, to_unit_cube, len(mesh.faces), 1, ["mesh"])


def render_normals(
    mesh: object, resolution: int, backend: str, renderer: object | None = None
) -> dict[str, np.ndarray]:
    """Front and back normal-shaded views of a normalized mesh (longest side 1.96)."""
    from know3d.rendering.camera import make_camera
    from know3d.rendering.render import ViewRenderer

    own = renderer is None
    renderer = renderer or ViewRenderer(resolution, backend)
    try:
        asset = mesh_asset(mesh)
        cameras = [make_camera(az, el, 40.0, resolution) for az, el in VIEW_ANGLES.values()]
        views = renderer.render(asset, cameras)
        return {name: normal_image(v.normal, v.mask) for name, v in zip(VIEW_ANGLES, views)}
    finally:
        if own:
            renderer.close()


def _save_renders(images: dict[str, np.ndarray], out_dir: Path, uid: str, who: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for view, array in images.items():
        name = f"{uid_filename(uid)}_{who}_{view}.png"
        Image.fromarray(array).save(out_dir / name)
        paths[f"{who}_{view}"] = f"renders/{name}"
    return paths


def measure_shape(
    job: ShapeJob, cfg: EvalConfig, out_dir: Path | None, renderer: object | None = None, threads: int = -1
) -> tuple[dict, np.ndarray | None]:
    """(result, points): the per-uid result dict and the semantic point cloud (or None).

    ``renderer``: a :class:`ViewRenderer` to reuse (default: a fresh one per call);
    ``threads``: KD-tree query threads (-1: all cores)."""
    start = time.perf_counter()
    result: dict = {"uid": job.uid, "prediction": job.pred, "ground_truth": job.gt, "image": job.image}
    if job.pred is None:
        result.update(status="missing", error="no prediction for this uid (a condition image exists)")
        return result, None
    stage = "prediction"
    points = gt = None
    try:
        pred, info = load_mesh(Path(job.pred), cfg.mesh.load, cfg.mesh.allow_non_manifold)
        result["mesh"] = info.to_json()
        pred = normalize(pred)
        if cfg.semantic.enabled and job.image is not None:
            p = cfg.points
            points = semantic_points(pred, job.uid, cfg.seed, p.surface_samples, p.fps_points, p.fps_h)
        if job.gt is not None:
            stage = "ground_truth"
            gt, gt_info = load_mesh(Path(job.gt), cfg.mesh.load, cfg.mesh.allow_non_manifold)
            result["gt_mesh"] = gt_info.to_json()
            gt = normalize(gt)
            stage = "geometry"
            result["geometry"] = compare_meshes(pred, gt, job.uid, cfg.seed, geometry_options(cfg, threads))
        result["status"] = "ok"
    except MeshError as exc:
        result.update(status="error", stage=stage, error=str(exc))
        points = gt = None
    except Exception as exc:  # noqa: BLE001 - one uid's failure never stops the evaluation
        result.update(
            status="error",
            stage=stage,
            error=f"{type(exc).__name__}: {exc}"[:500],
            traceback="".join(traceback.format_exception(exc, limit=-4))[-1500:],
        )
        points = gt = None
    if result["status"] == "ok" and cfg.report.renders and out_dir is not None:
        try:  # the report's pictures: a failure here leaves the metrics standing
            renders = _save_renders(
                render_normals(pred, cfg.report.resolution, cfg.report.backend, renderer), out_dir, job.uid, "pred"
            )
            if gt is not None:
                renders.update(
                    _save_renders(
                        render_normals(gt, cfg.report.resolution, cfg.report.backend, renderer), out_dir, job.uid, "gt"
                    )
                )
            result["renders"] = renders
        except Exception as exc:  # noqa: BLE001
            result["render_error"] = f"{type(exc).__name__}: {exc}"[:500]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result, points


def evaluate_shape(
    job: ShapeJob, cfg: EvalConfig, output: Path, score: Callable[[np.ndarray, str], dict] | None = None
) -> dict:
    """The whole result of one uid of ``eval shapes``, as one worker computes it.

    Measured on one core (``ray.concurrency`` workers run side by side), rendered into
    ``<output>/renders`` with this process's renderer, then scored by ``score(points, image)``
    (a :class:`~know3d.evaluation.scoring.ScoringActor` call) when a point cloud was drawn."""
    renderer = process_renderer(cfg.report.resolution, cfg.report.backend) if cfg.report.renders else None
    result, points = measure_shape(job, cfg, output / "renders", renderer, threads=1)
    if score is not None and points is not None and result["status"] == "ok":
        add_scores(result, score(points, result["image"]))
    return result
