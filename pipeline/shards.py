"""WebDataset shards of front/back pairs: planning, writing and the shard index.

Sharding is a pure function of the set of rendered assets: assets are split train/val by a
hash of (sha256, seed) — never by pair — sorted by sha256 and packed into shards of at most
``max_samples`` samples / ``max_bytes`` bytes. Tar files are written with fixed metadata
(mtime 0), so the same assets always give byte-identical shards. That is what makes a build
re-runnable after a crash: re-planning yields the same shards, unchanged shards are skipped,
and a shard is only ever replaced atomically (temp file + rename).

One sample per pair::

    <key>.front.png  <key>.back.png  <key>.json
    <key>.front.depth.png  <key>.back.depth.png      (optional, uint16; see json depth_scale)
    <key>.front.normal.png <key>.back.normal.png     (optional)
    <key>.front.mask.png   <key>.back.mask.png       (optional)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from know3d.pipeline.config import ShardConfig
from know3d.rendering.process import asset_dir, read_asset, usable_pairs

INDEX_FILE = "shard_index.json"
_EXTRAS = (("depth", "include_depth"), ("normal", "include_normal"), ("mask", "include_mask"))


def split_of(sha: str, seed: int, val_fraction: float) -> str:
    """Deterministic train/val assignment of a whole asset."""
    digest = hashlib.sha256(f"split:{seed}:{sha}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else "train"


def sample_key(sha: str, profile: str, pair_index: int) -> str:
    return f"{sha[:32]}_{profile}_{pair_index:02d}"


@dataclass(slots=True)
class ShardPlan:
    name: str
    split: str
    members: list[tuple[str, int]] = field(default_factory=list)  # (sha256, pair_index)
    est_bytes: int = 0

    @property
    def members_digest(self) -> str:
        text = "\n".join(f"{sha}:{pair}" for sha, pair in self.members)
        return hashlib.sha256(text.encode()).hexdigest()


def annotation_id(sha: str, pair_index: int) -> str:
    return f"{sha}:{pair_index}"


def content_digest(
    plan: ShardPlan, cfg: ShardConfig, records: dict[str, dict] | None, annotations: dict[str, dict] | None = None
) -> str:
    """Everything a shard's bytes depend on besides the rendered files (which are content-keyed)."""
    payload = {
        "members": plan.members_digest,
        "split": plan.split,
        "shard": cfg.model_dump(mode="json", include={"include_depth", "include_normal", "include_mask"}),
        "records": {sha: (records or {}).get(sha) for sha in sorted({sha for sha, _ in plan.members})},
        "annotations": [(annotations or {}).get(annotation_id(*k)) for k in plan.members],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pair_bytes(work: Path, sha: str, views: tuple[int, int], cfg: ShardConfig) -> int:
    folder = asset_dir(work, sha)
    subs = ["rgba"] + [sub for sub, flag in _EXTRAS if getattr(cfg, flag) and (folder / sub).is_dir()]
    total = 4096
    for sub in subs:
        for v in views:
            f = folder / sub / f"{v:03d}.png"
            if f.is_file():
                total += f.stat().st_size + 512
    return total


def plan_shards(work: Path, assets: list[dict], cfg: ShardConfig, seed: int) -> list[ShardPlan]:
    """``assets``: asset.json summaries of rendered assets. Returns shards in write order."""
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for summary in sorted(assets, key=lambda a: a["sha256"]):
        by_split[split_of(summary["sha256"], seed, cfg.val_fraction)].append(summary)
    plans: list[ShardPlan] = []
    for split, items in by_split.items():
        current: ShardPlan | None = None
        count = 0
        for summary in items:
            for pair_index in usable_pairs(summary, cfg.min_view_coverage)[0]:
                size = _pair_bytes(work, summary["sha256"], tuple(summary["pairs"][pair_index]), cfg)
                if (
                    current is None
                    or len(current.members) >= cfg.max_samples
                    or (current.members and current.est_bytes + size > cfg.max_bytes)
                ):
                    current = ShardPlan(f"{split}-{count:06d}.tar", split)
                    plans.append(current)
                    count += 1
                current.members.append((summary["sha256"], pair_index))
                current.est_bytes += size
    return plans


def sample_json(summary: dict, pair_index: int, split: str, annotation: dict | None = None) -> dict:
    front, back = summary["pairs"][pair_index]
    cams = summary["cameras"]
    return {
        "asset_id": summary["sha256"],
        "asset_key": summary.get("key"),
        "source": summary.get("source"),
        "license": summary.get("license"),
        "name": (summary.get("meta") or {}).get("name"),
        "caption": (summary.get("meta") or {}).get("caption"),
        "split": split,
        "profile": summary["profile"],
        "pair_index": pair_index,
        "front_view": front,
        "back_view": back,
        "perturbed": bool(cams[front].get("perturbed") or cams[back].get("perturbed")),
        "front_camera": cams[front],
        "back_camera": cams[back],
        "camera_convention": "c2w OpenCV (x right, y down, z forward); world +Y up, front +Z",
        "fov_deg": summary["fov_deg"],
        "elevation_deg": summary["elevation_deg"],
        "resolution": summary["resolution"],
        "background": summary["background"],
        "normalization": summary["normalization"],
        "lights": summary["lights"],
        "depth_scale": summary["depth_scale"],
        "normal_frame": summary["normal_frame"],
        "parts": summary.get("parts", []),
        "components": list((annotation or {}).get("components", [])),
        "annotation": {k: v for k, v in (annotation or {}).items() if k != "components"} or None,
    }


def write_shard(
    work: Path,
    out_dir: Path,
    plan: ShardPlan,
    cfg: ShardConfig,
    records: dict[str, dict] | None = None,
    annotations: dict[str, dict] | None = None,
) -> dict:
    """Write one shard atomically; returns its index entry.

    ``records`` (sha256 -> source record) carries this run's metadata (license, caption), which
    wins over what was stored when the asset was rendered; ``annotations`` (``sha:pair`` ->
    annotation record) fills each sample's ``components``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / plan.name
    tmp = out_dir / f".{plan.name}.{uuid.uuid4().hex[:8]}.tmp"
    cache: dict[str, dict] = {}
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, encoder=False, mtime=0, user="know3d", group="know3d")
            for sha, pair_index in plan.members:
                summary = cache.get(sha) or read_asset(work, sha)
                if summary is None:
                    raise FileNotFoundError(f"rendered asset {sha} is missing from {work}")
                summary = {**summary, **(records or {}).get(sha, {})}
                cache = {sha: summary}
                folder = asset_dir(work, sha)
                front, back = summary["pairs"][pair_index]
                sample: dict[str, object] = {
                    "__key__": sample_key(sha, summary["profile"], pair_index),
                    "front.png": (folder / "rgba" / f"{front:03d}.png").read_bytes(),
                    "back.png": (folder / "rgba" / f"{back:03d}.png").read_bytes(),
                    "json": json.dumps(
                        sample_json(
                            summary, pair_index, plan.split, (annotations or {}).get(annotation_id(sha, pair_index))
                        ),
                        sort_keys=True,
                    ).encode(),
                }
                for sub, flag in _EXTRAS:
                    if getattr(cfg, flag) and (folder / sub).is_dir():
                        sample[f"front.{sub}.png"] = (folder / sub / f"{front:03d}.png").read_bytes()
                        sample[f"back.{sub}.png"] = (folder / sub / f"{back:03d}.png").read_bytes()
                writer.write(sample)
            writer.close()
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "name": plan.name,
        "split": plan.split,
        "num_samples": len(plan.members),
        "num_assets": len({sha for sha, _ in plan.members}),
        "bytes": final.stat().st_size,
        "sha256": digest,
        "members_digest": plan.members_digest,
        "content_digest": content_digest(plan, cfg, records, annotations),
    }


def load_index(out_dir: Path) -> dict:
    path = out_dir / INDEX_FILE
    if not path.is_file():
        return {"shards": []}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"shards": []}


def reusable_entry(
    out_dir: Path,
    plan: ShardPlan,
    previous: dict[str, dict],
    cfg: ShardConfig,
    records: dict[str, dict] | None,
    annotations: dict[str, dict] | None = None,
) -> dict | None:
    """The previous index entry if the shard on disk already holds exactly this plan."""
    entry = previous.get(plan.name)
    file = out_dir / plan.name
    digest = content_digest(plan, cfg, records, annotations)
    if entry and entry.get("content_digest") == digest and file.is_file():
        if file.stat().st_size == entry.get("bytes"):
            return entry
    return None


def write_index(out_dir: Path, entries: list[dict], extra: dict) -> dict:
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
        **extra,
        "shards": entries,
    }
    tmp = out_dir / f".{INDEX_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX_FILE)
    return index


def remove_stale(out_dir: Path, keep: set[str]) -> list[str]:
    """Delete shards (and leftover temp files) that the current index does not list."""
    removed = []
    for f in out_dir.glob("*.tar"):
        if f.name not in keep:
            f.unlink()
            removed.append(f.name)
    for f in out_dir.glob(".*.tmp"):
        f.unlink(missing_ok=True)
    return removed


def shard_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_shard_keys(path: Path) -> list[str]:
    """Sample keys in a shard, in order, from the tar headers only (no payload is read)."""
    import tarfile

    keys: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def iter_samples(
    shards: list[Path], fields: tuple[str, ...] = ("front.png", "back.png", "json"), keys: set[str] | None = None
) -> Iterator[dict[str, bytes]]:
    """Stream samples (``__key__`` plus the requested fields as bytes) shard by shard; with
    ``keys`` only those samples' payloads are read."""
    import tarfile

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
                if field in fields and member.isfile():
                    sample[field] = tar.extractfile(member).read()
            if sample and all(f in sample for f in fields):
                yield sample
