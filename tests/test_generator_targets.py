"""Per-asset 3D targets beside a data build, joined to its pairs (issue 14, "stored with the pairs")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from know3d.core.shards import ShardConfig, write_index
from know3d.rendering.shards import plan_shards, write_shard
from know3d.training.generator.occupancy import asset_occupancy
from know3d.training.generator.ss_vae import SSVae, SSVaeConfig, build
from know3d.training.generator.targets import TargetStore, build_targets, generator_records


def _vae(seed: int = 0) -> SSVae:
    torch.manual_seed(seed)
    cfg = SSVaeConfig.debug()
    return SSVae(build("encoder", cfg).eval(), build("decoder", cfg).eval(), cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A data build's layout (work folder, shards, index) from 3 procedural assets, one of them
    with its file gone (as a hub asset whose cache was cleared would be)."""
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource
    from tests.test_annotation import _render

    out = tmp_path_factory.mktemp("gen") / "ds"
    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=3), out / "procedural").discover()
    fingerprint = "fp0"
    work = out / "work" / fingerprint
    summaries = _render([Path(r.uri) for r in records], work, 32, [r.to_json() for r in records])
    entries = [write_shard(work, out, plan) for plan in plan_shards(work, summaries, ShardConfig(val_fraction=0), 0)]
    write_index(out, entries, {"render_fingerprint": fingerprint})
    Path(records[2].uri).rename(Path(records[2].uri).with_suffix(".gone"))
    return out


def test_targets_are_built_once_stored_and_joined_to_every_pair(dataset: Path):
    vae = _vae()
    store = TargetStore(dataset, vae)
    counts, failures = build_targets(store)
    assert counts == {"encoded": 2, "failed": 1}
    (reason,) = failures.values()
    assert "not a local file" in reason
    assert build_targets(store)[0] == {"cached": 2, "failed": 1}  # resumable: nothing re-encoded

    records = list(generator_records(store))
    assert len(records) == 12  # 2 assets with targets x 6 pairs; the third asset's pairs are skipped
    first = records[0]
    assert first["front"].startswith(b"\x89PNG") and first["back"].startswith(b"\x89PNG")
    assert first["latent"].shape == (8, 16, 16, 16) and first["latent"].dtype == np.float32
    sha = next(p.stem for p in store.root.rglob("*.safetensors"))
    stored = store.get(sha)
    asset = next(Path(p) for p in (dataset / "procedural").rglob("*.glb") if sha in _sha_of(p))
    occupancy = asset_occupancy(asset, 32)
    assert np.array_equal(stored["coords"], occupancy.coords) and len(occupancy.coords) > 0
    with torch.no_grad():
        expected = vae.encoder(torch.from_numpy(occupancy.grid.astype(np.float32))[None, None])[0].numpy()
    assert np.allclose(stored["latent"], expected)


def _sha_of(path: Path) -> str:
    from know3d.rendering.assets import file_sha256

    return file_sha256(path)


def test_another_encoder_gets_its_own_store(dataset: Path):
    assert TargetStore(dataset, _vae(0)).root != TargetStore(dataset, _vae(1)).root


def test_a_folder_without_an_index_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no shard index"):
        build_targets(TargetStore(tmp_path, _vae()))


def test_data_targets_command(dataset: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app
    from know3d.training.generator.debug_ss_vae import resolve_debug_ss_vae

    res = CliRunner().invoke(app, ["data", "targets", "--dataset", str(dataset)])
    assert res.exit_code == 0, res.output
    assert "2 encoded, 1 failed" in res.output and "not a local file" in res.output
    store = TargetStore(dataset, resolve_debug_ss_vae())
    assert len(list(store.root.rglob("*.safetensors"))) == 2
    empty = tmp_path / "no-weights"
    empty.mkdir()
    res = CliRunner().invoke(app, ["data", "targets", "--dataset", str(dataset), "--ss-vae", str(empty)])
    assert res.exit_code == 2 and "no-weights" in res.output


def test_generator_loader_joins_pairs_targets_hidden_states_and_front_features(dataset: Path, tmp_path: Path):
    """What the generator trains on, per pair: front view, description/prompt, occupancy, SS latent,
    H (or an ablation variant) and the front's DINOv3 tokens."""
    from know3d.core.shards import resolve_shards
    from know3d.training.debug_models import DEBUG_EDIT_MODEL
    from know3d.training.generator.config import HiddenStatesConfig
    from know3d.training.generator.data import GeneratorDataError, GeneratorPairs
    from know3d.training.generator.dino import front_features
    from know3d.training.generator.hidden_states import build_hidden_cache, cache_folder
    from tests.test_hidden_states import LocalRay

    store = TargetStore(dataset, _vae())
    build_targets(store)
    hidden = HiddenStatesConfig(
        model=DEBUG_EDIT_MODEL,
        image_size=32,
        layers=[0, 1],
        steps=2,
        compute_dtype="float32",
        cache_dir=str(tmp_path / "h"),
        variants=["hidden", "vae_latent"],
        prompt_probability=1.0,
    )
    urls, _ = resolve_shards([str(dataset)], "train")
    assert build_hidden_cache(hidden, urls, LocalRay()) == {"encoded": 18}
    folder = cache_folder(hidden)
    # drop the H of one pair whose asset has targets (a pair without targets is skipped for that)
    first_key = GeneratorPairs(dataset, store.root, "hidden", folder).refs[0].key
    (folder / f"{first_key}.safetensors").unlink()

    dino = front_features("debug", 32)
    pairs = GeneratorPairs(dataset, store.root, "hidden", folder, dino=dino)
    assert len(pairs) == 11 and dict(pairs.skipped) == {"no_target": 6, "no_condition": 1}
    record = pairs[0]
    assert record["latent"].shape == (8, 16, 16, 16) and record["occupancy"].shape == (32, 32, 32)
    assert record["occupancy"].sum() > 0 and record["front"].mode == "RGBA"
    assert record["condition"].shape == (16, 2 * 32) and record["condition"].dtype == torch.float32
    assert record["components"] == [] and record["prompt"] == hidden.instruction  # no annotation here
    assert record["dino"].shape == (9, 32)
    assert torch.equal(record["dino"], dino.encode([record["front"]])[0])
    stored = store.get(record["asset"])
    assert np.array_equal(
        np.argwhere(record["occupancy"].numpy()), stored["coords"][np.lexsort(stored["coords"].T[::-1])]
    )
    assert torch.equal(record["latent"], torch.from_numpy(stored["latent"]))

    latent = GeneratorPairs(dataset, store.root, "vae_latent", folder)
    assert latent[0]["condition"].shape == (16, 16) and "dino" not in latent[0]
    plain = GeneratorPairs(dataset, store.root, "none")
    assert len(plain) == 12 and plain[0]["condition"] is None
    with pytest.raises(GeneratorDataError, match="no 'dino_back' tensor"):
        GeneratorPairs(dataset, store.root, "dino_back", folder)[0]
    with pytest.raises(GeneratorDataError, match="needs the hidden-state cache folder"):
        GeneratorPairs(dataset, store.root, "hidden", tmp_path / "nowhere")
    with pytest.raises(GeneratorDataError, match="no target store"):
        GeneratorPairs(dataset, tmp_path / "none", "none")
    with pytest.raises(GeneratorDataError, match="not one of"):
        GeneratorPairs(dataset, store.root, "H")


def test_training_without_a_dataset_is_refused_by_the_cli_and_under_torchrun(tmp_path: Path, one_rank):
    """An empty ``data.dataset`` would read the current folder: ``know3d train generator`` and the
    torchrun entry point (which skips the driver's checks) both refuse it in one line."""
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app
    from know3d.training.engine.launch import torchrun_main
    from know3d.training.generator.config import TrainGeneratorConfig
    from know3d.training.generator.train import run_worker

    config = Path(__file__).resolve().parents[1] / "configs" / "generator_ss_debug.yaml"
    sets = ["--set", f"output={tmp_path / 'run'}", "--set", "data.dataset=", "--set", "mlflow.enabled=false"]
    res = CliRunner().invoke(app, ["train", "generator", str(config), *sets])
    assert res.exit_code == 2 and "data.dataset is empty" in res.output, res.output
    with pytest.raises(ValueError, match=r"data.dataset is empty: .*--set data.dataset="):
        torchrun_main(run_worker, TrainGeneratorConfig, prog="torchrun", argv=[str(config), *sets])
    assert not (tmp_path / "run" / "checkpoints").exists()
