"""Sparse voxel tensors, submanifold sparse convolution and varlen attention (TRELLIS.2 stage 2).

TRELLIS.2's shape structured latents (the SC-VAE ``FlexiDualGridVae{Encoder,Decoder}`` and the
SLat flow model) run on sparse voxel tensors. Upstream (``trellis2/modules/sparse``) needs a CUDA
backend for its convolutions (FlexGEMM by default, or spconv / torchsparse); this module is our
own, CPU-capable re-implementation of the parts those models use, written from the upstream
semantics (microsoft/TRELLIS.2@5565d24, JeffreyXiang/FlexGEMM) rather than copied:

* :class:`SparseTensor`: ``coords`` int32 ``[N, 4]`` = ``(batch, x, y, z)`` and ``feats``
  ``[N, C]``. Rows of one batch item are contiguous and in batch order (upstream's invariant),
  so a batch is described by ``offsets`` (``[B + 1]``, flash-attn's ``cu_seqlens``). Like
  upstream it carries a ``scale`` (a :class:`~fractions.Fraction`, x2 per spatial-to-channel
  step) and a *spatial cache* shared by every tensor derived from it (``replace``, resampling):
  per scale it holds neighbour maps, the spatial shape and the down/up-sampling maps, so a
  decoder whose input comes from the encoder re-uses the encoder's structure (upstream's
  training behaviour) and convolutions at one scale build their neighbour map once.
* :class:`SubMConv3d`: submanifold convolution (output sites = input sites). Its parameters are
  upstream's FlexGEMM layout, ``weight`` ``(Co, Kx, Ky, Kz, Ci)`` and ``bias`` ``(Co,)``, so
  the official checkpoints (``<m>.weight``) load strictly under their own key names. The kernel
  is a *correlation*, as ``F.conv3d``: ``out[p] = bias + sum_o weight[:, o + K//2] @ in[p + o]``
  with the first kernel axis on ``x`` (FlexGEMM's neighbour map and its own test against
  ``nn.Conv3d`` with ``weight.permute(0, 4, 1, 2, 3)``). Backends, chosen per call:

  - ``"torch"`` (the reference, default on CPU): the active sites are linearised to int64 keys
    ``((b*X + x)*Y + y)*Z + z`` and sorted once; for each kernel offset the neighbour keys are
    looked up with ``torch.searchsorted``, giving (output row, input row) pairs. The output starts
    as the centre tap ``feats @ W_c^T + bias`` and each other offset adds
    ``index_add_(rows_out, feats[rows_in] @ W_o^T)``. Within one offset every output row and
    every input row occurs at most once (the map ``p -> p + o`` is injective), so neither the
    forward scatter nor the backward gather/scatter has colliding writes: the result does not
    depend on the thread count and is bitwise repeatable (spconv's CPU scatter-add races, see
    ``shared/ENVIRONMENT.md``). The pairs are cached per scale.
  - ``"spconv"`` (default on CUDA when ``spconv`` imports): a ``spconv.pytorch.SubMConv3d`` is
    built once (kept out of ``state_dict``) and called through ``torch.func.functional_call``
    with our ``weight`` converted to its layout, so gradients reach our parameters. spconv
    >= 2.3 stores every weight as KRSC ``(Co, K, K, K, Ci)``, identical to FlexGEMM's; older 2.x
    stored the Native algorithm's weight as RSKC ``(K, K, K, Co, Ci)`` (or RSCK
    ``(K, K, K, Ci, Co)`` with ``FILTER_HWIO``); :func:`flex_gemm_weight_to_spconv` handles all
    three explicitly. spconv is refused on CPU (wrong numbers with >1 thread, backward calls CUDA).

  Upstream's *spconv* backend nests the module as ``<m>.conv.{weight,bias}``:
  :func:`flex_gemm_to_spconv_state` / :func:`spconv_to_flex_gemm_state` convert such checkpoints
  with an explicit list of conv module names and raise on any missing key (upstream itself loads
  with ``strict=False``, which silently leaves weights unloaded).
* Resampling used by the SC-VAEs (``sc_vaes/sparse_unet_vae.py``): the shape VAE uses
  :class:`SparseSpatial2Channel` / :class:`SparseChannel2Spatial` (``SparseResBlockS2C3d`` /
  ``C2S3d``); :class:`SparseDownsample` / :class:`SparseUpsample` (mean/max pooling, nearest)
  serve the ``Downsample3d`` / ``Upsample3d`` blocks. Child ``(x, y, z)`` of a parent has
  sub-index ``x%f + (y%f)*f + (z%f)*f²``; spatial-to-channel packs children at channel
  ``subidx * C + c``; the *subdivision* mask ``[M, f³]`` (bool) says which children exist and is
  what the decoder's ``to_subdiv`` head predicts. All follow upstream's ordering (coarse sites
  sorted by ``(b, x, y, z)``; children parent-major, sub-index ascending), which matters for the
  channel layout the checkpoints were trained with.
* :func:`sparse_attention`: attention over ragged batches ``q [Tq, H, C]``, ``k, v [Tk, H, *]``
  with ``offsets`` (cu_seqlens). flash-attn's varlen kernel on CUDA (fp16/bf16) when importable,
  else SDPA per sample (``"sdpa"``) or on a zero-padded batch with a key mask
  (``"sdpa_padded"``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ConvBackend = Literal["torch", "spconv"]
AttnBackend = Literal["flash_attn", "sdpa", "sdpa_padded"]
SPCONV_LAYOUTS = ("KRSC", "RSKC", "RSCK")


# --------------------------------------------------------------------------------------------
# SparseTensor
# --------------------------------------------------------------------------------------------


class SparseTensor:
    """A batch of sparse voxel sets: ``coords`` int32 ``[N, 4]`` ``(b, x, y, z)``, ``feats`` ``[N, ...]``.

    Rows of batch item ``i`` are ``offsets[i]:offsets[i + 1]``; the batch column must be
    non-decreasing (checked). ``batch_size`` / ``spatial_shape`` default to ``max + 1`` of the
    coordinates. ``scale`` and ``spatial_cache`` are shared with every tensor derived through
    :meth:`replace` or the resampling modules (see the module docstring).
    """

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        *,
        batch_size: int | None = None,
        spatial_shape: tuple[int, int, int] | None = None,
        scale: Fraction = Fraction(1),
        spatial_cache: dict | None = None,
        check: bool = True,
    ) -> None:
        if coords.dim() != 2 or coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(coords.shape)}")
        if feats.shape[0] != coords.shape[0]:
            raise ValueError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if coords.dtype != torch.int32:
            if coords.dtype.is_floating_point or coords.dtype == torch.bool:
                raise TypeError(f"coords must be integers, got {coords.dtype}")
            coords = coords.to(torch.int32)
        if check and coords.shape[0]:
            if bool((coords < 0).any()):
                raise ValueError("coords must be non-negative")
            if bool((coords[1:, 0] < coords[:-1, 0]).any()):
                raise ValueError("rows of one batch item must be contiguous and in batch order")
        self.feats = feats
        self.coords = coords
        self.scale = Fraction(scale)
        self._cache: dict = {} if spatial_cache is None else spatial_cache
        if batch_size is None:
            batch_size = int(coords[-1, 0].item()) + 1 if coords.shape[0] else 0
        elif coords.shape[0] and int(coords[-1, 0].item()) >= batch_size:
            raise ValueError(f"batch index {int(coords[-1, 0])} >= batch_size {batch_size}")
        self.batch_size = int(batch_size)
        if spatial_shape is not None:
            self.set_cache("shape", tuple(int(s) for s in spatial_shape))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensor_list(cls, feats: list[torch.Tensor], coords: list[torch.Tensor], **kwargs) -> SparseTensor:
        """Batch per-item ``feats [Ni, C]`` and ``coords [Ni, 3]`` (x, y, z) or ``[Ni, 4]``."""
        rows = []
        for i, c in enumerate(coords):
            xyz = c[:, -3:].to(torch.int32)
            rows.append(torch.cat([torch.full_like(xyz[:, :1], i), xyz], dim=1))
        return cls(torch.cat(feats, 0), torch.cat(rows, 0), batch_size=len(coords), **kwargs)

    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> SparseTensor:
        """Same sites (and shared cache) with new ``feats``; new ``coords`` start a fresh cache."""
        if coords is None:
            if feats.shape[0] != self.coords.shape[0]:
                raise ValueError(f"replace: {feats.shape[0]} rows for {self.coords.shape[0]} sites")
            return SparseTensor(
                feats, self.coords, batch_size=self.batch_size, scale=self.scale, spatial_cache=self._cache, check=False
            )
        return SparseTensor(feats, coords, batch_size=self.batch_size, scale=self.scale)

    # -- spatial cache (per scale, shared between derived tensors) ----------------------------
    def _scale_cache(self) -> dict:
        return self._cache.setdefault(str(self.scale), {})

    def get_cache(self, key: str):
        return self._cache.get(str(self.scale), {}).get(key)

    def set_cache(self, key: str, value) -> None:
        self._scale_cache()[key] = value

    # -- layout -------------------------------------------------------------------------------
    @property
    def num_sites(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def shape(self) -> torch.Size:
        """``[batch_size, *feats.shape[1:]]`` (upstream's convention)."""
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        shape = self.get_cache("shape")
        if shape is None:
            if self.num_sites:
                shape = tuple(int(s) + 1 for s in self.coords[:, 1:].amax(0).tolist())
            else:
                shape = (0, 0, 0)
            self.set_cache("shape", shape)
        return shape

    @property
    def seqlens(self) -> torch.Tensor:
        """Sites per batch item, int64 ``[B]``."""
        lens = self.get_cache("seqlens")
        if lens is None or lens.device != self.coords.device:
            lens = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)
            self.set_cache("seqlens", lens)
        return lens

    @property
    def offsets(self) -> torch.Tensor:
        """int64 ``[B + 1]``: batch item ``i`` is rows ``offsets[i]:offsets[i + 1]`` (cu_seqlens)."""
        return F.pad(self.seqlens.cumsum(0), (1, 0))

    @property
    def layout(self) -> list[slice]:
        off = self.offsets.tolist()
        return [slice(off[i], off[i + 1]) for i in range(self.batch_size)]

    @property
    def batch_index(self) -> torch.Tensor:
        """int64 ``[N]`` batch item of each row (to broadcast per-item tensors)."""
        return self.coords[:, 0].long()

    def to_tensor_list(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [self.feats[s] for s in self.layout], [self.coords[s] for s in self.layout]

    def to_dense(self) -> torch.Tensor:
        """``[B, C, X, Y, Z]`` with zeros at inactive sites (``feats`` must be ``[N, C]``)."""
        out = self.feats.new_zeros(self.batch_size, self.feats.shape[1], *self.spatial_shape)
        b, x, y, z = self.coords.long().unbind(1)
        out[b, :, x, y, z] = self.feats
        return out

    # -- dtype / device -----------------------------------------------------------------------
    def to(self, *args, **kwargs) -> SparseTensor:
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self.replace(feats)
        return SparseTensor(
            feats,
            self.coords.to(feats.device),
            batch_size=self.batch_size,
            spatial_shape=self.spatial_shape,
            scale=self.scale,
            check=False,
        )

    def type(self, dtype: torch.dtype) -> SparseTensor:
        return self.replace(self.feats.to(dtype))

    def float(self) -> SparseTensor:
        return self.type(torch.float32)

    def half(self) -> SparseTensor:
        return self.type(torch.float16)

    def detach(self) -> SparseTensor:
        return self.replace(self.feats.detach())

    # -- elementwise (residuals); a [B, C] tensor broadcasts per batch item --------------------
    def _other(self, other):
        if isinstance(other, SparseTensor):
            if other.num_sites != self.num_sites:
                raise ValueError("elementwise op on sparse tensors with different sites")
            return other.feats
        if (
            isinstance(other, torch.Tensor)
            and other.dim() == self.feats.dim()
            and other.shape[0] == self.batch_size != self.num_sites
        ):
            return other[self.batch_index]  # per-item values, e.g. [B, C] modulation
        return other

    def __add__(self, other) -> SparseTensor:
        return self.replace(self.feats + self._other(other))

    __radd__ = __add__

    def __sub__(self, other) -> SparseTensor:
        return self.replace(self.feats - self._other(other))

    def __mul__(self, other) -> SparseTensor:
        return self.replace(self.feats * self._other(other))

    __rmul__ = __mul__

    def __neg__(self) -> SparseTensor:
        return self.replace(-self.feats)

    def __repr__(self) -> str:
        return (
            f"SparseTensor(sites={self.num_sites}, batch={self.batch_size}, feats={tuple(self.feats.shape)}, "
            f"spatial={self.spatial_shape}, scale={self.scale}, dtype={self.dtype}, device={self.device})"
        )


# --------------------------------------------------------------------------------------------
# Submanifold convolution
# --------------------------------------------------------------------------------------------


def _triple(v) -> tuple[int, int, int]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def kernel_offsets(kernel_size, dilation=1) -> list[tuple[int, int, int]]:
    """Offsets ``(dx, dy, dz)`` in weight order: index ``(i*Ky + j)*Kz + k`` of the flattened
    ``(Kx, Ky, Kz)`` kernel axes is offset ``((i - Kx//2)*dx, (j - Ky//2)*dy, (k - Kz//2)*dz)``."""
    ks, dil = _triple(kernel_size), _triple(dilation)
    return [
        ((i - ks[0] // 2) * dil[0], (j - ks[1] // 2) * dil[1], (k - ks[2] // 2) * dil[2])
        for i in range(ks[0])
        for j in range(ks[1])
        for k in range(ks[2])
    ]


def submanifold_pairs(
    coords: torch.Tensor, spatial_shape, kernel_size=3, dilation=1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each kernel offset ``o`` (weight order), ``(out_rows, in_rows)`` int64 with
    ``coords[in_rows] == coords[out_rows] + o`` (same batch item); rows are unique per offset."""
    n = coords.shape[0]
    X, Y, Z = (int(s) for s in spatial_shape)
    c = coords.long()
    b, x, y, z = c.unbind(1)
    keys = ((b * X + x) * Y + y) * Z + z
    sorted_keys, order = torch.sort(keys)
    if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError("duplicate coordinates in a sparse tensor")
    pairs = []
    for dx, dy, dz in kernel_offsets(kernel_size, dilation):
        if (dx, dy, dz) == (0, 0, 0):
            rows = torch.arange(n, device=coords.device)
            pairs.append((rows, rows))
            continue
        nx, ny, nz = x + dx, y + dy, z + dz
        inside = (nx >= 0) & (nx < X) & (ny >= 0) & (ny < Y) & (nz >= 0) & (nz < Z)
        nkeys = ((b * X + nx) * Y + ny) * Z + nz
        pos = torch.searchsorted(sorted_keys, nkeys).clamp_(max=max(n - 1, 0))
        hit = inside & (sorted_keys[pos] == nkeys) if n else inside
        out_rows = hit.nonzero().squeeze(1)
        pairs.append((out_rows, order[pos[out_rows]]))
    return pairs


def submanifold_conv3d_torch(
    feats: torch.Tensor,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather-GEMM-scatter with FlexGEMM weights ``(Co, Kx, Ky, Kz, Ci)`` (see the module docstring)."""
    co, ci = weight.shape[0], weight.shape[-1]
    w = weight.reshape(co, -1, ci)
    if len(pairs) != w.shape[1]:
        raise ValueError(f"{len(pairs)} neighbour lists for a kernel of {w.shape[1]} taps")
    centre = w.shape[1] // 2
    out = feats @ w[:, centre].t()
    if bias is not None:
        out = out + bias
    for v, (out_rows, in_rows) in enumerate(pairs):
        if v == centre or out_rows.numel() == 0:
            continue
        out.index_add_(0, out_rows, feats.index_select(0, in_rows) @ w[:, v].t())
    return out


def flex_gemm_weight_to_spconv(weight: torch.Tensor, layout: str = "KRSC") -> torch.Tensor:
    """FlexGEMM ``(Co, K, K, K, Ci)`` -> spconv's ``layout``: KRSC ``(Co, K, K, K, Ci)`` (spconv
    >= 2.3, identity), RSKC ``(K, K, K, Co, Ci)`` or RSCK ``(K, K, K, Ci, Co)`` (older Native)."""
    if weight.dim() != 5:
        raise ValueError(f"expected a 5-D conv weight, got {tuple(weight.shape)}")
    if layout == "KRSC":
        return weight
    if layout == "RSKC":
        return weight.permute(1, 2, 3, 0, 4)
    if layout == "RSCK":
        return weight.permute(1, 2, 3, 4, 0)
    raise ValueError(f"unknown spconv weight layout {layout!r}; one of {SPCONV_LAYOUTS}")


def spconv_weight_to_flex_gemm(weight: torch.Tensor, layout: str = "KRSC") -> torch.Tensor:
    """Inverse of :func:`flex_gemm_weight_to_spconv`."""
    if weight.dim() != 5:
        raise ValueError(f"expected a 5-D conv weight, got {tuple(weight.shape)}")
    if layout == "KRSC":
        return weight
    if layout == "RSKC":
        return weight.permute(3, 0, 1, 2, 4)
    if layout == "RSCK":
        return weight.permute(4, 0, 1, 2, 3)
    raise ValueError(f"unknown spconv weight layout {layout!r}; one of {SPCONV_LAYOUTS}")


def flex_gemm_to_spconv_state(state: dict, conv_names, layout: str = "KRSC") -> dict:
    """Checkpoint keys of the FlexGEMM backend (``<m>.weight``, ``<m>.bias``) -> upstream's spconv
    backend (``<m>.conv.weight``, ``<m>.conv.bias``) for every module name in ``conv_names``
    (e.g. :func:`submconv_names`); other keys pass through. Raises ``KeyError`` on a missing key."""
    out = dict(state)
    for name in conv_names:
        p = f"{name}." if name else ""
        if f"{p}weight" not in out:
            raise KeyError(f"flex_gemm state has no {p}weight")
        out[f"{p}conv.weight"] = flex_gemm_weight_to_spconv(out.pop(f"{p}weight"), layout)
        if f"{p}bias" in out:
            out[f"{p}conv.bias"] = out.pop(f"{p}bias")
    return out


def spconv_to_flex_gemm_state(state: dict, conv_names, layout: str = "KRSC") -> dict:
    """Inverse of :func:`flex_gemm_to_spconv_state`."""
    out = dict(state)
    for name in conv_names:
        p = f"{name}." if name else ""
        if f"{p}conv.weight" not in out:
            raise KeyError(f"spconv state has no {p}conv.weight")
        out[f"{p}weight"] = spconv_weight_to_flex_gemm(out.pop(f"{p}conv.weight"), layout)
        if f"{p}conv.bias" in out:
            out[f"{p}bias"] = out.pop(f"{p}conv.bias")
    return out


def submconv_names(model: nn.Module) -> list[str]:
    """Module names of every :class:`SubMConv3d` in ``model`` (for the state converters)."""
    return [name for name, m in model.named_modules() if isinstance(m, SubMConv3d)]


@lru_cache(maxsize=1)
def spconv_available() -> bool:
    try:
        import spconv.pytorch  # noqa: F401
    except (ImportError, OSError):  # or a wheel whose CUDA library fails to load
        return False
    return True


def spconv_weight_layout(conv: nn.Module) -> str:
    """The weight layout of an instantiated spconv convolution module (checked against its shape)."""
    import spconv.constants as constants
    from spconv.pytorch import ConvAlgo

    if getattr(constants, "ALL_WEIGHT_IS_KRSC", False) or conv.algo != ConvAlgo.Native:
        layout = "KRSC"
    elif getattr(constants, "FILTER_HWIO", False):
        layout = "RSCK"
    else:
        layout = "RSKC"
    ks, co, ci = tuple(conv.kernel_size), conv.out_channels, conv.in_channels
    expected = {"KRSC": (co, *ks, ci), "RSKC": (*ks, co, ci), "RSCK": (*ks, ci, co)}[layout]
    if tuple(conv.weight.shape) != expected:
        raise RuntimeError(f"spconv weight {tuple(conv.weight.shape)} does not match layout {layout} {expected}")
    return layout


def default_conv_backend(device: torch.device) -> ConvBackend:
    return "spconv" if device.type == "cuda" and spconv_available() else "torch"


class SubMConv3d(nn.Module):
    """Submanifold 3D convolution, checkpoint-compatible with upstream's FlexGEMM ``SparseConv3d``
    (``stride=1, padding=None``): parameters ``weight (Co, Kx, Ky, Kz, Ci)`` and ``bias (Co,)``.

    ``backend``: ``"torch"``, ``"spconv"`` or ``None`` (spconv on CUDA when importable, else torch).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        bias: bool = True,
        dilation=1,
        backend: ConvBackend | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.dilation = _triple(dilation)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"submanifold convolution needs odd kernel sizes, got {self.kernel_size}")
        if backend not in (None, "torch", "spconv"):
            raise ValueError(f"unknown sparse conv backend {backend!r}")
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's init: ``nn.Conv3d``'s (kaiming-uniform a=√5, fan_in = Ci·K³) in ``(Co, Ci, K…)``."""
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            w = torch.empty(self.out_channels, self.in_channels, *self.kernel_size, dtype=self.weight.dtype)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            self.weight.copy_(w.permute(0, 2, 3, 4, 1))
            if self.bias is not None:
                fan_in = self.in_channels * math.prod(self.kernel_size)
                bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
                nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    def _cache_key(self) -> str:
        return f"subm_pairs_{self.kernel_size}_{self.dilation}"

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"expected feats [N, {self.in_channels}], got {tuple(x.feats.shape)}")
        backend = self.backend or default_conv_backend(x.device)
        if backend == "spconv":
            return self._forward_spconv(x)
        key = self._cache_key()
        pairs = x.get_cache(key)
        if pairs is None or (pairs and pairs[0][0].device != x.device):
            pairs = submanifold_pairs(x.coords, x.spatial_shape, self.kernel_size, self.dilation)
            x.set_cache(key, pairs)
        return x.replace(submanifold_conv3d_torch(x.feats, pairs, self.weight, self.bias))

    # -- spconv -------------------------------------------------------------------------------
    def _spconv_module(self) -> nn.Module:
        conv = self.__dict__.get("_spconv")  # not a registered submodule: stays out of state_dict
        if conv is None:
            import spconv.pytorch as spconv

            with torch.device("meta"):  # shapes only: the real tensors come in per call
                conv = spconv.SubMConv3d(
                    self.in_channels,
                    self.out_channels,
                    self.kernel_size,
                    dilation=self.dilation,
                    bias=self.bias is not None,
                    indice_key=f"know3d_subm_{self.kernel_size}_{self.dilation}",
                )
            self.__dict__["_spconv"] = conv
            self.__dict__["_spconv_layout"] = spconv_weight_layout(conv)
        return conv

    def _forward_spconv(self, x: SparseTensor) -> SparseTensor:
        if x.device.type != "cuda":
            raise RuntimeError(
                "the spconv backend is CUDA-only here: spconv 2.3.8's CPU scatter-add races between threads "
                "(wrong outputs) and its backward calls CUDA; use backend='torch' on CPU"
            )
        if not spconv_available():
            raise RuntimeError("backend='spconv' but spconv.pytorch does not import")
        import spconv.pytorch as spconv

        conv = self._spconv_module()
        st = x.get_cache("spconv_tensor")
        if st is None:
            st = spconv.SparseConvTensor(x.feats, x.coords, list(x.spatial_shape), x.batch_size)
            x.set_cache("spconv_tensor", st)  # keeps spconv's indice_dict (neighbour pairs) per scale
        else:
            st = st.replace_feature(x.feats)
        params = {"weight": flex_gemm_weight_to_spconv(self.weight, self.__dict__["_spconv_layout"])}
        if self.bias is not None:
            params["bias"] = self.bias
        out = torch.func.functional_call(conv, params, (st,), strict=True)
        return x.replace(out.features)


# --------------------------------------------------------------------------------------------
# Resampling (SC-VAE down/up blocks)
# --------------------------------------------------------------------------------------------


def _coarsen(x: SparseTensor, factor: int):
    """Coarse sites, parent row of each fine row, child sub-index, coarse spatial shape."""
    c = x.coords.long()
    coarse = c.clone()
    coarse[:, 1:] = torch.div(c[:, 1:], factor, rounding_mode="floor")
    sub = c[:, 1:] % factor
    subidx = sub[:, 0] + sub[:, 1] * factor + sub[:, 2] * factor**2
    shape = tuple((s + factor - 1) // factor for s in x.spatial_shape)
    X, Y, Z = shape
    code = ((coarse[:, 0] * X + coarse[:, 1]) * Y + coarse[:, 2]) * Z + coarse[:, 3]
    code, parent = torch.unique(code, sorted=True, return_inverse=True)
    z = code % Z
    y = torch.div(code, Z, rounding_mode="floor") % Y
    xx = torch.div(code, Y * Z, rounding_mode="floor") % X
    b = torch.div(code, X * Y * Z, rounding_mode="floor")
    new_coords = torch.stack([b, xx, y, z], 1).to(torch.int32)
    return new_coords, parent, subidx, shape


def _refine(x: SparseTensor, subdivision: torch.Tensor, factor: int):
    """Children of each coarse site from a ``[M, f³]`` bool mask: coords, parent, sub-index."""
    if subdivision.shape != (x.num_sites, factor**3):
        raise ValueError(f"subdivision must be [{x.num_sites}, {factor**3}], got {tuple(subdivision.shape)}")
    nz = subdivision.bool().nonzero()  # row-major: parent-major, sub-index ascending
    parent, subidx = nz[:, 0], nz[:, 1]
    c = x.coords.long()[parent]
    c[:, 1:] *= factor
    c[:, 1] += subidx % factor
    c[:, 2] += torch.div(subidx, factor, rounding_mode="floor") % factor
    c[:, 3] += torch.div(subidx, factor**2, rounding_mode="floor") % factor
    return c.to(torch.int32), parent, subidx


def _subdivision_feats(sub):
    if sub is None:
        return None
    return sub.feats if isinstance(sub, SparseTensor) else sub


class _Resample(nn.Module):
    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = int(factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def _down_maps(self, x: SparseTensor, name: str):
        """(new coords, parent, subidx) cached on ``x``; registers the reverse map, coarse shape
        and subdivision mask on the coarse scale of the shared cache."""
        key = f"{name}_{self.factor}"
        cache = x.get_cache(key)
        if cache is not None:
            return cache
        new_coords, parent, subidx, shape = _coarsen(x, self.factor)
        cache = (new_coords, parent, subidx)
        x.set_cache(key, cache)
        out_scale = x.scale * self.factor
        coarse = x._cache.setdefault(str(out_scale), {})
        coarse[f"{name}_inverse_{self.factor}"] = (x.coords, parent, subidx)
        coarse["shape"] = shape
        subdivision = torch.zeros(new_coords.shape[0], self.factor**3, dtype=torch.bool, device=x.device)
        subdivision[parent, subidx] = True
        coarse["subdivision"] = subdivision
        return cache

    def _up_maps(self, x: SparseTensor, name: str, subdivision):
        """(fine coords, parent, subidx, keep_cache): the paired downsampling's map if cached, else
        the children from ``subdivision`` (bool ``[M, f³]`` or a SparseTensor of it)."""
        cache = x.get_cache(f"{name}_inverse_{self.factor}")
        if cache is not None:
            return (*cache, True)
        sub = _subdivision_feats(subdivision)
        if sub is None:
            raise ValueError("no cached structure: pass `subdivision` or pair with the downsampling module")
        return (*_refine(x, sub, self.factor), False)

    def _fine(self, x: SparseTensor, feats, coords, keep_cache: bool) -> SparseTensor:
        return SparseTensor(
            feats,
            coords,
            batch_size=x.batch_size,
            scale=x.scale / self.factor,
            spatial_cache=x._cache if keep_cache else None,
            check=False,
        )


class SparseSpatial2Channel(_Resample):
    """Halve the resolution (``factor``), packing the ``f³`` children into channels:
    ``[N, C] -> [M, f³·C]`` with child ``s`` at channels ``s*C:(s+1)*C`` (absent children zero)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        new_coords, parent, subidx = self._down_maps(x, "s2c")
        v = self.factor**3
        feats = x.feats.new_zeros(new_coords.shape[0] * v, *x.feats.shape[1:])
        feats = feats.index_copy(0, parent * v + subidx, x.feats)
        feats = feats.reshape(new_coords.shape[0], -1)
        return SparseTensor(
            feats, new_coords, batch_size=x.batch_size, scale=x.scale * self.factor, spatial_cache=x._cache, check=False
        )


class SparseChannel2Spatial(_Resample):
    """Inverse of :class:`SparseSpatial2Channel`: ``[M, f³·C] -> [N, C]`` over the children that the
    paired encoder step recorded, or (no such cache) those set in ``subdivision``."""

    def forward(self, x: SparseTensor, subdivision=None) -> SparseTensor:
        coords, parent, subidx, keep = self._up_maps(x, "s2c", subdivision)
        v = self.factor**3
        if x.feats.shape[1] % v:
            raise ValueError(f"channel2spatial needs channels divisible by {v}, got {x.feats.shape[1]}")
        feats = x.feats.reshape(x.num_sites * v, -1)[parent * v + subidx]
        return self._fine(x, feats, coords, keep)


class SparseDownsample(_Resample):
    """Pool the children of each coarse site (``mode`` ``"mean"`` or ``"max"``)."""

    def __init__(self, factor: int = 2, mode: Literal["mean", "max"] = "mean") -> None:
        super().__init__(factor)
        if mode not in ("mean", "max"):
            raise ValueError(f"unknown pooling mode {mode!r}")
        self.mode = mode

    def forward(self, x: SparseTensor) -> SparseTensor:
        new_coords, parent, _ = self._down_maps(x, "pool")
        index = parent.view(-1, *([1] * (x.feats.dim() - 1))).expand_as(x.feats)
        feats = x.feats.new_zeros(new_coords.shape[0], *x.feats.shape[1:])
        feats = feats.scatter_reduce(
            0, index, x.feats, reduce="mean" if self.mode == "mean" else "amax", include_self=False
        )
        return SparseTensor(
            feats, new_coords, batch_size=x.batch_size, scale=x.scale * self.factor, spatial_cache=x._cache, check=False
        )


class SparseUpsample(_Resample):
    """Nearest upsampling to the children recorded by the paired :class:`SparseDownsample`, or
    (no such cache) to those set in ``subdivision``."""

    def forward(self, x: SparseTensor, subdivision=None) -> SparseTensor:
        coords, parent, _, keep = self._up_maps(x, "pool", subdivision)
        return self._fine(x, x.feats[parent], coords, keep)


# --------------------------------------------------------------------------------------------
# Variable-length attention
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _lens(offsets: torch.Tensor) -> list[int]:
    return (offsets[1:] - offsets[:-1]).tolist()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets_q: torch.Tensor,
    offsets_kv: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: AttnBackend | None = None,
) -> torch.Tensor:
    """Attention within each batch item of ragged sequences.

    ``q [Tq, H, C]``, ``k [Tk, H, C]``, ``v [Tk, H, Cv]``; item ``i`` is ``q[offsets_q[i]:offsets_q[i+1]]``
    attending to ``k, v[offsets_kv[i]:offsets_kv[i+1]]`` (``offsets_kv`` defaults to ``offsets_q``,
    i.e. self-attention; a :class:`SparseTensor`'s ``offsets``). Returns ``[Tq, H, Cv]``.
    ``backend=None`` picks flash-attn's varlen kernel on CUDA with fp16/bf16 when it imports,
    else ``"sdpa"`` (one SDPA call per item). ``"sdpa_padded"`` runs one SDPA on a zero-padded
    batch with a key mask (faster for many short items, more memory).
    """
    if offsets_kv is None:
        offsets_kv = offsets_q
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [T, H, C]")
    if offsets_q.numel() != offsets_kv.numel():
        raise ValueError("offsets_q and offsets_kv describe different batch sizes")
    if int(offsets_q[-1]) != q.shape[0] or int(offsets_kv[-1]) != k.shape[0] or k.shape[0] != v.shape[0]:
        raise ValueError("offsets do not cover q / k / v")
    kv_lens = _lens(offsets_kv)
    q_lens = _lens(offsets_q)
    if any(n == 0 for n, m in zip(kv_lens, q_lens) if m > 0):
        raise ValueError("a batch item has queries but no keys")
    if backend is None:
        fast = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
        backend = "flash_attn" if fast else "sdpa"
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=offsets_q.to(device=q.device, dtype=torch.int32),
            cu_seqlens_k=offsets_kv.to(device=q.device, dtype=torch.int32),
            max_seqlen_q=max(q_lens, default=0),
            max_seqlen_k=max(kv_lens, default=0),
            softmax_scale=scale,
        )
    if backend == "sdpa":
        outs = []
        oq, okv = offsets_q.tolist(), offsets_kv.tolist()
        for i in range(len(q_lens)):
            qi = q[oq[i] : oq[i + 1]].transpose(0, 1)  # [H, L, C]
            ki = k[okv[i] : okv[i + 1]].transpose(0, 1)
            vi = v[okv[i] : okv[i + 1]].transpose(0, 1)
            if qi.shape[1] == 0:
                outs.append(q.new_zeros(0, v.shape[1], v.shape[2]))
                continue
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale).transpose(0, 1))
        if not outs:
            return q.new_zeros(0, v.shape[1], v.shape[2])
        return torch.cat(outs, 0)
    if backend == "sdpa_padded":
        nb = len(q_lens)
        lq, lk = max(q_lens, default=0), max(kv_lens, default=0)
        if nb == 0 or lq == 0:
            return q.new_zeros(q.shape[0], v.shape[1], v.shape[2])
        dev = q.device
        q_item = torch.repeat_interleave(torch.arange(nb, device=dev), torch.tensor(q_lens, device=dev))
        k_item = torch.repeat_interleave(torch.arange(nb, device=dev), torch.tensor(kv_lens, device=dev))
        q_pos = torch.arange(q.shape[0], device=dev) - offsets_q.to(dev)[q_item]
        k_pos = torch.arange(k.shape[0], device=dev) - offsets_kv.to(dev)[k_item]
        qp = q.new_zeros(nb, lq, *q.shape[1:])
        kp = k.new_zeros(nb, lk, *k.shape[1:])
        vp = v.new_zeros(nb, lk, *v.shape[1:])
        qp = qp.index_put((q_item, q_pos), q)
        kp = kp.index_put((k_item, k_pos), k)
        vp = vp.index_put((k_item, k_pos), v)
        mask = torch.arange(lk, device=dev)[None, :] < torch.tensor(kv_lens, device=dev)[:, None]  # [B, Lk]
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale
        ).transpose(1, 2)  # [B, Lq, H, Cv]
        return out[q_item, q_pos]
    raise ValueError(f"unknown attention backend {backend!r}")


def sparse_self_attention(qkv: SparseTensor, *, scale: float | None = None, backend: AttnBackend | None = None):
    """Full self-attention per batch item of a ``[N, 3, H, C]`` SparseTensor (upstream's
    ``sparse_scaled_dot_product_attention(qkv)``); returns a ``[N, H, C]`` SparseTensor."""
    q, k, v = qkv.feats.unbind(1)
    off = qkv.offsets
    return qkv.replace(sparse_attention(q, k, v, off, off, scale=scale, backend=backend))
