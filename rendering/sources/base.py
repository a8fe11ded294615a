"""One interface for every source of assets.

A source first *discovers* its assets (cheap metadata: paths, uids, licenses) and applies its
metadata filters; each kept asset is later *fetched* on a worker (a no-op for local files, a
download for hubs), which returns the local path of the asset's main file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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
