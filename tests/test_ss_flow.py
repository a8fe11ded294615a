"""TRELLIS.2's sparse-structure flow DiT and the Know3D H branch: key conformance, the branch's
zero start, loading."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from know3d.training.generator.ss_flow import (
    FULL_HIDDEN_CHANNELS,
    SSFlowConfig,
    SSFlowLoadError,
    SSFlowModel,
    is_branch_key,
    load_ss_flow,
    official_keys,
    save_ss_flow,
    ss_flow_key_shapes,
    state_dict_shapes,
)

REPO = Path(__file__).resolve().parents[1]
# the same places conftest / test_ss_vae look: <repo>/shared/reference or ../shared/reference
REFERENCE = next((p for p in (REPO / "shared" / "reference", REPO.parent / "shared" / "reference") if p.is_dir()), REPO)


def _reference_keys() -> dict:
    path = REFERENCE / "trellis2_ss_flow_1_3B.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def _inputs(cfg: SSFlowConfig, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    r = cfg.resolution
    x = torch.randn(batch, cfg.in_channels, r, r, r, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    cond = torch.randn(batch, 5, cfg.cond_channels, generator=g)
    hidden = torch.randn(batch, 6, cfg.hidden_channels or 1, generator=g)
    return x, t, cond, hidden


def _randomized(model: SSFlowModel, seed: int = 0) -> SSFlowModel:
    """Every official float parameter random (the zero-initialized ones would hide mistakes);
    the branch keeps its initialization."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_branch_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() < 2 or "gamma" in name else 0.0))
    return model


@pytest.fixture(scope="module")
def debug_pair() -> tuple[SSFlowModel, SSFlowModel]:
    """(base, branched) debug-size models with RoPE (the full size's positions; the debug config
    itself uses absolute ones); the branched one holds the base's weights."""
    cfg = replace(SSFlowConfig.debug(), pe_mode="rope")
    torch.manual_seed(0)
    base = _randomized(SSFlowModel(cfg.base())).eval()
    branched = SSFlowModel(cfg).eval()
    result = branched.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(is_branch_key(k) for k in result.missing_keys)
    return base, branched


# --------------------------------------------------------------------------- keys


def test_full_size_plain_model_matches_reference_keys() -> None:
    ref = _reference_keys()
    mine = ss_flow_key_shapes(branch=False)
    missing = sorted(set(ref["keys"]) - set(mine))
    unexpected = sorted(set(mine) - set(ref["keys"]))
    mismatched = {k: (ref["keys"][k], mine[k]) for k in set(ref["keys"]) & set(mine) if ref["keys"][k] != mine[k]}
    assert not (missing or unexpected or mismatched), (missing[:10], unexpected[:10], list(mismatched.items())[:10])
    assert list(mine) == list(ref["keys"])  # same order too
    assert len(mine) == ref["num_keys"] == 641
    with torch.device("meta"):
        model = SSFlowModel(SSFlowConfig.full())
    assert sum(p.numel() for p in model.parameters()) == ref["param_count"]
    assert model.rope_phases.dtype == torch.complex64 and list(model.rope_phases.shape) == [4096, 64]


def test_full_size_branched_model_extends_reference_keys() -> None:
    ref = _reference_keys()
    mine = ss_flow_key_shapes(branch=True)
    assert {k: mine[k] for k in ref["keys"]} == ref["keys"]
    extra = [k for k in mine if k not in ref["keys"]]
    assert extra and all(is_branch_key(k) for k in extra)
    assert not any(is_branch_key(k) for k in ref["keys"])
    assert mine["know3d_hidden_proj.weight"] == [1536, FULL_HIDDEN_CHANNELS]  # shared by the blocks
    assert mine["blocks.29.know3d_out.weight"] == [1536, 1536]
    assert mine["blocks.0.know3d_cross_attn.to_kv.weight"] == [3072, 1536]
    assert "blocks.0.know3d_cross_attn.q_rms_norm.gamma" in mine
    assert official_keys(SSFlowConfig.full(FULL_HIDDEN_CHANNELS)) == ref["keys"]


def test_is_branch_key() -> None:
    assert is_branch_key("blocks.3.know3d_cross_attn.to_q.weight")
    assert is_branch_key("know3d_hidden_proj.bias")
    assert not is_branch_key("blocks.3.cross_attn.to_q.weight")
    assert not is_branch_key("rope_phases")


def test_config_json_round_trip_and_upstream_format() -> None:
    cfg = SSFlowConfig.debug()
    assert SSFlowConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    upstream = {"name": "SparseStructureFlowModel", "args": {**SSFlowConfig.full().model_args(), "dtype": "bfloat16"}}
    assert SSFlowConfig.from_json(upstream) == SSFlowConfig.full()
    assert SSFlowConfig.from_json({"models": {"denoiser": upstream}}) == SSFlowConfig.full()
    with pytest.raises(ValueError, match="unknown"):
        SSFlowConfig.from_json({"bogus": 1})
    with pytest.raises(ValueError, match="not a SparseStructureFlowModel"):
        SSFlowConfig.from_json({"name": "SLatFlowModel", "args": {}})


# --------------------------------------------------------------------------- forward / branch


def test_debug_forward_shape(debug_pair) -> None:
    base, branched = debug_pair
    x, t, cond, hidden = _inputs(branched.cfg, batch=2)
    with torch.no_grad():
        assert base(x, t, cond).shape == x.shape
        assert branched(x, t, cond, hidden).shape == x.shape


def test_branch_at_init_equals_base_exactly(debug_pair) -> None:
    base, branched = debug_pair
    x, t, cond, hidden = _inputs(branched.cfg)
    with torch.no_grad():
        want = base(x, t, cond)
        assert torch.equal(branched(x, t, cond, hidden), want)
        assert torch.equal(branched(x, t, cond, torch.zeros_like(hidden)), want)  # dropped H (CFG)
        assert torch.equal(branched(x, t, cond, hidden * 100), want)


def test_branch_reads_h_once_its_output_is_nonzero(debug_pair) -> None:
    base, branched = debug_pair
    model = SSFlowModel(branched.cfg).eval()
    model.load_state_dict(branched.state_dict())
    with torch.no_grad():
        for block in model.blocks:
            block.know3d_out.weight.normal_(std=0.05)
    x, t, cond, hidden = _inputs(model.cfg)
    with torch.no_grad():
        a = model(x, t, cond, hidden)
        b = model(x, t, cond, torch.randn_like(hidden))
        assert not torch.allclose(a, b)
        assert not torch.allclose(a, base(x, t, cond))


def test_hidden_is_checked(debug_pair) -> None:
    base, branched = debug_pair
    x, t, cond, hidden = _inputs(branched.cfg)
    wrong = torch.randn(x.shape[0], 6, branched.cfg.hidden_channels + 1)
    with pytest.raises(ValueError, match=r"expected 24 channels, got 25"):
        branched(x, t, cond, wrong)
    with pytest.raises(ValueError, match="zeros to drop H"):
        branched(x, t, cond)
    with pytest.raises(ValueError, match="no Know3D branch"):
        base(x, t, cond, hidden)
    with pytest.raises(ValueError, match="x must be"):
        base(x[:, :, :8], t, cond)


def _small_branched(use_checkpoint: bool = False) -> SSFlowModel:
    """The debug model on an 8³ grid (512 tokens: backward through CPU attention stays fast)."""
    torch.manual_seed(0)
    cfg = replace(SSFlowConfig.debug(), resolution=8, use_checkpoint=use_checkpoint)
    return _randomized(SSFlowModel(cfg))


def test_gradient_reaches_the_branch() -> None:
    model = _small_branched().train()
    x, t, cond, hidden = _inputs(model.cfg, batch=1)
    model(x, t, cond, hidden).square().mean().backward()
    # zero-initialized output: at step 0 only know3d_out learns (and everything before it waits)
    names = model.branch_parameter_names()
    assert names and all(is_branch_key(n) for n in names)
    params = dict(model.named_parameters())
    for i in range(model.cfg.num_blocks):
        assert params[f"blocks.{i}.know3d_out.weight"].grad.abs().sum() > 0
    assert params["know3d_hidden_proj.weight"].grad.abs().sum() == 0
    # once know3d_out is non-zero every branch parameter gets a gradient
    model.zero_grad()
    with torch.no_grad():
        for block in model.blocks:
            block.know3d_out.weight.normal_(std=0.05)
    model(x, t, cond, hidden).square().mean().backward()
    dead = [n for n in names if params[n].grad is None or params[n].grad.abs().sum() == 0]
    assert not dead, dead


def test_activation_checkpointing_matches() -> None:
    plain, model = _small_branched(), _small_branched(use_checkpoint=True)
    model.load_state_dict(plain.state_dict())
    x, t, cond, hidden = _inputs(model.cfg, batch=1)
    plain(x, t, cond, hidden).square().mean().backward()
    out = model(x, t, cond, hidden)
    out.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bfloat16_torso(debug_pair) -> None:
    base, _ = debug_pair
    model = SSFlowModel(base.cfg).eval()
    model.load_state_dict(base.state_dict())
    model.convert_to(torch.bfloat16)
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].norm2.weight.dtype == torch.float32 and model.rope_phases.is_complex()
    x, t, cond, _ = _inputs(base.cfg)
    with torch.no_grad():
        out, want = model(x, t, cond), base(x, t, cond)
    assert out.dtype == torch.float32
    assert (out - want).abs().max() < 0.1 * want.abs().max()
    # a whole-model cast (bf16 engines) runs too; rope_phases, cast to real by Module.to, is recomputed
    whole = SSFlowModel(base.cfg.base()).eval()
    whole.load_state_dict(base.state_dict())
    with pytest.warns(UserWarning, match="discards the imaginary part"):
        whole.to(torch.bfloat16)
    assert whole.dtype == torch.bfloat16
    with torch.no_grad():
        out = whole(x.bfloat16(), t, cond.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).abs().max() < 0.1 * want.abs().max()


# --------------------------------------------------------------------------- loading


def test_save_load_round_trip(tmp_path: Path, debug_pair) -> None:
    _, branched = debug_pair
    model = SSFlowModel(branched.cfg)
    model.load_state_dict(branched.state_dict())
    with torch.no_grad():
        model.blocks[1].know3d_out.weight.normal_()
    path = save_ss_flow(model, tmp_path)
    assert path.name == "ss_flow.safetensors" and (tmp_path / "ss_flow.json").is_file()
    for source in (tmp_path, path):
        loaded = load_ss_flow(source)
        assert loaded.cfg == model.cfg and not loaded.training and loaded.initialized_keys == ()
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _upstream_layout(tmp_path: Path, model: SSFlowModel, drop: tuple[str, ...] = ("rope_phases",)) -> Path:
    """An official-style folder: ckpts/ss_flow_img_dit_*_bf16.{safetensors,json}, bf16, no buffer."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir(parents=True)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k not in drop}
    save_file(state, str(ckpts / "ss_flow_img_dit_debug_bf16.safetensors"))
    args = {**model.cfg.model_args(), "dtype": "bfloat16"}
    (ckpts / "ss_flow_img_dit_debug_bf16.json").write_text(
        json.dumps({"name": "SparseStructureFlowModel", "args": args})
    )
    return ckpts / "ss_flow_img_dit_debug_bf16.safetensors"


def test_official_checkpoint_into_branched_model(tmp_path: Path, debug_pair) -> None:
    base, _ = debug_pair
    _upstream_layout(tmp_path, base)
    plain = load_ss_flow(tmp_path)
    assert plain.cfg == base.cfg and plain.initialized_keys == ("rope_phases",)
    assert torch.equal(plain.rope_phases, base.rope_phases)
    branched = load_ss_flow(tmp_path, replace(base.cfg, hidden_channels=24), dtype=torch.bfloat16)
    missing = set(branched.initialized_keys) - {"rope_phases"}
    assert missing == {k for k in branched.state_dict() if is_branch_key(k)}
    assert branched.blocks[0].mlp.mlp[0].weight.dtype == torch.bfloat16
    x, t, cond, hidden = _inputs(branched.cfg)
    with torch.no_grad():
        assert torch.equal(branched(x, t, cond, hidden), load_ss_flow(tmp_path, dtype=torch.bfloat16)(x, t, cond))


def test_missing_official_key_is_an_error(tmp_path: Path, debug_pair) -> None:
    base, _ = debug_pair
    weights = _upstream_layout(tmp_path, base, drop=("rope_phases", "blocks.1.cross_attn.to_kv.weight"))
    with pytest.raises(
        SSFlowLoadError,
        match=r"ss_flow_img_dit_debug_bf16\.safetensors.*missing 1: blocks\.1\.cross_attn\.to_kv\.weight",
    ):
        load_ss_flow(weights)
    # also into a branched model: only branch keys may be missing
    with pytest.raises(SSFlowLoadError, match=r"missing 1: blocks\.1\.cross_attn\.to_kv\.weight"):
        load_ss_flow(weights, SSFlowConfig.debug())


def test_unexpected_key_is_an_error(tmp_path: Path, debug_pair) -> None:
    base, _ = debug_pair
    weights = _upstream_layout(tmp_path, base)
    state = load_file(str(weights))
    state["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(SSFlowLoadError, match=r"unexpected 1: blocks\.0\.extra\.weight"):
        load_ss_flow(weights)


def test_branch_checkpoint_into_plain_model_is_an_error(tmp_path: Path, debug_pair) -> None:
    _, branched = debug_pair
    path = save_ss_flow(branched, tmp_path)
    with pytest.raises(SSFlowLoadError, match=r"unexpected \d+: .*know3d_"):
        load_ss_flow(path, SSFlowConfig.debug(None))


def test_wrong_shapes_are_an_error(tmp_path: Path, debug_pair) -> None:
    base, _ = debug_pair
    weights = _upstream_layout(tmp_path, base)
    wider_cond = replace(base.cfg, cond_channels=48)
    with pytest.raises(
        SSFlowLoadError,
        match=r"wrong architecture.*blocks\.0\.cross_attn\.to_kv\.weight \[256, 32\] \(expected \[256, 48\]\)",
    ):
        load_ss_flow(weights, wider_cond)
    other_h = replace(SSFlowConfig.debug(), hidden_channels=24)
    branched = SSFlowModel(other_h)
    path = save_ss_flow(branched, tmp_path / "ours")
    with pytest.raises(
        SSFlowLoadError, match=r"wrong architecture.*know3d_hidden_proj\.weight \[128, 24\] \(expected \[128, 32\]\)"
    ):
        load_ss_flow(path, replace(other_h, hidden_channels=32))


def test_folder_without_safetensors_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "ss_flow_img_dit_1_3B_64_bf16.pt").write_bytes(b"pickle")
    with pytest.raises(SSFlowLoadError, match=rf"{tmp_path}: no SS-flow safetensors"):
        load_ss_flow(tmp_path)
    with pytest.raises(SSFlowLoadError, match="pickled checkpoints are never loaded"):
        load_ss_flow(tmp_path / "ckpts" / "ss_flow_img_dit_1_3B_64_bf16.pt")
    with pytest.raises(SSFlowLoadError, match="no such file or folder"):
        load_ss_flow(tmp_path / "absent")


def test_state_dict_shapes_is_cheap_and_matches_a_real_model() -> None:
    cfg = SSFlowConfig.debug()
    torch.manual_seed(0)
    real = {k: list(v.shape) for k, v in SSFlowModel(cfg).state_dict().items()}
    assert state_dict_shapes(cfg) == real
    assert set(official_keys(cfg)) == {k for k in real if not is_branch_key(k)}
