"""A debug-size ``AutoencoderKLQwenImage`` that actually reconstructs renders (issue 11, part 1).

The tiny random VAE of :mod:`know3d.training.debug_models` makes every generated image noise, so no
back-view run on CPU can show learning. This trains the *same diffusers class* at debug size on
rendered views, so a debug pipeline can use it unchanged (``from_pretrained``, the pipeline's
``vae.encode``/``vae.decode``, latent normalization from ``latents_mean``/``latents_std``).

One trap, measured: ``AutoencoderKLQwenImage.decode`` clamps its output to [-1, 1]. Trained
through ``decode``, the mostly-white renders push the output into the clamp, the gradient
vanishes and the VAE collapses to a white image (16.5 dB on held-out renders, whatever the
learning rate). Training therefore decodes with ``post_quant_conv`` + ``decoder`` directly (the
same weights, no clamp); inference keeps the pipeline's ``decode``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The trained weights ship with the package (scripts/build_debug_vae.py regenerates them).
SHIPPED_VAE = Path(__file__).resolve().parent / "assets" / "debug-qwen-image-vae"


@dataclass(kw_only=True, slots=True)
class DebugVaeConfig:
    base_dim: int = 16
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4)  # 4x spatial compression: 64^2 renders -> 16^2 latents
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.02  # cosine decay to lr * min_lr_ratio at the last step
    hflip: bool = True  # random horizontal flips (renders are as plausible mirrored)
    # Renders are mostly white background: per-pixel weight 1 + foreground_weight on object
    # pixels, or the VAE settles on "white everywhere" (a plateau it may never leave)
    foreground_weight: float = 9.0
    seed: int = 0
    log_every: int = 50


@dataclass(slots=True)
class DebugVaeResult:
    vae: object  # diffusers.AutoencoderKLQwenImage
    history: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "heldout_psnr"}


def build_vae(cfg: DebugVaeConfig):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(cfg.seed)
    return AutoencoderKLQwenImage(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=1,
        temperal_downsample=[False] + [True] * (len(cfg.dim_mult) - 2),
        latents_mean=[0.0] * cfg.z_dim,
        latents_std=[1.0] * cfg.z_dim,
    )


def reconstruct(vae, images: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """images: [B, 3, H, W] in [-1, 1] -> reconstructions [B, 3, H, W] through the posterior mode.
    ``clamp=False`` skips ``decode``'s clamp (training; see the module docstring)."""
    latents = vae.encode(images.unsqueeze(2)).latent_dist.mode()
    if clamp:
        return vae.decode(latents).sample[:, :, 0]
    return vae.decoder(vae.post_quant_conv(latents))[:, :, 0]


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((pred.clamp(-1, 1) - target) ** 2).mean())
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def train_debug_vae(train: torch.Tensor, heldout: torch.Tensor, cfg: DebugVaeConfig, progress=None) -> DebugVaeResult:
    """Fit the VAE to ``train`` ([N, 3, H, W] in [-1, 1]) with L1 + MSE on reconstructions;
    held-out PSNR (through the clamped ``decode``, as the pipeline decodes) every ``log_every``."""
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    cosine = lambda i: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * i / cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = DebugVaeResult(vae)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)]
        if cfg.hflip:
            flip = torch.rand(len(batch), generator=gen) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        rec = reconstruct(vae, batch, clamp=False)
        foreground = (batch < 0.98).any(dim=1, keepdim=True).float()  # not the white background
        weight = 1.0 + cfg.foreground_weight * foreground
        err = rec - batch
        loss = ((err.abs() + err**2) * weight).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                score = psnr(reconstruct(vae, heldout), heldout)
            result.history.append(
                {
                    "step": step,
                    "seconds": time.perf_counter() - start,
                    "loss": float(loss.detach()),
                    "heldout_psnr": score,
                }
            )
            if progress is not None:
                progress(result.history[-1])
    vae.eval()
    return result


def load_views(specs: list[str], split: str, size: int) -> torch.Tensor:
    """Every front and back view of a data build's ``split`` shards: [N, 3, size, size] in [-1, 1]."""
    import numpy as np
    import webdataset as wds

    from know3d.core.shards import resolve_shards
    from know3d.training.data import decode_image

    urls = resolve_shards(specs, split)[0]
    if not urls:
        raise ValueError(f"{', '.join(specs)}: no '{split}' shards")
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        out += [decode_image(sample["front.png"], size), decode_image(sample["back.png"], size)]
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, batch: int = 32) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior modes: the ``latents_mean``/``latents_std`` the
    pipeline normalizes with (the real Qwen-Image VAE ships its own, computed the same way)."""
    modes = torch.cat(
        [vae.encode(images[i : i + batch].unsqueeze(2)).latent_dist.mode() for i in range(0, len(images), batch)]
    )
    dims = [0, 2, 3, 4]
    return [round(float(v), 6) for v in modes.mean(dims)], [round(float(v), 6) for v in modes.std(dims)]


def save_vae(vae, folder: Path, mean: list[float], std: list[float]) -> Path:
    """``save_pretrained`` with the normalization statistics written into the config."""
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
