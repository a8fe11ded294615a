"""The Know3D generator's stage 1 as trained and shipped (issue 15), fast tier: which weights train,
export/load/merge, the trainer's data order and clipping hook, occupancy metrics and mesh export,
and the bad inputs (wrong architecture, H of the wrong width, a missing decoder)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from know3d.training.data import StreamState
from know3d.training.generator.config import GeneratorModelConfig
from know3d.training.generator.model import (
    ADAPTER_FILE,
    GeneratorLoadError,
    add_lora,
    build_base,
    load_decoder,
    load_generator,
    merged_model,
    save_generator,
)
from know3d.training.generator.occupancy import (
    occupancy_chamfer,
    occupancy_from_mesh,
    occupancy_iou,
    occupancy_mesh,
)
from know3d.training.generator.ss_flow import is_branch_key
from know3d.training.generator.ss_vae import SSVaeLoadError
from know3d.training.generator.train import IndexStream, clip_threshold, param_grad_norm

H_WIDTH, COND = 24, 32


def _model(cfg: GeneratorModelConfig | None = None, seed: int = 0):
    cfg = cfg or GeneratorModelConfig(base="debug")
    model = build_base(cfg, H_WIDTH, COND)
    torch.manual_seed(seed)
    return model, add_lora(model, cfg), cfg


def _inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 8, 16, 16, 16, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, 9, COND, generator=g),
        torch.randn(batch, 5, H_WIDTH, generator=g),
    )


def _perturb(model) -> None:
    """Move the zero-initialized LoRA B and branch output so the test sees their effect."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "know3d_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_only_the_lora_and_the_branch_train():
    model, params, _ = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or is_branch_key(n) for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    lora_on = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert lora_on == {
        f"blocks.{i}.{m}"
        for i in range(len(model.blocks))
        for m in ("self_attn.to_qkv", "self_attn.to_out", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.to_out")
    }  # the backbone's attention linears, never the branch's own attention
    assert any(is_branch_key(n) for n in trainable)
    x, t, c, h = _inputs()
    model(x, t, c, h).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    full, params_full, _ = _model(GeneratorModelConfig(base="debug", finetune="full"))
    assert len(params_full) == len(list(full.parameters()))


def test_export_load_and_merge_reproduce_the_model(tmp_path: Path):
    model, _, cfg = _model()
    _perturb(model)
    model.eval()
    meta = {"model": cfg.model_dump(mode="json"), "flow_config": model.cfg.to_json()}
    save_generator(model, tmp_path, meta)
    loaded, read = load_generator(tmp_path)
    x, t, c, h = _inputs()
    with torch.no_grad():
        expected = model(x, t, c, h)
        assert torch.equal(loaded(x, t, c, h), expected)
        torch.testing.assert_close(merged_model(model)(x, t, c, h), expected, atol=1e-5, rtol=1e-5)
    assert read["flow_config"]["hidden_channels"] == H_WIDTH

    other = tmp_path / "rank8"
    small, _, small_cfg = _model(GeneratorModelConfig(base="debug", lora_rank=8))
    save_generator(small, other, meta)  # the metadata says rank 64; the weights are rank 8
    with pytest.raises(GeneratorLoadError, match="not the weights of this generator architecture.*shape mismatch"):
        load_generator(other)
    (tmp_path / ADAPTER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(GeneratorLoadError, match="unreadable"):
        load_generator(tmp_path)
    with pytest.raises(GeneratorLoadError, match="not an exported generator"):
        load_generator(tmp_path / "nowhere")


def test_hidden_of_the_wrong_width_and_a_missing_decoder_are_refused(tmp_path: Path):
    model, _, _ = _model()
    x, t, c, _ = _inputs()
    with pytest.raises(ValueError, match=f"expected {H_WIDTH} channels, got 7"):
        model(x, t, c, torch.zeros(2, 5, 7))
    with pytest.raises(SSVaeLoadError, match="no-decoder: no such file or folder"):
        load_decoder(str(tmp_path / "no-decoder"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "ss_dec_conv3d_16l8_fp16.pt").write_bytes(b"x")
    with pytest.raises(SSVaeLoadError, match="safetensors"):
        load_decoder(str(tmp_path / "pickled"))


def test_index_stream_is_seeded_disjoint_across_ranks_and_resumes():
    ranks = [IndexStream(10, seed=3, rank=r, world_size=2) for r in range(2)]
    epoch0 = [s.epoch_indices(0) for s in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == 5 and not set(epoch0[0]) & set(epoch0[1])
    assert epoch0[0] != ranks[0].epoch_indices(1)  # a new order every epoch
    state = StreamState()
    run = [ranks[0].next(state) for _ in range(12)]
    assert run[:5] == epoch0[0] and state.epoch == 2 and state.consumed == 2
    resumed = StreamState(epoch=1, consumed=3)
    assert [ranks[0].next(resumed) for _ in range(4)] == run[8:12]
    with pytest.raises(ValueError, match="cannot feed 4 workers"):
        IndexStream(3, 0, 0, 4)


def test_adaptive_threshold_reaches_deepspeed_and_stage0_norm():
    engine = SimpleNamespace(_config=SimpleNamespace(gradient_clipping=1.0), optimizer=SimpleNamespace(clip_grad=1.0))
    clip_threshold(engine, 0.25)
    assert engine._config.gradient_clipping == 0.25 and engine.optimizer.clip_grad == 0.25
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert param_grad_norm([a, b]) == pytest.approx(5.0)
    assert param_grad_norm([torch.nn.Parameter(torch.zeros(1))]) is None


def test_occupancy_iou_chamfer_and_mesh_round_trip():
    grid = np.zeros((32, 32, 32), bool)
    grid[8:20, 10:22, 5:25] = True
    other = np.roll(grid, 2, axis=0)
    assert occupancy_iou(grid, grid) == 1.0
    assert occupancy_iou(grid, other) == pytest.approx(10 / 14)
    assert occupancy_chamfer(grid, grid) == 0.0 and 0 < occupancy_chamfer(grid, other) <= 2 / 32
    assert occupancy_chamfer(grid, np.zeros_like(grid)) == float("inf")
    mesh = occupancy_mesh(grid)
    assert mesh.is_watertight
    from know3d.training.generator.occupancy import GLTF_TO_ZUP

    back = occupancy_from_mesh(np.asarray(mesh.vertices) @ GLTF_TO_ZUP.T, np.asarray(mesh.faces), 32).grid
    # the surface (level 0.5: the faces between occupied and empty voxels) voxelizes back onto the
    # object's boundary: the same extent (upper faces land in the next voxel) and nothing farther
    from scipy.ndimage import binary_dilation

    lo, hi = np.argwhere(back).min(0), np.argwhere(back).max(0)
    assert np.array_equal(lo, [8, 10, 5]) and np.array_equal(hi, [20, 22, 25])
    assert not (back & ~binary_dilation(grid)).any()
    with pytest.raises(ValueError, match="empty"):
        occupancy_mesh(np.zeros_like(grid))


def test_generator_metadata_round_trips_the_model_config(tmp_path: Path):
    model, _, cfg = _model()
    save_generator(model, tmp_path, {"model": cfg.model_dump(mode="json"), "flow_config": model.cfg.to_json()})
    meta = json.loads((tmp_path / "know3d_generator.json").read_text())
    assert GeneratorModelConfig.model_validate(meta["model"]) == cfg
