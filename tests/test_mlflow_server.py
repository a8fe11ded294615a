"""Against a real ``mlflow server`` over HTTP (sqlite and PostgreSQL backends, artifact proxy):
a data build and a tiny training log what they should, no credential from the environment
reaches the server or the output, and a server killed mid-run loses nothing (the tracker buffers
and replays; see :mod:`know3d.core.tracking`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from know3d.core.config import TrackingConfig
from know3d.core.tracking import (
    BUFFER_DIR,
    HTTP_LIMITS,
    REPLAY_COMMAND,
    TrackingUnavailable,
    make_tracker,
    replay_buffer,
)
from tests.servers import MlflowServer, PostgresCluster, free_port, postgres_missing

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KNOW3D = Path(sys.executable).with_name("know3d")
TORCHRUN = Path(sys.executable).with_name("torchrun")
#: credentials a user would have in the environment; the server runs without auth and ignores them
SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "k3d-user-7f2b9c41e0",
    "MLFLOW_TRACKING_PASSWORD": "k3d-pass-c85d13aa6b",
    "MLFLOW_TRACKING_TOKEN": "k3d-token-1e4f0b77d2",
}
#: the smallest build that trains: 2 procedural assets (6 pairs each), 32² views, one render actor
BUILD_SETTINGS = (
    "source.procedural.num_assets=2",
    "render.resolution=32",
    "shard.max_samples=12",
    "ray.num_cpus=2",
    "ray.render_concurrency=1",
)
TRAIN_STEPS = 4


def _client(server: MlflowServer):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.uri)


def _env(server: MlflowServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(SECRETS, MLFLOW_TRACKING_URI=server.uri, RAY_ADDRESS="")
    env.pop("KNOW3D_PROGRESS", None)
    return env


# --------------------------------------------------------------------------- servers


class _Servers:
    """The module's servers, each launched once: both start together (a server takes 10-40 s
    to migrate its database and come up, mostly while the other waits)."""

    def __init__(self, factory, wanted: set[str]) -> None:
        self.factory = factory
        self.wanted = wanted
        self.servers: dict[str, MlflowServer] = {}
        self.failed: dict[str, Exception] = {}
        self.cluster: PostgresCluster | None = None

    def _launch(self, name: str) -> MlflowServer:
        if name not in self.servers:
            root = self.factory.mktemp(f"mlflow-{name}")
            if name == "postgres":
                self.cluster = PostgresCluster().start()
                backend = self.cluster.uri
            else:
                backend = f"sqlite:///{root / 'mlflow.db'}"
            self.servers[name] = MlflowServer(backend, root, name).launch()
        return self.servers[name]

    def get(self, name: str) -> MlflowServer:
        if name == "postgres" and postgres_missing():
            pytest.skip(postgres_missing())
        if name in self.failed:
            raise self.failed[name]
        server = self._launch(name)
        for other in self.wanted - {name} - set(self.failed):  # the others come up while we wait
            if other != "postgres" or not postgres_missing():
                try:
                    self._launch(other)
                except Exception as exc:  # noqa: BLE001 - its own tests report it
                    self.failed[other] = exc
        return server.wait() if not server.healthy() else server

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        if self.cluster is not None:
            self.cluster.stop()


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    def wants(item, name: str) -> bool:
        spec = getattr(item, "callspec", None)
        return f"{name}_server" in item.fixturenames or (spec is not None and spec.params.get("backend") == name)

    here = [item for item in request.session.items if item.module is request.module]
    wanted = {name for name in ("sqlite", "postgres") if any(wants(item, name) for item in here)}
    pool = _Servers(tmp_path_factory, wanted)
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def sqlite_server(servers) -> MlflowServer:
    return servers.get("sqlite")


@pytest.fixture(scope="module")
def postgres_server(servers) -> MlflowServer:
    return servers.get("postgres")


# --------------------------------------------------------------------------- a build and a training over HTTP


def _build(server: MlflowServer, root: Path) -> dict:
    """``know3d data build`` into ``root/data``, run from ``root/client`` (the client's working
    folder: nothing of the run may land there), with credentials in the environment."""
    out, cwd = root / "data", root / "client"
    cwd.mkdir(parents=True)
    cmd = [str(KNOW3D), "data", "build", str(ROOT / "configs" / "quickstart.yaml"), "--source", "procedural"]
    cmd += ["--output", str(out), *[a for s in BUILD_SETTINGS for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=cwd, env=_env(server), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    index = json.loads((out / "shard_index.json").read_text())
    return {"out": out, "cwd": cwd, "res": res, "index": index, "run_id": index["mlflow_run_id"]}


@pytest.fixture(scope="module")
def sqlite_build(sqlite_server, tmp_path_factory) -> dict:
    return _build(sqlite_server, tmp_path_factory.mktemp("build-sqlite"))


@pytest.fixture(scope="module")
def postgres_build(postgres_server, tmp_path_factory) -> dict:
    return _build(postgres_server, tmp_path_factory.mktemp("build-postgres"))


@pytest.fixture(scope="module")
def trained(sqlite_server, sqlite_build, tmp_path_factory) -> dict:
    """``torchrun --nproc_per_node 1 -m know3d.training.backview_train`` (tiny debug model,
    32² images, a loss logged every step) on the build's shards, credentials in the environment."""
    out = tmp_path_factory.mktemp("train") / "run"
    settings = [
        f"output={out}",
        f"data.shards=[{sqlite_build['out']}]",
        "data.image_size=32",
        f"schedule.max_steps={TRAIN_STEPS}",
        "schedule.log_every=1",
        "schedule.checkpoint_every=100",
        "schedule.validate_every=0",
    ]
    cmd = [str(TORCHRUN), "--nproc_per_node", "1", "-m", "know3d.training.backview_train"]
    cmd += [str(ROOT / "configs" / "backview_debug.yaml"), *[a for s in settings for a in ("--set", s)]]
    env = {**_env(sqlite_server), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=sqlite_build["cwd"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (line,) = [x for x in res.stdout.splitlines() + res.stderr.splitlines() if x.startswith("mlflow run ")]
    return {"out": out, "res": res, "run_id": line.split()[2]}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_data_build_logs_over_http_and_uploads_through_the_proxy(backend: str, request):
    server: MlflowServer = request.getfixturevalue(f"{backend}_server")
    build = request.getfixturevalue(f"{backend}_build")
    client = _client(server)
    run = client.get_run(build["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["know3d.stage"] == "data.build"
    assert run.info.run_name == f"data.build:{build['out'].name}"
    params = run.data.params
    assert params["source.kind"] == "procedural" and params["source.procedural.num_assets"] == "2"
    assert params["render.resolution"] == "32" and params["shard.max_samples"] == "12"
    assert run.data.metrics["num_samples"] == build["index"]["num_samples"] == 12
    assert run.data.metrics["render.ok"] == 2 and run.data.metrics["render_s"] > 0
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == build["out"].name
    assert dataset_input.dataset.digest == build["index"]["digest"][:32]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "output"

    # artifacts went through the server's proxy into its artifacts destination
    experiment = client.get_experiment(run.info.experiment_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.parquet", "shard_index.json", "summary.json", "contact_sheet.png"} <= listed
    stored = {p.name for p in server.artifacts.rglob("*") if run.info.run_id in p.parts and p.is_file()}
    assert listed <= stored
    uploaded = next(p for p in server.artifacts.rglob("shard_index.json") if run.info.run_id in p.parts)
    assert uploaded.read_bytes() == (build["out"] / "shard_index.json").read_bytes()
    # and nothing of the run landed in the client's working folder
    assert sorted(p.name for p in build["cwd"].iterdir()) == []
    assert not (build["out"] / BUFFER_DIR).exists()


def test_tiny_training_logs_over_http_with_the_builds_dataset(sqlite_server, sqlite_build, trained):
    client = _client(sqlite_server)
    run = client.get_run(trained["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["know3d.stage"] == "train.backview"
    assert run.data.params["lora.rank"] == "8" and run.data.params["run.world_size"] == "1"
    assert run.data.params["schedule.max_steps"] == str(TRAIN_STEPS)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, TRAIN_STEPS + 1))
    assert all(m.value > 0 for m in history)
    assert "lr" in run.data.metrics
    (train_input,) = run.inputs.dataset_inputs
    (build_input,) = client.get_run(sqlite_build["run_id"]).inputs.dataset_inputs
    assert train_input.dataset.digest == build_input.dataset.digest
    assert train_input.dataset.name == build_input.dataset.name
    assert run.data.tags["know3d.data.run_id"] == sqlite_build["run_id"]
    assert "lora/pytorch_lora_weights.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "lora")}


def test_no_credential_reaches_the_server_the_output_or_the_terminal(
    sqlite_server, sqlite_build, trained, tmp_path: Path
):
    client = _client(sqlite_server)
    secrets = [s.encode() for s in SECRETS.values()]
    for run_id in (sqlite_build["run_id"], trained["run_id"]):
        run = client.get_run(run_id)
        logged = [*run.data.params.items(), *run.data.tags.items(), *[(k, "") for k in run.data.metrics]]
        logged += [(d.dataset.name, d.dataset.source + d.dataset.digest) for d in run.inputs.dataset_inputs]
        text = json.dumps(logged).encode()
        assert not any(s in text for s in secrets), run_id
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / run_id)))
        files = [p for p in local.rglob("*") if p.is_file()]
        assert files
        assert not [p for p in files if any(s in p.read_bytes() for s in secrets)]
    for res in (sqlite_build["res"], trained["res"]):
        assert not any(s.decode() in res.stdout + res.stderr for s in secrets)
    # nor anything the server stored (its database, its artifacts) or the runs wrote
    places = [sqlite_server.root, sqlite_build["out"], trained["out"]]
    leaked = [p for d in places for p in d.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]
    assert leaked == []


# --------------------------------------------------------------------------- outages


@pytest.fixture()
def http_limits_restored(monkeypatch):
    """The tracker sets MLflow's HTTP retry limits in this process's environment when they are
    unset: put them back as they were after the test."""
    for name in (*HTTP_LIMITS, *SECRETS):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    return monkeypatch


def _outage_tracker(server: MlflowServer, output: Path, name: str):
    tracker = make_tracker(
        TrackingConfig(tracking_uri=server.uri, experiment="know3d-outage"), stage="test.outage", output=output / name
    )
    tracker.retry_interval = 0.5
    return tracker


def _metric_steps(server: MlflowServer, run_id: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(server).get_metric_history(run_id, "loss")]


def _warnings(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "know3d.core.tracking" and words in r.getMessage()]


def test_a_server_killed_mid_run_loses_nothing(sqlite_server, tmp_path: Path, http_limits_restored, caplog):
    caplog.set_level(logging.WARNING, logger="know3d.core.tracking")
    tracker = _outage_tracker(sqlite_server, tmp_path, "run")
    run_id = tracker.run_id
    tracker.log_params({"lr": 0.1, "model": {"rank": 8}})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    assert {k: os.environ[k] for k in HTTP_LIMITS} == HTTP_LIMITS

    sqlite_server.kill()
    t0 = time.monotonic()
    for step in range(4, 9):  # the work goes on while the server is down
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    tracker.set_tags({"phase": "during the outage"})
    assert time.monotonic() - t0 < 20  # MLflow's retries limited; after the first failure, no waiting
    buffer = tracker.buffer_path
    assert buffer is not None and buffer.parent == tmp_path / "run" / BUFFER_DIR and buffer.is_file()
    (line,) = _warnings(caplog, "unreachable")
    assert sqlite_server.uri in line and str(buffer) in line
    assert len(buffer.read_text().splitlines()) == 1 + 6  # the header, 5 metric records and the tags

    sqlite_server.start()
    time.sleep(0.6)  # the retry interval
    tracker.log_metrics({"loss": 1.0 / 9}, step=9)  # the next call replays the buffer first
    assert tracker.buffer_path is None and not buffer.exists()
    (back,) = _warnings(caplog, "answers again")
    assert "7 buffered records replayed" in back
    tracker.log_metrics({"loss": 0.1}, step=10)
    tracker.close()

    run = _client(sqlite_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    assert _metric_steps(sqlite_server, run_id) == [(s, 1.0 / s) for s in range(1, 10)] + [(10, 0.1)]
    assert run.data.params == {"lr": "0.1", "model.rank": "8"}
    assert run.data.tags["phase"] == "during the outage"
    assert len(_warnings(caplog, "unreachable")) == 1


def test_a_server_down_through_close_keeps_the_buffer_for_a_replay(
    sqlite_server, tmp_path: Path, http_limits_restored, caplog, capsys
):
    caplog.set_level(logging.WARNING, logger="know3d.core.tracking")
    tracker = _outage_tracker(sqlite_server, tmp_path, "run")
    run_id = tracker.run_id
    tracker.log_metrics({"loss": 1.0}, step=1)
    sqlite_server.kill()
    for step in (2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    note = tmp_path / "run" / "note.txt"
    note.write_text("written while the server was down")
    tracker.log_artifact(note)
    note.write_text("changed after it was logged")  # the buffer keeps the logged version
    buffer = tracker.buffer_path
    tracker.close("FAILED")
    assert buffer.is_file()
    (kept,) = _warnings(caplog, "still unreachable")
    assert f"4 records of this run kept in {buffer}" in kept and f"{REPLAY_COMMAND} {buffer}" in kept

    with pytest.raises(TrackingUnavailable, match="does not answer"):
        replay_buffer(buffer)  # still down: the file stays as it was
    assert buffer.is_file()

    sqlite_server.start()
    res = subprocess.run(
        [str(Path(sys.executable).with_name("know3d")), "mlflow", "replay", str(buffer)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert f"replayed into run {run_id}" in res.stdout
    assert not buffer.exists() and not buffer.with_suffix(".artifacts").exists()
    client = _client(sqlite_server)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert _metric_steps(sqlite_server, run_id) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    local = Path(client.download_artifacts(run_id, "note.txt", str(tmp_path / "dl")))
    assert local.read_text() == "written while the server was down"


def test_a_server_down_from_the_start_buffers_the_whole_run(tmp_path: Path, http_limits_restored, caplog):
    """No server at all: the stage runs, its run (creation included) waits in the buffer, and
    the buffer can be sent to another store later (here a sqlite file)."""
    http_limits_restored.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = make_tracker(
        TrackingConfig(tracking_uri=dead, experiment="know3d-offline"), stage="test.x", output=tmp_path
    )
    assert tracker.run_id is None and tracker.buffer_path.name.startswith("new-run-")
    tracker.log_params({"seed": 3})
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_dataset("shards", "ab" * 32, "file:///data/shards", context="training")
    buffer = tracker.buffer_path
    tracker.close()
    assert buffer.is_file() and len(_warnings(caplog, "still unreachable")) == 1

    db = f"sqlite:///{tmp_path / 'later.db'}"
    run_id = replay_buffer(buffer, tracking_uri=db)
    assert not buffer.exists() and not (tmp_path / BUFFER_DIR).exists()
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=db).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["know3d.stage"] == "test.x"
    assert run.info.run_name == f"test.x:{tmp_path.name}" and run.data.params == {"seed": "3"}
    assert run.data.metrics == {"loss": 2.0}
    assert run.inputs.dataset_inputs[0].dataset.digest == "ab" * 16
