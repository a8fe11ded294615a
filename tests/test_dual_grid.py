"""Flexible dual grids (issue 16): mesh -> O-Voxel shape attributes -> mesh, and the 64³ structure."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from know3d.training.generator.dual_grid import DualGrid, coarse_occupancy, dual_grid_to_mesh, mesh_to_dual_grid
from know3d.training.generator.occupancy import occupancy_from_mesh, occupancy_iou

R = 32


def _sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=0.4)


def _box(extents=(0.6, 0.54, 0.7)) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents)


SHAPES = {
    "sphere": _sphere,
    "box": _box,
    # faces exactly on grid planes (y = 8, 24 and z = 4, 28 in grid units): the tie-breaking case
    "grid_aligned_box": lambda: _box((0.6, 0.5, 0.75)),
}


def _chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, n: int = 20000) -> float:
    pa = trimesh.sample.sample_surface(a, n, seed=0)[0]
    pb = trimesh.sample.sample_surface(b, n, seed=1)[0]
    return float(0.5 * (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()))


def _flagged(grid: DualGrid) -> set[tuple[tuple[int, int, int], int]]:
    voxel, axis = np.nonzero(grid.edge_flags)
    return {(tuple(int(c) for c in grid.coords[n]), int(a)) for n, a in zip(voxel, axis, strict=True)}


def _sign_change_edges(inside: np.ndarray) -> set[tuple[tuple[int, int, int], int]]:
    """Edges of the (R+1)³ lattice whose end points differ, as (voxel holding its flag, axis)."""
    edges = set()
    for a in range(3):
        for idx in np.argwhere(np.diff(inside.astype(np.int8), axis=a) != 0):
            voxel = idx.copy()
            voxel[(a + 1) % 3] -= 1
            voxel[(a + 2) % 3] -= 1
            edges.add((tuple(int(c) for c in voxel), a))
    return edges


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_round_trip_is_close_and_closed(name):
    mesh = SHAPES[name]()
    grid = mesh_to_dual_grid(mesh.vertices, mesh.faces, R)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == grid.vertices.shape == grid.edge_flags.shape
    assert grid.split_weights is None
    assert grid.coords.min() >= 0 and grid.coords.max() < R
    assert (grid.vertices >= 0).all() and (grid.vertices <= 1).all()
    assert len(np.unique(grid.coords, axis=0)) == len(grid)
    vertices, faces = dual_grid_to_mesh(grid, R)
    assert vertices.shape == (len(grid), 3) and faces.shape[1] == 3
    out = trimesh.Trimesh(vertices, faces, process=False)
    out.remove_unreferenced_vertices()
    assert _chamfer(mesh, out) < 0.5 / R  # well under one voxel
    assert out.is_watertight and out.is_winding_consistent
    assert out.volume == pytest.approx(mesh.volume, rel=0.02)  # positive: faces point outwards


def test_edge_flags_are_the_sign_changes_of_a_box():
    # the box's inside at the lattice points, ties (a point on a face) decided as the module's
    # perturbation does: the lattice moved by -eps, so a point on the low face is outside
    for extents in [(0.6, 0.54, 0.7), (0.6, 0.5, 0.75)]:
        mesh = _box(extents)
        grid = mesh_to_dual_grid(mesh.vertices, mesh.faces, R)
        lattice = np.arange(R + 1)
        lo, hi = (0.5 - np.array(extents) / 2) * R, (0.5 + np.array(extents) / 2) * R
        axes = [(lattice > lo[d]) & (lattice <= hi[d]) for d in range(3)]
        inside = axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
        assert _flagged(grid) == _sign_change_edges(inside)


def test_edge_flags_are_the_sign_changes_of_a_convex_polyhedron():
    mesh = _sphere()  # convex: a point is inside when it is behind every face plane
    grid = mesh_to_dual_grid(mesh.vertices, mesh.faces, R)
    lattice = np.stack(np.meshgrid(*[np.arange(R + 1) / R - 0.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    height = (lattice @ mesh.face_normals.T - (mesh.face_normals * mesh.triangles[:, 0]).sum(1)).max(1)
    assert np.abs(height).min() > 1e-9  # no lattice point on the surface: no tie to decide
    assert _flagged(grid) == _sign_change_edges((height < 0).reshape((R + 1,) * 3))


def _square_at_x(x: float, lo: float, hi: float, resolution: int):
    """Two triangles in the plane x (grid units) spanning [lo, hi]² in (y, z), in the unit cube."""
    grid_pts = np.array([[x, lo, lo], [x, hi, lo], [x, hi, hi], [x, lo, hi]])
    return grid_pts / resolution - 0.5, np.array([[0, 1, 2], [0, 2, 3]])


def test_one_crossed_edge_gives_its_four_voxels():
    vertices, faces = _square_at_x(3.5, 3.6, 4.4, resolution=8)  # crosses only the x line (y, z) = (4, 4)
    grid = mesh_to_dual_grid(vertices, faces, 8, boundary_weight=0.0)
    np.testing.assert_array_equal(grid.coords, [[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]])
    np.testing.assert_array_equal(grid.edge_flags, [[True, False, False]] + [[False] * 3] * 3)
    np.testing.assert_array_equal(grid.packed_flags()[:, 0], [1, 0, 0, 0])
    np.testing.assert_array_equal(DualGrid.unpack_flags(grid.packed_flags()), grid.edge_flags)
    # the crossing (3.5, 4, 4) minimizes the plane + regularization QEF: each voxel's offset to it
    np.testing.assert_allclose(grid.vertices, [[0.5, 1, 1], [0.5, 1, 0], [0.5, 0, 1], [0.5, 0, 0]], atol=1e-9)
    np.testing.assert_allclose(grid.positions(8), np.full((4, 3), [3.5, 4, 4]) / 8 - 0.5, atol=1e-12)


def test_quad_extraction_and_split_weights():
    coords = np.array([[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]])
    flags = np.zeros((4, 3), bool)
    flags[0, 0] = True
    # two voxels only: the edge's ring of four is incomplete, so no quad (upstream's validity test)
    two = DualGrid(coords[:2], np.full((2, 3), 0.5), flags[:2])
    assert dual_grid_to_mesh(two, 8)[1].shape == (0, 3)
    # quad order (upstream's x offsets): voxels 0, 1, 3, 2; diagonal "0-2" joins voxels 0 and 3
    for weights, diagonal in [([2, 1, 1, 2], {0, 3}), ([1, 2, 2, 1], {1, 2})]:
        grid = DualGrid(coords, np.full((4, 3), 0.5), flags, np.array(weights, float)[:, None])
        vertices, faces = dual_grid_to_mesh(grid, 8, orient=False)
        assert faces.shape == (2, 3) and all(diagonal <= set(face) for face in faces)
        # upstream winding: x quads face -x
        normal = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
        assert (normal[:, 0] < 0).all() and np.allclose(normal[:, 1:], 0)
    # without weights: the least-bend diagonal (a planar quad: both bend 0, upstream keeps 0-2)
    vertices, faces = dual_grid_to_mesh(DualGrid(coords, np.full((4, 3), 0.5), flags), 8)
    assert all({0, 3} <= set(face) for face in faces)


@pytest.mark.parametrize("name", ["sphere", "box"])
def test_coarse_occupancy_matches_direct_voxelization(name):
    mesh = SHAPES[name]()
    grid = mesh_to_dual_grid(mesh.vertices, mesh.faces, R)
    coarse = coarse_occupancy(grid.coords, R, 16)
    direct = occupancy_from_mesh(mesh.vertices, mesh.faces, 16).grid
    assert coarse.shape == (16, 16, 16)
    assert occupancy_iou(coarse, direct) > 0.95
    # the same frame: the fine dual grid reduced 1x is its own occupancy
    same = coarse_occupancy(grid.coords, R, R)
    np.testing.assert_array_equal(np.argwhere(same), grid.coords)
    with pytest.raises(ValueError, match="multiple"):
        coarse_occupancy(grid.coords, R, 24)


def test_bad_input_is_rejected():
    sphere = _sphere()
    with pytest.raises(ValueError, match="non-empty"):
        mesh_to_dual_grid(np.zeros((0, 3)), np.zeros((0, 3), int), R)
    with pytest.raises(ValueError, match="non-empty"):
        mesh_to_dual_grid(sphere.vertices, np.zeros((0, 3), int), R)
    nan = sphere.vertices.copy()
    nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mesh_to_dual_grid(nan, sphere.faces, R)
    with pytest.raises(ValueError, match="unit cube"):
        mesh_to_dual_grid(sphere.vertices * 2, sphere.faces, R)
    with pytest.raises(ValueError, match="face indices"):
        mesh_to_dual_grid(sphere.vertices, sphere.faces + len(sphere.vertices), R)
    with pytest.raises(ValueError, match="resolution"):
        mesh_to_dual_grid(sphere.vertices, sphere.faces, 1)
    grid = mesh_to_dual_grid(sphere.vertices, sphere.faces, R)
    bad = DualGrid(grid.coords, np.where(np.arange(len(grid))[:, None] == 0, np.nan, grid.vertices), grid.edge_flags)
    with pytest.raises(ValueError, match="NaN"):
        dual_grid_to_mesh(bad, R)
    with pytest.raises(ValueError, match="coords outside"):
        dual_grid_to_mesh(grid, R // 2)
