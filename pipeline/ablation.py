"""``know3d train ablation``: the paper's conditioning ablation (§4.3) as one command.

For each variant of ``model.condition`` (``hidden``, ``vae_latent``, ``dino_back``, ``none``) it
trains the generator on the same data with the same seed (``<output>/<variant>``; a finished
variant is not trained again), generates the shapes of the same held-out assets (the data
build's val split: the first pair's front view of each asset) through the real inference path
(``generate_shape``: back view, condition, sampler, decoder, mesh) and scores them with
``know3d eval shapes`` against the assets' meshes (IoU, Chamfer). Results: ``<output>/ablation.md``
and ``ablation.json``, and an MLflow parent run with one child run per variant (its metrics, the
training run's id as a tag).

``know3d eval guidance-sweep`` (:func:`run_guidance_sweep`) is the other ablation: one loaded pair of
trained generators, the held-out front views with their rendered depth and camera, generated
unguided and with front-partial guidance at each lambda of a sweep, scored for front consistency
(``evaluation.geometry.front_consistency``, in the generator's frame) and, through
``know3d eval shapes``, for IoU / Chamfer against the assets' meshes. ``guidance_sweep.md`` and
``.json`` hold the curve and where it saturates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

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


def heldout_cases(
    dataset: Path, folder: Path, limit: int, split: str = "val", skip: set[str] | frozenset = frozenset()
) -> list[dict[str, str]]:
    """Write the held-out assets' front views (``images/<uid>/000.png``), their rendered depth and
    camera when the shards carry them (``front/<uid>/depth.png``, ``front/<uid>/camera.json``), and
    copy their meshes (``gt/<uid>/000.<ext>``): the first pair of each ``split`` asset (``val``,
    ``train`` or ``all``) with a mesh on disk, but none whose asset id starts with one of ``skip``."""
    from know3d.core.shards import iter_samples, resolve_shards
    from know3d.training.generator.targets import _rendered_assets

    dataset = Path(dataset)
    meshes = {a["sha256"]: Path(a["uri"]) for a in _rendered_assets(dataset) if Path(a.get("uri") or "").is_file()}
    splits = ("train", "val") if split == "all" else (split,)
    urls = [u for name in splits for u in resolve_shards([str(dataset)], name)[0]]
    if not urls:
        raise ValueError(f"{dataset}: no {split} split to hold out (build with shard.val_fraction > 0)")
    cases, seen = [], set()
    for sample in iter_samples([Path(u) for u in urls], fields=("front.png", "json"), optional=("front.depth.png",)):
        info = json.loads(sample["json"])
        asset = info["asset_id"]
        if asset in seen or asset not in meshes or any(asset.startswith(s) for s in skip):
            continue
        seen.add(asset)
        uid = asset[:16]
        image = folder / "images" / uid / "000.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(sample["front.png"])
        gt = folder / "gt" / uid / f"000{meshes[asset].suffix}"
        gt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(meshes[asset], gt)
        case = {"uid": uid, "image": str(image), "gt": str(gt), "asset": info.get("asset_key", asset)}
        if sample.get("front.depth.png") is not None and "front_camera" in info:
            front = folder / "front" / uid
            front.mkdir(parents=True, exist_ok=True)
            (front / "depth.png").write_bytes(sample["front.depth.png"])
            camera = {**info["front_camera"], "depth_scale": info["depth_scale"]}
            (front / "camera.json").write_text(json.dumps(camera))
            case.update(depth=str(front / "depth.png"), camera=str(front / "camera.json"))
        cases.append(case)
        if len(cases) >= limit:
            break
    if not cases:
        raise ValueError(f"{dataset}: no held-out asset with its mesh on disk")
    return cases


def heldout_shapes(cases: list[dict[str, str]], generator: Path, folder: Path, seed: int = 0) -> Path:
    """A shape per held-out case with ``generator`` (work files in ``folder/work/<uid>``), laid out
    for `eval shapes` as ``folder/pred/<uid>/000.glb``; a case without a mesh is simply absent."""
    from know3d.training.generator.generate import generate_shape

    for case in cases:
        generate_shape(Path(case["image"]), generator, folder / "work" / case["uid"], seed=seed)
        glb = folder / "work" / case["uid"] / "mesh.glb"
        if glb.is_file():
            (folder / "pred" / case["uid"]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(glb, folder / "pred" / case["uid"] / "000.glb")
    return folder / "pred"


# the shape scores the ablation, the guidance sweep and the retraining cycle report, by `eval shapes` name
SHAPE_METRICS = {"iou": "iou_volume@64", "chamfer_l1": "chamfer_l1", "f_score": "fscore@0.01"}


def metric_mean(summary, name: str) -> float | None:
    entry = summary.table.get(name)
    return None if entry is None else entry.get("mean")


def shape_means(summary) -> dict[str, float | None]:
    """``SHAPE_METRICS``' means of an `eval shapes` summary (None where no mesh was scored)."""
    return {key: metric_mean(summary, name) for key, name in SHAPE_METRICS.items()}


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

    unknown = [v for v in variants if v not in CONDITIONS]
    if unknown or not variants:
        raise ValueError(f"variants {unknown or variants} not among {', '.join(CONDITIONS)}")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    cases = heldout_cases(Path(cfg.data.dataset), output / "heldout", heldout)
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
            heldout_shapes(cases, Path(trained["generator"]), pred, seed=cfg.seed)
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
                **shape_means(summary),
                "iou_surface": metric_mean(summary, "iou_surface@64"),
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


SWEEP_COLUMNS = (
    ("front_to_mesh", "front → mesh ↓"),
    ("mesh_front_to_front", "mesh front → front ↓"),
    ("front_within", "front within 0.02 ↑"),
    ("iou", "IoU (volume, 64³) ↑"),
    ("chamfer_l1", "Chamfer-L1 ↓"),
    ("f_score", "F-score@0.01 ↑"),
)
SWEEP_KEYS = ("lam_shape", "lam_ss")
SATURATION = 0.05  # saturated: within this share of the whole gain (unguided -> best) of the best value


def saturation(rows: list[dict[str, Any]], metric: str = "front_to_mesh") -> float | None:
    """The smallest lambda whose ``metric`` (lower is better) is within :data:`SATURATION` of the
    whole gain of the best one, ``m(λ) - m_best <= 0.05 (m_unguided - m_best)``, and stays there for
    every larger lambda: where the curve stops changing. None without a gain."""
    base = next((r.get(metric) for r in rows if r["lambda"] is None), None)
    guided = sorted(
        (r for r in rows if r["lambda"] is not None and r.get(metric) is not None), key=lambda r: r["lambda"]
    )
    if base is None or not guided:
        return None
    best = min(r[metric] for r in guided)
    if best >= base:
        return None
    tolerance = SATURATION * (base - best)
    for i, row in enumerate(guided):
        if all(r[metric] - best <= tolerance for r in guided[i:]):
            return row["lambda"]
    return None


def sweep_markdown(rows: list[dict[str, Any]], cases: int, key: str, saturated: float | None) -> str:
    lines = [
        f"# Front-partial guidance sweep ({key}), {cases} held-out assets",
        "",
        f"| {key} | " + " | ".join(label for _, label in SWEEP_COLUMNS) + " | meshes |",
        "|---|" + "---|" * (len(SWEEP_COLUMNS) + 1),
    ]
    for row in rows:
        cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else "–" for k, _ in SWEEP_COLUMNS]
        name = "unguided" if row["lambda"] is None else f"{row['lambda']:g}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['meshes']}/{cases} |")
    lines += [
        "",
        "front → mesh: mean distance from the input's visible surface (its point map's valid points) to the "
        "generated surface; mesh front → front: the reverse from the generated surface's samples on the "
        "camera's side of the grid centre; both in the generator's unit cube. IoU / Chamfer: `know3d eval "
        "shapes` against the assets' meshes (normalized).",
        "",
        f"Saturation (front → mesh within {SATURATION:.0%} of the whole gain of the best, for every larger "
        f"lambda): {'none' if saturated is None else f'{saturated:g}'}.",
    ]
    return "\n".join(lines) + "\n"


def _mesh_samples(glb: Path, uid: str, count: int = 50_000) -> np.ndarray:
    """Surface samples of a generated mesh in the generator's frame (glTF Y-up -> Z-up unit cube)."""
    import trimesh

    from know3d.evaluation.meshes import sample_surface, uid_rng
    from know3d.training.generator.occupancy import GLTF_TO_ZUP

    mesh = trimesh.load(glb, force="mesh", process=False)
    points, _ = sample_surface(mesh, count, uid_rng(uid, 0, "front-consistency"))
    return points @ GLTF_TO_ZUP.T


def run_guidance_sweep(
    generator: Path,
    shape_generator: Path,
    datasets: list[Path],
    output: Path,
    lambdas: list[float],
    heldout: int = 8,
    split: str = "val",
    key: str = "lam_shape",
    backview_lora: Path | None = None,
    guidance_overrides: list[str] | None = None,
    eval_overrides: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Generate the held-out shapes unguided and at every ``lambdas`` value of ``key`` (``lam_shape``
    or ``lam_ss``), score them, write ``guidance_sweep.md`` / ``.json`` and one MLflow run per
    setting under a parent. One case that fails (no depth, a bad point map) is recorded with its
    reason; the others go on."""
    from know3d.core.config import load_config
    from know3d.evaluation.config import EvalConfig
    from know3d.evaluation.geometry import front_consistency
    from know3d.pipeline.evaluate import evaluate_shapes
    from know3d.training.generator.front_guidance import (
        FrontGuidanceConfig,
        FrontGuidanceError,
        camera_view_dir,
        front_pointmap,
        read_front_view,
        valid_pixels,
    )
    from know3d.training.generator.generate import ShapeGenerator

    if key not in SWEEP_KEYS:
        raise ValueError(f"sweep key {key!r} not among {', '.join(SWEEP_KEYS)}")
    if not lambdas or any(not (v >= 0) for v in lambdas):
        raise ValueError(f"lambdas must be >= 0, got {lambdas}")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    trained: set[str] = set()  # held out = not trained on by either generator (pair keys <asset prefix>_...)
    for folder in (generator, shape_generator):
        meta = json.loads((Path(folder) / "know3d_generator.json").read_text()) if Path(folder).is_dir() else {}
        trained |= {key.split("_")[0] for key in meta.get("trained_on") or []}
    cases: list[dict[str, str]] = []
    for dataset in datasets:
        cases += heldout_cases(Path(dataset), output / "heldout", heldout, split, trained)
    base = load_config(None, ["source=depth", *(guidance_overrides or [])], model=FrontGuidanceConfig)
    # dual-grid meshes carry non-manifold edges even from true grids (benchmarks/RESULTS.md, issue 16)
    defaults = ["semantic.enabled=false", "mesh.allow_non_manifold=true"]
    eval_cfg = load_config(None, [*defaults, *(eval_overrides or [])], model=EvalConfig)
    chain = ShapeGenerator(generator, shape_generator, backview_lora, front_guidance=base)
    fronts: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for case in cases:  # the input's visible surface, the same for every setting
        try:
            if "depth" not in case:
                raise FrontGuidanceError("the shards carry no front depth and camera")
            view = read_front_view(case["image"], "depth", depth=case["depth"], camera=case["camera"])
            points, conf = front_pointmap(base, view.camera, depth=view.depth)
            fronts[case["uid"]] = (
                points[valid_pixels(points, conf, base.conf_threshold)],
                camera_view_dir(view.camera),
            )
        except FrontGuidanceError as exc:
            failures[case["uid"]] = str(exc)
    settings: list[float | None] = [None, *sorted(set(lambdas))]
    parent = make_tracker(eval_cfg.mlflow, stage="eval.guidance_sweep", output=output)
    rows: list[dict[str, Any]] = []
    try:
        parent.log_params({"key": key, "lambdas": ",".join(f"{v:g}" for v in settings[1:]), "heldout": len(cases)})
        for value in settings:
            name = "unguided" if value is None else f"{key}={value:g}"
            folder = output / name
            guidance = False if value is None else base.model_copy(update={key: value})
            consistency: list[dict[str, float]] = []
            errors: dict[str, str] = {}
            for case in cases:
                uid = case["uid"]
                if uid in failures:
                    errors[uid] = failures[uid]
                    continue
                front = {"depth": case["depth"], "camera": case["camera"]}
                try:
                    summary = chain.run(
                        Path(case["image"]), folder / "work" / uid, seed=seed, front=front, guidance=guidance
                    )
                except ValueError as exc:
                    errors[uid] = str(exc)
                    continue
                if not summary["mesh"]:
                    errors[uid] = summary["no_mesh_reason"]
                    continue
                (folder / "pred" / uid).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(summary["mesh"], folder / "pred" / uid / "000.glb")
                points, view_dir = fronts[uid]
                consistency.append(front_consistency(points, _mesh_samples(Path(summary["mesh"]), uid), view_dir))
            row: dict[str, Any] = {"lambda": value, "meshes": len(consistency), "errors": errors, "output": str(folder)}
            for metric, field in (
                ("front_to_mesh", "front_to_mesh"),
                ("mesh_front_to_front", "mesh_front_to_front"),
                ("front_within", "front_within@0.02"),
            ):
                values = [c[field] for c in consistency if np.isfinite(c[field])]
                row[metric] = float(np.mean(values)) if values else None
            if consistency:
                summary = evaluate_shapes(
                    eval_cfg,
                    folder / "pred",
                    output / "heldout" / "images",
                    output / "heldout" / "gt",
                    folder / "eval",
                    fresh=True,
                )
                errors.update({uid: f"eval: {reason}" for uid, reason in summary.failures})
                row.update(shape_means(summary))
            rows.append(row)
            tags = {"mlflow.parentRunId": parent.run_id or "", "know3d.setting": name}
            child = make_tracker(eval_cfg.mlflow, stage="eval.guidance_sweep.setting", output=folder, tags=tags)
            child.log_metrics({k: v for k, v in row.items() if k in dict(SWEEP_COLUMNS) and isinstance(v, float)})
            child.close()
        saturated = saturation(rows)
        table = sweep_markdown(rows, len(cases), key, saturated)
        atomic_write(output / "guidance_sweep.md", table)
        record = {
            "key": key,
            "heldout": cases,
            "rows": rows,
            "saturation": saturated,
            "guidance": base.model_dump(mode="json"),
        }
        atomic_write(output / "guidance_sweep.json", json.dumps(record, indent=1))
        if saturated is not None:
            parent.log_metrics({"saturation_lambda": saturated})
        parent.log_artifact(output / "guidance_sweep.md")
        parent.log_artifact(output / "guidance_sweep.json")
    finally:
        parent.close()
    return {"rows": rows, "saturation": saturated, "table": str(output / "guidance_sweep.md"), "cases": cases}
