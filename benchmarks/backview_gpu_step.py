"""Back-view LoRA training step of the full-size Qwen-Image-Edit-2511 MMDiT (random weights):
s/step, samples/s and peak memory per micro-batch and LoRA dtype (issue 18).

The MMDiT is built from ``transformer/config.json``'s values (``memory_estimate.TRANSFORMER``)
directly on the device in bf16 (``--size full``, 20.4 B parameters; ``--size debug``: 2 blocks of
4 heads, a CPU smoke test). The trainer's own pieces run on it: ``add_lora`` (r = alpha = 64 on
``LORA_TARGETS``, fp32 or bf16 weights), gradient checkpointing, ``EditModel.velocity`` on the
latent-cache path's inputs (packed target and reference latents of ``--resolution`` and ~100
prompt tokens of width 3584), ``flow_matching_loss``, AdamW. ``--warmup`` steps, then ``--steps``
timed steps (synchronized). DeepSpeed is not in the loop (one GPU: ZeRO-2 changes where optimizer
states live, not the step's compute).

    python benchmarks/backview_gpu_step.py [--size full] [--micro-batch 1,4] [--lora-dtype fp32,bf16]
        [--resolution 512] [--steps 4] [--warmup 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_estimate import TRANSFORMER

PROMPT_TOKENS = 100


def build(size: str, device: torch.device):
    from diffusers import QwenImageTransformer2DModel

    cfg = dict(TRANSFORMER)
    if size == "debug":
        cfg.update(
            num_layers=2,
            num_attention_heads=4,
            attention_head_dim=32,
            joint_attention_dim=64,
            axes_dims_rope=(8, 12, 12),
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = QwenImageTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(default)
    return model, cfg, dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "debug"], default="full")
    parser.add_argument("--micro-batch", default="1,4")
    parser.add_argument("--lora-dtype", default="fp32,bf16")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"# back-view step, {args.size} MMDiT, {args.resolution}², LoRA r{args.rank}, device {device}")
    print(f"{'micro-batch':>12}{'LoRA':>6}{'s/step':>9}{'samples/s':>11}{'peak GiB':>10}")
    for lora_name in args.lora_dtype.split(","):
        measure(args, device, lora_name)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure(args: argparse.Namespace, device: torch.device, lora_name: str) -> None:
    """One model with LoRA weights in ``lora_name``; a table row per micro-batch."""
    from know3d.training.config import LORA_TARGETS
    from know3d.training.edit_model import EditModel, add_lora
    from know3d.training.flow_matching import flow_matching_loss, interpolate

    lora_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[lora_name]
    transformer, cfg, dtype = build(args.size, device)
    params = add_lora(transformer, args.rank, args.rank, 0.0, list(LORA_TARGETS), dtype=lora_dtype)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    pipe = types.SimpleNamespace(vae_scale_factor=8, vae=None, text_encoder=None, transformer=transformer)
    model = EditModel(pipe, device, dtype, args.resolution)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    h, w = model.latent_hw
    tokens, channels = (h // 2) * (w // 2), cfg["in_channels"]
    for micro in (int(b) for b in args.micro_batch.split(",")):
        gen = torch.Generator(device=device).manual_seed(0)

        def step(micro: int = micro, gen: torch.Generator = gen) -> None:
            target = torch.randn(micro, tokens, channels, device=device, generator=gen)
            reference = torch.randn(micro, tokens, channels, device=device, generator=gen)
            noise = torch.randn(micro, tokens, channels, device=device, generator=gen)
            t = torch.rand(micro, device=device, generator=gen)
            embeds = torch.randn(micro, PROMPT_TOKENS, cfg["joint_attention_dim"], device=device, generator=gen)
            pred = model.velocity(transformer, interpolate(target, noise, t), reference, t, embeds, None, (h, w))
            loss = flow_matching_loss(pred.float(), target, noise).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{micro:>12}{lora_name:>6}{seconds:>9.2f}{micro / seconds:>11.2f}{peak:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
