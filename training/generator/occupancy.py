"""Sparse-structure occupancy targets from a mesh, in the TRELLIS convention.

* **Normalization**: the renderer's (``know3d.rendering.assets.load_asset``): the scene's bounding
  box is centred at the origin and its longest side scaled to 1, so the object fills the unit cube
  [-0.5, 0.5]³ exactly as in the rendered views. Vertices are then clipped to
  [-0.5 + 1e-6, 0.5 - 1e-6] as TRELLIS' data toolkit does before voxelizing.
* **Axes**: TRELLIS voxelizes the mesh that Blender exported, i.e. Blender's Z-up frame; its
  glTF output maps back with ``(x, y, z) -> (x, z, -y)``. Our assets are glTF (Y-up), so a point
  ``(x, y, z)`` of the normalized glTF scene goes to ``(x, -z, y)`` (Blender's glTF import) before
  voxelizing. Grid index ``[i, j, k]`` is then along (x, y, z) of that Z-up frame: ``k`` is up,
  and ``-j`` is the glTF +z (the front the renderer's front view looks at).
* **Voxels**: a voxel is occupied when a triangle intersects it (surface only, no interior fill),
  Open3D's ``create_from_triangle_mesh_within_bounds`` criterion that TRELLIS uses, computed by
  :func:`know3d.rendering.voxelize.voxelize_surface`. Index ``i`` covers
  ``[-0.5 + i/R, -0.5 + (i+1)/R)``; its centre is ``(i + 0.5) / R - 0.5`` (TRELLIS' position
  formula). ``coords`` are the occupied ``[i, j, k]`` in C order (``np.argwhere``), the order of
  TRELLIS' ``grid_index`` columns, so ``grid[coords[:, 0], coords[:, 1], coords[:, 2]]`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from know3d.rendering.voxelize import voxelize_surface

# glTF Y-up -> TRELLIS/Blender Z-up: (x, y, z) -> (x, -z, y), as a matrix acting on column vectors
GLTF_TO_ZUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclass
class Occupancy:
    grid: np.ndarray  # [R, R, R] bool, indexed [x, y, z] of the Z-up frame
    coords: np.ndarray  # [N, 3] int64 occupied indices (C order)

    @property
    def resolution(self) -> int:
        return int(self.grid.shape[0])

    def positions(self) -> np.ndarray:
        """Voxel centres [N, 3] in the unit cube (Z-up): ``(index + 0.5) / R - 0.5``."""
        return (self.coords + 0.5) / self.resolution - 0.5


def unit_cube_mesh(path: Path, load_cfg: object | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3] in the Z-up unit cube, faces [F, 3]) of an asset, every node concatenated
    with its transform and the renderer's normalization. Uses the renderer's safe loader
    (geometry only); raises its ``AssetError`` / ``AssetFiltered``."""
    from know3d.rendering.assets import load_asset
    from know3d.rendering.config import LoadConfig

    asset = load_asset(Path(path), load_cfg or LoadConfig(), geometry_only=True)
    verts, faces, offset = [], [], 0
    for node_name in asset.scene.graph.nodes_geometry:
        transform, geometry_name = asset.scene.graph[node_name]
        geometry = asset.scene.geometry[geometry_name]
        if not hasattr(geometry, "faces") or len(geometry.faces) == 0:
            continue  # point clouds / paths carry no surface
        matrix = asset.normalization @ transform
        v = np.asarray(geometry.vertices, dtype=np.float64)
        v = v @ matrix[:3, :3].T + matrix[:3, 3]
        verts.append(v)
        faces.append(np.asarray(geometry.faces, dtype=np.int64) + offset)
        offset += len(v)
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    vertices = np.concatenate(verts) @ GLTF_TO_ZUP.T
    return vertices, np.concatenate(faces)


def occupancy_from_mesh(vertices: np.ndarray, faces: np.ndarray, resolution: int = 64) -> Occupancy:
    """Surface occupancy of a mesh already in the Z-up unit cube (vertices clipped as TRELLIS)."""
    vertices = np.clip(np.asarray(vertices, dtype=np.float64), -0.5 + 1e-6, 0.5 - 1e-6)
    grid = voxelize_surface(vertices, faces, resolution)
    return Occupancy(grid, np.argwhere(grid).astype(np.int64))


def asset_occupancy(path: Path, resolution: int = 64, load_cfg: object | None = None) -> Occupancy:
    """The ``resolution``³ TRELLIS occupancy (64 for the released SS-VAE) of an asset file."""
    vertices, faces = unit_cube_mesh(path, load_cfg)
    return occupancy_from_mesh(vertices, faces, resolution)


# --------------------------------------------------------------------------- comparing and exporting grids


def voxel_points(grid: np.ndarray) -> np.ndarray:
    """Occupied voxel centers of a [R, R, R] grid in the unit cube [-0.5, 0.5]³ (grid indices)."""
    resolution = grid.shape[0]
    return (np.argwhere(grid).astype(np.float64) + 0.5) / resolution - 0.5


def occupancy_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean grids (1.0 when both are empty)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"grids of different shapes: {pred.shape} vs {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def occupancy_chamfer(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric Chamfer distance (mean of both directions' mean nearest distances) between the
    occupied voxel centers, in unit-cube units; inf when exactly one grid is empty."""
    from scipy.spatial import cKDTree

    a, b = voxel_points(pred), voxel_points(gt)
    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else float("inf")
    return float(0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()))


def projections(grid: np.ndarray) -> np.ndarray:
    """Three max-projections (along x, y, z) side by side: uint8 [R, 3R] (occupied = dark)."""
    grid = np.asarray(grid, bool)
    views = [grid.any(axis=axis) for axis in range(3)]
    return np.where(np.concatenate(views, axis=1), 0, 255).astype(np.uint8)


def comparison_image(pairs: list[tuple[str, np.ndarray, np.ndarray]], scale: int = 4):
    """Rows of (label, sampled, true) grids as projections: sampled | true (a PIL image)."""
    from PIL import Image, ImageDraw

    rows = []
    for label, pred, gt in pairs:
        row = np.concatenate([projections(pred), np.full((pred.shape[0], 4), 128, np.uint8), projections(gt)], axis=1)
        rows.append((label, row))
    width = max(r.shape[1] for _, r in rows) * scale
    header = 14
    height = sum(r.shape[0] * scale + header for _, r in rows)
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, row in rows:
        draw.text((2, y + 1), f"{label}: sampled (x, y, z) | true", fill=0)
        image = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.Resampling.NEAREST)
        canvas.paste(image, (0, y + header))
        y += row.shape[0] * scale + header
    return canvas


def occupancy_mesh(grid: np.ndarray):
    """A watertight mesh of the occupied voxels (marching cubes on the padded grid at 0.5), in the
    unit cube and in glTF's Y-up axes (the inverse of :func:`unit_cube_mesh`'s Z-up mapping)."""
    import trimesh
    from skimage.measure import marching_cubes

    grid = np.asarray(grid, bool)
    if not grid.any():
        raise ValueError("the occupancy grid is empty: no surface to mesh")
    resolution = grid.shape[0]
    padded = np.pad(grid.astype(np.float32), 1)
    vertices, faces, _, _ = marching_cubes(padded, 0.5)
    vertices = (vertices - 1 + 0.5) / resolution - 0.5  # voxel centers -> unit cube
    vertices = vertices @ GLTF_TO_ZUP  # Z-up (TRELLIS) -> glTF Y-up (GLTF_TO_ZUP is a rotation)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
