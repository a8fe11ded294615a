"""Launchers: run a trainer's worker function on every data-parallel rank.

A trainer is a worker function ``(cfg, env: WorkerEnv) -> metrics`` and its pydantic config
class. :func:`fit_on_ray` runs it under Ray Train (``TorchTrainer``: placement, gloo/NCCL
process group, checkpoint persistence and restoration, worker-group restarts);
:func:`torchrun_main` under ``torchrun`` (a trainer module's ``__main__``), with checkpoints in
``<output>/checkpoints``. The worker code is the same under both.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from know3d.training.engine.checkpoint import CheckpointStore
from know3d.training.engine.config import TrainerConfig
from know3d.training.engine.env import WorkerEnv, ray_worker_env
from know3d.training.engine.metrics import METRICS_FILE

WorkerFn = Callable[[Any, WorkerEnv], dict]
# what workers on other nodes need from the driver's environment (caches, hub mode, MLflow credentials)
FORWARDED_ENV = (
    "KNOW3D_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def ray_storage(cfg: TrainerConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``ray.storage_path`` or ``<output>/ray``."""
    storage = cfg.ray.storage_path or str(Path(cfg.output) / "ray")
    return storage if "://" in storage else str(Path(storage).resolve())


def forget_run(cfg: TrainerConfig, leftovers: Sequence[str] = ()) -> None:
    """Start over (``--fresh``): delete the run's Ray Train checkpoints (local path or any fsspec
    URL), its metrics.jsonl and the ``leftovers`` (files or folders) of the output."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(ray_storage(cfg))
    target = f"{root.rstrip('/')}/{Path(cfg.output).name}"
    if fs.exists(target):
        fs.rm(target, recursive=True)
    for name in (METRICS_FILE, *leftovers):
        path = Path(cfg.output) / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def ray_train_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the ``TorchTrainer``: the config back from json, then the worker."""
    cfg = config["config_type"].model_validate(config["cfg"])
    with ray_worker_env() as env:
        config["worker"](cfg, env)


def _worker_env_vars(use_gpu: bool) -> dict[str, str]:
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"
    env_vars.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    return env_vars


def fit_on_ray(worker: WorkerFn, cfg: TrainerConfig, ray) -> dict:
    """Run ``worker`` on ``ray.num_workers`` Ray Train workers (inside an open Ray session) until
    it returns; a run of the same output continues from its newest checkpoint. Returns the last
    reported metrics and that checkpoint's path."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = has_gpu if cfg.ray.use_gpu == "auto" else cfg.ray.use_gpu == "on"
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"worker": worker, "config_type": type(cfg), "cfg": cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=Path(cfg.output).name,
            storage_path=ray_storage(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            worker_runtime_env={"env_vars": _worker_env_vars(use_gpu)},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    return {**(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None}


def torchrun_main(worker: WorkerFn, config_type: type, prog: str, argv: list[str] | None = None) -> None:
    """``torchrun --nproc_per_node N -m <trainer module> CONFIG [--set k=v ...]``.

    Checkpoints go to ``<output>/checkpoints/step_XXXXXXXX`` (the output must be on shared
    storage for multi-node runs); a restart resumes from the newest complete one.
    """
    import torch.distributed as dist

    from know3d.core.config import load_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, model=config_type)
    store = CheckpointStore(Path(cfg.output) / "checkpoints", cfg.schedule.keep_checkpoints)
    env = WorkerEnv.from_torchrun(store.latest(), store.report)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    try:
        worker(cfg, env)
    finally:
        dist.destroy_process_group()
