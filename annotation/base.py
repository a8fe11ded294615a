"""One interface for every annotator, and the registry that names them.

An annotator answers :class:`PairRequest` s — one front/back pair each, with the pair's visible
named parts as a hint when it wants them — with one record per request, in order::

    {"components": [...], "status": "ok" | "repaired" | "no_parts" | "annotation_failed", ...}

Adding a backend is one new module with a class that fits :class:`Annotator`, plus one line in
:data:`ANNOTATORS` (and its settings section in :mod:`know3d.annotation.config`). Modules are
imported only when their backend is chosen, so a build with the parts annotator never imports
transformers or aiohttp.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from know3d.annotation.config import AnnotateConfig


@dataclass(slots=True)
class PairRequest:
    """What an annotator sees of one pair."""

    key: str  # cache key of the pair
    front_png: bytes
    back_png: bytes
    hint: list[str] = field(default_factory=list)  # named parts visible from the back


@dataclass(frozen=True, slots=True)
class Replicas:
    """How the build spreads a local model over Ray actors."""

    num_actors: int
    batch_size: int  # requests per actor call are 4x this
    num_gpus_per_actor: float  # used when the cluster has GPUs


class Annotator(Protocol):
    def __init__(self, cfg: AnnotateConfig) -> None: ...

    @staticmethod
    def wants_parts(cfg: AnnotateConfig) -> bool:
        """Whether requests carry the pair's visible named parts as their hint."""
        ...

    @staticmethod
    def model_name(cfg: AnnotateConfig) -> str:
        """Recorded with every record and part of the cache key."""
        ...

    @staticmethod
    def cache_salt(cfg: AnnotateConfig) -> str:
        """Settings besides model and prompt version that change the answers ('' if none)."""
        ...

    @staticmethod
    def replicas(cfg: AnnotateConfig) -> Replicas | None:
        """Replicas on Ray actors for a local model; None = call it from the driver (a cheap
        rule, or the client of a served model that batches by itself)."""
        ...

    def annotate(self, requests: list[PairRequest]) -> list[dict[str, Any]]:
        """One record per request, in order; never raises for one pair's sake."""
        ...


#: backend name -> "module:Class"; "none" (no annotation) has no annotator
ANNOTATORS: dict[str, str] = {
    "parts": "know3d.annotation.parts:PartsAnnotator",
    "openai": "know3d.annotation.openai_backend:OpenAIAnnotator",
    "transformers": "know3d.annotation.transformers_backend:TransformersAnnotator",
}


def annotator_class(backend: str) -> type[Annotator] | None:
    """The annotator registered as ``backend``; None for ``none``."""
    if backend == "none":
        return None
    if backend not in ANNOTATORS:
        raise ValueError(f"unknown annotation backend {backend!r} (known: none, {', '.join(ANNOTATORS)})")
    module, _, name = ANNOTATORS[backend].partition(":")
    return getattr(importlib.import_module(module), name)


class AnnotatorReplica:
    """One annotator instance for a Ray actor (the build wraps this class with ``ray.remote``)."""

    def __init__(self, cfg_json: str) -> None:
        cfg = AnnotateConfig.model_validate_json(cfg_json)
        self.annotator = annotator_class(cfg.backend)(cfg)

    def annotate(self, requests: list[PairRequest]) -> list[dict[str, Any]]:
        return self.annotator.annotate(requests)


def worker_failure(kind: str) -> dict[str, Any]:
    """The record of a pair whose annotation worker failed: transient, so it is not cached and
    the next run asks again."""
    return {
        "components": [],
        "status": "annotation_failed",
        "error": f"annotation worker failed: {kind}",
        "transient": True,
    }
