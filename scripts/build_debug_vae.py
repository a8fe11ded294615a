"""Regenerate the debug VAE that ships in ``training/assets/debug-qwen-image-vae`` (issue 11).

Meant to be deterministic: the quickstart data set is procedural (seeded), the VAE's
initialization, batch order and flips are seeded, and training runs on 2 threads with
deterministic algorithms, so the same torch build on the same CPU family should reproduce the
same bytes. ``--check`` rebuilds in a temp folder and compares (not yet confirmed across two runs;
see benchmarks/RESULTS.md). The held-out PSNR it prints is the figure that matters (>= 25 dB).

    ./scripts/quickstart.sh                      # builds runs/quickstart (or: know3d data build ...)
    .venv/bin/python scripts/build_debug_vae.py --shards runs/quickstart            # ~15 min
    .venv/bin/python scripts/build_debug_vae.py --shards runs/quickstart --check    # compare only
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

from know3d.training.debug_vae import (
    SHIPPED_VAE,
    DebugVaeConfig,
    latent_stats,
    load_views,
    psnr,
    reconstruct,
    save_vae,
    train_debug_vae,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="runs/quickstart", help="a data build of the quickstart set")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=DebugVaeConfig().steps)
    parser.add_argument("--output", type=Path, default=SHIPPED_VAE)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare with --output")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    train = load_views([args.shards], "train", args.size)
    heldout = load_views([args.shards], "val", args.size)
    print(f"{len(train)} training views, {len(heldout)} held-out views at {args.size}^2", flush=True)
    cfg = DebugVaeConfig(steps=args.steps, log_every=200)
    result = train_debug_vae(
        train,
        heldout,
        cfg,
        progress=lambda h: print(
            f"step {h['step']:>5}  {h['seconds']:7.1f} s  loss {h['loss']:.4f}  held-out PSNR {h['heldout_psnr']:.2f} dB",
            flush=True,
        ),
    )
    mean, std = latent_stats(result.vae, train)
    with torch.no_grad():
        final = psnr(reconstruct(result.vae, heldout), heldout)
    out = Path(tempfile.mkdtemp()) if args.check else args.output
    save_vae(result.vae, out, mean, std)
    print(f"heldout_psnr_db={final:.2f} sha256={digest(out / WEIGHTS)} -> {out}")
    if args.check:
        same = digest(out / WEIGHTS) == digest(args.output / WEIGHTS)
        print("identical to the shipped weights" if same else "DIFFERS from the shipped weights")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
