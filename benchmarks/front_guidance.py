"""Front-partial guidance (issue 17): front consistency with and without guidance, and the lambda
curve, on held-out assets of one or more data builds (one table per build).

For each data build: :func:`know3d.pipeline.ablation.run_guidance_sweep` (what ``know3d eval
guidance-sweep`` runs) on up to ``--heldout`` assets that neither generator was trained on, their
first pair's front view with its rendered depth and camera, unguided and at every lambda; it prints
the table (front -> mesh and mesh front -> front in the generator's unit cube; IoU / Chamfer /
F-score from ``know3d eval shapes``), the saturation lambda, the seconds per shape, and the
front-target cost (sheet, band, VAE encodings).

    python benchmarks/front_guidance.py --dataset runs/geo --dataset runs/geo-real \\
        --generator runs/train-generator-debug/generator \\
        --shape-generator runs/train-generator-shape-debug/generator \\
        --backview-lora runs/train-backview-debug/lora --lambdas 0.25,0.5,1,2,4,8,16 --heldout 6

The ceiling (what guidance can reach at most: x_fg decoded alone, scored the same way) is printed
per build; ``--ceiling-only`` prints it for the cases of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def ceiling(args: argparse.Namespace, cases: list[dict]) -> dict[str, float]:
    """What the guidance can reach at most: the front latent x_fg decoded by the shape SC-VAE on its
    own coordinates, meshed, scored like the generated shapes (mean over the cases)."""
    import numpy as np
    import torch

    from know3d.evaluation.geometry import front_consistency
    from know3d.pipeline.ablation import _mesh_samples
    from know3d.training.generator.generate import ShapeGenerator, dual_grid_glb

    chain = ShapeGenerator(args.generator, args.shape_generator, args.backview_lora, front_guidance={"source": "depth"})
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            front = {"depth": case["depth"], "camera": case["camera"]}
            targets, points, view_dir = chain.front_targets(Path(case["image"]), front)
            with torch.no_grad():
                fine = chain.codec.decode(torch.from_numpy(targets.shape_coords), targets.shape_feats)
            glb = Path(tmp) / f"{case['uid']}.glb"
            glb.write_bytes(dual_grid_glb(fine, chain.codec.resolution))
            scores.append(front_consistency(points, _mesh_samples(glb, case["uid"]), view_dir))
    keys = ("front_to_mesh", "front_within@0.02")
    return {k: round(statistics.mean(float(np.nan_to_num(s[k])) for s in scores), 4) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, action="append", required=True)
    parser.add_argument("--generator", type=Path, required=True)
    parser.add_argument("--shape-generator", type=Path, required=True)
    parser.add_argument("--backview-lora", type=Path)
    parser.add_argument("--lambdas", default="0.25,0.5,1,2,4,8,16")
    parser.add_argument("--key", default="lam_shape")
    parser.add_argument("--split", default="all")
    parser.add_argument("--heldout", type=int, default=6)
    parser.add_argument("--guidance-set", action="append", default=[])
    parser.add_argument("--output", type=Path, default=Path("runs/bench-front-guidance"))
    parser.add_argument(
        "--ceiling-only", action="store_true", help="Only the ceiling, for the cases of an earlier run in --output."
    )
    args = parser.parse_args()
    if args.ceiling_only:
        for dataset in args.dataset:
            cases = json.loads((args.output / dataset.name / "guidance_sweep.json").read_text())["heldout"]
            print(f"{dataset}: ceiling (x_fg decoded alone) {json.dumps(ceiling(args, cases))}")
        return

    from know3d.pipeline.ablation import run_guidance_sweep

    lambdas = [float(v) for v in args.lambdas.split(",")]
    for dataset in args.dataset:
        started = time.perf_counter()
        result = run_guidance_sweep(
            args.generator,
            args.shape_generator,
            [dataset],
            args.output / dataset.name,
            lambdas,
            heldout=args.heldout,
            split=args.split,
            key=args.key,
            backview_lora=args.backview_lora,
            guidance_overrides=args.guidance_set,
        )
        wall = time.perf_counter() - started
        print(
            f"\n## {dataset} ({len(result['cases'])} held-out assets: "
            + ", ".join(c.get("asset", c["uid"]) for c in result["cases"])
            + ")\n"
        )
        print(Path(result["table"]).read_text())
        shapes = []
        for row in result["rows"]:
            for uid in (c["uid"] for c in result["cases"]):
                summary = Path(row["output"]) / "work" / uid / "shape.json"
                if summary.is_file():
                    shapes.append(json.loads(summary.read_text()))
        fronts = [s["seconds"]["front_targets"] for s in shapes if "front_targets" in s["seconds"]]
        totals = [sum(s["seconds"].values()) for s in shapes]
        errors = {row["lambda"]: row["errors"] for row in result["rows"] if row["errors"]}
        print(
            f"shapes generated: {len(shapes)}, median seconds per shape {statistics.median(totals):.2f}, "
            f"front targets median {statistics.median(fronts) if fronts else float('nan'):.2f} s; "
            f"sweep wall {wall:.0f} s"
        )
        if errors:
            print(f"errors: {json.dumps(errors)}")
        print(f"ceiling (x_fg decoded alone): {json.dumps(ceiling(args, result['cases']))}")
        info = [
            s["front_guidance"]["targets"]
            for s in shapes
            if s.get("front_guidance", {}) and s["front_guidance"].get("targets")
        ]
        if info:
            for field in ("sheet_faces", "shape_front_voxels", "shape_latent_voxels", "ss_mask_cells"):
                print(f"  {field}: median {statistics.median(i[field] for i in info):g}")


if __name__ == "__main__":
    main()
