"""A debug-size shape SC-VAE (TRELLIS.2's stage-2 VAE) that actually reconstructs dual grids.

Same module classes as the full shape SC-VAE (:mod:`.shape_vae`), at ``shape_encoder("debug")`` /
``shape_decoder("debug")`` size: a **64³** flexible dual grid (:mod:`.dual_grid`), three stages of
16, 32 and 64 channels, latent 8 channels at 16³. It is trained with this module's
:func:`train_debug_shape_vae` on procedural assets (:mod:`know3d.rendering.sources.procedural`:
0..59 for training, 60..69 held out), deterministically (the encoder's posterior mean, no
sampling; one thread), with TRELLIS.2's kind of loss: the decoder runs in training mode on the
encoder's own structure (upstream's spatial cache) and is scored by the MSE of the dual vertices,
the BCE of the three edge flags, the BCE of every up block's subdivision logits against the true
children, plus a small KL term. The split weights (quad_lerp) get no direct target, as upstream
(which shapes them through rendering losses this CPU recipe does not have). To fit minutes on a
2-core CPU each step sees a random 32³ window of two assets (aligned to the 4³ fine voxels of a
latent voxel, so every latent voxel keeps all its children; the network is fully convolutional,
so a window is a cheaper sample of the same local statistics); there is no other augmentation.
The per-channel mean / std of the training assets' latents is the latent normalization. The
trained weights ship in ``training/assets/debug-shape-vae`` (``encoder``/``decoder``
``.safetensors`` + ``.json`` and ``normalization.json``); load them with
``load_shape_vae("debug")``. Default config, one thread: held-out voxel IoU 0.836, Chamfer
0.0078 (true dual grid 0.0056), 650 steps in 170-330 s depending on the machine's load.

Held-out figures (see :func:`evaluate`): the voxel IoU of the decoded fine coordinates (predicted
subdivision) against the true ones, and the symmetric Chamfer distance (unit-cube units, mean of
both directions' mean nearest distances between 20k area-uniform surface samples per mesh) of the
mesh extracted from the decoded grid against the asset's own mesh; ``floor_chamfer`` is that
distance for the true dual grid's mesh (what a perfect VAE reaches at this resolution).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from know3d.training.generator.dual_grid import DualGrid, dual_grid_to_mesh, mesh_to_dual_grid
from know3d.training.generator.shape_vae import (
    SHIPPED_SHAPE_VAE,
    FlexiDualGridVaeDecoder,
    FlexiDualGridVaeEncoder,
    ShapeVAE,
    dual_grid_voxels,
    save_shape_vae,
    shape_decoder,
    shape_encoder,
)


@dataclass(kw_only=True)
class DebugShapeVaeConfig:
    resolution: int = 64  # fine dual-grid side; latent 16³ with the 3-stage debug architecture
    num_train: int = 60  # procedural assets 0..num_train-1 (round-robin over the categories)
    num_heldout: int = 10  # the next ones, never trained on
    asset_seed: int = 0
    steps: int = 650
    batch_size: int = 2  # assets per step (one batched sparse tensor)
    crop: int | None = 32  # train on a random crop^3 window (aligned to the latent cells) per asset; None: whole
    lr: float = 6e-3
    warmup: int = 20
    min_lr_ratio: float = 0.05
    vertex_weight: float = 10.0  # MSE of the dual-vertex offsets (in voxel units, [0, 1])
    flag_weight: float = 1.0  # BCE of the 3 edge flags
    subdiv_weight: float = 1.0  # BCE of the subdivision logits, averaged over the up blocks
    kl_weight: float = 1e-4
    seed: int = 0
    threads: int = 1  # torch threads (2 oversubscribe a busy 2-core machine: ~10x slower steps)
    log_every: int = 50
    chamfer_points: int = 20_000  # surface samples per mesh for the held-out Chamfer distance


@dataclass
class ShapeSample:
    """One procedural asset: its mesh in the Z-up unit cube and its dual grid."""

    name: str
    vertices: np.ndarray  # [V, 3]
    faces: np.ndarray  # [F, 3]
    grid: DualGrid


@dataclass
class DebugShapeVaeResult:
    vae: ShapeVAE
    history: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "vertex", "flags", ...}
    heldout: dict = field(default_factory=dict)  # evaluate()'s summary, filled by main()
    seconds: float = 0.0  # training time (no data preparation, no evaluation)


def procedural_dual_grids(
    cache_dir: Path, first: int, count: int, resolution: int = 64, seed: int = 0
) -> list[ShapeSample]:
    """Procedural assets ``first..first+count-1`` (GLBs written into ``cache_dir`` as
    ``ProceduralSource`` does, only the ones asked for) with their dual grids at ``resolution``."""
    from know3d.core.io import atomic_write
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource, generate_asset, list_assets
    from know3d.training.generator.occupancy import unit_cube_mesh

    source = ProceduralSource(ProceduralSourceConfig(num_assets=max(first + count, 1), seed=seed), cache_dir)
    source.root.mkdir(parents=True, exist_ok=True)
    out = []
    for name, category, index in list_assets(first + count, seed)[first:]:
        path = source.path_of(name)
        if not path.is_file():
            atomic_write(path, generate_asset(category, index, seed).export(file_type="glb"))
        vertices, faces = unit_cube_mesh(path)
        out.append(ShapeSample(name, vertices, faces, mesh_to_dual_grid(vertices, faces, resolution)))
    return out


# --------------------------------------------------------------------------- loss and training


def shape_vae_loss(
    encoder: FlexiDualGridVaeEncoder, decoder: FlexiDualGridVaeDecoder, grids: list[DualGrid], cfg: DebugShapeVaeConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss on a batch of dual grids (see module doc) and its terms."""
    device = next(encoder.parameters()).device
    x = dual_grid_voxels(grids, device)
    flags = torch.as_tensor(np.concatenate([np.asarray(g.edge_flags) for g in grids]), dtype=torch.float32)
    flags = flags.to(device)
    z, mean, logvar = encoder(x, x.replace(flags), return_raw=True)
    decoder.train()
    h, subs_gt, subs = decoder(z)  # the encoder's structure: h lines up with x
    if not torch.equal(h.coords, x.coords):
        raise RuntimeError("the decoder did not reproduce the encoder's structure")
    vertices, logits, _ = decoder.fields(h)
    vertex = F.mse_loss(vertices, x.feats)
    flag = F.binary_cross_entropy_with_logits(logits, flags)
    subdiv = sum(F.binary_cross_entropy_with_logits(s.feats, gt.float()) for s, gt in zip(subs, subs_gt, strict=True))
    subdiv = subdiv / max(len(subs), 1)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).mean()
    loss = cfg.vertex_weight * vertex + cfg.flag_weight * flag + cfg.subdiv_weight * subdiv + cfg.kl_weight * kl
    terms = {k: float(v.detach()) for k, v in (("vertex", vertex), ("flags", flag), ("subdiv", subdiv), ("kl", kl))}
    return loss, terms


@torch.no_grad()
def latent_normalization(encoder: FlexiDualGridVaeEncoder, grids: list[DualGrid]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior-mean latents of ``grids`` (all voxels pooled)."""
    encoder.eval()
    feats = []
    for grid in grids:
        x = dual_grid_voxels([grid], next(encoder.parameters()).device)
        flags = torch.as_tensor(np.asarray(grid.edge_flags), dtype=torch.float32, device=x.feats.device)
        feats.append(encoder(x, x.replace(flags)).feats.float().cpu())
    z = torch.cat(feats)
    return z.mean(0), z.std(0).clamp_min(1e-6)


def crop_grid(grid: DualGrid, size: int | None, cell: int, resolution: int, gen: torch.Generator) -> DualGrid:
    """The voxels of ``grid`` inside a ``size``³ window around a random voxel, its corner a multiple
    of ``cell`` (so every latent voxel keeps all its children); the whole grid when ``size`` is None
    or covers it. Convolutions are local: a crop is a cheaper sample of the same statistics."""
    if size is None or size >= resolution or len(grid) == 0:
        return grid
    if size % cell or (resolution - size) % cell:
        raise ValueError(f"crop {size} and resolution - crop must be multiples of the latent cell {cell}")
    centre = np.asarray(grid.coords)[int(torch.randint(0, len(grid), (), generator=gen))]
    lo = np.clip((centre - size // 2) // cell * cell, 0, resolution - size)
    inside = ((grid.coords >= lo) & (grid.coords < lo + size)).all(1)
    return DualGrid(grid.coords[inside], grid.vertices[inside], grid.edge_flags[inside])


def train_debug_shape_vae(
    cfg: DebugShapeVaeConfig,
    train: list[ShapeSample] | None = None,
    cache_dir: Path | None = None,
    progress=None,
) -> DebugShapeVaeResult:
    """Fit the debug encoder + decoder on ``train`` (default: procedural assets 0..num_train-1,
    generated into ``cache_dir`` or a temporary folder), then the latent normalization over the
    training assets. Deterministic for a given config and thread count."""
    if train is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(cache_dir) if cache_dir is not None else Path(tmp)
            train = procedural_dual_grids(folder, 0, cfg.num_train, cfg.resolution, cfg.asset_seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, [s.grid for s in train], progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: DebugShapeVaeConfig, grids: list[DualGrid], progress) -> DebugShapeVaeResult:
    torch.manual_seed(cfg.seed)
    encoder = shape_encoder("debug")
    decoder = shape_decoder("debug", resolution=cfg.resolution)
    params = [*encoder.parameters(), *decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def schedule(i: int) -> float:
        if i < cfg.warmup:
            return (i + 1) / cfg.warmup
        t = (i - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    cell = 2 ** (len(encoder.model_channels) - 1)  # fine voxels per latent voxel and axis
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(1, cfg.steps + 1):
        encoder.train()
        pick = torch.randint(0, len(grids), (cfg.batch_size,), generator=gen).tolist()
        batch = [crop_grid(grids[i], cfg.crop, cell, cfg.resolution, gen) for i in pick]
        loss, terms = shape_vae_loss(encoder, decoder, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in {"loss": float(loss.detach()), **terms}.items():
            running[k] = running.get(k, 0.0) + v
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = (step - 1) % cfg.log_every + 1
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
            entry.update({k: round(v / n, 5) for k, v in running.items()})
            running = {}
            history.append(entry)
            if progress is not None:
                progress(entry)
    encoder.eval()
    decoder.eval()
    mean, std = latent_normalization(encoder, grids)
    vae = ShapeVAE(encoder, decoder, cfg.resolution, mean, std)
    return DebugShapeVaeResult(vae, history, seconds=round(time.perf_counter() - start, 1))


# --------------------------------------------------------------------------- evaluation


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniform over the area of a triangle mesh (deterministic for ``seed``)."""
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if len(tri) == 0 or area.sum() <= 0:
        return np.zeros((0, 3))
    rng = np.random.default_rng(seed)
    face = rng.choice(len(tri), size=count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    t = tri[face]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance: mean of both directions' mean nearest distances (inf when
    exactly one set is empty)."""
    from scipy.spatial import cKDTree

    if len(a) == 0 or len(b) == 0:
        return 0.0 if len(a) == len(b) else float("inf")
    return float(0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()))


def mesh_chamfer(grid: DualGrid, resolution: int, vertices: np.ndarray, faces: np.ndarray, points: int) -> float:
    """Chamfer distance between the mesh extracted from ``grid`` and the mesh (vertices, faces)."""
    v, f = dual_grid_to_mesh(grid, resolution)
    return chamfer(sample_surface(v, f, points, seed=1), sample_surface(vertices, faces, points, seed=2))


def voxel_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two sets of integer voxel coordinates ``[N, 3]`` (1.0 when both are empty)."""
    ka = {tuple(c) for c in np.asarray(a, np.int64).reshape(-1, 3).tolist()}
    kb = {tuple(c) for c in np.asarray(b, np.int64).reshape(-1, 3).tolist()}
    union = len(ka | kb)
    return 1.0 if union == 0 else len(ka & kb) / union


def evaluate(vae: ShapeVAE, samples: list[ShapeSample], chamfer_points: int = 20_000, floor: bool = True) -> dict:
    """Round trip of each sample (encode -> decode with the predicted subdivision -> mesh):
    ``{"iou", "chamfer", "floor_chamfer", "per_asset": [...]}`` (means over the samples)."""
    rows = []
    for s in samples:
        coords, feats = vae.encode(s.grid)
        decoded = vae.decode(coords, feats)
        row = {
            "name": s.name,
            "voxels": len(s.grid),
            "decoded_voxels": len(decoded),
            "iou": voxel_iou(decoded.coords, s.grid.coords),
            "chamfer": mesh_chamfer(decoded, vae.resolution, s.vertices, s.faces, chamfer_points),
        }
        if floor:
            row["floor_chamfer"] = mesh_chamfer(s.grid, vae.resolution, s.vertices, s.faces, chamfer_points)
        rows.append(row)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("iou", "chamfer", "floor_chamfer") if k in rows[0]}
    return {**summary, "per_asset": rows}


def main() -> None:
    """``python -m know3d.training.generator.debug_shape_vae [--steps N] [--out DIR]``: regenerate
    the shipped weights (the default config) and print the held-out IoU and Chamfer distance."""
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=DebugShapeVaeConfig().steps)
    parser.add_argument("--threads", type=int, default=DebugShapeVaeConfig().threads)
    parser.add_argument("--out", type=Path, default=SHIPPED_SHAPE_VAE)
    args = parser.parse_args()
    cfg = DebugShapeVaeConfig(steps=args.steps, threads=args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train = procedural_dual_grids(Path(tmp), 0, cfg.num_train, cfg.resolution, cfg.asset_seed)
        heldout = procedural_dual_grids(Path(tmp), cfg.num_train, cfg.num_heldout, cfg.resolution, cfg.asset_seed)
    print(f"data: {len(train)} + {len(heldout)} assets, {time.perf_counter() - start:.0f} s")
    result = train_debug_shape_vae(cfg, train, progress=print)
    save_shape_vae(result.vae, args.out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        result.heldout = evaluate(result.vae, heldout, cfg.chamfer_points)
    finally:
        torch.set_num_threads(threads)
    for row in result.heldout["per_asset"]:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
    h = result.heldout
    print(
        f"held-out IoU {h['iou']:.4f}, Chamfer {h['chamfer']:.5f} (true dual grid {h['floor_chamfer']:.5f}); "
        f"training {result.seconds:.0f} s, {time.perf_counter() - start:.0f} s total -> {args.out}"
    )


if __name__ == "__main__":
    main()
