"""Per-GPU memory of the Know3D generator fine-tune (TRELLIS.2 SS flow + branch + LoRA) per ZeRO stage;
``--stage shape``: the same for stage 2 (the 1.3B shape SLat flow, same blocks, ``--slat-tokens``
sparse latent tokens per sample instead of 16³ = 4096).

Parameter counts come from the real 1.3B architecture (``SSFlowConfig.full(FULL_HIDDEN_CHANNELS)``,
Know3D branch included) built on the ``meta`` device (no weights, no memory), with the peft LoRA
injected exactly as the fine-tune does it (``know3d.training.generator.model.add_lora``
+ ``inject_adapter_in_model``: the backbone's self/cross-attention linears, not the branch). Three
groups: frozen (the TRELLIS.2 weights), LoRA (trained), branch (``know3d_*``, fully trained).

Model states, bytes per parameter, partitioned over ``--gpus`` ranks as DeepSpeed does:

* frozen weights, bf16 (2 B): replicated at ZeRO 0-2, partitioned at ZeRO 3;
* trainable (LoRA + branch) bf16 working copy (2 B): partitioned at ZeRO 3;
* bf16 gradients (2 B): partitioned at ZeRO 2-3 (reduce-scatter buckets not counted);
* fp32 master weights + AdamW m, v (12 B): partitioned at ZeRO 1-3;
* fp32 gradient copy the optimizer step makes (4 B, transient at the step): the whole trainable
  set at ZeRO 0 (DeepSpeed's bf16 wrapper flattens the grads to fp32), one partition at ZeRO 1-3;
* EMA shadow of the trainable weights, fp32 (4 B), the trainer's own ``EMA`` (not DeepSpeed):
  not partitioned, on every rank.

Activations are an ESTIMATE (a formula, not a measurement; no GPU was used), per sample of
N = 4096 latent tokens (16³), width C = 1536, MLP width F = int(C·5.3334) = 8192, context tokens
M = 1029 (DINOv3) and T = ``--hidden-tokens`` (back-view hidden states), bf16 autocast, SDPA
(flash / memory-efficient: no N² matrix is kept, only q, k, v, output and a logsumexp).

Per block, the tensors autograd keeps for backward (bf16 = 2 B, the float32 norms 4 B):

* self-attention: LayerNorm input in fp32 (4 B·NC), modulated input (2 B·NC), qkv (6 B·NC),
  q/k RMS norms in fp32 (2 tensors each for q and k: 16 B·NC), RoPE'd q, k (4 B·NC), attention
  output (2 B·NC), to_out output for the gate (2 B·NC)                         ≈ 36 B·NC;
* image cross-attention: norm2 fp32 input + its bf16 output (6 B·NC), q + its RMS norm (2 + 8 B·NC),
  attention output (2 B·NC); k, v over M context tokens (≈ 12 B·MC)             ≈ 18 B·NC + 12 B·MC;
* Know3D cross-attention: the same over T tokens, plus know3d_out's input (2 B·NC)
                                                                                 ≈ 20 B·NC + 12 B·TC;
* MLP: norm3 fp32 input (4 B·NC), modulated input (2 B·NC), hidden pre-GELU and post-GELU
  (4 B·NF), output for the gate (2 B·NC)                                        ≈ 8 B·NC + 4 B·NF;
* LoRA: the rank-r intermediate of each of the 5 targets (≈ 5·2 B·N·r, small).

So one block keeps a_blk ≈ (82·C + 4·F + 10·r)·N + 12·(M + T)·C bytes per sample (≈ 1.16 GiB at
the defaults). Without checkpointing all ``num_blocks`` blocks' sets are alive at the start of
backward. With per-block checkpointing (``use_checkpoint``) only each block's input x is kept
(2 B·NC per block; the shared modulation, DINOv3 tokens and projected H are kept once), and during
backward one block is recomputed (a_blk) and its gradients are in flight (≈ 3 × 2 B·NC extra).
Outside the blocks: H itself and its projection (2 B·T·hidden + ~14 B·T·C), the embedders and the
output layer (small). Everything is multiplied by the micro-batch. Not included: the CUDA context
(≈ 0.5-1 GiB), allocator fragmentation, NCCL buffers, autocast's cached bf16 copies of fp32
weights (≤ 2 B per trainable parameter), temporaries inside kernels. ``generator_gpu_step.py``
measures the real peak on one GPU.

    python benchmarks/generator_memory.py [--stage ss|shape] [--slat-tokens 10000] [--gpus 32] [--micro-batch 2]
        [--hidden-tokens 1024] [--rank 64]
"""

from __future__ import annotations

import argparse

import torch
from memory_estimate import GB, count  # benchmarks/memory_estimate.py (the back-view model's estimate)

from know3d.training.generator.config import GeneratorModelConfig
from know3d.training.generator.model import add_lora
from know3d.training.generator.slat_flow import SLatFlowConfig, SLatFlowModel
from know3d.training.generator.ss_flow import FULL_HIDDEN_CHANNELS, SSFlowConfig, SSFlowModel, is_branch_key

COND_TOKENS = 1029  # DINOv3 tokens of the front image (TRELLIS.2's condition)


def build_lora_model(cfg, rank: int, device: str | torch.device = "meta") -> torch.nn.Module:
    """The stage's flow (``SSFlowModel`` or ``SLatFlowModel`` by ``cfg``) on ``device`` with the
    fine-tune's own LoRA (r = alpha = ``rank``, :func:`know3d.training.generator.model.add_lora`):
    requires_grad on LoRA and branch only."""
    with torch.device(device):
        model = SLatFlowModel(cfg) if isinstance(cfg, SLatFlowConfig) else SSFlowModel(cfg)
        add_lora(model, GeneratorModelConfig(lora_rank=rank, lora_alpha=rank))
    return model


def is_lora_key(name: str) -> bool:
    return ".lora_" in name


def parameter_groups(model: torch.nn.Module) -> dict[str, int]:
    groups = {"frozen": 0, "lora": 0, "branch": 0}
    for name, p in model.named_parameters():
        if is_lora_key(name):
            groups["lora"] += p.numel()
        elif is_branch_key(name):
            groups["branch"] += p.numel()
        else:
            groups["frozen"] += p.numel()
    return groups


def activation_bytes(cfg, hidden_tokens: int, rank: int, checkpointing: bool, tokens: int | None = None) -> float:
    """Estimated activation bytes per sample (the formula of the module docstring); ``tokens``
    defaults to the SS flow's dense grid."""
    n, c, f = tokens or cfg.num_tokens, cfg.model_channels, int(cfg.model_channels * cfg.mlp_ratio)
    m, t = COND_TOKENS, hidden_tokens
    per_block = (82 * c + 4 * f + 10 * rank) * n + 12 * (m + t) * c
    outside = 2 * t * (cfg.hidden_channels or 0) + 14 * t * c + 2 * m * cfg.cond_channels + 16 * n * c
    if checkpointing:
        return cfg.num_blocks * 2 * n * c + per_block + 6 * n * c + outside
    return cfg.num_blocks * per_block + outside


def estimate(args) -> list[dict]:
    if args.stage == "shape":
        cfg, tokens, name = SLatFlowConfig.full(FULL_HIDDEN_CHANNELS), args.slat_tokens, "shape SLat flow"
    else:
        cfg, tokens, name = SSFlowConfig.full(hidden_channels=FULL_HIDDEN_CHANNELS), 16**3, "SS flow"
    model = build_lora_model(cfg, args.rank)
    groups = parameter_groups(model)
    total = count(model)
    assert total == sum(groups.values())
    lora_layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    p_frozen, p_train = groups["frozen"], groups["lora"] + groups["branch"]
    n = args.gpus
    mb = args.micro_batch
    acts = {ck: mb * activation_bytes(cfg, args.hidden_tokens, args.rank, ck, tokens) for ck in (True, False)}
    ema = 4 * p_train
    rows = []
    for stage in range(4):
        frozen = 2 * p_frozen / (n if stage == 3 else 1)
        train_w = 2 * p_train / (n if stage == 3 else 1)
        grads = 2 * p_train / (n if stage >= 2 else 1)
        grads32 = 4 * p_train / (n if stage >= 1 else 1)
        optim = 12 * p_train / (n if stage >= 1 else 1)
        states = frozen + train_w + grads + grads32 + optim + ema
        rows.append(
            {
                "zero_stage": stage,
                "frozen_gb": frozen / GB,
                "trainable_gb": train_w / GB,
                "grads_gb": grads / GB,
                "grads_fp32_gb": grads32 / GB,
                "optimizer_gb": optim / GB,
                "ema_gb": ema / GB,
                "states_gb": states / GB,
                "acts_ckpt_gb": acts[True] / GB,
                "acts_nockpt_gb": acts[False] / GB,
                "total_ckpt_gb": (states + acts[True]) / GB,
                "total_nockpt_gb": (states + acts[False]) / GB,
            }
        )
    print(
        f"{name} (TRELLIS.2 1.3B + Know3D branch, hidden {FULL_HIDDEN_CHANNELS}): {total / 1e9:.3f} B parameters "
        f"({cfg.num_blocks} blocks, C {cfg.model_channels}, {cfg.num_heads} heads)"
    )
    print(
        f"frozen {p_frozen / 1e6:.1f} M | LoRA r={args.rank} on {lora_layers} linears {groups['lora'] / 1e6:.2f} M | "
        f"branch {groups['branch'] / 1e6:.1f} M | trainable {p_train / 1e6:.1f} M ({100 * p_train / total:.1f} %)"
    )
    print(
        f"{n} GPUs, micro-batch {mb}, {tokens} latent + {COND_TOKENS} DINOv3 + {args.hidden_tokens} hidden "
        f"tokens; activations (estimate): {acts[True] / GB:.2f} GiB with checkpointing, "
        f"{acts[False] / GB:.2f} GiB without"
    )
    print(
        "| ZeRO | frozen bf16 | trainable bf16 | grads bf16 | grads fp32 (step) | master + Adam | EMA fp32 "
        "| model states | total, ckpt | total, no ckpt |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['zero_stage']} | {r['frozen_gb']:.3f} | {r['trainable_gb']:.3f} | {r['grads_gb']:.3f} | "
            f"{r['grads_fp32_gb']:.3f} | {r['optimizer_gb']:.3f} | {r['ema_gb']:.3f} | {r['states_gb']:.2f} | "
            f"{r['total_ckpt_gb']:.2f} | {r['total_nockpt_gb']:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["ss", "shape"], default="ss")
    parser.add_argument("--slat-tokens", type=int, default=10_000, help="Stage 2: sparse latent tokens per sample.")
    parser.add_argument("--gpus", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--hidden-tokens", type=int, default=1024, help="T: 1024 (512², unpooled) or 256 (2x2).")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank).")
    estimate(parser.parse_args())


if __name__ == "__main__":
    main()
