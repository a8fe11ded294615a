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

This module only orchestrates: discovery, reuse, per-uid measuring, tables and the report are
in :mod:`know3d.evaluation` (usable without Ray). Here uids fan out over Ray tasks
(``ray.concurrency`` at a time); each shape task sends its point cloud to one scoring actor
that holds ULIP and Uni3D (on a GPU when ``semantic.num_gpus`` > 0); the finished evaluation
is logged to MLflow.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from know3d.core.fanout import make_progress, run_bounded
from know3d.core.lineage import model_tags
from know3d.core.runtime import ray_session
from know3d.core.tracking import Tracker, check_uri, make_tracker
from know3d.evaluation.backviews import crashed_backview, measure_backview, missing_backviews, resolve_lpips
from know3d.evaluation.config import EvalConfig
from know3d.evaluation.discovery import EvalError, discover, discover_backviews, unmatched_lines
from know3d.evaluation.protocol import check_semantic, scorer_spec, shape_skips
from know3d.evaluation.report import write_backviews_report, write_shapes_report
from know3d.evaluation.scoring import ScoringActor
from know3d.evaluation.shapes import ShapeJob, evaluate_shape
from know3d.evaluation.store import Plan, ResultStore, open_output, plan_backviews, plan_shapes, worker_error
from know3d.evaluation.summary import EvalSummary, finish

console = Console(stderr=True)


# --------------------------------------------------------------------------- Ray adapters


def _score_remote(actor: Any, points: np.ndarray, image: str) -> dict:
    """Scores of one uid from the scoring actor, asked from inside its shape task; a dead actor
    costs this uid its scores, never its geometry."""
    import ray

    try:
        return ray.get(actor.score.remote(points, image))
    except Exception as exc:  # noqa: BLE001 - e.g. the scoring actor died
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def _shape_task(job: dict, cfg_json: str, out_dir: str, actor: Any) -> dict:
    score = None if actor is None else functools.partial(_score_remote, actor)
    return evaluate_shape(ShapeJob(**job), EvalConfig.model_validate_json(cfg_json), Path(out_dir), score)


def _backview_task(job: dict, cfg_json: str) -> dict:
    return measure_backview(job, EvalConfig.model_validate_json(cfg_json))


def _start_scorer(ray: Any, cfg: EvalConfig) -> Any:
    """The scoring actor, with its models loaded before any mesh is measured (a load failure
    stops the run with one line instead of failing every uid)."""
    # the actor holds a CPU only where that cannot starve the measuring tasks
    actor_cpus = 1 if ray.cluster_resources().get("CPU", 0) >= 2 else 0
    actor = ray.remote(num_cpus=actor_cpus, num_gpus=cfg.semantic.num_gpus)(ScoringActor).remote(scorer_spec(cfg))
    try:
        info = ray.get(actor.info.remote())
    except Exception as exc:  # noqa: BLE001 - e.g. killed by the OOM killer while loading
        raise EvalError(
            f"the ULIP/Uni3D scoring actor died while loading the models ({type(exc).__name__}); out of "
            "memory? the full models need ~22 GB (use a GPU node: semantic.num_gpus=1)"
        ) from None
    if "error" in info:
        ray.kill(actor)
        raise EvalError(info["error"])
    return actor


def _fan_out(
    ray: Any,
    submit: Callable[[dict, Any], Any],
    plan: Plan,
    store: ResultStore,
    cfg: EvalConfig,
    label: str,
    crashed: Callable[[dict, BaseException], dict],
) -> tuple[list[dict], float]:
    """Run ``plan.todo`` with ``ray.concurrency`` calls in flight, storing each result as it
    lands (``crashed`` turns a dead worker into its uid's error); (all results, fan-out seconds)."""
    results = list(plan.reused)

    def finished(job: dict, result: dict | BaseException) -> None:
        result = crashed(job, result) if isinstance(result, BaseException) else result
        store.put(result, plan.keys[job["uid"]])
        results.append(result)

    start = time.perf_counter()
    with make_progress() as progress:
        run_bounded(ray, submit, plan.todo, list(range(cfg.ray.concurrency)), finished, progress, label)
    return results, time.perf_counter() - start


# --------------------------------------------------------------------------- runs


def _open_output(output: Path, cfg: EvalConfig, fresh: bool) -> ResultStore:
    """The run's result store; a bad tracking URI is refused first, before any work, not after."""
    if cfg.mlflow.enabled and cfg.mlflow.tracking_uri:
        try:
            check_uri(cfg.mlflow.tracking_uri)
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    return open_output(output, cfg, fresh)


def _announce(plan: Plan, unmatched: dict[str, list[str]]) -> None:
    if plan.reused:
        console.print(
            f"reusing {len(plan.reused)} results of an earlier run (same protocol and inputs; --fresh recomputes)"
        )
    for line in unmatched_lines(unmatched):
        console.print(line)


def evaluate_shapes(
    cfg: EvalConfig, pred: Path, images: Path | None, gt: Path | None, output: Path, fresh: bool = False
) -> EvalSummary:
    """Evaluate every predicted mesh; never stops on a bad mesh (it becomes an error entry)."""
    start, started_at = time.perf_counter(), time.time()
    check_semantic(cfg, images)
    found = discover(pred, images, gt)
    store = _open_output(output, cfg, fresh)
    plan = plan_shapes(found, cfg, store)
    _announce(plan, found.unmatched)
    cfg_json = cfg.model_dump_json()
    with ray_session(cfg.ray) as ray:
        actor = _start_scorer(ray, cfg) if cfg.semantic.enabled and plan.todo else None
        task = ray.remote(num_cpus=1)(_shape_task)
        submit = lambda job, _slot: task.remote(job, cfg_json, str(store.output), actor)
        results, seconds = _fan_out(ray, submit, plan, store, cfg, "measuring shapes", worker_error)
        if actor is not None:
            ray.kill(actor)
    summary = finish(
        "shapes",
        store,
        cfg,
        results,
        found.unmatched,
        shape_skips(cfg, gt),
        write_shapes_report,
        started=start,
        measure_seconds=seconds,
        reused=len(plan.reused),
    )
    _track(summary, cfg, {"pred": str(pred), "images": str(images), "gt": str(gt)}, started_at)
    return summary


def evaluate_backviews(
    cfg: EvalConfig, pred: Path, gt: Path, output: Path, images: Path | None = None, fresh: bool = False
) -> EvalSummary:
    """PSNR / SSIM / LPIPS of generated back views against the true ones (``<uid>/000.png``)."""
    start, started_at = time.perf_counter(), time.time()
    found = discover_backviews(pred, gt, images)
    cfg, skipped = resolve_lpips(cfg)  # first: the stored config and fingerprint say what really ran
    store = _open_output(output, cfg, fresh)
    plan = plan_backviews(found, store)
    _announce(plan, found.unmatched)
    cfg_json = cfg.model_dump_json()
    with ray_session(cfg.ray) as ray:
        task = ray.remote(num_cpus=1)(_backview_task)
        submit = lambda job, _slot: task.remote(job, cfg_json)
        results, seconds = _fan_out(ray, submit, plan, store, cfg, "comparing back views", crashed_backview)
    summary = finish(
        "backviews",
        store,
        cfg,
        results + missing_backviews(found),
        found.unmatched,
        skipped,
        write_backviews_report,
        started=start,
        measure_seconds=seconds,
        reused=len(plan.reused),
    )
    _track(summary, cfg, {"pred": str(pred), "gt": str(gt), "images": str(images)}, started_at)
    return summary


# --------------------------------------------------------------------------- MLflow


def _mlflow_metrics(summary: EvalSummary) -> dict[str, float]:
    """Finite metric means (MLflow names cannot hold '@') and the run's counts."""
    metrics = {
        f"{k.replace('@', '_at_')}_mean": v["mean"] for k, v in summary.table.items() if math.isfinite(v["mean"])
    }
    metrics.update(
        num_reused=summary.reused,
        num_uids=summary.total,
        num_ok=summary.ok,
        num_errors=summary.errors,
        num_missing=summary.missing,
        num_semantic_errors=len(summary.semantic_failures),
    )
    return metrics


#: the config sections each evaluation depends on (the others are not logged as its params)
_SECTIONS = {
    "shapes": {"seed", "model", "mesh", "points", "geometry", "semantic", "report"},
    "backviews": {"seed", "model", "images"},
}


def _log_run(tracker: Tracker, summary: EvalSummary, cfg: EvalConfig, params: dict) -> None:
    tracker.log_params({**cfg.model_dump(mode="json", include=_SECTIONS[summary.kind]), "run": params})
    tracker.log_metrics(_mlflow_metrics(summary))
    for name in ("summary.json", "metrics.csv", "metrics.md", "report.html", "config.yaml"):
        tracker.log_artifact(summary.output / name)
    tracker.log_artifact(summary.output / "results", "results")
    if (summary.output / "renders").is_dir():
        tracker.log_artifact(summary.output / "renders", "renders")


def _track(summary: EvalSummary, cfg: EvalConfig, params: dict, started_at: float) -> None:
    """Log the finished evaluation to MLflow (started at ``started_at``, so the run shows its real
    duration; tagged with the model it measured). It is already on disk, so a tracker failure is
    a warning, never an error."""
    try:
        tracker = make_tracker(
            cfg.mlflow,
            stage=f"eval.{summary.kind}",
            output=summary.output,
            tags=model_tags(cfg.model),
            start_time=started_at,
        )
    except Exception as exc:  # noqa: BLE001 - the evaluation itself is done and on disk
        console.print(f"[yellow]MLflow unavailable, results are only on disk: {escape(str(exc)[:300])}[/]")
        return
    summary.run_id = getattr(tracker, "run_id", None)
    summary.write()
    status = "FINISHED"
    try:
        _log_run(tracker, summary, cfg, params)
    except Exception as exc:  # noqa: BLE001 - as above: warn, keep the results
        status = "FAILED"
        console.print(f"[yellow]MLflow logging failed, results are only on disk: {escape(str(exc)[:300])}[/]")
    finally:
        tracker.close(status)
