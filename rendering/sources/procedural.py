"""A built-in, deterministic set of procedural multi-part objects for the quickstart.

Why this exists: the pipeline's quickstart (and its tests) must run without downloads or
licensed data, yet still exercise what matters for front/back view pairs — objects whose front
and back *really* differ — and per-part outputs. So every object here:

* faces +Z with +Y up (the glTF convention the renderer assumes), and puts category-typical
  features on one side only: a mug's handle, a chair's backrest, a backpack's straps, a
  robot's jetpack sit at -Z; faces, screens, lenses, pockets and headlights at +Z;
* is made of named parts, each its own scene node *and* its own PBR material with a distinct
  ``baseColorFactor``, so per-part masks can later be rendered by node or by colour;
* is fully deterministic: the same ``(seed, category, index)`` gives a byte-identical GLB (sizes,
  proportions and colours come from a NumPy generator seeded by a stable hash, never Python's
  randomized ``hash``), so asset content hashes — and the manifest — are reproducible.

Left and right in part names are the object's own (it faces +Z, so its left is +X).
Objects stand on y = 0, are roughly centred on the Y axis, and are scaled so that their longest
bounding-box side is 1.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
from trimesh import creation
from trimesh.transformations import rotation_matrix, translation_matrix

from know3d.core.io import atomic_write
from know3d.rendering.config import ProceduralSourceConfig
from know3d.rendering.sources.base import AssetRecord, FetchError, FilteredRecord

# Bump when the geometry code changes: files live in a folder named after it, so a cache made by
# an older generator is never mistaken for the current one.
GENERATOR_VERSION = 1
LICENSE = "CC0-1.0"

_X = np.array([1.0, 0.0, 0.0])
_Y = np.array([0.0, 1.0, 0.0])
_Z = np.array([0.0, 0.0, 1.0])
_SECTIONS = 32  # circle resolution: smooth enough at 512 px, keeps objects well under 20k faces


# --------------------------------------------------------------------------- geometry helpers


@dataclass(frozen=True, slots=True)
class Part:
    """One named part; ``tone`` biases its colour towards what the part looks like in reality
    (``dark`` screens and tyres, ``light`` clock faces and bulbs) without giving up uniqueness."""

    name: str
    mesh: trimesh.Trimesh
    tone: str = "any"


def _oriented(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Outward-facing normals: revolve and hand-made sweeps can come out inside-out."""
    if mesh.is_watertight and mesh.volume < 0:
        mesh.invert()
    return mesh


def _box(extents: Sequence[float], center: Sequence[float], transform: np.ndarray | None = None) -> trimesh.Trimesh:
    """Axis-aligned box at ``center``, optionally rotated afterwards about the origin by ``transform``."""
    mesh = creation.box(extents=extents, transform=translation_matrix(center))
    if transform is not None:
        mesh.apply_transform(transform)
    return mesh


def _rod(p0: Sequence[float], p1: Sequence[float], radius: float, sections: int = _SECTIONS) -> trimesh.Trimesh:
    """Cylinder between two points (legs, poles, axles)."""
    return creation.cylinder(radius=radius, sections=sections, segment=np.array([p0, p1], dtype=np.float64))


def _capsule(p0: Sequence[float], p1: Sequence[float], radius: float) -> trimesh.Trimesh:
    """Capsule whose hemisphere centres are ``p0`` and ``p1`` (arms, rounded bags)."""
    a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    axis = b - a
    length = float(np.linalg.norm(axis))
    mesh = creation.capsule(height=length, radius=radius, count=(16, 8))
    align = trimesh.geometry.align_vectors(_Z, axis / length) if length > 0 else np.eye(4)
    mesh.apply_transform(translation_matrix((a + b) / 2.0) @ align)
    return mesh


def _sphere(center: Sequence[float], radii: float | Sequence[float], subdivisions: int = 2) -> trimesh.Trimesh:
    """Sphere or axis-aligned ellipsoid (eyes, bells, knobs)."""
    mesh = creation.icosphere(subdivisions=subdivisions, radius=1.0)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(np.broadcast_to(np.asarray(radii, dtype=np.float64), (3,)))
    mesh.apply_transform(translation_matrix(center) @ scale)
    return mesh


def _revolve_y(
    profile: Sequence[Sequence[float]], sections: int = 48, center: Sequence[float] = (0, 0, 0)
) -> trimesh.Trimesh:
    """Surface of revolution about the vertical axis; ``profile`` is (radius, height) pairs.

    trimesh revolves about +Z, so the result is turned to make +Z the up (+Y) axis.
    """
    mesh = creation.revolve(np.asarray(profile, dtype=np.float64), sections=sections)
    mesh.apply_transform(translation_matrix(center) @ rotation_matrix(-np.pi / 2, _X))
    return _oriented(mesh)


def _disc_z(radius: float, thickness: float, center: Sequence[float]) -> trimesh.Trimesh:
    """Thin cylinder facing ±Z (clock faces, lens glass, logos)."""
    c = np.asarray(center, dtype=np.float64)
    return _rod(c - _Z * thickness / 2, c + _Z * thickness / 2, radius)


def _tube(
    path: np.ndarray,
    width: float | np.ndarray,
    thickness: float | np.ndarray,
    side: np.ndarray = _X,
    sections: int = 12,
) -> trimesh.Trimesh:
    """Capped tube swept along a planar ``path`` (N, 3) whose plane is normal to ``side``.

    Handles, straps, spouts and cables are all planar curves, so a fixed ``side`` axis gives a
    twist-free frame without parallel transport. The cross-section is an ellipse with
    half-axis ``width`` along ``side`` and ``thickness`` in the path's plane; both may vary per
    point (a tapering spout).
    """
    path = np.asarray(path, dtype=np.float64)
    n = len(path)
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.cross(tangent, side)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    w = np.broadcast_to(np.asarray(width, dtype=np.float64), (n,))[:, None, None]
    t = np.broadcast_to(np.asarray(thickness, dtype=np.float64), (n,))[:, None, None]
    phi = np.linspace(0.0, 2.0 * np.pi, sections, endpoint=False)
    ring = (
        path[:, None, :]
        + w * np.cos(phi)[None, :, None] * side[None, None, :]
        + t * np.sin(phi)[None, :, None] * normal[:, None, :]
    )
    vertices = np.concatenate([ring.reshape(-1, 3), path[[0, -1]]])
    i = np.arange(n - 1)[:, None]
    j = np.arange(sections)[None, :]
    a = i * sections + j
    b = i * sections + (j + 1) % sections
    c, d = a + sections, b + sections
    side_faces = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)], axis=1).reshape(-1, 3)
    start, end = n * sections, n * sections + 1
    ring0 = np.arange(sections)
    ring1 = (n - 1) * sections + ring0
    caps = np.concatenate(
        [
            np.stack([np.full(sections, start), (ring0 + 1) % sections, ring0], -1),
            np.stack([np.full(sections, end), ring1, (n - 1) * sections + (ring0 + 1) % sections], -1),
        ]
    )
    mesh = trimesh.Trimesh(vertices, np.concatenate([side_faces, caps]), process=True)
    return _oriented(mesh)


def _arc_yz(
    cy: float, cz: float, ry: float, rz: float, t0: float, t1: float, n: int = 24, x: float = 0.0
) -> np.ndarray:
    """Elliptic arc in the plane x = const: (y, z) = (cy + ry cos t, cz + rz sin t)."""
    t = np.linspace(t0, t1, n)
    return np.stack([np.full(n, x), cy + ry * np.cos(t), cz + rz * np.sin(t)], axis=1)


def _merge(*meshes: trimesh.Trimesh) -> trimesh.Trimesh:
    """Several pieces that form one part (two feet, vent slats) become one mesh."""
    return trimesh.util.concatenate(list(meshes))


# --------------------------------------------------------------------------- categories
#
# Each builder draws its proportions from ``rng`` and returns its parts in a fixed order (the
# order is the node order in the GLB and the ``parts`` list in the record). Units are arbitrary;
# ``generate_asset`` rescales to a longest side of 1.


def _mug(rng: np.random.Generator) -> list[Part]:
    r, h, wall = rng.uniform(0.3, 0.42), rng.uniform(0.75, 1.1), 0.04
    body = _revolve_y([(0, 0), (r, 0), (r, h), (r - wall, h), (r - wall, 0.06), (0, 0.06)])
    # handle: a half-ellipse bulging to -Z, its ends buried in the wall
    cy, ry, rz = h * rng.uniform(0.45, 0.55), h * rng.uniform(0.24, 0.32), rng.uniform(0.14, 0.22)
    handle = _tube(_arc_yz(cy, -r + 0.02, ry, rz, 0.0, -np.pi), rng.uniform(0.045, 0.07), rng.uniform(0.03, 0.045))
    logo = _disc_z(r * rng.uniform(0.3, 0.45), 0.04, (0, h * rng.uniform(0.45, 0.6), r - 0.015))
    coffee = _rod((0, 0, 0), (0, 0.02, 0), r - wall - 0.002)
    coffee.apply_translation((0, h * rng.uniform(0.6, 0.85), 0))
    return [Part("body", body), Part("handle", handle), Part("logo", logo), Part("coffee", coffee, "dark")]


def _chair(rng: np.random.Generator) -> list[Part]:
    w, d, st, sh = rng.uniform(0.8, 1.0), rng.uniform(0.75, 0.95), rng.uniform(0.06, 0.1), rng.uniform(0.8, 1.0)
    leg_r, inset = rng.uniform(0.035, 0.05), 0.08
    parts = [Part("seat", _box((w, st, d), (0, sh - st / 2, 0)))]
    parts.append(Part("cushion", _box((w * 0.88, rng.uniform(0.04, 0.08), d * 0.85), (0, sh + 0.02, d * 0.03))))
    for zname, zs in (("front", 1), ("back", -1)):
        for xname, xs in (("left", 1), ("right", -1)):
            x, z = xs * (w / 2 - inset), zs * (d / 2 - inset)
            parts.append(Part(f"leg_{zname}_{xname}", _rod((x, 0, z), (x, sh - st, z), leg_r)))
    bh, tilt = rng.uniform(0.7, 1.0), np.radians(rng.uniform(4, 12))
    z0 = -d / 2 + 0.04
    # tilt about the backrest's bottom edge so its top leans back, away from the front (+Z)
    pivot = translation_matrix((0, sh, z0)) @ rotation_matrix(-tilt, _X) @ translation_matrix((0, -sh, -z0))
    backrest = _box((w * 0.95, bh, 0.06), (0, sh + bh / 2, z0), pivot)
    return parts + [Part("backrest", backrest)]


def _backpack(rng: np.random.Generator) -> list[Part]:
    w, h, d = rng.uniform(0.7, 0.85), rng.uniform(1.0, 1.2), rng.uniform(0.35, 0.45)
    squash = np.diag([1.0, 1.0, d / w, 1.0])
    bag = _capsule((0, w / 2, 0), (0, h - w / 2, 0), w / 2)
    bag.apply_transform(squash)
    pw, ph, pd = w * rng.uniform(0.6, 0.78), h * rng.uniform(0.32, 0.42), rng.uniform(0.12, 0.18)
    pocket = _sphere((0, h * 0.12 + ph / 2, d / 2 - pd * 0.35), (pw / 2, ph / 2, pd / 2))
    parts = [Part("main_bag", bag), Part("front_pocket", pocket)]
    top, bottom = h * rng.uniform(0.8, 0.88), h * rng.uniform(0.08, 0.16)
    bulge = rng.uniform(0.08, 0.14)
    strap_w, strap_x = rng.uniform(0.045, 0.065), w * rng.uniform(0.2, 0.28)
    for name, xs in (("left", 1), ("right", -1)):
        path = _arc_yz((top + bottom) / 2, -d * 0.35, (top - bottom) / 2, d * 0.15 + bulge, 0.0, -np.pi, x=xs * strap_x)
        parts.append(Part(f"shoulder_strap_{name}", _tube(path, strap_w, 0.018)))
    # carry loop on top, in the XY plane (so its flat side faces ±Z)
    loop_r = w * 0.18
    t = np.linspace(0.0, np.pi, 20)
    loop = np.stack([loop_r * np.cos(t), h - 0.02 + loop_r * 0.8 * np.sin(t), np.full(20, -d * 0.1)], axis=1)
    parts.append(Part("top_handle", _tube(loop, 0.03, 0.015, side=_Z)))
    return parts


def _robot(rng: np.random.Generator) -> list[Part]:
    lh, tw, th, td = rng.uniform(0.42, 0.6), rng.uniform(0.55, 0.7), rng.uniform(0.6, 0.75), rng.uniform(0.35, 0.45)
    ty = lh + th / 2
    hw, hh, hd = rng.uniform(0.34, 0.45), rng.uniform(0.28, 0.36), rng.uniform(0.3, 0.38)
    neck = 0.05
    hy = lh + th + neck + hh / 2
    leg_w = tw * rng.uniform(0.25, 0.32)
    parts = [Part("torso", _box((tw, th, td), (0, ty, 0)))]
    head = _merge(_box((hw, hh, hd), (0, hy, 0)), _rod((0, lh + th - 0.01, 0), (0, lh + th + neck + 0.01, 0), hw * 0.2))
    parts.append(Part("head", head))
    eye_r = rng.uniform(0.035, 0.055)
    for name, xs in (("left", 1), ("right", -1)):
        parts.append(Part(f"eye_{name}", _sphere((xs * hw * 0.25, hy + hh * 0.1, hd / 2), eye_r), "light"))
    ax = rng.uniform(-0.3, 0.3) * hw
    top = hy + hh / 2
    antenna = _merge(_rod((ax, top - 0.01, 0), (ax, top + 0.15, 0), 0.012, 12), _sphere((ax, top + 0.17, 0), 0.035, 1))
    parts.append(Part("antenna", antenna))
    arm_r, swing = rng.uniform(0.05, 0.07), rng.uniform(-0.12, 0.12)
    for name, xs in (("left", 1), ("right", -1)):
        x = xs * (tw / 2 + arm_r + 0.01)
        parts.append(Part(f"arm_{name}", _capsule((x, lh + th * 0.85, 0), (x * 1.1, lh + th * 0.2, xs * swing), arm_r)))
    for name, xs in (("left", 1), ("right", -1)):
        parts.append(Part(f"leg_{name}", _box((leg_w, lh + 0.02, td * 0.6), (xs * tw * 0.25, lh / 2, 0))))
    parts.append(Part("chest_panel", _box((tw * 0.5, th * 0.35, 0.03), (0, ty + th * 0.1, td / 2 + 0.01))))
    jw, jh, jd = tw * rng.uniform(0.6, 0.8), th * rng.uniform(0.6, 0.8), rng.uniform(0.15, 0.22)
    jz = -td / 2 - jd / 2 + 0.01
    parts.append(Part("jetpack", _box((jw, jh, jd), (0, ty + th * 0.05, jz))))
    bottom = ty + th * 0.05 - jh / 2
    nozzles = [
        _rod((xs * jw * 0.28, bottom + 0.01, jz), (xs * jw * 0.28, bottom - 0.1, jz), jd * 0.3) for xs in (1, -1)
    ]
    parts.append(Part("thrusters", _merge(*nozzles), "dark"))
    return parts


def _lamp(rng: np.random.Generator) -> list[Part]:
    br, bh = rng.uniform(0.25, 0.35), rng.uniform(0.05, 0.08)
    rb, sh = rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
    rt, t = rb * rng.uniform(0.5, 0.75), 0.015
    shade_y = rng.uniform(0.75, 1.1)
    pole_top = shade_y + sh * 0.45
    shade = _revolve_y([(rb, 0), (rt, sh), (rt - t, sh), (rb - t, 0), (rb, 0)], center=(0, shade_y, 0))
    parts = [
        Part("base", _rod((0, 0, 0), (0, bh, 0), br)),
        Part("pole", _rod((0, bh - 0.01, 0), (0, pole_top, 0), rng.uniform(0.018, 0.03), 16)),
        Part("shade", shade),
        Part("bulb", _sphere((0, pole_top - 0.07, 0), (0.07, 0.09, 0.07)), "light"),
    ]
    parts.append(Part("power_switch", _box((0.1, 0.05, 0.07), (0, bh + 0.02, -br * 0.65))))
    length = rng.uniform(0.15, 0.3)
    z = np.linspace(-br * 0.9, -br - length, 16)
    cable = np.stack([np.zeros(16), 0.018 + 0.01 * np.sin(np.linspace(0, np.pi, 16)), z], axis=1)
    parts.append(Part("cable", _tube(cable, 0.015, 0.015), "dark"))
    return parts


def _alarm_clock(rng: np.random.Generator) -> list[Part]:
    r, depth, lift = rng.uniform(0.35, 0.45), rng.uniform(0.22, 0.3), 0.07
    yc = r + lift
    front = depth / 2
    parts = [Part("body", _rod((0, yc, -front), (0, yc, front), r, 48))]
    parts.append(Part("face", _disc_z(r * 0.86, 0.012, (0, yc, front + 0.004)), "light"))
    for name, length, width in (("hour_hand", r * 0.45, 0.035), ("minute_hand", r * 0.7, 0.022)):
        angle = rng.uniform(0, 2 * np.pi)
        hand = _box((width, length, 0.008), (0, length / 2 - 0.02, 0))
        hand.apply_transform(translation_matrix((0, yc, front + 0.014)) @ rotation_matrix(angle, _Z))
        parts.append(Part(name, hand, "dark"))
    bell_r, bell_angle = r * rng.uniform(0.28, 0.36), np.radians(rng.uniform(32, 45))
    for name, xs in (("left", 1), ("right", -1)):
        center = (xs * r * np.sin(bell_angle), yc + r * np.cos(bell_angle), 0)
        parts.append(Part(f"bell_{name}", _sphere(center, bell_r)))
    foot_x = r * 0.55
    foot_top = yc - r * np.sqrt(1 - 0.55**2) + 0.03
    feet = _merge(*[_rod((xs * foot_x, 0, front * 0.3), (xs * foot_x, foot_top, 0), 0.03, 16) for xs in (1, -1)])
    parts.append(Part("feet", feet))
    parts.append(Part("battery_cover", _box((r * 0.9, r * 0.6, 0.02), (0, yc, -front - 0.008))))
    reach = rng.uniform(0.15, 0.25)
    parts.append(Part("stand_leg", _rod((0, yc - r * 0.15, -front + 0.02), (0, 0.025, -front - reach), 0.03, 16)))
    return parts


def _monitor(rng: np.random.Generator) -> list[Part]:
    sw = rng.uniform(1.0, 1.3)
    sh, bezel, hd = sw * rng.uniform(0.56, 0.65), rng.uniform(0.03, 0.06), 0.05
    stand_h = rng.uniform(0.2, 0.35)
    yc = stand_h + bezel + sh / 2
    parts = [
        Part("housing", _box((sw + 2 * bezel, sh + 2 * bezel, hd), (0, yc, 0))),
        Part("screen", _box((sw, sh, 0.01), (0, yc, hd / 2 + 0.003)), "dark"),
        Part("power_led", _sphere((-sw * 0.42, stand_h + bezel / 2, hd / 2), 0.012, 1), "light"),
    ]
    bpd = rng.uniform(0.08, 0.14)
    bz = -hd / 2 - bpd / 2 + 0.005
    back = -hd / 2 - bpd
    parts.append(Part("back_panel", _box((sw * 0.6, sh * 0.6, bpd), (0, yc, bz))))
    n_vents = int(rng.integers(4, 7))
    slats = [_box((sw * 0.35, 0.015, 0.02), (0, yc + sh * 0.22 - k * 0.035, back)) for k in range(n_vents)]
    parts.append(Part("vents", _merge(*slats), "dark"))
    parts.append(Part("ports", _box((sw * 0.25, 0.05, 0.04), (0, yc - sh * 0.2, back)), "dark"))
    parts.append(Part("stand_neck", _box((0.08, yc - 0.02, 0.05), (0, (yc - 0.02) / 2 + 0.02, bz))))
    parts.append(Part("stand_base", _box((sw * 0.45, 0.03, rng.uniform(0.25, 0.35)), (0, 0.015, bz + 0.03))))
    return parts


def _teapot(rng: np.random.Generator) -> list[Part]:
    rb, h = rng.uniform(0.4, 0.5), rng.uniform(0.55, 0.75)
    phi = np.linspace(-1.2, 1.1, 18)
    ys = h / 2 * (1 + np.sin(phi) / np.sin(1.2))
    ys -= ys[0]
    profile = [(0.0, 0.0), *zip(rb * np.cos(phi), ys), (0.0, ys[-1])]
    body = _revolve_y(profile)
    top, neck = ys[-1], rb * np.cos(1.1)
    lid_h = rng.uniform(0.06, 0.12)
    rim = neck * 1.08
    lid_profile = [(0, top + lid_h), (neck * 0.6, top + lid_h * 0.8), (rim, top), (rim, top - 0.015), (0, top - 0.015)]
    lid = _revolve_y(lid_profile)
    knob = _sphere((0, top + lid_h + 0.035, 0), (0.05, 0.04, 0.05))
    # spout: quadratic Bezier from the lower belly forward (+Z) and up, tapering
    p0, p1 = np.array([0, h * 0.3, rb * 0.75]), np.array([0, h * 0.3, rb + rng.uniform(0.2, 0.32)])
    p2 = np.array([0, h * rng.uniform(0.75, 0.95), rb + rng.uniform(0.3, 0.42)])
    s = np.linspace(0, 1, 20)[:, None]
    spout_path = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s**2 * p2
    radius = np.linspace(0.08, 0.04, 20)
    spout = _tube(spout_path, radius, radius, sections=16)
    ry, rz = h * 0.3, rng.uniform(0.22, 0.3)
    handle = _tube(_arc_yz(h * 0.5, -rb * 0.85, ry, rz, 0.0, -np.pi), 0.04, 0.035)
    return [Part("body", body), Part("lid", lid), Part("knob", knob), Part("spout", spout), Part("handle", handle)]


def _car(rng: np.random.Generator) -> list[Part]:
    length, w, bh = rng.uniform(1.6, 2.0), rng.uniform(0.75, 0.9), rng.uniform(0.26, 0.34)
    wr = rng.uniform(0.17, 0.22)
    by = wr * 0.6 + bh / 2
    body_top = by + bh / 2
    ch, cl, cz = rng.uniform(0.24, 0.32), length * rng.uniform(0.42, 0.55), -length * rng.uniform(0.02, 0.1)
    cy = body_top + ch / 2
    parts = [
        Part("body", _box((w, bh, length), (0, by, 0))),
        Part("cabin", _box((w * 0.84, ch, cl), (0, cy, cz))),
        Part("windshield", _box((w * 0.76, ch * 0.8, 0.02), (0, cy, cz + cl / 2 + 0.005)), "dark"),
        Part("rear_window", _box((w * 0.7, ch * 0.7, 0.02), (0, cy, cz - cl / 2 - 0.005)), "dark"),
    ]
    axle = length * rng.uniform(0.3, 0.35)
    for zname, zs in (("front", 1), ("rear", -1)):
        for xname, xs in (("left", 1), ("right", -1)):
            x = xs * (w / 2 - 0.03)
            wheel = _rod((x - 0.06, wr, zs * axle), (x + 0.06, wr, zs * axle), wr)
            parts.append(Part(f"wheel_{zname}_{xname}", wheel, "dark"))
    ly = by + bh * 0.2
    lamps = [_box((w * 0.2, bh * 0.25, 0.02), (xs * w * 0.32, ly, length / 2 + 0.005)) for xs in (1, -1)]
    parts.append(Part("headlights", _merge(*lamps), "light"))
    tails = [_box((w * 0.18, bh * 0.2, 0.02), (xs * w * 0.34, ly, -length / 2 - 0.005)) for xs in (1, -1)]
    parts.append(Part("taillights", _merge(*tails)))
    wing_y = body_top + rng.uniform(0.08, 0.14)
    post_size, post_y = (0.03, wing_y - body_top, 0.04), (wing_y + body_top) / 2
    posts = [_box(post_size, (xs * w * 0.3, post_y, -length / 2 + 0.08)) for xs in (1, -1)]
    wing = _box((w * 0.9, 0.025, 0.14), (0, wing_y, -length / 2 + 0.08))
    parts.append(Part("spoiler", _merge(wing, *posts)))
    return parts


def _camera(rng: np.random.Generator) -> list[Part]:
    bw, bh, bd = rng.uniform(1.0, 1.2), rng.uniform(0.6, 0.75), rng.uniform(0.32, 0.42)
    lr, ll = bh * rng.uniform(0.3, 0.38), rng.uniform(0.2, 0.4)
    lx, ly = bw * rng.uniform(-0.05, 0.08), bh * 0.48
    front, back = bd / 2, -bd / 2
    parts = [
        Part("body", _box((bw, bh, bd), (0, bh / 2, 0))),
        Part("lens", _rod((lx, ly, front - 0.01), (lx, ly, front + ll), lr, 48)),
        Part("lens_glass", _disc_z(lr * 0.78, 0.02, (lx, ly, front + ll + 0.005)), "dark"),
        Part("grip", _box((bw * 0.18, bh * 0.85, 0.12), (-bw / 2 + bw * 0.1, bh * 0.45, front + 0.05))),
        Part("shutter_button", _rod((-bw * 0.36, bh - 0.01, bd * 0.2), (-bw * 0.36, bh + 0.04, bd * 0.2), 0.04)),
        Part("mode_dial", _rod((bw * 0.3, bh - 0.01, 0), (bw * 0.3, bh + 0.06, 0), rng.uniform(0.07, 0.1), 24)),
        Part("viewfinder", _box((0.26, 0.16, bd * 0.6 + 0.06), (lx, bh + 0.07, -bd * 0.2 - 0.03))),
        Part("lcd_screen", _box((bw * 0.55, bh * 0.6, 0.02), (bw * 0.1, bh * 0.45, back - 0.008)), "dark"),
    ]
    return parts


_BUILDERS: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "mug": _mug,
    "chair": _chair,
    "backpack": _backpack,
    "robot": _robot,
    "lamp": _lamp,
    "alarm_clock": _alarm_clock,
    "monitor": _monitor,
    "teapot": _teapot,
    "car": _car,
    "camera": _camera,
}
CATEGORIES: tuple[str, ...] = tuple(_BUILDERS)


# --------------------------------------------------------------------------- colours and assembly


def _rng(seed: int, category: str, index: int) -> np.random.Generator:
    """Generator from a stable hash of (seed, category, index): independent of process, of
    PYTHONHASHSEED and of how many other assets are generated, and valid for negative seeds."""
    digest = hashlib.sha256(f"procedural/{seed}/{category}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


_TONES = {  # (saturation range, value range)
    "any": ((0.35, 0.8), (0.45, 0.92)),
    "dark": ((0.1, 0.45), (0.16, 0.3)),  # stays above the loader's near-black cut-off (0.05)
    "light": ((0.05, 0.3), (0.88, 0.98)),
}


def _palette(rng: np.random.Generator, tones: list[str]) -> list[tuple[int, int, int, int]]:
    """One RGBA colour per part, all distinct after quantization to 8 bits.

    Hues step by the golden ratio from a random start, which spreads any number of parts evenly
    around the colour wheel; saturation and value follow each part's tone.
    """
    hue0 = rng.uniform()
    out: list[tuple[int, int, int, int]] = []
    for k, tone in enumerate(tones):
        (s0, s1), (v0, v1) = _TONES[tone]
        hue = (hue0 + k * 0.6180339887) % 1.0
        s, v = rng.uniform(s0, s1), rng.uniform(v0, v1)
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, s, v))
        while (*rgb, 255) in out:  # astronomically rare; nudge deterministically
            rgb = (rgb[0], rgb[1], (rgb[2] + 7) % 256)
        out.append((rgb[0], rgb[1], rgb[2], 255))
    return out


def generate_asset(category: str, index: int, seed: int) -> trimesh.Scene:
    """The ``index``-th object of ``category`` for ``seed``: a scene with one node per part.

    Node, geometry and material names are the part names; vertices are baked in object space
    (identity node transforms) so part centroids can be read directly from the meshes.
    """
    if category not in _BUILDERS:
        raise ValueError(f"unknown procedural category '{category}' (known: {', '.join(CATEGORIES)})")
    rng = _rng(seed, category, index)
    parts = _BUILDERS[category](rng)
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise AssertionError(f"{category}: duplicate part names {names}")
    bounds = np.array([p.mesh.bounds for p in parts])
    lo, hi = bounds[:, 0].min(axis=0), bounds[:, 1].max(axis=0)
    # uniform scale to a longest side of 1; floor at y = 0; no x/z shift, so each builder's origin
    # (the main body's axis) stays at x = z = 0 and side features keep their sign of z
    scale = 1.0 / float((hi - lo).max())
    normalize = np.diag([scale, scale, scale, 1.0])
    normalize[1, 3] = -lo[1] * scale
    colors = _palette(rng, [p.tone for p in parts])
    scene = trimesh.Scene()
    for part, color in zip(parts, colors):
        mesh = part.mesh.copy()
        mesh.apply_transform(normalize)
        # split vertices along creases sharper than 30 deg: renderers that smooth-shade by vertex
        # normals (pyrender) then show crisp box edges yet round cylinders and spheres
        mesh.merge_vertices()
        mesh = trimesh.graph.smooth_shade(mesh, angle=np.radians(30))
        material = trimesh.visual.material.PBRMaterial(
            name=part.name,
            baseColorFactor=color,
            metallicFactor=round(float(rng.uniform(0.0, 0.25)), 3),
            roughnessFactor=round(float(rng.uniform(0.45, 0.9)), 3),
        )
        mesh.visual = trimesh.visual.TextureVisuals(material=material)
        scene.add_geometry(mesh, node_name=part.name, geom_name=part.name)
    return scene


def list_assets(num_assets: int, seed: int) -> list[tuple[str, str, int]]:
    """(name, category, index) for the first ``num_assets`` objects, round-robin over categories.

    Round-robin keeps every category represented even for small counts, and object i does not
    depend on ``num_assets`` — growing the set only adds files. ``seed`` does not change the
    list, only the objects' shapes and colours; it is accepted so callers need not know that.
    """
    del seed
    n = len(CATEGORIES)
    out = []
    for i in range(num_assets):
        category, index = CATEGORIES[i % n], i // n
        out.append((f"{category}_{index:03d}", category, index))
    return out


def asset_parts(category: str, index: int, seed: int) -> list[str]:
    """Part names of one object, in node order (cheap relative to exporting it)."""
    return [p.name for p in _BUILDERS[category](_rng(seed, category, index))]


# --------------------------------------------------------------------------- source


class ProceduralSource:
    """Generates the objects into ``cache_dir`` on discovery; fetching is a lookup.

    Files go to ``cache_dir/v<GENERATOR_VERSION>-seed<seed>/<name>.glb``, so another seed or a
    newer generator never reuses stale files, and existing files are never rewritten (their
    mtime and content hash stay put across runs).
    """

    name = "procedural"

    def __init__(self, cfg: ProceduralSourceConfig, cache_dir: Path) -> None:
        self.cfg = cfg
        self.root = Path(cache_dir).expanduser() / f"v{GENERATOR_VERSION}-seed{cfg.seed}"

    def path_of(self, name: str) -> Path:
        return self.root / f"{name}.glb"

    def discover(self) -> tuple[list[AssetRecord], list[FilteredRecord]]:
        self.root.mkdir(parents=True, exist_ok=True)
        records = []
        for name, category, index in list_assets(self.cfg.num_assets, self.cfg.seed):
            path = self.path_of(name)
            if path.is_file():
                parts = asset_parts(category, index, self.cfg.seed)
            else:
                scene = generate_asset(category, index, self.cfg.seed)
                parts = list(scene.geometry)
                atomic_write(path, scene.export(file_type="glb"))
            meta = {"name": name, "category": category, "parts": parts}
            records.append(AssetRecord(f"procedural:{name}", self.name, str(path.resolve()), LICENSE, meta))
        return records, []

    def fetch(self, record: AssetRecord) -> Path:
        path = Path(record.uri)
        if not path.is_file():
            raise FetchError(f"{path}: procedural asset missing (run discovery again to regenerate it)")
        return path
