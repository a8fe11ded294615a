"""Qwen-Image-Edit (Plus / 2509 / 2511) parts for back-view training and inference.

Loads diffusers' ``QwenImageEditPlusPipeline`` components from a hub id or folder (or a tiny
``debug:`` model built in code) and exposes what one training step needs, in the exact form the
pipeline uses at inference so a trained LoRA behaves the same in both:

* the front view is the edit reference: the text encoder (Qwen2.5-VL) sees it at the pipeline's
  condition size (384² area) inside the pipeline's prompt template, and the MMDiT sees its VAE
  latents appended to the noisy target tokens (``img_shapes = [target, reference]``);
* 2511's ``zero_cond_t`` (reference tokens modulated at t = 0) lives in the transformer config
  and is honoured by passing ``img_shapes`` per sample, exactly as the pipeline does;
* latents are normalized with the VAE's ``latents_mean``/``latents_std`` and packed 2×2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from know3d.core.logs import verbose
from know3d.training.debug_models import DEBUG_PREFIX, resolve_debug_model


def resolve_model_path(name: str, seed: int = 0) -> str:
    if name.startswith(DEBUG_PREFIX):
        return str(resolve_debug_model(name, seed=seed))
    return name


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_pipeline(name: str, revision: str | None = None, dtype: torch.dtype = torch.float32, **components):
    """The diffusers pipeline from a hub id / folder / ``debug:`` name (safetensors only);
    ``components`` replace parts, e.g. ``transformer=None`` to load only the frozen encoders."""
    from diffusers import QwenImageEditPlusPipeline
    from diffusers.utils import logging as diffusers_logging

    if not verbose():  # "Loading pipeline components..." bar: no environment variable turns it off
        diffusers_logging.disable_progress_bar()
    path = resolve_model_path(name)
    try:
        return QwenImageEditPlusPipeline.from_pretrained(
            path, revision=revision, dtype=dtype, use_safetensors=True, **components
        )
    except (OSError, ValueError) as exc:
        hint = ""
        if not Path(path).exists():
            hint = (
                f" ('{path}' is not a local folder; on a machine without internet download it first, e.g. "
                f"`hf download {path} --local-dir <dir>`, and set model.name to that folder)"
            )
        raise RuntimeError(f"cannot load the edit model '{name}': {exc}{hint}") from None


def random_transformer(name: str, dtype: torch.dtype, device: torch.device, seed: int):
    """The MMDiT of ``name`` (its ``transformer/config.json``) with random weights, allocated and
    initialized directly on ``device`` in ``dtype`` (a 20 B model never passes through host
    memory). Every rank gets the same weights for the same ``seed``."""
    from diffusers import QwenImageTransformer2DModel

    config = QwenImageTransformer2DModel.load_config(resolve_model_path(name), subfolder="transformer")
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = QwenImageTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, h, w] -> [B, (h/2)(w/2), 4C] (2×2 patches, the pipeline's layout)."""
    b, c, _, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latent size ``h×w``."""
    b, _, c4 = packed.shape
    x = packed.reshape(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


@contextlib.contextmanager
def vae_image_size(pixels: int) -> Iterator[None]:
    """The Edit-Plus pipeline VAE-encodes references at a fixed area (1024²); training uses
    ``image_size²``, so inference must too. This sets the module constant for the duration."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    old = module.VAE_IMAGE_SIZE
    module.VAE_IMAGE_SIZE = pixels
    try:
        yield
    finally:
        module.VAE_IMAGE_SIZE = old


def to_pil(image: np.ndarray) -> Image.Image:
    """[3, H, W] in [-1, 1] -> RGB PIL image."""
    arr = ((np.asarray(image, np.float32).transpose(1, 2, 0) + 1.0) * 127.5).round().clip(0, 255)
    return Image.fromarray(arr.astype(np.uint8))


@dataclass
class EncodedPair:
    target: torch.Tensor  # [B, N, 4C] packed back-view latents
    reference: torch.Tensor  # [B, N, 4C] packed front-view latents
    latent_hw: tuple[int, int]


class EditModel:
    """The frozen encoders + the MMDiT of one pipeline, on one device."""

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype, image_size: int) -> None:
        self.pipe = pipe
        self.device, self.dtype = device, dtype
        self.image_size = image_size
        self.vae_scale = int(pipe.vae_scale_factor)
        if pipe.vae is not None and image_size % (self.vae_scale * 2):
            raise ValueError(f"image_size {image_size} must be a multiple of {self.vae_scale * 2} for this VAE")
        for module in (pipe.vae, pipe.text_encoder):  # None when training from cached latents
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        if pipe.transformer is not None:
            pipe.transformer.to(device)
        if pipe.vae is not None:
            z = pipe.vae.config.z_dim
            mean, std = pipe.vae.config.latents_mean, pipe.vae.config.latents_std
            self._mean = torch.tensor(mean, dtype=torch.float32).view(1, z, 1, 1, 1).to(device)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, z, 1, 1, 1).to(device)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.image_size // self.vae_scale
        return s, s

    # ------------------------------------------------------------------ frozen encoders

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalized latents [B, C, 1, h, w] (the mode, like the pipeline)."""
        x = images.to(self.device, self.pipe.vae.dtype).unsqueeze(2)
        latents = self.pipe.vae.encode(x).latent_dist.mode().float()
        return (latents - self._mean) / self._std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, C, 1, h, w] -> images [B, 3, H, W] in [-1, 1]."""
        x = (latents.float() * self._std + self._mean).to(self.pipe.vae.dtype)
        return self.pipe.vae.decode(x, return_dict=False)[0][:, :, 0].float().clamp(-1, 1)

    def condition_image(self, front: np.ndarray) -> Image.Image:
        """The text encoder's view of the reference, resized like the pipeline does."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            calculate_dimensions,
        )

        img = to_pil(front)
        w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.width / img.height)
        return self.pipe.image_processor.resize(img, h, w)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, front: np.ndarray) -> torch.Tensor:
        """Prompt embedding ``[L, D]`` of one (prompt, front view) with the pipeline's template."""
        embeds, mask = self.pipe.encode_prompt(prompt=[prompt], image=[self.condition_image(front)], device=self.device)
        if mask is not None:
            embeds = embeds[:, : int(mask[0].sum())]
        return embeds[0].float()

    def encode_pair(self, front: torch.Tensor, back: torch.Tensor) -> EncodedPair:
        ref = self.encode_images(front)
        tgt = self.encode_images(back)
        return EncodedPair(target=pack_latents(tgt), reference=pack_latents(ref), latent_hw=tuple(tgt.shape[-2:]))

    # ------------------------------------------------------------------ the trained MMDiT

    def img_shapes(self, batch: int, latent_hw: tuple[int, int]) -> list[list[tuple[int, int, int]]]:
        h, w = latent_hw
        return [[(1, h // 2, w // 2), (1, h // 2, w // 2)]] * batch

    def velocity(
        self,
        transformer,
        noisy: torch.Tensor,
        reference: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        latent_hw: tuple[int, int],
    ) -> torch.Tensor:
        """The MMDiT's velocity for the target tokens (reference tokens appended, as at inference).
        ``transformer`` may be the bare module or a DeepSpeed engine wrapping it."""
        tokens = torch.cat([noisy, reference], dim=1).to(self.dtype)
        out = transformer(
            hidden_states=tokens,
            timestep=t.to(self.dtype),
            encoder_hidden_states=prompt_embeds.to(self.dtype),
            encoder_hidden_states_mask=prompt_mask,
            img_shapes=self.img_shapes(noisy.shape[0], latent_hw),
            return_dict=False,
        )[0]
        return out[:, : noisy.shape[1]]


def pad_prompts(embeds: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad variable-length prompt embeddings; mask is None when nothing was padded."""
    length = max(e.shape[0] for e in embeds)
    out = torch.zeros(len(embeds), length, embeds[0].shape[1], device=device)
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=device)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e.to(device)
        mask[i, : e.shape[0]] = 1
    return out, (None if bool(mask.all()) else mask)


def add_lora(
    transformer,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str],
    adapter: str = "default",
    dtype: torch.dtype = torch.float32,
):
    """Inject a LoRA adapter (peft) into the MMDiT and freeze everything else. Returns the
    trainable parameters (LoRA A/B of every targeted linear layer, image and text streams), in
    ``dtype``: fp32, or bf16 under DeepSpeed's bf16 mode, whose optimizer keeps fp32 master copies
    (measured on an H200: 3.1 against 2.5 samples/s at 512², micro-batch 4)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
    )
    transformer.add_adapter(config, adapter_name=adapter)
    params = [p for n, p in transformer.named_parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"LoRA matched no layer of the transformer (targets: {targets})")
    for p in params:
        p.data = p.data.to(dtype)
    return params


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_into(transformer, folder: Path) -> int:
    """Copy an exported LoRA (``export_lora``'s folder) into the transformer's injected adapter:
    a warm start from an earlier model. Ranks and targeted layers must match; returns the number
    of tensors copied. Loaded with safetensors (no pickle)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no pytorch_lora_weights.safetensors to start from")
    saved = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
    current = lora_state_dict(transformer)
    if saved.keys() != current.keys():
        missing, extra = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
        raise ValueError(
            f"{path}: its layers differ from this LoRA's (missing {len(missing)}, e.g. {missing[:1]}; "
            f"extra {len(extra)}, e.g. {extra[:1]}): same lora.target_modules needed to start from it"
        )
    bad = [k for k in saved if saved[k].shape != current[k].shape]
    if bad:
        raise ValueError(
            f"{path}: {bad[0]} is {tuple(saved[bad[0]].shape)}, this LoRA's is {tuple(current[bad[0]].shape)} "
            "(another lora.rank?)"
        )
    dtype = next(p.dtype for n, p in transformer.named_parameters() if p.requires_grad)
    set_peft_model_state_dict(transformer, {k: v.to(dtype) for k, v in saved.items()})
    return len(saved)


def export_lora(transformer, folder: Path, metadata: dict) -> Path:
    """Write the LoRA in the diffusers format (``pytorch_lora_weights.safetensors``), loadable
    with ``QwenImageEditPlusPipeline.load_lora_weights``, plus ``know3d_lora.json``."""
    import json

    from diffusers import QwenImageEditPlusPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = transformer.peft_config["default"]
    adapter_meta = {
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "target_modules": sorted(peft_config.target_modules),
    }
    QwenImageEditPlusPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=adapter_meta,
    )
    (folder / "know3d_lora.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
    return folder
