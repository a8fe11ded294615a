"""The Know3D generator's trainer (paper §3.2, §4.1.2), both stages, on the shared engine.

:func:`run_worker` runs on every data-parallel rank under Ray Train (``know3d train generator``)
or torchrun (``torchrun --nproc_per_node N -m know3d.training.generator.train CONFIG [--set
k=v ...]``); the engine (:mod:`know3d.training.engine`) provides DeepSpeed, checkpoints/resume,
metrics and MLflow, as for the back-view LoRA.

One optimizer step, on each rank: ``micro_batch_size × grad_accum`` pairs of this rank's slice of
a seeded per-epoch permutation (:class:`IndexStream`); x0 = the asset's SS latent [8, 16³]; the
front view's DINOv3 tokens from the frozen encoder; the condition (H from the pre-pass, captured
online, or an ablation variant); TRELLIS.2's flow matching (σmin, logitNormal(1, 1) timesteps,
t·1000, conditions zeroed with p = 0.1, jointly or independently) through
:func:`~know3d.training.generator.flow.flow_loss`. AdamW (lr 1e-4, betas (0.9, 0.95), wd 0.01)
on the LoRA + branch; DeepSpeed clips at the adaptive threshold of
:class:`~know3d.training.generator.flow.AdaptiveGradClipper` (95th percentile of the recent
pre-clip norms, at most ``optim.max_grad_norm``), which it is given before each step — the norm
DeepSpeed reports after the step feeds the buffer, so the threshold lags one step behind
upstream's (which clips after measuring the same step); an EMA (0.9999) of the trainable weights
is updated after every step, checkpointed, and used for validation and export.

Validation (every ``schedule.validate_every`` steps, rank 0, EMA weights): sample latents for
held-out assets with the Euler CFG sampler, decode with the SS decoder, and score the occupancy
against the true one (IoU, Chamfer); an image of sampled vs true projections goes to MLflow.
Stage 2 (``model.stage: shape``): the same step on the shape structured latents — x0 = the
asset's normalized shape SC-VAE latent (``feats [M, C]`` at its coordinates, a batch packed as
``[N, C]`` + ``[N, 4]``), TRELLIS.2's SLat flow, uniform timesteps by the stage-2 configs; the loss
is each sample's MSE over its voxels (:func:`~know3d.training.generator.flow.sparse_flow_loss`).
Validation samples latents on each held-out asset's true structure, decodes them with the shape
SC-VAE and scores the dual grid against the true one (fine-voxel IoU, Chamfer of dual vertices).

Determinism: every random draw of step s on rank r is seeded by (seed, r, s); the stream position,
EMA and clipper buffer are checkpointed, so a resumed run logs the same losses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from know3d.core.shards import dataset_refs, resolve_shards
from know3d.training.data import StreamState
from know3d.training.engine import checkpoint
from know3d.training.engine.config import derive_seed, use_bf16
from know3d.training.engine.dist import all_reduce_sum
from know3d.training.engine.ema import EMA
from know3d.training.engine.env import WorkerEnv
from know3d.training.engine.launch import torchrun_main
from know3d.training.engine.metrics import MetricsFile, MetricsWindow, progress_line
from know3d.training.engine.optim import initialize
from know3d.training.engine.tracking import TrainingTracker
from know3d.training.flow_matching import timestep_bins
from know3d.training.generator.config import TrainGeneratorConfig
from know3d.training.generator.data import GeneratorPairs
from know3d.training.generator.flow import (
    AdaptiveGradClipper,
    EulerCfgSampler,
    SparseSample,
    flow_loss,
    sparse_flow_loss,
)
from know3d.training.generator.model import (
    add_lora,
    build_base,
    export_merged,
    load_decoder,
    load_shape_codec,
    save_generator,
)
from know3d.training.generator.occupancy import comparison_image, occupancy_chamfer, occupancy_iou

STAGE = "train.generator"
NUM_BINS = 4
BIN_NAMES = [f"loss_t{b / NUM_BINS:.2f}-{(b + 1) / NUM_BINS:.2f}" for b in range(NUM_BINS)]
GENERATOR_DIR = "generator"


# --------------------------------------------------------------------------- data


class IndexStream:
    """This rank's indices of a map-style dataset: a seeded permutation per epoch, every
    ``world_size``-th index from ``rank``; ``state`` (epoch, consumed) is the resume point."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise ValueError(f"{size} training pairs cannot feed {world_size} workers")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
        order = torch.randperm(self.size, generator=gen).tolist()
        per_rank = self.size // self.world_size  # equal lengths: ranks stay in lockstep
        return order[self.rank :: self.world_size][:per_rank]

    def next(self, state: StreamState) -> int:
        indices = self.epoch_indices(state.epoch)
        if state.consumed >= len(indices):
            state.epoch, state.consumed = state.epoch + 1, 0
            indices = self.epoch_indices(state.epoch)
        state.consumed += 1
        return indices[state.consumed - 1]


def find_targets(dataset: Path, targets: str | None, stage: str = "ss") -> Path:
    """The target store folder: given, or the only one of the stage under ``<dataset>/targets``
    (``r<res>-<encoder>`` for stage 1, ``shape-r<res>-<encoder>`` for stage 2)."""
    if targets:
        return Path(targets)
    pattern = "shape-r*-*" if stage == "shape" else "r*-*"
    found = sorted(p for p in (Path(dataset) / "targets").glob(pattern) if p.is_dir())
    if len(found) != 1:
        what = ", ".join(p.name for p in found) or "none"
        command = "know3d data targets" + (" --stage shape" if stage == "shape" else "")
        raise FileNotFoundError(
            f"{dataset}: {len(found)} {stage} target stores ({what}); run `{command}` or set data.targets"
        )
    return found[0]


def select_assets(pairs: GeneratorPairs, max_assets: int | None) -> GeneratorPairs:
    """Keep the pairs of the first ``max_assets`` assets (index order)."""
    if max_assets is None:
        return pairs
    keep: list[str] = []
    for ref in pairs.refs:
        if ref.asset not in keep:
            keep.append(ref.asset)
    chosen = set(keep[:max_assets])
    pairs.refs = [r for r in pairs.refs if r.asset in chosen]
    return pairs


def _condition_dir(cfg: TrainGeneratorConfig) -> Path | None:
    if cfg.model.condition == "none" or cfg.data.hidden_mode == "online":
        return None
    from know3d.training.generator.hidden_states import cache_folder

    return cache_folder(cfg.data.hidden)


def require_dataset(cfg: TrainGeneratorConfig) -> None:
    """An empty ``data.dataset`` would read the current folder: refuse it (driver and torchrun alike)."""
    if not cfg.data.dataset:
        raise ValueError(
            "data.dataset is empty: give a data build, e.g. --dataset runs/geo (torchrun: --set data.dataset=runs/geo)"
        )


def open_pairs(cfg: TrainGeneratorConfig, split: str) -> GeneratorPairs:
    require_dataset(cfg)
    d = cfg.data
    condition = "none" if d.hidden_mode == "online" else cfg.model.condition
    targets = find_targets(Path(d.dataset), d.targets, cfg.model.stage)
    pairs = GeneratorPairs(d.dataset, targets, condition, _condition_dir(cfg), split, keys=d.keys or None)
    return select_assets(pairs, d.max_assets)


def validation_records(cfg: TrainGeneratorConfig, train: GeneratorPairs) -> list[dict]:
    """The first pair of each of ``num_validation`` assets: held-out (val split) or the training ones."""
    if cfg.data.validation_split == "train":
        pairs = train
    else:
        try:
            pairs = open_pairs(cfg.model_copy(update={"data": cfg.data.model_copy(update={"keys": []})}), "val")
        except Exception:  # noqa: BLE001 - no val split: validation is skipped, training is not
            return []
    seen, out = set(), []
    for i, ref in enumerate(pairs.refs):
        if ref.asset not in seen:
            seen.add(ref.asset)
            out.append(pairs[i])
        if len(out) >= cfg.data.num_validation:
            break
    return out


# --------------------------------------------------------------------------- frozen inputs


class FrozenInputs:
    """The frozen encoders of a batch: DINOv3 front tokens and, in online mode, H."""

    def __init__(self, cfg: TrainGeneratorConfig, device: torch.device) -> None:
        from know3d.training.generator.dino import front_features

        self.cfg, self.device = cfg, device
        self.dino = front_features(cfg.model.dino, cfg.model.dino_resolution, device=device)
        self.pipe = None
        if cfg.data.hidden_mode == "online":
            from know3d.training.generator.hidden_states import load_backview_pipeline

            # H only (early exit), with the pre-pass's prompt/noise seeding: equal to the cached H
            self.capture_cfg = cfg.data.hidden.model_copy(update={"variants": ["hidden"]})
            self.pipe = load_backview_pipeline(self.capture_cfg, device)

    def hidden(self, records: list[dict]) -> torch.Tensor | None:
        if self.pipe is None:
            if records[0]["condition"] is None:
                return None
            return torch.stack([r["condition"] for r in records]).to(self.device)
        from know3d.training.data import image_to_array
        from know3d.training.generator.hidden_states import capture_pair

        states = []
        for r in records:
            front = image_to_array(r["front"], self.capture_cfg.image_size)
            states.append(capture_pair(self.pipe, self.capture_cfg, {**r, "front": front})["hidden"])
        return torch.stack(states).to(self.device)

    @torch.no_grad()
    def conditions(self, records: list[dict], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(DINOv3 front tokens [B, T, D], the branch's condition [B, L, C] or None)."""
        cond = self.dino.encode([r["front"] for r in records]).to(self.device, dtype)
        hidden = self.hidden(records)
        return cond, None if hidden is None else hidden.to(dtype)

    @torch.no_grad()
    def batch(self, records: list[dict], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage 1: (SS latents [B, 8, r, r, r], cond, hidden)."""
        x0 = torch.stack([r["latent"] for r in records]).to(self.device, dtype)
        return (x0, *self.conditions(records, dtype))

    @torch.no_grad()
    def sparse_batch(self, records: list[dict], dtype: torch.dtype):
        """Stage 2: (latent feats [N, C], coords [N, 4] = (sample, x, y, z), cond, hidden)."""
        feats = torch.cat([r["shape_feats"] for r in records]).to(self.device, dtype)
        coords = torch.cat(
            [torch.nn.functional.pad(r["shape_coords"].long(), (1, 0), value=i) for i, r in enumerate(records)]
        ).to(self.device)
        return (feats, coords, *self.conditions(records, dtype))


def condition_width(cfg: TrainGeneratorConfig, frozen: FrozenInputs, train: GeneratorPairs) -> int | None:
    """Width of what the branch reads (None: no branch), from the data itself."""
    if cfg.model.condition == "none":
        return None
    hidden = frozen.hidden([train[0]])
    return int(hidden.shape[-1])


# --------------------------------------------------------------------------- steps


def clip_threshold(engine, value: float) -> None:
    """Make DeepSpeed clip at ``value`` in its next step (engine config + ZeRO / bf16 optimizers)."""
    engine._config.gradient_clipping = value
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = value


def param_grad_norm(params: list[torch.nn.Parameter]) -> float | None:
    """The global L2 norm of unpartitioned gradients (ZeRO stage 0 in fp32, where DeepSpeed clips
    with ``clip_grad_norm_`` and keeps no norm)."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@dataclass
class Trainer:
    cfg: TrainGeneratorConfig
    env: WorkerEnv
    engine: Any
    params: list[torch.nn.Parameter]
    frozen: FrozenInputs
    train: GeneratorPairs
    stream: IndexStream
    state: StreamState
    ema: EMA
    clipper: AdaptiveGradClipper
    dtype: torch.dtype

    def step(self, step: int, window: MetricsWindow) -> float:
        s, losses = self.cfg.schedule, []
        for micro in range(s.grad_accum):
            parts = (self.cfg.seed, self.env.rank, step, micro)
            records = [self.train[self.stream.next(self.state)] for _ in range(s.micro_batch_size)]
            gen = torch.Generator(device=self.frozen.device).manual_seed(derive_seed("noise", *parts))
            if self.cfg.model.stage == "shape":
                feats, coords, cond, hidden = self.frozen.sparse_batch(records, self.dtype)
                out = sparse_flow_loss(self.engine, feats, coords, cond, hidden, generator=gen, config=self.cfg.flow)
            else:
                x0, cond, hidden = self.frozen.batch(records, self.dtype)
                out = flow_loss(self.engine, x0, cond, hidden, generator=gen, config=self.cfg.flow)
            self.engine.backward(out.loss)
            own_norm = None
            if micro == s.grad_accum - 1:
                clip_threshold(self.engine, self.clipper.threshold)
                if self.cfg.deepspeed.zero_stage == 0 and self.dtype == torch.float32:
                    own_norm = param_grad_norm(self.params)  # DeepSpeed clips these without reporting
            self.engine.step()
            losses.append(out.per_sample.detach().float())
            for b, v in zip(timestep_bins(out.t.cpu(), NUM_BINS).tolist(), out.per_sample.cpu().tolist()):
                window.add(BIN_NAMES[b], v)
        reported = self.engine.get_global_grad_norm()
        self.clipper.record(own_norm if own_norm is not None else None if reported is None else float(reported))
        self.ema.update()
        mean = torch.cat(losses).mean().double().cpu()
        total = all_reduce_sum(torch.stack([mean, torch.ones((), dtype=torch.float64)]))
        loss = float(total[0] / total[1])
        window.add("loss", loss)
        window.add_samples(s.samples_per_step(self.env.world_size))
        return loss


@torch.no_grad()
def sample_occupancy(model, decoder, frozen: FrozenInputs, records: list[dict], cfg, seed: int) -> list[np.ndarray]:
    """Sampled occupancy grids (decoder logits > 0) for ``records``, one seeded noise each."""
    sampler = EulerCfgSampler(cfg.sampler, sigma_min=cfg.flow.sigma_min)
    param = next(model.parameters())
    grids = []
    for i, record in enumerate(records):
        _, cond, hidden = frozen.batch([record], param.dtype)
        gen = torch.Generator(device=param.device).manual_seed(derive_seed("sample", seed, i))
        shape = (1, model.cfg.in_channels, *(model.cfg.resolution,) * 3)
        noise = torch.randn(shape, generator=gen, device=param.device, dtype=param.dtype)
        latent = sampler.sample(model, noise, cond, hidden).samples
        logits = decoder(latent.float().to(next(decoder.parameters()).device))
        grids.append((logits[0, 0] > 0).cpu().numpy())
    return grids


@torch.no_grad()
def sample_shape_latents(
    model, frozen: FrozenInputs, records: list[dict], cfg, seed: int, coords: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Stage 2: sampled latent feats [M, C] (normalized) on each record's structure — ``coords``
    [M, 3] when given (stage 1's output at inference), else the record's true latent coordinates
    (validation scores stage 2 on its own)."""
    sampler = EulerCfgSampler(cfg.sampler, sigma_min=cfg.flow.sigma_min)
    param = next(model.parameters())
    out = []
    for i, record in enumerate(records):
        cond, hidden = frozen.conditions([record], param.dtype)
        xyz = coords[i] if coords is not None else record["shape_coords"]
        gen = torch.Generator(device=param.device).manual_seed(derive_seed("sample", seed, i))
        noise = torch.randn((1, len(xyz), model.cfg.in_channels), generator=gen, device=param.device, dtype=param.dtype)
        wrapped = SparseSample(model, xyz.to(param.device))
        out.append(sampler.sample(wrapped, noise, cond, hidden).samples[0].float().cpu())
    return out


def shape_scores(decoded, truth, resolution: int) -> dict[str, float]:
    """IoU of the fine voxels and the symmetric Chamfer distance (mean of both directions, unit
    cube) between the dual vertices of a decoded and a true :class:`DualGrid`."""
    from know3d.evaluation.geometry import nearest_distances

    a = {tuple(c) for c in np.asarray(decoded.coords).tolist()}
    b = {tuple(c) for c in np.asarray(truth.coords).tolist()}
    iou = len(a & b) / max(len(a | b), 1)
    if not len(decoded) or not len(truth):
        return {"iou": iou, "chamfer": float("inf")}
    pred, true = decoded.positions(resolution), truth.positions(resolution)
    d1, d2 = nearest_distances(pred, true)[0], nearest_distances(true, pred)[0]
    return {"iou": iou, "chamfer": float(d1.mean() + d2.mean()) / 2}


def fine_grid(grid, resolution: int) -> np.ndarray:
    occupancy = np.zeros((resolution,) * 3, dtype=bool)
    if len(grid):
        occupancy[tuple(np.asarray(grid.coords).T)] = True
    return occupancy


def validate(trainer: Trainer, decoder, records: list[dict], tracker: TrainingTracker, step: int) -> dict:
    """EMA-weight samples for ``records`` scored against their truth (rank 0): stage 1's occupancy
    (IoU, Chamfer of the voxels); stage 2's decoded dual grid on the true structure (fine-voxel IoU,
    Chamfer of the dual vertices)."""
    model = trainer.engine.module
    model.eval()
    cfg = trainer.cfg
    with trainer.ema.swapped():
        if cfg.model.stage == "shape":
            latents = sample_shape_latents(model, trainer.frozen, records, cfg, cfg.seed)
        else:
            grids = sample_occupancy(model, decoder, trainer.frozen, records, cfg, cfg.seed)
    model.train()
    if cfg.model.stage == "shape":
        res = decoder.resolution
        decoded = [decoder.decode(r["shape_coords"], z) for r, z in zip(records, latents)]
        scores = [shape_scores(d, r["grid"], res) for d, r in zip(decoded, records)]
        ious = [sc["iou"] for sc in scores]
        chamfers = [sc["chamfer"] for sc in scores]
        grids = [fine_grid(d, res) for d in decoded]
        truths = [fine_grid(r["grid"], res) for r in records]
    else:
        truths = [r["occupancy"].numpy() for r in records]
        ious = [occupancy_iou(g, t) for g, t in zip(grids, truths)]
        chamfers = [occupancy_chamfer(g, t) for g, t in zip(grids, truths)]
    metrics = {"val_iou": float(np.mean(ious)), "val_chamfer": float(np.mean(chamfers))}
    path = Path(trainer.cfg.output) / "validation" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(f"{r['key'][:12]} IoU {iou:.2f}", g, t) for r, g, t, iou in zip(records, grids, truths, ious)]
    comparison_image(pairs).save(path)
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(path, "validation")
    return metrics


def export(trainer: Trainer, tracker: TrainingTracker, step: int, digest: str) -> Path | None:
    """``<output>/generator``: the EMA weights of the LoRA + branch and what inference needs."""
    if not trainer.env.is_main:
        return None
    cfg, model = trainer.cfg, trainer.engine.module
    folder = Path(cfg.output) / GENERATOR_DIR
    meta = {
        "model": cfg.model.model_dump(mode="json"),
        "flow_config": model.cfg.to_json(),
        "condition": cfg.model.condition,
        "hidden": cfg.data.hidden.model_dump(mode="json", exclude={"cache_dir", "concurrency", "num_gpus_per_worker"}),
        "sampler": cfg.sampler.model_dump(mode="json"),
        "sigma_min": cfg.flow.sigma_min,
        "steps": step,
        "data_digest": digest,
        "mlflow_run_id": tracker.run_id,
        "trained_on": sorted({r.key for r in trainer.train.refs}) if cfg.data.keys or cfg.data.max_assets else None,
    }
    with trainer.ema.swapped():
        save_generator(model, folder, meta)
        if cfg.export_merged:
            export_merged(model, folder / "merged")
    tracker.log_artifact(folder, GENERATOR_DIR)
    return folder


def run_worker(cfg: TrainGeneratorConfig, env: WorkerEnv) -> dict:
    """Train on this rank until ``schedule.max_steps``; returns the last logged metrics."""
    torch.manual_seed(derive_seed("init", cfg.seed))
    bf16 = use_bf16(cfg.deepspeed, env.device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    train = open_pairs(cfg, "train")
    if len(train) == 0:
        raise ValueError(f"{cfg.data.dataset}: no training pairs with targets and conditions ({dict(train.skipped)})")
    frozen = FrozenInputs(cfg, env.device)
    model = build_base(cfg.model, condition_width(cfg, frozen, train), frozen.dino.dim)
    for block in model.blocks:
        block.use_checkpoint = cfg.model.gradient_checkpointing
    torch.manual_seed(derive_seed("lora", cfg.seed))
    params = add_lora(model, cfg.model)
    model.to(env.device).train()
    engine = initialize(model, params, cfg, env.world_size, bf16)
    ema = EMA(params, cfg.model.ema_decay)
    clipper = AdaptiveGradClipper(cfg.optim.max_grad_norm, cfg.clip_percentile, cfg.clip_buffer)
    resumed = checkpoint.resume(engine, env)
    if resumed.client_state:
        ema.load_state_dict(resumed.client_state["ema"])
        clipper.load_state_dict(resumed.client_state["clipper"])
    state = StreamState(**resumed.stream)
    stream = IndexStream(len(train), cfg.seed, env.rank, env.world_size)
    trainer = Trainer(cfg, env, engine, params, frozen, train, stream, state, ema, clipper, dtype)
    _, digest = resolve_shards([cfg.data.dataset], "train")
    s, step, last = cfg.schedule, resumed.step, {}
    window, metrics_file = MetricsWindow(), MetricsFile(Path(cfg.output), env.is_main)
    with TrainingTracker(cfg.mlflow, env, Path(cfg.output), STAGE, resumed.mlflow_run_id) as tracker:
        info = {
            "world_size": env.world_size,
            "trainable_parameters": sum(p.numel() for p in params),
            "frozen_parameters": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "data.pairs": len(train),
            "data.skipped": str(dict(train.skipped)),
            "data.digest": digest,
            "branch_width": model.cfg.hidden_channels,
        }
        tracker.start(cfg, info, dataset_refs([cfg.data.dataset]))
        decoder, val = None, []
        if env.is_main and s.validate_every > 0:
            if cfg.model.stage == "shape":
                decoder = load_shape_codec(cfg.model.shape_vae, env.device)
            else:
                decoder = load_decoder(cfg.model.ss_decoder, env.device)
            val = validation_records(cfg, train)
        started = time.perf_counter()
        while step < s.max_steps:
            loss = trainer.step(step, window)
            step += 1
            metrics_file.append(step, loss)
            if s.due(step, s.log_every):
                metrics = {
                    "loss": window.mean("loss"),
                    "lr": engine.lr_scheduler.get_last_lr()[0],
                    "samples_per_s": window.samples_per_s(),
                    "clip_threshold": min(clipper.threshold, 1e9),
                    "epoch": state.epoch,
                    **window.reduced_means(BIN_NAMES),
                }
                tracker.log_metrics(metrics, step)
                left = (s.max_steps - step) * s.samples_per_step(env.world_size)
                env.say(progress_line(step, s.max_steps, metrics["loss"], metrics["samples_per_s"], left))
                window.reset()
                last = metrics
            if s.due(step, s.validate_every) and val:
                last.update(validate(trainer, decoder, val, tracker, step))
            if s.due(step, s.checkpoint_every):
                record = {"mlflow_run_id": tracker.run_id, "data_digest": digest}
                client = {"ema": ema.state_dict(), "clipper": clipper.state_dict()}
                checkpoint.save(engine, env, step, state, last, record, client)
        last["train_seconds"] = time.perf_counter() - started
        export(trainer, tracker, step, digest)
    return last


if __name__ == "__main__":
    torchrun_main(
        run_worker, TrainGeneratorConfig, prog="torchrun --nproc_per_node N -m know3d.training.generator.train"
    )
