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
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from know3d.annotation.config import AnnotateConfig
from know3d.annotation.parts import describe_pair
from know3d.core.errors import describe_exception
from know3d.rendering.process import asset_dir, usable_pairs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_name(cfg: AnnotateConfig) -> str:
    return {"openai": cfg.openai.model, "transformers": cfg.transformers.model}.get(cfg.backend, cfg.backend)


def local_runner(cfg: AnnotateConfig) -> Callable[[list], list[dict]]:
    """The VLM backend in this process (the build distributes it over Ray actors instead)."""
    if cfg.backend == "openai":
        from know3d.annotation.openai_backend import OpenAIAnnotator

        return OpenAIAnnotator(cfg).annotate
    from know3d.annotation.transformers_backend import TransformersAnnotator

    return TransformersAnnotator(cfg).annotate


def cache_key(front_sha: str, back_sha: str, cfg: AnnotateConfig) -> str:
    text = f"{front_sha}:{back_sha}:{cfg.backend}:{model_name(cfg)}:{cfg.prompt_version}"
    if cfg.backend == "parts":  # the parts backend's own settings change its answers
        text += f":{cfg.parts_min_fraction}:{cfg.parts_back_ratio}:{cfg.parts_skip_body}:{cfg.max_items}"
    return _sha(text.encode())


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
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


def _pair_images(work: Path, summary: dict, pair_index: int) -> tuple[bytes, bytes]:
    folder = asset_dir(work, summary["sha256"]) / "rgba"
    front, back = summary["pairs"][pair_index]
    return (folder / f"{front:03d}.png").read_bytes(), (folder / f"{back:03d}.png").read_bytes()


def _prepare_pair(summary: dict, pair_index: int, work: Path, cfg: AnnotateConfig) -> tuple[str, Callable[[], Any]]:
    """The pair's cache key, and what to do for it if it is not cached: the parts backend's
    record, or the VLM request payload (images + optional parts hint)."""
    front_png, back_png = _pair_images(work, summary, pair_index)
    key = cache_key(_sha(front_png), _sha(back_png), cfg)

    def parts() -> list[str]:
        return describe_pair(
            summary, pair_index, cfg.parts_min_fraction, cfg.parts_back_ratio, cfg.max_items, cfg.parts_skip_body
        )

    def job() -> Any:
        if cfg.backend == "parts":
            components = parts()
            return {"components": components, "status": "ok" if components else "no_parts"}
        return front_png, back_png, parts() if cfg.parts_hint else []

    return key, job


def annotate_assets(
    assets: list[dict],
    work: Path,
    cache_root: Path,
    cfg: AnnotateConfig,
    runner: Callable[[list], list[dict]] | None = None,
    min_view_coverage: float = 0.0,
) -> tuple[dict[tuple[str, int], dict], dict[str, float]]:
    """Records for every (sha256, pair_index) of ``assets`` and the stage's metrics.

    ``runner`` answers a list of :class:`PairRequest` for the VLM backends (one result each, in
    order); by default the backend runs in this process, and only for pairs not in the cache.
    """
    if cfg.backend == "none":
        return {}, {}
    start = time.perf_counter()
    cache = AnnotationCache(cache_root)
    records: dict[tuple[str, int], dict] = {}
    # one request per cache key: identical image pairs (symmetric assets, duplicate views) share
    # one answer, one cache entry and so the same record in every run
    waiting: dict[str, list[tuple[str, int]]] = {}
    pending: list[tuple[str, Any]] = []
    num_cached = num_shared = 0
    for summary in assets:
        for pair_index in usable_pairs(summary, min_view_coverage)[0]:
            ident = (summary["sha256"], pair_index)
            try:  # one pair's problem (an unreadable view, odd part data) never costs the others
                key, job = _prepare_pair(summary, pair_index, work, cfg)
                if key in waiting:
                    waiting[key].append(ident)
                    num_shared += 1
                    continue
                cached = cache.get(key)
                if cached is not None:
                    records[ident] = cached
                    num_cached += 1
                    continue
                pending.append((key, job()))
                waiting[key] = [ident]
            except Exception as exc:  # noqa: BLE001
                records[ident] = {
                    "components": [],
                    "status": "annotation_failed",
                    "backend": cfg.backend,
                    "error": f"pair {pair_index}: {describe_exception(exc)}",
                }

    if cfg.backend in ("openai", "transformers") and pending:
        from know3d.annotation.openai_backend import PairRequest

        run = runner or local_runner(cfg)
        results = run([PairRequest(key, *payload) for key, payload in pending])
        pending = [(key, result) for (key, _), result in zip(pending, results)]

    for key, record in pending:
        record = {**record, "backend": cfg.backend, "model": model_name(cfg), "prompt_version": cfg.prompt_version}
        if not record.get("transient"):  # a worker that died says nothing about the pair: ask again next run
            cache.put(key, record)
        for ident in waiting[key]:
            records[ident] = record
    statuses = [r["status"] for r in records.values()]
    fresh = [r for _, r in pending]
    latencies = [r["latency_s"] for r in fresh if "latency_s" in r]
    seconds = time.perf_counter() - start
    metrics: dict[str, float] = {
        "annotate_s": seconds,
        "annotate.pairs": len(records),
        "annotate.cached": num_cached,
        "annotate.requests": len(pending),
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
