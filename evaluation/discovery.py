"""Which uids an evaluation covers: HY3D-Bench's ``<root>/<uid>/000.<ext>`` folders, matched by uid.

Every uid folder that cannot take part is named in ``unmatched`` (by why) instead of silently
dropped, so a summary always accounts for every folder it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from know3d.rendering.assets import MESH_EXTENSIONS

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class EvalError(RuntimeError):
    """The evaluation as a whole cannot run (bad folders, nothing to evaluate)."""


def find_file(folder: Path, extensions: tuple[str, ...], stem: str = "000") -> Path | None:
    """``<folder>/000.<ext>`` for the first of ``extensions`` present (extension case ignored)."""
    by_ext = {}
    for path in folder.iterdir():
        if path.stem == stem and path.is_file():
            by_ext.setdefault(path.suffix.lower().lstrip("."), path)
    return next((by_ext[ext] for ext in extensions if ext in by_ext), None)


def scan(root: Path | None, extensions: tuple[str, ...], what: str) -> tuple[dict[str, Path], list[str]]:
    """(uid -> file for every ``<root>/<uid>/000.<ext>``, uid folders that have no usable file).

    A file that resolves outside ``root`` (a symlink out of it) is refused like a missing one."""
    if root is None:
        return {}, []
    root = Path(root)
    if not root.is_dir():
        raise EvalError(f"{what} folder not found: {root}")
    real_root = root.resolve()
    found, unusable = {}, []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        path = find_file(sub, extensions)
        if path is None or not path.resolve().is_relative_to(real_root):
            unusable.append(sub.name)
            continue
        found[sub.name] = path
    return found, unusable


@dataclass
class Discovery:
    """The matched inputs of ``eval shapes``; ``unmatched``: reason -> uids left out."""

    preds: dict[str, Path]
    images: dict[str, Path]
    gts: dict[str, Path]
    unmatched: dict[str, list[str]] = field(default_factory=dict)

    @property
    def uids(self) -> list[str]:
        """Every uid with a prediction or a condition image (an image alone is a *missing* result)."""
        keys = set(self.preds) | (set(self.images) if self.images else set())
        return sorted(keys)

    @property
    def pairs(self) -> list[str]:
        """uids with both a prediction and a ground truth (what ``eval backviews`` compares)."""
        return sorted(set(self.preds) & set(self.gts))


def unusable_key(role: str) -> str:
    return f"{role}_folder_without_usable_000_file"


def discover(pred: Path, images: Path | None, gt: Path | None) -> Discovery:
    """Meshes and condition images of ``eval shapes``; refuses a run with no prediction at all."""
    preds, bad_preds = scan(pred, MESH_EXTENSIONS, "predictions")
    imgs, bad_imgs = scan(images, IMAGE_EXTENSIONS, "images")
    gts, bad_gts = scan(gt, MESH_EXTENSIONS, "ground-truth")
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.glb (or .obj/.ply/...) folders in {pred}")
    unmatched = {unusable_key("prediction"): bad_preds}
    if images is not None:
        unmatched["prediction_without_image"] = sorted(set(preds) - set(imgs))
        unmatched["image_without_prediction"] = sorted(set(imgs) - set(preds))
        unmatched[unusable_key("image")] = bad_imgs
    if gt is not None:
        unmatched["prediction_without_gt"] = sorted(set(preds) - set(gts))
        unmatched["gt_without_prediction"] = sorted(set(gts) - set(preds))
        unmatched[unusable_key("gt")] = bad_gts
    return Discovery(preds, imgs, gts, unmatched)


def discover_backviews(pred: Path, gt: Path, images: Path | None) -> Discovery:
    """Generated and true back views (and optional front views) of ``eval backviews``; a uid
    needs both a prediction and a ground truth (``Discovery.images`` holds the front views)."""
    preds, bad_preds = scan(pred, IMAGE_EXTENSIONS, "predictions")
    gts, bad_gts = scan(gt, IMAGE_EXTENSIONS, "ground-truth")
    fronts, _ = scan(images, IMAGE_EXTENSIONS, "images")
    if not preds:
        raise EvalError(f"no predictions found: expected <uid>/000.png folders in {pred}")
    unmatched = {
        "prediction_without_gt": sorted(set(preds) - set(gts)),
        "gt_without_prediction": sorted(set(gts) - set(preds)),
        unusable_key("prediction"): bad_preds,
        unusable_key("gt"): bad_gts,
    }
    return Discovery(preds, fronts, gts, unmatched)


def unmatched_lines(unmatched: dict[str, list[str]]) -> list[str]:
    """One rich-markup line per non-empty reason (uids escaped: they are user text)."""
    lines = []
    for kind, uids in unmatched.items():
        if uids:
            shown = ", ".join(escape(u) for u in uids[:5]) + (" ..." if len(uids) > 5 else "")
            lines.append(f"[yellow]{kind.replace('_', ' ')}: {len(uids)} ({shown})[/]")
    return lines
