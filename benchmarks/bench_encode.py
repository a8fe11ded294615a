"""Per-view encode + post time at 512², the former path against the current one, in one run (issue 18).

For every asset: the 12 `backview` views are rendered once per repeat (GL time measured apart),
then written twice:

* **before**: what the render actor did until issue 18, in the render loop: normals from depth on
  the CPU, then Pillow PNG at level 3 for rgba / depth / normal / mask, one view after the other;
* **now**: :class:`know3d.rendering.encode.ViewWriter` (imagecodecs zlib-ng level 1, RLE, SUB;
  normals computed on the writer's threads), fed by the render loop as each view is read back
  (``on_view``); its cost on the critical path is the actor's wall time beyond GL.

Per view: before = post + encode seconds; now = (render-and-write wall − GL) seconds. Also the
now-path's total encode CPU (all threads), PNG bytes, and a check that every PNG decodes to the
same pixels as before.

    python benchmarks/bench_encode.py ../shared/assets/real [--resolution 512] [--threads 2] [--cores 2]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assets", type=Path)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--backend", choices=["egl", "osmesa"], default="egl")
    parser.add_argument("--threads", type=int, default=0, help="writer threads (0: the config default)")
    parser.add_argument("--cores", type=int, default=0, help="pin to this many cores (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cores]))
    os.environ["LP_NUM_THREADS"] = "1"
    warnings.filterwarnings("ignore")

    import numpy as np
    from PIL import Image

    from know3d.pipeline.config import BuildConfig
    from know3d.rendering.assets import MESH_EXTENSIONS, file_sha256, load_asset
    from know3d.rendering.config import LoadConfig
    from know3d.rendering.encode import default_threads, encode_png, view_images
    from know3d.rendering.process import view_plan, view_writer
    from know3d.rendering.render import ViewRenderer, normals_from_depth

    cfg = BuildConfig.model_validate(
        {"render": {"resolution": args.resolution, "backend": args.backend, "encode_threads": args.threads}}
    )
    outputs, background = cfg.render.outputs, cfg.render.background
    files = sorted(p for p in args.assets.rglob("*") if p.suffix.lower().lstrip(".") in MESH_EXTENSIONS)
    renderer = ViewRenderer(args.resolution, args.backend)
    threads = args.threads or default_threads()
    print(f"# {len(files)} assets, {args.resolution}², {threads} writer threads, cores {len(os.sched_getaffinity(0))}")
    print(f"{'asset':<28}{'before ms/view':>15}{'now ms/view':>13}{'ratio':>8}{'bytes now/before':>18}")
    before_all, now_all, bytes_before, bytes_now, views_all = 0.0, 0.0, 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in files:
            sha = file_sha256(path)
            plan = view_plan(sha, cfg)
            asset = load_asset(path, LoadConfig())
            before, now = [], []
            for r in range(args.repeats):
                # now: the writer fed by the render loop
                out = Path(tmp) / f"{sha}-{r}"
                t0 = time.perf_counter()
                with view_writer(out, cfg, 1e-4) as writer:
                    views = renderer.render(asset, plan.cameras, on_view=writer.submit)
                wall = time.perf_counter() - t0
                now.append(wall - renderer.last_gl_seconds)
                # before: normals in the loop, then Pillow level 3, sequentially (fresh views: no cached normals)
                t0 = time.perf_counter()
                legacy = []
                for view in views:
                    view._normal = None
                    view._normal = normals_from_depth(view.depth, view.K)
                    legacy.append(
                        {k: encode_png(a, "pillow") for k, a in view_images(view, 1e-4, outputs, background).items()}
                    )
                before.append(time.perf_counter() - t0)
            for i, files_of_view in enumerate(legacy):  # decoded pixels are identical
                for sub, data in files_of_view.items():
                    new = (out / sub / f"{i:03d}.png").read_bytes()
                    same = np.array_equal(
                        np.asarray(Image.open(io.BytesIO(new))), np.asarray(Image.open(io.BytesIO(data)))
                    )
                    assert same, f"{path.name} view {i} {sub}: decoded pixels differ"
                    bytes_before, bytes_now = bytes_before + len(data), bytes_now + len(new)
            n = len(plan.cameras)
            b, w = statistics.median(before) / n, statistics.median(now) / n
            before_all, now_all, views_all = before_all + b * n, now_all + w * n, views_all + n
            print(f"{path.name:<28}{1000 * b:>15.1f}{1000 * w:>13.1f}{b / w:>8.1f}")
    renderer.close()
    b, w = before_all / views_all, now_all / views_all
    print(f"{'ALL':<28}{1000 * b:>15.1f}{1000 * w:>13.1f}{b / w:>8.1f}{bytes_now / bytes_before:>18.3f}")
    print("decoded pixels identical for every PNG of the last repeat")


if __name__ == "__main__":
    main()
