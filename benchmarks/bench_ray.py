"""Ray scaling of the render stage: 1 vs 2 workers, and Ray's overhead per asset.

Usage:
    python benchmarks/bench_ray.py [--num-assets 24] [--resolution 512]

Renders the built-in procedural set three ways and prints seconds and assets/s:
  * no Ray: one isolated renderer in this process, assets in sequence (the baseline);
  * `know3d data build` with `ray.render_concurrency=1`, then `=2` (fresh output each time).
Ray's overhead per asset = (render stage with 1 Ray worker - baseline) / assets; it includes
actor start-up, scheduling, result transfer and manifest bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-assets", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from know3d.pipeline.build import run_build
    from know3d.pipeline.config import load_config
    from know3d.rendering.assets import file_sha256
    from know3d.rendering.isolation import IsolatedRenderer
    from know3d.rendering.sources.procedural import ProceduralSource

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def config(out: str, workers: int):
            return load_config(
                None,
                [
                    f"output={tmp / out}",
                    "source.kind=procedural",
                    f"source.procedural.num_assets={args.num_assets}",
                    f"render.resolution={args.resolution}",
                    f"ray.render_concurrency={workers}",
                    "ray.num_cpus=2",
                    "mlflow.enabled=false",
                ],
            )

        cfg = config("seq", 1)
        records, _ = ProceduralSource(cfg.source.procedural, tmp / "assets").discover()
        paths = [Path(r.uri) for r in records]
        with IsolatedRenderer(cfg, tmp / "seq-work") as iso:
            t0 = time.perf_counter()
            iso.run(paths[0], "warmup" + "0" * 58, {})  # child start + GL context, not per asset
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p in paths:
                result = iso.run(p, file_sha256(p), {})
                assert result.status == "ok", result
            baseline = time.perf_counter() - t0
        n = len(paths)
        print(f"# {n} procedural assets, 12 views at {args.resolution}^2, 2 cores")
        print(
            f"no Ray, 1 process        : {baseline:7.2f} s  {n / baseline:6.2f} assets/s  "
            f"(renderer start-up {startup:.2f} s excluded)"
        )
        stage = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            summary = run_build(config(f"ray{workers}", workers))
            total = time.perf_counter() - t0
            assert summary.num_samples == 6 * n and summary.num_failed == 0
            stage[workers] = summary.metrics["render_s"]
            print(
                f"Ray, {workers} render worker(s) : {stage[workers]:7.2f} s  {n / stage[workers]:6.2f} assets/s  "
                f"(whole build incl. ray.init: {total:.2f} s)"
            )
        print(f"speed-up 2 vs 1 workers  : {stage[1] / stage[2]:.2f}x")
        print(
            f"Ray overhead per asset   : {(stage[1] - baseline) / n * 1000:.0f} ms "
            f"(1 worker vs no Ray, incl. actor + renderer start-up {startup:.2f} s amortized)"
        )


if __name__ == "__main__":
    main()
