"""`know3d train backview` end to end: 2 Ray Train workers × DeepSpeed ZeRO-2 (gloo, CPU) on shards
from a data build, reading the latent pre-pass's cache, MLflow, validation grids, LoRA export ->
generate, kill -9 -> resume, and the same body under torchrun (ZeRO-3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from know3d.pipeline.build import run_build
from know3d.pipeline.config import load_config
from know3d.training.config import TrainBackviewConfig
from know3d.training.engine.checkpoint import STATE_FILE
from know3d.training.engine.metrics import steps_done

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lineage_db(tmp_path_factory) -> Path:
    """The MLflow store shared by the build, the training and the evaluation of the lineage test."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local, lineage_db: Path) -> Path:
    """A small data build (procedural assets with part descriptions), like the quickstart's."""
    out = tmp_path_factory.mktemp("data") / "build"
    cfg = load_config(
        None,
        [
            f"output={out}",
            "source.kind=procedural",
            "source.procedural.num_assets=6",
            "render.resolution=64",
            "shard.max_samples=12",
            "shard.val_fraction=0.3",
            f"mlflow.tracking_uri=sqlite:///{lineage_db}",
            "ray.render_concurrency=2",
        ],
    )
    summary = run_build(cfg)
    assert summary.num_failed == 0 and summary.num_samples == 36
    return out


def _train_cfg(shards: Path, out: Path, db: Path, *extra: str) -> TrainBackviewConfig:
    return load_config(
        ROOT / "configs" / "backview_debug.yaml",
        [
            f"output={out}",
            f"data.shards=[{shards}]",
            "data.image_size=32",
            "schedule.max_steps=6",
            "schedule.checkpoint_every=2",
            "schedule.validate_every=3",
            "schedule.log_every=1",
            "schedule.validation_steps=2",
            f"mlflow.tracking_uri=sqlite:///{db}",
            *extra,
        ],
        model=TrainBackviewConfig,
    )


@pytest.fixture(scope="module")
def trained(shards: Path, tmp_path_factory, ray_local, lineage_db: Path):
    from know3d.pipeline.train import run_train_backview

    root = lineage_db.parent
    # with the latent pre-pass (Ray actors encode every train pair once, the workers read the
    # cache): the runs below encode online and must log the same losses
    cfg = _train_cfg(shards, tmp_path_factory.mktemp("train") / "run", lineage_db, "cache.enabled=true")
    metrics = run_train_backview(cfg)
    return root, cfg, metrics


def test_ray_train_deepspeed_zero2_two_workers(trained):
    root, cfg, metrics = trained
    run = Path(cfg.output)
    assert metrics["step"] == 6
    losses = steps_done(run / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(v > 0 for v in losses.values())
    ckpts = sorted(p for p in (run / "ray" / run.name).glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 3  # steps 2, 4, 6 (keep 3)
    last = json.loads((ckpts[-1] / STATE_FILE).read_text())
    assert last["step"] == 6 and last["world_size"] == 2 and len(last["streams"]) == 2
    ds_files = sorted(p.name for p in (ckpts[-1] / "ds").iterdir())
    assert ds_files == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # frozen parameters are not in the checkpoint: only LoRA weights
    import torch

    states = torch.load(ckpts[-1] / "ds" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    names = list(states["module"])
    assert names and all("lora_" in n for n in names)
    assert (run / "validation" / "step_000003.png").is_file() and (run / "validation" / "step_000006.png").is_file()


def test_the_latent_prepass_cached_every_train_pair(trained, shards: Path):
    from know3d.training.latent_cache import cache_folder, load_entry

    _, cfg, _ = trained
    index = json.loads((shards / "shard_index.json").read_text())
    folder = cache_folder(cfg)
    cached = sorted(folder.glob("*.npz"))
    assert len(cached) == index["splits"]["train"]["num_samples"] > 0
    entry = load_entry(folder, cached[0].stem)
    assert entry["front_latent"].shape == entry["back_latent"].shape and entry["front_latent"].dtype == np.float32
    assert entry["prompt_0"].ndim == 2  # one prompt embedding per variant (instruction alone first)


def test_training_logs_to_mlflow(trained):
    import mlflow

    root, cfg, _ = trained
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("know3d-train-backview")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    # one param convention for every stage: the config flattened, what the run adds under run.
    assert run.data.params["lora.rank"] == "8" and run.data.params["run.world_size"] == "2"
    assert run.data.params["seed"] == "0" and run.data.tags["know3d.stage"] == "train.backview"
    assert run.info.run_name == f"train.backview:{Path(cfg.output).name}"
    assert "mlflow.source.git.commit" in run.data.tags or not (ROOT / ".git").exists()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    for key in ("lr", "samples_per_s", "val_loss"):
        assert key in run.data.metrics, key
    assert any(k.startswith("loss_t") for k in run.data.metrics)
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    index = json.loads((Path(cfg.data.shards[0]) / "shard_index.json").read_text())
    assert dataset.digest == index["digest"][:32] and dataset.name == Path(cfg.data.shards[0]).name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert "validation/step_000006.png" in artifacts
    lora = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert "lora/pytorch_lora_weights.safetensors" in lora


def test_exported_lora_generates_a_back_view(trained, tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.core.shards import iter_samples
    from know3d.pipeline.cli import app

    _, cfg, _ = trained
    lora = Path(cfg.output) / "lora"
    meta = json.loads((lora / "know3d_lora.json").read_text())
    assert meta["model"] == "debug:tiny-qwen-image-edit" and meta["image_size"] == 32 and meta["steps"] == 6
    front = tmp_path / "front.png"
    shard = sorted(Path(cfg.data.shards[0]).glob("val-*.tar"))[0]
    sample = next(iter_samples([shard], fields=("front.png",)))
    front.write_bytes(sample["front.png"])
    out = tmp_path / "back.png"
    res = CliRunner().invoke(
        app,
        [
            "generate",
            "backview",
            "--image",
            str(front),
            "--lora",
            str(lora),
            "--prompt",
            "a handle",
            "--steps",
            "2",
            "--output",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_kill_and_resume_reproduces_the_uninterrupted_losses(trained, shards: Path, tmp_path: Path):
    """kill -9 of the whole training (driver, Ray, workers) after the first checkpoint; the
    restarted command continues from it and logs exactly the losses of the uninterrupted run."""
    root, ref_cfg, _ = trained
    reference = steps_done(Path(ref_cfg.output) / "metrics.jsonl")
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "know3d.pipeline.cli",
        "train",
        "backview",
        str(ROOT / "configs" / "backview_debug.yaml"),
        "--output",
        str(out),
        "--set",
        f"data.shards=[{shards}]",
        "--set",
        "data.image_size=32",
        "--set",
        "schedule.max_steps=6",
        "--set",
        "schedule.checkpoint_every=2",
        "--set",
        "schedule.log_every=1",
        "--set",
        "schedule.validate_every=0",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    store = out / "ray" / out.name
    while time.time() < deadline:
        if any(store.glob("checkpoint_*/know3d_state.json")) and len(steps_done(out / "metrics.jsonl")) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("training ended before it could be killed")
        time.sleep(0.2)
    else:
        pytest.fail("no checkpoint within 300 s")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(steps_done(out / "metrics.jsonl"))
    assert killed_at < 6

    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    resumed = steps_done(out / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)


def test_bad_training_inputs_fail_cleanly(tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "backview",
            str(ROOT / "configs" / "backview_debug.yaml"),
            "--shards",
            str(tmp_path / "nowhere"),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "nowhere" in res.output and "shard_index.json" in res.output
    res = runner.invoke(app, ["train", "backview", "--set", "lora.rnk=4"])
    assert res.exit_code == 2 and "lora.rank" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "shard_index.json").write_text(json.dumps({"shards": [{"name": "val-000000.tar", "split": "val"}]}))
    res = runner.invoke(
        app,
        [
            "train",
            "backview",
            str(ROOT / "configs" / "backview_debug.yaml"),
            "--shards",
            str(empty),
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "no 'train' shards" in res.output


def _torchrun(shards: Path, out: Path, *sets: str) -> None:
    """2 processes of the training body under torchrun (gloo), 2 steps on the test shards."""
    settings = [
        f"output={out}",
        f"data.shards=[{shards}]",
        "data.image_size=32",
        "schedule.max_steps=2",
        "schedule.checkpoint_every=2",
        "mlflow.enabled=false",
        *sets,
    ]
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "know3d.training.backview_train",
            str(ROOT / "configs" / "backview_debug.yaml"),
            *[a for s in settings for a in ("--set", s)],
        ],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_same_body_runs_under_torchrun_with_zero3(trained, shards: Path, tmp_path: Path):
    """torchrun --nproc_per_node 2 -m know3d.training.backview_train with ZeRO-3: the losses of the
    Ray Train run (ZeRO-2) step for step; ZeRO-3 partitions the LoRA weights too, so validation
    runs on every rank and the export gathers them: the LoRA file holds full, trained tensors.
    (One launch for both: each torchrun costs two fresh interpreters.)"""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _torchrun(shards, out, "schedule.validate_every=2", "schedule.validation_steps=2", "deepspeed.zero_stage=3")
    losses = steps_done(out / "metrics.jsonl")
    assert sorted(losses) == [1, 2]
    reference = steps_done(Path(trained[1].output) / "metrics.jsonl")
    for step in (1, 2):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), (losses, reference)
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert (out / "validation" / "step_000002.png").is_file()
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    a = weights["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert tuple(a.shape) == (8, 32)
    assert max(float(v.abs().max()) for k, v in weights.items() if ".lora_B." in k) > 0


def test_lineage_walks_from_an_evaluation_back_to_the_data_build(shards: Path, trained, lineage_db: Path, tmp_path):
    """eval -> model -> training -> dataset -> data build through the MLflow API, and forward."""
    import mlflow
    from PIL import Image

    from know3d.core.lineage import evaluations_of, trained_on, upstream
    from know3d.core.shards import iter_samples, resolve_shards
    from know3d.evaluation.config import EvalConfig
    from know3d.pipeline.evaluate import evaluate_backviews

    _, cfg, _ = trained
    for i, sample in enumerate(iter_samples(resolve_shards([str(shards)], "train")[0], ("front.png", "back.png"))):
        for sub, field in (("pred", "front.png"), ("gt", "back.png")):
            (tmp_path / sub / f"u{i}").mkdir(parents=True)
            (tmp_path / sub / f"u{i}" / "000.png").write_bytes(sample[field])
        if i == 1:
            break
    lora = Path(cfg.output) / "lora"
    overrides = [f"model={lora}", f"mlflow.tracking_uri=sqlite:///{lineage_db}", "images.lpips=false"]
    summary = evaluate_backviews(
        load_config(None, overrides, model=EvalConfig), tmp_path / "pred", tmp_path / "gt", tmp_path / "eval"
    )
    assert Image.open(tmp_path / "gt" / "u0" / "000.png").size[0] > 0 and summary.ok == 2

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{lineage_db}")
    evaluation, train, build = upstream(client, summary.run_id)
    assert [r.data.tags["know3d.stage"] for r in (evaluation, train, build)] == [
        "eval.backviews",
        "train.backview",
        "data.build",
    ]
    assert evaluation.data.tags["know3d.model.uri"] == f"runs:/{train.info.run_id}/lora"
    assert "lora/pytorch_lora_weights.safetensors" in {a.path for a in client.list_artifacts(train.info.run_id, "lora")}
    # the training input is the very data set the build logged as its output
    index = json.loads((shards / "shard_index.json").read_text())
    (used,) = [d.dataset for d in train.inputs.dataset_inputs]
    (made,) = [d.dataset for d in build.inputs.dataset_inputs]
    assert used.digest == made.digest == index["digest"][:32] and json.loads(made.source)["uri"] == shards.as_uri()
    assert index["mlflow_run_id"] == build.info.run_id
    # forward: from the build to every model trained on it, and from the model to its evaluations
    assert [r.info.run_id for r in trained_on(client, build.info.run_id)] == [train.info.run_id]
    assert [r.info.run_id for r in evaluations_of(client, train.info.run_id)] == [evaluation.info.run_id]
    assert build.info.run_name == f"data.build:{shards.name}" and build.data.params["seed"] == "0"
    kinds = {e.name: e.tags.get("mlflow.experimentKind") for e in client.search_experiments()}
    assert kinds["know3d-data"] == kinds["know3d-eval"] == "custom_model_development"
