"""Objaverse 1.0 assets through the `objaverse` package (0.1.7).

The package keeps its cache under a module global (``objaverse._VERSIONED_PATH``) instead of
taking a folder argument, so every call goes through :func:`objaverse_root`, which points that
global at ``<download_dir>/hf-objaverse-v1`` for the duration of the call. ``fetch`` runs in
other processes than ``discover``, so both set it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import objaverse

from know3d.rendering.config import ObjaverseSourceConfig
from know3d.rendering.sources.base import (
    AssetRecord,
    FetchError,
    FilteredRecord,
    as_int,
    license_rejection,
    max_rejection,
    read_uid_list,
    short_error,
)

_T = TypeVar("_T")
#: the config key that points the source at a folder holding ``hf-objaverse-v1/`` (offline hints)
DOWNLOAD_DIR_KEY = "source.objaverse.download_dir"
_SHARDS_PER_CALL = 8

ALL_SHARDS: tuple[str, ...] = tuple(f"{i // 1000:03d}-{i % 1000:03d}" for i in range(160))


class _RootSwitch:
    """Shares the package global between threads: blocks with the same root overlap freely,
    a block with another root waits until the current ones are done."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active: str | None = None
        self.users = 0
        self.saved: str | None = None


_SWITCH = _RootSwitch()


def versioned_path(download_dir: str | os.PathLike[str]) -> str:
    """The folder the package reads and writes: ``<download_dir>/hf-objaverse-v1``."""
    return os.path.join(os.path.expanduser(os.fspath(download_dir)), "hf-objaverse-v1")


@contextmanager
def objaverse_root(download_dir: str | os.PathLike[str]) -> Iterator[str]:
    """Point ``objaverse._VERSIONED_PATH`` at ``download_dir`` inside the block, then restore it."""
    root = versioned_path(download_dir)
    sw = _SWITCH
    with sw.cond:
        sw.cond.wait_for(lambda: sw.users == 0 or sw.active == root)
        if sw.users == 0:
            sw.saved = objaverse._VERSIONED_PATH
            sw.active = root
            objaverse._VERSIONED_PATH = root
        sw.users += 1
    try:
        yield root
    finally:
        with sw.cond:
            sw.users -= 1
            if sw.users == 0:
                objaverse._VERSIONED_PATH = sw.saved
                sw.active = None
                sw.cond.notify_all()


def _names(items: Any) -> list[str]:
    """Names of annotation categories/tags (``[{"name": ..}]``; plain strings accepted)."""
    out: list[str] = []
    for item in items or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for field in ("name", "slug"):
                value = item.get(field)
                if isinstance(value, str) and value and value not in out:
                    out.append(value)
    return out


def _matches_any(have: list[str], wanted: list[str]) -> bool:
    folded = {w.casefold() for w in wanted}
    return any(h.casefold() in folded for h in have)


class ObjaverseSource:
    name = "objaverse"

    def __init__(self, cfg: ObjaverseSourceConfig) -> None:
        self.cfg = cfg

    def _record(self, uid: str, ann: dict[str, Any], object_path: str) -> AssetRecord:
        meta = {
            "uid": uid,
            "object_path": object_path,  # lets fetch skip re-reading the 800k-entry path index
            "name": str(ann.get("name") or ""),
            "face_count": as_int(ann.get("faceCount")),
            # Slugs are kept out of meta: names are enough to read and keep meta small.
            "categories": [c["name"] for c in ann.get("categories") or [] if isinstance(c, dict) and "name" in c],
            "tags": [t["name"] for t in ann.get("tags") or [] if isinstance(t, dict) and "name" in t],
        }
        license_ = ann.get("license")
        return AssetRecord(f"objaverse:{uid}", self.name, uid, str(license_) if license_ else None, meta)

    def _rejection(self, ann: dict[str, Any]) -> tuple[str, str] | None:
        """(filter, detail) of the first filter that drops the asset, in the documented order."""
        cfg = self.cfg
        rejection = license_rejection(str(ann.get("license") or "") or None, cfg.licenses) or max_rejection(
            "max_face_count", ann.get("faceCount"), cfg.max_face_count, "faces"
        )
        if rejection:
            return rejection
        if cfg.categories:
            have = _names(ann.get("categories"))
            if not _matches_any(have, cfg.categories):
                return "categories", f"categories {have} match none of {cfg.categories}"
        if cfg.tags:
            have = _names(ann.get("tags"))
            if not _matches_any(have, cfg.tags):
                return "tags", f"tags {have[:10]} match none of {cfg.tags}"
        return None

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        """Assets in request order (or by shard, then uid). Annotation shards are read one at a
        time and only while the limit is not reached, so a small limit reads few shards; assets
        after the limit are neither kept nor reported as filtered."""
        cfg = self.cfg
        requested = read_uid_list(cfg.uids, cfg.uids_file)
        kept: list[AssetRecord] = []
        filtered: list[FilteredRecord] = []
        with objaverse_root(cfg.download_dir):
            object_paths = _download_guard("object-paths.json.gz", objaverse._load_object_paths)
            if requested:
                uids = list(dict.fromkeys(u[:-4] if u.endswith(".glb") else u for u in requested))
            else:
                shards = set(cfg.metadata_shards or ALL_SHARDS)
                by_shard = ((_shard_of(p), u) for u, p in object_paths.items())
                uids = [u for shard, u in sorted(by_shard) if shard in shards]
            shard_uids: dict[str, list[str]] = {}
            for uid in uids:
                if uid in object_paths:
                    shard_uids.setdefault(_shard_of(object_paths[uid]), []).append(uid)
            annotations: dict[str, dict[str, Any]] = {}
            for uid in uids:
                if cfg.limit is not None and len(kept) >= cfg.limit:
                    break
                if uid not in object_paths:
                    record = AssetRecord(f"objaverse:{uid}", self.name, uid, None, {"uid": uid})
                    detail = f"uid {uid} not in objaverse object-paths"
                    filtered.append(FilteredRecord(record, "unknown_uid", detail))
                    continue
                shard = _shard_of(object_paths[uid])
                if shard in shard_uids:
                    # A few shards per call (None would read all 160): each call re-reads the
                    # 800k-entry object-paths (~1 s); with a limit one shard at a time, so no shard
                    # past the limit is downloaded. Only the fields used are kept.
                    extra = 0 if cfg.limit is not None else _SHARDS_PER_CALL - 1
                    group = [shard] + [s for s in shard_uids if s != shard][:extra]
                    batch = [u for s in group for u in shard_uids.pop(s)]
                    load = partial(objaverse.load_annotations, batch)
                    loaded = _download_guard(f"metadata shards {', '.join(group)}", load)
                    annotations.update({u: _slim(a) for u, a in loaded.items()})
                ann = annotations.get(uid) or {}
                record = self._record(uid, ann, object_paths[uid])
                rejection = self._rejection(ann)
                if rejection is not None:
                    filtered.append(FilteredRecord(record, *rejection))
                else:
                    kept.append(record)
        return kept, filtered

    def fetch(self, record: AssetRecord) -> Path:
        """The cached file when present; otherwise the package downloads it. Every
        ``load_objects`` call re-parses the whole object-paths index (~1 s), so the path known
        from discovery is checked first."""
        uid = record.uri
        object_path = record.meta.get("object_path")
        if object_path:
            root = Path(versioned_path(self.cfg.download_dir))
            cached = root / object_path
            if not cached.resolve().is_relative_to(root.resolve()):  # a tampered object-paths index
                raise FetchError(f"objaverse {uid}: object path {object_path!r} points outside {root} (refused)")
            if cached.is_file():
                return cached
        try:
            with objaverse_root(self.cfg.download_dir):
                paths = objaverse.load_objects([uid], download_processes=1)
        except OSError as exc:  # urllib.error.URLError is an OSError
            raise FetchError(f"objaverse {uid}: could not download (no network?): {exc}") from exc
        except Exception as exc:
            raise FetchError(f"objaverse {uid}: {type(exc).__name__}: {exc}") from exc
        path = paths.get(uid)
        if path is None:
            raise FetchError(f"objaverse {uid}: uid not in object-paths")
        if not os.path.isfile(path):
            raise FetchError(f"objaverse {uid}: {path} missing after download")
        return Path(path)


def _slim(ann: dict[str, Any]) -> dict[str, Any]:
    """The annotation fields records and filters use; full annotations of 800k assets do not fit."""
    return {k: ann[k] for k in ("name", "license", "faceCount", "categories", "tags") if k in ann}


def _shard_of(object_path: str) -> str:
    """'glbs/000-001/<uid>.glb' -> '000-001'."""
    parts = object_path.split("/")
    return parts[1] if len(parts) > 2 else ""


def _download_guard(what: str, call: Callable[[], _T]) -> _T:
    """Run a package call that may download; a network failure becomes one line that says how
    to run without the network (the package reads whatever is already under its folder)."""
    try:
        return call()
    except OSError as exc:
        raise RuntimeError(
            f"could not download objaverse {what} into {objaverse._VERSIONED_PATH} (no network?): "
            f"{short_error(exc)}; offline, set {DOWNLOAD_DIR_KEY} to a folder that already holds "
            "hf-objaverse-v1/ (object-paths.json.gz, metadata/, glbs/)"
        ) from exc
