"""A static HTML gallery of front/back pairs with their descriptions, for judging annotations.

One self-contained file (images inlined as data URLs, no other file referenced) that opens in
any browser, in MLflow's artifact viewer, and can be attached to an issue. Descriptions, names
and raw model answers are untrusted text and are escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

from PIL import Image

from know3d.core.shards import iter_samples, iter_shard_keys, open_image

_STATUS_COLOUR = {"ok": "#2e7d32", "repaired": "#f9a825", "annotation_failed": "#c62828", "no_parts": "#757575"}


def _thumb(png: bytes, size: int, what: str = "image") -> str:
    with open_image(png, what) as opened:
        img = opened.convert("RGBA")
    img.thumbnail((size, size))
    canvas = Image.new("RGB", img.size, (255, 255, 255))
    canvas.paste(img, mask=img.split()[3])
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _provenance(annotation: dict) -> str:
    """Which annotator wrote the description, each part labelled (an unlabelled "parts parts v1"
    reads as noise)."""
    fields = (("backend", "backend"), ("model", "model"), ("prompt", "prompt_version"))
    shown = [(label, annotation.get(key)) for label, key in fields if annotation.get(key) not in (None, "")]
    if not shown:
        return "<span class=prov>no annotation</span>"
    return "<span class=prov>" + " · ".join(f"{label}: <b>{html.escape(str(v))}</b>" for label, v in shown) + "</span>"


def _view(png: bytes, label: str, azimuth: float, thumb: int) -> str:
    return (
        f'<figure><img src="{_thumb(png, thumb, f"{label} view")}" alt="{label}">'
        f"<figcaption><b>{label}</b> {azimuth:.0f}°</figcaption></figure>"
    )


def _card(sample: dict, shard: str, thumb: int) -> str:
    """One pair: both views labelled, where it comes from (split, shard, key) and what was said."""
    meta = json.loads(sample["json"])
    annotation = meta.get("annotation") or {}
    status = str(annotation.get("status", "none"))
    items = "".join(f"<li>{html.escape(c)}</li>" for c in meta.get("components", [])) or "<li><i>none</i></li>"
    raw = annotation.get("raw")
    raw_html = f"<details><summary>raw answer</summary><pre>{html.escape(raw)}</pre></details>" if raw else ""
    title = html.escape(str(meta.get("name") or meta["asset_id"][:12]))
    where = (
        f"split: <b>{html.escape(str(meta.get('split', '?')))}</b> · shard: <b>{html.escape(shard)}</b> · "
        f"key: <b>{html.escape(sample['__key__'])}</b>"
    )
    views = _view(sample["front.png"], "front", meta["front_camera"]["azimuth_deg"], thumb) + _view(
        sample["back.png"], "back", meta["back_camera"]["azimuth_deg"], thumb
    )
    return (
        f'<div class="card"><div class="imgs">{views}</div>'
        f'<div class="meta"><b>{title}</b> pair {int(meta["pair_index"])}<div class=where>{where}</div>'
        f'<span class="status" style="background:{_STATUS_COLOUR.get(status, "#555")}">{html.escape(status)}</span> '
        f"{_provenance(annotation)}<ul>{items}</ul>{raw_html}</div></div>"
    )


def _sampled(shards: list[Path], num_samples: int, seed: int) -> list[tuple[dict, str]]:
    """A seeded sample of pairs with their shard's name; only the chosen payloads are read."""
    keys = [(shard, k) for shard in shards for k in iter_shard_keys(shard)]  # headers only
    chosen = random.Random(seed).sample(keys, min(num_samples, len(keys)))
    out = []
    for shard in shards:  # in shard order, as they are stored
        wanted = {k for s, k in chosen if s == shard}
        if wanted:
            out += [(sample, shard.name) for sample in iter_samples([shard], keys=wanted)]
    return out


def write_gallery(shards: list[Path], out: Path, num_samples: int, seed: int = 0, thumb: int = 256) -> int:
    samples = _sampled(shards, num_samples, seed)
    counts: dict[str, int] = {}
    for sample, _ in samples:
        status = str((json.loads(sample["json"]).get("annotation") or {}).get("status", "none"))
        counts[status] = counts.get(status, 0) + 1
    cards = [_card(sample, shard, thumb) for sample, shard in samples]
    summary = ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(counts.items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>know3d annotation review</title>
<style>body{{font-family:sans-serif;margin:16px;background:#fafafa}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax({2 * thumb + 24}px,1fr));gap:12px}}
.card{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}}
.imgs{{display:flex;gap:4px}} figure{{margin:0;text-align:center;font-size:12px}}
.imgs img{{width:{thumb}px;height:{thumb}px;object-fit:contain;border:1px solid #eee}}
.where,.prov{{font-size:12px;color:#555;overflow-wrap:anywhere}}
.status{{color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}} ul{{margin:4px 0 0 18px}}
pre{{white-space:pre-wrap;font-size:11px}}</style></head><body>
<h2>Annotation review — {len(samples)} pairs</h2><p>{summary}</p><div class="grid">{"".join(cards)}</div></body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return len(samples)
