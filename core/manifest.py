"""The build manifest: one row per asset and stage, written as Parquet.

Stages: ``discover`` (metadata filters, unsupported files), ``ingest`` (fetch, security checks,
header face counts, content hash, duplicates), ``render``, ``pairs`` (one ``filtered`` row per
pair left out of the shards, e.g. a nearly blank view) and ``shard``. Status is ``ok``,
``filtered`` (``filter`` names which) or ``failed`` (``reason`` and a short ``traceback``). The
manifest is a view rebuilt from the per-asset results at the end of every run, so a crash never
leaves it half-written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from know3d.core.io import atomic_writer

MANIFEST_FILE = "manifest.parquet"
STAGES = ("discover", "ingest", "render", "pairs", "shard")


@dataclass(slots=True)
class ManifestRow:
    key: str
    source: str
    stage: str
    status: str  # ok | filtered | failed
    sha256: str | None = None
    uri: str | None = None
    license: str | None = None
    filter: str | None = None
    reason: str | None = None
    traceback: str | None = None
    split: str | None = None
    num_samples: int | None = None
    seconds: float | None = None
    run_id: str | None = None


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("status", pa.string()),
        ("sha256", pa.string()),
        ("uri", pa.string()),
        ("license", pa.string()),
        ("filter", pa.string()),
        ("reason", pa.string()),
        ("traceback", pa.string()),
        ("split", pa.string()),
        ("num_samples", pa.int64()),
        ("seconds", pa.float64()),
        ("run_id", pa.string()),
    ]
)


def safe_text(value: object) -> object:
    """File names are bytes: one that is not UTF-8 reaches Python with lone surrogates, which
    Parquet (and most tools) refuse. Such bytes are written as ``\\xff`` escapes instead."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def write_manifest(out_dir: Path, rows: list[ManifestRow]) -> Path:
    order = {stage: i for i, stage in enumerate(STAGES)}
    rows = sorted(rows, key=lambda r: (r.key, order.get(r.stage, 99)))
    table = pa.Table.from_pylist([{k: safe_text(v) for k, v in asdict(r).items()} for r in rows], schema=SCHEMA)
    final = out_dir / MANIFEST_FILE
    with atomic_writer(final) as fh:
        pq.write_table(table, fh)
    return final


def read_manifest(out_dir: Path) -> list[dict]:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no manifest in {out_dir} (run `know3d data build` first)")
    return pq.read_table(path).to_pylist()


def summarize(rows: list[dict]) -> dict:
    """Counts per stage and status, per filter and per failure reason (reasons truncated)."""
    per_stage: dict[str, Counter] = {}
    filters: Counter = Counter()
    reasons: Counter = Counter()
    for r in rows:
        per_stage.setdefault(r["stage"], Counter())[r["status"]] += 1
        if r["status"] == "filtered":
            filters[(r["stage"], r["filter"] or "?")] += 1
        elif r["status"] == "failed":
            reasons[(r["stage"], reason_class(r["reason"] or "?"))] += 1
    order = {stage: i for i, stage in enumerate(STAGES)}
    return {
        "stages": {s: dict(per_stage[s]) for s in sorted(per_stage, key=lambda s: order.get(s, len(order)))},
        "filters": {f"{stage}/{name}": n for (stage, name), n in sorted(filters.items())},
        "reasons": {f"{stage}: {name}": n for (stage, name), n in reasons.most_common()},
    }


def reason_class(reason: str) -> str:
    """Group failure reasons: drop the leading file name and line numbers, numbers become N."""
    head, sep, rest = reason.partition(": ")
    text = rest if sep and "." in head and " " not in head else reason
    text = re.sub(r"^line \d+: ", "", text)
    text = re.sub(r"-?\d+(\.\d+)?", "N", text)
    return text[:90]
