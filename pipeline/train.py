"""``know3d train backview``: the back-view LoRA on Ray Train (TorchTrainer + DeepSpeed).

The driver resolves paths (output, MLflow URI) to absolute ones, starts or joins Ray, and hands
:func:`know3d.training.backview_train.run_worker` to the training engine's Ray launcher
(:func:`know3d.training.engine.launch.fit_on_ray`, a ``TorchTrainer``). Checkpoints live in Ray
Train's storage (``ray.storage_path``, default ``<output>/ray``) under a run name derived from
the output folder; starting the same command again continues from the newest
checkpoint (Ray Train's job-level restoration), ``fresh=True`` starts over. A run that already
reached ``schedule.max_steps`` says so at once and returns what it recorded: no Ray, no model.
``ray.launcher=local`` trains in this process instead (one rank, checkpoints in
``<output>/checkpoints``; Ray only for the latent pre-pass): debug-size runs skip Ray Train's start.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

from know3d.core.runtime import check_output, ray_session
from know3d.core.tracking import check_uri, default_tracking_uri
from know3d.training.config import TrainBackviewConfig
from know3d.training.engine.metrics import METRICS_FILE, steps_done

log = logging.getLogger(__name__)


def prepare(cfg: TrainBackviewConfig) -> TrainBackviewConfig:
    """Absolute paths, so workers (other cwd, other nodes) see the same places."""
    cfg = cfg.model_copy(deep=True)
    cfg.output = str(check_output(cfg.output))
    cfg.data.shards = [s if "://" in s else str(Path(s).resolve()) for s in cfg.data.shards]
    cfg.data.val_shards = [s if "://" in s else str(Path(s).resolve()) for s in cfg.data.val_shards]
    if cfg.lora.init_from:
        cfg.lora.init_from = str(Path(cfg.lora.init_from).resolve())
        if not (Path(cfg.lora.init_from) / "pytorch_lora_weights.safetensors").is_file():
            raise ValueError(f"lora.init_from {cfg.lora.init_from}: no exported LoRA there")
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


def finished(cfg: TrainBackviewConfig) -> dict | None:
    """The metrics a run recorded if it already reached ``schedule.max_steps`` (its newest
    checkpoint and its exported LoRA are of that step), else None: rerunning it would spend a
    minute starting Ray and loading the model to train nothing."""
    from know3d.training.engine.launch import last_checkpoint
    from know3d.training.generate import LORA_META

    state = last_checkpoint(cfg)
    if state is None or state["step"] < cfg.schedule.max_steps:
        return None
    meta = Path(cfg.output) / "lora" / LORA_META
    if not meta.is_file() or json.loads(meta.read_text()).get("steps") != state["step"]:
        return None  # killed before the export: a rerun resumes at the last step and exports
    # checkpoints written before they held metrics: the step's loss from metrics.jsonl
    metrics = state.get("metrics") or {"loss": steps_done(Path(cfg.output) / METRICS_FILE).get(state["step"])}
    return {**metrics, "step": state["step"], "checkpoint": state["checkpoint"]}


def _shown(path: str) -> str:
    """``path`` relative to the current folder when inside it: what the user typed, usually."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def run_train_backview(cfg: TrainBackviewConfig, fresh: bool = False) -> dict:
    """Train; returns the final metrics (loss, lr, samples/s, ...) and where things are
    (``already_done`` when the run had finished before)."""
    from know3d.training.engine.launch import fit, forget_run, output_line

    cfg = prepare(cfg)
    where = {"output": cfg.output, "lora": str(Path(cfg.output) / "lora")}
    if fresh:
        forget_run(cfg, leftovers=("lora", "validation"))
    elif done := finished(cfg):
        print(
            f"already at step {done['step']}/{cfg.schedule.max_steps} ({_shown(cfg.output)}); use --fresh to train again",
            flush=True,
        )
        return {**done, **where, "already_done": True}
    print(output_line(cfg), flush=True)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    needs_ray = cfg.ray.launcher == "ray" or cfg.cache.enabled
    with ray_session(cfg.ray) if needs_ray else nullcontext() as ray:
        if cfg.cache.enabled:
            from know3d.core.shards import resolve_shards
            from know3d.training.latent_cache import build_cache, cache_folder

            counts = build_cache(cfg, resolve_shards(cfg.data.shards, "train")[0], ray)
            log.info("latent cache %s: %s", cache_folder(cfg), counts)
        from know3d.training.backview_train import run_worker

        metrics = fit(run_worker, cfg, ray)
    return {**metrics, **where}


# --------------------------------------------------------------------------- the 3D generator


def prepare_generator(cfg):
    """Absolute paths and the inputs checked in the driver (a bad dataset, missing targets or an
    empty hidden-state cache fail here, in one line, before Ray starts)."""
    from know3d.training.generator.config import TrainGeneratorConfig
    from know3d.training.generator.train import open_pairs, require_dataset

    cfg: TrainGeneratorConfig = cfg.model_copy(deep=True)
    require_dataset(cfg)
    cfg.output = str(check_output(cfg.output))
    cfg.data.dataset = str(Path(cfg.data.dataset).resolve())
    if cfg.data.targets:
        cfg.data.targets = str(Path(cfg.data.targets).resolve())
    for field in ("base", "ss_decoder", "dino"):  # local folders: absolute (hub ids and 'debug' stay)
        value = getattr(cfg.model, field)
        if Path(value).exists():
            setattr(cfg.model, field, str(Path(value).resolve()))
    hidden = cfg.data.hidden
    hidden.cache_dir = str(Path(hidden.cache_dir).resolve())
    if hidden.lora and not hidden.lora.startswith("debug"):
        hidden.lora = str(Path(hidden.lora).resolve())
    if cfg.mlflow.enabled:
        cfg.mlflow.tracking_uri = check_uri(
            cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        )
    pairs = open_pairs(cfg, "train")
    if len(pairs) == 0:
        raise ValueError(f"{cfg.data.dataset}: no training pairs with targets and conditions ({dict(pairs.skipped)})")
    return cfg


def run_train_generator(cfg, fresh: bool = False) -> dict:
    """Train the generator's stage 1 on Ray Train (or in this process: ``ray.launcher=local``);
    returns the final metrics and where things are."""
    from know3d.training.engine.launch import fit, forget_run, last_checkpoint, output_line
    from know3d.training.generator.model import META_FILE
    from know3d.training.generator.train import GENERATOR_DIR, run_worker

    cfg = prepare_generator(cfg)
    folder = Path(cfg.output) / GENERATOR_DIR
    where = {"output": cfg.output, "generator": str(folder)}
    if fresh:
        forget_run(cfg, leftovers=(GENERATOR_DIR, "validation"))
    else:
        state = last_checkpoint(cfg)
        meta = folder / META_FILE
        if state and state["step"] >= cfg.schedule.max_steps and meta.is_file():
            if json.loads(meta.read_text()).get("steps") == state["step"]:
                print(
                    f"already at step {state['step']}/{cfg.schedule.max_steps} ({_shown(cfg.output)}); "
                    "use --fresh to train again",
                    flush=True,
                )
                return {**(state.get("metrics") or {}), **where, "step": state["step"], "already_done": True}
    print(output_line(cfg), flush=True)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    with ray_session(cfg.ray) if cfg.ray.launcher == "ray" else nullcontext() as ray:
        metrics = fit(run_worker, cfg, ray)
    return {**metrics, **where}
