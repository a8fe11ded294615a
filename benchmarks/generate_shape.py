"""`know3d generate shape` wall time per stage at debug size (measured) and at full size (estimated).

Measured: the loaded chain (:class:`know3d.training.generator.generate.ShapeGenerator`, models
loaded once, load time printed separately) run ``--repeats`` times on one front view; per stage the
median seconds of ``backview_and_condition`` (the edit model's sampler with H captured), ``stage1``
(DINOv3 front tokens + the SS flow's Euler CFG sampler + the SS decoder), ``stage2`` (the SLat
flow's sampler on the pooled structure) and ``mesh`` (shape SC-VAE decoding + dual-grid mesh
extraction + GLB).

Estimated (no GPU here): transformer FLOPs ``2 · params · tokens`` per forward (+ attention
``4 · tokens² · width · blocks``) times the forwards each sampler makes (CFG doubles the steps inside
its guidance interval), at the stated fraction of an H200's dense bf16 peak (989 TFLOP/s). Token
counts: Qwen-Image-Edit 2 x 1024 image tokens (512² output + front view, 16x16 patches of the
8x VAE) + ~100 text tokens, 50 steps, CFG on every step, 20.4B parameters; SS flow 4096 tokens
(16³), 12 steps, CFG in (0.6, 1] of a rescaled schedule (measured: 4 of 12 steps unguided at
rescale_t 5), 1.3B; SLat flow ``--slat-tokens`` tokens (the 32³ structure of an object at 512,
typically 5-15 thousand), 12 steps, 1.3B. VAE decoders and mesh extraction are not estimated.

    python benchmarks/generate_shape.py --image runs/generator-shapes/image/<uid>/000.png \\
        --generator runs/train-generator-debug/generator --shape-generator runs/train-generator-shape-debug/generator \\
        --backview-lora runs/train-backview-debug/lora [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

H200_BF16_PEAK = 989e12


def forward_flops(params: float, tokens: int, width: int, blocks: int) -> float:
    return 2 * params * tokens + 4 * tokens**2 * width * blocks


def estimate(mfu: float, slat_tokens: int) -> dict[str, float]:
    """Seconds per stage at full size on one H200 at ``mfu`` of peak."""
    edit = forward_flops(20.4e9, 2 * 1024 + 100, 3072, 60) * 50 * 2
    ss = forward_flops(1.3e9, 4096, 1536, 30) * (12 + 8)
    slat = forward_flops(1.3e9, slat_tokens, 1536, 30) * (12 + 8)
    rate = H200_BF16_PEAK * mfu
    return {"backview_and_condition": edit / rate, "stage1": ss / rate, "stage2": slat / rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--generator", type=Path, required=True)
    ap.add_argument("--shape-generator", type=Path)
    ap.add_argument("--backview-lora", type=Path)
    ap.add_argument("--prompt", default="the back of the object")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mfu", type=float, default=0.4, help="Fraction of the H200 bf16 peak assumed for the estimate.")
    ap.add_argument("--slat-tokens", type=int, default=10_000)
    args = ap.parse_args()

    import torch

    from know3d.training.generator.generate import ShapeGenerator

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    chain = ShapeGenerator(args.generator, args.shape_generator, args.backview_lora, device="cpu")
    print(f"load: {time.perf_counter() - started:.2f} s (threads {torch.get_num_threads()})")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            clock = time.perf_counter()
            summary = chain.run(args.image, Path(tmp) / str(i), args.prompt, seed=i)
            runs.append({**summary["seconds"], "total": time.perf_counter() - clock})
            print(
                f"run {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()),
                f"mesh from {summary['mesh_from']}",
            )
    print("\ndebug size, CPU, median seconds per stage:")
    for key in runs[0]:
        print(f"  {key:24s} {statistics.median(r[key] for r in runs):8.2f}")
    print(f"\nfull size, one H200 at {args.mfu:.0%} of bf16 peak, ESTIMATED seconds (SLat tokens {args.slat_tokens}):")
    for key, value in estimate(args.mfu, args.slat_tokens).items():
        print(f"  {key:24s} {value:8.2f}")


if __name__ == "__main__":
    main()
