"""``know3d generate shape``: front view (+ optional description of the back) -> back view -> H ->
sparse structure -> occupancy and mesh, with a trained generator (stage 1).

1. The frozen back-view model (base + ``--backview-lora``) generates the back view from the front
   view and the prompt (the instruction, plus "The back shows <description>." when one is given),
   capturing H on the way at the generator's capture settings (layers, fraction, pooling — read
   from the generator's metadata, so H is what it was trained on). The whole sampler runs here:
   the user gets the back view too.
2. The front's DINOv3 tokens and the condition (H, or the ablation variant the generator was
   trained with) drive the Euler CFG sampler (TRELLIS.2's defaults, EMA weights).
3. The SS decoder turns the latent into occupancy (logits > 0); marching cubes gives the mesh.

Outputs in ``--output``: ``back.png``, ``occupancy.npz`` (``grid`` bool [R, R, R], ``coords``,
Z-up TRELLIS convention) and ``mesh.glb`` (glTF Y-up, in the unit cube).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from know3d.core.io import atomic_write
from know3d.training.generator.config import HiddenStatesConfig, SamplerConfig
from know3d.training.generator.model import load_decoder, load_generator, read_meta
from know3d.training.prompting import build_prompt


def backview_and_condition(
    front: Path, prompt: str | None, backview_lora: Path | None, meta: dict, dino, device, seed: int
) -> tuple[np.ndarray, torch.Tensor | None, str]:
    """(generated back view [3, H, W] in [-1, 1], the condition [1, T, C] or None, the prompt)."""
    from know3d.training.generate import load_front, read_lora_meta
    from know3d.training.generator.hidden_states import capture, decode_packed, load_backview_pipeline

    fields = dict(meta["hidden"])
    condition = meta["condition"]
    wanted = {"hidden": ["hidden"], "vae_latent": [], "dino_back": ["dino_back"], "none": []}[condition]
    fields.update(variants=[*wanted, "vae_latent"])  # vae_latent: the finished back view, decoded below
    if backview_lora is not None:
        read_lora_meta(backview_lora)  # a folder without the LoRA file: a short error, before loading
        fields["lora"] = str(backview_lora)
    hcfg = HiddenStatesConfig.model_validate(fields)
    pipe = load_backview_pipeline(hcfg, device)
    text = build_prompt(prompt, hcfg.instruction)
    out = capture(pipe, load_front(front, hcfg.image_size), text, hcfg, seed=seed, dino=dino)
    grid = out["grid"]
    back = decode_packed(pipe, out["vae_latent"][None], grid)
    tensor = None if condition == "none" else out[condition][None]
    return back, tensor, text


@torch.no_grad()
def generate_shape(
    image: Path,
    generator: Path,
    output: Path,
    prompt: str | None = None,
    backview_lora: Path | None = None,
    seed: int = 0,
    sampler: dict[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the chain for one front view; returns where the files are and a summary."""
    from know3d.training.edit_model import to_pil
    from know3d.training.generator.dino import front_features
    from know3d.training.generator.flow import EulerCfgSampler
    from know3d.training.generator.occupancy import occupancy_mesh

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    meta = read_meta(generator)
    model, meta = load_generator(generator, device)
    decoder = load_decoder(meta["model"]["ss_decoder"], device)
    dino = front_features(meta["model"]["dino"], meta["model"]["dino_resolution"], device=device)
    back, condition, text = backview_and_condition(Path(image), prompt, backview_lora, meta, dino, device, seed)
    cond = dino.encode([Path(image)]).to(device)
    settings = SamplerConfig.model_validate({**meta["sampler"], **(sampler or {})})
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = model.cfg
    noise = torch.randn((1, cfg.in_channels, *(cfg.resolution,) * 3), generator=gen, device=device)
    hidden = None if condition is None else condition.to(device)
    latent = EulerCfgSampler(settings, sigma_min=meta["sigma_min"]).sample(model, noise, cond, hidden).samples
    grid = (decoder(latent.float())[0, 0] > 0).cpu().numpy()

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    to_pil(back).save(output / "back.png")
    buffer = _npz(grid=grid, coords=np.argwhere(grid).astype(np.int16), resolution=np.int64(grid.shape[0]))
    atomic_write(output / "occupancy.npz", buffer)
    summary: dict[str, Any] = {
        "image": str(image),
        "prompt": text,
        "condition": meta["condition"],
        "occupied_voxels": int(grid.sum()),
        "back": str(output / "back.png"),
        "occupancy": str(output / "occupancy.npz"),
        "mesh": None,
    }
    if grid.any():
        mesh = occupancy_mesh(grid)
        atomic_write(output / "mesh.glb", mesh.export(file_type="glb"))
        summary["mesh"] = str(output / "mesh.glb")
    atomic_write(output / "shape.json", json.dumps(summary, indent=1))
    return summary


def _npz(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
