"""H: hidden states of the frozen back-view model while it generates the back view (Know3D §3.2).

The back-view model is diffusers' ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2511) with our
LoRA. :func:`capture` runs it on one front view with forward hooks on the configured
``transformer.transformer_blocks[i]`` and keeps, at one denoising step (``cfg.capture_step()``,
the quarter mark by default), each block's *image-stream* output restricted to the *target*
tokens, concatenated along channels: ``[T, L·C]``.

Target tokens. In the denoising loop the pipeline feeds the MMDiT
``latent_model_input = torch.cat([latents, image_latents], dim=1)`` — the packed noisy back-view
latents first, then the packed reference (front view) latents — with
``img_shapes = [[(1, h/2, w/2) of the target, *(1, h'/2, w'/2) of each reference]]``, and slices
its prediction ``noise_pred[:, : latents.size(1)]``. Every block returns
``(encoder_hidden_states, hidden_states)`` with the image stream in the same token order, so the
target tokens are the first ``prod(img_shapes[0][0])`` tokens of ``output[1]``; that count is read
from the ``img_shapes`` the transformer receives (a forward pre-hook), never assumed.

CFG. With ``cfg_scale > 1`` the pipeline runs the conditional pass first and the negative
(empty prompt) pass second in each step; only the conditional pass is captured.

Early exit. After the last configured block ran in the conditional pass of the capture step, the
hook raises a private exception that unwinds the pipeline: later blocks, the negative pass of that
step and all later steps are not run. The states equal those of a full run with the same seed at
that step (tested).

Two ways to get H. Cached: :func:`build_hidden_cache` (``know3d data hidden-states``), a Ray pre-pass (capture actors via
:func:`know3d.core.fanout.run_bounded`, one shard per call) writing one ``<key>.safetensors`` per
pair (``hidden`` in the storage dtype + metadata: prompt, description, layers, step, timestep),
atomically, skipped when present (resumable), in a folder tagged by every setting that changes
the states (model, LoRA sha256, layers, fraction, steps, CFG, prompt probability, seed, pooling,
dtype, ...). Online: a trainer holds a pipeline (:func:`load_backview_pipeline`) and calls
:func:`capture` (or :func:`capture_pair`) itself per sample; the generator trainer's switch
between the two comes with that trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from know3d.core.fanout import make_progress, run_bounded, task_error_kind
from know3d.core.io import atomic_write
from know3d.training.generator.config import HiddenStatesConfig
from know3d.training.prompting import stochastic_prompt

LORA_FILE = "pytorch_lora_weights.safetensors"
STORAGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VARIANT_TENSORS = ("hidden", "vae_latent", "dino_back")
log = logging.getLogger(__name__)


class MissingFrontView(ValueError):
    """A pair has no front view: nothing to generate from."""


class _EarlyExit(Exception):
    """Raised from the last hook after capture; unwinds the sampler (never leaves this module)."""


# --------------------------------------------------------------------------- inputs


def lora_digest(lora: str | Path | None) -> str:
    """sha256 of the LoRA's safetensors ('' without a LoRA); a missing folder/file is a short error."""
    if lora is None:
        return ""
    path = Path(lora)
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA folder {path} does not exist")
    weights = path / LORA_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {LORA_FILE} (expected an exported back-view LoRA folder)")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model(name: str) -> None:
    """A local model folder must hold safetensors weights (the loader refuses pickles)."""
    from know3d.training.edit_model import resolve_model_path

    path = Path(resolve_model_path(name))
    if path.is_dir() and not any(path.rglob("*.safetensors")):
        raise ValueError(f"model folder {path} has no .safetensors weights (only safetensors are loaded)")


def check_inputs(cfg: HiddenStatesConfig) -> None:
    check_model(cfg.model)
    lora_digest(cfg.lora)


def cache_folder(cfg: HiddenStatesConfig) -> Path:
    """``<cache_dir>/<tag>``: the tag covers everything that changes the stored states."""
    from know3d.training.latent_cache import model_identity

    key = {
        "model": model_identity(cfg.model),
        "revision": cfg.revision,
        "lora": lora_digest(cfg.lora),
        **cfg.model_dump(
            include={
                "image_size",
                "layers",
                "fraction",
                "steps",
                "cfg_scale",
                "seed",
                "prompt_probability",
                "instruction",
                "dtype",
                "compute_dtype",
                "variants",
            }
        ),
        "pool": cfg.pool,
    }
    if "dino_back" in cfg.variants:
        key.update(dino=model_identity(cfg.dino) if not cfg.dino.startswith("debug") else cfg.dino)
        key.update(dino_resolution=cfg.dino_resolution)
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / tag


def pair_seed(seed: int, key: str) -> int:
    """Noise and prompt seed of one pair: stable across runs, machines and actor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def pair_prompt(cfg: HiddenStatesConfig, key: str, components: list[str]) -> tuple[str, str | None]:
    """The stochastic prompt of one pair (instruction + a description with probability p)."""
    rng = random.Random(pair_seed(cfg.seed, key))
    return stochastic_prompt(components, cfg.prompt_probability, rng, cfg.instruction)


# --------------------------------------------------------------------------- capture


def pool_tokens(states, grid: tuple[int, int], k: int):
    """[T, C] target tokens on their (h, w) grid (row-major) -> [T/k², C] averages of k×k groups."""
    import torch.nn.functional as F

    if k == 1:
        return states
    h, w = grid
    if h % k or w % k:
        raise ValueError(f"pool_k {k} does not divide the {h}x{w} token grid")
    x = states.reshape(h, w, -1).permute(2, 0, 1).unsqueeze(0)
    return F.avg_pool2d(x, k).squeeze(0).permute(1, 2, 0).reshape((h // k) * (w // k), -1)


def capture(
    pipe,
    front: np.ndarray,
    prompt: str,
    cfg: HiddenStatesConfig,
    seed: int | None = None,
    early_exit: bool = True,
    dino=None,
):
    """Run the back-view sampler on ``front`` ([3, H, W] in [-1, 1], ``cfg.image_size``) with
    ``prompt`` and return ``{"hidden": float32 [T, L·C] (pooled when configured), "layers",
    "step", "timestep", "grid", "prompt", "transformer_calls"}``, plus per ablation variant in
    ``cfg.variants``: ``"vae_latent"`` (float32 [T, 4·z], the finished back view's packed,
    normalized latent tokens) and ``"dino_back"`` (float32 [1029, 1024] at full size: ``dino``'s
    features of the decoded back view; ``dino`` is a :class:`FrontFeatures`). ``hidden`` is
    absent when ``cfg.variants`` does not ask for it. The sampler exits early unless a variant
    needs the finished view or ``early_exit=False`` (for comparison only)."""
    import torch

    from know3d.training.edit_model import to_pil, vae_image_size

    blocks = pipe.transformer.transformer_blocks
    want_hidden = "hidden" in cfg.variants
    layers = list(cfg.layers) if want_hidden else []
    early_exit = early_exit and not cfg.full_run
    if "dino_back" in cfg.variants and dino is None:
        raise ValueError("variant dino_back needs a DINOv3 model: pass capture(..., dino=front_features(...))")
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the transformer has {len(blocks)} blocks")
    step = cfg.capture_step()
    last = max(layers, default=-1)
    state: dict[str, Any] = {"step": 0, "call": 0, "calls": 0, "active": False, "tokens": 0, "grid": None}
    captured: dict[int, torch.Tensor] = {}

    def before_transformer(module, args, kwargs):
        shapes = kwargs["img_shapes"][0]
        state["tokens"], state["grid"] = prod(shapes[0]), tuple(shapes[0][1:])
        state["active"] = state["step"] == step and state["call"] == 0  # the conditional pass comes first
        if state["active"]:
            state["timestep"] = float(kwargs["timestep"].flatten()[0])
        state["call"] += 1
        state["calls"] += 1

    def after_block(index: int):
        def hook(module, args, output):
            if not state["active"]:
                return
            image_stream = output[1]  # blocks return (encoder_hidden_states, hidden_states)
            captured[index] = image_stream[0, : state["tokens"]].detach().float().cpu()
            if early_exit and index == last:
                raise _EarlyExit

        return hook

    def after_step(pipeline, i, t, tensors):
        state["step"], state["call"] = i + 1, 0
        return {}

    handles = [pipe.transformer.register_forward_pre_hook(before_transformer, with_kwargs=True)]
    handles += [blocks[i].register_forward_hook(after_block(i)) for i in layers]
    guidance = {"true_cfg_scale": cfg.cfg_scale, "negative_prompt": " "} if cfg.cfg_scale > 1 else {}
    seed = cfg.seed if seed is None else seed
    result = None
    try:
        with torch.no_grad(), vae_image_size(cfg.image_size * cfg.image_size):
            result = pipe(
                image=[to_pil(front)],
                prompt=prompt,
                height=cfg.image_size,
                width=cfg.image_size,
                num_inference_steps=cfg.steps,
                generator=torch.Generator(device="cpu").manual_seed(seed),
                output_type="latent",
                callback_on_step_end=after_step,
                **({"true_cfg_scale": 1.0} | guidance),
            )
    except _EarlyExit:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(layers):
        raise RuntimeError(f"capture step {step} was not reached (captured layers {sorted(captured)})")
    out: dict[str, Any] = {}
    if want_hidden:
        out["hidden"] = pool_tokens(torch.cat([captured[i] for i in layers], dim=-1), state["grid"], cfg.pool)
    if result is not None and cfg.full_run:
        latent = result.images[:, : state["tokens"]].float()  # output_type="latent": packed [1, T, 4z]
        if "vae_latent" in cfg.variants:
            out["vae_latent"] = latent[0].cpu()
        if "dino_back" in cfg.variants:
            out["dino_back"] = dino.encode([to_pil(decode_packed(pipe, latent, state["grid"]))])[0].float().cpu()
    return out | {
        "layers": layers,
        "step": step,
        "timestep": state["timestep"],
        "grid": state["grid"],
        "prompt": prompt,
        "transformer_calls": state["calls"],
    }


def decode_packed(pipe, packed, grid: tuple[int, int]) -> np.ndarray:
    """Packed normalized latent tokens [1, T, 4z] on a (h/2, w/2) token grid -> image [3, H, W]
    in [-1, 1] (the pipeline's own decode: unpack, de-normalize, VAE decode)."""
    import torch

    from know3d.training.edit_model import unpack_latents

    z = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    latents = unpack_latents(packed.float().cpu(), 2 * grid[0], 2 * grid[1]) * std + mean
    param = next(pipe.vae.parameters())
    with torch.no_grad():
        image = pipe.vae.decode(latents.to(param.device, param.dtype), return_dict=False)[0][:, :, 0]
    return image[0].float().clamp(-1, 1).cpu().numpy()


def to_storage(hidden, dtype: str):
    """The states in the storage dtype (bf16 | fp16 | fp32)."""
    import torch

    return hidden.to(getattr(torch, STORAGE_DTYPES[dtype])).contiguous()


def load_backview_pipeline(cfg: HiddenStatesConfig, device=None):
    """The frozen base pipeline + LoRA on ``device`` (online mode holds one of these)."""
    import torch

    from know3d.training.edit_model import load_pipeline, torch_dtype

    check_inputs(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = load_pipeline(cfg.model, cfg.revision, dtype=torch_dtype(cfg.compute_dtype, device)).to(device)
    pipe.set_progress_bar_config(disable=True)
    if cfg.lora:
        pipe.load_lora_weights(str(cfg.lora))
    pipe.transformer.requires_grad_(False).eval()
    return pipe


def capture_pair(pipe, cfg: HiddenStatesConfig, row: dict, dino=None) -> dict:
    """One pair (``key``, ``front`` PNG bytes or a [3, H, W] array, ``components``) -> :func:`capture`'s
    dict plus the description used; the prompt and noise follow (seed, key)."""
    from know3d.training.data import decode_image

    key = row["key"]
    front = row.get("front")
    if front is None:
        raise MissingFrontView(f"pair {key}: no front view ({key}.front.png)")
    if isinstance(front, (bytes, bytearray)):
        front = decode_image(bytes(front), cfg.image_size, f"{key}.front.png")
    prompt, description = pair_prompt(cfg, key, list(row.get("components") or []))
    out = capture(pipe, front, prompt, cfg, seed=pair_seed(cfg.seed, key), dino=dino)
    out["description"] = description
    return out


# --------------------------------------------------------------------------- cached pre-pass


def shard_pairs(url: str) -> Iterator[dict]:
    """One shard -> ``{key, front (bytes | None), components}`` per sample (front None = missing)."""
    import fsspec

    def finish(sample: dict) -> dict:
        meta = json.loads(sample["json"]) if "json" in sample else {}
        return {
            "key": sample["key"],
            "front": sample.get("front.png"),
            "components": list(meta.get("components") or []),
        }

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict = {}
        for member in tar:
            key, _, field = member.name.partition(".")
            if current and current["key"] != key:
                yield finish(current)
                current = {}
            current["key"] = key
            if field in ("front.png", "json") and member.isfile():
                current[field] = tar.extractfile(member).read()
        if current:
            yield finish(current)


def entry_bytes(out: dict, cfg: HiddenStatesConfig) -> bytes:
    from safetensors.torch import save

    meta = {
        "prompt": out["prompt"],
        "description": out["description"] or "",
        "layers": json.dumps(out["layers"]),
        "step": str(out["step"]),
        "timestep": repr(out["timestep"]),
        "grid": json.dumps(list(out["grid"])),
        "pool": str(cfg.pool),
    }
    tensors = {name: to_storage(out[name], cfg.dtype) for name in VARIANT_TENSORS if name in out}
    # one metadata key: safetensors writes a multi-key metadata map in hash order (files would differ)
    return save(tensors, metadata={"know3d": json.dumps(meta, sort_keys=True)})


class HiddenEncoder:
    """One back-view pipeline per Ray actor; captures shards into the cache folder."""

    def __init__(self, cfg_json: str) -> None:
        from know3d.core.logs import quiet_third_party

        quiet_third_party()
        self.cfg = HiddenStatesConfig.model_validate_json(cfg_json)
        self.folder = cache_folder(self.cfg)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pipe = load_backview_pipeline(self.cfg)
        self.dino = None
        if "dino_back" in self.cfg.variants:
            from know3d.training.generator.dino import front_features

            device = next(self.pipe.transformer.parameters()).device
            self.dino = front_features(self.cfg.dino, self.cfg.dino_resolution, device=device)

    def encode_shard(self, url: str, keys: list[str] | None = None) -> dict[str, int]:
        """Counts per status: ``encoded``, ``cached`` (file present) or ``no_front_view``."""
        wanted = set(keys) if keys is not None else None
        counts: Counter[str] = Counter()
        for row in shard_pairs(url):
            if wanted is not None and row["key"] not in wanted:
                continue
            target = self.folder / f"{row['key']}.safetensors"
            if target.is_file():
                counts["cached"] += 1
                continue
            try:
                out = capture_pair(self.pipe, self.cfg, row, dino=self.dino)
            except MissingFrontView as exc:
                log.warning("%s", exc)
                counts["no_front_view"] += 1
                continue
            atomic_write(target, entry_bytes(out, self.cfg))
            counts["encoded"] += 1
        return dict(counts)


def build_hidden_cache(cfg: HiddenStatesConfig, urls: list[str], ray: Any, keys: list[str] | None = None):
    """The pre-pass over ``urls`` (``cfg.concurrency`` actors, one shard per call, a GPU each when
    the cluster has GPUs); returns counts per status. Inputs are checked before any actor starts;
    a failed shard raises, naming it, after the others finished."""
    check_inputs(cfg)
    folder = cache_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "settings.json", cfg.model_dump_json(indent=1))
    gpus = cfg.num_gpus_per_worker if ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=1)(HiddenEncoder)
    actors = [actor_cls.remote(cfg.model_dump_json()) for _ in range(min(cfg.concurrency, len(urls)))]
    counts: Counter[str] = Counter()
    errors: list[str] = []

    def on_done(url: str, result) -> None:
        if isinstance(result, Exception):
            errors.append(f"{url}: {task_error_kind(result)}: {str(result).splitlines()[0] if str(result) else ''}")
        else:
            counts.update(result)

    with make_progress() as progress:
        run_bounded(ray, lambda url, actor: actor.encode_shard.remote(url, keys), urls, actors, on_done, progress, "H")
    for actor in actors:
        ray.kill(actor)
    if errors:
        raise RuntimeError(f"hidden-state cache: {len(errors)} shard(s) failed, e.g. {errors[0]}")
    return dict(counts)


def load_entry(folder: Path, key: str) -> tuple[dict[str, Any], dict[str, str]]:
    """({variant: tensor in the storage dtype} — ``hidden`` [T, L·C], ``vae_latent``, ``dino_back``
    as configured — and the metadata) of one cached pair."""
    from safetensors import safe_open

    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the hidden-state cache (run build_hidden_cache)")
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, json.loads(f.metadata()["know3d"])
