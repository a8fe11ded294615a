"""TRELLIS.2's shape SC-VAE ("shape_{enc,dec}_next_dc_f16c32_fp16"): the FlexiDualGrid sparse-conv
U-Net encoder and decoder, checkpoint-compatible (key for key, shape for shape).

Upstream: ``trellis2/models/sc_vaes/fdg_vae.py:FlexiDualGridVaeEncoder/Decoder`` on
``sparse_unet_vae.py:SparseUnetVaeEncoder/Decoder``. A sparse tensor is ``N`` active voxels:
features ``[N, C]`` and integer coordinates ``[N, 4] = (batch, x, y, z)``.

Encoder (``in_channels = 6``: the 3 dual-vertex offsets - 0.5 and the 3 "edge intersected"
flags - 0.5): ``input_layer`` (Linear 6 -> C0); per stage ``i`` ``blocks.i.j``:
``num_blocks[i]`` ConvNeXt blocks (``conv`` 3³ submanifold conv -> ``norm`` (affine LayerNorm)
-> ``mlp`` Linear, SiLU, Linear (ratio 4) -> residual) then, except after the last stage, an S2C
down block ``blocks.i.{num_blocks[i]}``: ``norm1`` -> SiLU -> ``conv1`` (C_i -> C_{i+1}/8) ->
spatial-to-channel (each 2³ cell of children becomes one voxel with 8x the channels, child
``s = x%2 + 2(y%2) + 4(z%2)`` at channels ``[s·C, (s+1)·C)``) -> ``norm2`` (no affine) -> SiLU ->
``conv2`` (zero-initialized) + skip (the s2c'd input, mean over channel groups); a final
parameter-free LayerNorm and ``to_latent`` (Linear -> 2·latent: mean, logvar).

Decoder (``out_channels = 7``: 3 vertex offsets, 3 intersection logits, 1 quad-split weight):
``from_latent``; per stage ConvNeXt blocks then a C2S up block: ``to_subdiv`` (Linear C_i -> 8,
which children exist: logit > 0), ``norm1`` -> SiLU -> ``conv1`` (C_i -> 8·C_{i+1}) ->
channel-to-spatial -> ``norm2`` -> SiLU -> ``conv2`` + skip (input repeated along channels, c2s'd);
final LayerNorm and ``output_layer``. When the latent came from this module's encoder the up
blocks reuse the encoder's structure (upstream's spatial cache), else the predicted subdivision.

Parameters: every 3³ sparse conv holds ``<m>.weight (Co, 3, 3, 3, Ci)`` and ``<m>.bias (Co)`` —
upstream's flex_gemm layout (its default backend, the released checkpoints) — in
:class:`SparseConv3d`. ``norm2`` has no parameters and there are no buffers.

Sparse execution: :class:`SparseVoxels` (features, coordinates and a per-coordinate-set cache)
carries the U-Net's structure; :class:`SparseConv3d` is ``training/generator/sparse.py``'s
:class:`~know3d.training.generator.sparse.SubMConv3d` on it, so the convolutions run through that
module's backends: the pure-torch reference (default on CPU: sorted-key neighbour search, then one
gather - GEMM - scatter per kernel offset; thread-count independent) or spconv (default on CUDA
when it imports). Kernel index ``(a, b, c)`` of the weight pairs with the neighbour at
``(x + a - 1, y + b - 1, z + c - 1)`` (cross-correlation, like ``torch.nn.Conv3d`` over
``[D, H, W] = [x, y, z]``), sparse.py's FlexGEMM convention; this module's former own conv used
the same pairing (checked equal, bit for bit, before it was replaced). The neighbour map of a
coordinate set is built once and kept in its ``SparseVoxels.cache`` (:func:`sparse_tensor`).
Checkpoints of upstream's spconv backend (``<conv>.conv.weight``) convert explicitly with
:func:`convert_shape_vae_state`; :func:`load_shape_vae` detects and maps them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from know3d.training.generator.dual_grid import DualGrid
from know3d.training.generator.sparse import (
    SPCONV_LAYOUTS,
    ConvBackend,
    SparseTensor,
    SubMConv3d,
    flex_gemm_to_spconv_state,
    flex_gemm_weight_to_spconv,
    spconv_to_flex_gemm_state,
    submconv_names,
)
from know3d.training.generator.ss_flow import LayerNorm32

ENCODER_NAME = "FlexiDualGridVaeEncoder"
DECODER_NAME = "FlexiDualGridVaeDecoder"
BLOCK_TYPE = "SparseConvNeXtBlock3d"
DOWN_BLOCK_TYPE = "SparseResBlockS2C3d"
UP_BLOCK_TYPE = "SparseResBlockC2S3d"
ENCODER_IN_CHANNELS = 6  # hard-coded upstream
DECODER_OUT_CHANNELS = 7  # hard-coded upstream


# --------------------------------------------------------------------------- sparse tensors


@dataclass(eq=False)
class SparseVoxels:
    """Minimal sparse tensor: ``feats [N, C]``, int64 ``coords [N, 4] (batch, x, y, z)`` and
    ``cache`` (neighbour maps, s2c/c2s pairing), shared by every tensor over the same coordinates."""

    feats: torch.Tensor
    coords: torch.Tensor
    cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.feats.dim() != 2 or self.coords.shape != (self.feats.shape[0], 4):
            raise ValueError(
                f"feats [N, C] and coords [N, 4] expected, got {list(self.feats.shape)}, {list(self.coords.shape)}"
            )
        if self.coords.is_floating_point():
            raise ValueError("coords must be integers")
        self.coords = self.coords.long()

    def replace(self, feats: torch.Tensor) -> SparseVoxels:
        return SparseVoxels(feats, self.coords, self.cache)

    @property
    def batch_size(self) -> int:
        return int(self.coords[:, 0].max()) + 1 if self.coords.numel() else 0


def sparse_tensor(x: SparseVoxels, feats: torch.Tensor | None = None) -> SparseTensor:
    """``x`` (or ``feats`` on its sites) as a :class:`~know3d.training.generator.sparse.SparseTensor`.

    The SparseTensor over ``x``'s coordinates (int32 coords, batch size, spatial shape and its
    spatial cache) is built once per coordinate set and kept in ``x.cache["sparse_tensor"]``; every
    call shares that spatial cache, so all the convolutions at one U-Net level build their neighbour
    map once (the torch backend's pairs or spconv's indice pairs)."""
    feats = x.feats if feats is None else feats
    view = x.cache.get("sparse_tensor")
    if view is None or view.coords.device != x.coords.device:
        n = x.coords.shape[0]
        placeholder = torch.empty(n, 0, device=x.coords.device)  # the view keeps no features alive
        view = SparseTensor(placeholder, x.coords.to(torch.int32), batch_size=x.batch_size, check=False)
        x.cache["sparse_tensor"] = view
    return view.replace(feats)


def spatial_to_channel(x: SparseVoxels) -> SparseVoxels:
    """Upstream's ``SparseSpatial2Channel(2)``: parents ``coords // 2`` (sorted by batch, x, y, z),
    features ``[M, 8·C]`` with child ``s`` at channels ``[s·C, (s+1)·C)`` (zeros where absent)."""
    cached = x.cache.get("s2c")
    if cached is None:
        parent = x.coords.clone()
        parent[:, 1:] = parent[:, 1:] // 2
        sub = x.coords[:, 1:] % 2
        subidx = sub[:, 0] + 2 * sub[:, 1] + 4 * sub[:, 2]
        new_coords, idx = torch.unique(parent, dim=0, return_inverse=True)
        subdivision = torch.zeros(new_coords.shape[0], 8, dtype=torch.bool, device=x.coords.device)
        subdivision[idx, subidx] = True
        out_cache = {"c2s": (x.coords, idx, subidx), "subdivision": subdivision, "child_cache": x.cache}
        cached = x.cache["s2c"] = (new_coords, idx, subidx, out_cache)
    new_coords, idx, subidx, out_cache = cached
    c = x.feats.shape[1]
    feats = x.feats.new_zeros(new_coords.shape[0] * 8, c)
    feats[idx * 8 + subidx] = x.feats
    return SparseVoxels(feats.reshape(new_coords.shape[0], 8 * c), new_coords, out_cache)


def channel_to_spatial(x: SparseVoxels, subdivision: torch.Tensor | None = None) -> SparseVoxels:
    """Upstream's ``SparseChannel2Spatial(2)``: with the pairing of an earlier
    :func:`spatial_to_channel` the original children, else those of ``subdivision [N, 8]`` (bool)."""
    cached = x.cache.get("c2s")
    if cached is not None:
        new_coords, idx, subidx = cached
        cache = x.cache["child_cache"]
    else:
        if subdivision is None:
            raise ValueError("channel_to_spatial needs a subdivision mask (no paired spatial_to_channel)")
        leaves = subdivision.sum(dim=-1)
        subidx = subdivision.nonzero()[:, -1]
        parent = x.coords.clone()
        parent[:, 1:] *= 2
        new_coords = torch.repeat_interleave(parent, leaves, dim=0)
        for axis in range(3):
            new_coords[:, axis + 1] += subidx // 2**axis % 2
        idx = torch.repeat_interleave(torch.arange(x.coords.shape[0], device=x.coords.device), leaves)
        cache = {}
    feats = x.feats.reshape(x.feats.shape[0] * 8, x.feats.shape[1] // 8)[idx * 8 + subidx]
    return SparseVoxels(feats, new_coords, cache)


# --------------------------------------------------------------------------- modules


class SparseConv3d(SubMConv3d):
    """3³ submanifold conv holding upstream's flex_gemm parameters: ``weight (Co, k, k, k, Ci)``,
    ``bias (Co)``; initialized as upstream (kaiming-uniform of the ``(Co, Ci, k, k, k)`` weight).

    :class:`~know3d.training.generator.sparse.SubMConv3d` on :class:`SparseVoxels`: the same
    parameters, init and backends. ``backend`` (attribute or argument): ``None`` = spconv on CUDA
    when it imports, else the torch reference; ``"torch"`` / ``"spconv"`` force one (see
    :func:`set_conv_backend`). The features are cast to the weight's dtype (fp16 torso)."""

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        out = super().forward(sparse_tensor(x, x.feats.to(self.weight.dtype)))
        return x.replace(out.feats)


def set_conv_backend(module: nn.Module, backend: ConvBackend | None) -> nn.Module:
    """Set ``backend`` (``None``, ``"torch"`` or ``"spconv"``) on every :class:`SparseConv3d` of ``module``."""
    if backend not in (None, "torch", "spconv"):
        raise ValueError(f"unknown sparse conv backend {backend!r}")
    for m in module.modules():
        if isinstance(m, SparseConv3d):
            m.backend = backend
    return module


def _zero(module: nn.Module) -> nn.Module:
    """Upstream's ``zero_module``."""
    if next(module.parameters()).device.type != "meta":
        for p in module.parameters():
            nn.init.zeros_(p)
    return module


def _silu_norm(norm: nn.Module, x: SparseVoxels) -> SparseVoxels:
    return x.replace(F.silu(norm(x.feats)))


class _Checkpointed(nn.Module):
    use_checkpoint = False

    def forward(self, *args):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class SparseConvNeXtBlock3d(_Checkpointed):
    def __init__(self, channels: int, mlp_ratio: float = 4.0, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.conv = SparseConv3d(channels, channels, 3)
        width = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, width), nn.SiLU(), _zero(nn.Linear(width, channels)))

    def _forward(self, x: SparseVoxels) -> SparseVoxels:
        h = self.conv(x).feats
        h = self.mlp(self.norm(h))
        return x.replace(x.feats + h)


class SparseResBlockS2C3d(_Checkpointed):
    """Down block: conv to C_out/8, spatial-to-channel, conv; skip = channel-group mean."""

    def __init__(self, channels: int, out_channels: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        if out_channels % 8 or (channels * 8) % out_channels:
            raise ValueError(
                f"S2C block needs out_channels % 8 == 0 and 8·channels % out_channels == 0 ({channels}->{out_channels})"
            )
        self.channels, self.out_channels = channels, out_channels
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels // 8, 3)
        self.conv2 = _zero(SparseConv3d(out_channels, out_channels, 3))

    def _forward(self, x: SparseVoxels) -> SparseVoxels:
        h = self.conv1(_silu_norm(self.norm1, x))
        h = spatial_to_channel(h)
        x = spatial_to_channel(x)
        h = self.conv2(_silu_norm(self.norm2, h))
        group = self.channels * 8 // self.out_channels
        skip = x.feats.reshape(x.feats.shape[0], self.out_channels, group).mean(dim=-1)
        return h.replace(h.feats + skip)


class SparseResBlockC2S3d(_Checkpointed):
    """Up block: predicts the 8 children (``to_subdiv``), conv to 8·C_out, channel-to-spatial, conv;
    skip = channels repeated. Returns ``(h, subdiv_logits)`` with ``pred_subdiv``."""

    def __init__(
        self, channels: int, out_channels: int, use_checkpoint: bool = False, pred_subdiv: bool = True
    ) -> None:
        super().__init__()
        if channels % 8 or out_channels % (channels // 8):
            raise ValueError(
                f"C2S block needs channels % 8 == 0 and out_channels % (channels/8) == 0 ({channels}->{out_channels})"
            )
        self.channels, self.out_channels = channels, out_channels
        self.use_checkpoint = use_checkpoint
        self.pred_subdiv = pred_subdiv
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, out_channels * 8, 3)
        self.conv2 = _zero(SparseConv3d(out_channels, out_channels, 3))
        if pred_subdiv:
            self.to_subdiv = nn.Linear(channels, 8)

    def _forward(self, x: SparseVoxels, subdiv: torch.Tensor | None = None):
        if self.pred_subdiv:
            subdiv = self.to_subdiv(x.feats)
        mask = None if subdiv is None else subdiv > 0
        h = self.conv1(_silu_norm(self.norm1, x))
        h = channel_to_spatial(h, mask)
        x = channel_to_spatial(x, mask)
        h = self.conv2(_silu_norm(self.norm2, h))
        skip = x.feats.repeat_interleave(self.out_channels // (self.channels // 8), dim=1)
        h = h.replace(h.feats + skip)
        return (h, subdiv) if self.pred_subdiv else h


def _check_types(kind: str, given: list[str] | None, expected: str, n: int) -> None:
    if given is not None and (len(given) != n or any(t != expected for t in given)):
        raise ValueError(f"only {expected} is implemented for {kind} ({n} entries), got {given}")


def _stage_args(block_args: list[dict] | None, n: int) -> list[dict]:
    args = [dict(a) for a in (block_args or [{}] * n)]
    if len(args) != n:
        raise ValueError(f"block_args needs {n} entries, got {len(args)}")
    return args


class _ShapeVAEBase(nn.Module):
    blocks: nn.ModuleList

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype (upstream: float16 with ``use_fp16``)."""
        for m in self.blocks.modules():
            if isinstance(m, (nn.Linear, SparseConv3d)):
                return m.weight.dtype
        return torch.float32

    def convert_to(self, dtype: torch.dtype):
        """Upstream's ``convert_to_fp16``: the blocks' Linear and conv weights in ``dtype``; the
        LayerNorms and the in/out Linears stay float32."""
        for m in self.blocks.modules():
            if isinstance(m, (nn.Linear, SparseConv3d)):
                for p in m.parameters():
                    p.data = p.data.to(dtype)
        return self

    def _xavier_linears(self) -> None:
        """Upstream's ``initialize_weights``: xavier on every Linear (the ConvNeXt ``mlp.2`` too —
        it overrides the zero_module), zero biases; convs keep their own (``conv2`` zero) init."""
        if next(self.parameters()).device.type == "meta":
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def _run_blocks(self, h: SparseVoxels, on_up=None) -> SparseVoxels:
        for i, stage in enumerate(self.blocks):
            for j, block in enumerate(stage):
                if on_up is not None and i < len(self.blocks) - 1 and j == len(stage) - 1:
                    h = on_up(i, block, h)
                else:
                    h = block(h)
        return h


class FlexiDualGridVaeEncoder(_ShapeVAEBase):
    """``encoder(vertices, intersected)`` (SparseVoxels over the same coords: dual-vertex offsets in
    [0, 1]³ ``[N, 3]`` and the 3 edge flags ``[N, 3]``) -> latent SparseVoxels ``[M, latent]`` at
    1/2^(stages-1) resolution (the posterior mean, or a sample); ``return_raw`` adds mean, logvar."""

    def __init__(
        self,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str] | None = None,
        down_block_type: list[str] | None = None,
        block_args: list[dict] | None = None,
        use_fp16: bool = False,
    ) -> None:
        super().__init__()
        n = len(num_blocks)
        if len(model_channels) != n:
            raise ValueError(f"model_channels ({len(model_channels)}) and num_blocks ({n}) differ in length")
        _check_types("block_type", block_type, BLOCK_TYPE, n)
        _check_types("down_block_type", down_block_type, DOWN_BLOCK_TYPE, n - 1)
        args = _stage_args(block_args, n)
        self.in_channels = ENCODER_IN_CHANNELS
        self.model_channels, self.latent_channels, self.num_blocks = (
            list(model_channels),
            latent_channels,
            list(num_blocks),
        )
        # registration order = upstream's state_dict order
        self.input_layer = nn.Linear(ENCODER_IN_CHANNELS, model_channels[0])
        self.to_latent = nn.Linear(model_channels[-1], 2 * latent_channels)
        self.blocks = nn.ModuleList()
        for i in range(n):
            stage = nn.ModuleList(SparseConvNeXtBlock3d(model_channels[i], **args[i]) for _ in range(num_blocks[i]))
            if i < n - 1:
                stage.append(SparseResBlockS2C3d(model_channels[i], model_channels[i + 1], **args[i]))
            self.blocks.append(stage)
        self._xavier_linears()
        if use_fp16:
            self.convert_to(torch.float16)

    def forward(
        self,
        vertices: SparseVoxels,
        intersected: SparseVoxels,
        sample_posterior: bool = False,
        return_raw: bool = False,
    ):
        feats = torch.cat([vertices.feats.float() - 0.5, intersected.feats.float() - 0.5], dim=1)
        x = vertices.replace(feats)
        h = x.replace(self.input_layer(x.feats))
        h = h.replace(h.feats.to(self.dtype))
        h = self._run_blocks(h)
        out = F.layer_norm(h.feats.float(), h.feats.shape[-1:])
        mean, logvar = self.to_latent(out).chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
        z = h.replace(z)
        return (z, mean, logvar) if return_raw else z


class FlexiDualGridVaeDecoder(_ShapeVAEBase):
    """``decoder(latent SparseVoxels [M, latent])`` -> fields SparseVoxels ``[N, 7]`` at full
    resolution (in training mode ``(h, subs_gt, subs)`` as upstream, ``return_subs`` adds the
    predicted subdivision logits); :meth:`fields` turns ``h`` into vertices / intersected / quad
    weights. Mesh extraction (``o_voxel.flexible_dual_grid_to_mesh``) is not part of this module."""

    def __init__(
        self,
        resolution: int,
        model_channels: list[int],
        latent_channels: int,
        num_blocks: list[int],
        block_type: list[str] | None = None,
        up_block_type: list[str] | None = None,
        block_args: list[dict] | None = None,
        voxel_margin: float = 0.5,
        use_fp16: bool = False,
        pred_subdiv: bool = True,
    ) -> None:
        super().__init__()
        n = len(num_blocks)
        if len(model_channels) != n:
            raise ValueError(f"model_channels ({len(model_channels)}) and num_blocks ({n}) differ in length")
        _check_types("block_type", block_type, BLOCK_TYPE, n)
        _check_types("up_block_type", up_block_type, UP_BLOCK_TYPE, n - 1)
        args = _stage_args(block_args, n)
        self.resolution, self.voxel_margin, self.pred_subdiv = resolution, voxel_margin, pred_subdiv
        self.out_channels = DECODER_OUT_CHANNELS
        self.model_channels, self.latent_channels, self.num_blocks = (
            list(model_channels),
            latent_channels,
            list(num_blocks),
        )
        self.output_layer = nn.Linear(model_channels[-1], DECODER_OUT_CHANNELS)
        self.from_latent = nn.Linear(latent_channels, model_channels[0])
        self.blocks = nn.ModuleList()
        for i in range(n):
            stage = nn.ModuleList(SparseConvNeXtBlock3d(model_channels[i], **args[i]) for _ in range(num_blocks[i]))
            if i < n - 1:
                stage.append(
                    SparseResBlockC2S3d(model_channels[i], model_channels[i + 1], pred_subdiv=pred_subdiv, **args[i])
                )
            self.blocks.append(stage)
        self._xavier_linears()
        if use_fp16:
            self.convert_to(torch.float16)

    def set_resolution(self, resolution: int) -> None:
        self.resolution = resolution

    def forward(self, x: SparseVoxels, guide_subs: list[torch.Tensor] | None = None, return_subs: bool = False):
        if guide_subs is not None and self.pred_subdiv:
            raise ValueError("guide_subs needs a decoder with pred_subdiv=False")
        if return_subs and not self.pred_subdiv:
            raise ValueError("return_subs needs a decoder with pred_subdiv=True")
        subs_gt: list[torch.Tensor | None] = []
        subs: list[SparseVoxels] = []

        def up(i: int, block: SparseResBlockC2S3d, h: SparseVoxels) -> SparseVoxels:
            if not self.pred_subdiv:
                guide = None if guide_subs is None else guide_subs[i]
                return block(h, guide)
            if self.training:
                subs_gt.append(h.cache.get("subdivision"))
            h_next, sub = block(h)
            subs.append(h.replace(sub))
            return h_next

        h = x.replace(self.from_latent(x.feats.float()))
        h = h.replace(h.feats.to(self.dtype))
        h = self._run_blocks(h, on_up=up)
        out = self.output_layer(F.layer_norm(h.feats.float(), h.feats.shape[-1:]))
        h = h.replace(out.to(x.feats.dtype))
        if self.training and self.pred_subdiv:
            return h, subs_gt, subs
        return (h, subs) if return_subs else h

    def fields(self, h: SparseVoxels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(vertices [N, 3] in [-margin, 1 + margin], intersected logits [N, 3], quad_lerp [N, 1])``."""
        vertices = (1 + 2 * self.voxel_margin) * torch.sigmoid(h.feats[:, 0:3]) - self.voxel_margin
        return vertices, h.feats[:, 3:6], F.softplus(h.feats[:, 6:7])


# --------------------------------------------------------------------------- configs and keys

FULL_ENCODER_ARGS = {
    "model_channels": [64, 128, 256, 512, 1024],
    "latent_channels": 32,
    "num_blocks": [0, 4, 8, 16, 4],
    "block_type": [BLOCK_TYPE] * 5,
    "down_block_type": [DOWN_BLOCK_TYPE] * 4,
    "block_args": [{"use_checkpoint": c} for c in (True, True, False, False, False)],
    "use_fp16": True,
}
FULL_DECODER_ARGS = {
    "resolution": 256,
    "model_channels": [1024, 512, 256, 128, 64],
    "latent_channels": 32,
    "num_blocks": [4, 16, 8, 4, 0],
    "block_type": [BLOCK_TYPE] * 5,
    "up_block_type": [UP_BLOCK_TYPE] * 4,
    "block_args": [{"use_checkpoint": c} for c in (False, False, False, True, True)],
    "use_fp16": True,
}
# CPU size: 64³ -> 16³ latent of 8 channels (matches SLatFlowConfig.debug()), 3 stages
DEBUG_ENCODER_ARGS = {"model_channels": [16, 32, 64], "latent_channels": 8, "num_blocks": [0, 1, 1]}
DEBUG_DECODER_ARGS = {"resolution": 64, "model_channels": [64, 32, 16], "latent_channels": 8, "num_blocks": [1, 1, 0]}


def shape_encoder(size: str = "full", **overrides) -> FlexiDualGridVaeEncoder:
    """``"full"`` (shape_enc_next_dc_f16c32_fp16) or ``"debug"``; built on the current device."""
    args = {"full": FULL_ENCODER_ARGS, "debug": DEBUG_ENCODER_ARGS}[size]
    return FlexiDualGridVaeEncoder(**{**args, **overrides})


def shape_decoder(size: str = "full", **overrides) -> FlexiDualGridVaeDecoder:
    """``"full"`` (shape_dec_next_dc_f16c32_fp16) or ``"debug"``; built on the current device."""
    args = {"full": FULL_DECODER_ARGS, "debug": DEBUG_DECODER_ARGS}[size]
    return FlexiDualGridVaeDecoder(**{**args, **overrides})


def from_upstream_json(data: dict, part: str | None = None) -> nn.Module:
    """A module from an upstream checkpoint json ``{"name", "args"}`` or training config
    (``{"models": {"encoder"|"decoder": ...}}`` with ``part``)."""
    if "models" in data:
        if part not in ("encoder", "decoder"):
            raise ValueError("a training config holds both parts: pass part='encoder' or 'decoder'")
        data = data["models"][part]
    name, args = data.get("name"), dict(data["args"])
    if name == ENCODER_NAME:
        return FlexiDualGridVaeEncoder(**args)
    if name == DECODER_NAME:
        return FlexiDualGridVaeDecoder(**args)
    raise ValueError(f"not a {ENCODER_NAME} / {DECODER_NAME} config (name {name!r})")


def shape_vae_key_shapes(part: str, size: str = "full") -> dict[str, list[int]]:
    """``{key: shape}`` of the shape SC-VAE ``part`` (``"encoder"`` or ``"decoder"``), built on the
    meta device, in state-dict order."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    with torch.device("meta"):
        model = shape_encoder(size) if part == "encoder" else shape_decoder(size)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- checkpoint layouts


def shape_vae_conv_names(module: nn.Module) -> list[str]:
    """Module names of every 3³ sparse conv of an encoder / decoder, in state-dict order."""
    return submconv_names(module)


def spconv_state_layout(state: dict[str, torch.Tensor], module: nn.Module) -> str:
    """spconv's weight layout (one of ``SPCONV_LAYOUTS``) of a spconv-layout state dict for
    ``module``: the one under which every ``<conv>.conv.weight`` present has the module's shape.
    Raises ``ValueError`` when none fits, or when several do with different meanings."""
    convs = [(name, m) for name, m in module.named_modules() if isinstance(m, SubMConv3d)]
    fits = []
    for layout in SPCONV_LAYOUTS:
        shapes = [
            (state[f"{name}.conv.weight"].shape, flex_gemm_weight_to_spconv(m.weight.to("meta"), layout).shape)
            for name, m in convs
            if f"{name}.conv.weight" in state
        ]
        if shapes and all(tuple(a) == tuple(b) for a, b in shapes):
            fits.append(layout)
    if len(fits) != 1:
        why = "no spconv weight layout" if not fits else f"several spconv weight layouts ({', '.join(fits)})"
        raise ValueError(f"{why} of {SPCONV_LAYOUTS} fit the conv weights' shapes")
    return fits[0]


def convert_shape_vae_state(
    state: dict[str, torch.Tensor], module: nn.Module, to: str, layout: str | None = None
) -> dict[str, torch.Tensor]:
    """Convert an encoder / decoder state dict between upstream's flex_gemm layout (the released
    checkpoints, this module's own: ``<conv>.weight (Co, 3, 3, 3, Ci)``, ``<conv>.bias``) and its
    spconv backend's (``<conv>.conv.weight`` in spconv's ``layout``, ``<conv>.conv.bias``).

    ``to``: ``"spconv"`` or ``"flex_gemm"``. The conv names come from ``module`` (an encoder or
    decoder of the checkpoint's architecture, e.g. built on the meta device); every other key
    passes through unchanged. ``layout``: spconv's ``"KRSC"`` (spconv >= 2.3; the default going
    to spconv), ``"RSKC"`` or ``"RSCK"`` (older Native); going to flex_gemm, ``None`` infers it
    from the shapes (:func:`spconv_state_layout`). A missing conv weight raises ``KeyError``."""
    names = shape_vae_conv_names(module)
    if to == "spconv":
        return flex_gemm_to_spconv_state(state, names, layout or "KRSC")
    if to == "flex_gemm":
        return spconv_to_flex_gemm_state(state, names, layout or spconv_state_layout(state, module))
    raise ValueError(f"to must be 'spconv' or 'flex_gemm', got {to!r}")


def is_spconv_state(state: dict[str, torch.Tensor], module: nn.Module) -> bool:
    """Whether ``state`` nests any of ``module``'s convs as upstream's spconv backend does
    (``<conv>.conv.weight``; never a flex_gemm key, where the ConvNeXt ``conv`` is ``<block>.conv.weight``)."""
    return any(f"{name}.conv.weight" in state for name in shape_vae_conv_names(module))


# --------------------------------------------------------------------------- the VAE as a whole: encode, decode, files

SHAPE_VAE_PARTS = ("encoder", "decoder")
# upstream's released file stems (TRELLIS.2-4B ``ckpts/``), besides our ``encoder`` / ``decoder``
UPSTREAM_STEMS = {"encoder": "shape_enc_next_dc_f16c32_fp16", "decoder": "shape_dec_next_dc_f16c32_fp16"}
SHIPPED_SHAPE_VAE = Path(__file__).resolve().parent.parent / "assets" / "debug-shape-vae"
NORMALIZATION_FILE = "normalization.json"


class ShapeVAELoadError(Exception):
    """A shape SC-VAE checkpoint cannot be loaded; the message names the file and why."""


@dataclass(eq=False)
class ShapeVAE:
    """Encoder and/or decoder of the shape SC-VAE with the latent normalization (upstream's
    ``shape_slat_normalization``: the flow works on ``(z - mean) / std``) and the fine dual-grid
    ``resolution`` (64 debug; 512 or 1024 full size — the decoder itself is resolution-free)."""

    encoder: FlexiDualGridVaeEncoder | None
    decoder: FlexiDualGridVaeDecoder | None
    resolution: int
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    def __post_init__(self) -> None:
        if self.encoder is None and self.decoder is None:
            raise ValueError("a ShapeVAE needs an encoder, a decoder or both")
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1).cpu()
        self.std = torch.as_tensor(self.std, dtype=torch.float32).reshape(-1).cpu()
        c = self.latent_channels
        if self.mean.shape != (c,) or self.std.shape != (c,):
            raise ValueError(f"mean / std need {c} entries, got {len(self.mean)} and {len(self.std)}")
        if not bool((self.std > 0).all()) or not bool(torch.isfinite(self.mean).all()):
            raise ValueError("std must be positive and mean finite")
        self.resolution = int(self.resolution)
        factor = 2 ** (self.stages - 1)
        if self.resolution < factor or self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsampling factor {factor}")
        if self.decoder is not None:
            self.decoder.set_resolution(self.resolution)

    @property
    def _module(self) -> _ShapeVAEBase:
        return self.encoder if self.encoder is not None else self.decoder

    @property
    def stages(self) -> int:
        return len(self._module.model_channels)

    @property
    def latent_channels(self) -> int:
        return int(self._module.latent_channels)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // 2 ** (self.stages - 1)

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mean.to(z.device)) / self.std.to(z.device)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self.std.to(z.device) + self.mean.to(z.device)

    @torch.no_grad()
    def encode(self, grid: DualGrid) -> tuple[np.ndarray, torch.Tensor]:
        """(latent coords int64 ``[M, 3]`` at :attr:`latent_resolution`, normalized features float32
        ``[M, C]`` on the CPU) of a dual grid at :attr:`resolution`: the posterior mean."""
        if self.encoder is None:
            raise ValueError("this ShapeVAE has no encoder")
        coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 3)
        if len(coords) == 0:
            return np.zeros((0, 3), np.int64), torch.zeros(0, self.latent_channels)
        if coords.min() < 0 or coords.max() >= self.resolution:
            raise ValueError(f"dual-grid coords outside [0, {self.resolution})")
        x = dual_grid_voxels([grid], self.device)
        flags = x.replace(torch.as_tensor(np.asarray(grid.edge_flags), dtype=torch.float32, device=self.device))
        self.encoder.eval()
        z = self.encoder(x, flags)
        return z.coords[:, 1:].cpu().numpy(), self.normalize(z.feats).cpu()

    @torch.no_grad()
    def decode(self, coords: np.ndarray | torch.Tensor, feats: np.ndarray | torch.Tensor) -> DualGrid:
        """The dual grid at :attr:`resolution` of normalized latents (``coords [M, 3]`` at
        :attr:`latent_resolution`, ``feats [M, C]``): eval mode, the decoder's own predicted
        subdivision, vertices clipped to [0, 1], edge flags = logits > 0, split weights = its
        quad_lerp; voxels in C order. No latents (or no predicted children) -> an empty grid."""
        if self.decoder is None:
            raise ValueError("this ShapeVAE has no decoder")
        coords = torch.as_tensor(coords).long().reshape(-1, 3).cpu()
        feats = torch.as_tensor(feats, dtype=torch.float32).cpu()
        if len(coords) == 0:
            return empty_dual_grid()
        if feats.shape != (len(coords), self.latent_channels):
            raise ValueError(f"feats [{len(coords)}, {self.latent_channels}] expected, got {list(feats.shape)}")
        if int(coords.min()) < 0 or int(coords.max()) >= self.latent_resolution:
            raise ValueError(f"latent coords outside [0, {self.latent_resolution})")
        device = self.device
        batch = torch.zeros(len(coords), 1, dtype=torch.long)
        x = SparseVoxels(self.denormalize(feats).to(device), torch.cat([batch, coords], 1).to(device))
        self.decoder.eval()
        h = self.decoder(x)
        if h.feats.shape[0] == 0:
            return empty_dual_grid()
        vertices, logits, quad = self.decoder.fields(h)
        out_coords = h.coords[:, 1:].cpu().numpy()
        order = np.lexsort((out_coords[:, 2], out_coords[:, 1], out_coords[:, 0]))
        return DualGrid(
            out_coords[order],
            vertices.clamp(0.0, 1.0).double().cpu().numpy()[order],
            (logits > 0).cpu().numpy()[order],
            quad.double().cpu().numpy()[order],
        )


def empty_dual_grid() -> DualGrid:
    return DualGrid(np.zeros((0, 3), np.int64), np.zeros((0, 3)), np.zeros((0, 3), bool), np.zeros((0, 1)))


def dual_grid_voxels(grids: list[DualGrid], device: str | torch.device = "cpu") -> SparseVoxels:
    """The encoder's vertex input: SparseVoxels of the dual vertices (offsets in [0, 1]) of
    ``grids`` batched in order (batch index = position in the list); edge flags via ``replace``."""
    coords, feats = [], []
    for b, grid in enumerate(grids):
        c = torch.as_tensor(np.asarray(grid.coords, dtype=np.int64).reshape(-1, 3))
        coords.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.long), c], 1))
        feats.append(torch.as_tensor(np.asarray(grid.vertices, dtype=np.float32).reshape(-1, 3)))
    return SparseVoxels(torch.cat(feats).to(device), torch.cat(coords).to(device))


def _module_args(module: _ShapeVAEBase) -> dict:
    """Constructor args of a module (upstream's ``{"name", "args"}`` json)."""
    args = {
        "model_channels": list(module.model_channels),
        "latent_channels": int(module.latent_channels),
        "num_blocks": list(module.num_blocks),
    }
    checkpointed = [any(getattr(b, "use_checkpoint", False) for b in stage) for stage in module.blocks]
    if any(checkpointed):
        args["block_args"] = [{"use_checkpoint": c} for c in checkpointed]
    if isinstance(module, FlexiDualGridVaeDecoder):
        args = {"resolution": int(module.resolution), **args}
        if module.voxel_margin != 0.5:
            args["voxel_margin"] = module.voxel_margin
        if not module.pred_subdiv:
            args["pred_subdiv"] = False
    if module.dtype == torch.float16:
        args["use_fp16"] = True
    name = ENCODER_NAME if isinstance(module, FlexiDualGridVaeEncoder) else DECODER_NAME
    return {"name": name, "args": args}


def save_shape_vae(vae: ShapeVAE, folder: str | Path) -> Path:
    """``<folder>/{encoder,decoder}.safetensors`` + ``.json`` (upstream's ``{"name", "args"}``) for
    the parts present, and ``normalization.json`` ``{"mean", "std", "resolution"}``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for part, module in (("encoder", vae.encoder), ("decoder", vae.decoder)):
        if module is None:
            continue
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(folder / f"{part}.safetensors"), metadata={"format": "pt", "part": part})
        (folder / f"{part}.json").write_text(json.dumps(_module_args(module), indent=2) + "\n")
    norm = {"mean": vae.mean.tolist(), "std": vae.std.tolist(), "resolution": vae.resolution}
    (folder / NORMALIZATION_FILE).write_text(json.dumps(norm, indent=2) + "\n")
    return folder


def _part_files(folder: Path, part: str) -> tuple[Path, Path]:
    stems = (part, UPSTREAM_STEMS[part])
    candidates = [sub / f"{stem}.safetensors" for sub in (folder, folder / "ckpts") for stem in stems]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        names = " or ".join(f"{stem}.safetensors" for stem in stems)
        raise ShapeVAELoadError(f"{folder}: no {part} weights ({names}, also under ckpts/)")
    return weights, weights.with_suffix(".json")


def _build_part(config: Path, part: str) -> _ShapeVAEBase:
    cls = FlexiDualGridVaeEncoder if part == "encoder" else FlexiDualGridVaeDecoder
    if not config.is_file():
        if config.stem == UPSTREAM_STEMS[part]:  # a bare released checkpoint: the released size
            return shape_encoder("full") if part == "encoder" else shape_decoder("full")
        raise ShapeVAELoadError(f"{config}: missing (the {part} config next to its weights)")
    try:
        data = json.loads(config.read_text())
        if "models" in data or "name" in data:
            module = from_upstream_json(data, part)
        else:
            module = cls(**data.get("args", data))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ShapeVAELoadError(f"{config}: not a shape SC-VAE {part} config ({type(exc).__name__}: {exc})") from None
    if not isinstance(module, cls):
        raise ShapeVAELoadError(f"{config}: describes a {type(module).__name__}, not the {part}")
    return module


def _load_part(folder: Path, part: str, spconv_layout: str | None = None) -> _ShapeVAEBase:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config = _part_files(folder, part)
    module = _build_part(config, part)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ShapeVAELoadError(f"{weights}: unreadable safetensors ({exc})") from None
    if is_spconv_state(state, module):  # upstream's spconv backend: mapped explicitly, then loaded strictly
        try:
            state = convert_shape_vae_state(state, module, "flex_gemm", spconv_layout)
        except (KeyError, ValueError) as exc:
            raise ShapeVAELoadError(f"{weights}: not a spconv-layout shape SC-VAE {part} ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        problems = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                problems.append(f"{name} {len(keys)}: {', '.join(keys[:5])}{more}")
        raise ShapeVAELoadError(f"{weights}: not a shape SC-VAE {part} of {config.name}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def _load_normalization(folder: Path) -> tuple[list, list, int | None, Path]:
    path = folder / NORMALIZATION_FILE
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            return data["mean"], data["std"], data.get("resolution"), path
        pipeline = folder / "pipeline.json"  # upstream's released pipeline folder
        if pipeline.is_file():
            data = json.loads(pipeline.read_text())
            norm = data.get("args", data)["shape_slat_normalization"]
            return norm["mean"], norm["std"], None, pipeline
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShapeVAELoadError(f"{path}: unreadable latent normalization ({type(exc).__name__}: {exc})") from None
    raise ShapeVAELoadError(f"{path}: missing (nor a pipeline.json with shape_slat_normalization)")


def load_shape_vae(
    source: str | Path,
    parts: tuple[str, ...] = SHAPE_VAE_PARTS,
    device: str | torch.device = "cpu",
    resolution: int | None = None,
    spconv_layout: str | None = None,
) -> ShapeVAE:
    """The shape SC-VAE ``parts`` from a folder (``"debug"``: the shipped debug VAE): weights
    ``<part>.safetensors`` or upstream's ``shape_{enc,dec}_next_dc_f16c32_fp16.safetensors`` (also
    under ``ckpts/``) with the json next to them (upstream's ``{"name", "args"}``, a training
    config, or the bare args), and ``normalization.json`` (else upstream's ``pipeline.json``).
    ``resolution`` overrides the stored one (else normalization.json's, else the decoder's).
    Weights saved by upstream's spconv backend (``<conv>.conv.weight``) are converted to the
    flex_gemm layout first (:func:`convert_shape_vae_state`; spconv's weight layout inferred from
    the shapes unless ``spconv_layout`` says it). Keys and shapes are checked strictly; every
    problem raises :class:`ShapeVAELoadError` naming the file. The modules come back in eval mode
    on ``device``."""
    parts = tuple(parts)
    if not parts or any(p not in SHAPE_VAE_PARTS for p in parts):
        raise ValueError(f"parts must be a non-empty subset of {SHAPE_VAE_PARTS}, got {parts!r}")
    folder = SHIPPED_SHAPE_VAE if str(source) == "debug" else Path(source).expanduser()
    if not folder.is_dir():
        raise ShapeVAELoadError(f"{folder}: no such folder (a shape SC-VAE folder or 'debug' expected)")
    modules = {part: _load_part(folder, part, spconv_layout) for part in parts}
    mean, std, stored_resolution, norm_file = _load_normalization(folder)
    if resolution is None:
        resolution = stored_resolution
    if resolution is None:
        if "decoder" not in modules:
            raise ShapeVAELoadError(f"{norm_file}: no resolution stored (pass resolution=)")
        resolution = modules["decoder"].resolution
    try:
        vae = ShapeVAE(
            modules.get("encoder"), modules.get("decoder"), resolution, torch.tensor(mean), torch.tensor(std)
        )
    except (ValueError, TypeError) as exc:
        raise ShapeVAELoadError(f"{norm_file}: does not fit the checkpoint ({exc})") from None
    for module in modules.values():
        module.to(device).eval()
    return vae
