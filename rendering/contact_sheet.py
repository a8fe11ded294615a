"""Contact sheet of front/back pairs, read back from the written shards."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from know3d.core.shards import iter_samples, open_image

TILE = 192
LABEL_H = 18


def collect_pairs(shards: list[Path], num_pairs: int) -> list[tuple[Image.Image, Image.Image, dict]]:
    """Up to ``num_pairs`` pairs, one per asset where possible, rotating the pair index so the
    sheet shows many azimuths; reading stops as soon as enough are found."""
    picked: list[tuple[Image.Image, Image.Image, dict]] = []
    spare: list[tuple[Image.Image, Image.Image, dict]] = []
    seen: set[str] = set()
    for sample in iter_samples(shards):
        meta = json.loads(sample["json"])
        wanted = meta["asset_id"] not in seen and meta["pair_index"] == len(picked) % 4
        if wanted or len(spare) < num_pairs:
            key = sample["__key__"]
            item = (
                open_image(sample["front.png"], f"{key} front.png"),
                open_image(sample["back.png"], f"{key} back.png"),
                meta,
            )
            (picked if wanted else spare).append(item)
        if wanted:
            seen.add(meta["asset_id"])
            if len(picked) >= num_pairs:
                break
    return (picked + spare)[:num_pairs]


def make_contact_sheet(shards: list[Path], num_pairs: int, out: Path, columns: int = 2) -> Path | None:
    pairs = collect_pairs(shards, num_pairs)
    if not pairs:
        return None
    rows = (len(pairs) + columns - 1) // columns
    cell_w, cell_h = 2 * TILE + 8, TILE + LABEL_H
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (90, 90, 90))
    draw = ImageDraw.Draw(sheet)
    for i, (front, back, meta) in enumerate(pairs):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        for j, img in enumerate((front, back)):
            tile = Image.new("RGB", img.size, (255, 255, 255))
            rgba = img.convert("RGBA")
            tile.paste(rgba, mask=rgba.split()[3])
            sheet.paste(tile.resize((TILE, TILE)), (x + j * (TILE + 4), y + LABEL_H))
        fa, ba = meta["front_camera"]["azimuth_deg"], meta["back_camera"]["azimuth_deg"]
        name = (meta.get("name") or meta["asset_id"][:8])[:22]
        draw.text(
            (x + 4, y + 3), f"{name} #{meta['pair_index']}  front {fa:.0f}° | back {ba:.0f}°", fill=(255, 255, 255)
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
