"""Crafted inputs for the hardening tests: good assets made in code, and malformed ones made by
mutating them (type changes, truncation, bad indices, bad URIs, deep nesting).

Every mutation is invalid by construction (not "probably invalid"), so a test can demand a
failure row for each one. Each asset lives in its own folder, as it would in a download cache.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh


def _shape(index: int) -> trimesh.Trimesh:
    """A distinct, closed, coloured mesh per index (different content -> different sha256)."""
    kind = index % 3
    if kind == 0:
        mesh = trimesh.creation.box(extents=(1.0, 0.6 + 0.05 * index, 0.8))
    elif kind == 1:
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5 + 0.01 * index)
    else:
        mesh = trimesh.creation.cylinder(radius=0.3, height=0.8 + 0.05 * index, sections=24)
    rgba = np.array([40 + 17 * index % 200, 120, 200 - 11 * index % 150, 255], np.uint8)
    mesh.visual.face_colors = np.tile(rgba, (len(mesh.faces), 1))
    return mesh


GOOD_FORMATS = ("glb", "gltf", "obj", "ply")


def write_good(folder: Path, index: int, fmt: str) -> Path:
    """One good asset ``folder/good_<index>/model.<fmt>``; returns the main file."""
    target = folder / f"good_{index:02d}_{fmt}"
    target.mkdir(parents=True, exist_ok=True)
    mesh = _shape(index)
    if fmt == "gltf":
        for name, data in trimesh.Scene(mesh).export(file_type="gltf").items():
            (target / name).write_bytes(data)
        return target / "model.gltf"
    if fmt == "ply":
        mesh.export(target / "model.ply", encoding="ascii")
        return target / "model.ply"
    path = target / f"model.{fmt}"
    mesh.export(path)
    return path


def good_assets(folder: Path, num: int) -> list[Path]:
    return [write_good(folder, i, GOOD_FORMATS[i % len(GOOD_FORMATS)]) for i in range(num)]


# --------------------------------------------------------------------------- mutations


def _gltf_doc(path: Path) -> dict:
    return json.loads(path.read_text())


def _mutate_gltf(change: Callable[[dict], None]) -> Callable[[Path, random.Random], None]:
    def apply(path: Path, rng: random.Random) -> None:
        doc = _gltf_doc(path)
        change(doc)
        path.write_text(json.dumps(doc))

    return apply


def _set(keys: tuple, value: object) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        target = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def _gltf_truncate_json(path: Path, rng: random.Random) -> None:
    text = path.read_text()
    path.write_text(text[: rng.randrange(1, len(text) - 1)])


def _gltf_truncate_bin(path: Path, rng: random.Random) -> None:
    data_file = next(path.parent.glob("*.bin"))
    data = data_file.read_bytes()
    data_file.write_bytes(data[: rng.randrange(0, len(data) - 1)])


def _gltf_deep(path: Path, rng: random.Random) -> None:
    text = path.read_text()
    depth = 200_000
    path.write_text(text[:-1] + ', "extras": ' + "[" * depth + "]" * depth + "}")


def _obj_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _obj_first(lines: list[str], tag: str) -> int:
    return next(i for i, line in enumerate(lines) if line.split()[:1] == [tag])


def _obj_index_out_of_range(path: Path, rng: random.Random) -> None:
    lines = _obj_lines(path)
    num_v = sum(1 for line in lines if line.startswith("v "))
    i = _obj_first(lines, "f")
    lines[i] = f"f 1 2 {num_v + rng.randrange(1, 50)}"
    path.write_text("\n".join(lines) + "\n")


def _obj_relative_out_of_range(path: Path, rng: random.Random) -> None:
    lines = _obj_lines(path)
    num_v = sum(1 for line in lines if line.startswith("v "))
    lines.append(f"f -1 -2 -{num_v + rng.randrange(1, 50)}")
    path.write_text("\n".join(lines) + "\n")


def _obj_zero_index(path: Path, rng: random.Random) -> None:
    lines = _obj_lines(path)
    lines[_obj_first(lines, "f")] = "f 0 1 2"
    path.write_text("\n".join(lines) + "\n")


def _obj_bad_number(path: Path, rng: random.Random) -> None:
    lines = _obj_lines(path)
    i = _obj_first(lines, "v")
    parts = lines[i].split()
    parts[rng.randrange(1, 4)] = rng.choice(["abc", "nan", "inf", "1.2.3", "0x10"])
    lines[i] = " ".join(parts)
    path.write_text("\n".join(lines) + "\n")


def _obj_truncate_in_face(path: Path, rng: random.Random) -> None:
    lines = _obj_lines(path)
    faces = [i for i, line in enumerate(lines) if line.startswith("f ")]
    i = rng.choice(faces)
    first_corner = lines[i].split()[1]
    path.write_text("\n".join(lines[:i]) + f"\nf {first_corner}")  # cut after the face's first corner


def _obj_mtllib(target: str) -> Callable[[Path, random.Random], None]:
    def apply(path: Path, rng: random.Random) -> None:
        path.write_text(f"mtllib {target}\n" + path.read_text())

    return apply


def _ply_truncate_rows(path: Path, rng: random.Random) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[: -rng.randrange(1, 20)]) + "\n")


def _ply_index_out_of_range(path: Path, rng: random.Random) -> None:
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("3 "))
    lines[i] = f"3 0 1 {100_000 + rng.randrange(100)}"
    path.write_text("\n".join(lines) + "\n")


def _ply_count_type(path: Path, rng: random.Random) -> None:
    lines = path.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("element face"))
    lines[i] = f"element face {rng.choice(['abc', '-5', '1e3', '3.5'])}"
    path.write_text("\n".join(lines) + "\n")


def _ply_binary_truncate(path: Path, rng: random.Random) -> None:
    mesh = trimesh.load(path)
    mesh.export(path, encoding="binary")
    data = path.read_bytes()
    header_end = data.index(b"end_header") + len(b"end_header\n")
    path.write_bytes(data[: rng.randrange(header_end + 1, len(data) - 1)])


@dataclass(frozen=True)
class Mutation:
    name: str
    fmt: str  # the good format it mutates
    apply: Callable[[Path, random.Random], None]


MUTATIONS: list[Mutation] = [
    Mutation("gltf type: buffers is a number", "gltf", _mutate_gltf(_set(("buffers",), 5))),
    Mutation("gltf type: nodes is an object", "gltf", _mutate_gltf(_set(("nodes",), {"a": 1}))),
    Mutation("gltf type: primitives is a number", "gltf", _mutate_gltf(_set(("meshes", 0, "primitives"), 5))),
    Mutation("gltf type: accessor count is a string", "gltf", _mutate_gltf(_set(("accessors", 0, "count"), "x"))),
    Mutation(
        "gltf bad index: POSITION accessor",
        "gltf",
        _mutate_gltf(_set(("meshes", 0, "primitives", 0, "attributes", "POSITION"), 999)),
    ),
    Mutation("gltf uri: a list", "gltf", _mutate_gltf(_set(("buffers", 0, "uri"), ["model.bin"]))),
    Mutation("gltf uri: NUL byte", "gltf", _mutate_gltf(_set(("buffers", 0, "uri"), "gltf_buffer\u0000.bin"))),
    Mutation("gltf uri: traversal", "gltf", _mutate_gltf(_set(("buffers", 0, "uri"), "../../outside.bin"))),
    Mutation("gltf uri: absolute", "gltf", _mutate_gltf(_set(("buffers", 0, "uri"), "/etc/hostname"))),
    Mutation("gltf uri: missing file", "gltf", _mutate_gltf(_set(("buffers", 0, "uri"), "missing.bin"))),
    Mutation("gltf truncated: JSON", "gltf", _gltf_truncate_json),
    Mutation("gltf truncated: buffer", "gltf", _gltf_truncate_bin),
    Mutation("gltf nested 200k deep", "gltf", _gltf_deep),
    Mutation("obj bad index: out of range", "obj", _obj_index_out_of_range),
    Mutation("obj bad index: relative out of range", "obj", _obj_relative_out_of_range),
    Mutation("obj bad index: zero", "obj", _obj_zero_index),
    Mutation("obj type: bad number", "obj", _obj_bad_number),
    Mutation("obj truncated in a face", "obj", _obj_truncate_in_face),
    Mutation("obj uri: mtllib traversal", "obj", _obj_mtllib("../../../etc/passwd")),
    Mutation("obj uri: mtllib absolute", "obj", _obj_mtllib("/etc/passwd")),
    Mutation("ply truncated rows", "ply", _ply_truncate_rows),
    Mutation("ply bad index: out of range", "ply", _ply_index_out_of_range),
    Mutation("ply type: face count", "ply", _ply_count_type),
    Mutation("ply binary truncated", "ply", _ply_binary_truncate),
]


def malformed_assets(folder: Path, num: int, seed: int) -> list[tuple[Path, Mutation]]:
    """``num`` malformed assets: every mutation once (while ``num`` allows), then random ones."""
    rng = random.Random(seed)
    chosen = list(MUTATIONS)[:num] + [rng.choice(MUTATIONS) for _ in range(max(0, num - len(MUTATIONS)))]
    rng.shuffle(chosen)
    out = []
    for i, mutation in enumerate(chosen):
        good = write_good(folder / "bad", 100 + i, mutation.fmt)
        target = good.parent.rename(folder / "bad" / f"bad_{i:03d}_{mutation.fmt}")
        path = target / good.name
        mutation.apply(path, rng)
        out.append((path, mutation))
    return out


class CrashingSource:
    """A local source whose fetch kills the worker process for one file, as a segfaulting C
    extension would: the whole ingest batch dies, and the build must try its records again."""

    name = "local"

    def __init__(self, inner: object, crash_name: str) -> None:
        self.inner, self.crash_name = inner, crash_name

    def discover(self):
        return self.inner.discover()

    def fetch(self, record):
        import os
        import signal

        if Path(record.uri).name == self.crash_name:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.fetch(record)


def one_sided_quad(folder: Path) -> Path:
    """A single quad facing +Z with a single-sided material: blank from behind, a line edge-on."""
    folder.mkdir(parents=True, exist_ok=True)
    quad = trimesh.Trimesh(
        vertices=[[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], faces=[[0, 1, 2], [0, 2, 3]], process=False
    )
    files = trimesh.Scene(quad).export(file_type="gltf")
    doc = json.loads(files["model.gltf"])
    doc["materials"] = [{"pbrMetallicRoughness": {"baseColorFactor": [0.8, 0.2, 0.2, 1.0]}, "doubleSided": False}]
    for prim in doc["meshes"][0]["primitives"]:
        prim["material"] = 0
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "model.gltf").write_text(json.dumps(doc))
    return folder / "model.gltf"


def coincident_boxes(folder: Path) -> Path:
    """Four boxes of different colours in the same place: which one shows is decided by draw
    order alone (equal depths), so any run-to-run change of draw order changes the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    scene = trimesh.Scene()
    for i, color in enumerate([[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [255, 255, 0, 255]]):
        box = trimesh.creation.box(extents=(1, 1, 1))
        box.visual.face_colors = np.tile(color, (len(box.faces), 1))
        scene.add_geometry(box, geom_name=f"box_{i}", node_name=f"box_{i}")
    scene.export(folder / "coincident.glb")
    return folder / "coincident.glb"
