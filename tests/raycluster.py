"""A real multi-node Ray cluster on this machine, for tests: a head (``ray start --head --block``)
and worker nodes, each its own process group with its own raylet, object store and temp folder,
all on the loopback address and guarded by Ray's token authentication (``RAY_AUTH_MODE=token``,
a fresh ``RAY_AUTH_TOKEN`` per cluster, given to every node and every client).

Everything is scoped to this cluster: no ``ray stop`` (it ends every Ray on the machine, other
people's test runs included); a node ends by killing its process group and its workers (which
the raylet starts in groups of their own). What the tests ask the cluster (nodes, actors, jobs)
runs in a short child process (``python raycluster.py query``) that reads the GCS tables
directly, so the test process never imports Ray with this cluster's token and never holds a
driver connection of its own.

Loopback in Ray 2.60: a node whose address is 127.0.0.1 binds its GCS, raylet and agents to
127.0.0.1 only (any other address: every interface). But ``ray start`` and ``ray.init`` replace
127.0.0.1/localhost, as node address and in ``--address``, by the machine's routable address
(``services.resolve_ip_for_localhost``) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and
``ray start --address`` (a worker node) refuses to run with that variable. So the head and every
client get the variable, and worker nodes start through :func:`_run_node`, which does what
``ray start --address ... --block`` does with Ray's ``Node`` class, the GCS address kept as given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
# get_node_ip_address() -> 127.0.0.1: `ray start --head` and ray.init keep 127.0.0.1 as given
LOCALHOST_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
OBJECT_STORE_BYTES = 80 * 2**20
RAY = Path(sys.executable).with_name("ray")
# GCS: declare a node dead ~2 s after its raylet stops answering (default ~15 s)
FAST_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, command name) of every live process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if rest[0] != "Z":
            found.append((int(entry.name), int(rest[1]), int(rest[2]), name))
    return found


def process_group(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the processes of a process group and of their descendants (the
    raylet starts its workers in process groups of their own)."""
    procs = _processes()
    mine = {pid for pid, _, group, _ in procs if group == pgid}
    grew = True
    while grew:
        more = {pid for pid, parent, _, _ in procs if parent in mine} - mine
        mine |= more
        grew = bool(more)
    return [(pid, name) for pid, _, _, name in procs if pid in mine]


def listening(pids: list[int]) -> list[str]:
    """``host:port`` of every TCP socket the processes listen on (/proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            host, port = fields[1].split(":")
            raw = bytes.fromhex(host)  # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.append(f"{ip}:{int(port, 16)}")
    return found


@dataclass
class Node:
    name: str
    num_cpus: int
    resources: dict[str, float]
    ip: str
    head: bool = False
    proc: subprocess.Popen | None = None
    temp_dir: Path | None = None
    log: Path | None = None
    restarts: int = field(default=0)

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # start_new_session: the `ray start` process leads its group

    def raylet_pid(self) -> int:
        pids = [pid for pid, name in process_group(self.pgid) if name == "raylet"]
        if len(pids) != 1:
            raise RuntimeError(f"{self.name}: expected one raylet in process group {self.pgid}, found {pids}")
        return pids[0]


class RayCluster:
    """``with RayCluster(root) as c: c.start_head(); c.add_node("node_a"); c.wait_for_nodes(2)``."""

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(32)
        self.port = free_port()
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of anything that talks to this cluster: token auth on, this token,
        no other cluster's address, no usage stats."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
            **LOCALHOST_ONLY,
        )
        env.update(extra)
        return env

    # ------------------------------------------------------------------ nodes

    def _start(self, node: Node) -> None:
        # AF_UNIX socket paths are short (108 bytes): a short temp folder per node, not pytest's
        node.temp_dir = Path(tempfile.mkdtemp(prefix=f"k3{node.name[-1]}", dir="/tmp"))
        node.log = self.root / f"{node.name}.{node.restarts}.log"
        agent_port = free_port()  # the default (52365) would clash between nodes and with other clusters
        if node.head:
            args = [
                str(RAY),
                "start",
                "--head",
                "--block",
                "--port",
                str(self.port),
                "--node-ip-address",
                node.ip,
                "--num-cpus",
                str(node.num_cpus),
                "--resources",
                json.dumps(node.resources),
                "--object-store-memory",
                str(OBJECT_STORE_BYTES),
                "--temp-dir",
                str(node.temp_dir),
                "--dashboard-agent-listen-port",
                str(agent_port),
                "--min-worker-port",
                "0",  # workers on ports the OS picks: no clash between the nodes' worker port ranges
                "--max-worker-port",
                "0",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            ]
            env = self.env(**FAST_HEALTH_CHECK)
        else:
            spec = {
                "gcs": self.address,
                "ip": node.ip,
                "name": node.name,
                "num_cpus": node.num_cpus,
                "resources": node.resources,
                "temp_dir": str(node.temp_dir),
                "agent_port": agent_port,
            }
            args = [sys.executable, __file__, "node", json.dumps(spec)]
            env = self.env()
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def start_head(self, num_cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        node = self.nodes["head"] = Node("head", num_cpus, resources or {"head": 1}, LOOPBACK, head=True)
        self._start(node)
        self.wait_for_nodes(1)
        return node

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        node = self.nodes[name] = Node(name, num_cpus, resources or {name: 1}, LOOPBACK)
        self._start(node)
        return node

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the node's raylet (its workers follow); returns the raylet's pid."""
        pid = self.nodes[name].raylet_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop_node(self, name: str) -> None:
        """SIGKILL everything of the node (its process group) and remove its temp folder."""
        node = self.nodes[name]
        if node.proc is None:
            return
        for pid, _ in process_group(node.pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while process_group(node.pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        node.proc = None
        if node.temp_dir is not None:
            subprocess.run(["rm", "-rf", str(node.temp_dir)], check=False)

    def restart_node(self, name: str) -> Node:
        """The node again, as a new raylet (a new node id) with the same resources."""
        self.stop_node(name)
        node = self.nodes[name]
        node.restarts += 1
        self._start(node)
        return node

    def shutdown(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.stop_node(name)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ state

    def query(self, timeout: float = 60) -> dict:
        """Nodes, actors and jobs of the cluster, read from the GCS in a child process:
        ``{"nodes": [{node_id, alive, resources}], "actors": [{class_name, node_id, job_id,
        state, num_restarts}], "jobs": [{job_id, driver_pid}]}``."""
        res = subprocess.run(
            [sys.executable, __file__, "query", self.address],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise RuntimeError(f"cluster query failed: {res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def probe(self, env: dict[str, str]) -> str:
        """What the GCS answers a client with ``env`` (another token, none): ``ok: N nodes`` or
        the error, in one line."""
        res = subprocess.run(
            [sys.executable, __file__, "probe", self.address], env=env, capture_output=True, text=True, timeout=60
        )
        return (res.stdout.strip().splitlines() or [res.stderr[-500:]])[-1]

    def pids(self) -> list[int]:
        """Every process of the cluster's nodes (and their workers)."""
        return [pid for node in self.nodes.values() if node.proc is not None for pid, _ in process_group(node.pgid)]

    def alive_nodes(self) -> dict[str, str]:
        """Node name (its custom resource) -> node id, of the alive nodes."""
        names = {}
        for n in self.query()["nodes"]:
            if n["alive"]:
                name = next((k for k in n["resources"] if k in self.nodes), None)
                if name is not None:
                    names[name] = n["node_id"]
        return names

    def wait_for_nodes(self, count: int, timeout: float = 90) -> dict[str, str]:
        """Wait until ``count`` of this cluster's nodes are alive; returns name -> node id."""
        deadline = time.monotonic() + timeout
        alive: dict[str, str] = {}
        while time.monotonic() < deadline:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                alive = self.alive_nodes()
            except (RuntimeError, subprocess.TimeoutExpired):
                alive = {}
            if len(alive) >= count:
                return alive
            time.sleep(0.5)
        raise TimeoutError(f"{len(alive)} of {count} nodes alive after {timeout:g} s: {alive}")

    def wait_until_dead(self, node_id: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(n["node_id"] == node_id and n["alive"] for n in self.query()["nodes"]):
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {node_id} still alive after {timeout:g} s")


def _run_node(spec: dict) -> None:
    """A worker node: what ``ray start --address ... --block`` does, without its rewriting of a
    loopback GCS address into the machine's routable one. Ends, with all its processes, when its
    raylet dies (as ``--block`` does) or on SIGTERM."""
    from ray._private import ray_constants
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    params = RayParams(
        gcs_address=spec["gcs"],
        node_ip_address=spec["ip"],
        node_name=spec["name"],
        num_cpus=spec["num_cpus"],
        resources=spec["resources"],
        object_store_memory=OBJECT_STORE_BYTES,
        temp_dir=spec["temp_dir"],
        min_worker_port=0,
        max_worker_port=0,
        dashboard_agent_listen_port=spec["agent_port"],
        include_log_monitor=False,  # the head's log monitor is enough on one machine
    )
    node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # atexit: the node's processes end too
    print(f"node {spec['name']} at {spec['ip']} started", flush=True)
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    while raylet.poll() is None:
        time.sleep(0.2)
    print(f"raylet exited ({raylet.returncode}); stopping the node", flush=True)
    node.kill_all_processes(check_alive=False, allow_graceful=False)


def _probe(address: str) -> str:
    """The child side of :meth:`RayCluster.probe`: one GCS call with the token of the environment."""
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._raylet import GcsClient

    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)  # as ray.init does (C++ aborts)
        return f"ok: {len(GcsClient(address=address).get_all_node_info(timeout=10))} nodes"
    except Exception as exc:  # noqa: BLE001 - the answer is what the test looks at
        return f"{type(exc).__name__}: {exc}"


def _query(address: str) -> dict:
    """The child side of :meth:`RayCluster.query` (token from the environment)."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    state = GlobalState()
    state._initialize_global_state(
        GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
    )
    nodes = [
        {
            "node_id": n["NodeID"],
            "alive": bool(n["Alive"]),
            "address": n["NodeManagerAddress"],
            "resources": n.get("Resources", {}),
        }
        for n in state.node_table()
    ]
    actors = [
        {
            "actor_id": a["ActorID"],
            "class_name": a["ActorClassName"],
            "node_id": a["Address"]["NodeID"],
            "job_id": a["JobID"],
            "state": a["State"],
            "num_restarts": a["NumRestarts"],
        }
        for a in state.actor_table(None).values()
    ]
    jobs = [{"job_id": j["JobID"], "driver_pid": j["DriverPid"]} for j in state.job_table()]
    return {"nodes": nodes, "actors": actors, "jobs": jobs}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "query":
        print(json.dumps(_query(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "probe":
        print(_probe(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "node":
        _run_node(json.loads(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} query|probe HOST:PORT | node SPEC_JSON")
