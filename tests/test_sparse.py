"""Sparse tensors, submanifold convolution (vs dense conv3d), resampling and varlen attention."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from know3d.training.generator.sparse import (
    SparseChannel2Spatial,
    SparseDownsample,
    SparseSpatial2Channel,
    SparseTensor,
    SparseUpsample,
    SubMConv3d,
    flex_gemm_to_spconv_state,
    flex_gemm_weight_to_spconv,
    sparse_attention,
    sparse_self_attention,
    spconv_available,
    spconv_to_flex_gemm_state,
    spconv_weight_to_flex_gemm,
    submanifold_pairs,
    submconv_names,
)


@contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def random_sparse(
    seed: int = 0, batch: int = 2, shape=(7, 5, 6), channels: int = 4, density: float = 0.35, dtype=torch.float32
) -> SparseTensor:
    """Random active sites per item (rows shuffled within each item), random features."""
    g = torch.Generator().manual_seed(seed)
    feats, coords = [], []
    for _ in range(batch):
        c = (torch.rand(*shape, generator=g) < density).nonzero().int()
        c = c[torch.randperm(len(c), generator=g)]
        coords.append(c)
        feats.append(torch.randn(len(c), channels, generator=g, dtype=dtype))
    return SparseTensor.from_tensor_list(feats, coords, spatial_shape=shape)


def at_sites(dense: torch.Tensor, x: SparseTensor) -> torch.Tensor:
    b, i, j, k = x.coords.long().unbind(1)
    return dense[b, :, i, j, k]


def dense_reference(x: SparseTensor, conv: SubMConv3d) -> torch.Tensor:
    pad = tuple(d * (k // 2) for k, d in zip(conv.kernel_size, conv.dilation))
    w = conv.weight.permute(0, 4, 1, 2, 3)  # flex_gemm (Co, Kx, Ky, Kz, Ci) -> conv3d (Co, Ci, Kx, Ky, Kz)
    return at_sites(F.conv3d(x.to_dense(), w, conv.bias, padding=pad, dilation=conv.dilation), x)


# -- SparseTensor ------------------------------------------------------------------------------


def test_sparse_tensor_layout():
    x = random_sparse()
    lens = [int((x.coords[:, 0] == b).sum()) for b in range(2)]
    assert x.batch_size == 2 and x.spatial_shape == (7, 5, 6)
    assert x.seqlens.tolist() == lens
    assert x.offsets.tolist() == [0, lens[0], lens[0] + lens[1]]
    assert x.layout == [slice(0, lens[0]), slice(lens[0], sum(lens))]
    assert x.shape == torch.Size([2, 4])
    y = x.replace(x.feats * 2)
    assert y.coords is x.coords and y._cache is x._cache
    per_item = torch.arange(2.0)[:, None].expand(2, 4)
    assert torch.equal((x + per_item).feats, x.feats + x.coords[:, :1].float())
    dense = x.to_dense()
    assert dense.shape == (2, 4, 7, 5, 6) and torch.equal(at_sites(dense, x), x.feats)


def test_sparse_tensor_rejects_bad_input():
    c = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        SparseTensor(torch.zeros(2, 1), c)
    with pytest.raises(ValueError, match="rows"):
        SparseTensor(torch.zeros(3, 1), c)
    dup = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicate"):
        SubMConv3d(1, 1)(SparseTensor(torch.zeros(2, 1), dup))


# -- SubMConv3d (torch backend) vs dense conv3d ------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_submconv_matches_dense_conv3d(threads):
    torch.manual_seed(0)
    with num_threads(threads):
        for seed in range(3):
            x = random_sparse(seed)
            conv = SubMConv3d(4, 6, 3)
            with torch.no_grad():
                conv.bias.normal_()
            assert torch.allclose(conv(x).feats, dense_reference(x, conv), atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_submconv_gradients_match_dense_conv3d(threads):
    torch.manual_seed(1)
    with num_threads(threads):
        x = random_sparse(3, channels=5)
        g = torch.randn(x.num_sites, 3)
        conv = SubMConv3d(5, 3)
        feats = x.feats.clone().requires_grad_(True)
        (conv(x.replace(feats)).feats * g).sum().backward()
        ours = (feats.grad, conv.weight.grad.clone(), conv.bias.grad.clone())

        conv.zero_grad()
        dense = x.to_dense().requires_grad_(True)
        w = conv.weight.permute(0, 4, 1, 2, 3)
        (at_sites(F.conv3d(dense, w, conv.bias, padding=1), x) * g).sum().backward()
        ref = (at_sites(dense.grad, x), conv.weight.grad, conv.bias.grad)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size,dilation", [(5, 1), (3, 2), ((3, 1, 5), 1)])
def test_submconv_other_kernels_match_dense(kernel_size, dilation):
    torch.manual_seed(2)
    x = random_sparse(4, shape=(8, 7, 9), density=0.3)
    conv = SubMConv3d(4, 3, kernel_size, dilation=dilation)
    assert torch.allclose(conv(x).feats, dense_reference(x, conv), atol=1e-5, rtol=0)


def test_submconv_deterministic_and_cached():
    torch.manual_seed(3)
    x = random_sparse(5, shape=(10, 10, 10), channels=16, density=0.4)
    conv = SubMConv3d(16, 16)
    runs = []
    with num_threads(2):
        for _ in range(3):
            feats = x.feats.clone().requires_grad_(True)
            conv.zero_grad()
            out = conv(x.replace(feats)).feats
            out.square().sum().backward()
            runs.append((out.detach(), feats.grad, conv.weight.grad.clone()))
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    # the neighbour pairs were built once and are shared by every tensor on the same sites
    pairs = x.get_cache("subm_pairs_(3, 3, 3)_(1, 1, 1)")
    assert pairs is not None and conv(x.replace(x.feats)).feats is not None
    assert x.get_cache("subm_pairs_(3, 3, 3)_(1, 1, 1)") is pairs


def test_submanifold_pairs_are_injective():
    x = random_sparse(6, shape=(6, 6, 6), density=0.5)
    pairs = submanifold_pairs(x.coords, x.spatial_shape)
    assert len(pairs) == 27
    for out_rows, in_rows in pairs:
        assert out_rows.unique().numel() == out_rows.numel()
        assert in_rows.unique().numel() == in_rows.numel()
        assert torch.equal(x.coords[out_rows, 0], x.coords[in_rows, 0])


# -- weight layout and checkpoint keys ---------------------------------------------------------


def test_submconv_state_dict_is_flex_gemm_layout(shared_reference):
    conv = SubMConv3d(5, 7)
    sd = conv.state_dict()
    assert list(sd) == ["weight", "bias"]
    assert sd["weight"].shape == (7, 3, 3, 3, 5) and sd["bias"].shape == (7,)
    conv.load_state_dict({"weight": torch.randn(7, 3, 3, 3, 5), "bias": torch.randn(7)})  # strict
    ref = json.loads((shared_reference / "trellis2_shape_enc_next_dc_f16c32.json").read_text())["keys"]
    for key in ("blocks.0.0.conv1.weight", "blocks.1.0.conv.weight"):
        co, *_, ci = ref[key]
        with torch.device("meta"):
            m = SubMConv3d(ci, co)
        assert list(m.weight.shape) == ref[key]
        assert list(m.bias.shape) == ref[key.replace("weight", "bias")]


@pytest.mark.parametrize(
    "layout,shape", [("KRSC", (7, 3, 3, 3, 5)), ("RSKC", (3, 3, 3, 7, 5)), ("RSCK", (3, 3, 3, 5, 7))]
)
def test_spconv_weight_layouts_round_trip(layout, shape):
    w = torch.randn(7, 3, 3, 3, 5)
    s = flex_gemm_weight_to_spconv(w, layout)
    assert s.shape == shape
    assert torch.equal(spconv_weight_to_flex_gemm(s, layout), w)
    # tap (i, j, k) from input channel c to output o is the same number in every layout
    i, j, k, c, o = 2, 0, 1, 4, 6
    index = {"KRSC": (o, i, j, k, c), "RSKC": (i, j, k, o, c), "RSCK": (i, j, k, c, o)}[layout]
    assert s[index] == w[o, i, j, k, c]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.conv = SubMConv3d(4, 4)
        self.conv2 = SubMConv3d(4, 8, bias=False)


def test_spconv_state_keys_round_trip():
    model = nn.ModuleDict({"a": _Block(), "b": _Block()})
    names = submconv_names(model)
    assert names == ["a.conv", "a.conv2", "b.conv", "b.conv2"]
    flex = model.state_dict()
    sp = flex_gemm_to_spconv_state(flex, names, layout="RSKC")
    assert "a.conv.conv.weight" in sp and "a.conv.conv.bias" in sp and "a.conv2.conv.weight" in sp
    assert "a.conv.weight" not in sp and "a.norm.weight" in sp
    assert sp["a.conv2.conv.weight"].shape == (3, 3, 3, 8, 4)
    back = spconv_to_flex_gemm_state(sp, names, layout="RSKC")
    assert sorted(back) == sorted(flex)
    for k, v in flex.items():
        assert torch.equal(back[k], v)
    model.load_state_dict(back)  # strict
    with pytest.raises(KeyError):
        spconv_to_flex_gemm_state(flex, names)
    with pytest.raises(KeyError):
        flex_gemm_to_spconv_state(sp, names)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and spconv_available()),
    reason="spconv backend needs CUDA and an importable spconv (not installed on the CPU machines; "
    "its CPU path races between threads, see shared/ENVIRONMENT.md)",
)
def test_spconv_backend_matches_torch_backend():
    torch.manual_seed(7)
    x = random_sparse(8, shape=(12, 11, 10), channels=8).to("cuda")
    conv = SubMConv3d(8, 16, backend="torch").cuda()
    ref = conv(x).feats
    conv.backend = "spconv"
    out = conv(x.replace(x.feats))
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert torch.allclose(out.feats, ref, atol=1e-4, rtol=1e-4)
    out.feats.square().sum().backward()
    assert conv.weight.grad is not None


def test_spconv_backend_refused_on_cpu():
    conv = SubMConv3d(4, 4, backend="spconv")
    with pytest.raises(RuntimeError, match="CUDA-only"):
        conv(random_sparse())


# -- the shape SC-VAE's conv (shape_vae.SparseConv3d) is SubMConv3d on SparseVoxels --------------


def _shape_vae_conv_pair(ci: int, co: int):
    from know3d.training.generator.shape_vae import SparseConv3d

    conv = SparseConv3d(ci, co)
    with torch.no_grad():
        conv.bias.normal_()
    ref = SubMConv3d(ci, co)
    ref.load_state_dict(conv.state_dict())  # strict: the same keys and shapes
    return conv, ref


@pytest.mark.parametrize("threads", [1, 2])
def test_shape_vae_conv_equals_submconv(threads):
    from know3d.training.generator.shape_vae import SparseVoxels

    torch.manual_seed(4)
    conv, ref = _shape_vae_conv_pair(6, 5)
    assert isinstance(conv, SubMConv3d) and conv.backend is None and list(conv.state_dict()) == ["weight", "bias"]
    assert conv.weight.shape == (5, 3, 3, 3, 6)
    with num_threads(threads):
        for seed in range(3):
            x = random_sparse(20 + seed, shape=(9, 8, 7), channels=6)
            out = conv(SparseVoxels(x.feats, x.coords))
            assert torch.equal(out.feats, ref(x).feats)  # the same kernel, bit for bit
            assert torch.allclose(out.feats, dense_reference(x, ref), atol=1e-5, rtol=0)
            # SparseVoxels need no batch order: rows of both items interleaved
            perm = torch.randperm(x.num_sites)
            out = conv(SparseVoxels(x.feats[perm], x.coords[perm]))
            assert torch.allclose(out.feats, dense_reference(x, ref)[perm], atol=1e-5, rtol=0)


def test_shape_vae_conv_torch_backend_forced_and_gradients():
    from know3d.training.generator.shape_vae import SparseVoxels

    torch.manual_seed(5)
    conv, ref = _shape_vae_conv_pair(4, 3)
    conv.backend = "torch"
    x = random_sparse(30, channels=4)
    feats = x.feats.clone().requires_grad_(True)
    (conv(SparseVoxels(feats, x.coords)).feats.square()).sum().backward()
    feats_ref = x.feats.clone().requires_grad_(True)
    (ref(x.replace(feats_ref)).feats.square()).sum().backward()
    assert torch.equal(feats.grad, feats_ref.grad) and torch.equal(conv.weight.grad, ref.weight.grad)
    conv.backend = "spconv"
    with pytest.raises(RuntimeError, match="CUDA-only"):
        conv(SparseVoxels(x.feats, x.coords))


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and spconv_available()),
    reason="spconv backend needs CUDA and an importable spconv",
)
def test_shape_vae_conv_spconv_backend_matches_torch_backend():
    from know3d.training.generator.shape_vae import SparseVoxels

    torch.manual_seed(8)
    conv, _ = _shape_vae_conv_pair(8, 16)
    conv = conv.cuda()
    x = random_sparse(31, shape=(12, 11, 10), channels=8)
    perm = torch.randperm(x.num_sites)
    vox = SparseVoxels(x.feats[perm].cuda(), x.coords[perm].cuda())
    conv.backend = "torch"
    feats = vox.feats.clone().requires_grad_(True)
    ref = conv(vox.replace(feats)).feats
    ref.square().sum().backward()
    grads_ref = (feats.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    conv.zero_grad()
    conv.backend = None  # CUDA + spconv importable: spconv
    feats = vox.feats.clone().requires_grad_(True)
    out = conv(vox.replace(feats)).feats
    out.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip((feats.grad, conv.weight.grad, conv.bias.grad), grads_ref):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
    assert list(conv.state_dict()) == ["weight", "bias"]


# -- resampling --------------------------------------------------------------------------------


def _child_sets(x: SparseTensor) -> set:
    return set(map(tuple, x.coords.tolist()))


def test_spatial2channel_round_trip_and_layout():
    x = random_sparse(9, shape=(8, 7, 6), channels=3)
    s2c, c2s = SparseSpatial2Channel(2), SparseChannel2Spatial(2)
    y = s2c(x)
    assert y.scale == 2 and y.feats.shape[1] == 24 and y.spatial_shape == (4, 4, 3)
    # coarse sites: sorted (b, x, y, z), unique, batch-contiguous
    expect = torch.unique(torch.cat([x.coords[:, :1], x.coords[:, 1:] // 2], 1), dim=0)
    assert torch.equal(y.coords, expect.int())
    # child (x, y, z) of a parent sits at channels subidx*C:(subidx+1)*C, subidx = x%2 + 2*(y%2) + 4*(z%2)
    key = {tuple(c): i for i, c in enumerate(y.coords.tolist())}
    for row in range(0, x.num_sites, 7):
        b, i, j, k = x.coords[row].tolist()
        sub = i % 2 + 2 * (j % 2) + 4 * (k % 2)
        assert torch.equal(y.feats[key[(b, i // 2, j // 2, k // 2)], sub * 3 : sub * 3 + 3], x.feats[row])
    # paired inverse (the shared cache) restores the sites in their original order
    z = c2s(y)
    assert torch.equal(z.coords, x.coords) and torch.equal(z.feats, x.feats) and z.scale == 1
    # without the cache, the subdivision mask rebuilds the same sites (parent-major order)
    sub = y.get_cache("subdivision")
    fresh = SparseTensor(y.feats, y.coords.clone(), batch_size=y.batch_size)
    w = c2s(fresh, fresh.replace(sub))
    assert _child_sets(w) == _child_sets(x)
    order = {c: i for i, c in enumerate(map(tuple, x.coords.tolist()))}
    perm = torch.tensor([order[tuple(c)] for c in w.coords.tolist()])
    assert torch.equal(w.feats, x.feats[perm])
    assert torch.all(w.coords[1:, 0] >= w.coords[:-1, 0])


def test_downsample_upsample_round_trip():
    x = random_sparse(10, shape=(9, 8, 7), channels=3)
    down, up = SparseDownsample(2), SparseUpsample(2)
    y = down(x)
    parent = {tuple(c): i for i, c in enumerate(y.coords.tolist())}
    rows = torch.tensor([parent[(b, i // 2, j // 2, k // 2)] for b, i, j, k in x.coords.tolist()])
    mean = torch.zeros(y.num_sites, 3).index_add_(0, rows, x.feats) / torch.bincount(rows)[:, None]
    assert torch.allclose(y.feats, mean, atol=1e-6)
    z = up(y)
    assert torch.equal(z.coords, x.coords) and torch.equal(z.feats, y.feats[rows])
    fresh = SparseTensor(y.feats, y.coords.clone(), batch_size=2)
    w = up(fresh, y.get_cache("subdivision"))
    assert _child_sets(w) == _child_sets(x)
    ymax = SparseDownsample(2, "max")(x)
    assert torch.equal(ymax.coords, y.coords)
    with pytest.raises(ValueError, match="subdivision"):
        up(fresh)


def test_conv_after_resampling_matches_dense():
    x = random_sparse(11, shape=(8, 8, 8), channels=2, density=0.5)
    y = SparseSpatial2Channel(2)(x)
    conv = SubMConv3d(16, 4)
    assert torch.allclose(conv(y).feats, dense_reference(y, conv), atol=1e-5, rtol=0)


# -- varlen attention --------------------------------------------------------------------------


def _reference_attention(q, k, v, oq, okv):
    outs = []
    for i in range(len(oq) - 1):
        qi, ki, vi = q[oq[i] : oq[i + 1]], k[okv[i] : okv[i + 1]], v[okv[i] : okv[i + 1]]
        logits = torch.einsum("qhc,khc->hqk", qi, ki) / qi.shape[-1] ** 0.5
        outs.append(torch.einsum("hqk,khc->qhc", logits.softmax(-1), vi))
    return torch.cat(outs, 0)


@pytest.mark.parametrize("backend", [None, "sdpa", "sdpa_padded"])
def test_varlen_attention_equals_per_sample(backend):
    g = torch.Generator().manual_seed(0)
    q_lens, kv_lens = [5, 1, 9], [7, 3, 2]
    oq = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    okv = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()])
    q = torch.randn(sum(q_lens), 2, 8, generator=g, dtype=torch.float64)
    k = torch.randn(sum(kv_lens), 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(kv_lens), 2, 6, generator=g, dtype=torch.float64)
    out = sparse_attention(q, k, v, oq, okv, backend=backend)
    assert out.shape == (sum(q_lens), 2, 6)
    assert torch.allclose(out, _reference_attention(q, k, v, oq.tolist(), okv.tolist()), atol=1e-10)


def test_sparse_self_attention_on_sparse_tensor():
    x = random_sparse(12, channels=3 * 2 * 4)
    qkv = x.replace(x.feats.reshape(-1, 3, 2, 4).double())
    out = sparse_self_attention(qkv)
    q, k, v = qkv.feats.unbind(1)
    off = x.offsets.tolist()
    assert out.feats.shape == (x.num_sites, 2, 4)
    assert torch.allclose(out.feats, _reference_attention(q, k, v, off, off), atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn varlen path needs CUDA")
def test_flash_attn_varlen_matches_sdpa():
    pytest.importorskip("flash_attn")
    g = torch.Generator().manual_seed(1)
    lens = [33, 7, 64]
    off = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    q, k, v = (torch.randn(sum(lens), 4, 32, generator=g).cuda().half() for _ in range(3))
    ref = sparse_attention(q.float(), k.float(), v.float(), off, backend="sdpa")
    out = sparse_attention(q, k, v, off, backend="flash_attn")
    assert torch.allclose(out.float(), ref, atol=2e-3, rtol=2e-3)
