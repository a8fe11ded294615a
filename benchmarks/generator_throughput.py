"""Tiny-model training throughput of the generator's stage 1 on CPU, 1 and 2 workers (issue 15).

Runs the real trainer body (``torchrun -m know3d.training.generator.train``: DeepSpeed ZeRO-2 on
gloo, frozen DINOv3 + cached H, LoRA + branch on the debug base) for ``--steps`` steps with 1 and
with 2 workers on a data build that has targets and the hidden-state pre-pass
(``scripts/quickstart_generator.sh`` makes ``runs/geo``), and prints samples/s per worker count:
the samples of the steps after ``--warmup`` over the wall time from the warm-up's progress line to
the end (model loading and DeepSpeed start-up excluded, the final export included).

    .venv/bin/python benchmarks/generator_throughput.py --dataset runs/geo --steps 60
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(workers: int, args: argparse.Namespace, out: Path) -> float:
    sets = [
        f"output={out}",
        f"data.dataset={args.dataset}",
        f"model.base={args.base}",
        f"schedule.max_steps={args.steps}",
        "schedule.validate_every=0",
        f"schedule.checkpoint_every={args.steps * 10}",
        "schedule.log_every=10",
        f"schedule.micro_batch_size={args.batch}",
        "mlflow.enabled=false",
    ]
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(workers)]
    command += ["-m", "know3d.training.generator.train", str(ROOT / "configs" / "generator_ss_debug.yaml")]
    command += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // workers))}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    warm_at = None
    for line in proc.stdout:
        if line.startswith(f"step {args.warmup}/") and warm_at is None:
            warm_at = time.perf_counter()
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"{workers} workers: training failed (rc {proc.returncode})")
    end = time.perf_counter()
    samples = (args.steps - args.warmup) * args.batch * workers
    print(f"  {workers} worker(s): {end - start:.1f} s in all", flush=True)
    return samples / (end - (warm_at or start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="runs/geo")
    parser.add_argument("--base", default="debug", help="Base flow ('debug' or the merged debug base folder).")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="Steps before timing (a multiple of 10).")
    parser.add_argument("--batch", type=int, default=2, help="Micro-batch per worker.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="know3d-gen-bench-") as tmp:
        for workers in (1, 2):
            out = Path(tmp) / f"w{workers}"
            rows.append((workers, run(workers, args, out)))
            shutil.rmtree(out, ignore_errors=True)
    print("| workers | micro-batch | samples/s |")
    print("|---|---|---|")
    for workers, rate in rows:
        print(f"| {workers} | {args.batch} | {rate:.1f} |")


if __name__ == "__main__":
    main()
