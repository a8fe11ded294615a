"""One-GPU training step of the Know3D generator fine-tune: step time, samples/s, peak memory.

The model is the SS flow DiT with the Know3D branch and random weights (``--size full``: the 1.3B
TRELLIS.2 model + branch, hidden 12288; ``--size debug``: ``SSFlowConfig.debug``, for a CPU check),
with the peft LoRA of ``generator_memory.py`` (r = alpha = ``--rank`` on the backbone's attention
linears). As the trainer holds it: frozen weights in bf16, trainable ones (LoRA + ``know3d_*``
branch) in fp32, forward under bf16 autocast (``--precision fp32``: everything fp32, no autocast).
AdamW on the trainable parameters, grad-norm clipping at 1.0, optionally the fp32 EMA (``--ema``).
No DeepSpeed (one GPU, ZeRO changes nothing there but where optimizer states live).

Inputs have the real shapes: x0 ``[B, 8, 16, 16, 16]``, DINOv3 tokens ``[B, 1029, 1024]``, hidden
states ``[B, T, 12288]`` (T = ``--hidden-tokens``: 1024 for 512² unpooled, 256 with 2x2 pooling);
the loss is ``flow_loss`` (logitNormal t, CFG drop 0.1). ``--warmup`` steps, then ``--steps`` timed
steps (forward + backward + clip + step + zero_grad, synchronized). Peak memory is
``torch.cuda.max_memory_allocated`` over the whole run (CUDA only).

    python benchmarks/generator_gpu_step.py [--size full|debug] [--batch 2] [--hidden-tokens 1024]
        [--checkpointing | --no-checkpointing] [--warmup 3] [--steps 10] [--device cuda] [--ema]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from generator_memory import COND_TOKENS, build_lora_model, parameter_groups

from know3d.training.engine.ema import EMA
from know3d.training.generator.config import FlowConfig
from know3d.training.generator.flow import flow_loss
from know3d.training.generator.ss_flow import FULL_HIDDEN_CHANNELS, SSFlowConfig

MIB = 1024**2


def make_model(args, device: torch.device):
    cfg = SSFlowConfig.full(FULL_HIDDEN_CHANNELS) if args.size == "full" else SSFlowConfig.debug()
    cfg = replace(cfg, use_checkpoint=args.checkpointing)
    model = build_lora_model(cfg, args.rank, device=device)
    for p in model.parameters():
        # frozen weights bf16, trainable fp32 (master weights the optimizer updates directly)
        p.data = p.data.to(torch.float32 if p.requires_grad or args.precision == "fp32" else torch.bfloat16)
    return cfg, model.train()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    cfg, model = make_model(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = parameter_groups(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(trainable, decay=0.9999) if args.ema else None
    b, r = args.batch, cfg.resolution
    cond_tokens = COND_TOKENS if args.size == "full" else 16
    data_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    x0 = torch.randn(b, cfg.in_channels, r, r, r, device=device)
    cond = torch.randn(b, cond_tokens, cfg.cond_channels, device=device)
    hidden = torch.randn(b, args.hidden_tokens, cfg.hidden_channels, device=device, dtype=data_dtype)
    flow_cfg = FlowConfig()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def step(check: bool = False) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = flow_loss(model, x0, cond, hidden, config=flow_cfg).loss
        loss.backward()
        if check:  # every trainable parameter (LoRA and branch) got a gradient; nothing frozen did
            assert all(p.grad is not None for p in trainable), "a trainable parameter got no gradient"
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        return loss.detach()

    losses = [step(check=i == 0) for i in range(args.warmup)]
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    synchronize(device)
    step_s = (time.perf_counter() - start) / args.steps
    losses = [float(v) for v in losses]
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "precision": args.precision,
        "checkpointing": args.checkpointing,
        "ema": args.ema,
        "batch": b,
        "hidden_tokens": args.hidden_tokens,
        "params_m": {k: round(v / 1e6, 3) for k, v in groups.items()},
        "step_ms": round(1000 * step_s, 1),
        "samples_per_s": round(b / step_s, 3),
        "static_mib": round(static / MIB, 1) if device.type == "cuda" else None,
        "peak_mib": round(torch.cuda.max_memory_allocated(device) / MIB, 1) if device.type == "cuda" else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    peak = f"{result['peak_mib'] / 1024:.2f} GiB" if result["peak_mib"] is not None else "n/a (CPU)"
    print(
        "| size | device | precision | ckpt | B | T | step ms | samples/s | peak alloc |\n|---|---|---|---|---:|---:|---:|---:|---:|\n"
        f"| {args.size} | {result['device']} | {args.precision} | {'on' if args.checkpointing else 'off'} | {b} | "
        f"{args.hidden_tokens} | {result['step_ms']} | {result['samples_per_s']} | {peak} |"
    )
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "debug"], default="full")
    parser.add_argument("--batch", type=int, default=2, help="Micro-batch (the paper: 64 over 32 GPUs = 2).")
    parser.add_argument("--hidden-tokens", type=int, default=None, help="T (default 1024 full, 16 debug).")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ema", action="store_true", help="Also update an fp32 EMA of the trainable weights.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.hidden_tokens is None:
        args.hidden_tokens = 1024 if args.size == "full" else 16
    run(args)


if __name__ == "__main__":
    main()
