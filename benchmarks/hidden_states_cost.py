"""Storage and compute of H, the back-view model's hidden states (issue 14), for the full-size
Qwen-Image-Edit-2511 MMDiT, from config numbers only (no weights).

Bytes: target tokens T = (512/8/2)² = 1024 per pair, C = 3072 channels per layer; pooling k×k
divides T by k². FLOPs (forward, 2 per multiply-add) of one dual-stream block over N = image +
text tokens: linears 24·d²·N (each stream: QKV 3d² + out d² + MLP 2·4d² = 12d² MACs per token of
that stream) + joint attention 4·N²·d (QKᵀ and AV). Modulation and embeddings are ignored.

    .venv/bin/python benchmarks/hidden_states_cost.py
"""

from __future__ import annotations

BLOCKS, D = 60, 3072
IMAGE = 512
TARGET = (IMAGE // 8 // 2) ** 2  # 1024 packed 2×2 latent tokens
REFERENCE = TARGET  # the front view, VAE-encoded at the training resolution
TEXT = 300  # prompt template + ~188 tokens of the 384² condition image + the instruction (estimate)
ASSETS, PAIRS = 60_000, 8
STEPS, FRACTION, CFG_PASSES = 50, 0.25, 2
LAYERS = [12, 24, 36, 48]
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def block_flops(tokens: int, d: int = D) -> float:
    return 24 * d * d * tokens + 4 * tokens * tokens * d


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def main() -> None:
    pairs = ASSETS * PAIRS
    print(f"full model: {BLOCKS} blocks, C={D}, {IMAGE}² -> T={TARGET} target tokens; {pairs:,} pairs")
    print(f"L={len(LAYERS)} layers {LAYERS}\n")
    print("| dtype | pooling | tokens | per pair per layer | per pair (L=4) | 480k pairs (L=4) |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype, size in BYTES.items():
        for k in (1, 2, 4):
            tokens = TARGET // (k * k)
            layer = tokens * D * size
            name = "none" if k == 1 else f"{k}×{k}"
            row = [dtype, name, tokens, human(layer), human(layer * len(LAYERS)), human(layer * len(LAYERS) * pairs)]
            print("| " + " | ".join(str(x) for x in row) + " |")
    n = TARGET + REFERENCE + TEXT
    per_pass = BLOCKS * block_flops(n)
    step = int(FRACTION * STEPS)
    early = step * CFG_PASSES * per_pass + (max(LAYERS) + 1) * block_flops(n)
    full = STEPS * CFG_PASSES * per_pass
    print(f"\nN = {TARGET} target + {REFERENCE} reference + {TEXT} text = {n} tokens per pass")
    print(f"one transformer pass: {per_pass / 1e12:.2f} TFLOP")
    print(f"early exit (capture at step {step} of {STEPS}, CFG): {early / 1e12:.1f} TFLOP per pair")
    print(f"full {STEPS}-step generation with CFG: {full / 1e12:.1f} TFLOP per pair ({full / early:.1f}x)")
    print(
        f"480k pairs, early exit: {early * pairs / 1e18:.1f} EFLOP (~{early * pairs / 400e12 / 3600:.0f} H200-hours at 400 TFLOP/s)"
    )
    print(
        f"without CFG (cfg_scale<=1): {(step * per_pass + (max(LAYERS) + 1) * block_flops(n)) / 1e12:.1f} TFLOP per pair"
    )


if __name__ == "__main__":
    main()
