"""Flexible dual grids (TRELLIS.2's O-Voxel shape attributes): mesh -> dual grid -> mesh.

TRELLIS.2's stage 2 (the shape SC-VAE and the shape structured-latent flow) works on a sparse
voxel grid at a fine resolution R (512 / 1024 full size; 32-64 on CPU) whose voxels carry a dual
vertex and three edge flags. This module reimplements, in NumPy, upstream's
``o_voxel.convert.mesh_to_flexible_dual_grid`` (``o-voxel/src/convert/flexible_dual_grid.cpp``,
called by ``data_toolkit/dual_grid.py``) and ``flexible_dual_grid_to_mesh``
(``o-voxel/o_voxel/convert/flexible_dual_grid.py``, used by ``trellis2/models/sc_vaes/fdg_vae.py``).

* **Frame**: the one of :mod:`know3d.training.generator.occupancy` — vertices in the Z-up unit
  cube [-0.5, 0.5]³ (``unit_cube_mesh``), voxel ``[i, j, k]`` covering
  ``[-0.5 + i/R, -0.5 + (i+1)/R)`` along (x, y, z); upstream's ``aabb=[[-0.5]*3, [0.5]*3]``.
* **Primal edges and flags**: the grid lines are the voxel edges. ``edge_flags[n, a]`` says that
  the surface crosses the edge of voxel ``n`` that is parallel to axis ``a`` and sits at the voxel's
  *upper* corner in the two other axes (for ``a = z``: from ``(i+1, j+1, k)`` to ``(i+1, j+1, k+1)``
  in grid units). Upstream sets exactly this flag (``intersected[ax2]`` on the ``dx == dy == 0``
  voxel of its scan line) and packs it as ``x + 2y + 4z`` (:meth:`DualGrid.packed_flags`). Only
  interior lines (the two other grid coordinates in ``1 .. R-1``) are scanned, as upstream's clamped
  scan line does, so all four voxels around a flagged edge lie in the grid.
* **Kept voxels**: the four voxels around every crossed edge (upstream's "4-connected voxels"); a
  voxel that the surface only passes through without crossing an edge is not kept.
* **Dual vertex**: the minimizer, inside the voxel's box, of a quadric error function — the planes
  of the triangles at each of the voxel's edge crossings, plus ``face_weight`` x the planes of every
  triangle touching the voxel, plus ``boundary_weight`` x the squared distance to the open
  (boundary) mesh edges passing through it, plus ``regularization_weight * count`` x the squared
  distance to the mean of the crossings (``count`` crossings). Unconstrained solve first; when it
  leaves the box, the best of the solutions on the 6 faces, 12 edges and 8 corners of the box (the
  C++ enumeration). Stored as the offset within the voxel, in [0, 1] (upstream then quantizes it to
  ``uint8`` / 255 on disk). Defaults are ``data_toolkit/dual_grid.py``'s: 1.0, 0.2, 1e-2.
* **Split weights**: upstream's data carries none; the SC-VAE decoder predicts one positive scalar
  per voxel (``softplus``, ``[N, 1]``, its "quad_lerp") and a quad ``(v0, v1, v2, v3)`` is cut along
  ``v0-v2`` when ``w0 * w2 > w1 * w3``, else along ``v1-v3``. :func:`mesh_to_dual_grid` therefore
  leaves them ``None``, and :func:`dual_grid_to_mesh` then cuts each quad along the diagonal whose
  two triangles bend least (the C++ ``quad_to_2tri`` rule).
* **Mesh extraction**: one quad per flagged edge whose four surrounding voxels all exist, with
  upstream's vertex order (``edge_neighbor_voxel_offset``). Upstream leaves every quad facing the
  negative axis; here the quads are then wound consistently across shared edges and each connected
  piece is turned to face outwards (positive signed volume).
* **Stage-1 structure**: upstream's 64³ sparse structure is the set of shape-latent coordinates,
  i.e. the fine dual-grid coordinates after the SC-VAE's 16x downsampling (1024 -> 64,
  ``data_toolkit/encode_ss_latent.py``); :func:`coarse_occupancy` does this ``floor(coords / f)``
  reduction, which lands in the same index convention as ``occupancy_from_mesh(..., 64)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from know3d.rendering.voxelize import _overlaps

_CHUNK = 2_000_000  # (primitive, cell) candidate pairs handled per vectorized pass

# upstream's edge_neighbor_voxel_offset: the four voxels around the flagged edge of voxel n, in
# quad order, for the x, y and z edges
_QUAD_OFFSETS = np.array(
    [
        [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]],
        [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]],
        [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]],
    ],
    dtype=np.int64,
)
_SPLIT_02 = np.array([0, 1, 2, 0, 2, 3])  # diagonal v0-v2
_SPLIT_13 = np.array([0, 1, 3, 3, 1, 2])  # diagonal v1-v3


@dataclass
class DualGrid:
    coords: np.ndarray  # [N, 3] int64 voxel indices (x, y, z of the Z-up frame), C order
    vertices: np.ndarray  # [N, 3] float dual vertex offset within its voxel, in [0, 1]
    edge_flags: np.ndarray  # [N, 3] bool: the voxel's upper-corner x / y / z edge is crossed
    split_weights: np.ndarray | None = None  # [N, 1] positive float (decoder output) or None

    def __len__(self) -> int:
        return int(len(self.coords))

    def positions(self, resolution: int) -> np.ndarray:
        """Dual vertices [N, 3] in the unit cube: ``(coords + vertices) / R - 0.5``."""
        return (self.coords + self.vertices) / resolution - 0.5

    def packed_flags(self) -> np.ndarray:
        """Upstream's on-disk flags: ``uint8 [N, 1] = x + 2 y + 4 z``."""
        return (self.edge_flags.astype(np.uint8) * np.array([1, 2, 4], np.uint8)).sum(1, keepdims=True).astype(np.uint8)

    @staticmethod
    def unpack_flags(packed: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`packed_flags`: bool [N, 3]."""
        packed = np.asarray(packed).reshape(-1, 1).astype(np.int64)
        return np.concatenate([packed % 2, packed // 2 % 2, packed // 4 % 2], axis=1).astype(bool)


# --------------------------------------------------------------------------- helpers


def _check_resolution(resolution: int) -> int:
    if int(resolution) != resolution or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    return int(resolution)


def _check_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or len(vertices) == 0:
        raise ValueError(f"vertices must be a non-empty [V, 3] array, got shape {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"faces must be a non-empty [F, 3] array, got shape {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integers, got {faces.dtype}")
    if not np.isfinite(vertices).all():
        raise ValueError("vertices contain NaN or inf")
    faces = faces.astype(np.int64)
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"face indices outside [0, {len(vertices)})")
    if np.abs(vertices).max() > 0.5 + 1e-4:
        raise ValueError(
            f"vertices leave the unit cube [-0.5, 0.5]^3 (max |v| = {np.abs(vertices).max():.4g}); "
            "normalize first (see unit_cube_mesh in occupancy.py)"
        )
    return np.clip(vertices, -0.5, 0.5), faces


def box_cells(lo: np.ndarray, hi: np.ndarray, chunk: int = _CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(owner, cell) pairs for the inclusive integer boxes [lo, hi] ([T, d]; empty boxes skipped),
    in chunks of about ``chunk`` pairs."""
    span = np.maximum(hi - lo + 1, 0)
    counts = span.prod(1)
    rows = np.flatnonzero(counts)
    start = 0
    while start < len(rows):
        cum = np.cumsum(counts[rows[start:]])
        stop = start + max(1, int(np.searchsorted(cum, chunk, side="right")))
        sel = rows[start:stop]
        n = counts[sel]
        owner = np.repeat(sel, n)
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        cell = np.empty((len(owner), lo.shape[1]), dtype=np.int64)
        for d in range(lo.shape[1] - 1, -1, -1):
            s = span[owner, d]
            cell[:, d] = local % s + lo[owner, d]
            local = local // s
        yield owner, cell
        start = stop


def _keys(coords: np.ndarray, resolution: int) -> np.ndarray:
    return (coords[:, 0] * resolution + coords[:, 1]) * resolution + coords[:, 2]


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in ``sorted_keys``, -1 when absent."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1)


def _plane_quadrics(tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per triangle [T, 3, 3]: plane quadric [T, 4, 4] (unit normal) and a non-degenerate mask."""
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 1])
    norm = np.linalg.norm(n, axis=1)
    ok = norm > 1e-12
    n = n / np.where(ok, norm, 1.0)[:, None]
    plane = np.concatenate([n, -np.einsum("tk,tk->t", n, tri[:, 0])[:, None]], axis=1)
    return plane[:, :, None] * plane[:, None, :], ok


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched ``a x = b`` ([M, k, k], [M, k]), least squares where ``a`` is singular."""
    if len(a) == 0:
        return np.zeros(b.shape)
    try:
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("mij,mj->mi", np.linalg.pinv(a), b)


def _edge_side(sa, ra, sb, rb, u, w, u_major: bool) -> tuple[np.ndarray, np.ndarray]:
    """Side (+1 / -1) of the lattice points (u, w) of the directed 2D edge a -> b, and its edge
    function. Evaluated from the lexicographically smaller endpoint so that the two triangles of a
    shared edge agree bit for bit; a point exactly on the edge is decided as if the lattice were
    moved by (-du, -dw), du >> dw when ``u_major`` (one global perturbation dx >> dy >> dz of the
    grid, so that no line is counted twice or missed where triangles meet)."""
    swap = (sb < sa) | ((sb == sa) & (rb < ra))
    s0, r0 = np.where(swap, sb, sa), np.where(swap, rb, ra)
    ds, dr = np.where(swap, sa, sb) - s0, np.where(swap, ra, rb) - r0
    e = ds * (w - r0) - dr * (u - s0)
    if u_major:
        tie = np.where(dr != 0, np.sign(dr), -np.sign(ds))
    else:
        tie = np.where(ds != 0, -np.sign(ds), np.sign(dr))
    side = np.where(e != 0, np.sign(e), tie)
    return np.where(swap, -side, side), np.where(swap, -e, e)


def _box_qef_minimum(q: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Minimizers [M, 3] of ``[x, 1] Q [x, 1]^T`` over the unit boxes ``[lo, lo + 1]`` (grid units):
    the unconstrained solution if inside, else the best face / edge / corner solution (upstream)."""
    hi = lo + 1.0
    tol = 1e-9
    x = _solve(q[:, :3, :3], -q[:, :3, 3])
    inside = ((x >= lo - tol) & (x <= hi + tol)).all(1)
    out = np.flatnonzero(~inside)
    if len(out) == 0:
        return x
    q, lo, hi = q[out], lo[out], hi[out]
    m = len(out)
    cands, valid = [], []
    bounds = (lo, hi)
    for fixed in range(3):  # one coordinate on a face of the box
        a1, a2 = (fixed + 1) % 3, (fixed + 2) % 3
        sub = q[:, [a1, a2]][:, :, [a1, a2]]
        for side in bounds:
            val = side[:, fixed]
            rhs = -(q[:, [a1, a2], fixed] * val[:, None] + q[:, [a1, a2], 3])
            s = _solve(sub, rhs)
            p = np.empty((m, 3))
            p[:, fixed], p[:, a1], p[:, a2] = val, s[:, 0], s[:, 1]
            cands.append(p)
            valid.append(((s >= lo[:, [a1, a2]] - tol) & (s <= hi[:, [a1, a2]] + tol)).all(1))
    for free in range(3):  # two coordinates on the box, i.e. on one of its edges
        a1, a2 = (free + 1) % 3, (free + 2) % 3
        qff = q[:, free, free]
        for s1 in bounds:
            for s2 in bounds:
                v1, v2 = s1[:, a1], s2[:, a2]
                num = q[:, free, a1] * v1 + q[:, free, a2] * v2 + q[:, free, 3]
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = -num / qff
                p = np.empty((m, 3))
                p[:, free], p[:, a1], p[:, a2] = t, v1, v2
                cands.append(p)
                valid.append(np.isfinite(t) & (t >= lo[:, free] - tol) & (t <= hi[:, free] + tol))
    for corner in range(8):  # the corners, always feasible
        p = np.where(np.array([(corner >> d) & 1 for d in range(3)], bool), hi, lo)
        cands.append(p)
        valid.append(np.ones(m, bool))
    cands = np.stack(cands, 1)  # [m, 26, 3]
    homo = np.concatenate([cands, np.ones((m, cands.shape[1], 1))], axis=2)
    err = np.einsum("mci,mij,mcj->mc", homo, q, homo)
    err = np.where(np.stack(valid, 1) & np.isfinite(err), err, np.inf)
    x[out] = cands[np.arange(m), err.argmin(1)]
    return x


def _segment_cells(p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment, cell) pairs of the unit cells each segment passes through (grid units): the cells
    between consecutive axis-plane crossings, as upstream's DDA traversal visits them."""
    d = p1 - p0
    owners, ts = [np.arange(len(p0)), np.arange(len(p0))], [np.zeros(len(p0)), np.ones(len(p0))]
    f0, f1 = np.floor(p0).astype(np.int64), np.floor(p1).astype(np.int64)
    for axis in range(3):
        n = np.abs(f1[:, axis] - f0[:, axis])
        owner = np.repeat(np.arange(len(p0)), n)
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        up = d[owner, axis] > 0
        plane = np.where(up, f0[owner, axis] + 1 + local, f0[owner, axis] - local)
        owners.append(owner)
        ts.append((plane - p0[owner, axis]) / d[owner, axis])
    owner, t = np.concatenate(owners), np.concatenate(ts)
    order = np.lexsort((t, owner))
    owner, t = owner[order], t[order]
    same = owner[1:] == owner[:-1]
    seg = owner[:-1][same]
    mid = 0.5 * (t[:-1] + t[1:])[same]
    cells = np.floor(p0[seg] + mid[:, None] * d[seg]).astype(np.int64)
    return seg, cells


# --------------------------------------------------------------------------- mesh -> dual grid


def mesh_to_dual_grid(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int,
    face_weight: float = 1.0,
    boundary_weight: float = 0.2,
    regularization_weight: float = 1e-2,
) -> DualGrid:
    """The flexible dual grid at ``resolution``³ of a mesh in the Z-up unit cube (see module doc).
    Raises ``ValueError`` for an empty / malformed / non-finite mesh or one outside the cube."""
    res = _check_resolution(resolution)
    vertices, faces = _check_mesh(vertices, faces)
    p = (vertices + 0.5) * res  # grid units: voxel i spans [i, i + 1)
    tri = p[faces]  # [T, 3, 3]
    plane_q, plane_ok = _plane_quadrics(tri)

    # 1. crossings of the interior grid lines: per axis a, the lines (u, w) in the other two axes
    rec_voxel, rec_point, rec_tri, rec_axis = [], [], [], []
    for a in range(3):
        b, c = (a + 1) % 3, (a + 2) % 3
        s, r = tri[:, :, b], tri[:, :, c]
        lo = np.stack([np.ceil(s.min(1)), np.ceil(r.min(1))], 1).astype(np.int64)
        hi = np.stack([np.floor(s.max(1)), np.floor(r.max(1))], 1).astype(np.int64)
        lo, hi = np.maximum(lo, 1), np.minimum(hi, res - 1)
        area = (s[:, 1] - s[:, 0]) * (r[:, 2] - r[:, 0]) - (s[:, 2] - s[:, 0]) * (r[:, 1] - r[:, 0])
        hi[area == 0] = -1  # triangle parallel to the lines: no transversal crossing
        for owner, line in box_cells(lo, hi):
            u, w = line[:, 0].astype(np.float64), line[:, 1].astype(np.float64)
            signs, bary = [], []
            for j in range(3):  # edge j -> j + 1 gives the barycentric of corner j + 2
                j1 = (j + 1) % 3
                sign, e = _edge_side(s[owner, j], r[owner, j], s[owner, j1], r[owner, j1], u, w, a != 1)
                signs.append(sign)
                bary.append(e)
            hit = (signs[0] == signs[1]) & (signs[1] == signs[2])
            if not hit.any():
                continue
            lam = np.clip(np.stack([bary[1], bary[2], bary[0]], 1)[hit] / area[owner[hit], None], 0.0, 1.0)
            lam /= np.maximum(lam.sum(1, keepdims=True), 1e-30)
            owner, line = owner[hit], line[hit]
            z = tri[owner, :, a]  # from corner 0, so that a face in a grid plane gives that plane exactly
            t = z[:, 0] + lam[:, 1] * (z[:, 1] - z[:, 0]) + lam[:, 2] * (z[:, 2] - z[:, 0])
            k = np.clip(np.floor(t).astype(np.int64), 0, res - 1)
            voxel = np.empty((len(owner), 3), dtype=np.int64)
            voxel[:, a], voxel[:, b], voxel[:, c] = k, line[:, 0] - 1, line[:, 1] - 1
            point = np.empty((len(owner), 3))
            point[:, a], point[:, b], point[:, c] = t, line[:, 0], line[:, 1]
            rec_voxel.append(voxel)
            rec_point.append(point)
            rec_tri.append(owner)
            rec_axis.append(np.full(len(owner), a))
    if not rec_voxel:
        return DualGrid(np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros((0, 3), bool))
    voxel, point = np.concatenate(rec_voxel), np.concatenate(rec_point)
    cross_tri, cross_axis = np.concatenate(rec_tri), np.concatenate(rec_axis)

    # 2. the four voxels around each crossed edge
    around = []
    for a in range(3):
        b, c = (a + 1) % 3, (a + 2) % 3
        for db in (0, 1):
            for dc in (0, 1):
                off = np.zeros(3, np.int64)
                off[b], off[c] = db, dc
                around.append(off)
    around = np.stack(around).reshape(3, 4, 3)[cross_axis]  # [M, 4, 3]
    members = (voxel[:, None, :] + around).reshape(-1, 3)
    keys, inverse = np.unique(_keys(members, res), return_inverse=True)
    inverse = inverse.reshape(-1)
    n_vox = len(keys)
    coords = np.stack([keys // (res * res), keys // res % res, keys % res], 1).astype(np.int64)
    member_of = np.repeat(np.arange(len(voxel)), 4)

    flags = np.zeros((n_vox, 3), dtype=bool)
    flags[_lookup(keys, _keys(voxel, res)), cross_axis] = True
    count = np.bincount(inverse, minlength=n_vox).astype(np.float64)
    mean = np.stack([np.bincount(inverse, point[member_of, d], n_vox) for d in range(3)], 1) / count[:, None]

    def accumulate(target: np.ndarray, idx: np.ndarray, q: np.ndarray) -> None:
        flat = q.reshape(len(q), 16)
        target += np.stack([np.bincount(idx, flat[:, e], n_vox) for e in range(16)], 1).reshape(n_vox, 4, 4)

    qef = np.zeros((n_vox, 4, 4))
    ok = plane_ok[cross_tri[member_of]]
    accumulate(qef, inverse[ok], plane_q[cross_tri[member_of]][ok])

    # 3. face term: every (non-degenerate) triangle touching a kept voxel
    if face_weight > 0:
        lo = np.clip(np.floor(tri.min(1)).astype(np.int64), 0, res - 1)
        hi = np.clip(np.floor(tri.max(1)).astype(np.int64), 0, res - 1)
        hi[~plane_ok] = -1
        for owner, cell in box_cells(lo, hi):
            idx = _lookup(keys, _keys(cell, res))
            keep = idx >= 0
            owner, cell, idx = owner[keep], cell[keep], idx[keep]
            touch = _overlaps(tri[owner], cell + 0.5, 0.5)
            accumulate(qef, idx[touch], face_weight * plane_q[owner[touch]])

    # 4. boundary term: mesh edges used by a single face (by vertex index, as upstream counts them)
    if boundary_weight > 0:
        edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
        uniq, n_use = np.unique(edges, axis=0, return_counts=True)
        bnd = uniq[n_use == 1]
        e0, e1 = p[bnd[:, 0]], p[bnd[:, 1]]
        length = np.linalg.norm(e1 - e0, axis=1)
        long = length > 1e-6 * res
        e0, e1, length = e0[long], e1[long], length[long]
        if len(e0):
            d = (e1 - e0) / length[:, None]
            a_mat = np.eye(3) - d[:, :, None] * d[:, None, :]
            bvec = -np.einsum("sij,sj->si", a_mat, e0)
            line_q = np.zeros((len(e0), 4, 4))
            line_q[:, :3, :3], line_q[:, :3, 3], line_q[:, 3, :3] = a_mat, bvec, bvec
            line_q[:, 3, 3] = np.einsum("si,sij,sj->s", e0, a_mat, e0)
            seg, cells = _segment_cells(e0, e1)
            inside = ((cells >= 0) & (cells < res)).all(1)
            seg, cells = seg[inside], cells[inside]
            pair = np.unique(np.concatenate([seg[:, None], cells], 1), axis=0)
            idx = _lookup(keys, _keys(pair[:, 1:], res))
            keep = idx >= 0
            accumulate(qef, idx[keep], boundary_weight * line_q[pair[keep, 0]])

    # 5. regularization toward the mean crossing, then the box-constrained minimum
    if regularization_weight > 0:
        reg = np.zeros((n_vox, 4, 4))
        reg[:, :3, :3] = np.eye(3)
        reg[:, :3, 3], reg[:, 3, :3] = -mean, -mean
        reg[:, 3, 3] = (mean * mean).sum(1)
        qef += (regularization_weight * count)[:, None, None] * reg
    x = _box_qef_minimum(qef, coords.astype(np.float64))
    dual = np.clip(x - coords, 0.0, 1.0)
    return DualGrid(coords, dual, flags)


# --------------------------------------------------------------------------- dual grid -> mesh


def _orient_quads(quads: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Quads wound consistently across edges shared by exactly two quads, each connected piece
    then turned so that its signed volume is positive (outward for closed surfaces)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components

    n = len(quads)
    if n == 0:
        return quads
    directed = np.stack([quads, np.roll(quads, -1, axis=1)], axis=2).reshape(-1, 2)  # [4n, 2]
    owner = np.repeat(np.arange(n), 4)
    undirected = np.sort(directed, axis=1)
    _, edge_id, uses = np.unique(undirected, axis=0, return_inverse=True, return_counts=True)
    edge_id = edge_id.reshape(-1)
    manifold = uses[edge_id] == 2
    order = np.argsort(edge_id[manifold], kind="stable")
    f = owner[manifold][order].reshape(-1, 2)
    forward = (directed[manifold][order][:, 0] == undirected[manifold][order][:, 0]).reshape(-1, 2)
    keep = f[:, 0] != f[:, 1]
    f, forward = f[keep], forward[keep]
    # two quads agree when they run their shared edge in opposite directions
    flip = (forward[:, 0] == forward[:, 1]).astype(np.int8)
    graph = coo_matrix((np.ones(len(f)), (f[:, 0], f[:, 1])), shape=(n, n)).tocsr()
    graph = graph + graph.T
    n_comp, label = connected_components(graph, directed=False)
    parent = np.arange(n)
    for comp in range(n_comp):
        root = int(np.flatnonzero(label == comp)[0])
        nodes, pred = breadth_first_order(graph, root, directed=False, return_predecessors=True)
        parent[nodes[1:]] = pred[nodes[1:]]
    # flip bit of each spanning-tree edge (child, parent): first shared edge of the pair
    pair_keys = np.minimum(f[:, 0], f[:, 1]) * n + np.maximum(f[:, 0], f[:, 1])
    pair_keys, first = np.unique(pair_keys, return_index=True)
    child = np.arange(n)
    tree_keys = np.minimum(child, parent) * n + np.maximum(child, parent)
    has = parent != child
    bit = np.zeros(n, dtype=np.int8)
    bit[has] = flip[first[_lookup(pair_keys, tree_keys[has])]]
    # XOR of the bits along the path to the root, by pointer jumping (the root's bit stays 0)
    up = parent.copy()
    for _ in range(int(np.ceil(np.log2(max(n, 2)))) + 1):
        bit = bit ^ bit[up]
        up = up[up]
    quads = np.where(bit[:, None] == 1, quads[:, ::-1], quads)
    # signed volume per piece (two triangles per quad, diagonal 0-2: exact for planar quads)
    v = points[quads]
    vol = (
        np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2]))
        + np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 2], v[:, 3]))
    ) / 6.0
    inward = np.bincount(label, vol, n_comp) < 0
    return np.where(inward[label][:, None], quads[:, ::-1], quads)


def dual_grid_to_mesh(grid: DualGrid, resolution: int, orient: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [N, 3] float64 in the unit cube — vertex n is voxel n's dual vertex, unused ones
    included as upstream returns them —, faces [F, 3] int64). One quad per flagged edge whose four
    voxels exist, cut by the split-weight rule (or the least-bend diagonal without weights), wound
    consistently and outward when ``orient`` (else upstream's per-axis winding)."""
    res = _check_resolution(resolution)
    coords = np.asarray(grid.coords).astype(np.int64).reshape(-1, 3)
    dual = np.asarray(grid.vertices, dtype=np.float64).reshape(-1, 3)
    flags = np.asarray(grid.edge_flags).astype(bool).reshape(-1, 3)
    if not (len(coords) == len(dual) == len(flags)):
        raise ValueError(f"coords / vertices / edge_flags lengths differ: {len(coords)}, {len(dual)}, {len(flags)}")
    if not np.isfinite(dual).all():
        raise ValueError("dual vertices contain NaN or inf")
    if len(coords) and (coords.min() < 0 or coords.max() >= res):
        raise ValueError(f"coords outside [0, {res})")
    weights = None
    if grid.split_weights is not None:
        weights = np.asarray(grid.split_weights, dtype=np.float64).reshape(len(coords), -1)[:, 0]
        if not np.isfinite(weights).all():
            raise ValueError("split weights contain NaN or inf")
    points = (coords + dual) / res - 0.5
    if len(coords) == 0:
        return points, np.zeros((0, 3), dtype=np.int64)

    keys = _keys(coords, res)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    voxel, axis = np.nonzero(flags)
    ring = coords[voxel][:, None, :] + _QUAD_OFFSETS[axis]  # [M, 4, 3]
    inside = ((ring >= 0) & (ring < res)).all(axis=(1, 2))
    ring = ring[inside]
    idx = _lookup(sorted_keys, _keys(ring.reshape(-1, 3), res)).reshape(-1, 4)
    quads = order[idx[(idx >= 0).all(1)]]
    if orient:
        quads = _orient_quads(quads, points)

    if weights is not None:
        w = weights[quads]
        use02 = w[:, 0] * w[:, 2] > w[:, 1] * w[:, 3]
    else:
        v = points[quads]

        def bend(i0, i1, i2, j0, j1, j2):
            n0 = np.cross(v[:, i1] - v[:, i0], v[:, i2] - v[:, i0])
            n1 = np.cross(v[:, j1] - v[:, j0], v[:, j2] - v[:, j0])
            n0 /= np.maximum(np.linalg.norm(n0, axis=1, keepdims=True), 1e-30)
            n1 /= np.maximum(np.linalg.norm(n1, axis=1, keepdims=True), 1e-30)
            return np.arccos(np.clip((n0 * n1).sum(1), -1.0, 1.0))

        use02 = bend(0, 1, 2, 0, 2, 3) <= bend(0, 1, 3, 1, 2, 3)
    tris = np.where(use02[:, None], quads[:, _SPLIT_02], quads[:, _SPLIT_13]).reshape(-1, 3)
    return points, tris.astype(np.int64)


# --------------------------------------------------------------------------- stage-1 structure


def coarse_occupancy(coords: np.ndarray, resolution: int, coarse: int = 64) -> np.ndarray:
    """Boolean [coarse]³ grid of the fine voxel ``coords`` at ``resolution``, reduced by
    ``f = resolution // coarse`` (``floor(coords / f)``): the set of coordinates the SC-VAE's
    downsampling produces, which upstream uses as the 64³ sparse structure."""
    res, coarse = _check_resolution(resolution), _check_resolution(coarse)
    if res % coarse:
        raise ValueError(f"resolution {res} is not a multiple of the coarse resolution {coarse}")
    coords = np.asarray(coords).reshape(-1, 3)
    if len(coords) and (coords.min() < 0 or coords.max() >= res):
        raise ValueError(f"coords outside [0, {res})")
    grid = np.zeros((coarse,) * 3, dtype=bool)
    cell = coords.astype(np.int64) // (res // coarse)
    grid[cell[:, 0], cell[:, 1], cell[:, 2]] = True
    return grid
