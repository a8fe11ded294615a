"""Per-asset load time (parse + texture decode) vs render time, and views/s, on one core.

Usage:
    python benchmarks/bench_render.py ASSET_DIR [--resolution 512] [--backend egl|osmesa] [--repeats 3]

Runs in one process pinned to one CPU core, with Mesa's llvmpipe limited to one thread, and
renders the 12-view `backview` profile of every asset (RGBA + depth; normals from depth).
Columns: load = trimesh parse + texture decode + checks; gl = the 12 GL renders and readbacks;
post = the render loop's other work (scene set-up, alpha, handing views to the writer); write = the
PNG encoding (rgba/depth/normal/mask, normals computed there) still left when the last view is read
back: the writer's threads (``--encode-threads``, default the config's) encode each view while GL
renders the next. Times are medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assets", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--backend", choices=["egl", "osmesa"], default="egl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--encode-threads", type=int, default=0, help="PNG encoder threads (0: the config's default)")
    parser.add_argument("--png-encoder", choices=["fast", "pillow"], default="fast")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="also time two TexVerse-like assets: 80k faces with a 2048^2 / 4096^2 JPEG texture",
    )
    args = parser.parse_args()

    os.environ["LP_NUM_THREADS"] = str(args.cores)  # llvmpipe rasterizer threads
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    warnings.filterwarnings("ignore")

    from know3d.pipeline.config import BuildConfig
    from know3d.rendering.assets import MESH_EXTENSIONS, file_sha256, load_asset
    from know3d.rendering.config import LoadConfig
    from know3d.rendering.process import view_plan, view_writer
    from know3d.rendering.render import ViewRenderer

    render = {"resolution": args.resolution, "backend": args.backend, "png_encoder": args.png_encoder}
    cfg = BuildConfig.model_validate({"render": {**render, "encode_threads": args.encode_threads}})
    files = sorted(p for p in args.assets.rglob("*") if p.suffix.lower().lstrip(".") in MESH_EXTENSIONS)
    synthetic_dir = tempfile.TemporaryDirectory()
    if args.synthetic:
        files += make_synthetic(Path(synthetic_dir.name))
    renderer = ViewRenderer(args.resolution, args.backend)
    print(
        f"# {len(files)} assets, {args.resolution}^2, backend={args.backend}, cores={args.cores}, "
        f"repeats={args.repeats} (medians)"
    )
    header = f"{'asset':<26}{'faces':>8}{'load_s':>9}{'gl_s':>8}{'post_s':>8}{'write_s':>9}{'gl views/s':>12}{'all views/s':>13}"
    print(header)
    totals = {"load": 0.0, "gl": 0.0, "post": 0.0, "write": 0.0, "views": 0, "under_100k": []}
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            sha = file_sha256(path)
            plan = view_plan(sha, cfg)
            samples: dict[str, list[float]] = {"load": [], "gl": [], "post": [], "write": []}
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                asset = load_asset(path, LoadConfig())
                t1 = time.perf_counter()
                out = Path(tmp) / f"{sha}-{len(samples['load'])}"
                with view_writer(out, cfg, depth_scale=1e-4) as writer:  # encodes while GL renders
                    renderer.render(asset, plan.cameras, on_view=writer.submit)
                    gl_s = renderer.last_gl_seconds
                    t2 = time.perf_counter()
                t3 = time.perf_counter()
                samples["load"].append(t1 - t0)
                samples["gl"].append(gl_s)
                samples["post"].append(t2 - t1 - gl_s)
                samples["write"].append(t3 - t2)
            med = {k: statistics.median(v) for k, v in samples.items()}
            n = len(plan.cameras)
            all_s = med["gl"] + med["post"] + med["write"]
            label = path.relative_to(args.assets).as_posix() if path.is_relative_to(args.assets) else path.name
            print(
                f"{label:<26}{asset.num_faces:>8}{med['load']:>9.3f}"
                f"{med['gl']:>8.3f}{med['post']:>8.3f}{med['write']:>9.3f}{n / med['gl']:>12.1f}{n / all_s:>13.1f}"
            )
            for k in ("load", "gl", "post", "write"):
                totals[k] += med[k]
            totals["views"] += n
            if asset.num_faces < 100_000:
                totals["under_100k"].append(n / all_s)
    renderer.close()
    n = totals["views"]
    print(
        f"{'TOTAL':<26}{'':>8}{totals['load']:>9.3f}{totals['gl']:>8.3f}{totals['post']:>8.3f}"
        f"{totals['write']:>9.3f}{n / totals['gl']:>12.1f}{n / (totals['gl'] + totals['post'] + totals['write']):>13.1f}"
    )
    print(
        f"render (gl+post) / load time: {(totals['gl'] + totals['post']) / totals['load']:.1f}x; "
        f"slowest asset <100k faces: {min(totals['under_100k']):.1f} views/s (incl. PNG writing)"
    )


def make_synthetic(folder: Path) -> list[Path]:
    """Textured spheres shaped like typical TexVerse assets (the real ones cannot be fetched here)."""
    import numpy as np
    import trimesh
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for size in (2048, 4096):
        mesh = trimesh.creation.icosphere(subdivisions=6)  # 81,920 faces
        uv = np.c_[
            np.arctan2(mesh.vertices[:, 0], mesh.vertices[:, 2]) / (2 * np.pi) + 0.5, mesh.vertices[:, 1] * 0.5 + 0.5
        ]
        noise = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        texture = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
        mesh.visual = trimesh.visual.TextureVisuals(
            uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=texture)
        )
        path = folder / f"synthetic_{size}.glb"
        # embed the texture as JPEG, as most downloaded assets do
        scene = trimesh.Scene(mesh)
        path.write_bytes(scene.export(file_type="glb", extension_webp=False))
        out.append(path)
    return out


if __name__ == "__main__":
    sys.exit(main())
