"""Back-view generation with diffusers' ``QwenImageEditPlusPipeline`` (+ an exported LoRA).

The front view is composited on white (as in training), VAE-encoded at the training resolution
and given to the text encoder at the pipeline's condition size. Without a description the prompt
is the bare rotation instruction; with one it is the instruction plus "The back shows ...".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from know3d.training.data import image_to_array
from know3d.training.edit_model import load_pipeline, to_pil, torch_dtype, vae_image_size
from know3d.training.prompting import DEFAULT_INSTRUCTION, build_prompt

LORA_META = "know3d_lora.json"
MAX_INPUT_PIXELS = 4096 * 4096


def read_image(path: Path, read):
    """``read(img)`` on an opened image file, after the existence and pixel-count checks; an
    unreadable file is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise ValueError(f"{path}: {img.width}x{img.height} is larger than {MAX_INPUT_PIXELS} pixels")
            return read(img)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def load_front(path: Path, size: int) -> np.ndarray:
    """An image file -> [3, size, size] in [-1, 1] on white; size and format are checked first."""
    return read_image(path, lambda img: image_to_array(img, size))


def read_lora_meta(lora: Path) -> dict:
    lora = Path(lora)
    if not (lora / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"{lora}: no pytorch_lora_weights.safetensors (expected an exported LoRA folder)")
    meta = lora / LORA_META
    return json.loads(meta.read_text()) if meta.is_file() else {}


@torch.no_grad()
def generate(
    pipe,
    front: np.ndarray,
    prompt: str,
    image_size: int,
    steps: int = 28,
    seed: int = 0,
    cfg_scale: float = 4.0,
) -> np.ndarray:
    """One back view, [3, H, W] in [-1, 1]. ``cfg_scale > 1`` uses true CFG with an empty negative."""
    if steps < 2 and pipe.scheduler.config.get("shift_terminal"):
        # diffusers stretches the schedule so its last sigma is shift_terminal: with one step that
        # divides 0 by 0 and the whole image is NaN (Qwen-Image's scheduler sets shift_terminal)
        raise ValueError(
            f"steps must be at least 2 for this scheduler (shift_terminal="
            f"{pipe.scheduler.config['shift_terminal']} makes a 1-step schedule NaN)"
        )
    kwargs = {"true_cfg_scale": cfg_scale, "negative_prompt": " "} if cfg_scale > 1 else {"true_cfg_scale": 1.0}
    with vae_image_size(image_size * image_size):
        out = pipe(
            image=[to_pil(front)],
            prompt=prompt,
            height=image_size,
            width=image_size,
            num_inference_steps=steps,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="np",
            **kwargs,
        ).images[0]
    return (np.asarray(out, np.float32).transpose(2, 0, 1) * 2.0) - 1.0


def generate_backview(image: Path, output: Path, lora: Path | None, prompt: str | None = None, **options) -> Path:
    """One front view -> one back view PNG; ``options`` as in :func:`generate_backviews`."""
    return generate_backviews([image], [output], lora, [prompt], **options)[0]


def generate_backviews(
    images: list[Path],
    outputs: list[Path],
    lora: Path | None,
    prompts: list[str | None],
    model: str | None = None,
    image_size: int | None = None,
    steps: int = 28,
    seed: int = 0,
    cfg_scale: float = 4.0,
    device: str | None = None,
) -> list[Path]:
    """CLI body: base model (from the LoRA's metadata unless given) + LoRA, loaded once -> one
    back view PNG per front view (``prompts[i]`` describes image i's back; None = no description).
    Every input is checked before the model loads. Without a LoRA the base model alone generates
    (``model`` is then required)."""
    if not (len(images) == len(outputs) == len(prompts)) or not images:
        raise ValueError(f"{len(images)} images, {len(outputs)} outputs and {len(prompts)} prompts: need equal, >= 1")
    meta = read_lora_meta(lora) if lora else {}
    model = model or meta.get("model")
    if not model and lora is None:
        raise ValueError(
            "give --lora DIR (a trained back-view LoRA) or --model NAME to generate with the base model alone"
        )
    if not model:
        raise ValueError(f"no base model: pass --model ({lora} has no {LORA_META} naming the model it was trained on)")
    size = image_size or int(meta.get("image_size", 512))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fronts = [load_front(image, size) for image in images]
    pipe = load_pipeline(model, dtype=torch_dtype("auto", dev)).to(dev)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(lora))
    instruction = meta.get("instruction", DEFAULT_INSTRUCTION)
    written = []
    for front, prompt, output in zip(fronts, prompts, outputs):
        back = generate(
            pipe, front, build_prompt(prompt, instruction), size, steps=steps, seed=seed, cfg_scale=cfg_scale
        )
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        to_pil(back).save(output)
        written.append(output)
    return written
