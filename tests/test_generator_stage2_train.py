"""The Know3D generator's stage 2 learns and runs end to end (issue 16), slow tier, on the tiny data
build of tests/test_generator_train.py plus its shape targets (the shipped debug shape SC-VAE):

* a CPU-size SLat-flow base trained in full (no H) lowers its loss, then the Know3D fine-tune
  (LoRA + H branch) on it samples latents that the shape SC-VAE decodes into the training assets'
  dual grids (fine-voxel IoU and dual-vertex Chamfer against the truth, with the VAE's own
  reconstruction as the ceiling);
* `know3d generate shape --shape-generator` goes image + prompt -> back view -> stage 1 -> stage 2
  -> a mesh extracted from the decoded dual grid; an empty stage-1 structure gives no mesh and a
  reason, never a crash; an image without alpha is refused with its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from know3d.training.engine.metrics import steps_done
from tests.test_generator_train import _cfg, _torchrun, _train, data  # noqa: F401 - the shared data fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def shape_data(data: Path) -> Path:  # noqa: F811
    from know3d.training.generator.shape_targets import ShapeTargetStore, build_shape_targets
    from know3d.training.generator.shape_vae import load_shape_vae

    counts, failures = build_shape_targets(ShapeTargetStore(data, load_shape_vae("debug")))
    assert counts.get("encoded", 0) + counts.get("cached", 0) == 4, (counts, failures)
    return data


@pytest.fixture(scope="module")
def stage2(shape_data: Path, tmp_path_factory, one_rank):
    """Base (full training, no H) -> Know3D LoRA + branch on it; plus a quick stage-1 generator."""
    root = tmp_path_factory.mktemp("runs2")
    base = _cfg(
        shape_data, root / "base", "schedule.validate_every=0", "schedule.max_steps=500",
        config="generator_shape_debug_base.yaml",
    )  # fmt: skip
    _train(base)
    merged = root / "base" / "generator" / "merged"
    know3d = _cfg(shape_data, root / "know3d", f"model.base={merged}", "schedule.max_steps=150",
                  config="generator_shape_debug.yaml")  # fmt: skip
    _train(know3d)
    ss = _cfg(shape_data, root / "ss", "model.base=debug", "schedule.max_steps=3", "schedule.validate_every=0")
    _train(ss)
    return base, know3d, ss


def test_the_multiview_baseline_runs_on_generators_without_the_branch(
    stage2, shape_data: Path, tmp_path: Path, one_rank
):
    """Paper §4.2's baseline: front + generated back view as two image conditions, no H."""
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    base, know3d, ss = stage2
    plain = _cfg(shape_data, tmp_path / "plain", "model.base=debug", "model.condition=none", "schedule.max_steps=3",
                 "schedule.validate_every=0")  # fmt: skip
    _train(plain)
    front = _front(shape_data, tmp_path)
    args = ["generate", "shape", "--image", str(front), "--generator", str(Path(plain.output) / "generator")]
    args += ["--shape-generator", str(Path(base.output) / "generator"), "--output", str(tmp_path / "mv")]
    for mode in ("stochastic", "multidiffusion"):
        res = CliRunner().invoke(app, [*args[:-1], str(tmp_path / mode), "--multiview", mode])
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / mode / "shape.json").read_text())
        assert summary["multiview"] == mode and summary["condition"] == "none"
        assert (tmp_path / mode / "back.png").is_file() and (tmp_path / mode / "occupancy.npz").is_file()
    # a generator that reads H cannot run the image-only baseline
    with_h = ["generate", "shape", "--image", str(front), "--generator", str(Path(ss.output) / "generator")]
    res = CliRunner().invoke(app, [*with_h, "--multiview", "stochastic", "--output", str(tmp_path / "x")])
    assert res.exit_code == 2 and "conditions on images only" in res.output
    res = CliRunner().invoke(app, [*args, "--multiview", "average"])
    assert res.exit_code == 2 and "multi-image mode" in res.output


def _scores(cfg, generator: Path | None):
    """Per training asset: (scores of the sampled latent, scores of the VAE's reconstruction)."""
    from know3d.training.generator.model import load_generator
    from know3d.training.generator.shape_vae import load_shape_vae
    from know3d.training.generator.train import (
        FrozenInputs,
        open_pairs,
        sample_shape_latents,
        shape_scores,
        validation_records,
    )

    codec = load_shape_vae("debug")
    records = validation_records(cfg, open_pairs(cfg, "train"))
    model, _ = load_generator(generator)
    latents = sample_shape_latents(model, FrozenInputs(cfg, torch.device("cpu")), records, cfg, 0)
    out = []
    for record, z in zip(records, latents):
        sampled = shape_scores(codec.decode(record["shape_coords"], z), record["grid"], codec.resolution)
        ceiling = shape_scores(
            codec.decode(record["shape_coords"], record["shape_feats"]), record["grid"], codec.resolution
        )
        out.append((sampled, ceiling))
    return out


def test_stage2_learns_to_sample_the_training_shapes(stage2):
    base, know3d, _ = stage2
    losses = steps_done(Path(base.output) / "metrics.jsonl")
    first, last = np.mean([losses[s] for s in range(1, 21)]), np.mean([losses[s] for s in range(481, 501)])
    assert last < 0.5 * first, (first, last)
    scores = _scores(know3d, Path(know3d.output) / "generator")
    assert len(scores) == 2
    for sampled, ceiling in scores:
        # the decoder rebuilds the fine structure from the latent: what the flow must get right is
        # the latent's values; compare with the VAE's own reconstruction of the true latent
        assert sampled["iou"] >= 0.6 * ceiling["iou"], scores
        assert sampled["chamfer"] <= 3.0 * ceiling["chamfer"] + 0.01, scores
    from know3d.training.generator.model import load_generator

    model, meta = load_generator(Path(know3d.output) / "generator")
    assert meta["model"]["stage"] == "shape" and meta["condition"] == "hidden"
    assert min(blk.know3d_out.weight.abs().max().item() for blk in model.blocks) > 0  # the branch trained


def _front(dataset: Path, tmp_path: Path) -> Path:
    from know3d.core.shards import iter_samples, resolve_shards

    sample = next(iter_samples([Path(u) for u in resolve_shards([str(dataset)], "train")[0]], fields=("front.png",)))
    front = tmp_path / "front.png"
    front.write_bytes(sample["front.png"])
    return front


def test_generate_shape_runs_both_stages_to_a_dual_grid_mesh(stage2, shape_data: Path, tmp_path: Path):
    import trimesh
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    _, know3d, ss = stage2
    front = _front(shape_data, tmp_path)
    args = ["generate", "shape", "--image", str(front), "--generator", str(Path(ss.output) / "generator")]
    args += ["--shape-generator", str(Path(know3d.output) / "generator"), "--prompt", "a zipper"]
    res = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "shape.json").read_text())
    assert summary["stage2"] is True and set(summary["seconds"]) >= {"stage1", "mesh", "backview_and_condition"}
    if summary["mesh"] is None:  # a 3-step stage 1 may leave nothing: then the reason is given
        assert summary["no_mesh_reason"]
    else:
        assert summary["mesh_from"] == "dual_grid" and summary["dual_grid_voxels"] > 0
        mesh = trimesh.load(tmp_path / "out" / "mesh.glb", force="mesh")
        assert len(mesh.faces) > 0 and np.abs(mesh.bounds).max() <= 0.5 + 1.0 / 64
    # an image without alpha: one line naming it, exit 2
    from PIL import Image

    Image.open(front).convert("RGB").save(tmp_path / "rgb.png")
    bad = CliRunner().invoke(app, [*args[:3], str(tmp_path / "rgb.png"), *args[4:], "--output", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "no alpha channel" in bad.output


def test_stage2_on_a_real_structure_and_on_an_empty_one(stage2, shape_data: Path, tmp_path: Path):
    """The chain from a given stage-1 occupancy: the training asset's own (pooled) -> a dual-grid
    mesh; an empty one -> no mesh, the reason, and the other files still written."""
    from know3d.training.generator.generate import ShapeGenerator

    _, know3d, ss = stage2
    chain = ShapeGenerator(Path(ss.output) / "generator", Path(know3d.output) / "generator", device="cpu")
    front = _front(shape_data, tmp_path)

    class Fixed(torch.nn.Module):
        def __init__(self, grid):
            super().__init__()
            self.grid = torch.from_numpy(grid)

        def forward(self, z):
            return (self.grid.float() * 2 - 1)[None, None]

    from know3d.training.generator.train import open_pairs

    record = open_pairs(know3d, "train")[0]
    occupancy = np.zeros((32,) * 3, bool)
    xyz = record["shape_coords"].numpy() * 2  # 16³ latent structure -> 32³ stage-1 cells
    occupancy[tuple(xyz.T)] = True
    chain.decoder = Fixed(occupancy)
    summary = chain.run(front, tmp_path / "real", seed=0)
    assert summary["latent_voxels"] == len(record["shape_coords"])
    assert summary["mesh_from"] == "dual_grid" and (tmp_path / "real" / "mesh.glb").is_file()
    chain.decoder = Fixed(np.zeros((32,) * 3, bool))
    summary = chain.run(front, tmp_path / "empty", seed=0)
    assert summary["mesh"] is None and "empty sparse structure" in summary["no_mesh_reason"]
    assert (tmp_path / "empty" / "back.png").is_file() and (tmp_path / "empty" / "shape.json").is_file()


def test_stage2_resume_reproduces_the_losses(shape_data: Path, tmp_path: Path, one_rank):
    """Stage 2 on the shared engine: a run stopped at step 2 and resumed logs the losses of an
    uninterrupted 4-step run (sparse batches, EMA and clipper state included)."""
    sets = ("model.base=debug", "schedule.checkpoint_every=2", "schedule.log_every=1", "schedule.validate_every=0")
    full = _cfg(shape_data, tmp_path / "full", *sets, "schedule.max_steps=4", config="generator_shape_debug.yaml")
    _train(full)
    part = _cfg(shape_data, tmp_path / "part", *sets, "schedule.max_steps=2", config="generator_shape_debug.yaml")
    _train(part)
    _torchrun(part, 1, "schedule.max_steps=4")  # a fresh process resumes from the checkpoint
    reference, resumed = (
        steps_done(tmp_path / "full" / "metrics.jsonl"),
        steps_done(tmp_path / "part" / "metrics.jsonl"),
    )
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)


# --------------------------------------------------------------------------- front-partial guidance (issue 17)


def _front_files(dataset: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A training pair's front view with its rendered depth and camera (+ depth_scale) as files."""
    from know3d.core.shards import iter_samples, resolve_shards

    urls = [Path(u) for u in resolve_shards([str(dataset)], "train")[0]]
    sample = next(iter_samples(urls, fields=("front.png", "front.depth.png", "json")))
    info = json.loads(sample["json"])
    (tmp_path / "front.png").write_bytes(sample["front.png"])
    (tmp_path / "depth.png").write_bytes(sample["front.depth.png"])
    (tmp_path / "camera.json").write_text(json.dumps({**info["front_camera"], "depth_scale": info["depth_scale"]}))
    return tmp_path / "front.png", tmp_path / "depth.png", tmp_path / "camera.json"


def _front_score(out: Path, points: Path) -> dict[str, float]:
    """Front consistency of ``out/mesh.glb`` against the point map in ``points`` (a front.npz)."""
    from know3d.evaluation.geometry import front_consistency
    from know3d.pipeline.ablation import _mesh_samples

    front = np.load(points)
    return front_consistency(front["points"], _mesh_samples(out / "mesh.glb", "t"), front["view_dir"])


def test_front_guidance_end_to_end(stage2, shape_data: Path, tmp_path: Path):
    """`know3d generate shape --front-guidance depth`: the generated surface lies on the input's
    front far closer than unguided (measured: front -> mesh 0.087 unguided, 0.017 at lambda 4)."""
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    _, know3d, ss = stage2
    front, depth, camera = _front_files(shape_data, tmp_path)
    base = ["generate", "shape", "--image", str(front), "--generator", str(Path(ss.output) / "generator")]
    base += ["--prompt", "a zipper"]
    chain = [*base, "--shape-generator", str(Path(know3d.output) / "generator")]
    files = ["--front-depth", str(depth), "--front-camera", str(camera)]
    res = CliRunner().invoke(app, [*chain, "--output", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, [*chain, "--output", str(tmp_path / "fg"), "--front-guidance", "depth", "--guidance-lambda", "4", *files]
    )
    assert res.exit_code == 0, res.output
    assert "front guidance (depth, lambda ss 0.0 / shape 4.0)" in res.output
    summary = json.loads((tmp_path / "fg" / "shape.json").read_text())
    fg = summary["front_guidance"]
    assert fg["lam_shape"] == 4.0 and fg["unguided_reason"] is None and fg["targets"]["depth_file"] == str(depth)
    assert fg["targets"]["shape_front_voxels"] > 0 and fg["targets"]["ss_mask_cells"] > 0
    assert len(fg["residual_shape"]) == summary["shape_sampler"]["steps"] and not fg.get("residual_ss")
    assert fg["residual_shape"][-1] < 0.5 * fg["residual_shape"][0]  # pulled onto x_fg
    assert summary["mesh_from"] == "dual_grid" and "front_targets" in summary["seconds"]
    points = tmp_path / "fg" / "front.npz"
    plain, guided = _front_score(tmp_path / "plain", points), _front_score(tmp_path / "fg", points)
    assert guided["front_to_mesh"] < 0.5 * plain["front_to_mesh"], (plain, guided)
    assert guided["front_to_mesh"] < 0.04 and guided["front_within@0.02"] > 0.5, guided
    # the vggt source (the in-code stand-in; the camera is still the known one)
    res = CliRunner().invoke(
        app,
        [*chain, "--output", str(tmp_path / "vggt"), "--front-guidance", "vggt", "--front-camera", str(camera),
         "--guidance-set", "vggt_model=debug"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "vggt" / "shape.json").read_text())["front_guidance"]["source"] == "vggt"
    # a bad point map: an error naming the file, or (on_bad_front=unguided) a run with the reason
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint16)).save(tmp_path / "empty.png")
    bad = [
        *chain,
        "--front-guidance",
        "depth",
        "--front-depth",
        str(tmp_path / "empty.png"),
        "--front-camera",
        str(camera),
    ]
    res = CliRunner().invoke(app, [*bad, "--output", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "empty.png: depth map: no pixel with a finite depth > 0" in res.output
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(app, [*bad, "--output", str(tmp_path / "bad"), "--guidance-set", "on_bad_front=unguided"])
    assert res.exit_code == 0 and "front guidance: off" in res.output
    reason = json.loads((tmp_path / "bad" / "shape.json").read_text())["front_guidance"]["unguided_reason"]
    assert "no pixel with a finite depth" in reason and (tmp_path / "bad" / "mesh.glb").is_file()
    # usage errors: guidance without the stage-2 generator, guidance settings without guidance
    res = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "x"), "--front-guidance", "depth", *files])
    assert res.exit_code == 2 and "needs the stage-2 generator" in res.output
    res = CliRunner().invoke(app, [*chain, "--output", str(tmp_path / "x"), "--guidance-lambda", "2"])
    assert res.exit_code == 2 and "need --front-guidance" in res.output
    res = CliRunner().invoke(app, [*chain, "--output", str(tmp_path / "x"), "--front-guidance", "lidar", *files])
    assert res.exit_code == 2 and "source" in res.output


def test_large_lambda_pulls_the_overfit_model_onto_the_front(stage2):
    """The trained (overfit) stage-2 model sampling a training structure: with a large lambda the
    masked latent converges to x_fg, the rest stays the model's (measured on the 2 training assets)."""
    from know3d.training.generator.config import SamplerConfig
    from know3d.training.generator.flow import EulerCfgSampler, SparseSample
    from know3d.training.generator.front_guidance import GuidedEulerSampler, front_half
    from know3d.training.generator.model import load_generator
    from know3d.training.generator.train import FrozenInputs, open_pairs, validation_records

    _, know3d, _ = stage2
    model, meta = load_generator(Path(know3d.output) / "generator")
    frozen = FrozenInputs(know3d, torch.device("cpu"))
    records = validation_records(know3d, open_pairs(know3d, "train"))
    settings = SamplerConfig.model_validate(meta["sampler"])
    for record in records:
        coords = torch.as_tensor(record["shape_coords"])
        cond, hidden = frozen.conditions([record], torch.float32)
        x_fg = torch.randn(1, len(coords), model.cfg.in_channels, generator=torch.Generator().manual_seed(1))
        keep = front_half(coords.numpy(), model.cfg.resolution, np.array([0.0, -1.0, 0.0]))
        mask = torch.from_numpy(keep).float()[None, :, None]
        noise = torch.randn(x_fg.shape, generator=torch.Generator().manual_seed(0))
        wrapped = SparseSample(model, coords)

        def masked_rms(x):
            return float((((x - x_fg) * mask) ** 2).sum() / (mask.sum() * x.shape[-1])) ** 0.5

        plain = EulerCfgSampler(settings, meta["sigma_min"]).sample(wrapped, noise, cond, hidden).samples
        euler = GuidedEulerSampler(settings, meta["sigma_min"], target=x_fg, mask=mask, lam=6.0)
        implicit = GuidedEulerSampler(
            settings, meta["sigma_min"], target=x_fg, mask=mask, lam=1e4, integrator="implicit"
        )
        e = euler.sample(wrapped, noise, cond, hidden).samples
        i = implicit.sample(wrapped, noise, cond, hidden).samples
        assert masked_rms(plain) > 1.0  # x_fg is far from what the model samples by itself
        assert masked_rms(e) < 0.35 * masked_rms(plain), (masked_rms(plain), masked_rms(e))
        assert masked_rms(i) < 1e-3, masked_rms(i)
        # outside the mask the sample is still the model's, near the unguided one
        outside = 1 - mask
        shift = float((((i - plain) * outside) ** 2).sum() / (outside.sum() * x_fg.shape[-1])) ** 0.5
        assert shift < masked_rms(plain), shift


def test_guidance_sweep_writes_the_curve(stage2, shape_data: Path, tmp_path: Path, ray_local):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    _, know3d, ss = stage2
    args = ["eval", "guidance-sweep", "--dataset", str(shape_data), "--split", "train", "--heldout", "1"]
    args += ["--generator", str(Path(ss.output) / "generator"), "--lambdas", "4"]
    args += ["--shape-generator", str(Path(know3d.output) / "generator"), "--output", str(tmp_path / "sweep")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    unguided, guided = record["rows"]
    assert unguided["lambda"] is None and guided["lambda"] == 4.0 and len(record["heldout"]) == 1
    assert guided["meshes"] == unguided["meshes"] == 1 and not guided["errors"]
    assert guided["front_to_mesh"] < 0.5 * unguided["front_to_mesh"], record["rows"]
    assert isinstance(guided["iou"], float) and isinstance(guided["chamfer_l1"], float)
    assert record["saturation"] == 4.0
    assert "| unguided |" in (tmp_path / "sweep" / "guidance_sweep.md").read_text()
    assert (tmp_path / "sweep" / "lam_shape=4" / "pred" / record["heldout"][0]["uid"] / "000.glb").is_file()
