"""`know3d eval shapes` / `know3d eval backviews`: HY3D-Bench-style evaluation on Ray.

Inputs follow HY3D-Bench's layout::

    <pred>/<uid>/000.glb      a method's generated meshes (000.obj/.ply/... also accepted)
    <images>/<uid>/000.png    the condition images
    <gt>/<uid>/000.glb        ground-truth meshes (optional: geometry metrics need them)

Output folder::

    <output>/
        results/<uid>.json      every metric of one uid, or its error
        summary.json            counts, means, unmatched uids, skipped metrics (with reasons)
        metrics.csv             one row per uid
        metrics.md              the aggregate table (mean, std, count per metric)
        report.html             side-by-side renders and the tables
        renders/                normal-shaded front/back views of predictions and GT
        config.yaml             the resolved evaluation config

Shapes are measured by Ray tasks (``ray.concurrency`` at a time); their point clouds stream to
one scoring actor that holds ULIP and Uni3D (on a GPU when ``semantic.num_gpus`` > 0).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.build import ray_session
from pipeline.config import EvalConfig, dump_config
from evaluation.results import aggregate, write_tables
from pipeline.tracking import make_tracker
from rendering.assets import MESH_EXTENSIONS

console = Console(stderr=True)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class EvalError(RuntimeError):
    """The evaluation as a whole cannot run (bad folders, nothing to evaluate)."""


# --------------------------------------------------------------------------- discovery


def _find_file(folder: Path, extensions: tuple[str, ...], stem: str = "000") -> Path | None:
    for ext in extensions:
        candidate = folder / f"{stem}.{ext}"
        if candidate.is_file():
            return candidate
    return None


def scan(root: Path | None, extensions: tuple[str, ...], what: str) -> dict[str, Path]:
    """uid -> file for every ``<root>/<uid>/000.<ext>``; symlinks that leave ``root`` are refused."""
    if root is None:
        return {}
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{what} folder not found: {root}")
    real_root = root.resolve()
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        path = _find_file(sub, extensions)
        if path is None:
            continue
        if not path.resolve().is_relative_to(real_root):
            console.print(f"[yellow]skipping {path}: resolves outside {root}[/]")
            continue
        found[sub.name] = path
    return found


@dataclass
class Discovery:
    preds: dict[str, Path]
    images: dict[str, Path]
    gts: dict[str, Path]
    unmatched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def uids(self) -> list[str]:
        keys = set(self.preds) | (set(self.images) if self.images else set())
        return sorted(keys)


def discover(pred: Path, images: Path | None, gt: Path | None) -> Discovery:
    preds = scan(pred, MESH_EXTENSIONS, "predictions")
    imgs = scan(images, IMAGE_EXTENSIONS, "images")
    gts = scan(gt, MESH_EXTENSIONS, "ground-truth")
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.glb (or .obj/.ply/...) folders in {pred}")
    unmatched = {}
    if images is not None:
        unmatched["prediction_without_image"] = sorted(set(preds) - set(imgs))
        unmatched["image_without_prediction"] = sorted(set(imgs) - set(preds))
    if gt is not None:
        unmatched["prediction_without_gt"] = sorted(set(preds) - set(gts))
        unmatched["gt_without_prediction"] = sorted(set(gts) - set(preds))
    return Discovery(preds, imgs, gts, unmatched)


# --------------------------------------------------------------------------- Ray adapters


def _measure_task(job_json: dict, cfg_json: str, out_dir: str) -> tuple[dict, Any]:
    from evaluation.shapes import ShapeJob, measure_shape

    cfg = EvalConfig.model_validate_json(cfg_json)
    return measure_shape(ShapeJob(**job_json), cfg, Path(out_dir) / "renders")


class ScoringActor:
    """Holds the ULIP / Uni3D models; one call per uid."""

    def __init__(self, spec_json: dict) -> None:
        from evaluation.semantic import CheckpointError, ScorerSpec, SemanticScorer

        self.scorer, self.error = None, None
        try:
            self.scorer = SemanticScorer(ScorerSpec(**spec_json))
        except CheckpointError as exc:
            self.error = str(exc)

    def info(self) -> dict:
        if self.scorer is None:
            return {"error": self.error}
        return {"metrics": self.scorer.metrics, "device": self.scorer.device}

    def score(self, points: np.ndarray, image: str) -> dict:
        try:
            return {"scores": self.scorer.score(points, Path(image))}
        except Exception as exc:  # noqa: BLE001 - reported for this uid only
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def scorer_spec(cfg: EvalConfig) -> dict:
    s = cfg.semantic
    return {
        "ulip_checkpoint": s.ulip.checkpoint,
        "uni3d_checkpoint": s.uni3d.checkpoint,
        "clip_checkpoint": s.uni3d.clip_checkpoint,
        "ulip": s.ulip.enabled,
        "uni3d": s.uni3d.enabled,
        "arch": s.arch,
        "uni3d_batchnorm": s.uni3d.batchnorm,
        "device": s.device,
        "max_pixels": cfg.images.max_pixels,
    }


# --------------------------------------------------------------------------- aggregation


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)


def _mlflow_safe(name: str) -> str:
    return name.replace("@", "_at_")


# --------------------------------------------------------------------------- runs


@dataclass
class EvalSummary:
    kind: str
    output: Path
    total: int
    ok: int
    errors: int
    missing: int
    table: dict
    unmatched: dict
    skipped: dict
    seconds: float
    run_id: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason) of errors / missing

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "total": self.total,
            "ok": self.ok,
            "errors": self.errors,
            "missing": self.missing,
            "metrics": self.table,
            "unmatched": self.unmatched,
            "skipped_metrics": self.skipped,
            "seconds": round(self.seconds, 2),
            "mlflow_run_id": self.run_id,
            "failures": [{"uid": u, "reason": r} for u, r in self.failures],
        }


def _prepare_output(output: Path, cfg: EvalConfig) -> Path:
    output = Path(output)
    for stale in ("results", "renders"):
        if (output / stale).exists():
            shutil.rmtree(output / stale)
    (output / "results").mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(dump_config(cfg))
    return output


def _finish(kind: str, output: Path, cfg: EvalConfig, results: list[dict], unmatched: dict, skipped: dict,
            params: dict, start: float, report_fn: Any) -> EvalSummary:
    results.sort(key=lambda r: r["uid"])
    for r in results:
        _write_json(output / "results" / f"{r['uid']}.json", r)
    table = aggregate(results)
    write_tables(output, results, table)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "error", "missing")}
    summary = EvalSummary(kind, output, len(results), counts["ok"], counts["error"], counts["missing"], table,
                          unmatched, skipped, time.perf_counter() - start)
    summary.failures = [(r["uid"], r.get("error", "")) for r in results if r["status"] != "ok"]
    report_fn(output, results, summary, cfg)
    tracker = make_tracker(cfg.mlflow, cfg.mlflow.run_name or f"eval-{kind}", {"stage": f"eval.{kind}"})
    summary.run_id = getattr(tracker, "run_id", None)
    status = "FINISHED"
    try:
        tracker.log_params({**params, **cfg.model_dump(mode="json")})
        metrics = {f"{_mlflow_safe(k)}_mean": v["mean"] for k, v in table.items() if math.isfinite(v["mean"])}
        metrics.update({"num_uids": summary.total, "num_ok": summary.ok, "num_errors": summary.errors, "num_missing": summary.missing})
        tracker.log_metrics(metrics)
        _write_json(output / "summary.json", summary.to_json())
        for name in ("summary.json", "metrics.csv", "metrics.md", "report.html", "config.yaml"):
            tracker.log_artifact(output / name)
        tracker.log_artifact(output / "results", "results")
        if (output / "renders").is_dir():
            tracker.log_artifact(output / "renders", "renders")
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.close(status)
    return summary


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


def evaluate_shapes(cfg: EvalConfig, pred: Path, images: Path | None, gt: Path | None, output: Path) -> EvalSummary:
    """Evaluate every predicted mesh; never stops on a bad mesh (it becomes an error entry)."""
    from evaluation.report import write_shapes_report

    start = time.perf_counter()
    if cfg.semantic.enabled and images is None:
        raise EvalError("the ULIP/Uni3D scores need --images (or pass --no-semantic)")
    if cfg.semantic.enabled:
        from evaluation.semantic import CheckpointError, ScorerSpec

        if not (cfg.semantic.ulip.enabled or cfg.semantic.uni3d.enabled):
            raise EvalError("semantic.enabled is true but both ulip and uni3d are disabled (pass --no-semantic)")
        try:
            ScorerSpec(**scorer_spec(cfg)).check()
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
    found = discover(pred, images, gt)
    output = _prepare_output(output, cfg)
    jobs = []
    for uid in found.uids:
        p, i, g = found.preds.get(uid), found.images.get(uid), found.gts.get(uid)
        jobs.append({"uid": uid, "pred": str(p.resolve()) if p else None, "gt": str(g.resolve()) if g else None,
                     "image": str(i.resolve()) if i else None})
    for kind, uids in found.unmatched.items():
        if uids:
            console.print(f"[yellow]{kind.replace('_', ' ')}: {len(uids)} ({', '.join(uids[:5])}{' ...' if len(uids) > 5 else ''})[/]")

    results: list[dict] = []
    skipped: dict[str, str] = {}
    cfg_json = cfg.model_dump_json()
    with ray_session(cfg) as ray, _progress() as progress:
        measure = ray.remote(num_cpus=1)(_measure_task)
        actor = None
        if cfg.semantic.enabled:
            actor = ray.remote(num_cpus=1, num_gpus=cfg.semantic.num_gpus)(ScoringActor).remote(scorer_spec(cfg))
            info = ray.get(actor.info.remote())
            if "error" in info:
                ray.kill(actor)
                raise EvalError(info["error"])
            for name in ("ulip", "uni3d"):
                if name not in info["metrics"]:
                    skipped[name] = f"disabled (semantic.{name}.enabled=false)"
        task = progress.add_task("measuring shapes", total=len(jobs))
        queue = list(reversed(jobs))
        # ref -> ("measure", job) | ("score", result): measuring and scoring overlap
        pending: dict[Any, tuple[str, dict]] = {}
        while queue or pending:
            while queue and sum(v[0] == "measure" for v in pending.values()) < cfg.ray.concurrency:
                job = queue.pop()
                pending[measure.remote(job, cfg_json, str(output))] = ("measure", job)
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            what, item = pending.pop(ref)
            if what == "measure":
                try:
                    result, points = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails this uid only
                    result = {**item, "status": "error", "stage": "worker", "error": f"{type(exc).__name__}: {exc}"[:500]}
                    points = None
                if actor is not None and points is not None and result["status"] == "ok":
                    pending[actor.score.remote(points, result["image"])] = ("score", result)
                else:
                    results.append(result)
                progress.advance(task)
            else:
                result = item
                try:
                    reply = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - e.g. the scoring actor died
                    reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                if "error" in reply:
                    result.update(status="error", stage="semantic", error=reply["error"])
                else:
                    result["semantic"] = reply["scores"]
                results.append(result)
        if actor is not None:
            ray.kill(actor)
    params = {"pred": str(pred), "images": str(images), "gt": str(gt)}
    if not cfg.semantic.enabled:
        skipped["semantic"] = "disabled (--no-semantic)"
    if gt is None:
        skipped["geometry"] = "no --gt given"
    return _finish("shapes", output, cfg, results, found.unmatched, skipped, params, start, write_shapes_report)


# --------------------------------------------------------------------------- back views


def _backview_task(uid: str, pred: str, gt: str, cfg_json: str) -> dict:
    from evaluation.images import ImageError, compare_images, load_rgb

    cfg = EvalConfig.model_validate_json(cfg_json)
    result: dict = {"uid": uid, "prediction": pred, "ground_truth": gt}
    try:
        p = load_rgb(Path(pred), cfg.images.background, cfg.images.max_pixels)
        g = load_rgb(Path(gt), cfg.images.background, cfg.images.max_pixels)
        result["backview"] = compare_images(p, g, _lpips_for(cfg))
        result["status"] = "ok"
    except ImageError as exc:
        result.update(status="error", error=str(exc))
    return result


_LPIPS: dict[str, Any] = {}


def _lpips_for(cfg: EvalConfig) -> Any:
    if not cfg.images.lpips:
        return None
    key = cfg.images.lpips_backbone or ""
    if key not in _LPIPS:
        from evaluation.images import Lpips

        _LPIPS[key] = Lpips(Path(cfg.images.lpips_backbone) if cfg.images.lpips_backbone else None)
    return _LPIPS[key]


def evaluate_backviews(cfg: EvalConfig, pred: Path, gt: Path, output: Path, images: Path | None = None) -> EvalSummary:
    """PSNR / SSIM / LPIPS of generated back views against the true ones (``<uid>/000.png``)."""
    from evaluation.images import Lpips
    from evaluation.report import write_backviews_report

    start = time.perf_counter()
    preds = scan(pred, IMAGE_EXTENSIONS, "predictions")
    gts = scan(gt, IMAGE_EXTENSIONS, "ground-truth")
    conds = scan(images, IMAGE_EXTENSIONS, "images") if images else {}
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.png folders in {pred}")
    unmatched = {
        "prediction_without_gt": sorted(set(preds) - set(gts)),
        "gt_without_prediction": sorted(set(gts) - set(preds)),
    }
    for kind, uids in unmatched.items():
        if uids:
            console.print(f"[yellow]{kind.replace('_', ' ')}: {len(uids)} ({', '.join(uids[:5])})[/]")
    output = _prepare_output(output, cfg)
    skipped = {}
    if cfg.images.lpips:
        status = Lpips(Path(cfg.images.lpips_backbone) if cfg.images.lpips_backbone else None).status
        if not status.available:
            skipped["lpips"] = status.reason
            cfg = cfg.model_copy(update={"images": cfg.images.model_copy(update={"lpips": False})})
    else:
        skipped["lpips"] = "disabled (images.lpips=false)"
    results = []
    cfg_json = cfg.model_dump_json()
    with ray_session(cfg) as ray, _progress() as progress:
        task = ray.remote(num_cpus=1)(_backview_task)
        bar = progress.add_task("comparing back views", total=len(preds))
        common = sorted(set(preds) & set(gts))
        queue = list(reversed(common))
        pending: dict[Any, str] = {}
        while queue or pending:
            while queue and len(pending) < cfg.ray.concurrency:
                uid = queue.pop()
                pending[task.remote(uid, str(preds[uid]), str(gts[uid]), cfg_json)] = uid
            done, _ = ray.wait(list(pending), num_returns=1)
            uid = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001
                result = {"uid": uid, "status": "error", "error": str(exc)[:500]}
            if uid in conds:
                result["condition"] = str(conds[uid])
            results.append(result)
            progress.advance(bar)
    for uid in unmatched["prediction_without_gt"]:
        results.append({"uid": uid, "prediction": str(preds[uid]), "status": "missing", "error": "no ground-truth image"})
    for uid in unmatched["gt_without_prediction"]:
        results.append({"uid": uid, "ground_truth": str(gts[uid]), "status": "missing", "error": "no prediction"})
    params = {"pred": str(pred), "gt": str(gt), "images": str(images)}
    return _finish("backviews", output, cfg, results, unmatched, skipped, params, start, write_backviews_report)
