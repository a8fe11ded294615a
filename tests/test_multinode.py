"""On a real multi-node Ray cluster (tests/raycluster.py: a head and two worker nodes of one CPU
each, all on 127.0.0.1, token authentication): the data build renders on every node and loses
nothing when a worker node's raylet is killed mid-render; Ray Train places the back-view
workers on different nodes and, when one of those nodes is lost, restarts the worker group from
the last checkpoint and logs the uninterrupted run's losses.

Every command runs as its own driver (``know3d ... --address 127.0.0.1:PORT``) with the cluster's
token in its environment, as a user's would. The fan-out's handling of lost actors is also tested
without Ray (fast).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from know3d.core.fanout import run_bounded
from know3d.core.shards import sample_key
from know3d.training.engine.metrics import METRICS_FILE, steps_done
from tests.raycluster import RayCluster, listening

slow = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
NUM_ASSETS = 18  # procedural, 6 pairs each; 3 render actors (one per node) take ~15 s
PAIRS = 6
MAX_STEPS = 12
CHECKPOINT_EVERY = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RayCluster(tmp_path_factory.mktemp("raycluster")) as c:
        c.start_head(num_cpus=1, resources={"head": 1})
        c.add_node("node_a", num_cpus=1)
        c.add_node("node_b", num_cpus=1)
        c.wait_for_nodes(3)
        yield c


def _cli(cluster: RayCluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "know3d.pipeline.cli", *args, "--address", cluster.address]


def _build(cluster: RayCluster, out: Path) -> subprocess.Popen:
    sets = [
        f"source.procedural.num_assets={NUM_ASSETS}",
        "render.resolution=32",
        "ray.render_concurrency=3",  # one actor per node: a lost node's actor has nowhere to restart
        "shard.max_samples=24",
        "mlflow.enabled=false",
    ]
    args = _cli(cluster, "data", "build", "--source", "procedural", "--output", str(out))
    return subprocess.Popen(
        [*args, *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"still running after {timeout:g} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    return output


def _sample_keys(out: Path) -> list[str]:
    """Every sample key in the shards the index lists (a key twice would show up twice)."""
    index = json.loads((out / "shard_index.json").read_text())
    keys = []
    for entry in index["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    assert len(keys) == index["num_samples"]
    return keys


def _expected_keys(out: Path) -> set[str]:
    """Each asset the manifest says was rendered, times its pairs."""
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    rendered = [r["sha256"] for r in rows if r["stage"] == "render" and r["status"] == "ok"]
    assert len(rendered) == NUM_ASSETS and not [r for r in rows if r["status"] == "failed"]
    return {sample_key(sha, "backview", i) for sha in rendered for i in range(PAIRS)}


def _actors(cluster: RayCluster, driver_pid: int, class_name: str, state: str | None = None) -> list[dict]:
    """The actors of one driver's job (the CLI process is the driver)."""
    table = cluster.query()
    jobs = {j["job_id"] for j in table["jobs"] if j["driver_pid"] == driver_pid}
    return [
        a
        for a in table["actors"]
        if a["job_id"] in jobs and a["class_name"] == class_name and (state is None or a["state"] == state)
    ]


@pytest.fixture(scope="module")
def built(cluster: RayCluster, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("build") / "out"
    proc = _build(cluster, out)
    output = _finish(proc, 300)
    return {"out": out, "output": output, "pid": proc.pid}


@slow
def test_nodes_on_loopback_with_token_authentication(cluster: RayCluster, tmp_path: Path):
    nodes = [n for n in cluster.query()["nodes"] if n["alive"]]
    assert len(nodes) == 3 and {n["address"] for n in nodes} == {"127.0.0.1"}
    assert len({n["node_id"] for n in nodes}) == 3
    sockets = listening(cluster.pids())
    assert sockets and all(s.startswith("127.0.0.1:") for s in sockets), sockets  # nothing on other interfaces
    assert cluster.probe(cluster.env()) == "ok: 3 nodes"
    wrong = cluster.probe(cluster.env(RAY_AUTH_TOKEN="0" * 64))
    assert wrong.startswith("AuthenticationError") and "InvalidAuthToken" in wrong
    # no token at all (none in the environment, none in ~/.ray): refused before any call
    env = {k: v for k, v in cluster.env(HOME=str(tmp_path)).items() if k != "RAY_AUTH_TOKEN"}
    none = cluster.probe(env)
    assert none.startswith("AuthenticationError") and "no authentication token was found" in none


@slow
def test_build_renders_on_every_node(cluster: RayCluster, built: dict):
    assert f"{NUM_ASSETS * PAIRS} samples in" in built["output"]
    keys = _sample_keys(built["out"])
    assert len(keys) == len(set(keys)) == NUM_ASSETS * PAIRS
    assert set(keys) == _expected_keys(built["out"])
    actors = _actors(cluster, built["pid"], "RenderActor")
    assert len(actors) == 3
    # one CPU per node and one per actor: each node rendered
    assert {a["node_id"] for a in actors} == set(cluster.alive_nodes().values())


@slow
def test_build_survives_losing_a_worker_node(cluster: RayCluster, built: dict, tmp_path: Path):
    """SIGKILL of node_a's raylet (its render actor with it) mid-render: the actor cannot restart
    (the other nodes' CPUs are taken), so its assets go to the other actors; none is lost or
    rendered into the shards twice."""
    out = tmp_path / "out"
    proc = _build(cluster, out)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("work/*/*/*/asset.json"))) < 2:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no asset rendered within 240 s"
            time.sleep(0.1)
        cluster.kill_raylet("node_a")
        rendered_at_kill = len(list(out.glob("work/*/*/*/asset.json")))
        output = _finish(proc, 300)
        assert rendered_at_kill < NUM_ASSETS  # the node was lost mid-render
        assert f"{NUM_ASSETS * PAIRS} samples in" in output
        keys = _sample_keys(out)
        assert len(keys) == len(set(keys))
        assert sorted(keys) == sorted(_sample_keys(built["out"]))
        assert set(keys) == _expected_keys(out)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.restart_node("node_a")  # the training tests want three nodes again
        cluster.wait_for_nodes(3)


def _train(cluster: RayCluster, shards: Path, out: Path, *sets: str) -> subprocess.Popen:
    settings = [
        f"data.shards=[{shards}]",
        "data.image_size=32",
        f"schedule.max_steps={MAX_STEPS}",
        f"schedule.checkpoint_every={CHECKPOINT_EVERY}",
        "schedule.log_every=1",
        "schedule.validate_every=0",
        "mlflow.enabled=false",
        "ray.num_workers=2",
        "ray.placement_strategy=STRICT_SPREAD",
        *sets,
    ]
    args = _cli(cluster, "train", "backview", str(ROOT / "configs" / "backview_debug.yaml"), "--output", str(out))
    return subprocess.Popen(
        [*args, *[a for s in settings for a in ("--set", s)]],
        cwd=ROOT,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def trained(cluster: RayCluster, built: dict, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("train") / "run"
    proc = _train(cluster, built["out"], out)
    _finish(proc, 500)
    return {"out": out, "pid": proc.pid, "losses": steps_done(out / METRICS_FILE)}


@slow
def test_training_workers_run_on_different_nodes(cluster: RayCluster, trained: dict):
    assert sorted(trained["losses"]) == list(range(1, MAX_STEPS + 1))
    workers = _actors(cluster, trained["pid"], "RayTrainWorker")
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2


def _logged_steps(out: Path) -> list[int]:
    """Steps in the order metrics.jsonl logged them (a restart logs some again)."""
    return [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]


@slow
def test_training_survives_losing_a_worker_node(cluster: RayCluster, built: dict, trained: dict, tmp_path: Path):
    """SIGKILL of the raylet of a worker node that holds a training worker, after two
    checkpoints: Ray Train (ray.max_failures=1) restarts the group on the nodes left and continues
    from the last checkpoint it registered, with the uninterrupted run's losses."""
    out = tmp_path / "run"
    proc = _train(cluster, built["out"], out, "ray.max_failures=1")
    try:
        deadline = time.monotonic() + 300
        workers: list[dict] = []
        while len(workers) < 2:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no training workers within 300 s"
            workers = _actors(cluster, proc.pid, "RayTrainWorker", "ALIVE")
        names = {node_id: name for name, node_id in cluster.alive_nodes().items()}
        victim = next(names[w["node_id"]] for w in workers if names[w["node_id"]] != "head")
        store = out / "ray" / out.name
        while (
            len(list(store.glob("checkpoint_*/know3d_state.json"))) < 2
            or max(steps_done(out / METRICS_FILE), default=0) < 2 * CHECKPOINT_EVERY + 1
        ):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.05)
        cluster.kill_raylet(victim)
        killed_at = max(steps_done(out / METRICS_FILE))
        _finish(proc, 500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at < MAX_STEPS
    logged = _logged_steps(out)
    restart = next(i for i in range(1, len(logged)) if logged[i] <= logged[i - 1])
    resumed_from = logged[restart] - 1
    assert resumed_from >= CHECKPOINT_EVERY and resumed_from % CHECKPOINT_EVERY == 0, logged  # a checkpoint
    assert resumed_from <= killed_at
    assert len(_actors(cluster, proc.pid, "RayTrainWorker")) >= 4  # a second worker group, same driver
    losses = steps_done(out / METRICS_FILE)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step, loss in trained["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, losses, trained["losses"])


# --------------------------------------------------------------------------- lost actors, without Ray


class _ActorLost(Exception):
    """Stands for ray.exceptions.RayActorError."""

    actor_init_failed = False


class _Ref:
    made = 0

    def __init__(self, value, ready: bool = True) -> None:
        self.value, self.ready, self.seq = value, ready, _Ref.made
        _Ref.made += 1


class _FakeRay:
    """What run_bounded asks of Ray: calls finish in the order they were made; waiting only on
    calls that can never finish is an error."""

    exceptions = SimpleNamespace(RayActorError=_ActorLost)

    def wait(self, refs: list, num_returns: int):
        ready = sorted((r for r in refs if r.ready), key=lambda r: r.seq)[:num_returns]
        assert ready, "run_bounded waits only on calls that never finish"
        return ready, [r for r in refs if r not in ready]

    def get(self, ref: _Ref):
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value


class _FakeActor:
    """Answers ``answers`` readiness probes (then none, or errors with ``dead``); its calls fail
    (its node lost) when ``lost``."""

    def __init__(self, lost: bool = False, answers: int = 10**6, dead: bool = False) -> None:
        self.lost, self.answers, self.dead, self.calls = lost, answers, dead, []

    @property
    def __ray_ready__(self):
        def probe() -> _Ref:
            self.answers -= 1
            if self.answers >= 0:
                return _Ref(True)
            return _Ref(_ActorLost("dead"), ready=True) if self.dead else _Ref(None, ready=False)

        return SimpleNamespace(remote=probe)

    def call(self, item) -> _Ref:
        self.calls.append(item)
        return _Ref(_ActorLost("node lost")) if self.lost else _Ref(item * 10)


def _fan_out(items: list, actors: list, requeue: int) -> list:
    done: list = []
    run_bounded(
        _FakeRay(), lambda i, a: a.call(i), items, actors * 2, lambda i, r: done.append((i, r)), requeue=requeue
    )
    return done


def test_work_of_a_lost_actor_goes_to_the_others_and_none_waits_for_it():
    """b answers once, then loses its node and never comes back (no room to restart): its two
    calls go to a, and nothing more is given to b."""
    a, b = _FakeActor(), _FakeActor(lost=True, answers=1)
    done = _fan_out(list(range(6)), [a, b], requeue=2)
    assert sorted(done) == [(i, i * 10) for i in range(6)]
    assert len(b.calls) == 2 and sorted(a.calls) == list(range(6))


def test_an_item_lost_too_often_fails_and_no_actor_left_fails_the_rest():
    # actors that restart at once but lose every call: each item is tried 1 + requeue times
    a, b = _FakeActor(lost=True), _FakeActor(lost=True)
    done = _fan_out([1, 2, 3], [a, b], requeue=1)
    assert sorted(i for i, _ in done) == [1, 2, 3] and all(isinstance(r, _ActorLost) for _, r in done)
    assert sorted(a.calls + b.calls) == [1, 1, 2, 2, 3, 3]
    # an actor dead for good (its probes fail): its slots leave, the items left get the error
    c = _FakeActor(lost=True, answers=1, dead=True)
    done = _fan_out(list(range(5)), [c], requeue=2)
    assert sorted(i for i, _ in done) == list(range(5)) and all(isinstance(r, _ActorLost) for _, r in done)
