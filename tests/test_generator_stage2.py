"""The Know3D generator's stage 2 as trained and shipped (issue 16), fast tier: the sparse flow
loss and the batch-of-one sparse sampler, which weights of the SLat flow train, the branch's
zero-init identity, export/load/merge of a stage-2 generator, stage 1 -> stage 2 structure
pooling, and the front views refused before any model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from know3d.training.generator.config import FlowConfig, GeneratorModelConfig, SamplerConfig
from know3d.training.generator.flow import (
    EulerCfgSampler,
    SparseSample,
    diffuse,
    sparse_flow_loss,
    velocity_target,
)
from know3d.training.generator.generate import check_front, pooled_structure
from know3d.training.generator.model import (
    GeneratorLoadError,
    add_lora,
    build_base,
    load_generator,
    merged_model,
    save_generator,
)
from know3d.training.generator.slat_flow import SLatFlowModel, is_branch_key

H_WIDTH, COND = 24, 32


def _stage2(seed: int = 0, **kw):
    cfg = GeneratorModelConfig(stage="shape", base="debug", **kw)
    model = build_base(cfg, H_WIDTH, COND)
    torch.manual_seed(seed)
    return model, add_lora(model, cfg), cfg


def _sparse(batch: int = 2, seed: int = 1):
    """Two samples of different sizes on a 16³ grid: feats [N, 8], coords [N, 4]."""
    g = torch.Generator().manual_seed(seed)
    coords, sizes = [], (30, 50)[:batch]
    for i, n in enumerate(sizes):
        flat = torch.randperm(16**3, generator=g)[:n]
        xyz = torch.stack([flat // 256, flat // 16 % 16, flat % 16], 1)
        coords.append(torch.cat([torch.full((n, 1), i), xyz], 1))
    coords = torch.cat(coords)
    feats = torch.randn(len(coords), 8, generator=g)
    return feats, coords, torch.randn(batch, 9, COND, generator=g), torch.randn(batch, 5, H_WIDTH, generator=g)


class ZeroModel(torch.nn.Module):
    def forward(self, x, t, cond, hidden=None, coords=None):
        return torch.zeros_like(x)


def test_sparse_flow_loss_is_each_samples_mean_over_its_own_voxels():
    feats, coords, cond, _ = _sparse()
    cfg = FlowConfig(timesteps="uniform", p_uncond=0.0)
    out = sparse_flow_loss(ZeroModel(), feats, coords, cond, generator=torch.Generator().manual_seed(3), config=cfg)
    # the same draws by hand: noise [N, C] first, then uniform t [B]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(feats.shape, generator=g)
    t = torch.rand(2, generator=g)
    torch.testing.assert_close(out.t, t)
    target = velocity_target(feats, noise).square().mean(1)
    expected = torch.stack([target[coords[:, 0] == i].mean() for i in range(2)])
    torch.testing.assert_close(out.per_sample, expected)
    assert out.loss.item() == pytest.approx(expected.mean().item())  # samples weigh equally (30 vs 50 voxels)
    assert ((out.t > 0) & (out.t < 1)).all()


def test_sparse_flow_loss_diffuses_each_voxel_at_its_samples_timestep():
    feats, coords, cond, _ = _sparse()
    seen = {}

    class Spy(ZeroModel):
        def forward(self, x, t, cond, hidden=None, coords=None):
            seen.update(x=x.clone(), t=t.clone(), coords=coords)
            return super().forward(x, t, cond)

    cfg = FlowConfig(timesteps="uniform", p_uncond=0.0)
    out = sparse_flow_loss(Spy(), feats, coords, cond, generator=torch.Generator().manual_seed(5), config=cfg)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(feats.shape, generator=g)
    torch.testing.assert_close(seen["x"], diffuse(feats, out.t[coords[:, 0]], noise))
    torch.testing.assert_close(seen["t"], out.t * 1000)
    assert seen["coords"] is coords


def test_sparse_sample_wrapper_is_the_model_on_one_sample():
    model, _, _ = _stage2()
    model.eval()
    xyz = _sparse(1)[1][:, 1:]
    cond, hidden = torch.randn(1, 9, COND), torch.randn(1, 5, H_WIDTH)
    x = torch.randn(1, len(xyz), 8)
    wrapped = SparseSample(model, xyz)
    t = torch.tensor([400.0])
    with torch.no_grad():
        direct = model(x[0], t, cond, hidden, coords=torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1))
        torch.testing.assert_close(wrapped(x, t, cond, hidden)[0], direct)
        out = EulerCfgSampler(SamplerConfig(steps=3)).sample(wrapped, x, cond, hidden).samples
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)


def test_stage2_lora_and_branch_are_the_only_trainable_weights_and_start_as_identity():
    model, params, _ = _stage2()
    assert isinstance(model, SLatFlowModel)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or is_branch_key(n) for n in names)
    assert any("lora_" in n for n in names) and any(is_branch_key(n) for n in names)
    assert sum(p.numel() for p in params) == sum(p.numel() for n, p in model.named_parameters() if n in names)
    feats, coords, cond, hidden = _sparse()
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        out = model(feats, t, cond, hidden, coords=coords)
        torch.testing.assert_close(out, model(feats, t, cond, 5 * torch.randn_like(hidden), coords=coords))
        plain = build_base(GeneratorModelConfig(stage="shape", base="debug", condition="none"), None, COND)
        plain.load_state_dict(
            {
                k.replace(".base_layer.", "."): v
                for k, v in model.state_dict().items()
                if "lora_" not in k and not is_branch_key(k)
            }
        )
        torch.testing.assert_close(out, plain(feats, t, cond, coords=coords))  # = TRELLIS.2 without the branch


def test_stage2_loss_falls_with_lora_and_branch_training():
    model, params, _ = _stage2()
    feats, coords, cond, hidden = _sparse()
    opt = torch.optim.AdamW(params, lr=3e-3)
    cfg = FlowConfig(timesteps="uniform", p_uncond=0.0)
    losses = []
    for step in range(40):
        g = torch.Generator().manual_seed(step % 4)  # a few fixed draws: the model can fit them
        out = sparse_flow_loss(model, feats, coords, cond, hidden, generator=g, config=cfg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_stage2_generator_exports_loads_and_merges(tmp_path):
    model, _, cfg = _stage2()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    meta = {"model": cfg.model_dump(mode="json"), "flow_config": model.cfg.to_json(), "condition": "hidden"}
    save_generator(model, tmp_path / "g", meta)
    loaded, meta2 = load_generator(tmp_path / "g")
    assert isinstance(loaded, SLatFlowModel) and meta2["model"]["stage"] == "shape"
    feats, coords, cond, hidden = _sparse()
    t = torch.tensor([300.0, 700.0])
    model.eval()
    with torch.no_grad():
        ref = model(feats, t, cond, hidden, coords=coords)
        torch.testing.assert_close(loaded(feats, t, cond, hidden, coords=coords), ref)
        torch.testing.assert_close(
            merged_model(model)(feats, t, cond, hidden, coords=coords), ref, atol=1e-5, rtol=1e-4
        )
    # a stage-1 adapter is not a stage-2 generator
    meta["model"]["stage"] = "ss"
    meta["flow_config"] = build_base(GeneratorModelConfig(base="debug"), H_WIDTH, COND).cfg.to_json()
    (tmp_path / "g" / "know3d_generator.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(GeneratorLoadError, match="adapter.safetensors: not the weights"):
        load_generator(tmp_path / "g")


def test_pooled_structure_is_a_max_pool_of_the_occupancy():
    grid = np.zeros((32, 32, 32), bool)
    grid[0, 0, 0] = grid[5, 6, 7] = grid[31, 31, 30] = True
    assert pooled_structure(grid, 16).tolist() == [[0, 0, 0], [2, 3, 3], [15, 15, 15]]
    assert pooled_structure(grid, 32).shape == (3, 3)
    assert pooled_structure(np.zeros((32,) * 3, bool), 16).shape == (0, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        pooled_structure(grid, 12)


def test_front_views_without_alpha_or_with_an_empty_mask_are_refused(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[8:24, 8:24] = 255
    Image.fromarray(rgba).save(tmp_path / "ok.png")
    check_front(tmp_path / "ok.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png: no alpha channel"):
        check_front(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"empty\.png: the alpha mask is empty"):
        check_front(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png: not a readable image"):
        check_front(tmp_path / "junk.png")
    with pytest.raises(FileNotFoundError, match="no such image"):
        check_front(tmp_path / "missing.png")


class ViewEcho(torch.nn.Module):
    """Returns the first feature of the (single) view it was given, everywhere."""

    def forward(self, x, t, cond, hidden=None):
        assert cond.shape[0] == 1
        return torch.full_like(x, float(cond[0, 0, 0]))


def test_multi_image_modes_mix_the_views_as_trellis_does():
    from know3d.training.generator.flow import MultiImage

    views = torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    x = torch.zeros(1, 4)
    multi = MultiImage(ViewEcho(), "multidiffusion")
    assert multi(x, torch.tensor([900.0]), views).unique().tolist() == [2.0]  # the mean of both views
    stochastic = MultiImage(ViewEcho(), "stochastic")
    seen = [stochastic(x, torch.tensor([t]), views)[0, 0].item() for t in (900.0, 900.0, 700.0, 700.0, 500.0)]
    assert seen == [1.0, 1.0, 3.0, 3.0, 1.0]  # one view per step, shared by its CFG pair
    with pytest.raises(ValueError, match="multi-image mode"):
        MultiImage(ViewEcho(), "average")
    # through the Euler CFG sampler: zeros (the negative) are view-independent
    out = (
        EulerCfgSampler(SamplerConfig(steps=4, guidance_strength=3.0, guidance_rescale=0.0))
        .sample(multi, x, views)
        .samples
    )
    assert torch.isfinite(out).all()
