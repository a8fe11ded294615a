"""``know3d train backview``: the back-view LoRA on Ray Train (TorchTrainer + DeepSpeed).

The driver resolves paths (output, MLflow URI) to absolute ones, starts or joins Ray, and runs a
``TorchTrainer`` whose workers execute :func:`know3d.training.backview_train.ray_train_loop`. Checkpoints
live in Ray Train's storage (``ray.storage_path``, default ``<output>/ray``) under a run name
derived from the output folder; starting the same command again continues from the newest
checkpoint (Ray Train's job-level restoration), ``fresh=True`` starts over.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from know3d.core.runtime import check_output, ray_session
from know3d.core.tracking import check_uri, default_tracking_uri
from know3d.training.config import TrainBackviewConfig

log = logging.getLogger(__name__)


def prepare(cfg: TrainBackviewConfig) -> TrainBackviewConfig:
    """Absolute paths, so workers (other cwd, other nodes) see the same places."""
    cfg = cfg.model_copy(deep=True)
    cfg.output = str(check_output(cfg.output))
    cfg.data.shards = [s if "://" in s else str(Path(s).resolve()) for s in cfg.data.shards]
    cfg.data.val_shards = [s if "://" in s else str(Path(s).resolve()) for s in cfg.data.val_shards]
    if cfg.mlflow.enabled:
        cfg.mlflow.tracking_uri = check_uri(
            cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        )
    if not cfg.data.shards:
        raise ValueError(
            "data.shards is empty: give a data-build output folder, e.g. --set data.shards=[runs/quickstart]"
        )
    from know3d.core.shards import resolve_shards

    urls, _ = resolve_shards(cfg.data.shards, "train")  # fail early, in the driver, on bad inputs
    if not urls:
        raise ValueError(f"no 'train' shards in {cfg.data.shards}")
    return cfg


def _remove_run(storage: str, name: str) -> None:
    """Delete a run's Ray Train checkpoints (local path or any fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(storage)
    target = f"{root.rstrip('/')}/{name}"
    if fs.exists(target):
        fs.rm(target, recursive=True)


def run_train_backview(cfg: TrainBackviewConfig, fresh: bool = False) -> dict:
    """Train; returns the final metrics (loss, lr, samples/s, ...) and where things are."""
    cfg = prepare(cfg)
    storage = cfg.ray.storage_path or str(Path(cfg.output) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    name = Path(cfg.output).name
    if fresh:
        _remove_run(storage, name)
        for leftover in ("metrics.jsonl", "lora", "validation"):
            target = Path(cfg.output) / leftover
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)

    with ray_session(cfg) as ray:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from know3d.training.backview_train import ray_train_loop

        if cfg.cache.enabled:
            from know3d.core.shards import resolve_shards
            from know3d.training.latent_cache import build_cache, cache_folder

            counts = build_cache(cfg, resolve_shards(cfg.data.shards, "train")[0], ray)
            log.info("latent cache %s: %s", cache_folder(cfg), counts)
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        use_gpu = has_gpu if cfg.ray.use_gpu == "auto" else cfg.ray.use_gpu == "on"
        env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
        if not use_gpu:
            env_vars["DS_ACCELERATOR"] = "cpu"
        for key in (
            "KNOW3D_CACHE",
            "HF_HOME",
            "HF_HUB_OFFLINE",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        ):
            if key in os.environ:
                env_vars[key] = os.environ[key]
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json")},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
            ),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                worker_runtime_env={"env_vars": env_vars},
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    metrics = dict(result.metrics or {})
    metrics["output"] = cfg.output
    metrics["lora"] = str(Path(cfg.output) / "lora")
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return metrics
