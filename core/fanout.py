"""Bounded fan-out on Ray: the one way every stage spreads work over tasks or actors.

``run_bounded`` keeps one call in flight per *slot* (an actor, or ``None`` for a plain task
slot), hands results back one by one as they finish, and never lets an item's failure escape:
``on_done`` receives the exception instead of the result. Used by the data build (ingest,
render, annotate, shard), evaluation and the latent cache.

Progress goes to stderr, chosen by ``KNOW3D_PROGRESS``:

* ``auto`` (default): rich bars on a terminal, plain lines otherwise (logs, CI, ``| tee``);
* ``bars``: rich bars everywhere (``1`` means the same, for older scripts);
* ``lines``: plain lines everywhere, ``render   37/144  12.3/s  eta 8s``, at most one per
  :data:`LINE_INTERVAL_S` per task plus the task's final line;
* ``off``: nothing.

Other values mean ``auto``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from know3d.core.logs import format_duration

console = Console(stderr=True)
PROGRESS_ENV = "KNOW3D_PROGRESS"
LINE_INTERVAL_S = 10.0


class _LineTask:
    """One task of :class:`LineProgress`: its counts, start and last printed time."""

    def __init__(self, description: str, total: float, now: float) -> None:
        self.description, self.total, self.completed = description, total, 0.0
        self.started = self.printed = now


class LineProgress:
    """The part of rich's ``Progress`` that :func:`run_bounded` uses, as plain periodic lines:
    logs of non-interactive runs show how far a stage is without carriage-return garbage."""

    def __init__(
        self,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = LINE_INTERVAL_S,
    ) -> None:
        self.stream, self.clock, self.interval = stream, clock, interval
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        self.tasks.append(_LineTask(description, total or 0, self.clock()))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task, now = self.tasks[task_id], self.clock()
        task.completed += advance
        if task.completed >= task.total or now - task.printed >= self.interval:
            task.printed = now
            print(self._line(task, now), file=self.stream or sys.stderr, flush=True)

    @staticmethod
    def _line(task: _LineTask, now: float) -> str:
        elapsed = now - task.started
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        width = len(f"{task.total:.0f}")
        head = f"{task.description:<8} {task.completed:>{width}.0f}/{task.total:.0f}  {rate:.1f}/s"
        if task.completed >= task.total:
            return f"{head}  done in {format_duration(elapsed)}"
        left = (task.total - task.completed) / rate if rate else float("inf")
        return f"{head}  eta {format_duration(left)}"


def progress_mode() -> str:
    """``bars``, ``lines`` or ``off``: what ``KNOW3D_PROGRESS`` asks for, anything else as ``auto``
    (a typo in an environment variable is no reason to stop a build)."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
    if mode in ("bars", "1"):
        return "bars"
    if mode in ("lines", "off"):
        return mode
    return "bars" if console.is_terminal else "lines"


def make_progress() -> Progress | LineProgress:
    """The run's progress display on stderr (see the module docstring for ``KNOW3D_PROGRESS``)."""
    mode = progress_mode()
    if mode == "lines":
        return LineProgress()
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=mode == "off",
    )


def task_error_kind(exc: BaseException) -> str:
    """Plain name of what killed a Ray task (no Ray traceback, no colour codes)."""
    cause = getattr(exc, "cause", None)
    return type(cause).__name__ if isinstance(cause, BaseException) else type(exc).__name__


def run_bounded(
    ray: Any,
    submit: Callable[[Any, Any], Any],
    items: Sequence,
    slots: Sequence,
    on_done: Callable[[Any, Any], None],
    progress: Progress | LineProgress | None = None,
    label: str = "",
    weight: Callable[[Any], float] | None = None,
) -> None:
    """Run ``submit(item, slot) -> ObjectRef`` with one call in flight per slot, in item order;
    ``on_done(item, result_or_exception)`` as calls finish. Progress counts ``weight(item)`` per
    item (e.g. ``len`` for batches, so the display counts assets), 1 by default.

    A finished call frees *its* slot, so with actors as slots each actor always has work
    queued behind the current one and a slow item never holds back the others' queue.
    """
    if not slots and items:
        raise ValueError("run_bounded needs at least one slot")
    size = weight or (lambda _: 1)
    task = progress.add_task(label, total=sum(size(item) for item in items)) if progress is not None else None
    pending: dict[Any, tuple[Any, Any]] = {}
    queue = list(reversed(items))
    free = list(slots)
    while queue or pending:
        while queue and free:
            item, slot = queue.pop(), free.pop()
            pending[submit(item, slot)] = (item, slot)
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            item, slot = pending.pop(ref)
            free.append(slot)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported per item
                result = exc
            on_done(item, result)
            if task is not None:
                progress.advance(task, size(item))
