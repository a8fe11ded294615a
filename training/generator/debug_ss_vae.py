"""A debug-size sparse-structure VAE that actually reconstructs occupancies (issue 14).

Same module classes as the full TRELLIS SS-VAE (:mod:`.ss_vae`), at :meth:`SSVaeConfig.debug`
size: a **32³** grid (not 64³, so that training fits in minutes on a 2-core CPU), two levels of
8 and 32 channels, one residual block each, latent 8 x 16³. It is trained with this module's
:func:`train_debug_ss_vae` on procedural assets (:mod:`know3d.rendering.sources.procedural`),
deterministically (the encoder's posterior mean, no sampling, no KL term), with BCE + soft dice
on the occupancy logits and random flips / quarter turns about the up axis. The trained weights
ship in ``training/assets/debug-ss-vae`` (``encoder``/``decoder`` ``.safetensors`` + ``.json``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from know3d.training.generator.ss_vae import SSDecoder, SSEncoder, SSVae, SSVaeConfig, load_ss_vae, save_ss_vae

SHIPPED_SS_VAE = Path(__file__).resolve().parent.parent / "assets" / "debug-ss-vae"


@dataclass(kw_only=True)
class DebugSSVaeConfig:
    model: SSVaeConfig = field(default_factory=SSVaeConfig.debug)
    num_train: int = 60  # procedural assets 0..num_train-1 (round-robin over the categories)
    num_heldout: int = 10  # the next ones, never trained on
    asset_seed: int = 0
    steps: int = 500
    batch_size: int = 6
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    dice_weight: float = 1.0
    augment: bool = True  # flips of x / y and quarter turns about z (up)
    seed: int = 0
    log_every: int = 50


@dataclass
class DebugSSVaeResult:
    vae: SSVae
    history: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "heldout_iou"}


def procedural_occupancies(
    cache_dir: Path, first: int, count: int, resolution: int, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Occupancies ``[count, 1, R, R, R]`` (float 0/1) of procedural assets ``first..first+count-1``
    (GLBs written by ``ProceduralSource`` into ``cache_dir``), and their names."""
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource
    from know3d.training.generator.occupancy import asset_occupancy

    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=first + count, seed=seed), cache_dir).discover()
    records = records[first:]
    grids = [asset_occupancy(Path(r.uri), resolution).grid for r in records]
    return torch.from_numpy(np.stack(grids)[:, None].astype(np.float32)), [r.meta["name"] for r in records]


def iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Occupancy IoU over a batch (all voxels pooled) of ``logits > 0`` against ``target > 0.5``."""
    pred, gt = logits > 0, target > 0.5
    union = int((pred | gt).sum())
    return 1.0 if union == 0 else int((pred & gt).sum()) / union


def loss_fn(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE (positives weighted by the batch's empty/occupied ratio) + soft dice."""
    pos = target.mean().clamp_min(1e-4)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=((1 - pos) / pos).sqrt())
    prob = torch.sigmoid(logits)
    dims = tuple(range(1, target.ndim))
    dice = 1 - (2 * (prob * target).sum(dims) + 1) / (prob.sum(dims) + target.sum(dims) + 1)
    return bce + dice_weight * dice.mean()


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    out = []
    for x in batch:  # [1, R, R, R] indexed x, y, z (z up)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(1)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(2)
        x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(1, 2))
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def evaluate(vae: SSVae, occupancies: torch.Tensor, batch: int = 8) -> float:
    """Pooled IoU of the round trip occupancy -> mean latent -> logits > 0."""
    inter = union = 0
    for i in range(0, len(occupancies), batch):
        x = occupancies[i : i + batch]
        pred, gt = vae.reconstruct(x) > 0, x > 0.5
        inter += int((pred & gt).sum())
        union += int((pred | gt).sum())
    return 1.0 if union == 0 else inter / union


def train_debug_ss_vae(
    train: torch.Tensor, heldout: torch.Tensor, cfg: DebugSSVaeConfig, progress=None
) -> DebugSSVaeResult:
    """Fit encoder + decoder on ``train`` occupancies ([N, 1, R, R, R] 0/1); held-out IoU every
    ``log_every`` steps. Deterministic for a given config and thread count."""
    torch.manual_seed(cfg.seed)
    vae = SSVae(SSEncoder(cfg.model), SSDecoder(cfg.model), cfg.model)
    params = [*vae.encoder.parameters(), *vae.decoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    cosine = lambda i: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * i / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = DebugSSVaeResult(vae)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        vae.encoder.train()
        vae.decoder.train()
        batch = train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)]
        if cfg.augment:
            batch = _augment(batch, gen)
        logits = vae.decoder(vae.encoder(batch))
        loss = loss_fn(logits, batch, cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            vae.encoder.eval()
            vae.decoder.eval()
            entry = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(float(loss.detach()), 4),
                "train_iou": round(iou(logits.detach(), batch), 4),
                "heldout_iou": round(evaluate(vae, heldout), 4),
            }
            result.history.append(entry)
            if progress is not None:
                progress(entry)
    vae.encoder.eval()
    vae.decoder.eval()
    return result


def save_debug_ss_vae(vae: SSVae, folder: Path = SHIPPED_SS_VAE) -> Path:
    save_ss_vae(vae.encoder, folder, "encoder")
    save_ss_vae(vae.decoder, folder, "decoder")
    return Path(folder)


def resolve_debug_ss_vae(folder: Path | None = None) -> SSVae:
    """The shipped debug SS-VAE (32³ occupancy, latent 8 x 16³), both halves in eval mode."""
    folder = Path(folder) if folder is not None else SHIPPED_SS_VAE
    encoder = load_ss_vae(folder, "encoder")
    decoder = load_ss_vae(folder, "decoder")
    return SSVae(encoder, decoder, encoder.cfg)


def main() -> None:
    """``python -m know3d.training.generator.debug_ss_vae [--steps N] [--out DIR]``: regenerate the
    shipped weights (the default config) and print the held-out IoU."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=DebugSSVaeConfig().steps)
    parser.add_argument("--out", type=Path, default=SHIPPED_SS_VAE)
    args = parser.parse_args()
    cfg = DebugSSVaeConfig(steps=args.steps)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = cfg.model.resolution
        train, _ = procedural_occupancies(Path(tmp), 0, cfg.num_train, res, cfg.asset_seed)
        heldout, _ = procedural_occupancies(Path(tmp), cfg.num_train, cfg.num_heldout, res, cfg.asset_seed)
    result = train_debug_ss_vae(train, heldout, cfg, progress=print)
    save_debug_ss_vae(result.vae, args.out)
    final = result.history[-1]
    print(f"held-out IoU {final['heldout_iou']:.4f}, {time.perf_counter() - start:.0f} s total -> {args.out}")


if __name__ == "__main__":
    main()
