"""Rendered assets -> shards: the split, the plan and the samples (the format is
:mod:`know3d.core.shards`).

Sharding is a pure function of the set of rendered assets: assets are split train/val by a
hash of (sha256, seed) — never by pair — sorted by sha256 and packed into shards of at most
``max_samples`` samples / ``max_bytes`` bytes. Tar files are written with fixed metadata
(mtime 0), so the same assets always give byte-identical shards. That is what makes a build
re-runnable after a crash: re-planning yields the same shards, unchanged shards are skipped,
and a shard is only ever replaced atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from know3d.core.shards import ShardConfig, sample_key, write_tar
from know3d.rendering.process import asset_dir, read_asset, usable_pairs

_EXTRAS = ("depth", "normal", "mask")  # optional images, shipped when the renderer wrote them


def split_of(sha: str, seed: int, val_fraction: float) -> str:
    """Deterministic train/val assignment of a whole asset."""
    digest = hashlib.sha256(f"split:{seed}:{sha}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "little") / 2**64 < val_fraction else "train"


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
    plan: ShardPlan,
    work: Path,
    records: dict[str, dict] | None,
    annotations: dict[str, dict] | None = None,
) -> str:
    """Everything a shard's bytes depend on: the members, the split, the render setting (the work
    folder's fingerprint; the rendered files themselves are content-keyed), this run's records
    and the annotations."""
    payload = {
        "members": plan.members_digest,
        "split": plan.split,
        "render_fingerprint": work.name,
        "records": {sha: (records or {}).get(sha) for sha in sorted({sha for sha, _ in plan.members})},
        "annotations": [(annotations or {}).get(annotation_id(*k)) for k in plan.members],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _pair_bytes(work: Path, sha: str, views: tuple[int, int]) -> int:
    folder = asset_dir(work, sha)
    subs = ["rgba"] + [sub for sub in _EXTRAS if (folder / sub).is_dir()]
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
                size = _pair_bytes(work, summary["sha256"], tuple(summary["pairs"][pair_index]))
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


def _samples(
    work: Path, plan: ShardPlan, records: dict[str, dict] | None, annotations: dict[str, dict] | None
) -> Iterator[dict[str, object]]:
    summary: dict = {}
    for sha, pair_index in plan.members:
        if summary.get("sha256") != sha:
            stored = read_asset(work, sha)
            if stored is None:
                raise FileNotFoundError(f"rendered asset {sha} is missing from {work}")
            summary = {**stored, **(records or {}).get(sha, {})}
        folder = asset_dir(work, sha)
        front, back = summary["pairs"][pair_index]
        annotation = (annotations or {}).get(annotation_id(sha, pair_index))
        sample: dict[str, object] = {
            "__key__": sample_key(sha, summary["profile"], pair_index),
            "front.png": (folder / "rgba" / f"{front:03d}.png").read_bytes(),
            "back.png": (folder / "rgba" / f"{back:03d}.png").read_bytes(),
            "json": json.dumps(sample_json(summary, pair_index, plan.split, annotation), sort_keys=True).encode(),
        }
        for sub in _EXTRAS:
            if (folder / sub).is_dir():
                sample[f"front.{sub}.png"] = (folder / sub / f"{front:03d}.png").read_bytes()
                sample[f"back.{sub}.png"] = (folder / sub / f"{back:03d}.png").read_bytes()
        yield sample


def write_shard(
    work: Path,
    out_dir: Path,
    plan: ShardPlan,
    records: dict[str, dict] | None = None,
    annotations: dict[str, dict] | None = None,
) -> dict:
    """Write one shard atomically; returns its index entry.

    ``records`` (sha256 -> source record) carries this run's metadata (license, caption), which
    wins over what was stored when the asset was rendered; ``annotations`` (``sha:pair`` ->
    annotation record) fills each sample's ``components``.
    """
    final = out_dir / plan.name
    digest = write_tar(final, _samples(work, plan, records, annotations))
    return {
        "name": plan.name,
        "split": plan.split,
        "num_samples": len(plan.members),
        "num_assets": len({sha for sha, _ in plan.members}),
        "bytes": final.stat().st_size,
        "sha256": digest,
        "members_digest": plan.members_digest,
        "content_digest": content_digest(plan, work, records, annotations),
    }


def reusable_entry(
    out_dir: Path,
    work: Path,
    plan: ShardPlan,
    previous: dict[str, dict],
    records: dict[str, dict] | None,
    annotations: dict[str, dict] | None = None,
) -> dict | None:
    """The previous index entry if the shard on disk already holds exactly this plan."""
    entry = previous.get(plan.name)
    file = out_dir / plan.name
    if entry and entry.get("content_digest") == content_digest(plan, work, records, annotations) and file.is_file():
        if file.stat().st_size == entry.get("bytes"):
            return entry
    return None
