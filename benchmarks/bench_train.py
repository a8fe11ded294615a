"""Back-view training throughput on the tiny debug model, and the data loader against it.

1. ``know3d train backview`` (Ray Train + DeepSpeed ZeRO-2, CPU/gloo here) with 1 and 2 workers:
   samples/s of the last logging window (steady state: start-up, first steps, checkpoints and
   validation excluded).
2. The loader alone (``PairStream``: shard read, shuffle buffer, 2 PNG decodes + resize per
   sample) in one process: samples/s, compared with what one training worker consumes.

    python benchmarks/bench_train.py --shards runs/quickstart [--steps 40] [--image-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_rate(shards: str, workers: int, steps: int, image_size: int, out: Path) -> dict:
    from know3d.pipeline.config import load_config
    from know3d.pipeline.train import run_train_backview
    from know3d.training.config import TrainBackviewConfig

    window = max(steps // 2, 1)
    cfg = load_config(
        ROOT / "configs" / "backview_debug.yaml",
        [
            f"output={out}",
            f"data.shards=[{shards}]",
            f"data.image_size={image_size}",
            f"schedule.max_steps={steps}",
            f"schedule.log_every={window}",
            f"schedule.checkpoint_every={steps}",
            "schedule.validate_every=0",
            f"ray.num_workers={workers}",
            "mlflow.enabled=false",
        ],
        model=TrainBackviewConfig,
    )
    t0 = time.perf_counter()
    metrics = run_train_backview(cfg, fresh=True)
    return {
        "workers": workers,
        "samples_per_s": metrics["samples_per_s"],
        "wall_s": time.perf_counter() - t0,
        "per_worker": metrics["samples_per_s"] / workers,
    }


def loader_rate(shards: str, image_size: int, samples: int) -> float:
    from know3d.core.shards import resolve_shards
    from know3d.training.data import PairStream, StreamState

    urls, _ = resolve_shards([shards], "train")
    stream = PairStream(urls, seed=0, shuffle_buffer=64, image_size=image_size)
    it = stream.forever(StreamState())
    next(it)
    t0 = time.perf_counter()
    for _ in range(samples):
        next(it)
    return samples / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--loader-samples", type=int, default=400)
    args = parser.parse_args()
    shards = str(Path(args.shards).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            rows.append(train_rate(shards, workers, args.steps, args.image_size, Path(tmp) / f"w{workers}"))
    loader = loader_rate(shards, args.image_size, args.loader_samples)
    print(
        f"tiny model, {args.image_size}², micro-batch 2, ZeRO-2, {args.steps} steps (rate of the last "
        f"{max(args.steps // 2, 1)} steps)"
    )
    print("| workers | samples/s | per worker | wall s (incl. start-up) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['samples_per_s']:.2f} | {r['per_worker']:.2f} | {r['wall_s']:.1f} |")
    print(f"scaling 2 vs 1 workers: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x")
    consumed = max(r["per_worker"] for r in rows)
    print(
        f"loader: {loader:.1f} samples/s in one process; one worker consumes {consumed:.2f} samples/s "
        f"-> loader/consumption = {loader / consumed:.1f}x (target >= 10x)"
    )


if __name__ == "__main__":
    main()
