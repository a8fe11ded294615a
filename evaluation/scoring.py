"""The ULIP / Uni3D scorer as one long-lived object (Ray runs it as an actor, tests call it directly).

Loading the models costs seconds to minutes and ~22 GB for the full sizes, so one holder
loads them once and scores every uid; a load failure is kept as a message (:meth:`info`)
instead of raised, so the driver can stop the run with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ScoringActor:
    """Holds the ULIP / Uni3D models; one :meth:`score` call per uid."""

    def __init__(self, spec_json: dict) -> None:
        from know3d.evaluation.semantic import CheckpointError, ScorerSpec, SemanticScorer

        self.scorer, self.error = None, None
        try:
            self.scorer = SemanticScorer(ScorerSpec(**spec_json))
        except CheckpointError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while loading: one clear line
            self.error = f"cannot load the ULIP/Uni3D scorers: {type(exc).__name__}: {str(exc)[:300]}"

    def info(self) -> dict:
        """``{"metrics", "device"}`` of the loaded scorer, or ``{"error"}`` when loading failed."""
        if self.scorer is None:
            return {"error": self.error}
        return {"metrics": self.scorer.metrics, "device": self.scorer.device}

    def score(self, points: np.ndarray, image: str) -> dict:
        """``{"scores"}`` of one uid, or ``{"error"}``: a bad condition image fails this uid only."""
        try:
            return {"scores": self.scorer.score(points, Path(image))}
        except Exception as exc:  # noqa: BLE001 - reported for this uid only
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def add_scores(result: dict, reply: dict) -> dict:
    """Merge a scorer reply into a measured result; a scoring failure keeps the geometry."""
    if "error" in reply:
        result["semantic_error"] = reply["error"]
    else:
        result["semantic"] = reply["scores"]
    return result
