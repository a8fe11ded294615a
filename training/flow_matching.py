"""Conditional flow matching, as pure functions with explicit randomness.

Convention (rectified flow, as in Qwen-Image / diffusers' flow-match scheduler):
``x_t = (1 - t) * x0 + t * eps`` with ``t`` in [0, 1] (t = 1 is pure noise), and the model
predicts the velocity ``v = eps - x0``; the loss is the MSE between prediction and ``v``.
"""

from __future__ import annotations

from typing import Literal

import torch

Scheme = Literal["uniform", "logit_normal", "shifted"]


def sample_timesteps(
    scheme: Scheme,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """Timesteps ``t: [B]`` in (0, 1).

    * ``uniform``: t ~ U(0, 1).
    * ``logit_normal``: t = sigmoid(n), n ~ N(logit_mean, logit_std) (SD3's default).
    * ``shifted``: u ~ U(0, 1), t = shift * u / (1 + (shift - 1) * u) — more weight on high noise,
      the resolution-dependent shift of flow-match schedulers.
    """
    if scheme == "uniform":
        t = torch.rand(batch_size, generator=generator, device=device)
    elif scheme == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        t = torch.sigmoid(n)
    elif scheme == "shifted":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        u = torch.rand(batch_size, generator=generator, device=device)
        t = shift * u / (1.0 + (shift - 1.0) * u)
    else:
        raise ValueError(f"unknown timestep scheme {scheme!r} (uniform, logit_normal, shifted)")
    return t.clamp(1e-5, 1.0 - 1e-5)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t: [B] -> [B, 1, ..., 1] broadcastable against ``like: [B, ...]``."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps; x0, noise: [B, ...], t: [B]."""
    tt = _expand(t, x0)
    return (1.0 - tt) * x0 + tt * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE ``[B]`` against the velocity target (mean over all other dims)."""
    err = (pred.float() - velocity_target(x0, noise).float()) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def timestep_bins(t: torch.Tensor, num_bins: int = 4) -> torch.Tensor:
    """Bin index ``[B]`` of each timestep, for loss-per-timestep-bin logging."""
    return torch.clamp((t * num_bins).long(), 0, num_bins - 1)


def binned_means(values: torch.Tensor, t: torch.Tensor, num_bins: int = 4) -> dict[str, float]:
    """``{"t0.00-0.25": mean, ...}`` over the bins that have samples."""
    bins = timestep_bins(t, num_bins)
    out = {}
    for b in range(num_bins):
        mask = bins == b
        if mask.any():
            lo, hi = b / num_bins, (b + 1) / num_bins
            out[f"t{lo:.2f}-{hi:.2f}"] = float(values[mask].mean())
    return out


def euler_step(x_t: torch.Tensor, velocity: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when denoising)."""
    return x_t + (t_next - t) * velocity


__all__ = [
    "sample_timesteps",
    "interpolate",
    "velocity_target",
    "flow_matching_loss",
    "timestep_bins",
    "binned_means",
    "euler_step",
]
