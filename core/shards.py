"""The shard format: WebDataset tars of front/back pairs plus ``shard_index.json``.

One sample per pair::

    <key>.front.png  <key>.back.png  <key>.json
    <key>.front.depth.png  <key>.back.depth.png      (optional, uint16; see json depth_scale)
    <key>.front.normal.png <key>.back.normal.png     (optional)
    <key>.front.mask.png   <key>.back.mask.png       (optional)

Tars are written with fixed metadata (mtime 0, fixed owner), so the same samples always give
byte-identical shards, and replaced atomically. The index lists every shard with its split,
sample count, bytes and sha256. This module is the one definition of the format: the data build
writes it (:mod:`know3d.rendering.shards` turns rendered views into samples), training, annotation
review and the contact sheet read it.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from know3d.core.config import StrictModel
from know3d.core.io import atomic_write, atomic_writer, remove_temps

INDEX_FILE = "shard_index.json"
# a sample's views are rendered at render.resolution (at most 4096²): anything larger is not ours
MAX_SAMPLE_PIXELS = 4096 * 4096


class ShardConfig(StrictModel):
    """How rendered pairs become shards (the data build's ``shard`` section). The optional
    images (depth, normal, mask) are those the renderer wrote (``render.outputs``)."""

    min_view_coverage: float = Field(
        default=0.002,
        ge=0.0,
        le=1.0,
        description="A pair whose front or back view covers less of the image (mask fraction) is filtered.",
    )
    max_samples: int = Field(default=1000, ge=1)
    max_bytes: int = Field(default=1 << 30, ge=1 << 16)
    val_fraction: float = Field(default=0.02, ge=0.0, le=1.0)


def sample_key(sha: str, profile: str, pair_index: int) -> str:
    return f"{sha[:32]}_{profile}_{pair_index:02d}"


# --------------------------------------------------------------------------- writing


def write_tar(path: Path, samples: Iterable[dict[str, object]]) -> str:
    """Write ``samples`` (``__key__`` plus field -> bytes) as one deterministic tar, atomically;
    returns its sha256."""
    import webdataset as wds

    with atomic_writer(path) as fh:
        writer = wds.TarWriter(fh, encoder=False, mtime=0, user="know3d", group="know3d")
        for sample in samples:
            writer.write(sample)
        writer.close()
    return shard_sha256(path)


def index_digest(entries: list[dict]) -> str:
    """The data set's identity: sha256 over every shard's name and sha256 (both splits). A data
    build logs it to MLflow as its output's digest; training logs the same value as its input."""
    lines = sorted(f"{e['name']}:{e.get('sha256', '')}" for e in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_index(out_dir: Path, entries: list[dict], extra: dict) -> dict:
    """Replace ``shard_index.json`` (entries sorted by name, per-split totals, the data set's
    digest) atomically."""
    entries = sorted(entries, key=lambda e: e["name"])
    splits: dict[str, dict] = {}
    for e in entries:
        s = splits.setdefault(e["split"], {"num_shards": 0, "num_samples": 0})
        s["num_shards"] += 1
        s["num_samples"] += e["num_samples"]
    index = {
        "format": "webdataset",
        "num_shards": len(entries),
        "num_samples": sum(e["num_samples"] for e in entries),
        "splits": splits,
        "digest": index_digest(entries),
        **extra,
        "shards": entries,
    }
    atomic_write(out_dir / INDEX_FILE, json.dumps(index, indent=1))
    return index


def remove_stale(out_dir: Path, keep: set[str]) -> list[str]:
    """Delete shards (and leftover temp files) that the current index does not list."""
    removed = []
    for f in out_dir.glob("*.tar"):
        if f.name not in keep:
            f.unlink()
            removed.append(f.name)
    remove_temps(out_dir)
    return removed


# --------------------------------------------------------------------------- reading


def load_index(out_dir: Path) -> dict:
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return {"shards": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"shards": []}


def shard_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_shard_keys(path: Path) -> list[str]:
    """Sample keys in a shard, in order, from the tar headers only (no payload is read)."""
    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def iter_samples(
    shards: list[Path],
    fields: tuple[str, ...] = ("front.png", "back.png", "json"),
    keys: set[str] | None = None,
    optional: tuple[str, ...] = (),
) -> Iterator[dict[str, bytes]]:
    """Stream samples (``__key__`` plus the requested fields as bytes) shard by shard; a sample
    missing one of ``fields`` is skipped, ``optional`` fields are read when present; with
    ``keys`` only those samples' payloads are read."""
    wanted = set(fields) | set(optional)
    for shard in shards:
        with tarfile.open(shard) as tar:
            sample: dict = {}
            for member in tar:
                key, _, field = member.name.partition(".")
                if sample and sample["__key__"] != key:
                    if all(f in sample for f in fields):
                        yield sample
                    sample = {}
                if keys is not None and key not in keys:
                    continue
                sample["__key__"] = key
                if field in wanted and member.isfile():
                    sample[field] = tar.extractfile(member).read()
            if sample and all(f in sample for f in fields):
                yield sample


# --------------------------------------------------------------------------- shard inputs


def _register_fsspec() -> None:
    """Let webdataset open any fsspec URL (s3://, gs://, hf://, ...) it has no handler for."""
    import fsspec
    import webdataset as wds

    for protocol in fsspec.available_protocols():
        if protocol in ("file", "http", "https", "pipe") or protocol in wds.gopen_schemes:
            continue
        wds.gopen_schemes[protocol] = lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open()


def _is_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _read_index(spec: str) -> dict:
    """The ``shard_index.json`` of a data-build folder (local path or fsspec URL)."""
    import fsspec

    index_url = spec.rstrip("/") + "/" + INDEX_FILE
    try:
        with fsspec.open(index_url, "rt") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{spec}: no {INDEX_FILE} (expected a data-build output folder or .tar shards)"
        ) from None
    except ValueError as exc:
        raise ValueError(f"{index_url}: unreadable shard index ({exc})") from None


def resolve_shards(specs: list[str], split: str) -> tuple[list[str], str]:
    """Shard URLs of ``split`` and a digest identifying the input data.

    A spec is a data-build output folder (its ``shard_index.json`` lists shards and splits), a
    ``.tar`` file, a glob, or an fsspec URL to either. The digest is the sha256 of the sorted
    (name, sha256) pairs from the indexes, or of the URLs when no index exists.
    """
    import glob
    import os

    _register_fsspec()
    urls: list[str] = []
    ident: list[str] = []
    for spec in specs:
        if spec.endswith(".tar"):
            found = [spec] if _is_url(spec) else sorted(glob.glob(spec)) or [spec]
            for url in found:
                if not _is_url(url) and not os.path.isfile(url):
                    raise FileNotFoundError(f"shard not found: {url}")
            urls += found
            ident += found
            continue
        index = _read_index(spec)
        for entry in index.get("shards", []):
            if entry.get("split") == split:
                urls.append(spec.rstrip("/") + "/" + entry["name"])
                ident.append(f"{entry['name']}:{entry.get('sha256', '')}")
    digest = hashlib.sha256("\n".join(sorted(ident)).encode()).hexdigest()
    return urls, digest


@dataclass(frozen=True, slots=True)
class DatasetRef:
    """One input data set as MLflow records it: a data-build folder (``run_id``: the build's MLflow
    run, from its index) or loose shards."""

    name: str
    digest: str
    source: str
    run_id: str | None = None


def dataset_refs(specs: list[str]) -> list[DatasetRef]:
    """What ``specs`` (as :func:`resolve_shards` takes them) are, for lineage: one ref per data
    build folder, with the digest its build logged, plus one for any loose ``.tar`` specs."""
    refs, loose = [], []
    for spec in specs:
        if spec.endswith(".tar"):
            loose.append(spec)
            continue
        index = _read_index(spec)
        source = spec if _is_url(spec) else Path(spec).resolve().as_uri()
        digest = index.get("digest") or index_digest(index.get("shards", []))
        refs.append(DatasetRef(spec.rstrip("/").rsplit("/", 1)[-1], digest, source, index.get("mlflow_run_id")))
    if loose:
        refs.append(
            DatasetRef("shards", hashlib.sha256("\n".join(sorted(loose)).encode()).hexdigest(), ",".join(loose))
        )
    return refs


def open_image(data: bytes, what: str = "image"):
    """A sample's PNG opened (header read, nothing decoded yet) and its size checked against
    :data:`MAX_SAMPLE_PIXELS`: a larger one (a shard from elsewhere) is a ``ValueError`` naming
    ``what`` before anything is decoded. Close it (``with``) when done."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_SAMPLE_PIXELS:
        img.close()
        raise ValueError(f"{what}: {img.width}x{img.height} is larger than {MAX_SAMPLE_PIXELS} pixels (not decoded)")
    return img
