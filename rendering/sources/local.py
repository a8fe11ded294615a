"""Assets in local folders, files or glob patterns.

Every file found is an explicit outcome: a mesh file of a supported format becomes an asset; a
file that belongs to another asset (materials, textures, buffers) is left to that asset; any
other file (``.dae``, a ``.zip`` of a glTF, ...) becomes a ``filtered`` manifest row
(``unsupported_format``) instead of vanishing. Hidden files (``.DS_Store``, ``.git``) are skipped.

An input folder is a trust boundary: a main file that is a symlink resolving outside the input
it was found in is refused when it is fetched, exactly as sidecar references are.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from know3d.rendering.config import LocalSourceConfig
from know3d.rendering.sources.base import AssetRecord, FetchError, FilteredRecord

# Files that belong to another asset (materials, textures, buffers) are never assets themselves.
_SIDECAR_SUFFIXES = {
    ".mtl",
    ".bin",
    ".png",
    ".jpg",
    ".jpeg",
    ".ktx2",
    ".webp",
    ".tga",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".exr",
    ".hdr",
    ".dds",
    ".basis",
}
_ARCHIVES = {".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz"}


def _is_candidate(path: Path) -> bool:
    """A file, or a dangling symlink (it becomes a "file not found" row, not nothing)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _static_prefix(pattern: Path) -> Path:
    """The folder a glob pattern cannot leave: its leading components without wildcards
    (``/data/set?/*.glb`` -> ``/data``)."""
    static: list[str] = []
    for part in pattern.parts[:-1]:
        if glob.has_magic(part):
            break
        static.append(part)
    return Path(*static) if static else Path(".")


class LocalSource:
    name = "local"

    def __init__(self, cfg: LocalSourceConfig) -> None:
        if not cfg.input:
            raise ValueError("source 'local' needs at least one input (--input DIR or source.local.input)")
        self.cfg = cfg
        self.extensions = {"." + e.lower().lstrip(".") for e in cfg.extensions}

    def _expand(self, item: str) -> list[tuple[Path, Path]]:
        """(file, root) pairs; root makes keys relative and stable across machines, and is the
        folder a main file must stay inside."""
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if self.cfg.recursive else "*"
            return [(p, path) for p in path.glob(pattern) if _is_candidate(p)]
        if path.is_file():
            return [(path, path.parent)]
        matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
        if not matches:
            raise FileNotFoundError(f"input '{item}' matches no file or folder")
        return [
            (p, _static_prefix(path)) for p in matches if _is_candidate(p) and p.suffix.lower() not in _SIDECAR_SUFFIXES
        ]

    def _unsupported(self, rel: str, suffix: str) -> str:
        supported = ", ".join(sorted(e.lstrip(".") for e in self.extensions))
        if suffix in _ARCHIVES:
            return f"{rel}: archives ('{suffix}') are not unpacked; extract them first (supported: {supported})"
        what = f"'{suffix}'" if suffix else "a file without extension"
        return f"{rel}: {what} is not a supported mesh format (supported: {supported})"

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        records: dict[str, AssetRecord] = {}
        filtered: dict[str, FilteredRecord] = {}
        roots: dict[str, str] = {}  # key prefix -> input: two inputs named alike must not collide
        for item in self.cfg.input:
            root_name = base = Path(item).name or "input"
            for n in range(2, len(self.cfg.input) + 2):
                if roots.setdefault(root_name, os.path.abspath(item)) == os.path.abspath(item):
                    break
                root_name = f"{base}~{n}"
            for file, root in sorted(self._expand(item)):
                try:
                    rel = file.relative_to(root).as_posix()
                except ValueError:
                    rel = file.name
                named = Path(item).expanduser().is_file()  # a file given by name always gets a row
                if not named and any(part.startswith(".") for part in Path(rel).parts):
                    continue
                key = f"local:{root_name}/{rel}"
                suffix = file.suffix.lower()
                # the path as found (not resolved): fetch checks where a symlink leads
                record = AssetRecord(
                    key, "local", os.path.abspath(file), None, {"name": file.stem, "root": os.path.abspath(root)}
                )
                if suffix in self.extensions:
                    records.setdefault(key, record)
                elif named or suffix not in _SIDECAR_SUFFIXES:
                    filtered.setdefault(
                        key, FilteredRecord(record, "unsupported_format", self._unsupported(rel, suffix))
                    )
        return list(records.values()), list(filtered.values())

    def fetch(self, record: AssetRecord) -> Path:
        path = Path(record.uri)
        if not path.is_file():
            raise FetchError(f"{path.name}: file not found")
        root = record.meta.get("root")
        if root and not path.resolve().is_relative_to(Path(root).resolve()):
            raise FetchError(f"{path.name}: symlink to a file outside the input folder (refused)")
        return path
