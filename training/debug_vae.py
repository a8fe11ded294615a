"""A debug-size ``AutoencoderKLQwenImage`` that actually reconstructs renders (issue 11, part 1).

The tiny random VAE of :mod:`training.debug_models` makes every generated image noise, so no
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

import torch


@dataclass(kw_only=True, slots=True)
class DebugVaeConfig:
    base_dim: int = 16
    z_dim: int = 8
    dim_mult: tuple[int, ...] = (1, 2, 4)  # 4x spatial compression: 64^2 renders -> 16^2 latents
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
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
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=1,
        temperal_downsample=[False] + [True] * (len(cfg.dim_mult) - 2),
        latents_mean=[0.0] * cfg.z_dim, latents_std=[1.0] * cfg.z_dim,
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


def train_debug_vae(train: torch.Tensor, heldout: torch.Tensor, cfg: DebugVaeConfig) -> DebugVaeResult:
    """Fit the VAE to ``train`` ([N, 3, H, W] in [-1, 1]) with L1 + MSE on reconstructions;
    held-out PSNR (through the clamped ``decode``, as the pipeline decodes) every ``log_every``."""
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = DebugVaeResult(vae)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)]
        rec = reconstruct(vae, batch, clamp=False)
        loss = (rec - batch).abs().mean() + ((rec - batch) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                score = psnr(reconstruct(vae, heldout), heldout)
            result.history.append({"step": step, "seconds": time.perf_counter() - start,
                                   "loss": float(loss.detach()), "heldout_psnr": score})
    vae.eval()
    return result
