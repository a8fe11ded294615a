"""`know3d data hidden-states`: the generator's hidden-state pre-pass on Ray, tracked in MLflow."""

from __future__ import annotations

import time
from typing import Any

from know3d.core.runtime import ray_session
from know3d.core.shards import dataset_refs, resolve_shards
from know3d.core.tracking import DATA_RUN_TAG, make_tracker
from know3d.training.generator.config import HiddenPrepassConfig
from know3d.training.generator.hidden_states import build_hidden_cache, cache_folder, check_inputs


def run_hidden_states(cfg: HiddenPrepassConfig) -> dict[str, Any]:
    """Capture H for every pair of ``cfg.shards`` (cached pairs are skipped); returns counts,
    seconds, the cache folder and the MLflow run id. Bad inputs fail before Ray starts."""
    check_inputs(cfg.hidden)
    urls, _ = resolve_shards(cfg.shards, cfg.split)
    if not urls:
        raise FileNotFoundError(f"no {cfg.split} shards in {', '.join(cfg.shards) or '(none given)'}")
    started, t0 = time.time(), time.perf_counter()
    with ray_session(cfg.ray) as ray:
        counts = build_hidden_cache(cfg.hidden, urls, ray)
    seconds = time.perf_counter() - t0
    folder = cache_folder(cfg.hidden)
    refs = dataset_refs(cfg.shards)
    builds = ",".join(r.run_id for r in refs if r.run_id)
    tracker = make_tracker(
        cfg.mlflow,
        stage="data.hidden_states",
        output=folder,
        tags={DATA_RUN_TAG: builds} if builds else None,
        start_time=started,
    )
    try:
        tracker.log_params(cfg.model_dump(mode="json"))
        for ref in refs:
            tracker.log_dataset(ref.name, ref.digest, ref.source, context="input")
        metrics = {f"pairs.{status}": n for status, n in counts.items()}
        metrics.update(seconds=seconds, pairs_per_s=counts.get("encoded", 0) / seconds if seconds else 0.0)
        tracker.log_metrics(metrics)
    finally:
        tracker.close()
    return {"counts": counts, "seconds": seconds, "folder": str(folder), "mlflow_run_id": tracker.run_id}
