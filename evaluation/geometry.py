"""Geometry metrics between a predicted and a ground-truth mesh (both already normalized).

Conventions (occupancy networks, Mescheder et al. 2019, ``im2mesh/eval.py``):

* ``accuracy``  = mean distance from each predicted surface sample to the nearest GT sample,
  ``completeness`` = the same from GT to prediction; both with a KD-tree over 100k samples.
* ``chamfer_l1`` = 0.5 · (accuracy + completeness) — mean Euclidean distances;
  ``chamfer_l2`` = 0.5 · (mean d²_pred→gt + mean d²_gt→pred) — means of *squared* distances.
* ``fscore@τ`` thresholds **distances** (not squared distances), ``d <= τ`` as im2mesh does:
  precision = share of predicted samples within τ of GT, recall = share of GT samples within τ of the prediction,
  F = 2PR / (P + R). τ is in the normalized space (longest side 1.96).
* ``normal_consistency`` = 0.5 · (mean |n_pred · n_gt(nn)| + mean |n_gt · n_pred(nn)|).
* ``iou_surface@R`` / ``iou_volume@R``: both meshes are mapped into the unit cube
  [-0.5, 0.5]³ (×0.5) and voxelized on an R³ grid the way the 3D generator's sparse structure is
  built (:mod:`know3d.rendering.voxelize`: a voxel is occupied when a triangle intersects it);
  ``iou_volume`` fills the enclosed interior of that surface grid first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from know3d.evaluation.meshes import sample_surface, uid_rng
from know3d.rendering.voxelize import fill_interior, voxelize_surface


@dataclass(frozen=True)
class GeometryOptions:
    num_samples: int = 100_000
    fscore_thresholds: tuple[float, ...] = (0.01, 0.02)
    voxel_resolution: int = 64
    icp: bool = False
    icp_iterations: int = 30
    workers: int = -1  # cKDTree query threads (-1: all cores)


def nearest_distances(source: np.ndarray, target: np.ndarray, workers: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """For each source point: distance to and index of its nearest target point."""
    from scipy.spatial import cKDTree

    dist, index = cKDTree(target).query(source, k=1, workers=workers)
    return dist, index


def point_metrics(
    pred_points: np.ndarray,
    pred_normals: np.ndarray | None,
    gt_points: np.ndarray,
    gt_normals: np.ndarray | None,
    thresholds: tuple[float, ...] = (0.01, 0.02),
    workers: int = -1,
) -> dict[str, float]:
    """Chamfer-L1/L2, accuracy/completeness, F-scores and (with normals) normal consistency."""
    d_pred, i_pred = nearest_distances(pred_points, gt_points, workers)  # accuracy direction
    d_gt, i_gt = nearest_distances(gt_points, pred_points, workers)  # completeness direction
    accuracy, completeness = float(d_pred.mean()), float(d_gt.mean())
    accuracy2, completeness2 = float((d_pred**2).mean()), float((d_gt**2).mean())
    out = {
        "accuracy": accuracy,
        "completeness": completeness,
        "chamfer_l1": 0.5 * (accuracy + completeness),
        "chamfer_l2": 0.5 * (accuracy2 + completeness2),
    }
    for tau in thresholds:
        precision = float((d_pred <= tau).mean())
        recall = float((d_gt <= tau).mean())
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        out[f"precision@{tau:g}"] = precision
        out[f"recall@{tau:g}"] = recall
        out[f"fscore@{tau:g}"] = f
    if pred_normals is not None and gt_normals is not None:
        acc_nc = np.abs((pred_normals * gt_normals[i_pred]).sum(-1)).mean()
        comp_nc = np.abs((gt_normals * pred_normals[i_gt]).sum(-1)).mean()
        out["normal_consistency"] = float(0.5 * (acc_nc + comp_nc))
    return out


def icp_align(pred_mesh: object, gt_points: np.ndarray, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """Rigid transform (4×4) that aligns the prediction to the GT samples (trimesh ICP)."""
    import trimesh

    probe, _ = sample_surface(pred_mesh, min(20_000, len(gt_points)), rng)
    matrix, _, _ = trimesh.registration.icp(probe, gt_points, max_iterations=iterations, reflection=False, scale=False)
    return np.asarray(matrix)


def voxel_iou(pred_mesh: object, gt_mesh: object, resolution: int = 64) -> dict[str, float]:
    """Surface and volume IoU of the two meshes' R³ unit-cube voxelizations."""
    out = {}
    pred_surface = voxelize_surface(np.asarray(pred_mesh.vertices) * 0.5, np.asarray(pred_mesh.faces), resolution)
    gt_surface = voxelize_surface(np.asarray(gt_mesh.vertices) * 0.5, np.asarray(gt_mesh.faces), resolution)
    for name, a, b in (
        ("surface", pred_surface, gt_surface),
        ("volume", fill_interior(pred_surface), fill_interior(gt_surface)),
    ):
        union = np.logical_or(a, b).sum()
        out[f"iou_{name}@{resolution}"] = float(np.logical_and(a, b).sum() / union) if union else 0.0
    return out


def compare_meshes(pred_mesh: object, gt_mesh: object, uid: str, seed: int, options: GeometryOptions) -> dict:
    """All geometry metrics for one (normalized) prediction against its (normalized) GT."""
    gt_points, gt_normals = sample_surface(gt_mesh, options.num_samples, uid_rng(uid, seed, "geometry-gt"))
    result: dict = {"icp": options.icp}
    if options.icp:
        matrix = icp_align(pred_mesh, gt_points, uid_rng(uid, seed, "icp"), options.icp_iterations)
        pred_mesh = pred_mesh.copy()
        pred_mesh.apply_transform(matrix)
        result["icp_transform"] = matrix.tolist()
    pred_points, pred_normals = sample_surface(pred_mesh, options.num_samples, uid_rng(uid, seed, "geometry-pred"))
    result.update(
        point_metrics(pred_points, pred_normals, gt_points, gt_normals, options.fscore_thresholds, options.workers)
    )
    result.update(voxel_iou(pred_mesh, gt_mesh, options.voxel_resolution))
    return result


def front_consistency(
    front_points: np.ndarray,
    mesh_points: np.ndarray,
    view_dir: np.ndarray,
    centre: np.ndarray | None = None,
    threshold: float = 0.02,
    workers: int = -1,
) -> dict[str, float]:
    """How faithfully a generated surface keeps the input's visible front (Consistent3DGen's
    front-partial guidance), both in the generator's frame (Z-up unit cube, no normalization):

    * ``front_to_mesh``: one-sided Chamfer from the front surface (the point map's valid points,
      ``front_points [N, 3]``) to the surface samples ``mesh_points [M, 3]`` -- mean distance, and
      ``front_within@τ`` the share of front points within τ;
    * ``mesh_front_to_front``: the reverse, restricted to the front hemisphere: surface samples on
      the camera's side of the plane through ``centre`` (default the origin) normal to
      ``view_dir`` (camera -> object), ``(p - centre) · view_dir < 0``;
      ``mesh_front_share`` is the share of samples there.
    """
    front_points = np.asarray(front_points, dtype=np.float64).reshape(-1, 3)
    mesh_points = np.asarray(mesh_points, dtype=np.float64).reshape(-1, 3)
    if not len(front_points) or not len(mesh_points):
        raise ValueError("front consistency needs front points and surface samples")
    view_dir = np.asarray(view_dir, dtype=np.float64)
    view_dir = view_dir / np.linalg.norm(view_dir)
    centre = np.zeros(3) if centre is None else np.asarray(centre, dtype=np.float64)
    d_front, _ = nearest_distances(front_points, mesh_points, workers)
    out = {"front_to_mesh": float(d_front.mean()), f"front_within@{threshold:g}": float((d_front <= threshold).mean())}
    facing = (mesh_points - centre) @ view_dir < 0
    out["mesh_front_share"] = float(facing.mean())
    if facing.any():
        d_back, _ = nearest_distances(mesh_points[facing], front_points, workers)
        out["mesh_front_to_front"] = float(d_back.mean())
    else:
        out["mesh_front_to_front"] = float("nan")
    return out
