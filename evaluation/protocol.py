"""What a stored per-uid result depends on, so a rerun knows which results it may reuse.

A result is reusable when both its *protocol fingerprint* (every setting that changes a number,
plus the identity of the checkpoint files) and its *inputs key* (the uid's input files) match.
Settings that only change how the run is spread (Ray), logged (MLflow) or shown (report size)
are left out: changing them must not throw away finished work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from know3d.evaluation.config import EvalConfig
from know3d.evaluation.discovery import EvalError


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


def protocol_fingerprint(cfg: EvalConfig) -> str:
    """Hash of every setting that changes a uid's result (not Ray, MLflow or the report size)."""
    data = cfg.model_dump(mode="json", exclude={"ray": True, "mlflow": True, "model": True, "report": {"max_rows"}})
    # a checkpoint replaced at the same path changes the scores too
    files = [cfg.semantic.ulip.checkpoint, cfg.semantic.uni3d.checkpoint, cfg.semantic.uni3d.clip_checkpoint]
    if cfg.images.lpips:
        from know3d.evaluation.images import default_alexnet_path

        files.append(cfg.images.lpips_backbone or str(default_alexnet_path()))
    data["files"] = [inputs_key(f) if f and Path(f).is_file() else None for f in files]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def scorer_spec(cfg: EvalConfig) -> dict:
    """The ULIP / Uni3D scorer settings as plain JSON (what a scoring actor is built from)."""
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


def check_semantic(cfg: EvalConfig, images: Path | None) -> None:
    """Refuse, before any work, semantic scores that cannot run (no images, no model, no checkpoint)."""
    if not cfg.semantic.enabled:
        return
    if images is None:
        raise EvalError("the ULIP/Uni3D scores need --images (or pass --no-semantic)")
    if not (cfg.semantic.ulip.enabled or cfg.semantic.uni3d.enabled):
        raise EvalError("semantic.enabled is true but both ulip and uni3d are disabled (pass --no-semantic)")
    from know3d.evaluation.semantic import CheckpointError, ScorerSpec

    try:
        ScorerSpec(**scorer_spec(cfg)).check()
    except CheckpointError as exc:
        raise EvalError(str(exc)) from None


def shape_skips(cfg: EvalConfig, gt: Path | None) -> dict[str, str]:
    """Metric groups this shape protocol leaves out -> why (listed in the summary)."""
    skipped = {}
    for name in ("ulip", "uni3d"):
        if cfg.semantic.enabled and not getattr(cfg.semantic, name).enabled:
            skipped[name] = f"disabled (semantic.{name}.enabled=false)"
    if not cfg.semantic.enabled:
        skipped["semantic"] = "disabled (--no-semantic)"
    if gt is None:
        skipped["geometry"] = "no --gt given"
    return skipped
