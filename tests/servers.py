"""Real servers for the tests: ``mlflow server`` (sqlite or PostgreSQL backend, artifact proxy)
and a throwaway PostgreSQL cluster, each on 127.0.0.1 and a free port, in its own process group.

PostgreSQL refuses to run as root. Under root, the cluster's folder is given to an unprivileged
user (``postgres`` if it exists, else ``nobody``) and ``initdb`` / ``postgres`` run as that user
(``subprocess.Popen(user=, group=)``); under any other user, as that user. Trust authentication
on loopback only (``listen_addresses=127.0.0.1``), the unix socket inside the cluster's folder,
which is made with :func:`tempfile.mkdtemp` (pytest's own tmp folders are private to root, so
the unprivileged user could not reach them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _pg_bin() -> Path:
    """Where ``initdb`` and ``postgres`` are: $KNOW3D_TEST_PG_BIN, /usr/local/bin, the PATH, or
    the newest Debian-style /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("KNOW3D_TEST_PG_BIN"):
        return Path(os.environ["KNOW3D_TEST_PG_BIN"])
    found = shutil.which("initdb")
    candidates = [Path("/usr/local/bin"), *([Path(found).parent] if found else [])]
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()],
        reverse=True,
    )
    return next((c for c in candidates if (c / "initdb").is_file()), Path("/usr/local/bin"))


PG_BIN = _pg_bin()
MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """``sig`` to the process group of ``proc`` (it leads its own), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=wait)


class MlflowServer:
    """``mlflow server`` with ``backend`` (a sqlite or PostgreSQL URI) and the artifact proxy
    (``--serve-artifacts``, files under ``artifacts``). ``kill`` (SIGKILL, no clean-up) and
    ``start`` again on the same port and backend stage an outage."""

    def __init__(self, backend: str, root: Path, name: str = "sqlite") -> None:
        self.backend = backend
        self.name = name
        self.root = Path(root)
        self.artifacts = self.root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.launch()
        return self.wait(timeout)

    def launch(self) -> MlflowServer:
        """Start the server without waiting for it (:meth:`wait`)."""
        cmd = [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.artifacts),
            "--serve-artifacts",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: one process less
        self.starts += 1
        # its own working folder: whatever a client would write "locally" cannot land next to it
        cwd = self.root / "cwd"
        cwd.mkdir(exist_ok=True)
        with open(self.root / f"server-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait(self, timeout: float = 120.0) -> MlflowServer:
        """Until ``/health`` answers 200 (the database migrated, the app up)."""
        assert self.proc is not None, "not launched"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self.healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s:\n{self.log()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as res:
                return res.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("server-*.log")))

    def kill(self) -> None:
        """SIGKILL to the whole server (master and workers), as a crash would."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)
            self.proc = None


def postgres_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user (postgres or nobody) to run PostgreSQL as")


def postgres_missing() -> str | None:
    """Why no cluster can be started here, or None."""
    missing = [name for name in ("initdb", "postgres") if not (PG_BIN / name).is_file()]
    if missing:
        return f"PostgreSQL binaries not found in {PG_BIN} ({', '.join(missing)}); set KNOW3D_TEST_PG_BIN"
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster: ``initdb`` into a fresh temp folder, ``postgres`` on
    127.0.0.1:<free port> (unix socket in the folder, fsync off), one database ``mlflow``."""

    def __init__(self, database: str = "mlflow") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="know3d-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.database = database
        self.proc: subprocess.Popen | None = None
        self._ids: tuple[int, int] | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses root: an unprivileged user owns and runs the cluster
            self.user = postgres_user()
            entry = pwd.getpwnam(self.user)
            self._ids = entry.pw_uid, entry.pw_gid
            os.chown(self.root, *self._ids)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    @property
    def uri(self) -> str:
        """The backend URI for MLflow: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3,
        the environment has psycopg2, so the driver is named."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _as_user(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "HOME": str(self.root)}
        if self._ids is not None:
            uid, gid = self._ids
            kwargs.update(user=uid, group=gid, extra_groups=[])
        return subprocess.Popen(cmd, env=env, cwd=self.root, **kwargs)

    def start(self, timeout: float = 60.0) -> PostgresCluster:
        init = self._as_user(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = init.communicate(timeout=timeout)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{out.decode(errors='replace')[-3000:]}")
        # loopback only (listen_addresses), trust only for 127.0.0.1 (initdb's pg_hba.conf)
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        cmd = [str(PG_BIN / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.root / "postgres.log", "wb") as log:
            self.proc = self._as_user(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self._create_database():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections after {timeout:.0f}s:\n{self.log()[-3000:]}")

    def _create_database(self) -> bool:
        import psycopg2

        try:
            conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        except psycopg2.OperationalError:
            return False
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()
        return True

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGINT)  # fast shutdown
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
