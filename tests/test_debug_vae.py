"""The debug-size VAE learns (issue 11, part 1): trained by know3d.training.debug_vae, it reconstructs
images it has not seen far better than the mostly-white baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from know3d.training.debug_vae import DebugVaeConfig, psnr, reconstruct, train_debug_vae

pytestmark = pytest.mark.slow


def _shapes(num: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Coloured rectangles and ellipses on white: render-like images without a GL context."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        img = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(img)
        (x0, y0), (x1, y1) = rng.integers(2, size // 3, 2), rng.integers(2 * size // 3, size - 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if i % 2 else draw.rectangle)([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        out.append(np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out))


def test_debug_vae_learns_to_reconstruct_unseen_images():
    torch.manual_seed(0)
    images = _shapes(24)
    train, heldout = images[:20], images[20:]
    white = psnr(torch.ones_like(heldout), heldout)
    # a short run: 8 channels, cosine decay to 0.1 x lr (the shipped 16-channel recipe needs ~2000
    # steps, measured by scripts/build_debug_vae.py; figures in benchmarks/RESULTS.md). A constant lr
    # ends wherever its oscillation is: 13.4 dB with 2 threads but 12.5 with 1; the decay ends at
    # 13.5 with either (the white baseline is 8.1)
    cfg = DebugVaeConfig(steps=150, log_every=50, z_dim=8, hflip=False, min_lr_ratio=0.1)
    result = train_debug_vae(train, heldout, cfg)
    first, last = result.history[0]["heldout_psnr"], result.history[-1]["heldout_psnr"]
    assert last > white + 5.0 and last > first  # not the white image it collapses to through the clamp
    with torch.no_grad():  # the pipeline's clamped decode and the training path agree in range
        clamped = reconstruct(result.vae, heldout)
        raw = reconstruct(result.vae, heldout, clamp=False)
    assert torch.allclose(clamped, raw.clamp(-1, 1), atol=1e-5)
    assert clamped.shape == heldout.shape
