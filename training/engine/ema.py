"""Exponential moving average of trainable weights, for trainers that sample from it (the 3D
generator): shadow ← d·shadow + (1 − d)·param after every optimizer step.

With ``warmup`` the decay of update n (0-based) is ``min(decay, (1 + n) / (10 + n))``: early
updates follow the fast-moving weights instead of averaging in the random initialization.
The shadow holds full tensors, so under ZeRO-3 (partitioned parameters) update it inside
``deepspeed.zero.GatheredParameters``. Its :meth:`EMA.state_dict` goes into a checkpoint's
``client_state``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class EMA:
    """The shadow is float32 (or the parameters' wider dtype): bf16 cannot hold small updates."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay {decay} is not in [0, 1]")
        self.params = list(params)
        self.shadow = [p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True) for p in self.params]
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for shadow, p in zip(self.shadow, self.params):
            shadow.mul_(d).add_(p.detach().to(shadow.dtype), alpha=1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.params):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.params)}")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        self.shadow = [s.detach().to(p.device, copy=True) for s, p in zip(state["shadow"], self.params)]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the block (evaluation, sampling), the trained ones after."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, shadow in zip(self.params, self.shadow):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, trained):
                    p.copy_(saved)
