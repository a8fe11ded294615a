"""TRELLIS.2's image-conditioned structured-latent (shape SLat) flow DiT
("slat_flow_img2shape_dit_1_3B_512_bf16", stage 2), checkpoint-compatible, plus the same Know3D
H branch as stage 1 (:mod:`~know3d.training.generator.ss_flow`).

Structure (upstream ``trellis2/models/structured_latent_flow.py:SLatFlowModel`` /
``ElasticSLatFlowModel``, the latter only adds training-time memory management, no keys): the
noisy shape latent is a sparse tensor, ``N`` active voxels with ``in_channels = 32`` features and
integer coordinates ``[N, 4] = (batch, x, y, z)`` on the ``resolution = 32`` (64 for the 1024
fine-tune) grid of the shape SC-VAE (:mod:`~know3d.training.generator.shape_vae`), and

* ``input_layer`` / ``out_layer``: per-voxel Linears (upstream's ``SparseLinear``);
* ``t_embedder``, shared ``adaLN_modulation`` and per-block ``modulation``: exactly stage 1's;
* ``blocks``: ``num_blocks`` ModulatedSparseTransformerCrossBlocks, the same layout and module
  names as stage 1's ModulatedTransformerCrossBlock (``norm1``/``norm2``/``norm3``, ``self_attn``
  with fused ``to_qkv``, per-head q/k RMS norm and 3D RoPE, ``cross_attn`` on the DINOv3 tokens,
  ``mlp.mlp``); attention is "full" per sample: every voxel attends to every voxel of its own
  sample only;
* the final parameter-free LayerNorm (eps 1e-5) and ``out_layer``.

Differences from stage 1: no patchify and no positional buffer — the RoPE phases are computed on
the fly from each voxel's coordinates (upstream's ``SparseRotaryPositionEmbedder``: ``head_dim //
2 // 3`` frequencies per axis, unit-padded to ``head_dim / 2``), so ``state_dict()`` holds
parameters only and does not depend on ``resolution``. ``pe_mode="ape"`` adds upstream's
``AbsolutePositionEmbedder`` of the coordinates after ``input_layer`` (no keys either).

Sparse execution here: the voxels are gathered into a dense padded batch ``[B, L_max, C]`` with a
per-sample key mask (``F.scaled_dot_product_attention`` ``attn_mask``); per-voxel layers are
unaffected by the padding, padded query rows are computed and thrown away. Without padding (one
sample, or equal counts) no mask is passed at all. This is numerically the varlen attention of
upstream (up to SDPA's kernel choice) but costs ``B · L_max²``; a varlen/flash backend can replace
:func:`_masked_sdpa` later without touching any key.

Know3D branch (``hidden_channels`` set): identical to stage 1 — the model-level shared
``know3d_hidden_proj`` + ``know3d_hidden_norm`` project H once per forward; every block adds,
after its image cross-attention, ``x = x + know3d_out(know3d_cross_attn(know3d_norm(x), Hp))``
with the zero-initialized ``know3d_out``, so the branched model starts as the base model bit for
bit. New names carry the ``know3d_`` prefix (:func:`is_branch_key`).

Loading (:func:`load_slat_flow`) reads safetensors only and checks every official key strictly;
the only keys a checkpoint may lack are the branch keys.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from know3d.training.generator.checkpoints import weights_file
from know3d.training.generator.ss_flow import (
    BRANCH_PREFIX,
    FULL_HIDDEN_CHANNELS,
    LayerNorm32,
    ModulatedTransformerCrossBlock,
    MultiHeadAttention,
    SSFlowModel,
    TimestepEmbedder,
    _cast,
    _summary,
    absolute_position_embedding,
    apply_rope,
    is_branch_key,
    rope_phases,
)

log = logging.getLogger(__name__)

__all__ = [
    "BRANCH_PREFIX",
    "FULL_HIDDEN_CHANNELS",
    "SLatFlowConfig",
    "SLatFlowLoadError",
    "SLatFlowModel",
    "is_branch_key",
    "load_slat_flow",
    "official_keys",
    "save_slat_flow",
    "slat_flow_key_shapes",
    "state_dict_shapes",
]

UPSTREAM_NAMES = ("ElasticSLatFlowModel", "SLatFlowModel")
UPSTREAM_NAME = UPSTREAM_NAMES[0]  # the name in configs/gen/slat_flow_img2shape_dit_1_3B_512_bf16.json
# upstream SLatFlowModel's constructor defaults (used for args an upstream json leaves out)
_UPSTREAM_DEFAULTS = {
    "num_head_channels": 64,
    "mlp_ratio": 4.0,
    "pe_mode": "ape",
    "rope_freq": (1.0, 10000.0),
    "share_mod": False,
    "initialization": "vanilla",
    "qk_rms_norm": False,
    "qk_rms_norm_cross": False,
}
_FILE_STEM = "slat_flow"
# upstream: ckpts/slat_flow_img2shape_dit_1_3B_512_bf16.safetensors (+ _1024 fine-tune): the
# texture flow (slat_flow_imgshape2tex_*) shares the folder and is NOT this model
_UPSTREAM_GLOB = "slat_flow_img2shape_*.safetensors"


class SLatFlowLoadError(Exception):
    """A shape-SLat flow checkpoint cannot be loaded; the message names the file and why."""


@dataclass(kw_only=True)
class SLatFlowConfig:
    """Upstream's constructor arguments (defaults = the released 1.3B img2shape model) +
    ``hidden_channels``. Field names are those stage 1's building blocks read."""

    resolution: int = 32  # latent grid (coordinates in [0, resolution)); no key depends on it
    in_channels: int = 32
    out_channels: int = 32
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
    use_checkpoint: bool = False  # activation checkpointing per block (no keys)
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
    def full(cls, hidden_channels: int | None = None) -> SLatFlowConfig:
        """``slat_flow_img2shape_dit_1_3B_512_bf16`` (TRELLIS.2); ``hidden_channels`` adds the
        Know3D branch (``FULL_HIDDEN_CHANNELS`` for the default capture)."""
        return cls(hidden_channels=hidden_channels)

    @classmethod
    def debug(cls, hidden_channels: int | None = 24, pe_mode: str = "rope") -> SLatFlowConfig:
        """CPU size: 16³ grid, 8-channel latent, 128 channels, 2 blocks of 8 heads (head_dim 16),
        MLP ratio 4, RoPE (or ``pe_mode="ape"``), cond 32, H 24 (2 blocks like stage 1's debug flow)."""
        return cls(
            resolution=16,
            in_channels=8,
            out_channels=8,
            model_channels=128,
            cond_channels=32,
            num_blocks=2,
            num_heads=8,
            mlp_ratio=4.0,
            hidden_channels=hidden_channels,
            pe_mode=pe_mode,
        )

    # attributes stage 1's ModulatedTransformerCrossBlock / initialize_weights read
    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def has_branch(self) -> bool:
        return self.hidden_channels is not None

    def base(self) -> SLatFlowConfig:
        """The same model without the Know3D branch."""
        return replace(self, hidden_channels=None)

    def model_args(self) -> dict:
        """The upstream ``SLatFlowModel`` constructor arguments (no branch)."""
        out = self.to_json()
        out.pop("hidden_channels")
        out.pop("use_checkpoint")
        return out

    def to_json(self) -> dict:
        out = asdict(self)
        out["rope_freq"] = list(self.rope_freq)
        return out

    @classmethod
    def from_json(cls, data: dict) -> SLatFlowConfig:
        """Our own ``to_json``, an upstream checkpoint json (``{"name", "args"}``) or an upstream
        training config (``{"models": {"denoiser": {...}}}``); args an upstream json leaves out take
        upstream's constructor defaults (not the 1.3B values)."""
        if "models" in data:
            data = data["models"]["denoiser"]
        if "args" in data:
            name = data.get("name", UPSTREAM_NAME)
            if name not in UPSTREAM_NAMES:
                raise ValueError(f"not a {' / '.join(UPSTREAM_NAMES)} config (name {name!r})")
            args = {**_UPSTREAM_DEFAULTS, **data["args"]}
            args.pop("dtype", None)  # upstream's torso dtype: chosen at load time here
            head_channels = args.pop("num_head_channels")
            if args.get("num_heads") is None:
                args["num_heads"] = int(args["model_channels"]) // int(head_channels)
            data = args
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SLat-flow config fields: {', '.join(unknown)}")
        data = dict(data)
        if "rope_freq" in data:
            data["rope_freq"] = tuple(data["rope_freq"])
        return cls(**data)


# --------------------------------------------------------------------------- sparse <-> padded


class _Packing:
    """Gather the ``N`` voxels of ``B`` samples (``batch_index [N]``) into ``[B, L_max, ...]`` and
    back; ``mask [B, L_max]`` (True = a real voxel) is None when no sample is padded."""

    def __init__(self, batch_index: torch.Tensor, batch: int) -> None:
        batch_index = batch_index.long()
        if batch_index.numel() and (batch_index.min() < 0 or batch_index.max() >= batch):
            raise ValueError(f"coords[:, 0] (batch index) must lie in [0, {batch}), the batch of t")
        counts = torch.bincount(batch_index, minlength=batch)
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"samples {empty} have no voxels (every sample needs at least one)")
        self.order = torch.argsort(batch_index, stable=True)
        self.sample = batch_index[self.order]
        starts = torch.cumsum(counts, 0) - counts
        self.slot = torch.arange(batch_index.numel(), device=batch_index.device) - starts[self.sample]
        self.batch = batch
        self.length = int(counts.max())
        self.mask = None
        if bool((counts != self.length).any()):
            self.mask = torch.arange(self.length, device=counts.device)[None] < counts[:, None]

    def pad(self, values: torch.Tensor, fill: float | complex = 0.0) -> torch.Tensor:
        out = values.new_full((self.batch, self.length, *values.shape[1:]), fill)
        out[self.sample, self.slot] = values[self.order]
        return out

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        out = padded.new_empty((self.order.numel(), *padded.shape[2:]))
        out[self.order] = padded[self.sample, self.slot]
        return out


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, heads, D]`` in and out; ``mask [B, L_k]`` (True = attend) or None."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


class SparseSelfAttention(MultiHeadAttention):
    """Stage 1's attention (same parameters and names) with a per-sample key mask and per-voxel
    RoPE phases ``[B, L, head_dim / 2]`` (upstream's ``SparseMultiHeadAttention``, full mode)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        phases: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.kind != "self":
            return super().forward(x, context, phases)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.num_heads, -1).unbind(dim=2)
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        if self.use_rope:
            if phases is None:
                raise ValueError("RoPE attention needs phases")
            q, k = apply_rope(q, phases), apply_rope(k, phases)
        return self.to_out(_masked_sdpa(q, k, v, mask).reshape(b, n, -1))


class ModulatedSparseTransformerCrossBlock(ModulatedTransformerCrossBlock):
    """Stage 1's block (identical parameters and names) whose self-attention is per sample over
    the padded voxels (key mask); image and H cross-attention and the MLP are per voxel."""

    def __init__(self, cfg: SLatFlowConfig) -> None:
        super().__init__(cfg)  # duck-typed: SLatFlowConfig has every field the block reads
        # the same module (class, parameters, position in the state dict), masked forward
        self.self_attn.__class__ = SparseSelfAttention

    def _forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        phases: torch.Tensor | None,
        hidden: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.share_mod:
            mod = (self.modulation + mod).type(mod.dtype)
        else:
            mod = self.adaLN_modulation(mod)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = self.norm1(x)
        h = h * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        h = self.self_attn(h, phases=phases, mask=mask)
        x = x + h * gate_msa.unsqueeze(1)
        x = x + self.cross_attn(self.norm2(x), context)
        if self.has_branch:
            x = x + self.know3d_out(self.know3d_cross_attn(self.know3d_norm(x), hidden))
        h = self.norm3(x)
        h = h * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        h = self.mlp(h)
        return x + h * gate_mlp.unsqueeze(1)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        context: torch.Tensor,
        phases: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, mod, context, phases, hidden, mask, use_reentrant=False)
        return self._forward(x, mod, context, phases, hidden, mask)


# --------------------------------------------------------------------------- the model


class SLatFlowModel(nn.Module):
    """``model(feats [N, in], t [B] (×1000), cond [B, T, cond_channels], hidden [B, M, hidden_channels],
    coords=[N, 4] (batch, x, y, z))`` -> velocity ``[N, out]`` (same voxel order). ``x`` may also be
    a sparse tensor object with ``.feats`` / ``.coords`` (then ``coords`` is taken from it and the
    result is ``x.replace(out)`` when it has ``replace``). ``hidden`` only (and then always) with
    the Know3D branch."""

    # stage 1's code where it is upstream's too (same attribute names, same config fields)
    initialize_weights = SSFlowModel.initialize_weights
    dtype = SSFlowModel.dtype
    convert_to = SSFlowModel.convert_to
    branch_parameter_names = SSFlowModel.branch_parameter_names
    branch_parameters = SSFlowModel.branch_parameters
    base_parameters = SSFlowModel.base_parameters

    def __init__(self, cfg: SLatFlowConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SLatFlowConfig.full()
        self.cfg = cfg
        c = cfg.model_channels
        self.initialized_keys: tuple[str, ...] = ()  # set by load_slat_flow: keys not in the file
        # registration order = upstream's state_dict order
        self.t_embedder = TimestepEmbedder(c)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.input_layer = nn.Linear(cfg.in_channels, c)
        self.blocks = nn.ModuleList([ModulatedSparseTransformerCrossBlock(cfg) for _ in range(cfg.num_blocks)])
        self.out_layer = nn.Linear(c, cfg.out_channels)
        if cfg.has_branch:
            self.know3d_hidden_proj = nn.Linear(cfg.hidden_channels, c)
            self.know3d_hidden_norm = LayerNorm32(c, elementwise_affine=True, eps=1e-6)
        if self.input_layer.weight.device.type != "meta":
            self.initialize_weights()

    def _project_hidden(self, hidden: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        cfg = self.cfg
        if not cfg.has_branch:
            if hidden is not None:
                raise ValueError("this SLat-flow model has no Know3D branch (hidden_channels=None): pass hidden=None")
            return None
        if hidden is None:
            raise ValueError(
                "this SLat-flow model has the Know3D branch: pass hidden [B, M, "
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
        self,
        x,
        t: torch.Tensor,
        cond: torch.Tensor,
        hidden: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ):
        cfg = self.cfg
        sparse = None
        if hasattr(x, "feats") and hasattr(x, "coords"):
            sparse, feats, coords = x, x.feats, x.coords
        else:
            feats = x
        if coords is None:
            raise ValueError("pass coords [N, 4] (batch, x, y, z) with plain feature tensors")
        if feats.dim() != 2 or feats.shape[1] != cfg.in_channels:
            raise ValueError(f"feats must be [N, {cfg.in_channels}], got {list(feats.shape)}")
        if coords.dim() != 2 or coords.shape != (feats.shape[0], 4) or coords.is_floating_point():
            raise ValueError(
                f"coords must be integer [N={feats.shape[0]}, 4] (batch, x, y, z), got {list(coords.shape)}"
            )
        if t.dim() != 1:
            raise ValueError(f"t must be [B], got {list(t.shape)}")
        batch = t.shape[0]
        if cond.dim() != 3 or cond.shape[0] != batch or cond.shape[-1] != cfg.cond_channels:
            raise ValueError(f"cond must be [B={batch}, T, {cfg.cond_channels}], got {list(cond.shape)}")
        packing = _Packing(coords[:, 0], batch)
        hp = self._project_hidden(hidden, batch)
        xyz = coords[:, 1:].long()
        h = self.input_layer(_cast(feats, self.input_layer.weight.dtype))
        h = _cast(h, self.dtype)
        mod = self.t_embedder(t)
        if cfg.share_mod:
            mod = self.adaLN_modulation(mod)
        mod = _cast(mod, self.dtype)
        cond = _cast(cond, self.dtype)
        if cfg.pe_mode == "ape":
            h = h + _cast(absolute_position_embedding(xyz, cfg.model_channels), self.dtype)
        phases = None
        if cfg.pe_mode == "rope":
            phases = packing.pad(rope_phases(xyz, cfg.head_dim, cfg.rope_freq), fill=1.0)
        h = packing.pad(h)
        for block in self.blocks:
            h = block(h, mod, cond, phases, hp, packing.mask)
        h = _cast(packing.unpad(h), feats.dtype)
        h = self.out_layer(_cast(F.layer_norm(h, h.shape[-1:]), self.out_layer.weight.dtype))
        out = _cast(h, feats.dtype)
        if sparse is not None and hasattr(sparse, "replace"):
            return sparse.replace(out)
        return out


ElasticSLatFlowModel = SLatFlowModel  # upstream's names (the elastic mixin adds no parameters)


# --------------------------------------------------------------------------- key lists


def state_dict_shapes(cfg: SLatFlowConfig) -> dict[str, list[int]]:
    """``{key: shape}`` of ``cfg``'s ``state_dict()``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = SLatFlowModel(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def official_keys(cfg: SLatFlowConfig) -> dict[str, list[int]]:
    """The TRELLIS.2 (non-branch) keys and shapes of ``cfg``."""
    return {k: v for k, v in state_dict_shapes(cfg).items() if not is_branch_key(k)}


def slat_flow_key_shapes(branch: bool = True, hidden_channels: int = FULL_HIDDEN_CHANNELS) -> dict[str, list[int]]:
    """Full-size keys and shapes: the 1.3B TRELLIS.2 img2shape model, with the Know3D branch if
    ``branch``."""
    return state_dict_shapes(SLatFlowConfig.full(hidden_channels if branch else None))


# --------------------------------------------------------------------------- files


def save_slat_flow(model: SLatFlowModel, folder: Path | str) -> Path:
    """``<folder>/slat_flow.safetensors`` + ``slat_flow.json`` (the config); returns the weights path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = folder / f"{_FILE_STEM}.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "model": UPSTREAM_NAME})
    (folder / f"{_FILE_STEM}.json").write_text(json.dumps(model.cfg.to_json(), indent=2) + "\n")
    return path


def _weights_file(source: str | Path) -> Path:
    return weights_file(source, _FILE_STEM, _UPSTREAM_GLOB, "SLat-flow", SLatFlowLoadError)


def _stored_config(weights: Path) -> SLatFlowConfig:
    config = weights.with_suffix(".json")
    if not config.is_file():
        return SLatFlowConfig.full()
    try:
        return SLatFlowConfig.from_json(json.loads(config.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise SLatFlowLoadError(f"{config}: not a SLat-flow config ({exc})") from None


def stored_config(source: str | Path) -> SLatFlowConfig:
    """The config of the weights at ``source``: the json beside them (ours or upstream's), else the
    released 1.3B one."""
    return _stored_config(_weights_file(source))


def load_slat_flow(
    source: str | Path,
    cfg: SLatFlowConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SLatFlowModel:
    """The SLat flow model from a folder, a ``.safetensors`` file or a hub id, in eval mode.

    The config comes from ``cfg`` (e.g. ``SLatFlowConfig.full(FULL_HIDDEN_CHANNELS)`` to add the
    Know3D branch to the official weights), else the json next to the weights, else the full 1.3B
    size. Every official key must be in the file with its shape; the only keys it may lack are the
    Know3D branch's (left at their initialization; ``model.initialized_keys`` lists them). Anything
    else raises :class:`SLatFlowLoadError` naming the file. ``dtype`` converts the torso as
    upstream does (:meth:`SLatFlowModel.convert_to`)."""
    weights = _weights_file(source)
    if cfg is None:
        cfg = _stored_config(weights)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise SLatFlowLoadError(f"{weights}: unreadable safetensors ({exc})") from None

    expected = state_dict_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    missing_official = [k for k in missing if not is_branch_key(k)]
    wrong = sorted(k for k in set(expected) & set(state) if list(state[k].shape) != expected[k])
    if missing_official or unexpected:
        parts = [_summary(n, ks) for n, ks in (("missing", missing_official), ("unexpected", unexpected)) if ks]
        raise SLatFlowLoadError(f"{weights}: not a SLat-flow model of this config; " + "; ".join(parts))
    if wrong:
        shown = ", ".join(f"{k} {list(state[k].shape)} (expected {expected[k]})" for k in wrong[:5])
        more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise SLatFlowLoadError(f"{weights}: wrong architecture, shape mismatch: {shown}{more}")

    model = SLatFlowModel(cfg)
    full = model.state_dict()
    merged = {k: (state[k].to(v.dtype) if k in state else v) for k, v in full.items()}
    initialized = sorted(set(full) - set(state))
    assert all(is_branch_key(k) for k in initialized), initialized
    result = model.load_state_dict(merged, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.initialized_keys = tuple(initialized)
    if initialized:
        log.info("%s: %d keys not in the file, initialized: %s", weights, len(initialized), _summary("", initialized))
    if dtype is not None and dtype != torch.float32:
        model.convert_to(dtype)
    return model.to(device).eval()
