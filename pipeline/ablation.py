"""``know3d train ablation``: the paper's conditioning ablation (§4.3) as one command.

For each variant of ``model.condition`` (``hidden``, ``vae_latent``, ``dino_back``, ``none``) it
trains the generator on the same data with the same seed (``<output>/<variant>``; a finished
variant is not trained again), generates the shapes of the same held-out assets (the data
build's val split: the first pair's front view of each asset) through the real inference path
(``generate_shape``: back view, condition, sampler, decoder, mesh) and scores them with
``know3d eval shapes`` against the assets' meshes (IoU, Chamfer). Results: ``<output>/ablation.md``
and ``ablation.json``, and an MLflow parent run with one child run per variant (its metrics, the
training run's id as a tag).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from know3d.core.io import atomic_write
from know3d.core.tracking import TRAIN_RUN_TAG, make_tracker
from know3d.training.generator.config import CONDITIONS, TrainGeneratorConfig

COLUMNS = (
    ("iou", "IoU (volume, 64³) ↑"),
    ("iou_surface", "IoU (surface) ↑"),
    ("chamfer_l1", "Chamfer-L1 ↓"),
    ("f_score", "F-score@0.01 ↑"),
    ("loss", "final train loss"),
)


def heldout_cases(cfg: TrainGeneratorConfig, folder: Path, limit: int) -> list[dict[str, str]]:
    """Write the held-out assets' front views (``images/<uid>/000.png``) and link their meshes
    (``gt/<uid>/000.<ext>``): the first pair of each val-split asset with a mesh on disk."""
    from know3d.core.shards import iter_samples, resolve_shards
    from know3d.training.generator.targets import _rendered_assets

    dataset = Path(cfg.data.dataset)
    meshes = {a["sha256"]: Path(a["uri"]) for a in _rendered_assets(dataset) if Path(a.get("uri") or "").is_file()}
    urls, _ = resolve_shards([str(dataset)], "val")
    if not urls:
        raise ValueError(f"{dataset}: no val split to hold out (build with shard.val_fraction > 0)")
    cases, seen = [], set()
    for sample in iter_samples([Path(u) for u in urls], fields=("front.png", "json")):
        asset = json.loads(sample["json"])["asset_id"]
        if asset in seen or asset not in meshes:
            continue
        seen.add(asset)
        uid = asset[:16]
        image = folder / "images" / uid / "000.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(sample["front.png"])
        gt = folder / "gt" / uid / f"000{meshes[asset].suffix}"
        gt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meshes[asset], gt)
        cases.append({"uid": uid, "image": str(image), "gt": str(gt)})
        if len(cases) >= limit:
            break
    if not cases:
        raise ValueError(f"{dataset}: no held-out asset with its mesh on disk")
    return cases


def _metric(summary, name: str) -> float | None:
    entry = summary.table.get(name)
    return None if entry is None else entry.get("mean")


def markdown(rows: list[dict[str, Any]], heldout: int) -> str:
    lines = [
        f"# Conditioning ablation (Know3D §4.3), {heldout} held-out assets",
        "",
        "| condition | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else "–" for k, _ in COLUMNS]
        lines.append(f"| {row['condition']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(
    cfg: TrainGeneratorConfig,
    variants: list[str],
    output: Path,
    eval_overrides: list[str] | None = None,
    heldout: int = 8,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train, generate and score every variant; returns the table rows and where things are."""
    from know3d.core.config import load_config
    from know3d.evaluation.config import EvalConfig
    from know3d.pipeline.evaluate import evaluate_shapes
    from know3d.pipeline.train import run_train_generator
    from know3d.training.generator.generate import generate_shape

    unknown = [v for v in variants if v not in CONDITIONS]
    if unknown or not variants:
        raise ValueError(f"variants {unknown or variants} not among {', '.join(CONDITIONS)}")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cases = heldout_cases(cfg, output / "heldout", heldout)
    eval_cfg = load_config(None, ["semantic.enabled=false", *(eval_overrides or [])], model=EvalConfig)
    eval_cfg.mlflow = eval_cfg.mlflow.model_copy(update={"tracking_uri": cfg.mlflow.tracking_uri})
    eval_cfg.mlflow.enabled = cfg.mlflow.enabled
    parent = make_tracker(cfg.mlflow, stage="train.ablation", output=output)
    rows: list[dict[str, Any]] = []
    try:
        parent.log_params({"variants": ",".join(variants), "heldout": len(cases), "seed": cfg.seed})
        for variant in variants:
            vcfg = cfg.model_copy(deep=True)
            vcfg.model.condition = variant
            vcfg.output = str(output / variant)
            trained = run_train_generator(vcfg, fresh=fresh)
            pred = output / variant / "shapes"
            for case in cases:
                generate_shape(
                    Path(case["image"]), Path(trained["generator"]), pred / "work" / case["uid"], seed=cfg.seed
                )
                glb = pred / "work" / case["uid"] / "mesh.glb"
                if glb.is_file():
                    (pred / "pred" / case["uid"]).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(glb, pred / "pred" / case["uid"] / "000.glb")
            summary = evaluate_shapes(
                eval_cfg,
                pred / "pred",
                output / "heldout" / "images",
                output / "heldout" / "gt",
                pred / "eval",
                fresh=True,
            )
            row = {
                "condition": variant,
                "iou": _metric(summary, "iou_volume@64"),
                "iou_surface": _metric(summary, "iou_surface@64"),
                "chamfer_l1": _metric(summary, "chamfer_l1"),
                "f_score": _metric(summary, "fscore@0.01"),
                "loss": trained.get("loss"),
                "meshes": summary.ok,
                "train_output": vcfg.output,
                "eval": str(pred / "eval"),
            }
            rows.append(row)
            tags = {"mlflow.parentRunId": parent.run_id or "", "know3d.variant": variant}
            meta = json.loads((Path(trained["generator"]) / "know3d_generator.json").read_text())
            if meta.get("mlflow_run_id"):
                tags[TRAIN_RUN_TAG] = meta["mlflow_run_id"]
            child = make_tracker(cfg.mlflow, stage="train.ablation.variant", output=output / variant, tags=tags)
            child.log_metrics({k: v for k, v in row.items() if k in dict(COLUMNS) and isinstance(v, float)})
            child.close()
        table = markdown(rows, len(cases))
        atomic_write(output / "ablation.md", table)
        atomic_write(output / "ablation.json", json.dumps({"heldout": cases, "rows": rows}, indent=1))
        for row in rows:
            if isinstance(row.get("iou"), float):
                parent.log_metrics({f"{row['condition']}.iou": row["iou"]})
        parent.log_artifact(output / "ablation.md")
        parent.log_artifact(output / "ablation.json")
    finally:
        parent.close()
    return {"rows": rows, "table": str(output / "ablation.md"), "mlflow_run_id": getattr(parent, "run_id", None)}
