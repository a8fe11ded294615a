"""Per-uid back-view evaluation (PSNR / SSIM / LPIPS) and the LPIPS choice, runnable in any worker.

LPIPS needs local AlexNet weights; without them it is *skipped* with the reason, and the
config is rewritten to say so before anything is stored, so the saved config and the protocol
fingerprint describe what really ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from know3d.evaluation.config import EvalConfig
from know3d.evaluation.discovery import Discovery
from know3d.evaluation.store import worker_error

_LPIPS: dict[str, Any] = {}
#: the eval config key that turns LPIPS off (named in the skip reason)
LPIPS_KEY = "images.lpips"


def lpips_model(cfg: EvalConfig) -> Any:
    """The LPIPS model of ``cfg`` (None when disabled), loaded once per process and backbone."""
    if not cfg.images.lpips:
        return None
    key = cfg.images.lpips_backbone or ""
    if key not in _LPIPS:
        from know3d.evaluation.images import Lpips

        _LPIPS[key] = Lpips(Path(key) if key else None)
    return _LPIPS[key]


def resolve_lpips(cfg: EvalConfig) -> tuple[EvalConfig, dict[str, str]]:
    """(``cfg`` with ``images.lpips`` off when its weights are unusable, skipped metric -> why)."""
    if not cfg.images.lpips:
        return cfg, {"lpips": f"disabled ({LPIPS_KEY}=false)"}
    status = lpips_model(cfg).status
    if status.available:
        return cfg, {}
    return cfg.model_copy(update={"images": cfg.images.model_copy(update={"lpips": False})}), {"lpips": status.reason}


def _with_front(result: dict, job: dict) -> dict:
    """``result`` naming the job's front view (``condition``, shown in the report) when it has one."""
    if job["front"]:
        result["condition"] = job["front"]
    return result


def measure_backview(job: dict, cfg: EvalConfig) -> dict:
    """Metrics of one generated back view (``job``: ``{uid, pred, gt, front}``); with the front
    view (``--images``) also the front-as-prediction baseline (``baseline_front_psnr``/``_ssim``):
    what a model that learned nothing about backs, and returned its input, would score. Never
    raises: a bad image becomes ``status: "error"`` with the stage and the reason."""
    from know3d.evaluation.images import ImageError, compare_images, load_rgb

    result: dict = {"uid": job["uid"], "prediction": job["pred"], "ground_truth": job["gt"]}
    stage = "decode"
    try:
        p, g = (load_rgb(Path(job[k]), cfg.images.background, cfg.images.max_pixels) for k in ("pred", "gt"))
        f = load_rgb(Path(job["front"]), cfg.images.background, cfg.images.max_pixels) if job["front"] else None
        stage = "metrics"
        result["backview"] = compare_images(p, g, lpips_model(cfg))
        if f is not None:
            baseline = compare_images(f, g)
            result["backview"].update(baseline_front_psnr=baseline["psnr"], baseline_front_ssim=baseline["ssim"])
        result["status"] = "ok"
    except ImageError as exc:
        result.update(status="error", stage=stage, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - this uid's failure, with its reason
        result.update(status="error", stage=stage, error=f"{type(exc).__name__}: {exc}"[:500])
    return _with_front(result, job)


def crashed_backview(job: dict, exc: BaseException) -> dict:
    """The result of a back view whose worker crashed (stage ``worker``: retried by the next run)."""
    return _with_front(worker_error({"uid": job["uid"]}, exc), job)


def missing_backviews(found: Discovery) -> list[dict]:
    """A ``missing`` result for each uid that has only one side of the pair (counted, never reused)."""
    results = [
        {"uid": uid, "prediction": str(found.preds[uid]), "status": "missing", "error": "no ground-truth image"}
        for uid in found.unmatched["prediction_without_gt"]
    ]
    results += [
        {"uid": uid, "ground_truth": str(found.gts[uid]), "status": "missing", "error": "no prediction"}
        for uid in found.unmatched["gt_without_prediction"]
    ]
    return results
