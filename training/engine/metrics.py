"""What a run reports about itself: a per-step ``metrics.jsonl`` and windowed means for MLflow.

``metrics.jsonl`` (rank 0) gets one ``{"step": s, "loss": l}`` line per optimizer step, the
global loss of that step; users' tooling and the resume tests read it (:func:`steps_done`). The
:class:`MetricsWindow` collects what a log line averages since the previous one;
:func:`progress_line` is what the user sees of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from know3d.core.logs import format_duration
from know3d.training.engine.dist import all_reduce_sum

METRICS_FILE = "metrics.jsonl"


@dataclass
class MetricsWindow:
    """Running sums and counts per metric, and the samples trained, since the last :meth:`reset`."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add_samples(self, n: int) -> None:
        self.samples += n

    def mean(self, name: str) -> float:
        return self.sums[name] / self.counts[name]

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in self.sums}

    def samples_per_s(self, now: float | None = None) -> float:
        return self.samples / ((time.perf_counter() if now is None else now) - self.started)

    def reduced_means(self, names: Sequence[str]) -> dict[str, float]:
        """Means of ``names`` over the observations of every rank (a collective: every rank calls
        it with the same names); names no rank observed are left out."""
        local = [self.sums.get(n, 0.0) for n in names] + [float(self.counts.get(n, 0)) for n in names]
        totals = all_reduce_sum(torch.tensor(local, dtype=torch.float64))
        k = len(names)
        return {n: float(totals[i] / totals[k + i]) for i, n in enumerate(names) if totals[k + i] > 0}

    def reset(self) -> None:
        self.sums, self.counts, self.samples, self.started = {}, {}, 0, time.perf_counter()


class MetricsFile:
    """``<output>/metrics.jsonl``, appended by rank 0 only (other ranks hold a disabled one)."""

    def __init__(self, output: Path, enabled: bool) -> None:
        self.path = Path(output) / METRICS_FILE
        self.enabled = enabled

    def append(self, step: int, loss: float) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")


def progress_line(step: int, max_steps: int, loss: float, samples_per_s: float, samples_left: int) -> str:
    """``step 40/1000  loss 0.1234  4.2 samples/s  eta 3m50s``: a log window's loss and rate, and
    the time left at that rate (the window's validation and checkpoints included, as they recur)."""
    eta = samples_left / samples_per_s if samples_per_s > 0 else float("inf")
    return f"step {step}/{max_steps}  loss {loss:.4f}  {samples_per_s:.1f} samples/s  eta {format_duration(eta)}"


def steps_done(metrics_file: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record wins when a resumed run re-logs)."""
    out: dict[int, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = float(rec["loss"])
    return out
