"""Per-GPU memory of back-view LoRA training for the paper setup, per ZeRO stage.

Parameter counts come from the real architectures instantiated on the ``meta`` device (no
weights, no memory): the MMDiT from ``transformer/config.json`` of Qwen-Image-Edit-2511 (give
``--model-dir`` to read a downloaded copy; the built-in values are that file's), Qwen2.5-VL-7B
(the text encoder) and the Qwen-Image VAE. LoRA sizes are counted on the modules the trainer
targets. Activation memory is a formula (stated below) for 1024² with gradient checkpointing.

    python benchmarks/memory_estimate.py [--model-dir DIR] [--workers 32] [--resolution 1024]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from know3d.training.config import LORA_TARGETS
from know3d.training.debug_models import QWEN_IMAGE_EDIT_2511_TRANSFORMER

# transformer/config.json of Qwen/Qwen-Image-Edit-2511 (diffusers 0.42 field names; one copy, in the package)
TRANSFORMER = QWEN_IMAGE_EDIT_2511_TRANSFORMER
# text_encoder/config.json (Qwen2.5-VL-7B-Instruct)
TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    fullatt_block_indexes=[7, 15, 23, 31],
    window_size=112,
)
GB = 1024**3


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_count(module: torch.nn.Module, rank: int, targets: list[str]) -> int:
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            total += rank * (sub.in_features + sub.out_features)
    return total


def build(model_dir: Path | None):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tcfg = dict(TRANSFORMER)
    if model_dir is not None:
        raw = json.loads((model_dir / "transformer" / "config.json").read_text())
        tcfg = {
            k: v
            for k, v in raw.items()
            if not k.startswith("_") and k in QwenImageTransformer2DModel.__init__.__code__.co_varnames
        }
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**tcfg)
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION))
        vae = AutoencoderKLQwenImage()
    return tcfg, transformer, text, vae


def estimate(args) -> list[dict]:
    tcfg, transformer, text, vae = build(args.model_dir)
    p_dit, p_text, p_vae = count(transformer), count(text), count(vae)
    p_lora = lora_count(transformer, args.rank, LORA_TARGETS)
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    # tokens: target + reference latents (VAE /8, 2x2 patches) + prompt (template + 384² condition image)
    img_tokens = (args.resolution // 16) ** 2
    txt_tokens = args.text_tokens
    seq = 2 * img_tokens + txt_tokens
    # Activations with per-block checkpointing: each block's inputs are kept (image + text stream,
    # bf16) for all layers, plus one block's recomputation during backward (q, k, v, attention
    # output, 4x MLP hidden, norms/modulation: ~16·d values per token, bf16; flash/SDPA attention
    # keeps no seq² matrix) and LoRA intermediates (rank per target, negligible).
    act_saved = tcfg["num_layers"] * seq * d * 2
    act_block = seq * d * 16 * 2
    acts = (act_saved + act_block) * args.micro_batch
    n = args.workers
    rows = []
    for stage in range(4):
        base = p_dit * 2 / (n if stage == 3 else 1)  # frozen MMDiT, bf16 (ZeRO-3 partitions it too)
        lora_params = p_lora * 2 / (n if stage == 3 else 1)  # bf16 working copy
        grads = p_lora * 2 / (n if stage >= 2 else 1)  # bf16 gradients
        optim = p_lora * 12 / (n if stage >= 1 else 1)  # fp32 master + Adam m, v
        frozen_enc = (p_text + p_vae) * 2 if not args.cached_latents else 0
        total = base + lora_params + grads + optim + frozen_enc + acts
        rows.append(
            {
                "zero_stage": stage,
                "mmdit_gb": base / GB,
                "lora_gb": lora_params / GB,
                "grads_gb": grads / GB,
                "optimizer_gb": optim / GB,
                "encoders_gb": frozen_enc / GB,
                "activations_gb": acts / GB,
                "total_gb": total / GB,
            }
        )
    print(
        f"MMDiT parameters {p_dit / 1e9:.3f} B (hidden {d}, {tcfg['num_layers']} blocks), "
        f"text encoder {p_text / 1e9:.3f} B, VAE {p_vae / 1e6:.1f} M"
    )
    print(
        f"LoRA r={args.rank} on {', '.join(LORA_TARGETS)}: {p_lora / 1e6:.1f} M parameters "
        f"({100 * p_lora / p_dit:.2f} % of the MMDiT)"
    )
    print(
        f"sequence at {args.resolution}²: {img_tokens} target + {img_tokens} reference + {txt_tokens} text tokens; "
        f"micro-batch {args.micro_batch}; {n} workers; encoders {'not loaded (cached latents)' if args.cached_latents else 'on every GPU, bf16'}"
    )
    print("| ZeRO | MMDiT | LoRA | grads | optimizer | encoders | activations | total GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['zero_stage']} | {r['mmdit_gb']:.2f} | {r['lora_gb']:.3f} | {r['grads_gb']:.3f} | "
            f"{r['optimizer_gb']:.3f} | {r['encoders_gb']:.2f} | {r['activations_gb']:.2f} | {r['total_gb']:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="Local Qwen-Image-Edit-2511 (reads its config).")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=300, help="Prompt + condition-image tokens.")
    parser.add_argument("--cached-latents", action="store_true", help="Training loads only the MMDiT.")
    estimate(parser.parse_args())


if __name__ == "__main__":
    main()
