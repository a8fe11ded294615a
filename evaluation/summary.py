"""The end of an evaluation: aggregate tables, the HTML report and ``summary.json``.

Everything here is on disk before any tracking server is contacted, so an unreachable MLflow
never loses results; the orchestration adds the run id afterwards (:meth:`EvalSummary.write`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from know3d.evaluation.config import EvalConfig
from know3d.evaluation.results import aggregate, write_tables
from know3d.evaluation.store import ResultStore, write_json


@dataclass
class EvalSummary:
    kind: str
    output: Path
    total: int
    ok: int
    errors: int
    missing: int
    table: dict
    unmatched: dict
    skipped: dict
    seconds: float
    measure_seconds: float = 0.0  # the parallel part: first task submitted -> last result in
    run_id: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason) of errors / missing
    reused: int = 0  # results taken over from an earlier run (same protocol and inputs)
    semantic_failures: list[tuple[str, str]] = field(default_factory=list)  # geometry ok, no scores

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "total": self.total,
            "ok": self.ok,
            "errors": self.errors,
            "missing": self.missing,
            "metrics": self.table,
            "unmatched": self.unmatched,
            "skipped_metrics": self.skipped,
            "seconds": round(self.seconds, 2),
            "measure_seconds": round(self.measure_seconds, 2),
            "mlflow_run_id": self.run_id,
            "failures": [{"uid": u, "reason": r} for u, r in self.failures],
            "reused": self.reused,
            "semantic_failures": [{"uid": u, "reason": r} for u, r in self.semantic_failures],
        }

    def write(self) -> None:
        """(Re)write ``summary.json``, e.g. once the MLflow run id is known."""
        write_json(self.output / "summary.json", self.to_json())


def summarize(
    kind: str,
    output: Path,
    results: list[dict],
    unmatched: dict,
    skipped: dict,
    *,
    seconds: float,
    measure_seconds: float = 0.0,
    reused: int = 0,
) -> EvalSummary:
    """Counts, metric table and failures of sorted ``results`` (failures in uid order)."""
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "error", "missing")}
    return EvalSummary(
        kind,
        output,
        len(results),
        counts["ok"],
        counts["error"],
        counts["missing"],
        aggregate(results),
        unmatched,
        skipped,
        seconds=seconds,
        measure_seconds=measure_seconds,
        failures=[(r["uid"], r.get("error", "")) for r in results if r["status"] != "ok"],
        reused=reused,
        semantic_failures=[(r["uid"], r["semantic_error"]) for r in results if r.get("semantic_error")],
    )


ReportWriter = Callable[[Path, list[dict], EvalSummary, EvalConfig], Any]


def finish(
    kind: str,
    store: ResultStore,
    cfg: EvalConfig,
    results: list[dict],
    unmatched: dict,
    skipped: dict,
    report: ReportWriter,
    *,
    started: float,
    measure_seconds: float,
    reused: int,
) -> EvalSummary:
    """Settle the stored results, then write metrics.csv / metrics.md, the report and summary.json."""
    store.finalize(results)
    seconds = time.perf_counter() - started
    summary = summarize(
        kind, store.output, results, unmatched, skipped, seconds=seconds, measure_seconds=measure_seconds, reused=reused
    )
    write_tables(store.output, results, summary.table)
    report(store.output, results, summary, cfg)
    summary.write()
    return summary
