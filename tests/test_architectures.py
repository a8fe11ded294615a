"""`know3d models keys NAME`: the full-size architectures' checkpoint keys, built on meta, equal
the reference lists of the official checkpoints (on-disk names)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from know3d.pipeline.cli import app

REFERENCES = {
    "ss-encoder": "trellis_ss_enc_conv3d_16l8.json",
    "ss-decoder": "trellis_ss_dec_conv3d_16l8.json",
    "dinov3-vitl16": "dinov3_vitl16.json",
    "shape-encoder": "trellis2_shape_enc_next_dc_f16c32.json",
    "shape-decoder": "trellis2_shape_dec_next_dc_f16c32.json",
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_models_keys_prints_the_official_checkpoint_keys(name, shared_reference):
    reference = json.loads((shared_reference / REFERENCES[name]).read_text())
    expected = reference.get("checkpoint_keys") or reference["keys"]
    res = CliRunner().invoke(app, ["models", "keys", name])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == expected


def test_unknown_architecture_names_the_known_ones():
    res = CliRunner().invoke(app, ["models", "keys", "ss-flw"])
    assert res.exit_code == 2
    assert "unknown architecture 'ss-flw'" in res.output and "ss-encoder" in res.output
    listing = CliRunner().invoke(app, ["models", "list"])
    assert listing.exit_code == 0 and all(name in listing.output for name in REFERENCES)


def test_ss_flow_keys_are_the_official_ones_plus_the_branch(shared_reference):
    from know3d.training.generator.ss_flow import is_branch_key

    official = json.loads((shared_reference / "trellis2_ss_flow_1_3B.json").read_text())["keys"]
    res = CliRunner().invoke(app, ["models", "keys", "ss-flow"])
    assert res.exit_code == 0, res.output
    keys = json.loads(res.stdout)
    assert {k: v for k, v in keys.items() if not is_branch_key(k)} == official
    branch = {k: v for k, v in keys.items() if is_branch_key(k)}
    assert branch["know3d_hidden_proj.weight"] == [1536, 4 * 3072]
    assert sum(1 for k in branch if k.startswith("blocks.29.")) > 0 and not set(branch) & set(official)


def test_slat_flow_keys_are_the_official_ones_plus_the_branch(shared_reference):
    from know3d.training.generator.ss_flow import is_branch_key

    official = json.loads((shared_reference / "trellis2_slat_flow_img2shape_1_3B.json").read_text())["keys"]
    res = CliRunner().invoke(app, ["models", "keys", "slat-flow-shape"])
    assert res.exit_code == 0, res.output
    keys = json.loads(res.stdout)
    assert {k: v for k, v in keys.items() if not is_branch_key(k)} == official
    assert keys["know3d_hidden_proj.weight"] == [1536, 4 * 3072]
