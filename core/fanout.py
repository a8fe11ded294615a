"""Bounded fan-out on Ray: the one way every stage spreads work over tasks or actors.

``run_bounded`` keeps one call in flight per *slot* (an actor, or ``None`` for a plain task
slot), hands results back one by one as they finish, and never lets an item's failure escape:
``on_done`` receives the exception instead of the result. Used by the data build (ingest,
render, annotate, shard), evaluation and the latent cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress() -> Progress:
    """Progress bars on stderr (shown on terminals, or everywhere with KNOW3D_PROGRESS=1)."""
    return Progress(
        TextColumn("{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("KNOW3D_PROGRESS") != "1",
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
    progress: Progress | None = None,
    label: str = "",
) -> None:
    """Run ``submit(item, slot) -> ObjectRef`` with one call in flight per slot, in item order;
    ``on_done(item, result_or_exception)`` as calls finish.

    A finished call frees *its* slot, so with actors as slots each actor always has work
    queued behind the current one and a slow item never holds back the others' queue.
    """
    if not slots and items:
        raise ValueError("run_bounded needs at least one slot")
    task = progress.add_task(label, total=len(items)) if progress is not None else None
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
                progress.advance(task)
