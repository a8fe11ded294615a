"""A static HTML gallery of front/back pairs with their descriptions, for judging annotations.

One self-contained file (images inlined as data URLs) that opens in any browser and can be
attached to an issue. Descriptions and raw model answers are untrusted text and are escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import random
from pathlib import Path

from PIL import Image

from know3d.core.shards import iter_samples, iter_shard_keys

_STATUS_COLOUR = {"ok": "#2e7d32", "repaired": "#f9a825", "annotation_failed": "#c62828", "no_parts": "#757575"}


def _thumb(png: bytes, size: int) -> str:
    img = Image.open(io.BytesIO(png)).convert("RGBA")
    img.thumbnail((size, size))
    canvas = Image.new("RGB", img.size, (255, 255, 255))
    canvas.paste(img, mask=img.split()[3])
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_gallery(shards: list[Path], out: Path, num_samples: int, seed: int = 0, thumb: int = 256) -> int:
    keys = [k for shard in shards for k in iter_shard_keys(shard)]  # headers only
    chosen = set(random.Random(seed).sample(keys, min(num_samples, len(keys))))
    samples = list(iter_samples(shards, keys=chosen))  # only the chosen payloads are read
    cards = []
    counts: dict[str, int] = {}
    for s in samples:
        meta = json.loads(s["json"])
        annotation = meta.get("annotation") or {}
        status = annotation.get("status", "none")
        counts[status] = counts.get(status, 0) + 1
        items = "".join(f"<li>{html.escape(c)}</li>" for c in meta.get("components", [])) or "<li><i>none</i></li>"
        raw = annotation.get("raw")
        raw_html = f"<details><summary>raw answer</summary><pre>{html.escape(raw)}</pre></details>" if raw else ""
        title = html.escape(str(meta.get("name") or meta["asset_id"][:12]))
        cards.append(
            f'<div class="card"><div class="imgs"><img src="{_thumb(s["front.png"], thumb)}" title="front">'
            f'<img src="{_thumb(s["back.png"], thumb)}" title="back"></div>'
            f'<div class="meta"><b>{title}</b> pair {meta["pair_index"]} '
            f"(front {meta['front_camera']['azimuth_deg']:.0f}°, back {meta['back_camera']['azimuth_deg']:.0f}°)"
            f'<br><span class="status" style="background:{_STATUS_COLOUR.get(status, "#555")}">{html.escape(status)}</span> '
            f"{html.escape(str(annotation.get('backend', '')))} {html.escape(str(annotation.get('model', '')))} "
            f"{html.escape(str(annotation.get('prompt_version', '')))}<ul>{items}</ul>{raw_html}</div></div>"
        )
    summary = ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(counts.items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>know3d annotation review</title>
<style>body{{font-family:sans-serif;margin:16px;background:#fafafa}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax({2 * thumb + 24}px,1fr));gap:12px}}
.card{{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}}
.imgs img{{width:{thumb}px;height:{thumb}px;object-fit:contain;border:1px solid #eee;margin-right:4px}}
.status{{color:#fff;border-radius:3px;padding:1px 6px;font-size:12px}} ul{{margin:4px 0 0 18px}}
pre{{white-space:pre-wrap;font-size:11px}}</style></head><body>
<h2>Annotation review — {len(samples)} pairs</h2><p>{summary}</p><div class="grid">{"".join(cards)}</div></body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return len(samples)
