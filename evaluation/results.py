"""Per-uid results -> aggregate tables (metric means over the uids that have them)."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path

import numpy as np

_SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def uid_filename(uid: str) -> str:
    """A file-name stem for ``uid``: the uid itself when short and plain, otherwise a readable
    prefix plus a hash (uids are folder names: up to 255 bytes, any character but '/')."""
    if _SAFE.fullmatch(uid):
        return uid
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", uid)[:60].lstrip(".")
    return f"{prefix}-{hashlib.sha1(uid.encode()).hexdigest()[:12]}"


def json_safe(value):
    """NaN / inf -> None (strict JSON has no non-finite numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _cell(text: str) -> str:
    """A CSV cell spreadsheets will not evaluate as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def flat_metrics(result: dict) -> dict[str, float]:
    """The numeric metrics of one uid result, flat (``chamfer_l2``, ``ulip``, ...)."""
    out: dict[str, float] = {}
    for section in ("geometry", "semantic", "backview"):
        for key, value in (result.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    return out


def aggregate(results: list[dict]) -> dict[str, dict[str, float]]:
    """metric -> {mean, std, count} over the uids that have it (errors excluded)."""
    columns: dict[str, list[float]] = {}
    for result in results:
        if result.get("status") != "ok":
            continue
        for key, value in flat_metrics(result).items():
            columns.setdefault(key, []).append(value)
    table = {}
    for key, values in columns.items():
        arr = np.asarray(values, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        table[key] = {
            "mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": float(finite.std()) if len(finite) else float("nan"),
            "count": int(len(finite)),  # the values the mean is over
            "count_non_finite": int(len(arr) - len(finite)),
        }
    return table


def order_metrics(keys: list[str]) -> list[str]:
    first = ["ulip", "uni3d", "chamfer_l1", "chamfer_l2", "normal_consistency", "psnr", "ssim", "lpips"]
    return [k for k in first if k in keys] + sorted(k for k in keys if k not in first)


def write_tables(out: Path, results: list[dict], table: dict) -> None:
    keys = order_metrics(list(table))
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uid", "status", *keys, "error"])
        for r in results:
            flat = flat_metrics(r)
            error = r.get("error") or r.get("semantic_error") or ""
            writer.writerow(
                [
                    _cell(r["uid"]),
                    r["status"],
                    *[("" if k not in flat else f"{flat[k]:.6g}") for k in keys],
                    _cell(error),
                ]
            )
    lines = ["| metric | mean | std | n |", "|---|---:|---:|---:|"]
    for k in keys:  # metric names are ours (no user text in this table)
        t = table[k]
        lines.append(f"| {k} | {t['mean']:.6g} | {t['std']:.4g} | {t['count']} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
