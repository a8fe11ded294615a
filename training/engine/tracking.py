"""A training run's MLflow record, written by rank 0 only.

Params (the resolved config, flattened, plus what the trainer adds) and the input data set are
logged once per run: a run resumed from a checkpoint continues the MLflow run whose id the
checkpoint holds, so its metric history stays one curve. Other ranks hold a no-op tracker, so
trainers call every method on every rank without asking who they are.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel

from know3d.core.config import TrackingConfig, dump_config
from know3d.core.shards import DatasetRef
from know3d.core.tracking import DATA_RUN_TAG, NullTracker, Tracker, make_tracker
from know3d.training.engine.env import WorkerEnv


class TrainingTracker:
    """Use as a context manager: the MLflow run ends FINISHED, or FAILED on an exception."""

    def __init__(
        self, cfg: TrackingConfig, env: WorkerEnv, output: Path, stage: str, resume_run_id: str | None = None
    ) -> None:
        self.output = Path(output)
        self.resumed = resume_run_id is not None
        self._main = env.is_main
        self._tracker: Tracker = NullTracker()
        if self._main:
            self.output.mkdir(parents=True, exist_ok=True)
            self._tracker = make_tracker(cfg, stage=stage, output=self.output, resume_run_id=resume_run_id)
            uri = getattr(self._tracker, "tracking_uri", None)
            if self._tracker.run_id:
                env.say(f"mlflow run {self._tracker.run_id} ({uri})")

    @property
    def run_id(self) -> str | None:
        return self._tracker.run_id

    def start(self, config: BaseModel, params: dict[str, Any], datasets: list[DatasetRef]) -> None:
        """Record the run: ``<output>/config.yaml`` every time; for a new run only, the config as
        params (plus ``params`` under ``run.``), the input data sets with the digests their builds
        logged, and the builds' run ids (tag ``know3d.data.run_id``)."""
        if not self._main:
            return
        if not self.resumed:
            self._tracker.log_params({**config.model_dump(mode="json"), "run": params})
            for ref in datasets:
                self._tracker.log_dataset(ref.name, ref.digest, ref.source, context="training")
            builds = [ref.run_id for ref in datasets if ref.run_id]
            if builds:
                self._tracker.set_tags({DATA_RUN_TAG: ",".join(builds)})
        (self.output / "config.yaml").write_text(dump_config(config))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._tracker.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        self._tracker.log_artifact(path, artifact_path)

    def __enter__(self) -> TrainingTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._tracker.close("FAILED" if kind is not None else "FINISHED")
