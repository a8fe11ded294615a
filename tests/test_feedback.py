"""What a user sees while things run (issue 13): plain progress lines in logs, training progress
from rank 0 on the driver's terminal, an instant answer for a finished run, no library noise."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from know3d.core.fanout import LineProgress, make_progress, progress_mode, run_bounded
from know3d.core.logs import format_duration
from know3d.pipeline.config import load_config
from know3d.training.config import TrainBackviewConfig
from know3d.training.engine.checkpoint import STATE_FILE
from know3d.training.engine.env import WorkerEnv
from know3d.training.engine.launch import relayed_lines
from know3d.training.engine.metrics import METRICS_FILE, progress_line
from know3d.training.generate import LORA_META

ROOT = Path(__file__).resolve().parents[1]
KNOW3D = Path(sys.executable).with_name("know3d")
TOKEN_WARNING = "Token authentication is enabled for this Ray cluster"
SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "k3d-u-41c9",
    "MLFLOW_TRACKING_PASSWORD": "k3d-p-8e20",
    "MLFLOW_TRACKING_TOKEN": "k3d-t-77ab",
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- plain progress lines


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (0, 8.4, 59.6, 230, 3599, 7500)] == [
        "0s",
        "8s",
        "1m00s",
        "3m50s",
        "59m59s",
        "2h05m",
    ]
    assert format_duration(float("inf")) == "?"


def test_line_progress_prints_at_most_every_interval_and_the_final_line():
    clock, out = Clock(), io.StringIO()
    progress = LineProgress(stream=out, clock=clock, interval=10.0)
    task = progress.add_task("render", total=144)
    clock.now = 103.0
    for _ in range(36):  # 36 items in 3 s: too soon for a line
        progress.advance(task)
    assert out.getvalue() == ""
    clock.now = 110.0  # 10 s since the start
    progress.advance(task)
    assert out.getvalue() == "render    37/144  3.7/s  eta 29s\n"
    clock.now = 115.0
    progress.advance(task, 107)  # the last ones: a final line, whatever the interval
    assert out.getvalue().splitlines()[1] == "render   144/144  9.6/s  done in 15s"


def test_line_progress_keeps_tasks_apart():
    clock, out = Clock(), io.StringIO()
    progress = LineProgress(stream=out, clock=clock)
    ingest, render = progress.add_task("ingest", total=2), progress.add_task("render", total=2)
    clock.now += 1
    progress.advance(ingest, 2)
    progress.advance(render)
    assert out.getvalue() == "ingest   2/2  2.0/s  done in 1s\n"


def test_progress_mode_from_the_environment(monkeypatch):
    for value, mode in (("lines", "lines"), ("off", "off"), ("bars", "bars"), ("1", "bars"), ("auto", "lines")):
        monkeypatch.setenv("KNOW3D_PROGRESS", value)
        assert progress_mode() == mode, value  # captured stderr is no terminal: auto means lines
    monkeypatch.delenv("KNOW3D_PROGRESS")
    assert isinstance(make_progress(), LineProgress)


class FakeRay:
    """What run_bounded asks of Ray: refs finish in submission order; a ref may hold an error."""

    def wait(self, refs: list, num_returns: int):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if isinstance(ref[1], Exception):
            raise ref[1]
        return ref[1]


def test_run_bounded_counts_the_weight_of_each_item():
    clock, out = Clock(), io.StringIO()
    progress = LineProgress(stream=out, clock=clock)
    batches = [list(range(16)), list(range(16)), list(range(5))]
    done = []

    def submit(batch, slot):
        clock.now += 1
        return (id(batch), RuntimeError("died") if len(batch) == 5 else len(batch))

    run_bounded(FakeRay(), submit, batches, [None, None], lambda b, r: done.append(r), progress, "ingest", weight=len)
    assert done[:2] == [16, 16] and isinstance(done[2], RuntimeError)  # a failed batch counts too
    assert progress.tasks[0].total == 37 and out.getvalue() == "ingest   37/37  12.3/s  done in 3s\n"


def test_run_bounded_counts_one_per_item_by_default():
    progress = LineProgress(stream=io.StringIO(), clock=Clock())
    run_bounded(
        FakeRay(), lambda item, slot: (id(item), len(item)), [[1, 2], [3]], [None], lambda i, r: None, progress, "x"
    )
    assert progress.tasks[0].total == 2 and progress.tasks[0].completed == 2


# --------------------------------------------------------------------------- training progress


def test_progress_line_and_its_eta():
    assert progress_line(40, 1000, 0.123449, 4.2, 960 * 1) == "step 40/1000  loss 0.1234  4.2 samples/s  eta 3m49s"
    assert progress_line(12, 12, 1.5, 20.0, 0).endswith("eta 0s")


def test_only_rank_0_says_anything():
    heard: list[str] = []
    for rank in (1, 0):
        WorkerEnv(rank, 2, rank, torch.device("cpu"), sink=heard.append).say(f"rank {rank}")
    assert heard == ["rank 0"]


class FakeActorRay:
    """Enough of Ray for :func:`relayed_lines`: actors are local objects, calls return at once."""

    def __init__(self) -> None:
        self.killed = []

    def remote(self, **options):
        def wrap(cls):
            return SimpleNamespace(remote=lambda: _FakeActor(cls()))

        return wrap

    def get(self, value):
        return value

    def kill(self, actor) -> None:
        self.killed.append(actor)


class _FakeActor:
    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name: str):
        return SimpleNamespace(remote=getattr(self._obj, name))


def test_relayed_lines_reach_the_driver_in_order_and_none_is_lost():
    ray, heard = FakeActorRay(), []
    with relayed_lines(ray, write=heard.append, every_s=0.01) as relay:
        for i in range(50):
            relay.put.remote(f"line {i}")
    assert heard == [f"line {i}" for i in range(50)] and ray.killed == [relay]


def test_the_relay_actors_module_imports_nothing_heavy():
    """Ray imports an actor's module in the actor's fresh process: the relay's must not bring
    torch (or Ray) along, or every training run pays seconds of CPU for a list of strings."""
    code = "import sys, know3d.training.engine.relay; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


# --------------------------------------------------------------------------- rerunning a finished run


def _run_folder(tmp_path: Path, step: int = 4, lora_steps: int | None = 4, metrics: dict | None = None):
    """The files a finished 4-step run leaves (a checkpoint of ``step``, the LoRA of ``lora_steps``)."""
    tmp_path.mkdir(exist_ok=True)
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"")
    out = tmp_path / "run"
    overrides = [f"output={out}", f"data.shards=[{shard}]", "schedule.max_steps=4", "mlflow.enabled=false"]
    cfg = load_config(ROOT / "configs" / "backview_debug.yaml", overrides, model=TrainBackviewConfig)
    ckpt = out / "ray" / out.name / f"checkpoint_2026-01-01_00-00-0{step}.000000"
    ckpt.mkdir(parents=True)
    state = {"step": step, "world_size": 2, "streams": [], **({"metrics": metrics} if metrics else {})}
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    if lora_steps is not None:
        (out / "lora").mkdir()
        (out / "lora" / LORA_META).write_text(json.dumps({"steps": lora_steps}))
    (out / METRICS_FILE).write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 5)))
    return cfg, out


def test_a_finished_run_answers_at_once_with_its_metrics(tmp_path: Path, monkeypatch, capsys):
    from know3d.pipeline import train

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run must not start Ray")

    monkeypatch.setattr(train, "ray_session", no_ray)
    monkeypatch.chdir(tmp_path)
    cfg, out = _run_folder(tmp_path, metrics={"loss": 0.25, "samples_per_s": 3.5})
    result = train.run_train_backview(cfg)
    assert capsys.readouterr().out == "already at step 4/4 (run); use --fresh to train again\n"
    assert result["loss"] == 0.25 and result["samples_per_s"] == 3.5 and result["step"] == 4
    assert result["already_done"] and result["lora"] == str(out / "lora")
    assert result["checkpoint"].endswith("checkpoint_2026-01-01_00-00-04.000000")


def test_what_counts_as_finished(tmp_path: Path):
    from know3d.pipeline.train import finished, prepare

    cfg, _ = _run_folder(tmp_path / "old")  # checkpoints from before they held metrics
    done = finished(prepare(cfg))
    assert done["loss"] == 0.4 and done["step"] == 4  # the step's loss from metrics.jsonl
    cfg, _ = _run_folder(tmp_path / "early", step=2, lora_steps=2)
    assert finished(prepare(cfg)) is None  # max_steps raised since: train on
    cfg, _ = _run_folder(tmp_path / "unexported", lora_steps=None)
    assert finished(prepare(cfg)) is None  # killed before the export: resume to export
    cfg, _ = _run_folder(tmp_path / "stale", lora_steps=2)
    assert finished(prepare(cfg)) is None  # the LoRA is of an earlier, shorter run


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_on_ray(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A small data build (its stderr kept), then 4 training steps on it under Ray Train (1 worker,
    32²) through the CLI, as a user runs them."""
    tmp = tmp_path_factory.mktemp("feedback")
    env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    # MLflow credentials in the environment (sqlite ignores them); Ray's session files in a folder of
    # this test's (short: Ray's socket paths must fit), read by the credentials test below
    env.update(SECRETS, RAY_TMPDIR=tempfile.mkdtemp(prefix="k3r", dir="/tmp"))
    env.pop("KNOW3D_PROGRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    shards = tmp / "qs"
    build = [str(KNOW3D), "data", "build", "--source", "procedural", "--output", str(shards)]
    for setting in ("source.procedural.num_assets=4", "render.resolution=64", "shard.max_samples=12", "ray.num_cpus=2"):
        build += ["--set", setting]
    built = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    train = [str(KNOW3D), "train", "backview", str(ROOT / "configs" / "backview_debug.yaml"), "--shards", str(shards)]
    train += ["--set", "schedule.max_steps=4", "--set", "ray.num_workers=1", "--set", "data.image_size=32"]
    run = tmp / "run"
    res = subprocess.run(
        [*train, "--output", str(run), "--fresh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    yield SimpleNamespace(tmp=tmp, env=env, build=built, train=train, run=run, result=res)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_ray_trains_session_logs_hold_no_mlflow_credential(trained_on_ray: SimpleNamespace):
    """Ray's runtime-env agent logs every runtime env it sets up: the Ray Train run's is there
    (with what it does forward), the MLflow credentials are not, nor anywhere in Ray's files."""
    ray_dir = Path(trained_on_ray.env["RAY_TMPDIR"])
    files = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    agent_logs = [p for p in files if p.name.startswith("runtime_env_agent") and p.suffix == ".log"]
    assert any(b"DS_ACCELERATOR" in p.read_bytes() for p in agent_logs), [p.name for p in agent_logs]
    leaked = [p for p in files if any(s.encode() in p.read_bytes() for s in SECRETS.values())]
    assert leaked == []
    assert not any(s in trained_on_ray.result.stdout + trained_on_ray.result.stderr for s in SECRETS.values())


@pytest.mark.slow
def test_training_tells_the_user_how_far_it_is_and_nothing_else(trained_on_ray: SimpleNamespace):
    """The build's log has plain progress lines; the training prints a progress line per logging
    window on stdout, no Ray or diffusers noise; the same command again answers at once."""
    t = trained_on_ray
    stderr = t.build.stderr
    assert any(line.startswith("render ") and "4/4" in line and "done in" in line for line in stderr.splitlines())
    assert TOKEN_WARNING not in stderr

    res = t.result
    lines = res.stdout.splitlines()
    assert lines[0] == f"output {t.run}"
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split("  ")[0] for line in progress] == ["step 2/4", "step 4/4"], res.stdout
    assert all(" loss " in line and " samples/s  eta " in line for line in progress)
    for noise in ("Loading pipeline components", TOKEN_WARNING, "alembic", "Creating initial MLflow"):
        assert noise not in res.stdout + res.stderr, noise

    res = subprocess.run(
        [*t.train, "--output", str(t.run)], cwd=ROOT, env=t.env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.startswith(f"already at step 4/4 ({t.run}); use --fresh")


@pytest.mark.slow
def test_the_local_launcher_matches_ray_train_and_resumes(trained_on_ray: SimpleNamespace):
    """``ray.launcher=local`` (the CLI process as the only rank, no Ray Train): the same progress
    lines and, step for step, the losses of the Ray Train run; checkpoints in <output>/checkpoints,
    from which a rerun continues (the step-4 one deleted: it logs steps 3-4 again, equal)."""
    t = trained_on_ray
    reference = json.loads("[" + ",".join((t.run / METRICS_FILE).read_text().splitlines()) + "]")
    run = t.tmp / "local"
    local = [*t.train, "--output", str(run), "--set", "ray.launcher=local", "--set", "schedule.checkpoint_every=2"]
    res = subprocess.run(local, cwd=ROOT, env=t.env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert [line.split("  ")[0] for line in res.stdout.splitlines() if line.startswith("step ")] == [
        "step 2/4",
        "step 4/4",
    ], res.stdout
    assert not (run / "ray").exists()  # no Ray Train storage: nothing ran on Ray Train
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for mine, theirs in zip(logged, reference):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), (logged, reference)

    import shutil

    shutil.rmtree(ckpts / "step_00000004")  # as if killed after step 2's checkpoint
    res = subprocess.run(local, cwd=ROOT, env=t.env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 3, 4]
    for mine, theirs in zip(logged[4:], reference[2:]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), (logged, reference)
    assert json.loads((run / "lora" / LORA_META).read_text())["steps"] == 4

    bad = subprocess.run(
        [*local, "--set", "ray.num_workers=2"], cwd=ROOT, env=t.env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "ray.launcher=local trains in this process (one rank)" in bad.stdout + bad.stderr
