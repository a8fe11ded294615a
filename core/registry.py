"""The MLflow Model Registry behind a narrow interface: register a trained model, read and move
the ``champion`` alias by a stated rule, record why.

Every trained model becomes a version of its registered model (``know3d-backview``, ...), with
its lineage as version tags: the training run, the data set's digest, the config's digest, the
git commit, the evaluation metrics (``metric.<name>``) and the cycle that made it. The alias
(``champion`` by default) moves only through :meth:`ModelRegistry.decide_and_promote`, whose
rule is :func:`decide`: the candidate must beat the champion's value of the configured metric
by the configured margin. Whatever the outcome, the version carries ``know3d.decision``
(``promoted`` / ``refused``) and ``know3d.reason`` (one line), so the registry answers "why is
this the champion" and "why was that one not".

The registry lives on the tracking server (``mlflow.tracking_uri``, or ``MLFLOW_TRACKING_URI``);
credentials come only from the environment, as for runs (:mod:`know3d.core.tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from know3d.core.tracking import check_uri

DECISION_TAG = "know3d.decision"
REASON_TAG = "know3d.reason"
FINGERPRINT_TAG = "know3d.fingerprint"
METRIC_PREFIX = "metric."


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    metric: str, candidate: float | None, champion: float | None, margin: float, higher_is_better: bool = True
) -> Decision:
    """Whether a candidate with ``candidate`` (its value of ``metric``) replaces a champion with
    ``champion`` (None = there is none): it must be better by more than ``margin`` (absolute)."""
    if candidate is None or candidate != candidate:  # missing or NaN
        return Decision(False, f"{metric} missing or not a number for the candidate")
    if champion is None:
        return Decision(True, f"first model: {metric} {candidate:.4g}")
    gain = candidate - champion if higher_is_better else champion - candidate
    relation = f"{metric} {candidate:.4g} vs champion {champion:.4g} (margin {margin:g})"
    if gain > margin:
        return Decision(True, f"better: {relation}")
    return Decision(False, f"not better by the margin: {relation}")


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]

    def metric(self, name: str) -> float | None:
        value = self.tags.get(METRIC_PREFIX + name)
        return float(value) if value is not None else None


class ModelRegistry:
    def __init__(self, tracking_uri: str) -> None:
        import mlflow

        from know3d.core.logs import quiet_third_party

        quiet_third_party()
        self.uri = check_uri(tracking_uri)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _version(self, mv: Any) -> Version:
        return Version(mv.name, str(mv.version), mv.run_id, mv.source, dict(mv.tags or {}))

    def _ensure(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(name)
        except MlflowException:
            self._client.create_registered_model(
                name, description="Know3D model trained by `know3d run`; the alias names the serving version."
            )

    def champion(self, name: str, alias: str = "champion") -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._version(self._client.get_model_version_by_alias(name, alias))
        except MlflowException:  # no such model or alias yet
            return None

    def versions(self, name: str) -> list[Version]:
        found = self._client.search_model_versions(f"name='{name}'")
        return sorted((self._version(v) for v in found), key=lambda v: int(v.version))

    def find(self, name: str, fingerprint: str) -> Version | None:
        """The version registered for a model with this fingerprint (a re-run registers nothing new)."""
        for version in self.versions(name) if self._exists(name) else []:
            if version.tags.get(FINGERPRINT_TAG) == fingerprint:
                return version
        return None

    def _exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def register(
        self, name: str, run_id: str, artifact_path: str, tags: dict[str, str], metrics: dict[str, float]
    ) -> Version:
        """A new version from the run's logged artifacts (``runs:/<run>/<artifact_path>``)."""
        self._ensure(name)
        all_tags = {**tags, **{METRIC_PREFIX + k: repr(float(v)) for k, v in metrics.items()}}
        mv = self._client.create_model_version(
            name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=all_tags
        )
        return self._version(mv)

    def decide_and_promote(
        self, version: Version, metric: str, margin: float, higher_is_better: bool = True, alias: str = "champion"
    ) -> Decision:
        """Apply :func:`decide` against the current champion; move the alias only on promotion;
        record the decision and its reason on the version either way."""
        current = self.champion(version.name, alias)
        if current is not None and current.version == version.version:
            return Decision(True, "already the champion")
        decision = decide(
            metric,
            version.metric(metric),
            current.metric(metric) if current else None,
            margin,
            higher_is_better,
        )
        if decision.promote:
            self._client.set_registered_model_alias(version.name, alias, version.version)
        self.tag(version, {DECISION_TAG: "promoted" if decision.promote else "refused", REASON_TAG: decision.reason})
        return decision

    def tag(self, version: Version, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_model_version_tag(version.name, version.version, key, value)

    def download(self, version: Version, dst: str) -> str:
        """The version's files in ``dst`` (a local folder); works for any artifact store."""
        import mlflow

        return mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=dst, tracking_uri=self.uri)
