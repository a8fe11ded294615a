"""Launchers: run a trainer's worker function on every data-parallel rank.

A trainer is a worker function ``(cfg, env: WorkerEnv) -> metrics`` and its pydantic config
class. :func:`fit_on_ray` runs it under Ray Train (``TorchTrainer``: placement, gloo/NCCL
process group, checkpoint persistence and restoration, worker-group restarts);
:func:`torchrun_main` under ``torchrun`` (a trainer module's ``__main__``), with checkpoints in
``<output>/checkpoints``; :func:`fit_in_process` (``ray.launcher=local``) in the calling process as
the only rank, with torchrun's checkpoint layout. The worker code is the same under all three.

What rank 0 says (:meth:`WorkerEnv.say`: progress lines, where things are) reaches the user's
terminal under both: torchrun's workers print it; Ray Train's workers put it into a
:class:`LineRelay` actor that the driver prints from while ``fit()`` runs. Ray's own forwarding
of worker output (``log_to_driver``) stays off: it would bring every library's chatter along,
each line prefixed with the worker's pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from know3d.core.logs import VERBOSE_ENV, quiet_third_party
from know3d.training.engine.checkpoint import STATE_FILE, CheckpointStore
from know3d.training.engine.config import TrainerConfig
from know3d.training.engine.env import Say, WorkerEnv, print_line, ray_worker_env
from know3d.training.engine.metrics import METRICS_FILE
from know3d.training.engine.relay import LineRelay

WorkerFn = Callable[[Any, WorkerEnv], dict]
# what workers on other nodes need from the driver's environment (caches, hub mode), through Ray's
# runtime env, which Ray's runtime-env agent writes to its session log
FORWARDED_ENV = ("KNOW3D_CACHE", "HF_HOME", "HF_HUB_OFFLINE", VERBOSE_ENV)
# the MLflow credentials rank 0 logs with: never in a runtime env (logged in clear); they travel in
# the train loop's config (Ray's object store) and are set in the worker process only
SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def ray_storage(cfg: TrainerConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``ray.storage_path`` or ``<output>/ray``."""
    storage = cfg.ray.storage_path or str(Path(cfg.output) / "ray")
    return storage if "://" in storage else str(Path(storage).resolve())


def local_checkpoints(cfg: TrainerConfig) -> Path:
    """Where torchrun and ``ray.launcher=local`` keep a run's checkpoints."""
    return Path(cfg.output) / "checkpoints"


def forget_run(cfg: TrainerConfig, leftovers: Sequence[str] = ()) -> None:
    """Start over (``--fresh``): delete the run's checkpoints (Ray Train's, at a local path or any
    fsspec URL, and the local launcher's), its metrics.jsonl and the ``leftovers`` (files or
    folders) of the output."""
    import fsspec

    shutil.rmtree(local_checkpoints(cfg), ignore_errors=True)

    fs, root = fsspec.core.url_to_fs(ray_storage(cfg))
    target = f"{root.rstrip('/')}/{Path(cfg.output).name}"
    if fs.exists(target):
        fs.rm(target, recursive=True)
    for name in (METRICS_FILE, *leftovers):
        path = Path(cfg.output) / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def last_checkpoint(cfg: TrainerConfig) -> dict | None:
    """The state file (step, metrics, ...) of the run's newest checkpoint under its launcher (Ray
    Train's storage, or ``<output>/checkpoints`` for ``ray.launcher=local``) plus its folder
    (``checkpoint``), or None; reads a few small files, starts nothing."""
    import fsspec

    if cfg.ray.launcher == "local":
        latest = CheckpointStore(local_checkpoints(cfg), cfg.schedule.keep_checkpoints).latest()
        return None if latest is None else {**json.loads((latest / STATE_FILE).read_text()), "checkpoint": str(latest)}

    fs, root = fsspec.core.url_to_fs(ray_storage(cfg))
    found = fs.glob(f"{root.rstrip('/')}/{Path(cfg.output).name}/checkpoint_*/{STATE_FILE}")
    states = [{**json.loads(fs.cat_file(path)), "checkpoint": str(Path(path).parent)} for path in found]
    return max(states, key=lambda state: state["step"], default=None)


def output_line(cfg: TrainerConfig) -> str:
    """The first thing a run says: where its files go."""
    return f"output {Path(cfg.output).resolve()}"


def on_driver_node(ray) -> dict[str, Any]:
    """Ray options that keep a helper actor of the driver on the driver's node: a CPU-less actor
    could land on any node, and losing that node (a worker node of a multi-node cluster) would
    end the run that Ray Train is restarting from its checkpoint."""
    context = getattr(ray, "get_runtime_context", None)
    if context is None:  # a stand-in for Ray in tests
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(context().get_node_id(), soft=False)}


@contextmanager
def relayed_lines(ray, write: Say = print_line, every_s: float = 0.5) -> Iterator[Any]:
    """A :class:`LineRelay` whose lines ``write`` gets while the block runs (from a thread, as
    ``trainer.fit()`` blocks the driver) and once more at its end, so none is lost."""
    relay = ray.remote(num_cpus=0, **on_driver_node(ray))(LineRelay).remote()
    stop = threading.Event()

    def drain() -> None:
        for line in ray.get(relay.take.remote()):
            write(line)

    def pump() -> None:
        while not stop.wait(every_s):
            drain()

    thread = threading.Thread(target=pump, name="know3d-relay", daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join()
        drain()
        ray.kill(relay)


def _relay_sink(relay) -> Say:
    """Rank 0's :attr:`WorkerEnv.sink` under Ray Train: each line waits until the relay has it,
    so lines arrive in order and before the run ends."""
    import ray

    def say(line: str) -> None:
        ray.get(relay.put.remote(line))

    return say


def ray_train_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the ``TorchTrainer``: the config back from json, then the worker."""
    quiet_third_party()
    os.environ.update(config.get("secrets") or {})
    cfg = config["config_type"].model_validate(config["cfg"])
    with ray_worker_env(_relay_sink(config["relay"])) as env:
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
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = has_gpu if cfg.ray.use_gpu == "auto" else cfg.ray.use_gpu == "on"
    with relayed_lines(ray) as relay:
        loop_config = {"worker": worker, "config_type": type(cfg), "cfg": cfg.model_dump(mode="json"), "relay": relay}
        loop_config["secrets"] = {key: os.environ[key] for key in SECRET_ENV if key in os.environ}
        result = _trainer(loop_config, cfg, use_gpu).fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    return {**(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else None}


def fit(worker: WorkerFn, cfg: TrainerConfig, ray: Any = None) -> dict:
    """Run ``worker`` with the launcher ``cfg.ray.launcher`` names (``ray`` needs the open Ray
    session); returns the last reported metrics and the newest checkpoint's path."""
    if cfg.ray.launcher == "local":
        return fit_in_process(worker, cfg)
    if ray is None:
        raise ValueError("ray.launcher=ray needs an open Ray session")
    return fit_on_ray(worker, cfg, ray)


@contextmanager
def only_rank() -> Iterator[None]:
    """This process as rank 0 of a one-process group (the local launcher's; the tests' in-process
    trainings). A group made here stays for the process's life: DeepSpeed keeps the groups it
    derives from the default one across engines, so a second training in the same process (a
    retraining cycle) must find the same group. The variables DeepSpeed reads are set for the
    block only."""
    import torch
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    saved = {key: os.environ.get(key) for key in (*env, "MASTER_PORT")}
    if dist.is_initialized() and dist.get_world_size() != 1:
        raise RuntimeError(f"a one-rank training, but this process is one of {dist.get_world_size()} ranks")
    port = os.environ.get("MASTER_PORT") if dist.is_initialized() else None
    os.environ.update(env, MASTER_PORT=port or str(_free_port()))
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_in_process(worker: WorkerFn, cfg: TrainerConfig) -> dict:
    """``ray.launcher=local``: ``worker`` in this process as the only rank (no Ray Train, no worker
    process to start), checkpoints in ``<output>/checkpoints`` (torchrun's layout: a rerun resumes
    from the newest complete one). Returns what :func:`fit_on_ray` does: the last reported
    metrics and the newest checkpoint's path."""
    store = CheckpointStore(local_checkpoints(cfg), cfg.schedule.keep_checkpoints)
    reported: dict = {}

    def report(metrics: dict, folder: Path | None) -> None:
        store.report(metrics, folder)
        reported.clear()
        reported.update(metrics)

    with only_rank():
        env = WorkerEnv.from_torchrun(store.latest(), report, environ={"RANK": "0", "WORLD_SIZE": "1"})
        worker(cfg, env)
    latest = store.latest()
    return {**reported, "checkpoint": str(latest) if latest else None}


def _trainer(loop_config: dict, cfg: TrainerConfig, use_gpu: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        ray_train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=Path(cfg.output).name,
            storage_path=ray_storage(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            worker_runtime_env={"env_vars": _worker_env_vars(use_gpu)},
        ),
    )


def torchrun_main(worker: WorkerFn, config_type: type, prog: str, argv: list[str] | None = None) -> None:
    """``torchrun --nproc_per_node N -m <trainer module> CONFIG [--set k=v ...]``.

    Checkpoints go to ``<output>/checkpoints/step_XXXXXXXX`` (the output must be on shared
    storage for multi-node runs); a restart resumes from the newest complete one.
    """
    import torch.distributed as dist

    from know3d.core.config import load_config

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    quiet_third_party()
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, model=config_type)
    store = CheckpointStore(Path(cfg.output) / "checkpoints", cfg.schedule.keep_checkpoints)
    env = WorkerEnv.from_torchrun(store.latest(), store.report)
    env.say(output_line(cfg))
    # a process group the caller already made (an embedding process, a test session) is left as it
    # was: DeepSpeed keeps groups derived from it, so it must outlive every engine built on it
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
    try:
        worker(cfg, env)
    finally:
        if owned:
            dist.destroy_process_group()
