"""Atomic files and folders: written under a temporary name in the same folder, then renamed.

A reader (or a resumed run) therefore sees either the old content or the new, never a torn
file, whatever kills the writer. Every temporary name follows one scheme, ``.<name>.<hex>.tmp``,
so leftovers of a killed run are recognisable (:func:`is_temp`) and removable
(:func:`remove_temps`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def temp_path(final: Path) -> Path:
    """A unique temporary sibling of ``final``."""
    return final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces ``path`` when the block ends without error
    (the temporary file is removed otherwise)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as fh:
            yield fh
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically."""
    with atomic_writer(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder that becomes ``path`` when the block ends without error. An existing
    ``path`` is kept (another writer finished first) unless ``replace``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not "someone else finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temps(folder: Path, pattern: str = "*") -> list[Path]:
    """Remove temporary files and folders (of :func:`temp_path`) matching ``pattern`` under
    ``folder``. Only call it while holding the folder's writer lock."""
    removed = []
    for path in folder.glob(pattern):
        if is_temp(path):
            (shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True))
            removed.append(path)
    return removed
