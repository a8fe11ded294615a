"""One interface for every source of assets.

A source first *discovers* its assets (cheap metadata: paths, uids, licenses) and applies its
metadata filters; each kept asset is later *fetched* on a worker (a no-op for local files, a
download for hubs), which returns the local path of the asset's main file.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from know3d.core.logs import verbose


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """One asset as its source knows it, before its content is read.

    ``key`` is stable within the source (``local:chairs/a.glb``, ``objaverse:<uid>``) and is what
    the manifest uses until the content hash is known.
    """

    key: str
    source: str
    uri: str
    license: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "source": self.source, "uri": self.uri, "license": self.license, "meta": self.meta}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AssetRecord:
        return cls(data["key"], data["source"], data["uri"], data.get("license"), dict(data.get("meta") or {}))


@dataclass(frozen=True, slots=True)
class FilteredRecord:
    """An asset a metadata filter removed; ``filter`` names the filter (e.g. ``license``)."""

    record: AssetRecord
    filter: str
    detail: str


class FetchError(Exception):
    """The asset could not be made available locally (download failed, missing in cache)."""


class AssetSource(Protocol):
    name: str

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        """All assets of the source, split into kept and filtered (with the filter's name)."""
        ...

    def fetch(self, record: AssetRecord) -> Path:
        """Local path of the asset's main file; raises FetchError."""
        ...


def read_uid_list(uids: list[str], uids_file: str | None) -> list[str]:
    """uids from the config plus a text file (one per line, '#' comments), order kept, deduped."""
    out = list(uids)
    if uids_file:
        path = Path(uids_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"uids_file not found: {path}")
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- metadata filters
# Hub metadata is loosely typed; these helpers are shared by the hub sources so their filters
# read and behave the same (case-insensitive licences, unknown counts kept).


def as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def license_rejection(license_: str | None, allowed: list[str]) -> tuple[str, str] | None:
    if allowed and (license_ or "").casefold() not in {x.casefold() for x in allowed}:
        return "license", f"license {license_ or 'unknown'!r} not in {allowed}"
    return None


def max_rejection(name: str, value: Any, limit: int | None, what: str) -> tuple[str, str] | None:
    """Drop when a known count exceeds ``limit``; unknown counts are kept (the loader checks
    the real mesh)."""
    number = as_int(value)
    if limit is not None and number is not None and number > limit:
        return name, f"{what} {number} > {limit}"
    return None


# --------------------------------------------------------------------------- hub failures
# Offline, a hub library retries each file several times and logs every try; the source then
# raises one line that says what to set. These helpers keep it to that one line.

#: loggers that print a line per retry of an unreachable hub (huggingface_hub's HTTP backoff,
#: urllib3's Retry)
HUB_RETRY_LOGGERS = ("huggingface_hub", "urllib3")


def short_error(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause, capped: the cause says what failed
    (``ConnectError: Name or service not known``); wrappers add multi-line advice that
    bloats one-line messages and manifest rows."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class HubRetriesHushed:
    """Inside the block, the loggers of :data:`HUB_RETRY_LOGGERS` drop warnings (kept with
    ``--verbose``). Nested and concurrent blocks (fetch threads) share one saved state, so the
    last one out restores the levels."""

    _lock = threading.Lock()
    _depth = 0
    _saved: dict[str, int] = {}

    def __enter__(self) -> None:
        cls = type(self)
        with cls._lock:
            if cls._depth == 0 and not verbose():
                cls._saved = {name: logging.getLogger(name).level for name in HUB_RETRY_LOGGERS}
                for name in HUB_RETRY_LOGGERS:
                    logging.getLogger(name).setLevel(logging.ERROR)
            cls._depth += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        cls = type(self)
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                for name, level in cls._saved.items():
                    logging.getLogger(name).setLevel(level)
                cls._saved = {}
