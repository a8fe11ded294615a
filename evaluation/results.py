"""Per-uid results -> aggregate tables (metric means over the uids that have them)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


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
            "count": int(len(arr)),
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
            writer.writerow([r["uid"], r["status"], *[("" if k not in flat else f"{flat[k]:.6g}") for k in keys], r.get("error", "")])
    lines = ["| metric | mean | std | n |", "|---|---:|---:|---:|"]
    for k in keys:
        t = table[k]
        lines.append(f"| {k} | {t['mean']:.6g} | {t['std']:.4g} | {t['count']} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
