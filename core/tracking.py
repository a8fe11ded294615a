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
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from know3d.core.config import TrackingConfig

log = logging.getLogger(__name__)


STAGE_TAG = "know3d.stage"
DATA_RUN_TAG = "know3d.data.run_id"
TRAIN_RUN_TAG = "know3d.train.run_id"
MODEL_URI_TAG = "know3d.model.uri"
_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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
    parts = urlsplit(uri)
    if parts.password or (parts.username and parts.scheme in ("http", "https")):
        raise ValueError(
            "mlflow.tracking_uri must not contain credentials; set MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
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


class MlflowTracker:
    """MLflow run for one stage invocation (rank 0 / the driver only)."""

    def __init__(
        self,
        cfg: TrackingConfig,
        stage: str,
        name: str,
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
        start_time: float | None = None,
    ) -> None:
        import mlflow

        from know3d.core.logs import quiet_third_party

        quiet_third_party()
        self._mlflow = mlflow
        uri = check_uri(cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_id = self._experiment(cfg.experiment, uri)
        if resume_run_id is not None:  # a resumed training run continues its MLflow run
            try:
                run = self._client.get_run(resume_run_id)
            except Exception:  # noqa: BLE001 - deleted or another store: start a new run
                run = None
            if run is not None:
                self._client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
                self.tracking_uri, self.experiment_id = uri, run.info.experiment_id
                return
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
        run = self._client.create_run(experiment_id, start_time=started, tags=all_tags)
        self.run_id: str | None = run.info.run_id
        self.tracking_uri = uri
        self.experiment_id = experiment_id

    def _experiment(self, name: str, uri: str) -> str:
        """The experiment's id, created as a classic model-development experiment if new."""
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            tags = {_EXPERIMENT_KIND[0]: _EXPERIMENT_KIND[1]}
            return self._client.create_experiment(name, artifact_location=artifact_root(uri), tags=tags)
        if _EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older version: pick the classic view
            self._client.set_experiment_tag(experiment.experiment_id, *_EXPERIMENT_KIND)
        return experiment.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """Record a data set (name, digest, where it lives) on the run: a build's output
        (``context="output"``) or a training run's input. ``digest`` is the shard index's digest,
        of which MLflow stores the first 32 characters (its column holds 36) — the same prefix
        for every stage, so the runs that share a data set share its digest."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:32], source_type="webdataset", source=json.dumps({"uri": source}))
        self._client.log_inputs(
            self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, v)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
            self.run_id = None


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
    return MlflowTracker(cfg, stage, run_name(stage, output), tags, resume_run_id, start_time)
