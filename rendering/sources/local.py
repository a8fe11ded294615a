"""Assets in local folders, files or glob patterns."""

from __future__ import annotations

import glob
from pathlib import Path

from pipeline.config import LocalSourceConfig
from rendering.sources.base import AssetRecord, FetchError, FilteredRecord

# Files that belong to another asset (materials, textures, buffers) are never assets themselves.
_SIDECAR_SUFFIXES = {".mtl", ".bin", ".png", ".jpg", ".jpeg", ".ktx2", ".webp"}


class LocalSource:
    name = "local"

    def __init__(self, cfg: LocalSourceConfig) -> None:
        if not cfg.input:
            raise ValueError("source 'local' needs at least one input (--input DIR or source.local.input)")
        self.cfg = cfg

    def _expand(self, item: str) -> list[tuple[Path, Path]]:
        """(file, root) pairs; root makes keys relative and stable across machines."""
        extensions = {"." + e.lower().lstrip(".") for e in self.cfg.extensions}
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if self.cfg.recursive else "*"
            files = [p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in extensions]
            return [(p, path) for p in files]
        if path.is_file():
            return [(path, path.parent)]
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        if not matches:
            raise FileNotFoundError(f"input '{item}' matches no file or folder")
        root = Path(glob.escape(str(path)).split("*", 1)[0]).parent if "*" in item else path.parent
        return [(p, root) for p in matches if p.is_file() and p.suffix.lower() not in _SIDECAR_SUFFIXES]

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        records: dict[str, AssetRecord] = {}
        for item in self.cfg.input:
            root_name = Path(item).name or "input"
            for file, root in sorted(self._expand(item)):
                try:
                    rel = file.relative_to(root).as_posix()
                except ValueError:
                    rel = file.name
                key = f"local:{root_name}/{rel}"
                records.setdefault(key, AssetRecord(key, "local", str(file.resolve()), None, {"name": file.stem}))
        return list(records.values()), []

    def fetch(self, record: AssetRecord) -> Path:
        path = Path(record.uri)
        if not path.is_file():
            raise FetchError(f"{path}: file not found")
        return path
