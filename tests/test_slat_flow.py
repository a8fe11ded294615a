"""Stage 2 of the TRELLIS.2 generator: the shape-SLat flow DiT (+ Know3D H branch) and the shape
SC-VAE — key conformance with the released checkpoints, the branch's zero start, sparse batching,
loading, and the plain-torch sparse ops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from know3d.training.generator.shape_vae import (
    SparseConv3d,
    SparseVoxels,
    channel_to_spatial,
    shape_decoder,
    shape_encoder,
    shape_vae_key_shapes,
    spatial_to_channel,
)
from know3d.training.generator.slat_flow import (
    FULL_HIDDEN_CHANNELS,
    SLatFlowConfig,
    SLatFlowLoadError,
    SLatFlowModel,
    is_branch_key,
    load_slat_flow,
    save_slat_flow,
    slat_flow_key_shapes,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = next((p for p in (REPO / "shared" / "reference", REPO.parent / "shared" / "reference") if p.is_dir()), REPO)


def _reference(name: str) -> dict:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every official parameter random (zero-initialized ones would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_branch_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() < 2 or "gamma" in name else 0.0))
    return model


def _voxels(counts: list[int], resolution: int, seed: int = 0) -> torch.Tensor:
    """``[sum(counts), 4]`` distinct (batch, x, y, z), batches interleaved (not sorted)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        flat = torch.randperm(resolution**3, generator=g)[:n]
        xyz = torch.stack([flat // resolution**2, flat // resolution % resolution, flat % resolution], 1)
        rows.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(rows)
    return coords[torch.randperm(len(coords), generator=g)]


@pytest.fixture(scope="module")
def flow_pair() -> tuple[SLatFlowModel, SLatFlowModel]:
    """(base, branched) debug-size flows; the branched one holds the base's (random) weights."""
    cfg = SLatFlowConfig.debug()
    torch.manual_seed(0)
    base = _randomized(SLatFlowModel(cfg.base())).eval()
    branched = SLatFlowModel(cfg).eval()
    result = branched.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(is_branch_key(k) for k in result.missing_keys)
    return base, branched


def _flow_inputs(cfg: SLatFlowConfig, counts: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = _voxels(counts, cfg.resolution, seed)
    feats = torch.randn(len(coords), cfg.in_channels, generator=g)
    t = torch.rand(len(counts), generator=g) * 1000
    cond = torch.randn(len(counts), 5, cfg.cond_channels, generator=g)
    hidden = torch.randn(len(counts), 6, cfg.hidden_channels or 1, generator=g)
    return feats, coords, t, cond, hidden


# --------------------------------------------------------------------------- keys


def test_full_flow_matches_reference_keys_exactly() -> None:
    ref = _reference("trellis2_slat_flow_img2shape_1_3B.json")
    mine = slat_flow_key_shapes(branch=False)
    assert list(mine.items()) == list(ref["keys"].items())  # keys, shapes and order
    assert sum(torch.Size(s).numel() for s in mine.values()) == ref["param_count"]


def test_branched_flow_keeps_official_keys_and_adds_only_branch_keys() -> None:
    ref = _reference("trellis2_slat_flow_img2shape_1_3B.json")["keys"]
    mine = slat_flow_key_shapes(branch=True, hidden_channels=FULL_HIDDEN_CHANNELS)
    official = {k: v for k, v in mine.items() if not is_branch_key(k)}
    assert list(official.items()) == list(ref.items())
    extra = [k for k in mine if k not in ref]
    assert extra and all(is_branch_key(k) for k in extra)
    assert mine["know3d_hidden_proj.weight"] == [1536, FULL_HIDDEN_CHANNELS]
    assert mine["blocks.29.know3d_out.weight"] == [1536, 1536]


def test_upstream_config_json_gives_full_config() -> None:
    ref = _reference("trellis2_slat_flow_img2shape_1_3B.json")
    args = json.loads(ref["source"].split("models.denoiser.args = ")[1].split("}")[0] + "}")
    upstream = {"name": "ElasticSLatFlowModel", "args": {**args, "dtype": "bfloat16"}}
    assert SLatFlowConfig.from_json(upstream) == SLatFlowConfig.full()
    assert SLatFlowConfig.from_json(SLatFlowConfig.debug().to_json()) == SLatFlowConfig.debug()
    with pytest.raises(ValueError, match="not a"):
        SLatFlowConfig.from_json({"name": "SparseStructureFlowModel", "args": args})


@pytest.mark.parametrize(("part", "name"), [("encoder", "enc"), ("decoder", "dec")])
def test_shape_vae_matches_reference_keys_exactly(part: str, name: str) -> None:
    ref = _reference(f"trellis2_shape_{name}_next_dc_f16c32.json")
    mine = shape_vae_key_shapes(part)
    assert list(mine.items()) == list(ref["keys"].items())
    assert sum(torch.Size(s).numel() for s in mine.values()) == ref["param_count"]
    conv = [k for k, s in mine.items() if len(s) == 5]
    assert len(conv) == 40 and all(mine[k][1:4] == [3, 3, 3] for k in conv)


# --------------------------------------------------------------------------- flow forward


def test_branch_starts_as_base_model_exactly(flow_pair) -> None:
    base, branched = flow_pair
    feats, coords, t, cond, hidden = _flow_inputs(branched.cfg, [7, 4, 9])
    with torch.no_grad():
        want = base(feats, t, cond, coords=coords)
        got = branched(feats, t, cond, hidden, coords=coords)
    assert want.shape == (len(coords), base.cfg.out_channels)
    assert want.abs().max() > 0
    assert torch.equal(got, want)


def test_branch_reads_hidden_once_opened() -> None:
    cfg = SLatFlowConfig.debug()
    torch.manual_seed(1)
    model = _randomized(SLatFlowModel(cfg))
    feats, coords, t, cond, hidden = _flow_inputs(cfg, [5, 4], seed=7)
    loss = model(feats, t, cond, hidden, coords=coords).square().sum()
    loss.backward()
    assert model.blocks[0].know3d_out.weight.grad.abs().max() > 0  # zero-init output still learns
    with torch.no_grad():
        for block in model.blocks:
            block.know3d_out.weight.normal_(std=0.05)
        a = model(feats, t, cond, hidden, coords=coords)
        b = model(feats, t, cond, torch.zeros_like(hidden), coords=coords)
    assert not torch.allclose(a, b)


def test_padded_batch_equals_per_sample_runs(flow_pair) -> None:
    base, _ = flow_pair
    counts = [7, 3, 11]
    feats, coords, t, cond, _ = _flow_inputs(base.cfg, counts, seed=1)
    with torch.no_grad():
        batched = base(feats, t, cond, coords=coords)
        for b in range(len(counts)):
            sel = coords[:, 0] == b
            one = coords[sel].clone()
            one[:, 0] = 0
            alone = base(feats[sel], t[b : b + 1], cond[b : b + 1], coords=one)
            torch.testing.assert_close(batched[sel], alone, atol=1e-5, rtol=1e-5)


def test_flow_is_equivariant_to_voxel_order(flow_pair) -> None:
    base, _ = flow_pair
    feats, coords, t, cond, _ = _flow_inputs(base.cfg, [6, 5], seed=2)
    perm = torch.randperm(len(coords), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = base(feats, t, cond, coords=coords)
        out_perm = base(feats[perm], t, cond, coords=coords[perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-5)


def test_flow_input_errors(flow_pair) -> None:
    base, branched = flow_pair
    feats, coords, t, cond, hidden = _flow_inputs(branched.cfg, [3, 2])
    with pytest.raises(ValueError, match="no Know3D branch"):
        base(feats, t, cond, hidden, coords=coords)
    with pytest.raises(ValueError, match="has the Know3D branch"):
        branched(feats, t, cond, coords=coords)
    with pytest.raises(ValueError, match="no voxels"):
        base(feats, torch.rand(3), torch.randn(3, 5, base.cfg.cond_channels), coords=coords)
    with pytest.raises(ValueError, match="coords"):
        base(feats, t, cond)


# --------------------------------------------------------------------------- loading


def test_load_plain_checkpoint_into_branched_model(tmp_path, flow_pair) -> None:
    base, _ = flow_pair
    save_slat_flow(base, tmp_path)
    loaded = load_slat_flow(tmp_path, SLatFlowConfig.debug())
    assert loaded.initialized_keys and all(is_branch_key(k) for k in loaded.initialized_keys)
    for k, v in base.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    plain = load_slat_flow(tmp_path)  # the config json beside the weights
    assert plain.cfg == base.cfg and plain.initialized_keys == ()


def _edit_checkpoint(tmp_path: Path, base: SLatFlowModel, edit) -> Path:
    folder = tmp_path / "ckpt"
    path = save_slat_flow(base, folder)
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return folder


def test_loader_rejects_missing_official_key(tmp_path, flow_pair) -> None:
    folder = _edit_checkpoint(tmp_path, flow_pair[0], lambda s: s.pop("blocks.1.cross_attn.to_kv.weight"))
    with pytest.raises(SLatFlowLoadError, match="missing 1: blocks.1.cross_attn.to_kv.weight"):
        load_slat_flow(folder, SLatFlowConfig.debug())


def test_loader_rejects_unexpected_key(tmp_path, flow_pair) -> None:
    folder = _edit_checkpoint(tmp_path, flow_pair[0], lambda s: s.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(SLatFlowLoadError, match="unexpected 1: extra.weight"):
        load_slat_flow(folder)


def test_loader_rejects_wrong_shape(tmp_path, flow_pair) -> None:
    folder = _edit_checkpoint(tmp_path, flow_pair[0], lambda s: s.update({"input_layer.weight": torch.zeros(128, 9)}))
    with pytest.raises(SLatFlowLoadError, match=r"shape mismatch: input_layer.weight \[128, 9\]"):
        load_slat_flow(folder)


def test_loader_rejects_pickles(tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not read")
    with pytest.raises(SLatFlowLoadError, match="pickled checkpoints are never loaded"):
        load_slat_flow(path)


# --------------------------------------------------------------------------- shape VAE ops


def test_submanifold_conv_equals_dense_conv_at_active_voxels() -> None:
    torch.manual_seed(0)
    r, ci, co = 6, 3, 4
    coords = _voxels([40, 25], r, seed=4)
    feats = torch.randn(len(coords), ci)
    conv = SparseConv3d(ci, co)
    out = conv(SparseVoxels(feats, coords)).feats
    dense = torch.zeros(2, ci, r, r, r)
    dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    weight = conv.weight.permute(0, 4, 1, 2, 3)  # (Co, Ci, kx, ky, kz)
    want = F.conv3d(dense, weight, conv.bias, padding=1)
    want = want[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_spatial_channel_round_trip() -> None:
    coords = _voxels([30, 20], 8, seed=5)
    x = SparseVoxels(torch.randn(len(coords), 3), coords)
    down = spatial_to_channel(x)
    assert down.feats.shape[1] == 24 and torch.equal(down.coords[:, 1:], torch.unique(down.coords, dim=0)[:, 1:])
    back = channel_to_spatial(down)  # paired: the original voxels, in their order
    assert torch.equal(back.coords, coords) and torch.equal(back.feats, x.feats)
    # unpaired, from the subdivision mask: the same voxel set (parent-major order)
    fresh = SparseVoxels(down.feats, down.coords)
    rebuilt = channel_to_spatial(fresh, down.cache["subdivision"])
    key = lambda c: c[:, 0] * 10**6 + c[:, 1] * 10**4 + c[:, 2] * 100 + c[:, 3]
    order, want = torch.argsort(key(rebuilt.coords)), torch.argsort(key(coords))
    assert torch.equal(rebuilt.coords[order], coords[want])
    assert torch.equal(rebuilt.feats[order], x.feats[want])


def test_debug_shape_vae_round_trip_shapes() -> None:
    torch.manual_seed(0)
    enc, dec = shape_encoder("debug"), shape_decoder("debug")
    coords = _voxels([60, 40], 64, seed=6)
    vertices = SparseVoxels(torch.rand(len(coords), 3), coords)
    intersected = vertices.replace((torch.rand(len(coords), 3) > 0.5).float())
    z, mean, logvar = enc(vertices, intersected, return_raw=True)
    assert z.feats.shape[1] == 8 and int(z.coords[:, 1:].max()) < 16 and mean.shape == logvar.shape
    dec.eval()
    with torch.no_grad():
        h = dec(z)  # encoder structure reused: the input voxels come back
        assert torch.equal(h.coords, coords) and h.feats.shape == (len(coords), 7)
        h2, subs = dec(SparseVoxels(z.feats, z.coords), return_subs=True)  # predicted structure
    assert h2.feats.shape[1] == 7 and len(subs) == 2
    vertices_out, inter_logits, quad = dec.fields(h)
    assert vertices_out.shape == (len(coords), 3) and inter_logits.shape == (len(coords), 3) and quad.shape[1] == 1
    dec.train()
    h3, subs_gt, subs = dec(z)
    assert [s.shape for s in subs_gt] == [s.feats.shape for s in subs]
