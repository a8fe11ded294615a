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


def lost_worker(ray: Any, exc: Any) -> bool:
    """The call failed because its actor died or stopped answering (its process or node lost),
    not because of the item: a call that another actor can simply make again."""
    errors = getattr(ray, "exceptions", None)
    actor_error = getattr(errors, "RayActorError", None)
    return actor_error is not None and isinstance(exc, actor_error) and not exc.actor_init_failed


def _is_actor(slot: Any) -> bool:
    return hasattr(slot, "__ray_ready__")


class _ActorGate:
    """Which actor slots may take work: those whose actor answered a readiness probe
    (``__ray_ready__``) since it was last seen failing. A probe to a restarting actor answers
    once it runs again, which may be never (its node lost and no room elsewhere): its slots then
    simply stay out. An actor whose probe keeps failing (dead for good, or its ``__init__``
    raised) leaves with its slots."""

    MAX_PROBE_FAILURES = 5

    def __init__(self, ray: Any, slots: Sequence) -> None:
        self.ray = ray
        self.free = [slot for slot in slots if not _is_actor(slot)]
        self.parked: dict[int, list] = {}  # id(actor) -> its slots waiting for its answer
        self.probes: dict[Any, tuple[Any, int]] = {}  # probe ref -> (actor, failed probes before it)
        self.error: BaseException | None = None
        for slot in slots:
            if _is_actor(slot):
                self.park(slot)

    def park(self, slot: Any) -> None:
        waiting = self.parked.setdefault(id(slot), [])
        if not waiting:
            self.probes[slot.__ray_ready__.remote()] = (slot, 0)
        waiting.append(slot)

    def answered(self, ref: Any) -> None:
        actor, failures = self.probes.pop(ref)
        try:
            self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - an actor that cannot answer gets no work
            self.error = exc
            if lost_worker(self.ray, exc) and failures + 1 < self.MAX_PROBE_FAILURES:
                self.probes[actor.__ray_ready__.remote()] = (actor, failures + 1)
            else:
                del self.parked[id(actor)]
            return
        self.free.extend(self.parked.pop(id(actor)))


def run_bounded(
    ray: Any,
    submit: Callable[[Any, Any], Any],
    items: Sequence,
    slots: Sequence,
    on_done: Callable[[Any, Any], None],
    progress: Progress | LineProgress | None = None,
    label: str = "",
    weight: Callable[[Any], float] | None = None,
    requeue: int = 0,
) -> None:
    """Run ``submit(item, slot) -> ObjectRef`` with one call in flight per slot, in item order;
    ``on_done(item, result_or_exception)`` as calls finish. Progress counts ``weight(item)`` per
    item (e.g. ``len`` for batches, so the display counts assets), 1 by default.

    A finished call frees *its* slot, so with actors as slots each actor always has work
    queued behind the current one and a slow item never holds back the others' queue.

    ``requeue`` > 0 is for restartable actors whose calls Ray does not retry itself
    (``max_restarts`` != 0, ``max_task_retries=0``), on clusters that can lose a node: an actor
    gets work only while it is known to be running (it answered a readiness probe, at first and
    after each failure), and an item whose call failed because its actor died or stopped
    answering (:func:`lost_worker`) goes back to the queue for the other actors, at most
    ``requeue`` times (then ``on_done`` gets the error). So no item waits on an actor that
    cannot come back, e.g. one of a lost node with no room left elsewhere; if no actor is left at
    all, the remaining items get the last error.
    """
    if not slots and items:
        raise ValueError("run_bounded needs at least one slot")
    size = weight or (lambda _: 1)
    task = progress.add_task(label, total=sum(size(item) for item in items)) if progress is not None else None
    gate = _ActorGate(ray, slots) if requeue else None
    pending: dict[Any, tuple[int, Any]] = {}  # call -> (item index, slot)
    queue = list(reversed(range(len(items))))
    lost = [0] * len(items)
    free = gate.free if gate is not None else list(slots)

    def finish(i: int, result: Any) -> None:
        on_done(items[i], result)
        if task is not None:
            progress.advance(task, size(items[i]))

    while queue or pending:
        while queue and free:
            i, slot = queue.pop(), free.pop()
            pending[submit(items[i], slot)] = (i, slot)
        probes = list(gate.probes) if gate is not None else []
        if not pending and not probes:  # every actor is gone for good
            gone = gate.error if gate is not None and gate.error else RuntimeError("no worker left")
            while queue:
                finish(queue.pop(), gone)
            break
        done, _ = ray.wait([*pending, *probes], num_returns=1)
        for ref in done:
            if gate is not None and ref in gate.probes:
                gate.answered(ref)
                continue
            i, slot = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported per item
                result = exc
            if gate is not None and _is_actor(slot) and lost_worker(ray, result):
                gate.park(slot)  # no more work for it until it answers again
                if lost[i] < requeue:
                    lost[i] += 1
                    queue.append(i)  # next in line, for an actor that runs
                    continue
            else:
                free.append(slot)
            finish(i, result)
