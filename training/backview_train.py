"""The per-worker training body of the back-view LoRA (Know3D §3.1.2), launcher-agnostic.

One function, :func:`run_worker`, runs on every data-parallel rank. It is called by Ray Train's
``TorchTrainer`` (:func:`ray_train_loop`) and by ``torchrun`` (``python -m
know3d.training.backview_train CONFIG``); both set up ``torch.distributed`` and hand it a
:class:`WorkerEnv` that says where to resume from and how to report checkpoints.

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
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from know3d.core.config import dump_config
from know3d.core.shards import resolve_shards
from know3d.training.config import TrainBackviewConfig
from know3d.training.data import PairStream, StreamState
from know3d.training.debug_models import DEBUG_PREFIX
from know3d.training.edit_model import (
    EditModel,
    EncodedPair,
    add_lora,
    export_lora,
    load_pipeline,
    pack_latents,
    pad_prompts,
    resolve_model_path,
    torch_dtype,
)
from know3d.training.flow_matching import flow_matching_loss, interpolate, sample_timesteps, timestep_bins
from know3d.training.prompting import build_prompt, stochastic_prompt

log = logging.getLogger(__name__)
STATE_FILE = "know3d_state.json"
DS_TAG = "ds"
NUM_BINS = 4


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    resume_from: Path | None  # a checkpoint folder written by this module, or None
    report: Callable[[dict, Path | None], None]  # (metrics, checkpoint folder or None); called on every rank
    extra: dict = field(default_factory=dict)


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def use_bf16(cfg: TrainBackviewConfig, device: torch.device) -> bool:
    if cfg.deepspeed.bf16 == "auto":
        return device.type == "cuda"
    return cfg.deepspeed.bf16 == "on"


def deepspeed_config(cfg: TrainBackviewConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config this run passes to ``deepspeed.initialize`` (no json file needed)."""
    s = cfg.schedule
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage >= 2:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch_size * s.grad_accum * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.deepspeed.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lr_lambda(warmup: int, decay: str = "constant", total: int = 1, min_ratio: float = 0.1) -> Callable[[int], float]:
    """The lr multiplier of optimizer step ``step``: linear warmup, then constant or cosine decay
    to ``min_ratio`` at step ``total``."""
    import math

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
    """(mean loss, per-sample losses, timesteps, descriptions used) of one micro-batch; with
    ``cache`` the latents and prompt embeddings come from the pre-pass instead of the encoders."""
    rng = random.Random(derive_seed("prompt", *seed_parts))
    chosen = [
        stochastic_prompt(s["components"], cfg.data.prompt_probability, rng, cfg.data.instruction) for s in samples
    ]
    if cache is not None:
        pair, embeds, mask = _cached_batch(model, samples, chosen, cache)
    else:
        pair, embeds, mask = _encode_batch(model, samples, [p for p, _ in chosen])
    gen = torch.Generator().manual_seed(derive_seed("noise", *seed_parts))
    f = cfg.flow
    t = sample_timesteps(
        f.timestep_sampling, len(samples), gen, logit_mean=f.logit_mean, logit_std=f.logit_std, shift=f.shift
    ).to(model.device)
    noise = torch.randn(pair.target.shape, generator=gen).to(model.device)
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


def _gather_states(state: StreamState, world_size: int) -> list[dict]:
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [state.to_dict()]
    out: list = [None] * world_size
    dist.all_gather_object(out, state.to_dict())
    return out


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def run_worker(cfg: TrainBackviewConfig, env: WorkerEnv) -> dict:
    """Train on this rank until ``schedule.max_steps``; returns the last logged metrics."""
    import deepspeed

    from know3d.core.tracking import NullTracker, make_tracker

    torch.manual_seed(derive_seed("init", cfg.seed))
    device = env.device
    bf16 = use_bf16(cfg, device)
    dtype = torch.bfloat16 if bf16 else torch_dtype(cfg.model.dtype, device)
    if cfg.model.name.startswith(DEBUG_PREFIX):
        # Built once per node by local rank 0: save_pretrained skips writes on non-main ranks.
        import torch.distributed as dist

        if env.local_rank == 0:
            resolve_model_path(cfg.model.name)
        if dist.is_initialized():
            dist.barrier()
    cache = None
    encoders: dict = {}
    if cfg.cache.enabled:
        from know3d.training.latent_cache import cache_folder

        cache = cache_folder(cfg)
        needs_encoders = cfg.schedule.validate_every > 0 and (env.rank == 0 or cfg.deepspeed.zero_stage == 3)
        if not needs_encoders:  # only the MMDiT: latents and prompt embeddings come from the cache
            encoders = {"vae": None, "text_encoder": None}
    pipe = load_pipeline(cfg.model.name, cfg.model.revision, dtype=dtype, **encoders)
    pipe.set_progress_bar_config(disable=True)
    model = EditModel(pipe, device, dtype, cfg.data.image_size)
    transformer = model.transformer
    torch.manual_seed(derive_seed("lora", cfg.seed))  # identical LoRA init on every rank
    params = add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, cfg.optim.decay, cfg.schedule.max_steps, cfg.optim.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=transformer,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, env.world_size, bf16),
        dist_init_required=False,
    )

    train_urls, data_digest = resolve_shards(cfg.data.shards, "train")
    if not train_urls:
        raise ValueError(f"no training shards in {cfg.data.shards}")
    if cfg.data.validation_split == "train":
        val_urls = train_urls
    else:
        val_urls = (
            resolve_shards(cfg.data.val_shards, "val")[0]
            if cfg.data.val_shards
            else resolve_shards(cfg.data.shards, "val")[0]
        )
    stream = PairStream(
        train_urls,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        image_size=cfg.data.image_size,
        decode=cache is None,
        keys=cfg.data.keys,
        max_pairs=cfg.data.max_pairs,
        max_pairs_per_asset=cfg.data.max_pairs_per_asset,
    )

    step, state, run_id = 0, StreamState(), None
    if env.resume_from is not None:
        saved = json.loads((env.resume_from / STATE_FILE).read_text())
        if saved["world_size"] != env.world_size:
            raise ValueError(
                f"checkpoint {env.resume_from} was written by {saved['world_size']} workers, "
                f"this run has {env.world_size}: resuming mid-epoch needs the same number"
            )
        engine.load_checkpoint(str(env.resume_from), tag=DS_TAG, load_module_strict=False)
        step, run_id = saved["step"], saved.get("mlflow_run_id")
        state = StreamState(**saved["streams"][env.rank])
        log.info("rank %d resumed at step %d (epoch %d, %d samples in)", env.rank, step, state.epoch, state.consumed)
    batcher = Batcher(stream, state, cfg.schedule.micro_batch_size)

    output = Path(cfg.output)
    tracker = NullTracker()
    if env.rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        tracker = make_tracker(
            cfg.mlflow, run_name=output.name, tags={"know3d.stage": "train-backview"}, resume_run_id=run_id
        )
        if run_id is None:
            tracker.log_params(
                {
                    "config": cfg.model_dump(mode="json"),
                    "world_size": env.world_size,
                    "trainable_parameters": sum(p.numel() for p in params),
                    "data.train_shards": len(train_urls),
                    "data.digest": data_digest,
                }
            )
            tracker.log_dataset("train-shards", data_digest, ",".join(cfg.data.shards))
        (output / "config.yaml").write_text(dump_config(cfg))
    val_samples = _load_validation(cfg, val_urls) if env.rank == 0 or cfg.deepspeed.zero_stage == 3 else []

    metrics_file = output / "metrics.jsonl"
    window = {"loss": 0.0, "n": 0, "bins": torch.zeros(2 * NUM_BINS, dtype=torch.float64), "t0": time.perf_counter()}
    last: dict = {}
    status = "FAILED"
    try:
        while step < cfg.schedule.max_steps:
            step_losses = []
            for micro in range(cfg.schedule.grad_accum):
                parts = (cfg.seed, env.rank, step, micro)
                torch.manual_seed(derive_seed("torch", *parts))  # LoRA dropout etc.
                samples = batcher.next()
                loss, per_sample, t, _ = training_loss(model, engine, samples, cfg, parts, cache)
                engine.backward(loss)
                engine.step()
                step_losses.append(per_sample)
                bins = timestep_bins(t.cpu(), NUM_BINS)
                for b, v in zip(bins.tolist(), per_sample.cpu().tolist()):
                    window["bins"][b] += v
                    window["bins"][NUM_BINS + b] += 1
            step += 1
            step_loss = _all_reduce(
                torch.stack([torch.cat(step_losses).mean().double().cpu(), torch.ones((), dtype=torch.float64)])
            )
            window["loss"] += float(step_loss[0] / step_loss[1])
            window["n"] += 1
            if env.rank == 0:
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": float(step_loss[0] / step_loss[1])}) + "\n")

            if step % cfg.schedule.log_every == 0 or step == cfg.schedule.max_steps:
                bins_all = _all_reduce(window["bins"])
                elapsed = time.perf_counter() - window["t0"]
                samples_per_step = cfg.schedule.micro_batch_size * cfg.schedule.grad_accum * env.world_size
                last = {
                    "loss": window["loss"] / window["n"],
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window["n"] * samples_per_step / elapsed,
                    "epoch": state.epoch,
                }
                for b in range(NUM_BINS):
                    if bins_all[NUM_BINS + b] > 0:
                        last[f"loss_t{b / NUM_BINS:.2f}-{(b + 1) / NUM_BINS:.2f}"] = float(
                            bins_all[b] / bins_all[NUM_BINS + b]
                        )
                tracker.log_metrics(last, step=step)
                window = {
                    "loss": 0.0,
                    "n": 0,
                    "bins": torch.zeros(2 * NUM_BINS, dtype=torch.float64),
                    "t0": time.perf_counter(),
                }

            validate = cfg.schedule.validate_every and (
                step % cfg.schedule.validate_every == 0 or step == cfg.schedule.max_steps
            )
            if validate and val_samples:
                engine.eval()
                val = {"val_loss": validation_loss(model, engine, val_samples, cfg)}
                if env.rank == 0:
                    grid = validation_grid(model, val_samples, cfg, output / "validation" / f"step_{step:06d}.png")
                    tracker.log_artifact(grid, "validation")
                    tracker.log_metrics(val, step=step)
                    last.update(val)
                elif cfg.deepspeed.zero_stage == 3:  # partitioned weights: every rank takes part in sampling
                    with tempfile.TemporaryDirectory() as tmp:
                        validation_grid(model, val_samples, cfg, Path(tmp) / "grid.png")
                engine.train()

            if step % cfg.schedule.checkpoint_every == 0 or step == cfg.schedule.max_steps:
                streams = _gather_states(state, env.world_size)
                with tempfile.TemporaryDirectory(prefix="know3d-ckpt-") as tmp:
                    ckpt = Path(tmp)
                    engine.save_checkpoint(str(ckpt), tag=DS_TAG, exclude_frozen_parameters=True)
                    if env.rank == 0:
                        (ckpt / STATE_FILE).write_text(
                            json.dumps(
                                {
                                    "step": step,
                                    "world_size": env.world_size,
                                    "streams": streams,
                                    "mlflow_run_id": tracker.run_id,
                                    "data_digest": data_digest,
                                }
                            )
                        )
                    env.report({"step": step, **last}, ckpt)

        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if cfg.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )  # ZeRO-3 partitions the LoRA weights: gather on all ranks
        with gather:
            if env.rank == 0:
                lora_dir = export_lora(
                    engine.module,
                    output / "lora",
                    {
                        "model": cfg.model.name,
                        "revision": cfg.model.revision,
                        "image_size": cfg.data.image_size,
                        "instruction": cfg.data.instruction,
                        "rank": cfg.lora.rank,
                        "alpha": cfg.lora.alpha,
                        "steps": step,
                        "data_digest": data_digest,
                        # a selected subset (overfit checks, the quickstart): which pairs the LoRA saw
                        "trained_on": ([s["__key__"] for s in stream.selection()] if stream.selective else None),
                    },
                )
                tracker.log_artifact(lora_dir, "lora")
        status = "FINISHED"
    finally:
        tracker.close(status)
    return last


# --------------------------------------------------------------------------- launchers


def ray_train_loop(config: dict) -> None:
    """``train_loop_per_worker`` of Ray Train's ``TorchTrainer`` (process group already set up)."""
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainBackviewConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()
    resume = None
    tmp = None
    if checkpoint is not None:
        tmp = Path(tempfile.mkdtemp(prefix="know3d-resume-"))
        resume = Path(checkpoint.to_directory(str(tmp)))

    def report(metrics: dict, ckpt: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    try:
        run_worker(
            cfg, WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), device, resume, report)
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def torchrun_main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc_per_node N -m know3d.training.backview_train CONFIG [--set k=v ...]``.

    Checkpoints go to ``<output>/checkpoints/step_XXXXXXXX`` (the output must be on shared
    storage for multi-node runs); a restart resumes from the newest complete one.
    """
    import argparse

    import torch.distributed as dist

    from know3d.core.config import load_config

    parser = argparse.ArgumentParser(prog="python -m know3d.training.backview_train")
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, model=TrainBackviewConfig)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    root = Path(cfg.output) / "checkpoints"

    def report(metrics: dict, ckpt: Path | None) -> None:
        if ckpt is None:
            return
        dest = root / f"step_{metrics['step']:08d}"
        dest.mkdir(parents=True, exist_ok=True)
        for item in ckpt.rglob("*"):  # every rank copies its own files; rank 0 the shared ones
            if item.is_file():
                target = dest / item.relative_to(ckpt)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
        dist.barrier()
        if rank == 0:
            (dest / "COMPLETE").write_text("ok")
            for old in sorted(root.glob("step_*"))[: -cfg.schedule.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    complete = sorted(p for p in root.glob("step_*") if (p / "COMPLETE").is_file()) if root.is_dir() else []
    try:
        run_worker(cfg, WorkerEnv(rank, world, local_rank, device, complete[-1] if complete else None, report))
    finally:
        dist.destroy_process_group()


def steps_done(metrics_file: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record wins when a resumed run re-logs)."""
    out: dict[int, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    torchrun_main()
