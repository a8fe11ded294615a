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

Sparse execution here is a plain-torch reference: :class:`SparseVoxels` (features, coordinates and
a per-coordinate-set cache) and :func:`submanifold_conv3d` (hash lookup of the 27 neighbours via
sorted codes, one GEMM per kernel offset). Kernel index ``(a, b, c)`` of the weight pairs with the
neighbour at ``(x + a - 1, y + b - 1, z + c - 1)`` (cross-correlation, like ``torch.nn.Conv3d``
over ``[D, H, W] = [x, y, z]``). That axis pairing is an ASSUMPTION not yet checked against
flex_gemm's kernel; the production backend (``training/generator/sparse.py``) replaces this
function without changing any key.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def _codes(coords: torch.Tensor, base: int) -> torch.Tensor:
    """One int64 per (batch, x, y, z), lexicographic; xyz shifted by 1 so that -1 is encodable."""
    b, x, y, z = (coords[:, i] for i in range(4))
    return ((b * base + (x + 1)) * base + (y + 1)) * base + (z + 1)


def neighbor_map(coords: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """``[kernel³, N]`` index of the voxel at each kernel offset (``-1`` where there is none), kernel
    index ``(a, b, c)`` flattened row-major = offset ``(a - k//2, b - k//2, c - k//2)`` on x, y, z."""
    half = kernel // 2
    base = int(coords[:, 1:].max()) + 2 * half + 2 if coords.numel() else 1
    keys = _codes(coords, base)
    sorted_keys, order = torch.sort(keys)
    out = []
    for offset in itertools.product(range(-half, half + 1), repeat=3):
        shifted = coords.clone()
        shifted[:, 1:] += torch.tensor(offset, device=coords.device)
        query = _codes(shifted, base)
        pos = torch.searchsorted(sorted_keys, query).clamp(max=max(len(sorted_keys) - 1, 0))
        found = sorted_keys[pos] == query
        out.append(torch.where(found, order[pos], torch.full_like(pos, -1)))
    return torch.stack(out)


def submanifold_conv3d(x: SparseVoxels, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Submanifold 3D convolution (outputs at the input voxels) with a ``(Co, k, k, k, Ci)`` weight."""
    co, kd, kh, kw, ci = weight.shape
    key = f"neighbors_{kd}x{kh}x{kw}"
    nbr = x.cache.get(key)
    if nbr is None:
        nbr = x.cache[key] = neighbor_map(x.coords, kd)
    feats = x.feats.to(weight.dtype)
    padded = torch.cat([feats, feats.new_zeros(1, ci)])  # row N = the missing neighbour
    nbr = torch.where(nbr < 0, feats.shape[0], nbr)
    w = weight.reshape(co, kd * kh * kw, ci)
    out = feats.new_zeros(feats.shape[0], co) if bias is None else bias.expand(feats.shape[0], co).clone()
    for k in range(kd * kh * kw):
        out = out + padded[nbr[k]] @ w[:, k].T
    return out


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
    feats = x.feats.reshape(x.feats.shape[0] * 8, -1)[idx * 8 + subidx]
    return SparseVoxels(feats, new_coords, cache)


# --------------------------------------------------------------------------- modules


class SparseConv3d(nn.Module):
    """3³ submanifold conv holding upstream's flex_gemm parameters: ``weight (Co, k, k, k, Ci)``,
    ``bias (Co)``; initialized as upstream (kaiming-uniform of the ``(Co, Ci, k, k, k)`` weight)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, k, k, k, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        k = self.kernel_size
        w = torch.empty(self.out_channels, self.in_channels, k, k, k, device=self.weight.device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight.copy_(w.permute(0, 2, 3, 4, 1))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * k**3)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        return x.replace(submanifold_conv3d(x, self.weight, self.bias))


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
