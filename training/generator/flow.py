"""Flow matching and the Euler CFG sampler of TRELLIS.2's sparse-structure flow, model-agnostic.

The math follows microsoft/TRELLIS.2 exactly (re-written, not copied):

* ``trellis2/trainers/flow_matching/flow_matching.py`` (``FlowMatchingTrainer``):
  ``x_t = (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * eps`` with ``sigma_min = 1e-5`` and t in
  [0, 1] (t = 1 is pure noise), velocity target ``v = (1 - sigma_min) * eps - x0``, the model sees
  ``t * 1000``, timesteps ``t = sigmoid(n)``, ``n ~ N(mean, std)`` ("logitNormal"; the sparse-structure
  config ``configs/gen/ss_flow_img_dit_1_3B_64_bf16.json`` uses mean 1, std 1), loss = MSE(pred, v),
  logged per sample in 10 timestep bins.
* ``trellis2/trainers/flow_matching/mixins/classifier_free_guidance.py``: each sample's condition is
  replaced by the negative condition (zeros, as ``Trellis2ImageTo3DPipeline.get_cond`` builds it) with
  probability ``p_uncond = 0.1``. Upstream has one condition; we have two (front features ``cond`` and
  back-view hidden states ``hidden``), dropped with one coin per sample (``joint``) or one coin each
  (``independent``).
* ``trellis2/utils/grad_clip_utils.py`` (``AdaptiveGradClipper``): clip at the current threshold
  (``max_norm`` until the buffer of recent finite grad norms is full, then
  ``min(percentile(buffer, clip_percentile), max_norm)``).
* ``trellis2/pipelines/samplers/flow_euler.py`` (``FlowEulerSampler``,
  ``FlowEulerGuidanceIntervalSampler``), ``classifier_free_guidance_mixin.py`` and
  ``guidance_interval_mixin.py``: ``t_seq = linspace(1, 0, steps + 1)``,
  ``t <- rescale_t * t / (1 + (rescale_t - 1) * t)``; Euler ``x_{t_prev} = x_t - (t - t_prev) * v``;
  inside ``guidance_interval`` (inclusive, on the rescaled t) ``v = w * v_pos + (1 - w) * v_neg``
  (w = 1: conditional call only; w = 0: negative call only), then with ``guidance_rescale = r > 0``:
  ``x0_pos, x0_cfg = pred_to_xstart(v_pos), pred_to_xstart(v)``,
  ``x0 = r * x0_cfg * std(x0_pos) / std(x0_cfg) + (1 - r) * x0_cfg`` (std per sample over all other
  dims, unbiased as torch's default), ``v = xstart_to_pred(x0)``; outside the interval the conditional
  call only. Conversions: ``pred_to_xstart(v) = (1 - sigma_min) * x_t - (sigma_min + (1 - sigma_min) t) v``,
  ``xstart_to_pred(x0) = ((1 - sigma_min) x_t - x0) / (sigma_min + (1 - sigma_min) t)``,
  ``eps = (1 - t) v + x_t``. Sparse-structure defaults (TRELLIS.2 pipeline.json): 12 steps,
  guidance_strength 7.5, guidance_interval [0.6, 1], guidance_rescale 0.7, rescale_t 5.

Model contract: ``model(x_t, t * 1000, cond, hidden)`` returns the velocity, shaped like ``x_t``; ``t``
is a float32 tensor ``[B]``; ``cond`` is a tensor ``[B, N, C]`` or a mapping of such tensors (passed
as is); ``hidden`` ``[B, M, Ch]`` is passed only when it is not None, so a model taking
``(x, t, cond, hidden=None)`` (or ``(x, t, cond)`` without hidden states) works.

Randomness is explicit: every random draw takes a ``torch.Generator`` (None = torch's global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from know3d.training.generator.config import SIGMA_MIN, DropMode, FlowConfig, SamplerConfig

TIME_SCALE = 1000.0  # the model sees t * 1000 (FlowMatchingTrainer.training_losses, FlowEulerSampler)

Cond = torch.Tensor | Mapping[str, torch.Tensor]
Model = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- configs


# --------------------------------------------------------------------------- helpers


def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Normal noise drawn on the generator's device (so a CPU generator works for any target device)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _rand(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    draw_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=draw_device).to(device)


def _expand_t(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t: float, [] or [B] -> broadcastable against ``like: [B, ...]`` (upstream ``t.view(-1, 1, ...)``)."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _map_cond(cond: Cond, fn: Callable[[torch.Tensor], torch.Tensor]) -> Cond:
    if isinstance(cond, Mapping):
        return {k: fn(v) for k, v in cond.items()}
    return fn(cond)


def zeros_like_cond(cond: Cond | None) -> Cond | None:
    """The negative condition TRELLIS.2 uses (``torch.zeros_like(cond)``), for tensors or mappings."""
    if cond is None:
        return None
    return _map_cond(cond, torch.zeros_like)


def call_model(model: Model, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, hidden: torch.Tensor | None):
    """``model(x_t, t, cond, hidden)``; ``hidden`` left out when None. ``t`` is already scaled."""
    if hidden is None:
        return model(x_t, t, cond)
    return model(x_t, t, cond, hidden)


# --------------------------------------------------------------------------- training math


def diffuse(x0: torch.Tensor, t: torch.Tensor | float, noise: torch.Tensor, sigma_min: float = SIGMA_MIN):
    """q(x_t | x0): ``(1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * noise``; t float, [] or [B]."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the shape of x0 {tuple(x0.shape)}")
    t = _expand_t(t, x0)
    return (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """d x_t / d t = ``(1 - sigma_min) * noise - x0`` (independent of t)."""
    return (1 - sigma_min) * noise - x0


def model_time(t: torch.Tensor) -> torch.Tensor:
    """The timestep the model sees: ``t * 1000``."""
    return t * TIME_SCALE


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    mean: float = 1.0,
    std: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """logitNormal(mean, std): ``t = sigmoid(n * std + mean)``, n ~ N(0, 1), float32 ``[batch]`` in (0, 1)."""
    n = _randn((batch,), generator, device, torch.float32)
    return torch.sigmoid(n * std + mean)


def draw_timesteps(batch: int, generator: torch.Generator | None, cfg: FlowConfig, device) -> torch.Tensor:
    """The training timesteps of ``cfg.timesteps``: logitNormal(t_mean, t_std) or uniform in (0, 1)."""
    if cfg.timesteps == "uniform":
        return _rand(batch, generator, device)
    return sample_timesteps(batch, generator, cfg.t_mean, cfg.t_std, device=device)


class Dropped(NamedTuple):
    cond: Cond
    hidden: torch.Tensor | None
    cond_dropped: torch.Tensor  # bool [B], True = replaced by zeros
    hidden_dropped: torch.Tensor  # bool [B]; all False when hidden is None


def _zero_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(m, torch.zeros_like(x), x)


def drop_conditions(
    cond: Cond,
    hidden: torch.Tensor | None,
    p: float = 0.1,
    mode: DropMode = "joint",
    generator: torch.Generator | None = None,
) -> Dropped:
    """Classifier-free-guidance dropout: per sample, a dropped condition becomes zeros.

    ``joint``: one coin per sample drops both; ``independent``: one coin for ``cond`` then one for
    ``hidden`` (both always drawn, so the RNG stream does not depend on whether hidden is None).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    if mode not in ("joint", "independent"):
        raise ValueError(f"unknown drop mode {mode!r} (joint, independent)")
    ref = next(iter(cond.values())) if isinstance(cond, Mapping) else cond
    b = ref.shape[0]
    cond_mask = _rand(b, generator, ref.device) < p
    hidden_mask = cond_mask if mode == "joint" else _rand(b, generator, ref.device) < p
    new_cond = _map_cond(cond, lambda x: _zero_where(x, cond_mask))
    if hidden is None:
        return Dropped(new_cond, None, cond_mask, torch.zeros_like(hidden_mask))
    if hidden.shape[0] != b:
        raise ValueError(f"hidden batch {hidden.shape[0]} != cond batch {b}")
    return Dropped(new_cond, _zero_where(hidden, hidden_mask), cond_mask, hidden_mask.clone())


class FlowLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean over all elements (= mean of per_sample)
    per_sample: torch.Tensor  # [B] float32 MSE per sample
    t: torch.Tensor  # [B] the timesteps drawn, for timestep-bin logging


def flow_loss(
    model: Model,
    x0: torch.Tensor,
    cond: Cond,
    hidden: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    config: FlowConfig | None = None,
    drop: bool = True,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> FlowLoss:
    """One flow-matching loss evaluation (FlowMatchingCFGTrainer.training_losses).

    Draws, in upstream's order, noise, timesteps (unless given) and — when ``drop`` and
    ``config.p_uncond > 0`` — the condition drop coins; predicts ``model(x_t, t * 1000, cond, hidden)``
    and returns the MSE against ``(1 - sigma_min) * noise - x0`` (computed in float32).
    """
    cfg = config or FlowConfig()
    if noise is None:
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
    if t is None:
        t = draw_timesteps(x0.shape[0], generator, cfg, x0.device)
    t = t.to(x0.device).float()
    x_t = diffuse(x0, t, noise, cfg.sigma_min)
    if drop and cfg.p_uncond > 0:
        cond, hidden, _, _ = drop_conditions(cond, hidden, cfg.p_uncond, cfg.drop_mode, generator)
    pred = call_model(model, x_t, model_time(t), cond, hidden)
    if pred.shape != x0.shape:
        raise ValueError(f"model returned {tuple(pred.shape)}, expected {tuple(x0.shape)}")
    err = (pred.float() - velocity_target(x0, noise, cfg.sigma_min).float()).square()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return FlowLoss(per_sample.mean(), per_sample, t)


def sparse_flow_loss(
    model: Model,
    feats: torch.Tensor,
    coords: torch.Tensor,
    cond: Cond,
    hidden: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    config: FlowConfig | None = None,
    drop: bool = True,
) -> FlowLoss:
    """:func:`flow_loss` on a batch of sparse latents (stage 2): ``feats [N, C]`` at ``coords [N, 4]``
    (batch, x, y, z), one timestep per sample shared by its voxels; the model is called as
    ``model(x_t, t * 1000, cond, hidden, coords=coords)``. ``per_sample`` is each sample's MSE over
    its own voxels and channels; ``loss`` their mean (each sample weighs the same, whatever its size)."""
    cfg = config or FlowConfig()
    batch = int(cond.shape[0]) if not isinstance(cond, Mapping) else int(next(iter(cond.values())).shape[0])
    index = coords[:, 0].long()
    noise = _randn(feats.shape, generator, feats.device, feats.dtype)
    t = draw_timesteps(batch, generator, cfg, feats.device).float()
    x_t = diffuse(feats, t[index], noise, cfg.sigma_min)
    if drop and cfg.p_uncond > 0:
        cond, hidden, _, _ = drop_conditions(cond, hidden, cfg.p_uncond, cfg.drop_mode, generator)
    t_in = model_time(t)
    pred = (
        model(x_t, t_in, cond, hidden, coords=coords) if hidden is not None else model(x_t, t_in, cond, coords=coords)
    )
    if pred.shape != feats.shape:
        raise ValueError(f"model returned {tuple(pred.shape)}, expected {tuple(feats.shape)}")
    err = (pred.float() - velocity_target(feats, noise, cfg.sigma_min).float()).square().mean(dim=1)
    sums = torch.zeros(batch, device=feats.device, dtype=torch.float32).index_add_(0, index, err)
    counts = torch.bincount(index, minlength=batch).clamp_min(1).float()
    per_sample = sums / counts
    return FlowLoss(per_sample.mean(), per_sample, t)


class SparseSample(torch.nn.Module):
    """One sparse sample seen by :class:`EulerCfgSampler` as a dense batch of 1: ``x [1, N, C]`` ->
    ``model(x[0], t, cond, hidden, coords)[None]`` with the fixed ``coords [N, 3]`` (batch 0). CFG's
    guidance rescale then takes the std over the whole sample, as for a dense latent."""

    def __init__(self, model: torch.nn.Module, coords: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        xyz = coords.long().reshape(-1, 3)
        self.coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], dim=1)

    def forward(self, x, t, cond, hidden=None):
        coords = self.coords.to(x.device)
        if hidden is None:
            return self.model(x[0], t, cond, coords=coords)[None]
        return self.model(x[0], t, cond, hidden, coords=coords)[None]


class MultiImage(torch.nn.Module):
    """TRELLIS's multi-image conditioning as a model wrapper: the sampler passes ``cond`` of shape
    ``[K, T, D]`` (K views of one sample, e.g. the front and the generated back) and the wrapped
    model sees one view at a time. ``multidiffusion``: the mean of the K predictions at every
    call; ``stochastic``: view ``i mod K`` at the i-th sampler step (a new timestep starts a step,
    so the conditional and unconditional calls of a step share the view). Zeros (CFG's negative)
    give the same prediction whatever the view."""

    MODES = ("stochastic", "multidiffusion")

    def __init__(self, model: torch.nn.Module, mode: str = "stochastic") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"multi-image mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.model, self.mode, self.step, self._t = model, mode, -1, None

    def forward(self, x, t, cond, hidden=None):
        views = [cond[k : k + 1] for k in range(cond.shape[0])]
        run = (lambda c: self.model(x, t, c)) if hidden is None else (lambda c: self.model(x, t, c, hidden))
        if self.mode == "multidiffusion":
            return torch.stack([run(c) for c in views]).mean(0)
        key = float(t.reshape(-1)[0])
        if key != self._t:
            self.step, self._t = self.step + 1, key
        return run(views[self.step % len(views)])


def _fmt_edge(x: float) -> str:
    s = f"{x:.4f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def timestep_bins(t: torch.Tensor, losses: torch.Tensor, bins: int = 10, prefix: str = "loss") -> dict[str, float]:
    """Mean loss per timestep bin, e.g. ``{'loss/t_0.0-0.1': ...}``, over the bins that have samples
    (upstream's ``np.digitize(t, linspace(0, 1, bins + 1)) - 1``, with t = 1 kept in the last bin)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    t = t.detach().float().cpu().reshape(-1)
    losses = losses.detach().float().cpu().reshape(-1)
    if t.shape != losses.shape:
        raise ValueError(f"t {tuple(t.shape)} and losses {tuple(losses.shape)} must match")
    index = torch.clamp(torch.floor(t * bins).long(), 0, bins - 1)
    out = {}
    for b in range(bins):
        mask = index == b
        if mask.any():
            out[f"{prefix}/t_{_fmt_edge(b / bins)}-{_fmt_edge((b + 1) / bins)}"] = float(losses[mask].mean())
    return out


# --------------------------------------------------------------------------- grad clipping


class AdaptiveGradClipper:
    """TRELLIS.2's adaptive gradient clipping.

    Each call clips the global grad norm at the current threshold, which is ``max_norm`` (None = no
    clipping) until ``buffer_size`` finite pre-clip norms have been recorded, and from then on, after
    every recorded norm, ``min(percentile(buffer, clip_percentile), max_norm)`` over the ring buffer
    of the last ``buffer_size`` norms (numpy's linear percentile over a float32 buffer, as upstream).
    Non-finite norms are not recorded. :meth:`state_dict` / :meth:`load_state_dict` carry the buffer
    and threshold so a resumed run clips identically.
    """

    def __init__(self, max_norm: float | None = 1.0, clip_percentile: float = 95.0, buffer_size: int = 1000):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0.0 <= clip_percentile <= 100.0:
            raise ValueError(f"clip_percentile must be in [0, 100], got {clip_percentile}")
        self.max_norm = max_norm
        self.clip_percentile = clip_percentile
        self.buffer_size = buffer_size
        self._norms = np.zeros(buffer_size, dtype=np.float32)
        self._threshold: float | None = max_norm
        self._ptr = 0
        self._length = 0

    def __repr__(self) -> str:
        return (
            f"AdaptiveGradClipper(max_norm={self.max_norm}, clip_percentile={self.clip_percentile}, "
            f"buffer_size={self.buffer_size})"
        )

    @property
    def threshold(self) -> float:
        """The norm the next call clips at (inf = none)."""
        return math.inf if self._threshold is None else float(self._threshold)

    def log(self) -> dict[str, float]:
        return {"max_norm": self.threshold}

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_norm": torch.from_numpy(self._norms.copy()),
            "max_norm": self._threshold,
            "buffer_ptr": self._ptr,
            "buffer_length": self._length,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        norms = state["grad_norm"]
        norms = norms.detach().cpu().numpy() if isinstance(norms, torch.Tensor) else np.asarray(norms)
        if norms.shape != (self.buffer_size,):
            raise ValueError(f"grad-norm buffer of shape {norms.shape}, this clipper holds {self.buffer_size}")
        self._norms = norms.astype(np.float32, copy=True)
        self._threshold = None if state["max_norm"] is None else float(state["max_norm"])
        self._ptr = int(state["buffer_ptr"])
        self._length = int(state["buffer_length"])

    def __call__(self, parameters, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None):
        """Clip in place; returns the total (pre-clip) grad norm, as ``clip_grad_norm_``."""
        grad_norm = torch.nn.utils.clip_grad_norm_(
            parameters,
            max_norm=self.threshold,
            norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite,
            foreach=foreach,
        )
        self.record(float(grad_norm))
        return grad_norm

    def record(self, grad_norm: float | None) -> None:
        """Add one pre-clip norm to the buffer (non-finite or None: skipped) and update the
        threshold; for optimizers that clip themselves (DeepSpeed) and report the norm."""
        if grad_norm is None or not math.isfinite(grad_norm):
            return
        self._norms[self._ptr] = grad_norm
        self._ptr = (self._ptr + 1) % self.buffer_size
        self._length = min(self._length + 1, self.buffer_size)
        if self._length == self.buffer_size:
            value = float(np.percentile(self._norms, self.clip_percentile))
            self._threshold = min(value, self.max_norm) if self.max_norm is not None else value


# --------------------------------------------------------------------------- sampler


def timestep_schedule(steps: int, rescale_t: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 to 0: ``r t / (1 + (r - 1) t)`` over ``linspace(1, 0, steps + 1)``."""
    t_seq = np.linspace(1, 0, steps + 1)
    t_seq = rescale_t * t_seq / (1 + (rescale_t - 1) * t_seq)
    return t_seq.tolist()


@dataclass
class SampleResult:
    samples: torch.Tensor
    timesteps: list[float]  # t of each step (the pair's first element); steps entries
    guided: list[bool]  # whether CFG (two model calls) was applied at each step
    pred_x_t: list[torch.Tensor] = field(default_factory=list)  # x after each step (when trajectory=True)
    pred_x_0: list[torch.Tensor] = field(default_factory=list)  # x0 predicted at each step (trajectory=True)


class EulerCfgSampler:
    """Euler sampling with classifier-free guidance in an interval and guidance rescale
    (TRELLIS.2 ``FlowEulerGuidanceIntervalSampler`` with the CFG mixin's rescale)."""

    def __init__(self, config: SamplerConfig | None = None, sigma_min: float = SIGMA_MIN):
        self.config = config or SamplerConfig()
        self.sigma_min = sigma_min

    # conversions (FlowEulerSampler), t a python float or broadcastable tensor
    def eps_to_xstart(self, x_t, t, eps):
        return (x_t - (self.sigma_min + (1 - self.sigma_min) * t) * eps) / (1 - t)

    def xstart_to_eps(self, x_t, t, x_0):
        return (x_t - (1 - t) * x_0) / (self.sigma_min + (1 - self.sigma_min) * t)

    def v_to_xstart_eps(self, x_t, t, v):
        eps = (1 - t) * v + x_t
        x_0 = (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * v
        return x_0, eps

    def pred_to_xstart(self, x_t, t, pred):
        return (1 - self.sigma_min) * x_t - (self.sigma_min + (1 - self.sigma_min) * t) * pred

    def xstart_to_pred(self, x_t, t, x_0):
        return ((1 - self.sigma_min) * x_t - x_0) / (self.sigma_min + (1 - self.sigma_min) * t)

    def _model_v(self, model, x_t, t: float, cond, hidden):
        t_in = torch.tensor([TIME_SCALE * t] * x_t.shape[0], device=x_t.device, dtype=torch.float32)
        return call_model(model, x_t, t_in, cond, hidden)

    def predict(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: float,
        cond: Cond,
        hidden: torch.Tensor | None,
        neg_cond: Cond,
        neg_hidden: torch.Tensor | None,
        guidance_strength: float,
        guidance_rescale: float,
    ) -> torch.Tensor:
        """The (guided) velocity at time t (ClassifierFreeGuidanceSamplerMixin._inference_model)."""
        if guidance_strength == 1:
            return self._model_v(model, x_t, t, cond, hidden)
        if guidance_strength == 0:
            return self._model_v(model, x_t, t, neg_cond, neg_hidden)
        pred_pos = self._model_v(model, x_t, t, cond, hidden)
        pred_neg = self._model_v(model, x_t, t, neg_cond, neg_hidden)
        pred = guidance_strength * pred_pos + (1 - guidance_strength) * pred_neg
        if guidance_rescale > 0:
            x_0_pos = self.pred_to_xstart(x_t, t, pred_pos)
            x_0_cfg = self.pred_to_xstart(x_t, t, pred)
            dims = list(range(1, x_0_pos.ndim))
            std_pos = x_0_pos.std(dim=dims, keepdim=True)
            std_cfg = x_0_cfg.std(dim=dims, keepdim=True)
            x_0_rescaled = x_0_cfg * (std_pos / std_cfg)
            x_0 = guidance_rescale * x_0_rescaled + (1 - guidance_rescale) * x_0_cfg
            pred = self.xstart_to_pred(x_t, t, x_0)
        return pred

    # hooks of :meth:`sample` (a guided sampler overrides them; the loop stays one)
    def new_result(self, noise: torch.Tensor) -> SampleResult:
        return SampleResult(samples=noise, timesteps=[], guided=[])

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """x at t = 1."""
        return noise

    def step(self, x, v, t: float, t_prev: float, noise: torch.Tensor, result: SampleResult) -> torch.Tensor:
        """One Euler step from t to t_prev with velocity v."""
        return x - (t - t_prev) * v

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        noise: torch.Tensor | None,
        cond: Cond,
        hidden: torch.Tensor | None = None,
        *,
        neg_cond: Cond | None = None,
        neg_hidden: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        shape: tuple[int, ...] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        trajectory: bool = False,
    ) -> SampleResult:
        """Integrate from t = 1 (``noise``, or ``randn(shape)`` from ``generator``) to t = 0.

        ``neg_cond`` / ``neg_hidden`` default to zeros like ``cond`` / ``hidden``.
        """
        cfg = self.config
        if noise is None:
            if shape is None:
                raise ValueError("give noise or a shape to draw it from")
            if device is None:
                ref = next(iter(cond.values())) if isinstance(cond, Mapping) else cond
                device = ref.device
            noise = _randn(tuple(shape), generator, device, dtype)
        if neg_cond is None:
            neg_cond = zeros_like_cond(cond)
        if neg_hidden is None and hidden is not None:
            neg_hidden = torch.zeros_like(hidden)
        lo, hi = cfg.guidance_interval
        t_seq = timestep_schedule(cfg.steps, cfg.rescale_t)
        result = self.new_result(noise)
        x = self.initial(noise)
        for t, t_prev in zip(t_seq[:-1], t_seq[1:], strict=True):
            strength = cfg.guidance_strength if lo <= t <= hi else 1
            v = self.predict(model, x, t, cond, hidden, neg_cond, neg_hidden, strength, cfg.guidance_rescale)
            if trajectory:
                result.pred_x_0.append(self.pred_to_xstart(x, t, v))
            x = self.step(x, v, t, t_prev, noise, result)
            if trajectory:
                result.pred_x_t.append(x)
            result.timesteps.append(t)
            result.guided.append(strength not in (0, 1))
        result.samples = x
        return result


def sample(
    model: Model,
    noise: torch.Tensor | None,
    cond: Cond,
    hidden: torch.Tensor | None = None,
    *,
    steps: int = 12,
    guidance_strength: float = 7.5,
    guidance_interval: tuple[float, float] = (0.6, 1.0),
    guidance_rescale: float = 0.7,
    rescale_t: float = 5.0,
    neg_cond: Cond | None = None,
    neg_hidden: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    shape: tuple[int, ...] | None = None,
    sigma_min: float = SIGMA_MIN,
) -> torch.Tensor:
    """The sparse-structure sampler with TRELLIS.2's defaults; returns the samples (x at t = 0).
    Use :class:`EulerCfgSampler` for the per-step record."""
    cfg = SamplerConfig(
        steps=steps,
        guidance_strength=guidance_strength,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        rescale_t=rescale_t,
    )
    return (
        EulerCfgSampler(cfg, sigma_min)
        .sample(
            model,
            noise,
            cond,
            hidden,
            neg_cond=neg_cond,
            neg_hidden=neg_hidden,
            generator=generator,
            shape=shape,
        )
        .samples
    )
