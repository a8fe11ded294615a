"""AdamW step time on the trainers' parameter sets: torch's default (one Python loop per tensor on
CPU), ``foreach`` and ``fused`` (what ``training.engine.optim.initialize`` now asks for).

Parameter sets:
* ``generator``: every weight of the debug-size SS flow with its H branch (``model.finetune=full``,
  the base of the generator learning tests);
* ``lora``: a rank-64 LoRA on the 17 target modules x 4 blocks of the 128-wide debug MMDiT
  (``configs/backview_overfit.yaml``): 136 A/B matrices of 64 x 128.

    .venv/bin/python benchmarks/optimizer_step.py [--steps 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch


def parameter_sets() -> dict[str, list[torch.nn.Parameter]]:
    from know3d.training.generator.model import debug_base

    generator = [p for p in debug_base(24, 32).parameters()]
    lora = [torch.nn.Parameter(torch.randn(64, 128) if i % 2 else torch.randn(128, 64)) for i in range(136)]
    return {"generator": generator, "lora": lora}


def time_step(params: list[torch.nn.Parameter], steps: int, **kind) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, **kind)
    for _ in range(5):
        opt.step()
    if params[0].device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if params[0].device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for name, params in parameter_sets().items():
        params = [torch.nn.Parameter(p.detach().to(args.device)) for p in params]
        numel = sum(p.numel() for p in params)
        times = {label: time_step(params, args.steps, **kind) for label, kind in
                 (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}  # fmt: skip
        print(
            f"{name:9s} {len(params):4d} tensors {numel / 1e6:5.2f} M  "
            + "  ".join(f"{k} {v:6.2f} ms" for k, v in times.items())
            + f"  fused speed-up {times['default'] / times['fused']:.1f}x"
        )


if __name__ == "__main__":
    main()
