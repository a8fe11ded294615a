"""The shared training engine: metrics window and file, EMA, worker env from torchrun's variables,
checkpoint write -> publish -> prune -> resume, and the torchrun launcher end to end (slow)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from know3d.training.data import StreamState
from know3d.training.engine import checkpoint
from know3d.training.engine.checkpoint import COMPLETE, STATE_FILE, CheckpointStore, TrainState
from know3d.training.engine.config import ScheduleConfig
from know3d.training.engine.ema import EMA
from know3d.training.engine.env import WorkerEnv
from know3d.training.engine.metrics import METRICS_FILE, MetricsFile, MetricsWindow, steps_done

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- metrics


def test_metrics_window_means_throughput_and_reset():
    window = MetricsWindow(started=10.0)
    for value in (1.0, 2.0, 4.5):
        window.add("loss", value)
    window.add("loss_t0.00-0.25", 0.25)
    window.add_samples(8)
    window.add_samples(4)
    assert window.mean("loss") == 2.5
    assert window.means() == {"loss": 2.5, "loss_t0.00-0.25": 0.25}
    assert window.samples_per_s(now=13.0) == 4.0
    # one process: the "all ranks" means are the local ones; unobserved names are left out
    assert window.reduced_means(["loss_t0.00-0.25", "loss_t0.25-0.50"]) == {"loss_t0.00-0.25": 0.25}
    window.reset()
    assert window.sums == {} and window.counts == {} and window.samples == 0 and window.started > 10.0


def test_metrics_file_lines_and_reader(tmp_path: Path):
    MetricsFile(tmp_path, enabled=False).append(1, 9.0)
    assert not (tmp_path / METRICS_FILE).exists()  # ranks other than 0 write nothing
    log = MetricsFile(tmp_path, enabled=True)
    for step, loss in ((1, 1.5), (2, 1.25), (2, 1.0)):  # a resumed run re-logs step 2
        log.append(step, loss)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert lines[0] == '{"step": 1, "loss": 1.5}' and len(lines) == 3
    assert steps_done(tmp_path / METRICS_FILE) == {1: 1.5, 2: 1.0}
    assert steps_done(tmp_path / "missing.jsonl") == {}


def test_schedule_due_every_nth_and_the_last_step():
    s = ScheduleConfig(max_steps=7)
    assert [step for step in range(1, 8) if s.due(step, 3)] == [3, 6, 7]
    assert not any(s.due(step, 0) for step in range(1, 8))  # 0 = never (validate_every)
    assert s.samples_per_step(4) == 4 * s.micro_batch_size * s.grad_accum


# --------------------------------------------------------------------------- EMA


def test_ema_tracks_the_average_exactly():
    p = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 4.0]))
    ema.update()
    assert ema.shadow[0].tolist() == [2.0, 3.0]  # 0.5·[0, 2] + 0.5·[4, 4]
    ema.update()
    assert ema.shadow[0].tolist() == [3.0, 3.5]
    assert ema.num_updates == 2 and p.tolist() == [4.0, 4.0]  # the model's weights are untouched


def test_ema_warmup_decay():
    p = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    ema = EMA([p], decay=0.9, warmup=True)
    assert ema.current_decay() == 0.1  # (1 + 0) / (10 + 0)
    with torch.no_grad():
        p.fill_(10.0)
    ema.update()
    assert ema.shadow[0].item() == pytest.approx(9.0, abs=1e-12)  # 0.1·0 + 0.9·10
    with torch.no_grad():
        p.fill_(20.0)
    ema.update()
    assert ema.shadow[0].item() == pytest.approx(9.0 * 2 / 11 + 20.0 * 9 / 11, abs=1e-12)
    ema.num_updates = 80
    assert ema.current_decay() == 0.9  # 81 / 90 reaches the cap
    ema.num_updates = 1000
    assert ema.current_decay() == 0.9
    assert ema.shadow[0].dtype == torch.float64  # float64 parameters keep their precision


def test_ema_state_dict_round_trip_and_swap():
    model = torch.nn.Linear(2, 1, bias=True).to(torch.bfloat16)
    ema = EMA(model.parameters(), decay=0.75, warmup=True)
    assert ema.shadow[0].dtype == torch.float32  # bf16 weights get a float32 shadow
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    ema.update()
    ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)  # as in a checkpoint's client_state
    buf.seek(0)
    other = EMA(torch.nn.Linear(2, 1).to(torch.bfloat16).parameters(), decay=0.1)
    other.load_state_dict(torch.load(buf))
    assert (other.decay, other.warmup, other.num_updates) == (0.75, True, 2)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow))

    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped():
        assert torch.equal(model.bias.float(), ema.shadow[1].to(torch.bfloat16).float())
        assert not torch.equal(model.bias, trained[1])
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with pytest.raises(ValueError, match="2 tensors, the model 1"):
        EMA([torch.nn.Parameter(torch.zeros(1))]).load_state_dict(ema.state_dict())


# --------------------------------------------------------------------------- worker env


def test_worker_env_from_torchrun_variables(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    env = WorkerEnv.from_torchrun(Path("/ckpt"), environ=environ)
    assert (env.rank, env.world_size, env.local_rank, env.device) == (3, 4, 1, torch.device("cpu"))
    assert env.resume_from == Path("/ckpt") and not env.is_main
    alone = WorkerEnv.from_torchrun(environ={})
    assert (alone.rank, alone.world_size, alone.local_rank, alone.resume_from) == (0, 1, 0, None) and alone.is_main
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        WorkerEnv.from_torchrun(environ={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK=4"):
        WorkerEnv.from_torchrun(environ={**environ, "RANK": "4"})


# --------------------------------------------------------------------------- checkpoints


class FakeEngine:
    """The two DeepSpeed engine calls the checkpoint module makes, on one weight."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def save_checkpoint(self, save_dir, tag, client_state, exclude_frozen_parameters):
        assert exclude_frozen_parameters  # checkpoints hold trainable weights only
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "model.json").write_text(json.dumps({"w": self.weight, "client": client_state}))

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        saved = json.loads((Path(load_dir) / tag / "model.json").read_text())
        self.weight = saved["w"]
        return load_dir, saved["client"]


def _save(store: CheckpointStore, step: int, stream: StreamState, weight: float = 0.5) -> None:
    env = WorkerEnv(0, 1, 0, torch.device("cpu"), report=store.report)
    record = {"mlflow_run_id": "run-1", "data_digest": "abc"}
    checkpoint.save(FakeEngine(weight), env, step, stream, {"loss": 1.0}, record, client_state={"ema": step})


def test_checkpoint_store_publishes_prunes_and_resumes(tmp_path: Path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    assert store.latest() is None
    leftover = store.root / ".step_00000009.deadbeef.tmp"  # staging folder of a killed run
    leftover.mkdir(parents=True)
    (store.root / "step_00000005").mkdir()  # a partial copy (no marker): never resumed from
    for step in (1, 2, 3):
        _save(store, step, StreamState(epoch=1, consumed=10 * step), weight=step / 4)
    assert [p.name for p in store.complete()] == ["step_00000002", "step_00000003"]
    assert not leftover.exists() and not list(store.root.glob(".*"))
    latest = store.latest()
    assert latest == store.root / "step_00000003" and (latest / COMPLETE).read_text() == "ok"
    saved = json.loads((latest / STATE_FILE).read_text())
    assert saved == {
        "step": 3,
        "world_size": 1,
        "streams": [{"epoch": 1, "consumed": 30}],
        "metrics": {"loss": 1.0},
        "mlflow_run_id": "run-1",
        "data_digest": "abc",
    }

    engine = FakeEngine(0.0)
    state = checkpoint.resume(engine, WorkerEnv(0, 1, 0, torch.device("cpu"), resume_from=latest))
    assert state == TrainState(
        step=3, stream={"epoch": 1, "consumed": 30}, mlflow_run_id="run-1", client_state={"ema": 3}
    )
    assert StreamState(**state.stream) == StreamState(epoch=1, consumed=30) and engine.weight == 0.75
    assert checkpoint.resume(engine, WorkerEnv(0, 1, 0, torch.device("cpu"))) == TrainState()
    with pytest.raises(ValueError, match="written by 1 workers, this run has 2"):
        checkpoint.resume(engine, WorkerEnv(1, 2, 0, torch.device("cpu"), resume_from=latest))


class _Planted:
    """What a planted checkpoint would hold: unpickling it calls ``Path.touch`` (any callable)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_deepspeed_checkpoints_resume_weights_only_and_a_planted_one_is_refused(tmp_path: Path, zero_stage, one_rank):
    """A real DeepSpeed engine (the trainers' `optim.initialize`) checkpoints and resumes with
    ``weights_only=True`` at every ZeRO stage the configs use; an optimizer file that would run
    code when unpickled is refused and runs nothing."""
    from know3d.core.config import load_config
    from know3d.training.config import TrainBackviewConfig
    from know3d.training.engine.optim import initialize

    cfg = load_config(None, [f"deepspeed.zero_stage={zero_stage}"], model=TrainBackviewConfig)

    def engine(seed: int):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        module[0].weight.requires_grad_(False)
        return initialize(module, [p for p in module.parameters() if p.requires_grad], cfg, 1, bf16=False)

    trained = engine(0)
    for _ in range(2):
        trained.backward(trained(torch.ones(1, 8)).square().sum())
        trained.step()
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    env = WorkerEnv(0, 1, 0, torch.device("cpu"), report=store.report)
    checkpoint.save(trained, env, 2, StreamState(), {"loss": 1.0}, {"mlflow_run_id": None}, {"clip": [0.5]})
    resumed = engine(0)  # the same base (frozen weights are not in checkpoints), not yet trained
    with torch.no_grad():
        assert not torch.equal(resumed(torch.ones(1, 8)), trained(torch.ones(1, 8)))
    state = checkpoint.resume(resumed, WorkerEnv(0, 1, 0, torch.device("cpu"), resume_from=store.latest()))
    assert state.step == 2 and state.client_state["clip"] == [0.5]
    with torch.no_grad():
        assert torch.equal(resumed(torch.ones(1, 8)), trained(torch.ones(1, 8)))

    optim_files = sorted(store.latest().rglob("*optim_states.pt")) or sorted(store.latest().rglob("*model_states.pt"))
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": _Planted(marker)}, optim_files[0])
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.resume(engine(0), WorkerEnv(0, 1, 0, torch.device("cpu"), resume_from=store.latest()))
    assert not marker.exists()


def test_each_launcher_finds_and_forgets_its_own_checkpoints(tmp_path: Path):
    """``ray.launcher=local`` keeps torchrun's layout (<output>/checkpoints): the newest complete
    one is what a rerun resumes from and what `know3d run` asks about; Ray Train's storage is
    another place, and --fresh empties both. Local means one rank."""
    from know3d.core.config import ConfigError, load_config
    from know3d.training.config import TrainBackviewConfig
    from know3d.training.engine.launch import forget_run, last_checkpoint, local_checkpoints

    local = load_config(None, [f"output={tmp_path / 'run'}", "ray.launcher=local"], model=TrainBackviewConfig)
    on_ray = load_config(None, [f"output={tmp_path / 'run'}"], model=TrainBackviewConfig)
    assert last_checkpoint(local) is None and last_checkpoint(on_ray) is None
    store = CheckpointStore(local_checkpoints(local), keep=3)
    for step in (2, 4):
        _save(store, step, StreamState(epoch=0, consumed=step))
    (store.root / "step_00000006").mkdir()  # a partial copy: not a checkpoint
    state = last_checkpoint(local)
    assert state["step"] == 4 and state["checkpoint"] == str(store.root / "step_00000004")
    assert state["mlflow_run_id"] == "run-1" and last_checkpoint(on_ray) is None
    (tmp_path / "run" / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n')
    forget_run(local)
    assert not store.root.exists() and not (tmp_path / "run" / METRICS_FILE).exists()
    with pytest.raises(
        ConfigError, match="ray.launcher=local trains in this process \\(one rank\\), not ray.num_workers=2"
    ):
        load_config(None, ["ray.launcher=local", "ray.num_workers=2"], model=TrainBackviewConfig)


def test_mlflow_credentials_reach_ray_train_workers_outside_the_runtime_env(tmp_path: Path, monkeypatch):
    """Ray's runtime-env agent writes every runtime env to its session log in clear: the MLflow
    credentials travel in the train loop's config instead and are set in the worker process."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from know3d.core.config import load_config
    from know3d.training.config import TrainBackviewConfig
    from know3d.training.engine import launch

    secrets = {
        "MLFLOW_TRACKING_USERNAME": "u-9f1",
        "MLFLOW_TRACKING_PASSWORD": "p-3c7",
        "MLFLOW_TRACKING_TOKEN": "t-5d2",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    env_vars = launch._worker_env_vars(use_gpu=False)
    assert env_vars["HF_HOME"] == str(tmp_path / "hf") and not set(secrets) & set(env_vars)

    captured = {}

    @contextmanager
    def no_relay(ray):
        yield "relay"

    def trainer(loop_config, cfg, use_gpu):
        captured.update(loop_config)
        return SimpleNamespace(fit=lambda: SimpleNamespace(error=None, metrics={"loss": 1.0}, checkpoint=None))

    monkeypatch.setattr(launch, "relayed_lines", no_relay)
    monkeypatch.setattr(launch, "_trainer", trainer)
    cfg = load_config(None, [f"output={tmp_path / 'run'}"], model=TrainBackviewConfig)
    ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    assert launch.fit_on_ray(lambda c, e: {}, cfg, ray)["loss"] == 1.0
    assert captured["secrets"] == secrets

    seen = {}

    @contextmanager
    def worker_env(sink):
        yield "env"

    monkeypatch.setattr(launch, "ray_worker_env", worker_env)
    monkeypatch.setattr(launch, "_relay_sink", lambda relay: None)
    for key in secrets:
        monkeypatch.delenv(key)
    launch.ray_train_loop({**captured, "worker": lambda c, e: seen.update({k: os.environ.get(k) for k in secrets})})
    assert seen == secrets  # the worker process has them, as MLflow's client reads them


def test_ray_style_report_gets_the_folder_with_rank_files(tmp_path: Path):
    """Ray Train persists the folder each rank reports: state file (rank 0) and engine files."""
    seen = {}

    def report(metrics: dict, folder: Path | None) -> None:
        seen["metrics"] = metrics
        shutil.copytree(folder, tmp_path / "reported")

    env = WorkerEnv(0, 1, 0, torch.device("cpu"), report=report)
    checkpoint.save(FakeEngine(1.0), env, 4, StreamState(0, 8), {"loss": 0.5, "lr": 1e-3}, {"mlflow_run_id": None})
    assert seen["metrics"] == {"step": 4, "loss": 0.5, "lr": 1e-3}
    assert sorted(p.name for p in (tmp_path / "reported").iterdir()) == ["ds", STATE_FILE]


# --------------------------------------------------------------------------- torchrun launcher


def _tiny_shards(folder: Path) -> Path:
    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (200, 40, 0, 255)).save(buf, format="PNG")
    url = folder / "train-000000.tar"
    with wds.TarWriter(str(url)) as w:
        for i in range(8):
            meta = {"asset_id": f"a{i}", "pair_index": 0, "components": ["a handle"] if i % 2 else []}
            w.write(
                {
                    "__key__": f"a{i}/0",
                    "front.png": buf.getvalue(),
                    "back.png": buf.getvalue(),
                    "json": json.dumps(meta).encode(),
                }
            )
    return url


def _torchrun(*settings: str) -> str:
    """Runs the trainer under torchrun; its stdout (what rank 0 tells the user)."""
    res = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node",
            "1",
            "-m",
            "know3d.training.backview_train",
            str(ROOT / "configs" / "backview_debug.yaml"),
            *[a for s in settings for a in ("--set", s)],
        ],
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_torchrun_launcher_trains_checkpoints_resumes_and_exports(tmp_path: Path):
    """``torchrun --nproc_per_node 1 -m know3d.training.backview_train`` on the debug config, 4
    steps; then, from its step-2 checkpoint, the same command logs the same steps 3 and 4."""
    out = tmp_path / "run"
    settings = (
        f"output={out}",
        f"data.shards=[{_tiny_shards(tmp_path)}]",
        "data.image_size=32",
        "schedule.max_steps=4",
        "schedule.checkpoint_every=2",
        "schedule.validate_every=0",
        "mlflow.enabled=false",
    )
    stdout = _torchrun(*settings)
    assert f"output {out}" in stdout.splitlines()
    assert "step 2/4  loss " in stdout and "step 4/4  loss " in stdout and " eta 0s" in stdout
    losses = steps_done(out / METRICS_FILE)
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 10 and math.isfinite(v) for v in losses.values())
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    assert all((p / COMPLETE).is_file() for p in ckpts.iterdir())
    saved = json.loads((ckpts / "step_00000002" / STATE_FILE).read_text())
    assert saved["step"] == 2 and saved["world_size"] == 1 and saved["streams"] == [{"epoch": 0, "consumed": 4}]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()

    shutil.rmtree(ckpts / "step_00000004")  # as if killed after the step-2 checkpoint
    _torchrun(*settings)
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 3, 4]  # resumed at step 2
    assert lines[4]["loss"] == pytest.approx(losses[3], rel=1e-6) and lines[5]["loss"] == pytest.approx(
        losses[4], rel=1e-6
    )
