"""The TRELLIS sparse-structure VAE: checkpoint conformance, occupancy targets, the debug VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from know3d.training.generator.debug_ss_vae import (
    DebugSSVaeConfig,
    evaluate,
    procedural_occupancies,
    resolve_debug_ss_vae,
)
from know3d.training.generator.occupancy import asset_occupancy, occupancy_from_mesh
from know3d.training.generator.ss_vae import (
    SSDecoder,
    SSEncoder,
    SSVaeConfig,
    SSVaeLoadError,
    build,
    load_ss_vae,
    save_ss_vae,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.mark.parametrize(("part", "name"), [("encoder", "enc"), ("decoder", "dec")])
def test_full_size_matches_reference_keys(part: str, name: str) -> None:
    path = REFERENCE / f"trellis_ss_{name}_conv3d_16l8.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ref = json.loads(path.read_text())
    with torch.device("meta"):
        model = build(part, SSVaeConfig.full())
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(ref["keys"]) - set(mine))
    unexpected = sorted(set(mine) - set(ref["keys"]))
    mismatched = {k: (ref["keys"][k], mine[k]) for k in set(ref["keys"]) & set(mine) if ref["keys"][k] != mine[k]}
    assert not (missing or unexpected or mismatched), (missing[:10], unexpected[:10], list(mismatched.items())[:10])
    assert list(mine) == list(ref["keys"])  # same order too
    assert sum(p.numel() for p in model.parameters()) == ref["param_count"]


def test_debug_shapes_and_sampling() -> None:
    cfg = SSVaeConfig.debug()
    enc, dec = SSEncoder(cfg), SSDecoder(cfg)
    x = (torch.rand(2, 1, cfg.resolution, cfg.resolution, cfg.resolution) > 0.9).float()
    r = cfg.latent_resolution
    z, mean, logvar = enc(x, return_raw=True)
    assert z.shape == mean.shape == logvar.shape == (2, cfg.latent_channels, r, r, r)
    assert torch.equal(z, mean)  # deterministic mean for targets
    sampled = enc(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, mean)
    assert dec(z).shape == x.shape


def test_occupancy_of_a_real_asset(real_dir: Path) -> None:
    occ = asset_occupancy(real_dir / "Duck.glb", 64)
    assert occ.grid.shape == (64, 64, 64) and occ.grid.dtype == bool
    assert 0 < len(occ.coords) == int(occ.grid.sum())
    assert occ.coords.min() >= 0 and occ.coords.max() < 64
    # normalized to the unit cube: the longest side spans the whole grid
    extent = occ.coords.max(0) - occ.coords.min(0)
    assert extent.max() >= 62
    assert np.all(np.abs(occ.positions()) < 0.5)


def test_occupancy_axis_convention() -> None:
    # a small triangle near glTF +y (up) must land at high k (Z-up), one near +x at high i
    tri = np.array([[0, 0, 0], [0.01, 0, 0], [0, 0.01, 0]], dtype=float)
    faces = np.array([[0, 1, 2]])
    up = occupancy_from_mesh(tri + [0.0, 0.0, 0.45], faces, 16)  # already Z-up input
    assert (up.coords[:, 2] == 15).all()
    edge = occupancy_from_mesh(tri + [0.6, 0.0, 0.0], faces, 16)  # clipped into the cube, not dropped
    assert (edge.coords[:, 0] == 15).all()


def test_shipped_debug_vae_reconstructs_heldout(tmp_path: Path) -> None:
    cfg = DebugSSVaeConfig()
    vae = resolve_debug_ss_vae()
    res = vae.cfg.resolution
    heldout, names = procedural_occupancies(tmp_path, cfg.num_train, cfg.num_heldout, res, cfg.asset_seed)
    assert len(names) == cfg.num_heldout
    score = evaluate(vae, heldout)
    assert score >= 0.8, f"held-out IoU {score:.3f}"


def test_load_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SSVaeLoadError, match=r"empty: no encoder safetensors"):
        load_ss_vae(empty, "encoder")
    cfg = SSVaeConfig.debug()
    folder = tmp_path / "ckpt"
    path = save_ss_vae(SSDecoder(cfg), folder, "decoder")
    assert isinstance(load_ss_vae(folder, "decoder"), SSDecoder)
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    del state["out_layer.2.bias"]
    save_file(state, str(path))
    with pytest.raises(SSVaeLoadError, match=r"decoder.safetensors: .*missing 1: out_layer.2.bias"):
        load_ss_vae(folder, "decoder")
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(SSVaeLoadError, match="pickled checkpoints are never loaded"):
        load_ss_vae(tmp_path / "model.pt", "encoder")


def test_gltf_up_is_grid_k(tmp_path: Path) -> None:
    import trimesh

    # a box tall along glTF +y (up), deep along glTF z: Z-up grid -> tall along k, deep along j
    path = tmp_path / "tall.glb"
    path.write_bytes(trimesh.creation.box(extents=(0.2, 1.0, 0.5)).export(file_type="glb"))
    occ = asset_occupancy(path, 32)
    extent = occ.coords.max(0) - occ.coords.min(0) + 1
    assert extent[2] == 32 and extent[0] < extent[1] < extent[2], extent


def test_pixel_shuffle_layout() -> None:
    from know3d.training.generator.ss_vae import pixel_shuffle_3d

    # channel c*8 + a*4 + b*2 + e of cell (d, h, w) lands at (2d + a, 2h + b, 2w + e)
    x = torch.arange(2 * 8 * 2 * 3 * 4, dtype=torch.float32).reshape(1, 16, 2, 3, 4)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 4, 6, 8)
    for c, a, b, e, d, h, w in [(0, 0, 0, 0, 0, 0, 0), (1, 1, 0, 1, 1, 2, 3), (0, 0, 1, 1, 1, 0, 2)]:
        assert y[0, c, 2 * d + a, 2 * h + b, 2 * w + e] == x[0, c * 8 + a * 4 + b * 2 + e, d, h, w]


def test_loads_upstream_layout(tmp_path: Path) -> None:
    # released layout: ckpts/ss_dec_*.safetensors + a json {"name", "args"} with the decoder's channel order
    cfg = SSVaeConfig.debug()
    ckpts = tmp_path / "ckpts"
    dec = SSDecoder(cfg)
    path = save_ss_vae(dec, ckpts, "decoder")
    path.rename(ckpts / "ss_dec_conv3d_debug.safetensors")
    (ckpts / "decoder.json").unlink()
    args = cfg.decoder_args()
    (ckpts / "ss_dec_conv3d_debug.json").write_text(json.dumps({"name": "SparseStructureDecoder", "args": args}))
    loaded = load_ss_vae(tmp_path, "decoder")
    assert loaded.cfg.channels == cfg.channels and loaded.cfg.num_res_blocks == cfg.num_res_blocks
    z = torch.randn(1, cfg.latent_channels, *(cfg.latent_resolution,) * 3)
    with torch.no_grad():
        assert torch.equal(loaded(z), dec.eval()(z))


@pytest.mark.slow
def test_full_size_forward_shapes() -> None:
    cfg = SSVaeConfig.full()
    enc, dec = SSEncoder(cfg).eval(), SSDecoder(cfg).eval()
    with torch.no_grad():
        z = enc(torch.zeros(1, 1, 64, 64, 64))
        assert z.shape == (1, 8, 16, 16, 16)
        assert dec(z).shape == (1, 1, 64, 64, 64)
