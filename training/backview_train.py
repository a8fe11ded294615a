"""The back-view LoRA trainer (Know3D §3.1.2): what is specific to it, on the shared engine.

:func:`run_worker` runs on every data-parallel rank, under Ray Train (``know3d train backview``,
:func:`know3d.training.engine.launch.fit_on_ray`) or torchrun (``torchrun --nproc_per_node N -m
know3d.training.backview_train CONFIG [--set k=v ...]``). The engine (:mod:`know3d.training.engine`)
does the rest: DeepSpeed, checkpoints and resume, metrics, MLflow.

Per optimizer step, on each rank: ``micro_batch_size × grad_accum`` pairs from the rank's shard
stream; frozen VAE latents of front (reference) and back (target); a stochastic prompt
(instruction + with probability p one annotated description) embedded by the frozen Qwen2.5-VL
together with the front view; t from the configured sampler, x_t = (1 − t)·x0 + t·ε, MSE against
ε − x0 of the LoRA'd MMDiT. DeepSpeed (ZeRO 0–3) holds only the LoRA parameters in its optimizer.

Determinism: every random draw of step ``s`` on rank ``r`` comes from generators seeded with
(seed, r, s), and the data stream's position is checkpointed, so a run resumed from a
checkpoint reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from know3d.core.shards import dataset_refs, resolve_shards
from know3d.training.config import TrainBackviewConfig
from know3d.training.data import PairStream, StreamState
from know3d.training.debug_models import DEBUG_PREFIX
from know3d.training.edit_model import (
    EditModel,
    EncodedPair,
    add_lora,
    export_lora,
    load_lora_into,
    load_pipeline,
    pack_latents,
    pad_prompts,
    random_transformer,
    resolve_model_path,
    torch_dtype,
)
from know3d.training.engine import checkpoint
from know3d.training.engine.config import ScheduleConfig, derive_seed, use_bf16
from know3d.training.engine.dist import all_reduce_sum, barrier
from know3d.training.engine.env import WorkerEnv
from know3d.training.engine.launch import torchrun_main
from know3d.training.engine.metrics import MetricsFile, MetricsWindow, progress_line
from know3d.training.engine.optim import initialize
from know3d.training.engine.tracking import TrainingTracker
from know3d.training.flow_matching import flow_matching_loss, interpolate, sample_timesteps, timestep_bins
from know3d.training.prompting import build_prompt, stochastic_prompt

NUM_BINS = 4
BIN_NAMES = [f"loss_t{b / NUM_BINS:.2f}-{(b + 1) / NUM_BINS:.2f}" for b in range(NUM_BINS)]
STAGE = "train.backview"


class Batcher:
    """Micro-batches from the rank's stream; the stream state is what a checkpoint stores."""

    def __init__(self, stream: PairStream, state: StreamState, size: int) -> None:
        self.state = state
        self.size = size
        self._it = stream.forever(state)

    def next(self) -> list[dict]:
        return [next(self._it) for _ in range(self.size)]


def _encode_batch(model: EditModel, samples: list[dict], prompts: list[str]):
    front = torch.from_numpy(np.stack([s["front"] for s in samples]))
    back = torch.from_numpy(np.stack([s["back"] for s in samples]))
    pair = model.encode_pair(front, back)
    embeds, mask = pad_prompts([model.encode_prompt(p, s["front"]) for p, s in zip(prompts, samples)], model.device)
    return pair, embeds, mask


def _cached_batch(model: EditModel, samples: list[dict], chosen: list[tuple[str, str | None]], cache: Path):
    from know3d.training.latent_cache import load_entry

    entries = [load_entry(cache, s["key"]) for s in samples]
    front = torch.from_numpy(np.stack([e["front_latent"] for e in entries])).to(model.device)
    back = torch.from_numpy(np.stack([e["back_latent"] for e in entries])).to(model.device)
    prompts = []
    for s, e, (_, description) in zip(samples, entries, chosen):
        index = 0 if description is None else 1 + s["components"].index(description)
        prompts.append(torch.from_numpy(e[f"prompt_{index}"]))
    embeds, mask = pad_prompts(prompts, model.device)
    pair = EncodedPair(target=pack_latents(back), reference=pack_latents(front), latent_hw=tuple(back.shape[-2:]))
    return pair, embeds, mask


def training_loss(
    model: EditModel,
    transformer,
    samples: list[dict],
    cfg: TrainBackviewConfig,
    seed_parts: tuple,
    cache: Path | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
    """(mean loss, per-sample losses, timesteps, descriptions used) of one micro-batch; with
    ``cache`` the latents and prompt embeddings come from the pre-pass instead of the encoders.

    Each sample's prompt draw, timestep and noise come from its own seed, ``(*seed_parts, offset +
    i)`` with ``offset + i`` its position in the optimizer step (``micro * micro_batch_size + i``), so
    a step's losses do not depend on how its samples are split into micro-batches: one micro-batch
    of 4 gives the per-sample losses of 2 of 2 or 4 of 1 (prompts are padded with an attention
    mask), and the step's mean loss and gradient are the same."""
    f = cfg.flow
    chosen, ts, noises = [], [], []
    for i, s in enumerate(samples):
        parts = (*seed_parts, offset + i)
        rng = random.Random(derive_seed("prompt", *parts))
        chosen.append(stochastic_prompt(s["components"], cfg.data.prompt_probability, rng, cfg.data.instruction))
        gen = torch.Generator().manual_seed(derive_seed("noise", *parts))
        ts.append(
            sample_timesteps(f.timestep_sampling, 1, gen, logit_mean=f.logit_mean, logit_std=f.logit_std, shift=f.shift)
        )
        noises.append(gen)
    if cache is not None:
        pair, embeds, mask = _cached_batch(model, samples, chosen, cache)
    else:
        pair, embeds, mask = _encode_batch(model, samples, [p for p, _ in chosen])
    t = torch.cat(ts).to(model.device)
    noise = torch.stack([torch.randn(pair.target.shape[1:], generator=g) for g in noises]).to(model.device)
    x_t = interpolate(pair.target, noise, t)
    pred = model.velocity(transformer, x_t, pair.reference, t, embeds, mask, pair.latent_hw)
    per_sample = flow_matching_loss(pred, pair.target, noise)
    return per_sample.mean(), per_sample.detach(), t.detach(), [d for _, d in chosen]


@torch.no_grad()
def validation_loss(model: EditModel, transformer, samples: list[dict], cfg: TrainBackviewConfig) -> float:
    """Flow-matching loss on validation pairs at fixed t ∈ {0.25, 0.5, 0.75} and fixed noise."""
    losses = []
    for i, sample in enumerate(samples):
        pair, embeds, mask = _encode_batch(model, [sample], [build_prompt(None, cfg.data.instruction)])
        gen = torch.Generator().manual_seed(derive_seed("val", cfg.seed, i))
        noise = torch.randn(pair.target.shape, generator=gen).to(model.device)
        for tv in (0.25, 0.5, 0.75):
            t = torch.full((1,), tv, device=model.device)
            pred = model.velocity(
                transformer, interpolate(pair.target, noise, t), pair.reference, t, embeds, mask, pair.latent_hw
            )
            losses.append(float(flow_matching_loss(pred, pair.target, noise)[0]))
    return float(np.mean(losses)) if losses else float("nan")


def validation_grid(model: EditModel, samples: list[dict], cfg: TrainBackviewConfig, path: Path) -> Path:
    """Rows: front | generated (no prompt) | generated (with a description) | true back."""
    from PIL import Image, ImageDraw

    from know3d.training.edit_model import to_pil
    from know3d.training.generate import generate

    size = model.image_size
    cell = max(size, 128)  # small debug images are upscaled so the grid stays readable
    rows = []
    for i, s in enumerate(samples):
        description = s["components"][0] if s["components"] else None
        plain = generate(
            model.pipe,
            s["front"],
            build_prompt(None, cfg.data.instruction),
            size,
            steps=cfg.schedule.validation_steps,
            seed=cfg.seed + i,
        )
        prompted = (
            generate(
                model.pipe,
                s["front"],
                build_prompt(description, cfg.data.instruction),
                size,
                steps=cfg.schedule.validation_steps,
                seed=cfg.seed + i,
            )
            if description
            else None
        )
        rows.append((s, plain, prompted, description))
    header = 16
    grid = Image.new("RGB", (4 * cell, len(rows) * (cell + header)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (s, plain, prompted, description) in enumerate(rows):
        y = r * (cell + header)
        labels = ["front", "generated", f"+ '{description}'" if description else "(no description)", "true back"]
        images = [s["front"], plain, prompted, s["back"]]
        for c, (label, img) in enumerate(zip(labels, images)):
            draw.text((c * cell + 2, y + 2), label[:24], fill="black")
            if img is not None:
                grid.paste(to_pil(img).resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y + header))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _load_validation(cfg: TrainBackviewConfig, urls: list[str]) -> list[dict]:
    """The first ``num_validation`` pairs of the validation shards, or of the training selection
    when ``data.validation_split`` is 'train'."""
    if not urls:
        return []
    d = cfg.data
    selection = (
        {"keys": d.keys, "max_pairs": d.max_pairs, "max_pairs_per_asset": d.max_pairs_per_asset}
        if d.validation_split == "train"
        else {}
    )
    stream = PairStream(urls, seed=cfg.seed, shuffle_buffer=1, image_size=d.image_size, **selection)
    out = []
    for sample in stream.iterate(StreamState()):
        out.append(sample)
        if len(out) >= cfg.schedule.num_validation:
            break
    return out


def _build_model(cfg: TrainBackviewConfig, env: WorkerEnv, bf16: bool) -> tuple[EditModel, list, Path | None]:
    """The pipeline with a LoRA'd MMDiT (identical LoRA init on every rank), its trainable
    parameters, and the latent cache folder when training from one."""
    dtype = torch.bfloat16 if bf16 else torch_dtype(cfg.model.dtype, env.device)
    if cfg.model.name.startswith(DEBUG_PREFIX):
        # Built once per node by local rank 0: save_pretrained skips writes on non-main ranks.
        if env.local_rank == 0:
            resolve_model_path(cfg.model.name)
        barrier()
    cache, encoders = None, {}
    if cfg.cache.enabled:
        from know3d.training.latent_cache import cache_folder

        cache = cache_folder(cfg)
        needs_encoders = cfg.schedule.validate_every > 0 and (env.is_main or cfg.deepspeed.zero_stage == 3)
        if not needs_encoders:  # only the MMDiT: latents and prompt embeddings come from the cache
            encoders = {"vae": None, "text_encoder": None}
    if cfg.model.random_weights:
        encoders["transformer"] = random_transformer(cfg.model.name, dtype, env.device, derive_seed("mmdit", cfg.seed))
    pipe = load_pipeline(cfg.model.name, cfg.model.revision, dtype=dtype, **encoders)
    pipe.set_progress_bar_config(disable=True)
    model = EditModel(pipe, env.device, dtype, cfg.data.image_size)
    torch.manual_seed(derive_seed("lora", cfg.seed))
    lora_dtype = cfg.model.lora_dtype
    lora_dtype = torch.bfloat16 if lora_dtype == "bfloat16" or (lora_dtype == "auto" and bf16) else torch.float32
    lc = cfg.lora
    params = add_lora(model.transformer, lc.rank, lc.alpha, lc.dropout, lc.target_modules, dtype=lora_dtype)
    if lc.init_from:
        load_lora_into(model.transformer, Path(lc.init_from))
    if cfg.model.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    model.transformer.train()
    return model, params, cache


@dataclass
class TrainData:
    stream: PairStream  # this rank's training pairs
    num_shards: int
    digest: str  # content digest of the training shards (MLflow dataset, checkpoints, LoRA metadata)
    val_urls: list[str]


def _open_data(cfg: TrainBackviewConfig, env: WorkerEnv, decode: bool) -> TrainData:
    d = cfg.data
    train_urls, digest = resolve_shards(d.shards, "train")
    if not train_urls:
        raise ValueError(f"no training shards in {d.shards}")
    if d.validation_split == "train":
        val_urls = train_urls
    else:
        val_urls = resolve_shards(d.val_shards or d.shards, "val")[0]
    stream = PairStream(
        train_urls,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        shuffle_buffer=d.shuffle_buffer,
        image_size=d.image_size,
        decode=decode,
        keys=d.keys,
        max_pairs=d.max_pairs,
        max_pairs_per_asset=d.max_pairs_per_asset,
    )
    return TrainData(stream, len(train_urls), digest, val_urls)


def _train_step(
    model: EditModel,
    engine,
    batcher: Batcher,
    cfg: TrainBackviewConfig,
    env: WorkerEnv,
    step: int,
    window: MetricsWindow,
    cache: Path | None,
) -> float:
    """Optimizer step ``step`` (``grad_accum`` micro-batches); returns its loss over all ranks.
    Per-sample losses go into the window by timestep bin."""
    losses = []
    for micro in range(cfg.schedule.grad_accum):
        torch.manual_seed(derive_seed("torch", cfg.seed, env.rank, step, micro))  # LoRA dropout etc.
        offset = micro * cfg.schedule.micro_batch_size  # per-sample seeds: the same for any micro-batch split
        parts = (cfg.seed, env.rank, step)
        loss, per_sample, t, _ = training_loss(model, engine, batcher.next(), cfg, parts, cache, offset)
        engine.backward(loss)
        engine.step()
        losses.append(per_sample)
        for b, v in zip(timestep_bins(t.cpu(), NUM_BINS).tolist(), per_sample.cpu().tolist()):
            window.add(BIN_NAMES[b], v)
    mean = torch.cat(losses).mean().double().cpu()
    total = all_reduce_sum(torch.stack([mean, torch.ones((), dtype=torch.float64)]))
    step_loss = float(total[0] / total[1])
    window.add("loss", step_loss)
    window.add_samples(cfg.schedule.samples_per_step(env.world_size))
    return step_loss


def _log_window(
    window: MetricsWindow,
    engine,
    state: StreamState,
    tracker: TrainingTracker,
    env: WorkerEnv,
    schedule: ScheduleConfig,
    step: int,
) -> dict:
    """The window's means (timestep bins over all ranks), lr and throughput, to MLflow and as a
    progress line for the user; resets the window."""
    bins = window.reduced_means(BIN_NAMES)
    metrics = {
        "loss": window.mean("loss"),
        "lr": engine.lr_scheduler.get_last_lr()[0],
        "samples_per_s": window.samples_per_s(),
        "epoch": state.epoch,
        **bins,
    }
    tracker.log_metrics(metrics, step)
    samples_left = (schedule.max_steps - step) * schedule.samples_per_step(env.world_size)
    env.say(progress_line(step, schedule.max_steps, metrics["loss"], metrics["samples_per_s"], samples_left))
    window.reset()
    return metrics


def _validate(
    model: EditModel,
    engine,
    samples: list[dict],
    cfg: TrainBackviewConfig,
    env: WorkerEnv,
    tracker: TrainingTracker,
    step: int,
) -> dict:
    """Validation loss and grid; the metrics on rank 0, {} elsewhere. Under ZeRO-3 every rank
    samples too (sampling needs every rank's weight partitions)."""
    engine.eval()
    val = {"val_loss": validation_loss(model, engine, samples, cfg)}
    if env.is_main:
        grid = validation_grid(model, samples, cfg, Path(cfg.output) / "validation" / f"step_{step:06d}.png")
        tracker.log_artifact(grid, "validation")
        tracker.log_metrics(val, step)
    elif cfg.deepspeed.zero_stage == 3:
        with tempfile.TemporaryDirectory() as tmp:
            validation_grid(model, samples, cfg, Path(tmp) / "grid.png")
    engine.train()
    return val if env.is_main else {}


def _export(
    engine, params: list, cfg: TrainBackviewConfig, env: WorkerEnv, tracker: TrainingTracker, step: int, data: TrainData
) -> None:
    """``<output>/lora`` in diffusers' format, with what generation and provenance need."""
    import deepspeed

    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if cfg.deepspeed.zero_stage == 3
        else contextlib.nullcontext()
    )  # ZeRO-3 partitions the LoRA weights: gather on all ranks
    with gather:
        if not env.is_main:
            return
        meta = {
            "model": cfg.model.name,
            "revision": cfg.model.revision,
            "image_size": cfg.data.image_size,
            "instruction": cfg.data.instruction,
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "steps": step,
            "data_digest": data.digest,
            "mlflow_run_id": tracker.run_id,  # lineage: an evaluation of this LoRA finds its training run
            # a selected subset (overfit checks, the quickstart): which pairs the LoRA saw
            "trained_on": [s["__key__"] for s in data.stream.selection()] if data.stream.selective else None,
        }
        tracker.log_artifact(export_lora(engine.module, Path(cfg.output) / "lora", meta), "lora")


def run_worker(cfg: TrainBackviewConfig, env: WorkerEnv) -> dict:
    """Train on this rank until ``schedule.max_steps``; returns the last logged metrics."""
    torch.manual_seed(derive_seed("init", cfg.seed))
    bf16 = use_bf16(cfg.deepspeed, env.device)
    model, params, cache = _build_model(cfg, env, bf16)
    engine = initialize(model.transformer, params, cfg, env.world_size, bf16)
    data = _open_data(cfg, env, decode=cache is None)
    resumed = checkpoint.resume(engine, env)
    state = StreamState(**resumed.stream)
    batcher = Batcher(data.stream, state, cfg.schedule.micro_batch_size)
    s, step, last = cfg.schedule, resumed.step, {}
    window, metrics_file = MetricsWindow(), MetricsFile(Path(cfg.output), env.is_main)
    with TrainingTracker(cfg.mlflow, env, Path(cfg.output), STAGE, resumed.mlflow_run_id) as tracker:
        params_info = {
            "world_size": env.world_size,
            "trainable_parameters": sum(p.numel() for p in params),
            "data.train_shards": data.num_shards,
            "data.digest": data.digest,
        }
        tracker.start(cfg, params_info, dataset_refs(cfg.data.shards))
        val_samples = _load_validation(cfg, data.val_urls) if env.is_main or cfg.deepspeed.zero_stage == 3 else []
        while step < s.max_steps:
            loss = _train_step(model, engine, batcher, cfg, env, step, window, cache)
            step += 1
            metrics_file.append(step, loss)
            if s.due(step, s.log_every):
                last = _log_window(window, engine, state, tracker, env, s, step)
            if s.due(step, s.validate_every) and val_samples:
                last.update(_validate(model, engine, val_samples, cfg, env, tracker, step))
            if s.due(step, s.checkpoint_every):
                record = {"mlflow_run_id": tracker.run_id, "data_digest": data.digest}
                checkpoint.save(engine, env, step, state, last, record)
        _export(engine, params, cfg, env, tracker, step, data)
    return last


if __name__ == "__main__":
    torchrun_main(run_worker, TrainBackviewConfig, prog="torchrun --nproc_per_node N -m know3d.training.backview_train")
