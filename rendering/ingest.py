"""Ingest: fetch, check and hash one asset — the first per-asset step of a build (no Ray).

Whatever a malformed file triggers, only that asset fails, with a plain-text reason that names
the file and the kind of problem (never the file's content). Assets are content-addressed:
:func:`dedupe` keeps one asset per sha256.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from know3d.core.errors import describe_exception
from know3d.rendering.assets import AssetError, AssetFiltered, asset_sha256, inspect_asset
from know3d.rendering.config import LoadConfig
from know3d.rendering.sources.base import AssetRecord, AssetSource, FetchError


@dataclass(frozen=True, slots=True)
class Ingested:
    """One asset after ingest: ``ok`` with its local path and content hash, or why not."""

    key: str
    status: Literal["ok", "filtered", "failed"]
    path: str | None = None
    sha256: str | None = None
    filter: str | None = None
    reason: str | None = None
    seconds: float | None = None


def file_name(record: AssetRecord) -> str:
    """How a reason names an asset before its file is fetched."""
    return Path(record.uri).name or record.key


def ingest_one(source: AssetSource, record: AssetRecord, load_cfg: LoadConfig) -> Ingested:
    """Fetch, check and hash one asset; never raises."""
    start = time.perf_counter()
    name = file_name(record)
    try:
        path = source.fetch(record)
        name = path.name
        sidecars = inspect_asset(path, load_cfg)
        out = Ingested(record.key, "ok", path=str(path), sha256=asset_sha256(path, sidecars))
    except AssetFiltered as exc:
        out = Ingested(record.key, "filtered", filter=exc.filter, reason=str(exc))
    except (AssetError, FetchError) as exc:
        out = Ingested(record.key, "failed", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - an unexpected error is still this asset's alone
        out = Ingested(record.key, "failed", reason=f"{name}: {describe_exception(exc)}")
    return dataclasses.replace(out, seconds=time.perf_counter() - start)


def ingest_batch(source: AssetSource, records: list[dict], load_cfg: LoadConfig) -> list[Ingested]:
    """:func:`ingest_one` over records in their JSON form (what a Ray task receives)."""
    return [ingest_one(source, AssetRecord.from_json(r), load_cfg) for r in records]


def dedupe(results: list[Ingested]) -> tuple[list[Ingested], list[Ingested]]:
    """Keep one asset per content hash (the smallest key), sorted by hash; the others are
    returned as ``filtered`` duplicates."""
    first: dict[str, Ingested] = {}
    for r in sorted((r for r in results if r.status == "ok"), key=lambda r: r.key):
        first.setdefault(r.sha256, r)
    kept = sorted(first.values(), key=lambda r: r.sha256)
    dupes = [
        dataclasses.replace(r, status="filtered", filter="duplicate", reason=f"same content as {first[r.sha256].key}")
        for r in results
        if r.status == "ok" and first[r.sha256] is not r
    ]
    return kept, dupes
