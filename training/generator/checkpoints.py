"""Where a flow checkpoint's weights are: one rule for the SS flow and the SLat flow.

``source`` is a ``.safetensors`` file, a folder holding ``<stem>.safetensors`` (ours) or exactly one
upstream file matching ``upstream_glob`` (in the folder or its ``ckpts/``), or a Hugging Face hub id
(the local cache first, then a download of the matching files only). Pickled checkpoints are never
loaded. Every failure is ``error(message)`` naming the source and why.
"""

from __future__ import annotations

from pathlib import Path


def _find_weights(folder: Path, stem: str, upstream_glob: str, what: str, error: type[Exception]) -> Path:
    own = folder / f"{stem}.safetensors"
    if own.is_file():
        return own
    found = [p for sub in (folder, folder / "ckpts") if sub.is_dir() for p in sorted(sub.glob(upstream_glob))]
    if not found:
        raise error(
            f"{folder}: no {what} safetensors ({stem}.safetensors or [ckpts/]{upstream_glob}); "
            "only safetensors checkpoints are loaded"
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise error(f"{folder}: several {what} checkpoints ({names}); pass the .safetensors file")
    return found[0]


def _resolve(source: str | Path, patterns: list[str], what: str, error: type[Exception]) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise error(f"{source}: no such file or folder (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (any hub error): download below
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network/hub errors become one clear line
        raise error(f"{source}: cannot download the {what} model from the hub ({type(exc).__name__}: {exc})") from None


def weights_file(source: str | Path, stem: str, upstream_glob: str, what: str, error: type[Exception]) -> Path:
    """The ``.safetensors`` file of ``source`` (see the module docstring)."""
    base = upstream_glob.removesuffix(".safetensors")  # the weights and the json config beside them
    patterns = [f"{stem}.*", base, f"ckpts/{base}"]
    path = _resolve(source, patterns, what, error)
    if path.is_dir():
        return _find_weights(path, stem, upstream_glob, what, error)
    if path.suffix == ".safetensors":
        return path
    raise error(f"{path}: not a .safetensors file (pickled checkpoints are never loaded)")
