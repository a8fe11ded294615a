"""Stage-2 targets beside a data build: fine dual grid + shape latent per asset, joined to its pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from know3d.core.shards import ShardConfig, write_index
from know3d.rendering.shards import plan_shards, write_shard
from know3d.training.generator.dual_grid import DualGrid, coarse_occupancy, mesh_to_dual_grid
from know3d.training.generator.occupancy import occupancy_from_mesh, unit_cube_mesh
from know3d.training.generator.shape_targets import (
    ShapeTargetStore,
    build_shape_targets,
    is_shape_store,
    quantized_grid,
    stage1_consistency,
)
from know3d.training.generator.shape_vae import SHIPPED_SHAPE_VAE, ShapeVAE, save_shape_vae, shape_encoder

RES = 64  # the debug shape VAE's fine grid: latent 16³, 8 channels


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The sparse encoder is a loop of small GEMMs: one thread is fastest on a shared CPU (2 threads
    on 2 busy cores were up to 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vae(seed: int = 0, std: float = 1.0) -> ShapeVAE:
    """The debug encoder with random weights and a trivial normalization (no trained VAE needed)."""
    torch.manual_seed(seed)
    return ShapeVAE(shape_encoder("debug").eval(), None, RES, torch.zeros(8), torch.full((8,), std))


def _summary(template: dict, work: Path, name: str, uri: Path) -> dict:
    """A rendered asset's asset.json for ``uri`` (its views are never read by the target pass)."""
    from know3d.rendering.assets import file_sha256

    sha = file_sha256(uri)
    summary = {**template, "key": f"local:{name}", "uri": str(uri), "sha256": sha}
    folder = work / sha[:2] / sha
    folder.mkdir(parents=True)
    (folder / "asset.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bad_dir: Path) -> Path:
    """A data build of 2 rendered procedural assets (mug, chair), plus 2 assets its work folder
    lists that cannot be converted: a truncated GLB (from ../shared/assets/bad) and a degenerate
    mesh (one zero-area triangle: no surface crosses a grid edge)."""
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource
    from tests.test_annotation import _render

    out = tmp_path_factory.mktemp("shape") / "ds"
    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=2), out / "procedural").discover()
    fingerprint = "fp0"
    work = out / "work" / fingerprint
    summaries = _render([Path(r.uri) for r in records], work, 32, [r.to_json() for r in records])
    entries = [write_shard(work, out, plan) for plan in plan_shards(work, summaries, ShardConfig(val_fraction=0), 0)]
    write_index(out, entries, {"render_fingerprint": fingerprint})
    files = out / "local"
    files.mkdir()
    shutil.copyfile(bad_dir / "truncated_duck.glb", files / "truncated_duck.glb")
    line = trimesh.Trimesh(np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]]), np.array([[0, 1, 2]]), process=False)
    line.export(files / "collinear.glb")
    _summary(summaries[0], work, "truncated_duck", files / "truncated_duck.glb")
    _summary(summaries[0], work, "collinear", files / "collinear.glb")
    return out


@pytest.fixture(scope="module")
def built(dataset: Path) -> tuple[ShapeTargetStore, dict, dict]:
    store = ShapeTargetStore(dataset, _vae())
    counts, failures = build_shape_targets(store)
    return store, counts, failures


def _asset(dataset: Path, sha: str) -> Path:
    from know3d.rendering.assets import file_sha256

    return next(p for p in (dataset / "procedural").rglob("*.glb") if file_sha256(p) == sha)


def test_store_round_trip(dataset: Path, built):
    from safetensors import safe_open

    store, counts, _ = built
    assert counts == {"encoded": 2, "failed": 2}
    assert store.root.name.startswith(f"shape-r{RES}-") and store.root.parent == dataset / "targets"
    files = sorted(store.root.glob("*/*.safetensors"))
    assert len(files) == 2
    with safe_open(str(files[0]), framework="np") as f:
        meta = f.metadata()
        dtypes = {name: (f.get_tensor(name).dtype, f.get_tensor(name).shape) for name in f.keys()}
    assert meta == {"kind": "shape", "resolution": "64", "latent_resolution": "16", "encoder": store.encoder}
    assert dtypes["coords"][0] == np.int16 and dtypes["feats"] == (np.float32, (dtypes["coords"][1][0], 8))
    assert dtypes["grid_coords"][0] == np.int16 and dtypes["grid_vertices"][0] == np.uint8
    assert dtypes["grid_flags"] == (np.uint8, (dtypes["grid_coords"][1][0], 1))

    sha = files[0].stem
    entry = store.get(sha)
    vertices, faces = unit_cube_mesh(_asset(dataset, sha))
    truth = mesh_to_dual_grid(vertices, faces, RES)
    grid = entry["grid"]
    assert np.array_equal(grid.coords, truth.coords) and np.array_equal(grid.edge_flags, truth.edge_flags)
    assert np.abs(grid.vertices - truth.vertices).max() <= 0.5 / 255 + 1e-6  # uint8 on disk
    # the latent is the encoding of the stored (quantized) grid, on the grid's own 16³ reduction
    coords, feats = store.vae.encode(quantized_grid(truth))
    assert np.array_equal(entry["coords"], coords) and np.allclose(entry["feats"], feats.numpy(), atol=1e-6)
    assert entry["feats"].dtype == np.float32 and entry["coords"].dtype == np.int64
    assert np.array_equal(
        coarse_occupancy(entry["coords"], 16, 16), coarse_occupancy(grid.coords, RES, 16)
    )  # the latent sites are the fine voxels reduced by 4
    # what put returned is what get reads back
    again = ShapeTargetStore(dataset, _vae()).put(sha, truth)
    assert np.array_equal(again["coords"], entry["coords"]) and np.array_equal(again["feats"], entry["feats"])
    assert np.array_equal(again["grid"].vertices, entry["grid"].vertices)


def test_bad_assets_fail_by_name_and_the_others_are_stored(built):
    store, counts, failures = built
    assert counts["encoded"] == 2 and set(failures) == {"local:truncated_duck", "local:collinear"}
    assert failures["local:truncated_duck"].startswith("truncated_duck.glb: ")
    assert "truncated" in failures["local:truncated_duck"]
    assert (
        failures["local:collinear"].startswith("collinear.glb: ") and "empty dual grid" in failures["local:collinear"]
    )


def test_resume_skips_what_is_stored(dataset: Path, built):
    store, _, _ = built
    stamps = {p: p.stat().st_mtime_ns for p in store.root.rglob("*.safetensors")}
    again = ShapeTargetStore(dataset, _vae())
    assert again.root == store.root
    counts, failures = build_shape_targets(again)
    assert counts == {"cached": 2, "failed": 2} and len(failures) == 2
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*.safetensors")} == stamps
    assert not [p for p in store.root.rglob("*") if p.name.endswith(".tmp")]
    # another encoder or another latent normalization: another store
    assert ShapeTargetStore(dataset, _vae(seed=1)).root != store.root
    assert ShapeTargetStore(dataset, _vae(std=2.0)).root != store.root


def test_generator_pairs_yield_shape_records(dataset: Path, built, tmp_path: Path):
    from know3d.training.generator.data import GeneratorPairs

    store, _, _ = built
    pairs = GeneratorPairs(dataset, store.root, "none")
    assert pairs.stage == "shape" and len(pairs) == 12 and not pairs.skipped  # 2 assets x 6 pairs
    record = pairs[0]
    assert "latent" not in record and "occupancy" not in record and record["condition"] is None
    coords, feats, grid = record["shape_coords"], record["shape_feats"], record["grid"]
    assert coords.dtype == torch.int64 and coords.ndim == 2 and coords.shape[1] == 3
    assert feats.dtype == torch.float32 and feats.shape == (len(coords), 8)
    assert int(coords.min()) >= 0 and int(coords.max()) < 16
    assert isinstance(grid, DualGrid) and grid.coords.shape == grid.vertices.shape == grid.edge_flags.shape
    assert grid.edge_flags.dtype == bool and grid.edge_flags.any() and int(grid.coords.max()) < RES
    entry = store.get(record["asset"])
    assert torch.equal(coords, torch.from_numpy(entry["coords"])) and torch.equal(
        feats, torch.from_numpy(entry["feats"])
    )
    # told apart by the entries' kind when the folder has another name
    renamed = tmp_path / "custom"
    shutil.copytree(store.root, renamed)
    assert is_shape_store(renamed) and GeneratorPairs(dataset, renamed, "none").stage == "shape"
    plain = tmp_path / "r32-0123456789abcdef"
    plain.mkdir()
    assert not is_shape_store(plain)


def test_generator_pairs_keep_stage_one_records(dataset: Path):
    from know3d.training.generator.data import GeneratorPairs
    from know3d.training.generator.ss_vae import SSVae, SSVaeConfig, build
    from know3d.training.generator.targets import TargetStore, build_targets

    torch.manual_seed(0)
    cfg = SSVaeConfig.debug()
    store = TargetStore(dataset, SSVae(build("encoder", cfg).eval(), None, cfg))
    # stage 1 voxelizes the zero-area triangle (surface voxels); stage 2 finds no crossed edge
    assert build_targets(store)[0] == {"encoded": 3, "failed": 1}
    pairs = GeneratorPairs(dataset, store.root, "none")
    assert pairs.stage == "ss" and len(pairs) == 12
    record = pairs[0]
    assert record["latent"].shape == (8, 16, 16, 16) and record["occupancy"].shape == (32, 32, 32)
    assert "shape_coords" not in record and "grid" not in record


def test_data_targets_stage_shape_command(dataset: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    vae = _vae(seed=3)
    folder = save_shape_vae(vae, tmp_path / "vae")
    res = CliRunner().invoke(
        app,
        ["data", "targets", "--dataset", str(dataset), "--stage", "shape", "--shape-vae", str(folder)],
        env={"COLUMNS": "400"},
    )
    assert res.exit_code == 0, res.output
    assert "2 encoded, 2 failed" in res.output and "truncated_duck.glb" in res.output
    root = ShapeTargetStore(dataset, vae).root
    assert f"shape targets -> {root}" in " ".join(res.output.split()) and len(list(root.rglob("*.safetensors"))) == 2

    empty = tmp_path / "no-weights"
    empty.mkdir()
    res = CliRunner().invoke(
        app, ["data", "targets", "--dataset", str(dataset), "--stage", "shape", "--shape-vae", str(empty)]
    )
    assert res.exit_code == 2 and "no-weights" in res.output and "Traceback" not in res.output
    shape = ["data", "targets", "--dataset", str(dataset), "--stage", "shape", "--shape-vae", str(folder)]
    res = CliRunner().invoke(app, [*shape, "--shape-resolution", "32"])
    assert res.exit_code == 0 and "2 encoded, 2 failed" in res.output
    assert (dataset / "targets" / f"shape-r32-{ShapeTargetStore(dataset, vae).encoder}").is_dir()
    res = CliRunner().invoke(app, [*shape, "--shape-resolution", "30"])  # not a multiple of the 4x reduction
    assert res.exit_code == 2 and "multiple" in res.output
    res = CliRunner().invoke(app, ["data", "targets", "--dataset", str(dataset), "--stage", "slat"])
    assert res.exit_code == 2 and "--stage" in res.output


@pytest.mark.skipif(not (SHIPPED_SHAPE_VAE / "encoder.safetensors").is_file(), reason="debug shape VAE not shipped")
def test_data_targets_stage_shape_with_the_shipped_debug_vae(dataset: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app
    from know3d.training.generator.shape_vae import load_shape_vae

    res = CliRunner().invoke(app, ["data", "targets", "--dataset", str(dataset), "--stage", "shape"])
    assert res.exit_code == 0, res.output
    store = ShapeTargetStore(dataset, load_shape_vae("debug", parts=("encoder",)))
    assert store.latent_resolution == 16 and len(list(store.root.rglob("*.safetensors"))) == 2


def test_stage1_consistency_on_the_procedural_assets(tmp_path: Path):
    """Stage 1's voxelized structure against the shape latents' coordinates (module docstring:
    1.0 on all six procedural kinds; >= 0.998 on the real test assets)."""
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource

    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=6), tmp_path).discover()
    assert len({r.to_json()["meta"]["category"] for r in records}) == 6
    debug, same = [], []
    for record in records:
        vertices, faces = unit_cube_mesh(Path(record.uri))
        grid = mesh_to_dual_grid(vertices, faces, RES)
        occupancy32 = occupancy_from_mesh(vertices, faces, 32)
        debug.append(stage1_consistency(grid.coords, RES, occupancy32.coords, 32, latent_resolution=16))
        same.append(stage1_consistency(grid.coords, RES, occupancy_from_mesh(vertices, faces, RES).coords, RES))
    assert min(debug) >= 0.99 and min(same) >= 0.99, (debug, same)


def test_stage1_consistency_is_an_iou():
    coords = np.array([[0, 0, 0], [7, 7, 7]])
    assert stage1_consistency(coords, 8, coords // 2, 4) == 1.0
    assert stage1_consistency(coords, 8, np.array([[0, 0, 0]]), 4) == 0.5
    assert stage1_consistency(np.zeros((0, 3), int), 8, np.zeros((0, 3), int), 4) == 1.0
    with pytest.raises(ValueError, match="multiple"):
        stage1_consistency(coords, 8, coords, 8, latent_resolution=3)
