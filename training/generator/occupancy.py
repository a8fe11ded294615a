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
