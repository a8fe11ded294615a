"""Submanifold 3x3x3 sparse convolution throughput: the pure-torch reference against spconv.

Active sites: the fine dual-grid voxels of a procedural asset (a surface, as the shape SC-VAE sees
it) at ``--resolution``; ``--channels`` in and out; weights in upstream's flex_gemm layout
(:class:`know3d.training.generator.sparse.SubMConv3d`). Per backend: the neighbour search once
(cached per coordinate set, as a U-Net level reuses it), then the median of ``--repeats`` forward
passes (and forward + backward), printed as voxels/s. spconv runs only on CUDA when importable.

    python benchmarks/sparse_conv.py [--resolution 64 128] [--channels 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def surface_voxels(resolution: int) -> torch.Tensor:
    """[N, 4] (batch, x, y, z) of a procedural asset's dual grid."""
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource
    from know3d.training.generator.dual_grid import mesh_to_dual_grid
    from know3d.training.generator.occupancy import unit_cube_mesh

    with tempfile.TemporaryDirectory() as tmp:
        records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=1), Path(tmp)).discover()
        vertices, faces = unit_cube_mesh(Path(records[0].uri))
    coords = torch.from_numpy(mesh_to_dual_grid(vertices, faces, resolution).coords)
    return torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], dim=1)


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        clock = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


def run(resolution: int, channels: int, repeats: int, backend: str, device: torch.device) -> dict:
    from know3d.training.generator.sparse import SparseTensor, SubMConv3d

    coords = surface_voxels(resolution).to(device)
    feats = torch.randn(len(coords), channels, device=device)
    conv = SubMConv3d(channels, channels, 3, backend=backend).to(device)
    x = SparseTensor(feats, coords)
    clock = time.perf_counter()
    conv(x)  # builds and caches the neighbour map
    first = time.perf_counter() - clock
    forward = timed(lambda: conv(x), repeats, device)
    feats.requires_grad_(True)

    def step():
        conv(x.replace(feats)).feats.sum().backward()  # same sites: the cached neighbour map

    backward = timed(step, repeats, device)
    n = len(coords)
    return {"voxels": n, "first_s": first, "forward_s": forward, "fwd_bwd_s": backward, "fwd_vox_s": n / forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from know3d.training.generator.sparse import spconv_available

    backends = [("torch", torch.device("cpu"))]
    if torch.cuda.is_available():
        backends.append(("torch", torch.device("cuda")))
        if spconv_available():
            backends.append(("spconv", torch.device("cuda")))
    print(f"channels {args.channels} -> {args.channels}, threads {args.threads}, repeats {args.repeats}")
    print(
        "| resolution | backend | device | active voxels | first call s (maps) | forward s | fwd+bwd s | voxels/s fwd |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for res in args.resolution:
        for backend, device in backends:
            r = run(res, args.channels, args.repeats, backend, device)
            print(
                f"| {res} | {backend} | {device.type} | {r['voxels']} | {r['first_s']:.3f} | {r['forward_s']:.4f} | "
                f"{r['fwd_bwd_s']:.4f} | {r['fwd_vox_s']:.3g} |"
            )
    if not torch.cuda.is_available():
        print("spconv: not run (needs CUDA)")


if __name__ == "__main__":
    main()
