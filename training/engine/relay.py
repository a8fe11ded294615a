"""The actor between rank 0 of a Ray Train run and the driver (:func:`launch.relayed_lines`).

In a module of its own that imports nothing: Ray loads an actor's class by importing its module in
a fresh worker process, and the launcher's module would bring torch along (~4 CPU-seconds per
training run, for a list of strings)."""

from __future__ import annotations


class LineRelay:
    """A small Ray actor between rank 0 and the driver: rank 0 puts lines, the driver takes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines
