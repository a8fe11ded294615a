"""The offline `parts` annotator: components visible from the back, from the asset itself.

The renderer counts each named part's visible pixels in every view (a flat-colour segmentation
pass). A part is a back-view component when it covers at least ``min_fraction`` of the back
image and shows ``back_ratio`` times more from the back than from the front (or not at all
from the front). Part names become short noun phrases: ``shoulder_strap_left`` and
``shoulder_strap_right`` give "two shoulder straps", ``battery_cover`` gives "a battery cover".
Names that carry no meaning (numbers, hashes, "mesh_0", "Cylinder.003") are skipped.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from know3d.annotation.base import PairRequest, Replicas
from know3d.annotation.config import AnnotateConfig

_POSITIONS = ("front", "rear", "back", "top", "bottom", "upper", "lower", "inner", "outer", "side")
_PAIR_SIDES = {"left", "right"}
_MEANINGLESS = re.compile(
    r"^(\d+|[0-9a-f]{8,}|(mesh|node|object|geometry|primitive|group|scene|default|material|solid|body\d)\d*"
    r"|cube|cylinder|sphere|icosphere|plane|cone|torus|circle|suzanne)$",
    re.I,
)
_SINGULAR_S = ("ss", "us", "is", "lens", "as")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def _words(name: str) -> list[str]:
    name = re.sub(r"[#:.].*$", "", name)  # Blender/instancing suffixes: "Cylinder.003", "pin#1:10"
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)  # camelCase
    return [w.lower() for w in re.split(r"[\s_\-]+", name) if w and not w.isdigit()]


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def part_phrases(names: list[str]) -> list[str]:
    """Noun phrases for part names, grouping left/right twins and numbered copies."""
    groups: OrderedDict[str, int] = OrderedDict()
    for name in names:
        words = _words(name)
        if not words or _MEANINGLESS.match("".join(words)) or _MEANINGLESS.match(name):
            continue
        side_free = [w for w in words if w not in _PAIR_SIDES] or words
        # position words read as adjectives: wheel_front_left -> "front wheel"
        base = " ".join([w for w in side_free if w in _POSITIONS] + [w for w in side_free if w not in _POSITIONS])
        groups[base] = groups.get(base, 0) + 1
    phrases = []
    for base, count in groups.items():
        if count == 1:
            plural_already = base.endswith("s") and not base.endswith(_SINGULAR_S)
            article = "" if plural_already else ("an " if base[0] in "aeiou" else "a ")
            phrases.append(f"{article}{base}")
        else:
            *head, noun = base.split()
            phrases.append(" ".join([_NUMBER_WORDS.get(count, str(count)), *head, _plural(noun)]))
    return phrases


def back_parts(
    front: dict[str, int] | None,
    back: dict[str, int] | None,
    num_pixels: int,
    min_fraction: float,
    back_ratio: float,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """Names of the parts that characterise the back view, largest first (``exclude``: the
    object's main body, which is not one of its components)."""
    if not back:
        return []
    front = front or {}
    chosen = [
        (pixels, name)
        for name, pixels in back.items()
        if pixels >= min_fraction * num_pixels and pixels >= back_ratio * front.get(name, 0) and name not in exclude
    ]
    return [name for _, name in sorted(chosen, key=lambda t: (-t[0], t[1]))]


def main_body(part_pixels: list[dict[str, int] | None]) -> str | None:
    """The part seen most over all views of the asset: its body, not a component."""
    totals: dict[str, int] = {}
    for view in part_pixels:
        for name, pixels in (view or {}).items():
            totals[name] = totals.get(name, 0) + pixels
    return max(totals, key=lambda n: (totals[n], n)) if len(totals) > 1 else None


def describe_pair(
    summary: dict, pair_index: int, min_fraction: float, back_ratio: float, max_items: int, skip_body: bool = True
) -> list[str]:
    """Descriptions for one pair of a rendered asset (its ``asset.json`` summary)."""
    pixels = summary.get("part_pixels")
    if not pixels:
        return []
    front, back = summary["pairs"][pair_index]
    num_pixels = summary["resolution"] ** 2
    body = main_body(pixels) if skip_body else None
    names = back_parts(
        pixels[front], pixels[back], num_pixels, min_fraction, back_ratio, frozenset([body]) if body else frozenset()
    )
    return part_phrases(names)[:max_items]


class PartsAnnotator:
    """The offline annotator: the request's hint *is* the answer (the pair's back-view parts)."""

    def __init__(self, cfg: AnnotateConfig) -> None:
        self.cfg = cfg

    @staticmethod
    def replicas(cfg: AnnotateConfig) -> Replicas | None:
        return None

    @staticmethod
    def wants_parts(cfg: AnnotateConfig) -> bool:
        return True

    @staticmethod
    def model_name(cfg: AnnotateConfig) -> str:
        return "parts"

    @staticmethod
    def cache_salt(cfg: AnnotateConfig) -> str:
        return f":{cfg.parts_min_fraction}:{cfg.parts_back_ratio}:{cfg.parts_skip_body}:{cfg.max_items}"

    def annotate(self, requests: list[PairRequest]) -> list[dict]:
        return [{"components": list(r.hint), "status": "ok" if r.hint else "no_parts"} for r in requests]
