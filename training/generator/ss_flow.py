"""TRELLIS.2's image-conditioned sparse-structure flow DiT ("ss_flow_img_dit_1_3B_64_bf16"),
checkpoint-compatible, plus the Know3D branch that reads the back-view model's hidden states H.

Structure (upstream ``trellis2/models/sparse_structure_flow.py:SparseStructureFlowModel``): the
noisy latent ``x [B, 8, 16, 16, 16]`` is flattened to ``R³ = 4096`` tokens (D, H, W order) and

* ``input_layer``: Linear ``in_channels -> model_channels``;
* ``t_embedder``: sinusoidal embedding of the (already ×1000) timestep (256 frequencies, cos then
  sin) -> Linear -> SiLU -> Linear;
* ``adaLN_modulation`` (``share_mod``): SiLU -> Linear to ``6 * model_channels``, computed once and
  shared by every block; each block adds its own learned ``modulation`` bias (``[6C]``) to it and
  splits shift/scale/gate for the self-attention and for the MLP;
* ``blocks``: ``num_blocks`` ModulatedTransformerCrossBlocks:

  - ``norm1`` (no affine) -> modulate -> ``self_attn`` (fused ``to_qkv``, per-head RMS norm of q
    and k, 3D RoPE on q and k) -> gate -> residual;
  - ``norm2`` (affine) -> ``cross_attn`` on the image condition (DINOv3 tokens, ``to_q`` /
    ``to_kv``, per-head RMS norm of q and k) -> residual (not modulated, not gated);
  - ``norm3`` (no affine) -> modulate -> ``mlp`` (Linear, GELU-tanh, Linear; hidden width
    ``int(C * mlp_ratio)``) -> gate -> residual;

* a final parameter-free LayerNorm (eps 1e-5) and ``out_layer`` back to ``out_channels``.

RoPE: per head of ``head_dim`` channels, ``head_dim // 2 // 3`` frequencies
``rope_freq[0] / rope_freq[1] ** (i / n)`` per axis applied to the integer voxel coordinates,
padded with unit phases to ``head_dim / 2`` complex pairs; the phases are the persistent complex64
buffer ``rope_phases [R³, head_dim / 2]`` (in the official key list; deterministic, so a checkpoint
may omit it). LayerNorms and the RMS norms compute in float32; attention is
``F.scaled_dot_product_attention``. ``initialization="scaled"`` follows upstream: normal(√(2/5C))
Linears, normal(1/√(5·blocks·C)) for the attention ``to_out`` and second MLP Linear, normal(1/√in)
input layer, normal(0.02) timestep MLP, zeros for the ``adaLN_modulation`` and ``out_layer``.
Module names are those of the released checkpoint, so with ``hidden_channels=None``
``state_dict()`` matches it key for key and shape for shape.

Know3D branch (``hidden_channels`` set; paper §3.2). H ``[B, M, hidden_channels]`` (the captured
back-view hidden states, layers concatenated along channels) is projected ONCE per forward by the
model-level ``know3d_hidden_proj`` (Linear ``hidden_channels -> model_channels``) and
``know3d_hidden_norm`` (affine LayerNorm), and every block gets, after its image cross-attention,

    x = x + know3d_out(know3d_cross_attn(know3d_norm(x), Hp))

with ``know3d_norm`` an affine LayerNorm like ``norm2``, ``know3d_cross_attn`` a cross-attention
(own ``to_q``, ``to_kv``, per-head q/k RMS norm as in the image cross-attention, ``to_out``) and
``know3d_out`` a ZERO-initialized Linear, so at initialization the branched model computes exactly
the base model's output (bit for bit). Self-attention, image cross-attention and MLP are untouched.

Design decision: the H projection is shared across blocks. One Linear of 12288×1536 is ≈18.9M
parameters; a copy per block would be 30× that, ≈566M (≈44% of the 1.3B base) for little gain:
each block's own ``to_q``/``to_kv`` still reads the shared projection differently. With it the
whole branch is ≈373M parameters at full size (per block ≈11.8M: ``to_q``, ``to_kv``, ``to_out``,
``know3d_out``, norms). New parameter
names all carry the ``know3d_`` prefix (:func:`is_branch_key`), disjoint from the official names.
CFG: the trainer drops H by passing zeros; ``hidden=None`` on a branched model is an error.

Loading (:func:`load_ss_flow`) reads safetensors only (never a pickle) and checks every official
key strictly; the only keys a checkpoint may lack are the branch keys and the deterministic
position buffer.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from know3d.training.generator.checkpoints import weights_file

log = logging.getLogger(__name__)

UPSTREAM_NAME = "SparseStructureFlowModel"
BRANCH_PREFIX = "know3d_"
# 4 captured Qwen-Image MMDiT blocks (DEFAULT_LAYERS in config.py) x 3072 channels each
FULL_HIDDEN_CHANNELS = 4 * 3072
# persistent buffers computed from the config: a checkpoint may omit them
DETERMINISTIC_BUFFERS = ("rope_phases", "pos_emb")
# our own file names; upstream's are ckpts/ss_flow_img_dit_1_3B_64_bf16.{safetensors,json}
_FILE_STEM = "ss_flow"
_UPSTREAM_GLOB = "ss_flow_*.safetensors"


class SSFlowLoadError(Exception):
    """A sparse-structure flow checkpoint cannot be loaded; the message names the file and why."""


def is_branch_key(key: str) -> bool:
    """True for a Know3D branch parameter/buffer name (any dotted component starts ``know3d_``)."""
    return any(part.startswith(BRANCH_PREFIX) for part in key.split("."))


@dataclass(kw_only=True)
class SSFlowConfig:
    """Upstream's constructor arguments (defaults = the released 1.3B model) + ``hidden_channels``."""

    resolution: int = 16
    in_channels: int = 8
    out_channels: int = 8
    model_channels: int = 1536
    cond_channels: int = 1024
    num_blocks: int = 30
    num_heads: int = 12
    mlp_ratio: float = 5.3334
    pe_mode: str = "rope"  # "rope" or "ape"
    rope_freq: tuple[float, float] = (1.0, 10000.0)
    share_mod: bool = True
    initialization: str = "scaled"  # or "vanilla"
    qk_rms_norm: bool = True
    qk_rms_norm_cross: bool = True
    use_checkpoint: bool = False  # activation checkpointing per block (training memory; no keys)
    # p³ voxels per token, as TRELLIS v1's SS flow (TRELLIS.2's is 1: the official keys assume 1).
    # The debug size uses 2 so its 16³ latent is 512 tokens, not 4096 (CPU attention cost).
    patch_size: int = 1
    hidden_channels: int | None = None  # Know3D branch: width of H; None = plain TRELLIS.2

    def __post_init__(self) -> None:
        if self.pe_mode not in ("rope", "ape"):
            raise ValueError(f"pe_mode must be 'rope' or 'ape', got {self.pe_mode!r}")
        if self.initialization not in ("scaled", "vanilla"):
            raise ValueError(f"initialization must be 'scaled' or 'vanilla', got {self.initialization!r}")
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} not divisible by num_heads {self.num_heads}")
        if self.pe_mode == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.hidden_channels is not None and self.hidden_channels <= 0:
            raise ValueError(f"hidden_channels must be positive or None, got {self.hidden_channels}")
        self.rope_freq = tuple(float(f) for f in self.rope_freq)

    @classmethod
    def full(cls, hidden_channels: int | None = None) -> SSFlowConfig:
        """``ss_flow_img_dit_1_3B_64_bf16`` (TRELLIS.2); ``hidden_channels`` adds the Know3D branch
        (``FULL_HIDDEN_CHANNELS`` for the default capture)."""
        return cls(hidden_channels=hidden_channels)

    @classmethod
    def debug(cls, hidden_channels: int | None = 24) -> SSFlowConfig:
        """CPU size: 16³ x 8 latent in 2³ patches (512 tokens), 128 channels, 2 blocks of 8 heads
        (head_dim 16), MLP ratio 4, absolute positions, cond 32, H 24."""
        return cls(
            model_channels=128,
            cond_channels=32,
            # 2 blocks, not 4: each step costs 0.13 s instead of 0.23 s on 2 cores, and the base
            # still memorizes its 2 assets in 1500 steps (IoU 0.91 / 0.83; benchmarks/RESULTS.md)
            num_blocks=2,
            num_heads=8,
            mlp_ratio=4.0,
            hidden_channels=hidden_channels,
            patch_size=2,
            # absolute positions (upstream's "ape" mode): at this size and a CPU's step budget the
            # model memorizes its training latents far better with them than with RoPE (IoU at
            # CFG 7.5 after 1500 steps on 2 assets: 0.83/0.95 vs 0.16/0.89); full size uses RoPE
            pe_mode="ape",
        )

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def num_tokens(self) -> int:
        return self.grid**3

    @property
    def grid(self) -> int:
        """Tokens per side: resolution / patch_size."""
        return self.resolution // self.patch_size

    @property
    def has_branch(self) -> bool:
        return self.hidden_channels is not None

    def base(self) -> SSFlowConfig:
        """The same model without the Know3D branch."""
        return replace(self, hidden_channels=None)

    def model_args(self) -> dict:
        """The upstream ``SparseStructureFlowModel`` constructor arguments (no branch)."""
        out = self.to_json()
        out.pop("hidden_channels")
        out.pop("use_checkpoint")
        if out["patch_size"] == 1:  # TRELLIS.2's constructor has no patch_size (TRELLIS v1's does)
            out.pop("patch_size")
        return out

    def to_json(self) -> dict:
        out = asdict(self)
        out["rope_freq"] = list(self.rope_freq)
        return out

    @classmethod
    def from_json(cls, data: dict) -> SSFlowConfig:
        """Our own ``to_json``, an upstream checkpoint json (``{"name", "args"}``) or an upstream
        training config (``{"models": {"denoiser": {...}}}``)."""
        if "models" in data:
            data = data["models"]["denoiser"]
        if "args" in data:
            name = data.get("name", UPSTREAM_NAME)
            if name != UPSTREAM_NAME:
                raise ValueError(f"not a {UPSTREAM_NAME} config (name {name!r})")
            args = dict(data["args"])
            args.pop("dtype", None)  # upstream's torso dtype: chosen at load time here
            head_channels = args.pop("num_head_channels", 64)
            if args.get("num_heads") is None:
                args["num_heads"] = int(args["model_channels"]) // int(head_channels)
            data = args
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SS-flow config fields: {', '.join(unknown)}")
        data = dict(data)
        if "rope_freq" in data:
            data["rope_freq"] = tuple(data["rope_freq"])
        return cls(**data)


# --------------------------------------------------------------------------- building blocks


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Upstream's ``manual_cast``: cast unless autocast (on ``x``'s device type) manages dtypes."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last axis computed in float32 (weights too), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of ``[..., heads, dim]``: ``normalize(x) * gamma * sqrt(dim)`` in float32."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


def grid_coords(resolution: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[R³, 3]`` integer voxel coordinates in the flattening order of ``x.view(B, C, -1)``."""
    axes = [torch.arange(resolution, device=device)] * 3
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def rope_phases(coords: torch.Tensor, head_dim: int, rope_freq: tuple[float, float] = (1.0, 10000.0)) -> torch.Tensor:
    """Complex64 unit phases ``[N, head_dim / 2]`` for ``[N, 3]`` positions (3D RoPE, unit-padded)."""
    dims = coords.shape[-1]
    n = head_dim // 2 // dims
    freqs = torch.arange(n, dtype=torch.float32, device=coords.device) / n
    freqs = rope_freq[0] / (rope_freq[1] ** freqs)
    angles = torch.outer(coords.reshape(-1), freqs).reshape(*coords.shape[:-1], -1)
    phases = torch.polar(torch.ones_like(angles), angles)
    pad = head_dim // 2 - phases.shape[-1]
    if pad > 0:
        ones = torch.ones(*phases.shape[:-1], pad, device=phases.device)
        phases = torch.cat([phases, torch.polar(ones, torch.zeros_like(ones))], dim=-1)
    return phases


def apply_rope(x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, L, heads, D]`` by ``[L, D/2]`` phases (channel pairs as complex numbers)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * phases.unsqueeze(-2))
    return out.reshape(*out.shape[:-2], -1).to(x.dtype)


def absolute_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Upstream's ``AbsolutePositionEmbedder`` (``pe_mode="ape"``): sin/cos per axis, zero-padded."""
    n, dims = coords.shape
    k = channels // dims // 2
    freqs = 1.0 / (10000 ** (torch.arange(k, dtype=torch.float32, device=coords.device) / k))
    out = torch.outer(coords.reshape(-1), freqs)
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).reshape(n, -1)
    if emb.shape[1] < channels:
        emb = torch.cat([emb, torch.zeros(n, channels - emb.shape[1], device=emb.device)], dim=-1)
    return emb


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[B, L, heads, D]`` in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """Upstream's full attention: self (``to_qkv``, optional RoPE) or cross (``to_q``, ``to_kv``),
    optional per-head q/k RMS norm, ``to_out``."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        ctx_channels: int | None = None,
        kind: str = "self",
        use_rope: bool = False,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("self", "cross"):
            raise ValueError(f"attention kind must be 'self' or 'cross', got {kind!r}")
        self.kind = kind
        self.num_heads = num_heads
        self.use_rope = use_rope
        self.qk_rms_norm = qk_rms_norm
        head_dim = channels // num_heads
        if kind == "self":
            self.to_qkv = nn.Linear(channels, 3 * channels)
        else:
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(ctx_channels or channels, 2 * channels)
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, phases: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, _ = x.shape
        if self.kind == "self":
            q, k, v = self.to_qkv(x).reshape(b, n, 3, self.num_heads, -1).unbind(dim=2)
        else:
            q = self.to_q(x).reshape(b, n, self.num_heads, -1)
            k, v = self.to_kv(context).reshape(b, context.shape[1], 2, self.num_heads, -1).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.use_rope:
            if phases is None:
                raise ValueError("RoPE attention needs phases")
            q, k = apply_rope(q, phases), apply_rope(k, phases)
        return self.to_out(_sdpa(q, k, v).reshape(b, n, -1))


class FeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float) -> None:
        super().__init__()
        width = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, width), nn.GELU(approximate="tanh"), nn.Linear(width, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ModulatedTransformerCrossBlock(nn.Module):
    """Self-attention + image cross-attention (+ Know3D H cross-attention) + MLP, adaLN-modulated."""

    def __init__(self, cfg: SSFlowConfig) -> None:
        super().__init__()
        c, heads = cfg.model_channels, cfg.num_heads
        self.share_mod = cfg.share_mod
        self.use_checkpoint = cfg.use_checkpoint
        self.norm1 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(c, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(c, elementwise_affine=False, eps=1e-6)
        self.self_attn = MultiHeadAttention(
            c, heads, kind="self", use_rope=cfg.pe_mode == "rope", qk_rms_norm=cfg.qk_rms_norm
        )
        self.cross_attn = MultiHeadAttention(
            c, heads, ctx_channels=cfg.cond_channels, kind="cross", qk_rms_norm=cfg.qk_rms_norm_cross
        )
        self.mlp = FeedForwardNet(c, cfg.mlp_ratio)
        if cfg.share_mod:
            self.modulation = nn.Parameter(torch.randn(6 * c) / c**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.has_branch = cfg.has_branch
        if cfg.has_branch:  # registered after the official modules: official keys keep their order
            self.know3d_norm = LayerNorm32(c, elementwise_affine=True, eps=1e-6)
            self.know3d_cross_attn = MultiHeadAttention(
                c, heads, ctx_channels=c, kind="cross", qk_rms_norm=cfg.qk_rms_norm_cross
            )
            self.know3d_out = nn.Linear(c, c)

    def _forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        phases: torch.Tensor | None,
        hidden: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.share_mod:
            mod = (self.modulation + mod).type(mod.dtype)
        else:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = self.norm1(x)
        h = h * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        h = self.self_attn(h, phases=phases)
        x = x + h * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), context)
        if self.has_branch:
            x = x + self.know3d_out(self.know3d_cross_attn(self.know3d_norm(x), hidden))
        h = self.norm3(x)
        h = h * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        h = self.mlp(h)
        return x + h * gate_mlp.unsqueeze(1)

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        phases: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mod, context, phases, hidden, use_reentrant=False)
        return self._forward(x, mod, context, phases, hidden)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (cos, sin; max period 10000) of the timestep, then a 2-layer MLP."""

    def __init__(self, channels: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, channels), nn.SiLU(), nn.Linear(channels, channels)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(_cast(emb, self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------- the model


class SSFlowModel(nn.Module):
    """``model(x [B, in, R, R, R], t [B] (×1000), cond [B, N, cond_channels], hidden [B, M, hidden_channels])``
    -> velocity ``[B, out, R, R, R]``. ``hidden`` only (and then always) with the Know3D branch."""

    def __init__(self, cfg: SSFlowConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SSFlowConfig.full()
        self.cfg = cfg
        c = cfg.model_channels
        self.initialized_keys: tuple[str, ...] = ()  # set by load_ss_flow: keys not in the file
        # registration order = upstream's state_dict order (own buffers first, then children)
        coords = grid_coords(cfg.grid)
        if cfg.pe_mode == "rope":
            self.register_buffer("rope_phases", rope_phases(coords, cfg.head_dim, cfg.rope_freq))
        else:
            self.register_buffer("pos_emb", absolute_position_embedding(coords, c))
            self.rope_phases = None
        self.t_embedder = TimestepEmbedder(c)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.input_layer = nn.Linear(cfg.in_channels * cfg.patch_size**3, c)
        self.blocks = nn.ModuleList([ModulatedTransformerCrossBlock(cfg) for _ in range(cfg.num_blocks)])
        self.out_layer = nn.Linear(c, cfg.out_channels * cfg.patch_size**3)
        if cfg.has_branch:
            self.know3d_hidden_proj = nn.Linear(cfg.hidden_channels, c)
            self.know3d_hidden_norm = LayerNorm32(c, elementwise_affine=True, eps=1e-6)
        if self.input_layer.weight.device.type != "meta":
            self.initialize_weights()

    # ---- initialization / dtype

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream's ``initialize_weights`` (``vanilla`` or ``scaled``), then the branch's init."""
        cfg = self.cfg
        c = cfg.model_channels
        if cfg.initialization == "vanilla":
            std = None  # xavier uniform
        else:
            std = math.sqrt(2.0 / (5.0 * c))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if std is None:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        scaled = 1.0 / math.sqrt(5 * cfg.num_blocks * c)
        if cfg.initialization == "scaled":
            outs = []
            for block in self.blocks:
                outs += [block.self_attn.to_out, block.cross_attn.to_out, block.mlp.mlp[2]]
                if cfg.has_branch:
                    outs.append(block.know3d_cross_attn.to_out)
            for linear in outs:
                nn.init.normal_(linear.weight, std=scaled)
                nn.init.zeros_(linear.bias)
            nn.init.normal_(self.input_layer.weight, std=1.0 / math.sqrt(cfg.in_channels))
            nn.init.zeros_(self.input_layer.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeros = [self.adaLN_modulation[-1]] if cfg.share_mod else [b.adaLN_modulation[-1] for b in self.blocks]
        zeros.append(self.out_layer)
        if cfg.has_branch:
            zeros += [block.know3d_out for block in self.blocks]
            # H's projection keeps H's scale (LayerNorm follows anyway)
            nn.init.normal_(self.know3d_hidden_proj.weight, std=1.0 / math.sqrt(cfg.hidden_channels))
            nn.init.zeros_(self.know3d_hidden_proj.bias)
        for linear in zeros:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype: that of the blocks' Linear weights."""
        return self.blocks[0].self_attn.to_qkv.weight.dtype if len(self.blocks) else torch.float32

    def convert_to(self, dtype: torch.dtype) -> SSFlowModel:
        """Upstream's ``convert_to``: the blocks' Linear weights in ``dtype`` (e.g. bfloat16), norms,
        modulation biases, embedders, in/out layers and the H projection stay float32; activations
        are cast between them (unless autocast runs). A whole-model ``.to(torch.bfloat16)`` (e.g. a
        bf16 DeepSpeed engine) works too; norms still compute in float32 and ``rope_phases``
        (which ``Module.to`` casts to real) is then recomputed in complex64 on the fly."""
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                for p in module.parameters():
                    p.data = p.data.to(dtype)
        return self

    # ---- branch helpers

    def branch_parameter_names(self) -> list[str]:
        """Names (``named_parameters``) of the Know3D branch; empty without it."""
        return [name for name, _ in self.named_parameters() if is_branch_key(name)]

    def branch_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if is_branch_key(name)]

    def base_parameters(self) -> list[nn.Parameter]:
        """The official (TRELLIS.2) parameters."""
        return [p for name, p in self.named_parameters() if not is_branch_key(name)]

    # ---- forward

    def _phases(self) -> torch.Tensor | None:
        if self.rope_phases is None:
            return None
        if self.rope_phases.is_complex():
            return self.rope_phases
        # Module.to(real dtype) also casts complex buffers (dropping the imaginary part): recompute
        coords = grid_coords(self.cfg.grid, device=self.rope_phases.device)
        return rope_phases(coords, self.cfg.head_dim, self.cfg.rope_freq)

    def _project_hidden(self, hidden: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        cfg = self.cfg
        if not cfg.has_branch:
            if hidden is not None:
                raise ValueError("this SS-flow model has no Know3D branch (hidden_channels=None): pass hidden=None")
            return None
        if hidden is None:
            raise ValueError(
                "this SS-flow model has the Know3D branch: pass hidden [B, M, "
                f"{cfg.hidden_channels}] (zeros to drop H for classifier-free guidance)"
            )
        if hidden.dim() != 3 or hidden.shape[0] != batch:
            raise ValueError(f"hidden must be [B={batch}, M, {cfg.hidden_channels}], got {list(hidden.shape)}")
        if hidden.shape[-1] != cfg.hidden_channels:
            raise ValueError(
                f"hidden width mismatch: expected {cfg.hidden_channels} channels, got {hidden.shape[-1]} "
                f"(shape {list(hidden.shape)})"
            )
        hidden = _cast(hidden, self.know3d_hidden_proj.weight.dtype)
        return _cast(self.know3d_hidden_norm(self.know3d_hidden_proj(hidden)), self.dtype)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.cfg
        r = cfg.resolution
        expected = [x.shape[0], cfg.in_channels, r, r, r]
        if list(x.shape) != expected:
            raise ValueError(f"x must be {expected}, got {list(x.shape)}")
        if cond.dim() != 3 or cond.shape[-1] != cfg.cond_channels:
            raise ValueError(f"cond must be [B, N, {cfg.cond_channels}], got {list(cond.shape)}")
        hp = self._project_hidden(hidden, x.shape[0])
        h = patchify(x, cfg.patch_size)
        h = self.input_layer(_cast(h, self.input_layer.weight.dtype))
        if cfg.pe_mode == "ape":
            h = h + self.pos_emb[None]
        mod = self.t_embedder(t)
        if cfg.share_mod:
            mod = self.adaLN_modulation(mod)
        mod = _cast(mod, self.dtype)
        h = _cast(h, self.dtype)
        cond = _cast(cond, self.dtype)
        phases = self._phases()
        for block in self.blocks:
            h = block(h, mod, cond, phases, hp)
        h = _cast(h, x.dtype)
        h = self.out_layer(_cast(F.layer_norm(h, h.shape[-1:]), self.out_layer.weight.dtype))
        return unpatchify(_cast(h, x.dtype), cfg.patch_size, r)


SparseStructureFlowModel = SSFlowModel  # upstream's name


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, R, R, R] -> tokens [B, (R/p)³, C·p³] (row-major over the token grid)."""
    b, c, r = x.shape[0], x.shape[1], x.shape[2]
    g = r // p
    x = x.reshape(b, c, g, p, g, p, g, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, g**3, c * p**3)


def unpatchify(h: torch.Tensor, p: int, r: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, (R/p)³, C·p³] -> [B, C, R, R, R]."""
    b, g = h.shape[0], r // p
    c = h.shape[2] // p**3
    x = h.reshape(b, g, g, g, c, p, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, c, r, r, r)


# --------------------------------------------------------------------------- key lists


def state_dict_shapes(cfg: SSFlowConfig) -> dict[str, list[int]]:
    """``{key: shape}`` of ``cfg``'s ``state_dict()``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = SSFlowModel(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def official_keys(cfg: SSFlowConfig) -> dict[str, list[int]]:
    """The TRELLIS.2 (non-branch) keys and shapes of ``cfg``."""
    return {k: v for k, v in state_dict_shapes(cfg).items() if not is_branch_key(k)}


def ss_flow_key_shapes(branch: bool = True, hidden_channels: int = FULL_HIDDEN_CHANNELS) -> dict[str, list[int]]:
    """Full-size keys and shapes: the 1.3B TRELLIS.2 model, with the Know3D branch if ``branch``
    (for ``know3d models keys ss-flow``)."""
    return state_dict_shapes(SSFlowConfig.full(hidden_channels if branch else None))


# --------------------------------------------------------------------------- files


def save_ss_flow(model: SSFlowModel, folder: Path | str) -> Path:
    """``<folder>/ss_flow.safetensors`` + ``ss_flow.json`` (the config); returns the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = folder / f"{_FILE_STEM}.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "model": UPSTREAM_NAME})
    (folder / f"{_FILE_STEM}.json").write_text(json.dumps(model.cfg.to_json(), indent=2) + "\n")
    return path


def _summary(name: str, keys: list[str]) -> str:
    more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
    return f"{name} {len(keys)}: {', '.join(keys[:5])}{more}"


def _weights_file(source: str | Path) -> Path:
    return weights_file(source, _FILE_STEM, _UPSTREAM_GLOB, "SS-flow", SSFlowLoadError)


def _stored_config(weights: Path) -> SSFlowConfig:
    config = weights.with_suffix(".json")
    if not config.is_file():
        return SSFlowConfig.full()
    try:
        return SSFlowConfig.from_json(json.loads(config.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise SSFlowLoadError(f"{config}: not an SS-flow config ({exc})") from None


def stored_config(source: str | Path) -> SSFlowConfig:
    """The config of the weights at ``source``: the json beside them (ours or upstream's), else the
    released 1.3B one."""
    return _stored_config(_weights_file(source))


def load_ss_flow(
    source: str | Path,
    cfg: SSFlowConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SSFlowModel:
    """The flow model from a folder, a ``.safetensors`` file or a hub id, in eval mode.

    The config comes from ``cfg`` (e.g. ``SSFlowConfig.full(FULL_HIDDEN_CHANNELS)`` to add the
    Know3D branch to the official weights), else the json next to the weights (ours or upstream's
    ``{"name", "args"}``), else the full 1.3B size. Every official key must be in the file with its
    shape; the only keys it may lack are the Know3D branch's (left at their initialization, the
    zero-initialized output keeping the base model's function) and the deterministic position
    buffer; ``model.initialized_keys`` lists those. Anything else raises :class:`SSFlowLoadError`
    naming the file. ``dtype`` (e.g. ``torch.bfloat16``) converts the torso as upstream does
    (:meth:`SSFlowModel.convert_to`); by default everything is float32."""
    weights = _weights_file(source)
    if cfg is None:
        cfg = _stored_config(weights)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SSFlowLoadError(f"{weights}: unreadable safetensors ({exc})") from None

    expected = state_dict_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    allowed = [k for k in missing if is_branch_key(k) or k in DETERMINISTIC_BUFFERS]
    missing_official = [k for k in missing if k not in allowed]
    wrong = sorted(k for k in set(expected) & set(state) if list(state[k].shape) != expected[k])
    if missing_official or unexpected:
        parts = [_summary(n, ks) for n, ks in (("missing", missing_official), ("unexpected", unexpected)) if ks]
        raise SSFlowLoadError(f"{weights}: not an SS-flow model of this config; " + "; ".join(parts))
    if wrong:
        shown = ", ".join(f"{k} {list(state[k].shape)} (expected {expected[k]})" for k in wrong[:5])
        more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise SSFlowLoadError(f"{weights}: wrong architecture, shape mismatch: {shown}{more}")

    model = SSFlowModel(cfg)
    full = model.state_dict()
    for key in DETERMINISTIC_BUFFERS:  # a stored buffer must be the one this config computes
        if key in state and not torch.allclose(state[key].to(full[key].dtype), full[key], atol=1e-5):
            raise SSFlowLoadError(f"{weights}: {key} differs from this config's (resolution/rope_freq/heads?)")
    merged = {}
    for key, value in full.items():
        if key in state:
            merged[key] = state[key].to(value.dtype)
        else:
            merged[key] = value
    initialized = sorted(set(full) - set(state))
    assert all(is_branch_key(k) or k in DETERMINISTIC_BUFFERS for k in initialized), initialized
    result = model.load_state_dict(merged, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.initialized_keys = tuple(initialized)
    if initialized:
        log.info("%s: %d keys not in the file, initialized: %s", weights, len(initialized), _summary("", initialized))
    if dtype is not None and dtype != torch.float32:
        model.convert_to(dtype)
    return model.to(device).eval()
