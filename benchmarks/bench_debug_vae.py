"""Can a debug-size AutoencoderKLQwenImage reconstruct the quickstart renders? (issue 11 target:
PSNR >= 25 dB on held-out renders at 64^2.)

Reads every front/back view of a data build's shards, holds out whole assets (the build's ``val``
split), trains :func:`training.debug_vae.train_debug_vae` on the rest and prints held-out PSNR
over time.

    ./scripts/quickstart.sh            # or any `know3d data build` output
    .venv/bin/python benchmarks/bench_debug_vae.py --shards runs/quickstart --steps 600
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import decode_image, resolve_shards  # noqa: E402
from training.debug_vae import DebugVaeConfig, psnr, reconstruct, train_debug_vae  # noqa: E402


def views(urls: list[str], size: int) -> torch.Tensor:
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        out += [decode_image(sample["front.png"], size), decode_image(sample["back.png"], size)]
    return torch.from_numpy(np.stack(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="runs/quickstart")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = views(resolve_shards([args.shards], "train")[0], args.size)
    heldout = views(resolve_shards([args.shards], "val")[0], args.size)
    print(f"{len(train)} training views, {len(heldout)} held-out views (other assets) at {args.size}^2")
    white = torch.ones_like(heldout)
    print(f"baseline: a white image scores {psnr(white, heldout):.2f} dB on the held-out views")
    cfg = DebugVaeConfig(steps=args.steps)
    result = train_debug_vae(train, heldout, cfg)
    for h in result.history:
        print(f"step {h['step']:>5}  {h['seconds']:7.1f} s  loss {h['loss']:.4f}  held-out PSNR {h['heldout_psnr']:.2f} dB")
    with torch.no_grad():
        final = psnr(reconstruct(result.vae, heldout), heldout)
    params = sum(p.numel() for p in result.vae.parameters())
    print(f"params={params} steps={cfg.steps} seconds={result.history[-1]['seconds']:.0f} heldout_psnr_db={final:.2f}")


if __name__ == "__main__":
    main()
