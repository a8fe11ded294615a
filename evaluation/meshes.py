"""Mesh input for evaluation: safe loading, validation, the HY3D-Bench normalization, sampling.

Protocol (HY3D-Bench, made deterministic):

* the file is loaded as **one** mesh (every node of a glTF scene with its transform, concatenated);
* its bounding-box centre goes to the origin and it is scaled by ``2 * 0.98 / max_extent``, so
  the longest side spans [-0.98, 0.98];
* surface points are drawn area-uniformly (300,000 for the semantic scores) and reduced by
  farthest point sampling to 8,192 with ``fpsample.bucket_fps_kdline_sampling(h=5)``.

HY3D-Bench draws the surface samples and the FPS start point from an unseeded generator. Here
both come from a generator keyed by ``(seed, uid, stream)``: the same mesh gives the same points
in any run, in any order and on any number of workers, and different uids get independent draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from know3d.rendering.assets import AssetError, AssetFiltered, load_asset
from know3d.rendering.config import LoadConfig

HY3D_SCALE = 2.0 * 0.98  # the longest bbox side after normalization


class MeshError(Exception):
    """The mesh cannot be evaluated; the message names the file and the reason."""


def uid_rng(uid: str, seed: int, stream: str) -> np.random.Generator:
    """A generator that depends only on (seed, uid, stream)."""
    digest = hashlib.sha256(f"know3d-eval:{seed}:{uid}:{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass
class MeshInfo:
    num_vertices: int
    num_faces: int
    non_manifold_edges: int
    watertight: bool
    extent: list[float]  # bbox size before normalization

    def to_json(self) -> dict:
        return {
            "num_vertices": self.num_vertices,
            "num_faces": self.num_faces,
            "non_manifold_edges": self.non_manifold_edges,
            "watertight": self.watertight,
            "extent": self.extent,
        }


def count_non_manifold_edges(mesh: object) -> int:
    """Edges shared by more than two faces (after merging coincident vertices).

    Degenerate faces (two equal corners) and duplicated faces are left out: they carry no
    surface, and counting them would reject e.g. marching-cubes output with collapsed cells."""
    faces = np.asarray(mesh.faces)
    keep = np.asarray(mesh.nondegenerate_faces()) & np.asarray(mesh.unique_faces())
    faces = faces[keep]
    if len(faces) == 0:
        return 0
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return int((counts > 2).sum())


def load_mesh(
    path: Path, load_cfg: LoadConfig | None = None, allow_non_manifold: bool = False
) -> tuple[object, MeshInfo]:
    """Load ``path`` as one triangle mesh in world coordinates and validate it.

    Uses the data build's safe loader in its geometry-only mode (references must stay inside the
    file's folder, OBJ text is checked; materials and textures are not loaded). Raises :class:`MeshError` for unreadable, empty, non-finite,
    degenerate and — unless allowed — non-manifold meshes.
    """
    import trimesh

    path = Path(path)
    try:
        asset = load_asset(path, load_cfg or LoadConfig(), geometry_only=True)
    except (AssetError, AssetFiltered) as exc:
        raise MeshError(str(exc)) from None
    parts = []
    for node_name in asset.scene.graph.nodes_geometry:
        transform, geometry_name = asset.scene.graph[node_name]
        geometry = asset.scene.geometry[geometry_name]
        part = trimesh.Trimesh(vertices=geometry.vertices, faces=geometry.faces, process=False)
        part.apply_transform(transform)
        parts.append(part)
    mesh = trimesh.util.concatenate(parts) if len(parts) > 1 else parts[0]
    mesh.merge_vertices()  # glTF splits vertices at UV seams; topology checks need them merged
    if not np.isfinite(mesh.vertices).all():
        raise MeshError(f"{path.name}: non-finite vertex coordinates after the scene transforms")
    areas = mesh.area_faces
    if len(mesh.faces) == 0 or not float(areas.sum()) > 0:
        raise MeshError(f"{path.name}: mesh has no surface area (empty or degenerate faces only)")
    extent = mesh.bounds[1] - mesh.bounds[0]
    if not float(extent.max()) > 0:
        raise MeshError(f"{path.name}: degenerate bounding box (all vertices coincide)")
    non_manifold = count_non_manifold_edges(mesh)
    if non_manifold and not allow_non_manifold:
        raise MeshError(
            f"{path.name}: non-manifold mesh ({non_manifold} edges shared by more than two faces); "
            "set mesh.allow_non_manifold=true to evaluate it anyway"
        )
    info = MeshInfo(len(mesh.vertices), len(mesh.faces), non_manifold, bool(mesh.is_watertight), extent.tolist())
    return mesh, info


def normalize(mesh: object) -> object:
    """Bounding-box centre to the origin, longest side scaled to 2 * 0.98 (a copy)."""
    out = mesh.copy()
    lo, hi = out.bounds
    out.apply_translation(-(lo + hi) / 2.0)
    out.apply_scale(HY3D_SCALE / float((hi - lo).max()))
    return out


def sample_surface(mesh: object, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` area-uniform surface points and their face normals, float32."""
    import trimesh

    points, face_index = trimesh.sample.sample_surface(mesh, count, seed=rng)
    normals = np.asarray(mesh.face_normals)[face_index]
    return np.asarray(points, dtype=np.float32), normals.astype(np.float32)


def farthest_points(points: np.ndarray, count: int, rng: np.random.Generator, h: int = 5) -> np.ndarray:
    """Indices of ``count`` points by fpsample's bucket kd-line FPS; the start point from ``rng``."""
    import fpsample

    if len(points) <= count:
        raise MeshError(f"cannot take {count} farthest points from {len(points)} samples")
    start = int(rng.integers(len(points)))
    return np.asarray(fpsample.bucket_fps_kdline_sampling(points, count, h, start_idx=start), dtype=np.int64)


def semantic_points(
    mesh: object, uid: str, seed: int, num_samples: int = 300_000, num_points: int = 8192, h: int = 5
) -> np.ndarray:
    """The HY3D-Bench point cloud of a *normalized* mesh: [num_points, 3] float32."""
    points, _ = sample_surface(mesh, num_samples, uid_rng(uid, seed, "semantic-surface"))
    index = farthest_points(points, num_points, uid_rng(uid, seed, "semantic-fps"), h)
    return points[index]
