"""TexVerse assets from the Hugging Face Hub (``YiboZhang2001/TexVerse``).

``metadata.json`` (one object keyed by uid) carries license, counts, ``max_texture``, ``pbrType``
and ``glb_paths`` (one repo-relative GLB per texture resolution); ``caption.json`` maps uid to a
caption. The 1K GLBs live in a second repo (``TexVerse-1K``) because of the Hub's file-count
limit, 2K/4K/8K in the main one. Everything goes through ``hf_hub_download`` so the standard HF
cache (and ``HF_HUB_OFFLINE``) applies. The upstream schema is not documented in detail, so
fields are read defensively.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download

from know3d.rendering.config import TexVerseSourceConfig
from know3d.rendering.sources.base import (
    AssetRecord,
    FetchError,
    FilteredRecord,
    HubRetriesHushed,
    as_int,
    license_rejection,
    max_rejection,
    read_uid_list,
    short_error,
)

log = logging.getLogger(__name__)

_URI_SEP = "::"
#: the config key that points discovery and fetch at an HF cache (named in offline hints)
CACHE_DIR_KEY = "source.texverse.cache_dir"
OFFLINE_ENV = "HF_HUB_OFFLINE=1"


def offline_hint(cache_dir: str | None) -> str:
    """What to do when the hub is out of reach, for the one-line discovery error: offline runs
    read the HF cache only with HF_HUB_OFFLINE=1, and only the cache the config names."""
    cache = cache_dir or hf_constants.HF_HUB_CACHE
    if hf_constants.HF_HUB_OFFLINE:
        return f"not in the HF cache {cache} ({OFFLINE_ENV} is set); set {CACHE_DIR_KEY} to the cache that holds it"
    return (
        f"no network? with the files already in an HF cache, run with {OFFLINE_ENV} "
        f"and set {CACHE_DIR_KEY} to that cache (now {cache})"
    )


def _license_of(entry: dict[str, Any]) -> str | None:
    """A label such as 'CC Attribution'; Sketchfab-style dicts ({'label': ..}) are accepted too."""
    value = entry.get("license")
    if isinstance(value, dict):
        value = value.get("label") or value.get("name") or value.get("slug")
    return str(value) if value else None


def _caption_of(value: Any) -> str | None:
    """A caption string; dict values give their 'caption'/'text' field or first string."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        for field in ("caption", "text"):
            if isinstance(value.get(field), str) and value[field]:
                return value[field]
        value = list(value.values())
    if isinstance(value, list):
        return next((v for v in value if isinstance(v, str) and v), None)
    return None


def _is_pbr(entry: dict[str, Any]) -> bool:
    value = entry.get("pbrType")
    if isinstance(value, str):
        return value.strip().casefold() not in {"", "false", "none", "null", "0"}
    return bool(value)


def _glb_path(entry: dict[str, Any], resolution: str) -> str | None:
    """The repo-relative GLB path of one resolution (a path containing ``glbs_<res>/``)."""
    paths = entry.get("glb_paths") or []
    if isinstance(paths, str):
        paths = [paths]
    marker = f"glbs_{resolution}/"
    for path in paths:
        if isinstance(path, str) and marker in path:
            path = path.replace("\\", "/").lstrip("/")
            # Anchor at 'glbs/' in case the metadata carries a local prefix.
            start = path.find("glbs/")
            return path[start:] if start > 0 else path
    return None


def _index(data: Any) -> dict[str, dict[str, Any]]:
    """uid -> entry; a list of entries with a 'uid' field is accepted as well."""
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}
    if isinstance(data, list):
        return {str(e["uid"]): e for e in data if isinstance(e, dict) and e.get("uid")}
    raise ValueError(f"unexpected TexVerse metadata layout: {type(data).__name__}")


class TexVerseSource:
    name = "texverse"

    def __init__(self, cfg: TexVerseSourceConfig) -> None:
        self.cfg = cfg

    def _download(self, repo_id: str, filename: str) -> Path:
        cfg = self.cfg
        # A pinned revision is a commit of the main repo; the 1K repo has its own history.
        revision = cfg.revision if repo_id == cfg.repo_id else None
        with HubRetriesHushed():
            path = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision, cache_dir=cfg.cache_dir)
        return Path(path)

    def _load_json(self, filename: str) -> Any:
        with open(self._download(self.cfg.repo_id, filename), "rb") as f:
            return json.load(f)

    def _captions(self) -> dict[str, str]:
        try:
            data = self._load_json("caption.json")
        except Exception as exc:  # noqa: BLE001 - captions are optional: a missing file must not stop discovery
            log.warning("TexVerse captions unavailable (%s); continuing without", short_error(exc))
            return {}
        if not isinstance(data, dict):
            log.warning("TexVerse caption.json is a %s, not an object; ignoring it", type(data).__name__)
            return {}
        out: dict[str, str] = {}
        for uid, value in data.items():
            caption = _caption_of(value)
            if caption:
                out[str(uid)] = caption
        return out

    def _rejection(self, entry: dict[str, Any]) -> tuple[str, str] | None:
        """(filter, detail) of the first filter that drops the asset, in the documented order."""
        cfg = self.cfg
        rejection = (
            license_rejection(_license_of(entry), cfg.licenses)
            or max_rejection("max_face_count", entry.get("faceCount"), cfg.max_face_count, "faces")
            or max_rejection("max_texture", entry.get("max_texture"), cfg.max_texture, "max_texture")
        )
        if rejection:
            return rejection
        if cfg.require_pbr and not _is_pbr(entry):
            return "pbr", "no PBR material (empty pbrType)"
        if _glb_path(entry, cfg.resolution) is None:
            return "resolution", f"no glbs_{cfg.resolution} variant"
        return None

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        cfg = self.cfg
        try:
            metadata = _index(self._load_json("metadata.json"))
        except Exception as exc:
            raise RuntimeError(
                f"could not get metadata.json of dataset {cfg.repo_id}: {offline_hint(cfg.cache_dir)} "
                f"({short_error(exc)})"
            ) from exc
        captions = self._captions() if cfg.with_captions else {}
        uids = read_uid_list(cfg.uids, cfg.uids_file) or sorted(metadata)
        repo = cfg.repo_id_1k if cfg.resolution == "1k" else cfg.repo_id

        kept: list[AssetRecord] = []
        filtered: list[FilteredRecord] = []
        for uid in uids:
            entry = metadata.get(uid)
            if entry is None:
                record = AssetRecord(f"texverse:{uid}", self.name, "", None, {"uid": uid})
                filtered.append(FilteredRecord(record, "unknown_uid", f"uid {uid} not in TexVerse metadata"))
                continue
            path = _glb_path(entry, cfg.resolution)
            meta: dict[str, Any] = {
                "uid": uid,
                "name": str(entry.get("name") or ""),
                "face_count": as_int(entry.get("faceCount")),
                "max_texture": as_int(entry.get("max_texture")),
            }
            if uid in captions:
                meta["caption"] = captions[uid]
            uri = f"{repo}{_URI_SEP}{path}" if path else ""
            record = AssetRecord(f"texverse:{uid}", self.name, uri, _license_of(entry), meta)
            rejection = self._rejection(entry)
            if rejection is not None:
                filtered.append(FilteredRecord(record, *rejection))
            elif cfg.limit is None or len(kept) < cfg.limit:
                kept.append(record)
        return kept, filtered

    def fetch(self, record: AssetRecord) -> Path:
        repo, sep, path = record.uri.partition(_URI_SEP)
        if not sep or not repo or not path:
            raise FetchError(f"texverse {record.key}: malformed uri {record.uri!r} (want '<repo>::<path>')")
        try:
            local = self._download(repo, path)
        except Exception as exc:  # HTTP, offline-cache miss, disk: all mean "not available here"
            reason = f"could not download from {repo} (no network?): {short_error(exc)}"
            raise FetchError(f"texverse {path}: {reason}") from exc
        if not local.is_file():
            raise FetchError(f"texverse {path}: {local} missing after download")
        return local
