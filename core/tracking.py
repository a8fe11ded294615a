"""One narrow metrics interface, MLflow behind it.

Every stage logs through :class:`Tracker`, with one convention:

* params: the stage's resolved config flattened (``seed``, ``render.resolution``); what the run
  adds besides its config goes under ``run.`` (``run.world_size``);
* tags: ``know3d.stage`` (``data.build``, ``train.backview``, ``eval.shapes``,
  ``eval.backviews``), MLflow's source name/type and git commit, and the lineage tags below;
* run names ``<stage>:<output folder>``, so two builds into different folders differ;
* lineage: a data build logs its shard set as an MLflow dataset (digest = the shard index's
  digest); a training run logs the same dataset as its input and tags the build's run id
  (``know3d.data.run_id``); an evaluation tags the model it measured (``know3d.model.uri``) and
  its training run (``know3d.train.run_id``). :mod:`know3d.core.lineage` walks these links.

Experiments are created as MLflow "custom model development" experiments (the classic runs
view). The default backend is a sqlite file ``mlflow.db`` in the working folder;
any MLflow tracking URI can be set in the config. Credentials for remote servers come from the
environment (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``,
read by MLflow itself) and are never logged; a URI with ``user:password@`` is refused.

Outages: a stage never fails or waits long because its tracking store is down. A call the store
does not answer (connection refused or reset, a timeout, MLflow's retries of 5xx/429 used up, a
database that cannot be reached) switches the run's tracker to a buffer: that record and every
later one go, in order, to ``<output>/mlflow-buffer/<run>.jsonl`` (artifacts copied beside it),
one warning line names the server and the file, and the buffer is replayed in order at the first
call after :data:`RETRY_INTERVAL_S` at which the server answers, and at :meth:`close`. A server
still down at ``close`` leaves the buffer on disk and one line saying how to send it later
(:func:`replay_buffer`, ``python -m know3d.core.tracking replay FILE``). A request the store
answers with a refusal (4xx) is an error as before. MLflow's own HTTP retries are limited
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``..._BACKOFF_FACTOR=1``, ``..._TIMEOUT=60``) unless the
environment sets them, so a dead server costs a run a few seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from know3d.core.config import TrackingConfig, url_credentials
from know3d.core.io import atomic_write

log = logging.getLogger(__name__)


STAGE_TAG = "know3d.stage"
DATA_RUN_TAG = "know3d.data.run_id"
TRAIN_RUN_TAG = "know3d.train.run_id"
MODEL_URI_TAG = "know3d.model.uri"
_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

#: seconds between two attempts to reach a store that did not answer (replay at the next call after)
RETRY_INTERVAL_S = 15.0
#: the folder, inside a run's output, that holds the records an unreachable store has not taken yet
BUFFER_DIR = "mlflow-buffer"
REPLAY_COMMAND = "know3d mlflow replay"
_BUFFER_FORMAT = "know3d.mlflow-buffer"
#: MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) let one call to a dead server take
#: about 4 minutes; these apply only where the environment does not set its own
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def run_name(stage: str, output: str | Path) -> str:
    """``<stage>:<output folder name>``: what tells two runs of one stage apart in the UI."""
    return f"{stage}:{Path(output).name or output}"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def default_tracking_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / 'mlflow.db'}"


def check_uri(uri: str) -> str:
    if where := url_credentials(uri):
        raise ValueError(
            f"mlflow.tracking_uri must not contain credentials ({where}); set MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or the database's own variables (PGPASSWORD), "
            "in the environment instead"
        )
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live next to the database, not in the current folder."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def git_commit(path: Path | None = None) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path or Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def limit_http_retries() -> None:
    """MLflow's HTTP retry settings (:data:`HTTP_LIMITS`), unless the environment sets them."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


class _QuietRetries(logging.Filter):
    """urllib3 logs a line for each of MLflow's retries of a request; the tracker says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Retrying") and "/api/2.0/mlflow" in record.getMessage())


_QUIET_RETRIES = _QuietRetries()


def _quiet_retries() -> None:
    from know3d.core.logs import verbose

    logger = logging.getLogger("urllib3.connectionpool")
    if not verbose() and _QUIET_RETRIES not in logger.filters:
        logger.addFilter(_QUIET_RETRIES)


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer; the records stay in their buffer file."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests
        import urllib3

        types += [
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.RetryError,  # MLflow's retries of 408/429/5xx used up
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.ProtocolError,
            urllib3.exceptions.TimeoutError,
        ]
    except ImportError:  # pragma: no cover - both come with mlflow
        pass
    try:
        from sqlalchemy.exc import OperationalError

        types.append(OperationalError)  # a database store that cannot be reached (or is locked)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the store did not answer (worth buffering and trying again), as
    opposed to a refusal of the request. MLflow wraps the HTTP error without ``from``, so the
    whole chain of causes and contexts is looked at."""
    transient = _transient_types()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, transient):
            return True
        if getattr(current, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        current = current.__cause__ or current.__context__
    return False


def _reason(exc: BaseException) -> str:
    """A few words on why the store did not answer (no URL, no headers)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        for words in ("connection refused", "timed out", "connection reset", "too many", "could not connect"):
            if words in text:
                return words
        current = current.__cause__ or current.__context__
    return type(exc).__name__


class _Buffer:
    """Records a store has not taken yet, in order: in memory, and in a JSON-lines file (a header
    line, then one record a line) that outlives the process."""

    def __init__(self, path: Path, header: dict[str, Any], records: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.header = header
        self.records = records if records is not None else []

    @property
    def artifacts(self) -> Path:
        return self.path.with_suffix(".artifacts")

    @classmethod
    def create(cls, folder: Path, header: dict[str, Any]) -> _Buffer:
        name = f"{header.get('run_id') or 'new-run'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        buffer = cls(folder / name, header)
        buffer.save()
        return buffer

    @classmethod
    def load(cls, path: Path) -> _Buffer:
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines or lines[0].get("format") != _BUFFER_FORMAT:
            raise ValueError(f"{path}: not an MLflow buffer of know3d")
        return cls(Path(path), lines[0], lines[1:])

    def add(self, record: dict[str, Any]) -> None:
        if record["op"] == "artifact":  # keep the file as it is now, for a replay much later
            src = Path(record["path"])
            dest = self.artifacts / str(len(list(self.artifacts.glob("*"))) if self.artifacts.is_dir() else 0)
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / src.name
            # a copy, not a link: a file rewritten in place later must not change what was logged
            if src.is_dir():
                shutil.copytree(src, target)
            else:
                shutil.copy2(src, target)
            record = {**record, "path": str(target.relative_to(self.artifacts))}
        self.records.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in [self.header, *self.records]))

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.artifacts, ignore_errors=True)
        try:
            self.path.parent.rmdir()  # the buffer folder, when it holds nothing else
        except OSError:
            pass


class _StillDown(Exception):
    pass


class MlflowTracker:
    """MLflow run for one stage invocation (rank 0 / the driver only). Every call becomes one
    record (``start``, ``params``, ``metrics``, ``tags``, ``dataset``, ``artifact``, ``end``) sent
    to the store at once, or, while the store does not answer, kept in a :class:`_Buffer` and
    replayed in order (see the module's docstring)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        stage: str,
        name: str,
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
        start_time: float | None = None,
        output: str | Path | None = None,
    ) -> None:
        from know3d.core.logs import quiet_third_party

        quiet_third_party()
        _quiet_retries()
        limit_http_retries()
        uri = check_uri(cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
        self._setup(uri, Path(output) / BUFFER_DIR if output is not None else None)
        all_tags = {
            "mlflow.runName": cfg.run_name or name,
            STAGE_TAG: stage,
            "mlflow.source.name": f"know3d {stage.replace('.', ' ')}",
            "mlflow.source.type": "LOCAL",
            **(tags or {}),
        }
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        started = int((start_time if start_time is not None else time.time()) * 1000)
        start = {"op": "start", "experiment": cfg.experiment, "tags": all_tags, "start_time": started}
        self._submit({**start, "resume_run_id": resume_run_id})
        if self.run_id is None and resume_run_id is not None:
            self.run_id = resume_run_id  # buffered: the run it will continue once the store answers

    def _setup(self, uri: str, buffer_dir: Path | None) -> None:
        self.tracking_uri = uri
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.retry_interval = RETRY_INTERVAL_S
        self._store: Any = None
        self._buffer_dir = buffer_dir
        self._buffer: _Buffer | None = None
        self._next_try = 0.0
        self._closed = False
        self._lock = threading.RLock()

    @property
    def _client(self) -> Any:
        """The MLflow client, made at first use (a database store connects when it is made)."""
        if self._store is None:
            import mlflow

            self._store = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._store

    # ------------------------------------------------------------------ the public calls

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit({"op": "params", "params": {k: str(v)[:6000] for k, v in flatten(params).items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [[k, float(v), now, step or 0] for k, v in metrics.items() if v is not None]
        if items:
            self._submit({"op": "metrics", "metrics": items})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record a data set (name, digest, where it lives) on the run: a build's output
        (``context="output"``) or a training run's input. ``digest`` is the shard index's digest,
        of which MLflow stores the first 32 characters (its column holds 36) — the same prefix
        for every stage, so the runs that share a data set share its digest."""
        self._submit({"op": "dataset", "name": name, "digest": digest[:32], "source": source, "context": context})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def close(self, status: str = "FINISHED") -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._submit({"op": "end", "status": status, "end_time": int(time.time() * 1000)}, flush=True)
            if self._buffer is not None:
                log.warning(
                    "mlflow server %s still unreachable: %d records of this run kept in %s; send them later with: %s %s",
                    self.tracking_uri,
                    len(self._buffer.records),
                    self._buffer.path,
                    REPLAY_COMMAND,
                    self._buffer.path,
                )
            self.run_id = None

    @property
    def buffer_path(self) -> Path | None:
        """The buffer file while the store does not answer, else None."""
        return self._buffer.path if self._buffer is not None else None

    # ------------------------------------------------------------------ sending and buffering

    def _submit(self, record: dict[str, Any], flush: bool = False) -> None:
        with self._lock:
            if self._buffer is None:
                try:
                    self._send(record)
                    return
                except Exception as exc:
                    if not is_unreachable(exc):
                        raise
                    self._start_buffering(exc)
            assert self._buffer is not None
            self._buffer.add(record)
            if flush or time.monotonic() >= self._next_try:
                self._flush()

    def _start_buffering(self, exc: BaseException) -> None:
        header = {"format": _BUFFER_FORMAT, "tracking_uri": self.tracking_uri, "run_id": self.run_id}
        folder = self._buffer_dir
        try:
            if folder is None:
                raise OSError("no output folder")
            self._buffer = _Buffer.create(folder, header)
        except OSError:
            import tempfile

            self._buffer = _Buffer.create(Path(tempfile.gettempdir()) / "know3d-mlflow-buffer", header)
        self._next_try = time.monotonic() + self.retry_interval
        log.warning(
            "mlflow server %s unreachable (%s): buffering this run's records in %s, retrying every %gs",
            self.tracking_uri,
            _reason(exc),
            self._buffer.path,
            self.retry_interval,
        )

    def _answers(self) -> bool:
        """A cheap look at an HTTP server (any answer counts, an auth refusal too); other stores
        are asked by replaying."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=3)
        except requests.RequestException:
            return False
        return True

    def _flush(self) -> bool:
        """Replay the buffer in order; True when all of it went through (the file is removed)."""
        buffer = self._buffer
        assert buffer is not None
        self._next_try = time.monotonic() + self.retry_interval
        if not self._answers():
            return False
        records, done = buffer.records, 0
        try:
            while done < len(records):
                record, taken = records[done], 1
                if record["op"] == "metrics":  # consecutive metric records: one request
                    items = list(record["metrics"])
                    while done + taken < len(records) and records[done + taken]["op"] == "metrics":
                        if len(items) + len(records[done + taken]["metrics"]) > 500:
                            break
                        items += records[done + taken]["metrics"]
                        taken += 1
                    record = {"op": "metrics", "metrics": items}
                try:
                    self._send(record, base=buffer.artifacts)
                except Exception as exc:
                    if is_unreachable(exc):
                        raise _StillDown from exc
                    log.warning(
                        "mlflow server %s refused a buffered %s record: %s", self.tracking_uri, record["op"], exc
                    )
                    with buffer.path.with_suffix(".rejected.jsonl").open("a") as fh:
                        fh.write(json.dumps(record) + "\n")
                done += taken
        except _StillDown:
            del records[:done]
            buffer.header["run_id"] = self.run_id
            buffer.save()
            return False
        buffer.discard()
        self._buffer = None
        log.warning("mlflow server %s answers again: %d buffered records replayed", self.tracking_uri, done)
        return True

    def _send(self, record: dict[str, Any], base: Path | None = None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        op, client = record["op"], self._client
        if op == "start":
            self._start(record)
        elif op == "params":
            items = [Param(k, v) for k, v in record["params"].items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i : i + 100])
        elif op == "metrics":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
            for i in range(0, len(metrics), 500):
                client.log_batch(self.run_id, metrics=metrics[i : i + 500])
        elif op == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif op == "dataset":
            source = json.dumps({"uri": record["source"]})
            dataset = Dataset(name=record["name"], digest=record["digest"], source_type="webdataset", source=source)
            tags = [InputTag("mlflow.data.context", record["context"])]
            client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])
        elif op == "artifact":
            path = Path(record["path"]) if base is None else base / record["path"]
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), record["artifact_path"])
            else:
                client.log_artifact(self.run_id, str(path), record["artifact_path"])
        elif op == "end":
            if self.run_id is not None:
                client.set_terminated(self.run_id, status=record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")

    def _start(self, record: dict[str, Any]) -> None:
        experiment_id = self._experiment(record["experiment"], self.tracking_uri)
        resume = record.get("resume_run_id")
        if resume is not None:  # a resumed training run continues its MLflow run
            try:
                run = self._client.get_run(resume)
            except Exception as exc:
                if is_unreachable(exc):
                    raise
                run = None  # deleted, or another store: start a new run
            if run is not None:
                self._client.update_run(resume, status="RUNNING")
                self.run_id, self.experiment_id = resume, run.info.experiment_id
                return
        run = self._client.create_run(experiment_id, start_time=record["start_time"], tags=record["tags"])
        self.run_id, self.experiment_id = run.info.run_id, experiment_id

    def _experiment(self, name: str, uri: str) -> str:
        """The experiment's id, created as a classic model-development experiment if new."""
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            tags = {_EXPERIMENT_KIND[0]: _EXPERIMENT_KIND[1]}
            return self._client.create_experiment(name, artifact_location=artifact_root(uri), tags=tags)
        if _EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older version: pick the classic view
            self._client.set_experiment_tag(experiment.experiment_id, *_EXPERIMENT_KIND)
        return experiment.experiment_id


def replay_buffer(path: str | Path, tracking_uri: str | None = None) -> str | None:
    """Send the records a tracker kept in ``path`` (``<output>/mlflow-buffer/*.jsonl``) to their
    store (or to ``tracking_uri``), in order; the file goes once all of them are through. Returns
    the run's id; raises :class:`TrackingUnavailable` (the file kept, minus what went through)
    while the store does not answer. A buffer without its ``end`` record (the process died)
    leaves the run as the process left it."""
    _quiet_retries()
    limit_http_retries()
    buffer = _Buffer.load(Path(path))
    uri = check_uri(tracking_uri or buffer.header["tracking_uri"])
    tracker = MlflowTracker.__new__(MlflowTracker)
    tracker._setup(uri, None)
    tracker.run_id = buffer.header.get("run_id")
    tracker._buffer = buffer
    if not tracker._flush():
        raise TrackingUnavailable(f"mlflow server {uri} does not answer; {path} kept")
    return tracker.run_id


def make_tracker(
    cfg: TrackingConfig,
    *,
    stage: str,
    output: str | Path,
    tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    start_time: float | None = None,
) -> Tracker:
    """The MLflow run of one stage invocation (``stage``, named after its ``output`` folder), or
    a no-op tracker when tracking is disabled. ``start_time`` (epoch seconds) when the run is
    created after its work, so the UI shows the real duration."""
    if not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, stage, run_name(stage, output), tags, resume_run_id, start_time, output=output)
