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

import hashlib
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
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from know3d.core.fanout import run_bounded
from know3d.core.runtime import check_output, ray_session
from know3d.core.tracking import check_uri, make_tracker
from know3d.evaluation.config import EvalConfig
from know3d.evaluation.results import aggregate, flat_metrics, json_safe, uid_filename, write_tables
from know3d.pipeline.config import dump_config
from know3d.rendering.assets import MESH_EXTENSIONS

console = Console(stderr=True)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class EvalError(RuntimeError):
    """The evaluation as a whole cannot run (bad folders, nothing to evaluate)."""


# --------------------------------------------------------------------------- discovery


def _find_file(folder: Path, extensions: tuple[str, ...], stem: str = "000") -> Path | None:
    """``<folder>/000.<ext>`` for the first of ``extensions`` present (extension case ignored)."""
    by_ext = {}
    for path in folder.iterdir():
        if path.stem == stem and path.is_file():
            by_ext.setdefault(path.suffix.lower().lstrip("."), path)
    return next((by_ext[ext] for ext in extensions if ext in by_ext), None)


def scan(root: Path | None, extensions: tuple[str, ...], what: str) -> tuple[dict[str, Path], list[str]]:
    """(uid -> file for every ``<root>/<uid>/000.<ext>``, uid folders that have no usable file).

    A file that resolves outside ``root`` (a symlink out of it) is refused like a missing one."""
    if root is None:
        return {}, []
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{what} folder not found: {root}")
    real_root = root.resolve()
    found, unusable = {}, []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        path = _find_file(sub, extensions)
        if path is None or not path.resolve().is_relative_to(real_root):
            unusable.append(sub.name)
            continue
        found[sub.name] = path
    return found, unusable


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


def _unusable_key(role: str) -> str:
    return f"{role}_folder_without_usable_000_file"


def discover(pred: Path, images: Path | None, gt: Path | None) -> Discovery:
    preds, bad_preds = scan(pred, MESH_EXTENSIONS, "predictions")
    imgs, bad_imgs = scan(images, IMAGE_EXTENSIONS, "images")
    gts, bad_gts = scan(gt, MESH_EXTENSIONS, "ground-truth")
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.glb (or .obj/.ply/...) folders in {pred}")
    unmatched = {_unusable_key("prediction"): bad_preds}
    if images is not None:
        unmatched["prediction_without_image"] = sorted(set(preds) - set(imgs))
        unmatched["image_without_prediction"] = sorted(set(imgs) - set(preds))
        unmatched[_unusable_key("image")] = bad_imgs
    if gt is not None:
        unmatched["prediction_without_gt"] = sorted(set(preds) - set(gts))
        unmatched["gt_without_prediction"] = sorted(set(gts) - set(preds))
        unmatched[_unusable_key("gt")] = bad_gts
    return Discovery(preds, imgs, gts, unmatched)


def _report_unmatched(unmatched: dict[str, list[str]]) -> None:
    for kind, uids in unmatched.items():
        if uids:
            shown = ", ".join(escape(u) for u in uids[:5]) + (" ..." if len(uids) > 5 else "")
            console.print(f"[yellow]{kind.replace('_', ' ')}: {len(uids)} ({shown})[/]")


# --------------------------------------------------------------------------- Ray adapters


def _measure_task(job_json: dict, cfg_json: str, out_dir: str) -> tuple[dict, Any]:
    from know3d.evaluation.shapes import ShapeJob, measure_shape, process_renderer

    cfg = EvalConfig.model_validate_json(cfg_json)
    renderer = process_renderer(cfg.report.resolution, cfg.report.backend) if cfg.report.renders else None
    # one core per task (ray.concurrency tasks run side by side): single-threaded KD-tree queries
    return measure_shape(ShapeJob(**job_json), cfg, Path(out_dir) / "renders", renderer, threads=1)


class ScoringActor:
    """Holds the ULIP / Uni3D models; one call per uid."""

    def __init__(self, spec_json: dict) -> None:
        from know3d.evaluation.semantic import CheckpointError, ScorerSpec, SemanticScorer

        self.scorer, self.error = None, None
        try:
            self.scorer = SemanticScorer(ScorerSpec(**spec_json))
        except CheckpointError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while loading: one clear line
            self.error = f"cannot load the ULIP/Uni3D scorers: {type(exc).__name__}: {str(exc)[:300]}"

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
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
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
    measure_seconds: float = 0.0  # the parallel part: first task submitted -> last result in
    run_id: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason) of errors / missing
    reused: int = 0  # results taken over from an earlier run (same protocol and inputs)
    semantic_failures: list[tuple[str, str]] = field(default_factory=list)  # geometry ok, no scores

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
            "measure_seconds": round(self.measure_seconds, 2),
            "mlflow_run_id": self.run_id,
            "failures": [{"uid": u, "reason": r} for u, r in self.failures],
            "reused": self.reused,
            "semantic_failures": [{"uid": u, "reason": r} for u, r in self.semantic_failures],
        }


def protocol_fingerprint(cfg: EvalConfig) -> str:
    """Hash of every setting that changes a uid's result (not Ray, MLflow or the report size)."""
    data = cfg.model_dump(mode="json", exclude={"ray": True, "mlflow": True, "report": {"max_rows"}})
    # a checkpoint replaced at the same path changes the scores too
    files = [cfg.semantic.ulip.checkpoint, cfg.semantic.uni3d.checkpoint, cfg.semantic.uni3d.clip_checkpoint]
    if cfg.images.lpips:
        from know3d.evaluation.images import default_alexnet_path

        files.append(cfg.images.lpips_backbone or str(default_alexnet_path()))
    data["files"] = [inputs_key(f) if f and Path(f).is_file() else None for f in files]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def inputs_key(*paths: str | None) -> str:
    """Identity of a uid's input files: path, size and modification time of each."""
    parts = []
    for p in paths:
        if p is None:
            parts.append(None)
        else:
            st = Path(p).stat()
            parts.append([str(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


class ResultStore:
    """``<output>/results/<uid>.json``, written as each uid finishes (atomic), so an interrupted
    evaluation resumes: a stored result is reused when the protocol fingerprint and its input
    files are unchanged (errors caused by a crashed worker or the scorer are retried)."""

    RETRY_STAGES = ("worker", "semantic")

    def __init__(self, output: Path, cfg: EvalConfig, fresh: bool) -> None:
        self.dir = Path(output) / "results"
        self.fingerprint = protocol_fingerprint(cfg)
        if fresh:
            for sub in ("results", "renders"):
                if (Path(output) / sub).exists():
                    shutil.rmtree(Path(output) / sub)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, uid: str) -> Path:
        return self.dir / f"{uid_filename(uid)}.json"

    def reusable(self, uid: str, key: str) -> dict | None:
        path = self.path(uid)
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
        except ValueError:
            return None
        if result.get("fingerprint") != self.fingerprint or result.get("inputs_key") != key:
            return None
        if result.get("uid") != uid or result.get("status") not in ("ok", "error"):
            return None
        if result.get("stage") in self.RETRY_STAGES or result.get("semantic_error"):
            return None
        return result

    def put(self, result: dict, key: str) -> None:
        result["fingerprint"], result["inputs_key"] = self.fingerprint, key
        result["metrics"] = flat_metrics(result)
        try:
            _write_json(self.path(result["uid"]), result)
        except OSError as exc:  # e.g. a full disk: the run goes on, this uid is not resumable
            console.print(f"[yellow]cannot write the result of {escape(result['uid'])}: {escape(str(exc))}[/]")

    def prune(self, uids: set[str]) -> None:
        """Remove results of uids that are no longer part of the evaluation."""
        keep = {uid_filename(u) for u in uids}
        for path in self.dir.glob("*.json"):
            if path.stem not in keep:
                path.unlink()


def _prepare_output(output: Path, cfg: EvalConfig, fresh: bool) -> tuple[Path, ResultStore]:
    if cfg.mlflow.enabled and cfg.mlflow.tracking_uri:
        try:
            check_uri(cfg.mlflow.tracking_uri)  # refused before any work, not after
        except ValueError as exc:
            raise EvalError(str(exc)) from None
    output = check_output(str(output))
    store = ResultStore(output, cfg, fresh)
    (output / "config.yaml").write_text(dump_config(cfg))
    return output, store


def _finish(
    kind: str,
    output: Path,
    cfg: EvalConfig,
    results: list[dict],
    unmatched: dict,
    skipped: dict,
    params: dict,
    start: float,
    report_fn: Any,
    store: ResultStore,
    reused: int,
    measure_seconds: float,
) -> EvalSummary:
    results.sort(key=lambda r: r["uid"])
    for r in results:
        if "fingerprint" not in r:  # missing uids: recorded, never reused
            store.put(r, "")
    store.prune({r["uid"] for r in results})
    table = aggregate(results)
    write_tables(output, results, table)
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "error", "missing")}
    summary = EvalSummary(
        kind,
        output,
        len(results),
        counts["ok"],
        counts["error"],
        counts["missing"],
        table,
        unmatched,
        skipped,
        seconds=time.perf_counter() - start,
        measure_seconds=measure_seconds,
        failures=[(r["uid"], r.get("error", "")) for r in results if r["status"] != "ok"],
        reused=reused,
        semantic_failures=[(r["uid"], r["semantic_error"]) for r in results if r.get("semantic_error")],
    )
    report_fn(output, results, summary, cfg)
    _write_json(output / "summary.json", summary.to_json())  # before MLflow: a tracker failure loses nothing
    try:
        tracker = make_tracker(cfg.mlflow, cfg.mlflow.run_name or f"eval-{kind}", {"stage": f"eval.{kind}"})
    except Exception as exc:  # noqa: BLE001 - the evaluation itself is done and on disk
        console.print(f"[yellow]MLflow unavailable, results are only on disk: {escape(str(exc)[:300])}[/]")
        return summary
    summary.run_id = getattr(tracker, "run_id", None)
    _write_json(output / "summary.json", summary.to_json())
    status = "FINISHED"
    try:
        tracker.log_params({**params, **cfg.model_dump(mode="json")})
        metrics = {f"{_mlflow_safe(k)}_mean": v["mean"] for k, v in table.items() if math.isfinite(v["mean"])}
        metrics.update(
            {
                "num_reused": summary.reused,
                "num_uids": summary.total,
                "num_ok": summary.ok,
                "num_errors": summary.errors,
                "num_missing": summary.missing,
                "num_semantic_errors": len(summary.semantic_failures),
            }
        )
        tracker.log_metrics(metrics)
        for name in ("summary.json", "metrics.csv", "metrics.md", "report.html", "config.yaml"):
            tracker.log_artifact(output / name)
        tracker.log_artifact(output / "results", "results")
        if (output / "renders").is_dir():
            tracker.log_artifact(output / "renders", "renders")
    except Exception as exc:  # noqa: BLE001 - as above: warn, keep the results
        status = "FAILED"
        console.print(f"[yellow]MLflow logging failed, results are only on disk: {escape(str(exc)[:300])}[/]")
    finally:
        tracker.close(status)
    return summary


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def evaluate_shapes(
    cfg: EvalConfig, pred: Path, images: Path | None, gt: Path | None, output: Path, fresh: bool = False
) -> EvalSummary:
    """Evaluate every predicted mesh; never stops on a bad mesh (it becomes an error entry)."""
    from know3d.evaluation.report import write_shapes_report

    start = time.perf_counter()
    if cfg.semantic.enabled and images is None:
        raise EvalError("the ULIP/Uni3D scores need --images (or pass --no-semantic)")
    if cfg.semantic.enabled:
        from know3d.evaluation.semantic import CheckpointError, ScorerSpec

        if not (cfg.semantic.ulip.enabled or cfg.semantic.uni3d.enabled):
            raise EvalError("semantic.enabled is true but both ulip and uni3d are disabled (pass --no-semantic)")
        try:
            ScorerSpec(**scorer_spec(cfg)).check()
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
    found = discover(pred, images, gt)
    output, store = _prepare_output(output, cfg, fresh)
    results: list[dict] = []
    jobs, keys = [], {}
    for uid in found.uids:
        p, i, g = found.preds.get(uid), found.images.get(uid), found.gts.get(uid)
        job = {
            "uid": uid,
            "pred": str(p.resolve()) if p else None,
            "gt": str(g.resolve()) if g else None,
            "image": str(i.resolve()) if i else None,
        }
        keys[uid] = inputs_key(job["pred"], job["gt"], job["image"] if cfg.semantic.enabled else None)
        previous = store.reusable(uid, keys[uid])
        if previous is not None:
            previous.update(prediction=job["pred"], ground_truth=job["gt"], image=job["image"])
            results.append(previous)
        else:
            jobs.append(job)
    reused = len(results)
    if reused:
        console.print(f"reusing {reused} results of an earlier run (same protocol and inputs; --fresh recomputes)")
    _report_unmatched(found.unmatched)

    skipped: dict[str, str] = {}
    cfg_json = cfg.model_dump_json()

    def finished(result: dict) -> None:
        store.put(result, keys[result["uid"]])
        results.append(result)

    with ray_session(cfg) as ray, _progress() as progress:
        measure = ray.remote(num_cpus=1)(_measure_task)
        actor = None
        if cfg.semantic.enabled and jobs:
            # the actor holds a CPU only where that cannot starve the measuring tasks
            actor_cpus = 1 if ray.cluster_resources().get("CPU", 0) >= 2 else 0
            actor = ray.remote(num_cpus=actor_cpus, num_gpus=cfg.semantic.num_gpus)(ScoringActor).remote(
                scorer_spec(cfg)
            )
            try:
                info = ray.get(actor.info.remote())
            except Exception as exc:  # noqa: BLE001 - e.g. killed by the OOM killer while loading
                raise EvalError(
                    f"the ULIP/Uni3D scoring actor died while loading the models "
                    f"({type(exc).__name__}); out of memory? the full models need ~22 GB "
                    "(use a GPU node: semantic.num_gpus=1)"
                ) from None
            if "error" in info:
                ray.kill(actor)
                raise EvalError(info["error"])
            for name in ("ulip", "uni3d"):
                if name not in info["metrics"]:
                    skipped[name] = f"disabled (semantic.{name}.enabled=false)"
        task = progress.add_task("measuring shapes", total=len(jobs))
        measure_start = time.perf_counter()
        queue = list(reversed(jobs))
        # ref -> ("measure", job) | ("score", result): measuring and scoring overlap
        pending: dict[Any, tuple[str, dict]] = {}
        while queue or pending:
            # at most `concurrency` meshes in flight, and a bounded backlog of point clouds waiting
            # for the scoring actor (they sit in the object store until scored)
            while (
                queue
                and sum(v[0] == "measure" for v in pending.values()) < cfg.ray.concurrency
                and sum(v[0] == "score" for v in pending.values()) < 2 * cfg.ray.concurrency
            ):
                job = queue.pop()
                pending[measure.remote(job, cfg_json, str(output))] = ("measure", job)
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            what, item = pending.pop(ref)
            if what == "measure":
                try:
                    result, points = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails this uid only
                    result = {
                        **item,
                        "status": "error",
                        "stage": "worker",
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
                    points = None
                if actor is not None and points is not None and result["status"] == "ok":
                    pending[actor.score.remote(points, result["image"])] = ("score", result)
                else:
                    finished(result)
                progress.advance(task)
            else:
                result = item
                try:
                    reply = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - e.g. the scoring actor died
                    reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                if "error" in reply:  # e.g. an unreadable condition image: the geometry stands
                    result["semantic_error"] = reply["error"]
                else:
                    result["semantic"] = reply["scores"]
                finished(result)
        measure_seconds = time.perf_counter() - measure_start
        if actor is not None:
            ray.kill(actor)
    params = {"pred": str(pred), "images": str(images), "gt": str(gt)}
    if not cfg.semantic.enabled:
        skipped["semantic"] = "disabled (--no-semantic)"
    if gt is None:
        skipped["geometry"] = "no --gt given"
    return _finish(
        "shapes",
        output,
        cfg,
        results,
        found.unmatched,
        skipped,
        params,
        start,
        write_shapes_report,
        store,
        reused,
        measure_seconds,
    )


# --------------------------------------------------------------------------- back views


def _backview_task(uid: str, pred: str, gt: str, cfg_json: str, front: str | None = None) -> dict:
    """Metrics of one generated back view; with the front view (``--images``) also the
    front-as-prediction baseline (``baseline_front_psnr``/``_ssim``): what a model that
    learned nothing about backs, and returned its input, would score."""
    from know3d.evaluation.images import ImageError, compare_images, load_rgb

    cfg = EvalConfig.model_validate_json(cfg_json)
    result: dict = {"uid": uid, "prediction": pred, "ground_truth": gt}
    stage = "decode"
    try:
        p = load_rgb(Path(pred), cfg.images.background, cfg.images.max_pixels)
        g = load_rgb(Path(gt), cfg.images.background, cfg.images.max_pixels)
        f = load_rgb(Path(front), cfg.images.background, cfg.images.max_pixels) if front else None
        stage = "metrics"
        result["backview"] = compare_images(p, g, _lpips_for(cfg))
        if f is not None:
            baseline = compare_images(f, g)
            result["backview"].update(baseline_front_psnr=baseline["psnr"], baseline_front_ssim=baseline["ssim"])
        result["status"] = "ok"
    except ImageError as exc:
        result.update(status="error", stage=stage, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - this uid's failure, with its reason
        result.update(status="error", stage=stage, error=f"{type(exc).__name__}: {exc}"[:500])
    return result


_LPIPS: dict[str, Any] = {}


def _lpips_for(cfg: EvalConfig) -> Any:
    if not cfg.images.lpips:
        return None
    key = cfg.images.lpips_backbone or ""
    if key not in _LPIPS:
        from know3d.evaluation.images import Lpips

        _LPIPS[key] = Lpips(Path(cfg.images.lpips_backbone) if cfg.images.lpips_backbone else None)
    return _LPIPS[key]


def evaluate_backviews(
    cfg: EvalConfig, pred: Path, gt: Path, output: Path, images: Path | None = None, fresh: bool = False
) -> EvalSummary:
    """PSNR / SSIM / LPIPS of generated back views against the true ones (``<uid>/000.png``)."""
    from know3d.evaluation.images import Lpips
    from know3d.evaluation.report import write_backviews_report

    start = time.perf_counter()
    preds, bad_preds = scan(pred, IMAGE_EXTENSIONS, "predictions")
    gts, bad_gts = scan(gt, IMAGE_EXTENSIONS, "ground-truth")
    conds, _ = scan(images, IMAGE_EXTENSIONS, "images")
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.png folders in {pred}")
    unmatched = {
        "prediction_without_gt": sorted(set(preds) - set(gts)),
        "gt_without_prediction": sorted(set(gts) - set(preds)),
        _unusable_key("prediction"): bad_preds,
        _unusable_key("gt"): bad_gts,
    }
    _report_unmatched(unmatched)
    skipped = {}
    if cfg.images.lpips:  # resolved first: the stored config and fingerprint say what really ran
        status = Lpips(Path(cfg.images.lpips_backbone) if cfg.images.lpips_backbone else None).status
        if not status.available:
            skipped["lpips"] = status.reason
            cfg = cfg.model_copy(update={"images": cfg.images.model_copy(update={"lpips": False})})
    else:
        skipped["lpips"] = "disabled (images.lpips=false)"
    output, store = _prepare_output(output, cfg, fresh)
    results: list[dict] = []
    keys = {
        uid: inputs_key(str(preds[uid]), str(gts[uid]), str(conds[uid]) if uid in conds else None)
        for uid in sorted(set(preds) & set(gts))
    }
    queue = []
    for uid in sorted(keys):
        previous = store.reusable(uid, keys[uid])
        if previous is not None:
            previous.update(prediction=str(preds[uid]), ground_truth=str(gts[uid]))
            previous.pop("condition", None)
            if uid in conds:
                previous["condition"] = str(conds[uid])
            results.append(previous)
        else:
            queue.append(uid)
    reused = len(results)
    cfg_json = cfg.model_dump_json()

    def finished(uid: str, result: dict | BaseException) -> None:
        if isinstance(result, BaseException):  # a crashed worker fails this uid only
            result = {
                "uid": uid,
                "status": "error",
                "stage": "worker",
                "error": f"{type(result).__name__}: {result}"[:500],
            }
        if uid in conds:
            result["condition"] = str(conds[uid])
        store.put(result, keys[uid])
        results.append(result)

    with ray_session(cfg) as ray, _progress() as progress:
        task = ray.remote(num_cpus=1)(_backview_task)
        measure_start = time.perf_counter()
        run_bounded(
            ray,
            lambda uid, _slot: task.remote(
                uid, str(preds[uid]), str(gts[uid]), cfg_json, str(conds[uid]) if uid in conds else None
            ),
            queue,
            list(range(cfg.ray.concurrency)),
            finished,
            progress,
            "comparing back views",
        )
        measure_seconds = time.perf_counter() - measure_start
    for uid in unmatched["prediction_without_gt"]:
        results.append(
            {"uid": uid, "prediction": str(preds[uid]), "status": "missing", "error": "no ground-truth image"}
        )
    for uid in unmatched["gt_without_prediction"]:
        results.append({"uid": uid, "ground_truth": str(gts[uid]), "status": "missing", "error": "no prediction"})
    params = {"pred": str(pred), "gt": str(gt), "images": str(images)}
    return _finish(
        "backviews",
        output,
        cfg,
        results,
        unmatched,
        skipped,
        params,
        start,
        write_backviews_report,
        store,
        reused,
        measure_seconds,
    )
