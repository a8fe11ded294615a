"""The annotation stage: one record per front/back pair, cached by content.

Runs between rendering and sharding. A pair's cache key is the sha256 of (front PNG sha256,
back PNG sha256, backend, model, prompt version): re-running with the same settings reads every
record from the cache; a new prompt version or model re-annotates only what it must. Records
land in ``<output>/annotations/<key[:2]>/<key>.json`` (written atomically) and are copied into
each sample's ``json`` by the shard writer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from know3d.annotation.base import Annotator, PairRequest, annotator_class
from know3d.annotation.config import AnnotateConfig
from know3d.annotation.parts import describe_pair
from know3d.core.errors import describe_exception
from know3d.core.io import atomic_write
from know3d.rendering.process import asset_dir, usable_pairs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_key(front_sha: str, back_sha: str, cfg: AnnotateConfig, annotator: type[Annotator] | None = None) -> str:
    annotator = annotator or annotator_class(cfg.backend)
    text = f"{front_sha}:{back_sha}:{cfg.backend}:{annotator.model_name(cfg)}:{cfg.prompt_version}"
    return _sha((text + annotator.cache_salt(cfg)).encode())


class AnnotationCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:  # a torn write from an older crash: annotate again
            return None

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record))


def _pair_images(work: Path, summary: dict, pair_index: int) -> tuple[bytes, bytes]:
    folder = asset_dir(work, summary["sha256"]) / "rgba"
    front, back = summary["pairs"][pair_index]
    return (folder / f"{front:03d}.png").read_bytes(), (folder / f"{back:03d}.png").read_bytes()


def _request(
    summary: dict, pair_index: int, work: Path, cfg: AnnotateConfig, annotator: type[Annotator]
) -> PairRequest:
    """The pair's request: its images, its cache key and, if the annotator wants it, the named
    parts visible from the back."""
    front_png, back_png = _pair_images(work, summary, pair_index)
    hint = []
    if annotator.wants_parts(cfg):
        hint = describe_pair(
            summary, pair_index, cfg.parts_min_fraction, cfg.parts_back_ratio, cfg.max_items, cfg.parts_skip_body
        )
    return PairRequest(cache_key(_sha(front_png), _sha(back_png), cfg, annotator), front_png, back_png, hint)


def annotate_assets(
    assets: list[dict],
    work: Path,
    cache_root: Path,
    cfg: AnnotateConfig,
    runner: Callable[[list], list[dict]] | None = None,
    min_view_coverage: float = 0.0,
) -> tuple[dict[tuple[str, int], dict], dict[str, float]]:
    """Records for every (sha256, pair_index) of ``assets`` and the stage's metrics.

    ``runner`` answers a list of :class:`PairRequest` (one record each, in order) — the build
    passes Ray actors for replicated annotators; by default the annotator runs in this process,
    and only for pairs not in the cache.
    """
    annotator = annotator_class(cfg.backend)
    if annotator is None:
        return {}, {}
    start = time.perf_counter()
    cache = AnnotationCache(cache_root)
    records: dict[tuple[str, int], dict] = {}
    # one request per cache key: identical image pairs (symmetric assets, duplicate views) share
    # one answer, one cache entry and so the same record in every run
    waiting: dict[str, list[tuple[str, int]]] = {}
    pending: list[PairRequest] = []
    num_cached = num_shared = 0
    for summary in assets:
        for pair_index in usable_pairs(summary, min_view_coverage)[0]:
            ident = (summary["sha256"], pair_index)
            try:  # one pair's problem (an unreadable view, odd part data) never costs the others
                request = _request(summary, pair_index, work, cfg, annotator)
                key = request.key
                if key in waiting:
                    waiting[key].append(ident)
                    num_shared += 1
                    continue
                cached = cache.get(key)
                if cached is not None:
                    records[ident] = cached
                    num_cached += 1
                    continue
                pending.append(request)
                waiting[key] = [ident]
            except Exception as exc:  # noqa: BLE001
                records[ident] = {
                    "components": [],
                    "status": "annotation_failed",
                    "backend": cfg.backend,
                    "error": f"pair {pair_index}: {describe_exception(exc)}",
                }

    answered: list[tuple[str, dict]] = []
    if pending:
        results = (runner or annotator(cfg).annotate)(pending)
        answered = [(request.key, result) for request, result in zip(pending, results, strict=True)]

    model = annotator.model_name(cfg)
    for key, record in answered:
        record = {**record, "backend": cfg.backend, "model": model, "prompt_version": cfg.prompt_version}
        if not record.get("transient"):  # a worker that died says nothing about the pair: ask again next run
            cache.put(key, record)
        for ident in waiting[key]:
            records[ident] = record
    statuses = [r["status"] for r in records.values()]
    fresh = [r for _, r in answered]
    latencies = [r["latency_s"] for r in fresh if "latency_s" in r]
    seconds = time.perf_counter() - start
    metrics: dict[str, float] = {
        "annotate_s": seconds,
        "annotate.pairs": len(records),
        "annotate.cached": num_cached,
        "annotate.requests": len(answered),
        "annotate.shared": num_shared,
        "annotate.ok": statuses.count("ok"),
        "annotate.repaired": statuses.count("repaired"),
        "annotate.failed": statuses.count("annotation_failed"),
        "annotate.no_parts": statuses.count("no_parts"),
    }
    if latencies:
        metrics["annotate.latency_p50_s"] = float(np.percentile(latencies, 50))
        metrics["annotate.latency_p95_s"] = float(np.percentile(latencies, 95))
        tokens = sum(r.get("completion_tokens", 0) for r in fresh)
        metrics["annotate.tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    return records, metrics
