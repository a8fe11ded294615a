"""The Know3D generator's two stages as trained and shipped: TRELLIS.2's sparse-structure flow
(:mod:`~know3d.training.generator.ss_flow`, ``model.stage: ss``) or shape structured-latent flow
(:mod:`~know3d.training.generator.slat_flow`, ``model.stage: shape``), each with the H branch, a peft
LoRA on the backbone's attention (the same module names in both), and the files it is exported to.

Trainable (``finetune: lora``): the LoRA matrices (rank 64 on every self- and image
cross-attention linear, :data:`~know3d.training.generator.config.GENERATOR_LORA_TARGETS`) and the
whole ``know3d_*`` branch; everything else is frozen. ``finetune: full`` trains every weight
(plain TRELLIS.2 fine-tuning, also the way to make a CPU-size base).

Export (``<output>/generator/``):

* ``know3d_generator.json`` — what inference needs: the base (``model.base``), the flow config
  (with the branch width), the condition, LoRA settings, the capture settings of H, the SS
  decoder, DINOv3, the sampler defaults, provenance (steps, data digest, MLflow run);
* ``adapter.safetensors`` — the EMA weights of the trainable tensors only (LoRA in peft's names
  + the branch), small;
* ``merged/ss_flow.safetensors`` + ``ss_flow.json`` (stage 2: ``slat_flow.*``) (``export_merged``) —
  one plain checkpoint with the LoRA folded in, loadable by ``load_ss_flow`` / ``load_slat_flow``
  (and so usable as the ``model.base`` of a later fine-tune).

Loading (:func:`load_generator`) rebuilds base + LoRA and loads the adapter strictly: a file of
another architecture, or H of another width, is refused with the file named.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from know3d.training.generator.config import GENERATOR_LORA_TARGETS, GeneratorModelConfig
from know3d.training.generator.ss_flow import (
    SSFlowConfig,
    SSFlowModel,
    is_branch_key,
    load_ss_flow,
    save_ss_flow,
    stored_config,
)

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "know3d_generator.json"
DEBUG_BASE = "debug"
DEBUG_SHAPE_PE = "ape"


class GeneratorLoadError(Exception):
    """A generator folder that cannot be used (names the file and why)."""


def is_debug(base: str) -> bool:
    return base == DEBUG_BASE or base.startswith(DEBUG_BASE + ":")


def _stage_kit(stage: str):
    """(config class, model class, loader, saver, stored-config reader) of a stage."""
    if stage == "shape":
        from know3d.training.generator import slat_flow as sf

        return sf.SLatFlowConfig, sf.SLatFlowModel, sf.load_slat_flow, sf.save_slat_flow, sf.stored_config
    return SSFlowConfig, SSFlowModel, load_ss_flow, save_ss_flow, stored_config


def debug_base(hidden_channels: int | None, cond_channels: int, seed: int = 0, stage: str = "ss") -> torch.nn.Module:
    """The CPU-size base: TRELLIS.2's architecture at debug width with seeded random weights. A
    released base has trained (non-zero) output and modulation layers; upstream's init zeroes
    them, which would leave a frozen model whose output no LoRA can move, so the debug base gives
    them small random values instead (the branch's output layer stays zero)."""
    config_cls, model_cls, *_ = _stage_kit(stage)
    cfg = replace(config_cls.debug(hidden_channels=hidden_channels), cond_channels=cond_channels)
    if stage == "shape":
        # absolute positions, as the stage-1 debug flow: a CPU-size base memorizes its few assets
        # faster with them than with RoPE (see benchmarks/RESULTS.md)
        cfg = replace(cfg, pe_mode=DEBUG_SHAPE_PE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
        for linear in (model.out_layer, model.adaLN_modulation[-1]):
            torch.nn.init.normal_(linear.weight, std=1.0 / math.sqrt(linear.in_features))
    return model


def build_base(cfg: GeneratorModelConfig, hidden_channels: int | None, cond_channels: int) -> torch.nn.Module:
    """The stage's base flow (official weights or the debug one) with the branch when a condition is used."""
    if is_debug(cfg.base):
        return debug_base(hidden_channels, cond_channels, int(cfg.base.partition(":")[2] or 0), cfg.stage)
    _, _, load, _, read_config = _stage_kit(cfg.stage)
    flow_cfg = replace(read_config(cfg.base), hidden_channels=hidden_channels, use_checkpoint=False)
    model = load(cfg.base, flow_cfg)
    if model.cfg.cond_channels != cond_channels:
        raise ValueError(
            f"{cfg.base}: cond_channels {model.cfg.cond_channels}, the DINOv3 features have {cond_channels}"
        )
    return model


def add_lora(model: SSFlowModel, cfg: GeneratorModelConfig) -> list[torch.nn.Parameter]:
    """Freeze the base, add the LoRA (``finetune: lora``) and return the trainable parameters in
    a fixed order (names sorted). ``full`` trains everything."""
    if cfg.finetune == "full":
        params = [p for _, p in sorted(model.named_parameters())]
        for p in params:
            p.requires_grad_(True)
        return params
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=GENERATOR_LORA_TARGETS,
        ),
        model,
    )
    trainable = []
    for name, p in sorted(model.named_parameters()):
        train = "lora_" in name or is_branch_key(name)
        p.requires_grad_(train)
        if train:
            trainable.append(p)
    return trainable


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (what ``adapter.safetensors`` holds)."""
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_generator(model: torch.nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """``adapter.safetensors`` (the trainable tensors as they are in ``model`` now; call it inside
    ``ema.swapped()`` to export the EMA) + ``know3d_generator.json``."""
    from safetensors.torch import save_file

    from know3d.core.io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ADAPTER_FILE}.tmp"
    save_file(trainable_state(model), str(tmp), metadata={"architecture": type(model).__name__})
    tmp.replace(folder / ADAPTER_FILE)
    atomic_write(folder / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise GeneratorLoadError(f"{folder}: no {META_FILE} (not an exported generator; see `know3d train generator`)")
    return json.loads(path.read_text())


def load_generator(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode with the exported weights, metadata) of an exported generator."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    cfg = GeneratorModelConfig.model_validate(meta["model"])
    flow = _stage_kit(cfg.stage)[0].from_json(meta["flow_config"])
    model = build_base(cfg, flow.hidden_channels, flow.cond_channels)
    add_lora(model, cfg)
    path = folder / ADAPTER_FILE
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            architecture = (f.metadata() or {}).get("architecture")
    except (SafetensorError, OSError) as exc:
        raise GeneratorLoadError(f"{path}: unreadable ({exc})") from None
    if architecture is not None and architecture != type(model).__name__:
        raise GeneratorLoadError(
            f"{path}: not the weights of this generator architecture (adapter of a {architecture}, "
            f"{META_FILE} describes a {type(model).__name__})"
        )
    expected = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if list(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", sorted(wrong)))
            if keys
        )
        raise GeneratorLoadError(f"{path}: not the weights of this generator architecture ({detail})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
    model.requires_grad_(False)
    return model.to(device).eval(), meta


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model of the same class (:class:`SSFlowModel` or ``SLatFlowModel``) with the LoRA
    folded into the base weights."""
    plain = type(model)(model.cfg)
    state = {}
    modules = dict(model.named_modules())
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        if key.endswith(("weight", "bias")) and ".base_layer." in name:
            module = modules[name.rsplit(".base_layer.", 1)[0]]
            if name.endswith("weight"):
                value = value + module.get_delta_weight("default").to(value.dtype)
        state[key] = value
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def export_merged(model: torch.nn.Module, folder: Path) -> Path:
    """``<folder>/ss_flow.*`` (stage 2: ``slat_flow.*``): the LoRA merged, branch included."""
    from know3d.training.generator.slat_flow import SLatFlowModel, save_slat_flow

    plain = merged_model(model)
    return save_slat_flow(plain, folder) if isinstance(plain, SLatFlowModel) else save_ss_flow(plain, folder)


def load_decoder(source: str, device: str | torch.device = "cpu", part: str = "decoder"):
    """The SS-VAE decoder (``part="encoder"``: its encoder, for front guidance): ``debug`` = the
    shipped CPU one, else a folder / file / hub id."""
    from know3d.training.generator.ss_vae import load_ss_vae

    if source == "debug":
        from know3d.training.generator.debug_ss_vae import resolve_debug_ss_vae

        return getattr(resolve_debug_ss_vae(), part).to(device).eval()
    return load_ss_vae(source, part, device=device)


def load_shape_codec(source: str, device: str | torch.device = "cpu"):
    """Stage 2's shape SC-VAE decoder with its latent normalization (``debug`` = the shipped one)."""
    from know3d.training.generator.shape_vae import ShapeVAELoadError, load_shape_vae

    try:
        return load_shape_vae(source, parts=("decoder",), device=device)
    except ShapeVAELoadError as exc:
        raise GeneratorLoadError(str(exc)) from None
