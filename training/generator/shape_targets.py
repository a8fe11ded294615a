"""The generator's stage-2 targets: per asset, the fine flexible dual grid and its shape latent.

TRELLIS.2 prepares stage 2 in two passes of its data toolkit: ``dual_grid.py`` converts each mesh
to an O-Voxel dual grid at the fine resolution and stores the dual vertices quantized to ``uint8``
(offset x 255) with the packed edge flags; ``encode_shape_latent.py`` then encodes *what it stored*
with the shape SC-VAE encoder. Here both happen in one pass per asset, beside the data build, in the
layout of the stage-1 store (:mod:`know3d.training.generator.targets`)::

    <dataset>/targets/shape-r<res>-<encoder>/<sha[:2]>/<sha256>.safetensors
        coords         int16   [M, 3]  latent coordinates (at the latent resolution)
        feats          float32 [M, C]  latent, normalized with the VAE's mean / std
        grid_coords    int16   [N, 3]  fine dual-grid voxels
        grid_vertices  uint8   [N, 3]  dual vertex offset within its voxel x 255, rounded
        grid_flags     uint8   [N, 1]  edge flags packed x + 2y + 4z (DualGrid.packed_flags)
        metadata: kind="shape", resolution, latent_resolution, encoder

``res`` is the fine resolution, ``encoder`` a digest of the encoder weights *and* the latent
normalization (both change the stored ``feats``), so another shape VAE gets another folder. The
latent is computed from the quantized grid (vertices ``q / 255``), as upstream encodes its on-disk
grid, so a stored grid and its latent always agree. Writes are atomic, existing entries are skipped
(the pass resumes), and an asset that cannot be converted is reported by name without stopping the
others (:func:`build_shape_targets`).

**Stage-1 consistency.** Upstream's stage-1 sparse structure *is* the set of shape-latent
coordinates (``encode_ss_latent.py`` reads them); ours comes from voxelizing the mesh
(:mod:`~know3d.training.generator.occupancy`). :func:`stage1_consistency` measures how well the two
agree: the IoU between the stage-1 occupancy pooled to the latent grid and the latent coordinates.
Measured on the 6 procedural kinds and the 11 real test assets (``../shared/assets/real``):

* debug setup (dual grid 64³ -> latent 16³, stage-1 occupancy 32³ pooled to 16³): 1.0 on all
  six procedural kinds; mean 0.9998 over all 17, lowest 0.9981 (textured_tetrahedron: 1 latent
  voxel of 527 differs) and 0.9988 (bunny), 1.0 on the 9 other real assets;
* same resolution (dual grid 64³ vs occupancy 64³): 1.0 procedural, lowest 0.9996 (monkey) —
  the dual grid's voxels (the four around every crossed grid edge) are the surface voxels but
  for a few;
* upstream's 16x ratio at CPU size (dual grid 256³ -> 16³ vs occupancy 16³): lowest 0.998.

So stage 1's voxelized structure is, to a few voxels in a thousand, the structure stage 2's
latents live on; at inference stage 2 samples on stage 1's output directly.

Cost at 64³ with the debug encoder on one CPU thread (2 busy cores): 0.2-1.3 s per asset, median
0.6 s (dual grid 0.1-0.7 s, encoding + writing 0.1-0.6 s), 25-285 KiB per entry; with two torch
threads on those busy cores the sparse encoder ran up to 10x slower. At 256³ the dual grid alone
takes 0.4-8.5 s.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from know3d.core.io import atomic_write
from know3d.training.generator.dual_grid import DualGrid, coarse_occupancy, mesh_to_dual_grid
from know3d.training.generator.occupancy import occupancy_iou, unit_cube_mesh
from know3d.training.generator.targets import TARGETS_DIR, TargetError, build_each

KIND = "shape"
STORE_PREFIX = "shape-"
_INT16_MAX = np.iinfo(np.int16).max


def quantize_vertices(vertices: np.ndarray) -> np.ndarray:
    """Dual-vertex offsets in [0, 1] -> ``uint8`` ``round(offset * 255)`` (upstream's on-disk form)."""
    return np.clip(np.rint(np.asarray(vertices, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def dequantize_vertices(quantized: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_vertices`: float32 offsets ``q / 255``."""
    return np.asarray(quantized).astype(np.float32) / np.float32(255.0)


def quantized_grid(grid: DualGrid) -> DualGrid:
    """``grid`` as stored: vertices rounded to multiples of 1/255, no split weights."""
    return DualGrid(
        np.asarray(grid.coords, dtype=np.int64).reshape(-1, 3),
        dequantize_vertices(quantize_vertices(grid.vertices)).reshape(-1, 3),
        np.asarray(grid.edge_flags, dtype=bool).reshape(-1, 3),
    )


def _tensor_bytes(value: Any) -> bytes:
    if value is None:
        return b"none"
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32)).tobytes()


def shape_encoder_digest(vae) -> str:
    """Identity of what the stored latents depend on: the encoder weights and the latent
    normalization (``mean`` / ``std``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for name in ("mean", "std"):
        digest.update(name.encode())
        digest.update(_tensor_bytes(getattr(vae, name, None)))
    return digest.hexdigest()[:16]


def read_shape_target(path: str | Path) -> dict[str, Any]:
    """One stored entry: ``coords`` int64 [M, 3], ``feats`` float32 [M, C], ``grid`` (the fine
    :class:`DualGrid`, vertices dequantized), ``resolution``, ``latent_resolution``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != KIND:
            raise ValueError(f"{path}: not a shape target (kind {meta.get('kind')!r})")
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    grid = DualGrid(
        arrays["grid_coords"].astype(np.int64),
        dequantize_vertices(arrays["grid_vertices"]),
        DualGrid.unpack_flags(arrays["grid_flags"]),
    )
    return {
        "coords": arrays["coords"].astype(np.int64),
        "feats": arrays["feats"].astype(np.float32),
        "grid": grid,
        "resolution": int(meta["resolution"]),
        "latent_resolution": int(meta["latent_resolution"]),
    }


def is_shape_store(folder: str | Path) -> bool:
    """Whether a target store folder holds stage-2 (shape) targets: its name starts with
    ``shape-``, or its first entry's metadata says ``kind="shape"``."""
    folder = Path(folder)
    if folder.name.startswith(STORE_PREFIX):
        return True
    first = next(iter(sorted(folder.glob("*/*.safetensors"))), None)
    if first is None:
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(first), framework="np") as f:
            return (f.metadata() or {}).get("kind") == KIND
    except Exception:  # noqa: BLE001 - an unreadable entry says nothing about the store's kind
        return False


class ShapeTargetStore:
    """One data build's stage-2 targets for one shape VAE (its encoder, normalization and fine
    resolution). ``vae`` is a :class:`~know3d.training.generator.shape_vae.ShapeVAE` (its encoder
    part is enough): ``encode(grid) -> (coords [M, 3], feats [M, C])``, ``resolution``,
    ``latent_resolution``, ``encoder``, ``mean``, ``std``."""

    def __init__(self, dataset: str | Path, vae) -> None:
        if getattr(vae, "encoder", None) is None:
            raise ValueError("the shape VAE has no encoder (load it with parts=('encoder',))")
        self.dataset = Path(dataset)
        self.vae = vae
        self.resolution = int(vae.resolution)
        self.latent_resolution = int(vae.latent_resolution)
        if self.resolution > _INT16_MAX:
            raise ValueError(f"resolution {self.resolution} does not fit the int16 coordinates")
        self.encoder = shape_encoder_digest(vae)
        self.root = self.dataset / TARGETS_DIR / f"{STORE_PREFIX}r{self.resolution}-{self.encoder}"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def get(self, sha: str) -> dict[str, Any] | None:
        """The stored entry (see :func:`read_shape_target`), None when there is none."""
        file = self.path(sha)
        return read_shape_target(file) if file.is_file() else None

    def put(self, sha: str, grid: DualGrid) -> dict[str, Any]:
        """Quantize ``grid`` (fine resolution), encode it and store both. Raises
        :class:`TargetError` for an empty grid."""
        from safetensors.numpy import save

        if len(grid) == 0:
            raise TargetError("empty dual grid: the surface crosses no grid edge")
        stored = quantized_grid(grid)
        if stored.coords.min() < 0 or stored.coords.max() >= self.resolution:
            raise ValueError(f"dual-grid coordinates outside [0, {self.resolution})")
        with torch.no_grad():
            coords, feats = self.vae.encode(stored)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
        feats = feats.detach().float().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if len(coords) != len(feats) or not len(coords):
            raise ValueError(f"the encoder returned {len(coords)} coordinates and {len(feats)} feature rows")
        if not np.isfinite(feats).all():
            raise ValueError("the encoder returned NaN or inf latents")
        arrays = {
            "coords": np.ascontiguousarray(coords, dtype=np.int16),
            "feats": feats,
            "grid_coords": np.ascontiguousarray(stored.coords, dtype=np.int16),
            "grid_vertices": quantize_vertices(grid.vertices),
            "grid_flags": stored.packed_flags(),
        }
        meta = {
            "kind": KIND,
            "resolution": str(self.resolution),
            "latent_resolution": str(self.latent_resolution),
            "encoder": self.encoder,
        }
        atomic_write(self.path(sha), save(arrays, metadata=meta))
        return {
            "coords": coords,
            "feats": feats,
            "grid": stored,
            "resolution": self.resolution,
            "latent_resolution": self.latent_resolution,
        }

    def put_mesh(self, sha: str, vertices: np.ndarray, faces: np.ndarray) -> dict[str, Any]:
        """The dual grid of a mesh in the Z-up unit cube, encoded and stored."""
        return self.put(sha, mesh_to_dual_grid(vertices, faces, self.resolution))


def build_shape_targets(store: ShapeTargetStore) -> tuple[dict[str, int], dict[str, str]]:
    """Dual grid + shape latent of every rendered asset of the store's data build (those already
    stored are skipped). The asset file is the record's ``uri`` when it is a local file. Returns
    counts per status (``encoded`` / ``cached`` / ``failed``) and a reason per failed asset (by
    key; the reason names the file too): not a local file, unloadable, empty or degenerate mesh."""

    def make(sha: str, path: Path) -> None:
        vertices, faces = unit_cube_mesh(path)
        if len(faces) == 0:
            raise TargetError(f"{path.name}: no faces (empty mesh)")
        try:
            store.put_mesh(sha, vertices, faces)
        except TargetError as exc:
            raise TargetError(f"{path.name}: {exc}") from None

    return build_each(store, make)


def stage1_consistency(
    grid_coords: np.ndarray,
    resolution: int,
    occupancy_coords: np.ndarray,
    occupancy_resolution: int,
    latent_resolution: int | None = None,
) -> float:
    """IoU between the stage-1 occupancy (``occupancy_coords`` at ``occupancy_resolution``) pooled
    to the latent grid and the latent coordinates (the fine dual-grid ``grid_coords`` at
    ``resolution`` reduced as the SC-VAE does, ``floor(coords / f)``). ``latent_resolution``
    defaults to ``occupancy_resolution`` (upstream: the 64³ structure is the latent grid); both
    resolutions must be multiples of it. 1.0 when both are empty."""
    latent_resolution = int(latent_resolution or occupancy_resolution)
    latent = coarse_occupancy(grid_coords, resolution, latent_resolution)
    pooled = coarse_occupancy(occupancy_coords, occupancy_resolution, latent_resolution)
    return occupancy_iou(latent, pooled)
