"""Asset sources: where the assets of a build come from (local files, Objaverse, TexVerse, procedural)."""

from __future__ import annotations

from pathlib import Path

from know3d.rendering.config import SourceConfig
from know3d.rendering.sources.base import AssetRecord, AssetSource, FetchError, FilteredRecord

__all__ = ["AssetRecord", "AssetSource", "FetchError", "FilteredRecord", "build_source"]


def build_source(cfg: SourceConfig, cache_dir: Path) -> AssetSource:
    """The source named by ``cfg.kind``; hub sources are imported only when chosen, so a local
    build never imports objaverse or huggingface_hub."""
    if cfg.kind == "local":
        from know3d.rendering.sources.local import LocalSource

        return LocalSource(cfg.local)
    if cfg.kind == "objaverse":
        from know3d.rendering.sources.objaverse import ObjaverseSource

        return ObjaverseSource(cfg.objaverse)
    if cfg.kind == "texverse":
        from know3d.rendering.sources.texverse import TexVerseSource

        return TexVerseSource(cfg.texverse)
    if cfg.kind == "procedural":
        from know3d.rendering.sources.procedural import ProceduralSource

        return ProceduralSource(cfg.procedural, cache_dir)
    raise ValueError(f"unknown source kind {cfg.kind!r} (choose local, objaverse, texverse or procedural)")
