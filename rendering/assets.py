"""Safe loading and normalization of untrusted 3D assets.

Assets come from the internet, so before trimesh parses anything:

* every file an asset refers to (glTF buffers/images, OBJ ``mtllib`` and ``map_*`` textures) must
  resolve inside the asset's own folder — no absolute paths, no ``..``, no symlinks out;
* every image (sidecar or embedded in a GLB) has its header read and its pixel count bounded
  before it is decoded (no decompression bombs);
* OBJ text is checked for malformed faces, out-of-range indices and non-finite numbers, which
  trimesh otherwise drops or turns into zeros silently;
* the glTF document's types are checked where the loader indexes it, and face counts are read
  from headers/accessors (or counted in OBJ text) so an oversized asset is filtered unparsed.

Every problem is an :class:`AssetError` (or :class:`AssetFiltered`) whose message names the file,
the position (line, array index) and the kind of problem — never quoted file content, since a
reason ends up in the manifest and in MLflow.

After loading, the scene is validated (non-empty, triangles, finite vertices) and a
normalization is computed that centres its bounding box at the origin and scales its longest
side to 1: the asset then lies in the unit cube [-0.5, 0.5]^3.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import struct
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

from know3d.core.errors import describe_exception
from know3d.rendering.config import LoadConfig

MESH_EXTENSIONS = ("glb", "gltf", "obj", "ply", "stl", "off")
_IMAGE_TEXTURE_KEYS = (
    "baseColorTexture",
    "metallicRoughnessTexture",
    "normalTexture",
    "emissiveTexture",
    "occlusionTexture",
)


class AssetError(Exception):
    """The asset cannot be used; the message is the reason shown in the manifest."""


class AssetFiltered(Exception):
    """The asset is valid but excluded by a configured filter (``filter`` names it)."""

    def __init__(self, filter_name: str, detail: str) -> None:
        super().__init__(detail)
        self.filter = filter_name


# --------------------------------------------------------------------------- identity


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def asset_sha256(main: Path, sidecars: list[Path]) -> str:
    """Content identity: the main file plus every file it refers to, in a stable order."""
    if not sidecars:
        return file_sha256(main)
    digest = hashlib.sha256()
    for path in [main, *sorted(sidecars)]:
        digest.update(os.fsencode(path.name) + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


# --------------------------------------------------------------------------- reasons

# --------------------------------------------------------------------------- references


_EMBEDDED = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def is_embedded(uri: str) -> bool:
    """A base64 data URI (decoded by the parser); any other ``data:`` text would be read as a
    file name, so it is treated as a reference and checked like one."""
    return bool(_EMBEDDED.match(uri))


def resolve_inside(root: Path, uri: object, owner: Path, what: str) -> Path:
    """Resolve a reference found in ``owner`` against ``root``; refuse anything outside it.

    ``what`` says where the reference sits (``buffers[0].uri``, ``line 3 (mtllib)``): reasons name
    that position, never the reference's text, which is the asset's content."""
    if not isinstance(uri, str) or not uri:
        raise AssetError(f"{owner.name}: {what} is not a non-empty string")
    name = unquote(uri).replace("\\", "/")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):  # not spaces such as U+3000
        raise AssetError(f"{owner.name}: {what} contains control characters (refused)")
    if name.startswith("/") or re.match(r"^[a-zA-Z]+:", name) or "://" in name:
        raise AssetError(f"{owner.name}: {what} is an absolute path or URL (refused)")
    try:
        candidate = (root / name).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # symlink loops, overlong names
        raise AssetError(f"{owner.name}: {what} cannot be resolved ({type(exc).__name__})") from None
    if not candidate.is_relative_to(root.resolve()):
        raise AssetError(f"{owner.name}: {what} points outside the asset's folder (refused)")
    return candidate


def _check_image_header(data: bytes | Path, what: str, cfg: LoadConfig) -> None:
    """Read only the header and bound the pixel count by ``cfg.max_image_pixels`` (PIL's own
    guard, which fires at twice its default, would refuse images a larger configured bound allows)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # nothing is decoded here; the bound is checked below
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            width, height = img.size
    except Exception as exc:  # noqa: BLE001 - any decoder error is the asset's fault
        raise AssetError(f"{what}: unreadable image ({describe_exception(exc)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if width * height > cfg.max_image_pixels:
        raise AssetError(
            f"{what}: image is {width}x{height}, above the decoding bound of {cfg.max_image_pixels} pixels"
        )


def _parse_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except RecursionError:
        raise AssetError(f"{what} is nested too deeply to parse") from None
    except ValueError as exc:  # includes UnicodeDecodeError
        raise AssetError(f"{what} is not valid JSON ({describe_exception(exc)})") from None
    if not isinstance(doc, dict):
        raise AssetError(f"{what} is {_json_kind(doc)}, expected an object")
    return doc


def _read_glb(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    if data[:4] != b"glTF":
        raise AssetError(f"{path.name}: not a GLB file (bad magic)")
    if len(data) < 20:
        raise AssetError(f"{path.name}: truncated GLB ({len(data)} bytes)")
    _, version, length = struct.unpack_from("<4sII", data, 0)
    if version != 2:
        raise AssetError(f"{path.name}: GLB version {version} is not supported (needs 2)")
    if length != len(data):
        raise AssetError(f"{path.name}: truncated GLB (header says {length} bytes, file has {len(data)})")
    # the parser reads chunk 0 as the document and chunk 1 as the binary buffer: check exactly those
    offset, chunks = 12, []
    while offset + 8 <= len(data):
        chunk_len, chunk_type = struct.unpack_from("<II", data, offset)
        body = data[offset + 8 : offset + 8 + chunk_len]
        if len(body) != chunk_len:
            raise AssetError(f"{path.name}: truncated GLB chunk")
        chunks.append((chunk_type, body))
        offset += 8 + chunk_len
    if not chunks or chunks[0][0] != 0x4E4F534A:  # JSON
        raise AssetError(f"{path.name}: GLB does not start with a JSON chunk")
    if any(kind == 0x4E4F534A for kind, _ in chunks[1:]):
        raise AssetError(f"{path.name}: GLB has more than one JSON chunk")
    doc = _parse_json(chunks[0][1], f"{path.name}: GLB JSON chunk")
    binary = chunks[1][1] if len(chunks) > 1 and chunks[1][0] == 0x004E4942 else b""  # BIN
    return doc, binary


# --------------------------------------------------------------------------- glTF structure
# trimesh indexes the glTF document without checking types, so a wrong type anywhere
# ("buffers": 5, an image uri that is a list) surfaces as an arbitrary exception deep in the
# parser. The parts the loader walks are checked here first, with reasons that name the spot.

_GLTF_ARRAYS = (
    "accessors",
    "bufferViews",
    "buffers",
    "images",
    "materials",
    "meshes",
    "nodes",
    "samplers",
    "scenes",
    "textures",
)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_gltf_structure(path: Path, doc: dict) -> None:
    """Types of every array the loader indexes, and of the fields it reads from them."""
    for key in _GLTF_ARRAYS:
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise AssetError(f"{path.name}: glTF '{key}' is {_json_kind(value)}, expected an array")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise AssetError(f"{path.name}: glTF {key}[{i}] is {_json_kind(item)}, expected an object")
    accessors = doc.get("accessors") or []
    views = doc.get("bufferViews") or []
    for i, accessor in enumerate(accessors):
        if not _is_index(accessor.get("count")):
            raise AssetError(f"{path.name}: glTF accessors[{i}].count is not a non-negative integer")
        view = accessor.get("bufferView")
        if view is not None and not (_is_index(view) and view < len(views)):
            raise AssetError(f"{path.name}: glTF accessors[{i}].bufferView does not name a buffer view")
    for m, mesh in enumerate(doc.get("meshes") or []):
        primitives = mesh.get("primitives")
        if not isinstance(primitives, list):
            raise AssetError(f"{path.name}: glTF meshes[{m}].primitives is {_json_kind(primitives)}, expected an array")
        for p, prim in enumerate(primitives):
            where = f"meshes[{m}].primitives[{p}]"
            if not isinstance(prim, dict) or not isinstance(prim.get("attributes"), dict):
                raise AssetError(f"{path.name}: glTF {where} has no attributes object")
            if not _is_index(prim.get("mode", 4)):
                raise AssetError(f"{path.name}: glTF {where}.mode is not a non-negative integer")
            for field_name, refs in (("indices", [prim.get("indices")]), ("attributes", prim["attributes"].values())):
                if any(ref is not None and not (_is_index(ref) and ref < len(accessors)) for ref in refs):
                    raise AssetError(f"{path.name}: glTF {where}.{field_name} does not name an accessor")
    for kind in ("buffers", "images"):
        for i, item in enumerate(doc.get(kind) or []):
            if "uri" in item and not isinstance(item["uri"], str):
                raise AssetError(f"{path.name}: glTF {kind}[{i}].uri is {_json_kind(item['uri'])}, expected a string")


def _gltf_face_count(doc: dict) -> int:
    """Triangles the document declares (per mesh, not per instance — as the loader counts)."""
    accessors = doc.get("accessors") or []
    total = 0
    for mesh in doc.get("meshes") or []:
        for prim in mesh["primitives"]:
            mode = prim.get("mode", 4)
            if mode not in (4, 5, 6):  # points and lines have no faces
                continue
            ref = prim.get("indices", prim["attributes"].get("POSITION"))
            count = accessors[ref]["count"] if ref is not None else 0
            total += count // 3 if mode == 4 else max(count - 2, 0)
    return total


def _check_gltf_buffers(path: Path, doc: dict, binary: bytes) -> None:
    """Buffers hold what they declare and buffer views stay inside them (a truncated .bin or
    BIN chunk otherwise fails deep in the parser, or not at all)."""
    sizes: list[int] = []
    for i, buffer in enumerate(doc.get("buffers") or []):
        declared = buffer.get("byteLength")
        if not _is_index(declared):
            raise AssetError(f"{path.name}: glTF buffers[{i}].byteLength is not a non-negative integer")
        uri = buffer.get("uri")
        if uri is None:
            actual = len(binary)
        elif is_embedded(uri):
            actual = declared  # decoded by the parser, which checks it
        else:
            actual = resolve_inside(path.parent, uri, path, f"buffers[{i}].uri").stat().st_size
        if actual < declared:
            raise AssetError(f"{path.name}: glTF buffers[{i}] is truncated ({actual} of {declared} bytes)")
        sizes.append(declared)
    for i, view in enumerate(doc.get("bufferViews") or []):
        buffer, offset, length = view.get("buffer"), view.get("byteOffset", 0), view.get("byteLength")
        if not (_is_index(buffer) and buffer < len(sizes)) or not _is_index(offset) or not _is_index(length):
            raise AssetError(f"{path.name}: glTF bufferViews[{i}] has an invalid buffer, byteOffset or byteLength")
        if offset + length > sizes[buffer]:
            raise AssetError(f"{path.name}: glTF bufferViews[{i}] reaches past the end of buffers[{buffer}]")


def _gltf_references(path: Path, doc: dict, binary: bytes, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    root, files = path.parent, []
    for kind in ("buffers", "images"):
        for i, item in enumerate(doc.get(kind) or []):
            uri = item.get("uri")
            if uri is None or is_embedded(uri):
                continue
            where = f"{kind}[{i}].uri"
            ref = resolve_inside(root, uri, path, where)  # refused outside the folder, even unused
            if kind == "images" and geometry_only:
                continue
            if not ref.is_file():
                raise AssetError(f"{path.name}: {where} names a file that does not exist")
            files.append(ref)
    _check_gltf_buffers(path, doc, binary)
    if geometry_only:
        return files
    views = doc.get("bufferViews") or []
    for i, image in enumerate(doc.get("images") or []):
        if image.get("uri") and not is_embedded(image["uri"]):
            ref = resolve_inside(root, image["uri"], path, f"images[{i}].uri")
            _check_image_header(ref, f"{path.name} image {i} ({ref.name})", cfg)
        elif "bufferView" in image and binary:
            try:
                view = views[image["bufferView"]]
                start = int(view.get("byteOffset", 0))
                blob = binary[start : start + int(view["byteLength"])]
            except (IndexError, KeyError, TypeError, ValueError):
                raise AssetError(f"{path.name}: image {i} points to an invalid bufferView") from None
            _check_image_header(blob, f"{path.name} image {i}", cfg)
    return files


# --------------------------------------------------------------------------- OBJ and header counts

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _faces_filtered(path: Path, num_faces: int, cfg: LoadConfig, how: str) -> AssetFiltered:
    return AssetFiltered("max_faces", f"{path.name}: {num_faces} faces ({how}) > {cfg.max_faces}")


def _names(line: str, keyword: str) -> list[str]:
    """File names a reader may take from ``keyword rest``: the whole rest of the line (trimesh,
    names with spaces) and each token (several names, options before the name)."""
    rest = line.strip()[len(keyword) :].strip()
    return list(dict.fromkeys([rest, *rest.split()])) if rest else []


def _check_obj(path: Path, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    """Validate OBJ text and count its triangles; return the referenced .mtl files and textures.

    Reasons give line numbers and kinds only — never the text of the line."""
    counts = {"v": 0, "vt": 0, "vn": 0}
    mtl_refs: list[tuple[int, str]] = []
    num_triangles = 0
    with open(path, errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not mtl_refs and "mtllib" in line:
                # trimesh loads the rest of the line after the first "mtllib" anywhere in the text
                mtl_refs.append((lineno, line[line.find("mtllib") + 6 :].strip()))
            if not line or line[0] not in "vfm":
                continue
            parts = line.split()
            if not parts:
                continue
            tag = parts[0]
            if tag in counts:
                counts[tag] += 1
                for position, token in enumerate(parts[1:], 1):
                    if not _FLOAT.match(token):
                        raise AssetError(
                            f"{path.name}: line {lineno}: non-finite or invalid number in '{tag}' field {position}"
                        )
            elif tag == "f":
                refs = parts[1:]
                if len(refs) < 3:
                    raise AssetError(f"{path.name}: line {lineno}: face has {len(refs)} vertices (needs >= 3)")
                num_triangles += len(refs) - 2
                if num_triangles > cfg.max_faces:
                    raise _faces_filtered(path, num_triangles, cfg, f"counted up to line {lineno}")
                for corner, ref in enumerate(refs, 1):
                    for kind, token in zip(("v", "vt", "vn"), ref.split("/")):
                        if not token:
                            continue
                        try:
                            index = int(token)
                        except ValueError:
                            raise AssetError(
                                f"{path.name}: line {lineno}: face corner {corner} has a non-integer '{kind}' index"
                            ) from None
                        if index < 0 and not cfg.allow_relative_obj_indices:
                            raise AssetError(
                                f"{path.name}: line {lineno}: negative (relative) face index "
                                "is not accepted (load.allow_relative_obj_indices=false)"
                            )
                        if index == 0 or index > counts[kind] or -index > counts[kind]:
                            raise AssetError(
                                f"{path.name}: line {lineno}: face corner {corner} '{kind}' index out of range "
                                f"({counts[kind]} '{kind}' defined so far)"
                            )
            elif tag == "mtllib":  # one name with spaces, or several names
                mtl_refs.extend((lineno, name) for name in _names(line, "mtllib"))
    files: list[Path] = []
    seen: set[Path] = set()  # an OBJ may name one .mtl (and an .mtl one texture) thousands of times
    for lineno, name in mtl_refs:
        mtl = resolve_inside(path.parent, name, path, f"line {lineno} (mtllib)")
        if geometry_only or mtl in seen or not mtl.is_file():
            continue  # a missing .mtl renders with the default material, like other tools
        seen.add(mtl)
        files.append(mtl)
        with open(mtl, errors="replace") as fh:
            for mtl_line, line in enumerate(fh, 1):
                parts = line.split()
                if not (parts and parts[0].lower().startswith(("map_", "bump", "disp", "norm")) and len(parts) > 1):
                    continue
                for name in _names(line, parts[0]):  # trimesh: the rest of the line; others: the last token
                    texture = resolve_inside(mtl.parent, name, mtl, f"line {mtl_line} ({parts[0].lower()[:12]})")
                    if texture not in seen and texture.is_file():
                        seen.add(texture)
                        _check_image_header(texture, f"{mtl.name}: line {mtl_line}: texture {texture.name}", cfg)
                        files.append(texture)
    return files


_HEADER_BYTES = 1 << 16


def _ply_header(path: Path) -> tuple[dict[str, int], bool, int] | None:
    """(element counts, is_ascii, header length) of a PLY file; None without a usable header
    (the parser then decides)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        return None
    counts: dict[str, int] = {}
    is_ascii = False
    for lineno, line in enumerate(head[:end].split(b"\n"), 1):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == b"format":
            is_ascii = parts[1] == b"ascii"
        if len(parts) >= 3 and parts[0] == b"element":
            try:
                count = int(parts[2])
            except ValueError:
                count = -1
            if count < 0:
                raise AssetError(f"{path.name}: PLY header line {lineno}: element count is not a non-negative integer")
            counts[parts[1].decode("ascii", "replace")] = count
    newline = head.find(b"\n", end)
    return counts, is_ascii, (newline + 1 if newline >= 0 else len(head))


def _check_ascii_ply_rows(path: Path, num_rows: int, start: int) -> None:
    """trimesh reads an ASCII PLY whose data ends early as a smaller mesh, silently."""
    found = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        for line in fh:
            found += bool(line.strip())
            if found >= num_rows:
                return
    raise AssetError(f"{path.name}: PLY data ends early (header declares {num_rows} rows, file has {found})")


def _ply_face_count(path: Path, cfg: LoadConfig) -> int | None:
    header = _ply_header(path)
    if header is None:
        return None
    counts, is_ascii, start = header
    num_faces = counts.get("face", 0)
    if num_faces <= cfg.max_faces and is_ascii:
        _check_ascii_ply_rows(path, sum(counts.values()), start)
    return num_faces


def _off_face_count(path: Path) -> int | None:
    """Faces of an OFF file from its counts line (``nv nf ne``), after the ``[ST][C][N][4]OFF`` tag."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_BYTES)
    tokens: list[bytes] = []
    for line in head.split(b"\n")[:64]:
        tokens.extend(line.split(b"#", 1)[0].split())
        if len(tokens) >= 4:
            break
    if not tokens or not tokens[0].upper().endswith(b"OFF"):
        return None
    try:
        return int(tokens[2])
    except (IndexError, ValueError):
        return None


def _stl_face_count(path: Path, limit: int) -> int | None:
    """Binary STL: the header count (when the file size agrees); ASCII: ``endfacet`` keywords,
    counted in chunks and only up to ``limit + 1``."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(84)
        if len(head) == 84:
            (count,) = struct.unpack_from("<I", head, 80)
            if 84 + 50 * count == size:
                return count
        if not head.lstrip().lower().startswith(b"solid"):
            return None
        fh.seek(0)
        count, tail, needle = 0, b"", b"endfacet"
        while block := fh.read(1 << 20):
            data = (tail + block).lower()
            count += data.count(needle)
            tail = data[-(len(needle) - 1) :]
            if count > limit:
                break
        return count


def _declared_faces(path: Path, ext: str, cfg: LoadConfig) -> int | None:
    if ext == "ply":
        return _ply_face_count(path, cfg)
    if ext == "off":
        return _off_face_count(path)
    if ext == "stl":
        return _stl_face_count(path, cfg.max_faces)
    return None


def inspect_asset(path: Path, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    """Pre-parse checks; returns the sidecar files the asset uses (all inside its folder).

    Face counts are read from headers (PLY, OFF, STL, glTF accessors) or counted (OBJ lines)
    here, so an asset above ``max_faces`` is filtered before anything parses it.
    ``geometry_only``: materials are not going to be loaded, so texture images are neither
    required nor decoded (references outside the folder are still refused)."""
    if not path.is_file():
        raise AssetError(f"{path.name}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise AssetError(f"{path.name}: empty file (0 bytes)")
    if size > cfg.max_file_bytes:
        raise AssetFiltered("max_file_bytes", f"{path.name}: {size} bytes > {cfg.max_file_bytes}")
    ext = path.suffix.lower().lstrip(".")
    if ext in ("glb", "gltf"):
        if ext == "glb":
            doc, binary = _read_glb(path)
        else:
            doc, binary = _parse_json(path.read_bytes(), f"{path.name}: glTF"), b""
        _check_gltf_structure(path, doc)
        num_faces = _gltf_face_count(doc)
        if num_faces > cfg.max_faces:
            raise _faces_filtered(path, num_faces, cfg, "declared by its accessors")
        # an accessor without data is allocated as zeros of its count: bound every one of them
        largest = max((a["count"] for a in doc.get("accessors") or []), default=0)
        if largest > 3 * cfg.max_faces:
            raise AssetFiltered(
                "max_faces",
                f"{path.name}: an accessor declares {largest} elements > 3 x load.max_faces ({3 * cfg.max_faces})",
            )
        return _gltf_references(path, doc, binary, cfg, geometry_only)
    if ext == "obj":
        return _check_obj(path, cfg, geometry_only)
    if ext not in MESH_EXTENSIONS:
        raise AssetError(f"{path.name}: unsupported file type '.{ext}'")
    num_faces = _declared_faces(path, ext, cfg)
    if num_faces is not None and num_faces > cfg.max_faces:
        raise _faces_filtered(path, num_faces, cfg, "declared by its header")
    return []


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedAsset:
    """A validated scene with named parts; ``normalization`` maps it into the unit cube."""

    scene: object  # trimesh.Scene (kept untyped so this module imports without trimesh)
    normalization: np.ndarray  # [4, 4] world -> unit cube
    num_faces: int
    num_parts: int
    part_names: list[str] = field(default_factory=list)

    def normalization_json(self) -> dict:
        scale = float(self.normalization[0, 0])
        return {
            "convention": "bbox centred at origin, longest side scaled to 1 -> unit cube [-0.5, 0.5]^3",
            "scale": scale,
            "translation": self.normalization[:3, 3].tolist(),
            "matrix": self.normalization.tolist(),
        }


def _prepare_textures(geometry: object, max_size: int, owner: str) -> None:
    """Decode every texture now (so decoding errors fail the asset at load time, and load
    time includes decoding) and downsample those above ``max_size``."""
    visual = getattr(geometry, "visual", None)
    material = getattr(visual, "material", None)
    if material is None:
        return
    for key in (*_IMAGE_TEXTURE_KEYS, "image"):
        image = getattr(material, key, None)
        if not isinstance(image, Image.Image):
            continue
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - a broken texture is the asset's fault
            raise AssetError(f"{owner}: texture '{key}' cannot be decoded ({describe_exception(exc)})") from None
        if max(image.size) > max_size:
            image = image.copy()
            image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
            setattr(material, key, image)


def _is_real_texture(image: object) -> bool:
    """trimesh puts a uniform 2x2 placeholder image on OBJ materials without ``map_Kd``."""
    if not isinstance(image, Image.Image):
        return False
    if max(image.size) > 4:
        return True
    extrema = image.convert("RGB").getextrema()
    return any(lo != hi for lo, hi in extrema)


_TRIMESH_DEFAULT_DIFFUSE = (102, 102, 102)


def _fix_untextured(geometry: object) -> None:
    """UVs without a real image (e.g. a missing .mtl) render near-black: use a plain colour.

    The material's own colour is kept when it has one; trimesh's default grey and near-black
    colours become a neutral light grey (0.7).
    """
    import trimesh

    visual = getattr(geometry, "visual", None)
    if not isinstance(visual, trimesh.visual.TextureVisuals):
        return
    material = visual.material
    if any(_is_real_texture(getattr(material, key, None)) for key in (*_IMAGE_TEXTURE_KEYS, "image")):
        return
    color = None
    if isinstance(material, trimesh.visual.material.PBRMaterial) and material.baseColorFactor is not None:
        color = np.asarray(material.baseColorFactor, dtype=np.float64)
        if color.max() > 1.0:
            color = color / 255.0
    elif isinstance(material, trimesh.visual.material.SimpleMaterial):
        diffuse = np.asarray(material.diffuse, dtype=np.float64)
        if tuple(diffuse[:3].astype(int)) != _TRIMESH_DEFAULT_DIFFUSE:
            color = diffuse / 255.0
    if color is None or color[:3].max() < 0.05:
        color = np.array([0.7, 0.7, 0.7, 1.0])
    color = np.append(color[:3], color[3] if len(color) > 3 else 1.0)
    rgba = (np.clip(color, 0, 1) * 255).astype(np.uint8)
    geometry.visual = trimesh.visual.ColorVisuals(geometry, vertex_colors=np.tile(rgba, (len(geometry.vertices), 1)))


def load_asset(path: Path, cfg: LoadConfig, geometry_only: bool = False) -> LoadedAsset:
    """Parse, validate and normalize one asset. Raises AssetError / AssetFiltered only.

    ``geometry_only`` (evaluation): materials and textures are skipped entirely, so a broken or
    huge texture cannot fail a mesh whose geometry is fine."""
    try:
        inspect_asset(path, cfg, geometry_only)
        return _load_checked(path, cfg, geometry_only)
    except (AssetError, AssetFiltered):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file triggers is the asset's fault
        raise AssetError(f"{path.name}: cannot load ({describe_exception(exc)})") from None


@contextmanager
def _bounded_images(max_pixels: int) -> Iterator[None]:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextmanager
def _fixed_random_state() -> Iterator[None]:
    """trimesh names some scene nodes with ``random`` (e.g. the primitives of a multi-primitive
    glTF mesh); a fixed state makes part names — and the shards that record them — the same in
    every run and process."""
    state = random.getstate()
    random.seed(0)
    try:
        yield
    finally:
        random.setstate(state)


def _load_checked(path: Path, cfg: LoadConfig, geometry_only: bool) -> LoadedAsset:
    import trimesh

    with _bounded_images(cfg.max_image_pixels), _fixed_random_state():
        try:
            scene = trimesh.load_scene(
                str(path), resolver=trimesh.resolvers.FilePathResolver(str(path)), skip_materials=geometry_only
            )
        except AssetError:
            raise
        except Exception as exc:  # noqa: BLE001 - parser errors are the asset's fault
            raise AssetError(f"{path.name}: cannot parse ({describe_exception(exc)})") from None

    meshes = {name: g for name, g in scene.geometry.items() if isinstance(g, trimesh.Trimesh)}
    if not scene.geometry:
        raise AssetError(f"{path.name}: no geometry (empty scene)")
    if not meshes or all(len(m.faces) == 0 for m in meshes.values()):
        kinds = sorted({type(g).__name__ for g in scene.geometry.values() if not isinstance(g, trimesh.Trimesh)})
        if any(len(m.vertices) for m in meshes.values()):
            kinds.append("vertices without faces")
        if kinds:  # a valid point cloud or line drawing: not an error, just not a surface to render
            raise AssetFiltered("no_triangles", f"{path.name}: no triangle meshes (only {', '.join(kinds)})")
        raise AssetError(f"{path.name}: no faces")
    num_faces = 0
    for name, mesh in meshes.items():
        if len(mesh.faces) == 0:
            continue
        if not np.isfinite(mesh.vertices).all():
            raise AssetError(f"{path.name}: a mesh has non-finite vertex coordinates")
        if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices):
            raise AssetError(f"{path.name}: a mesh has face indices out of range")
        num_faces += len(mesh.faces)
    if num_faces > cfg.max_faces:
        raise AssetFiltered("max_faces", f"{path.name}: {num_faces} faces > {cfg.max_faces}")
    # drop non-mesh geometry (points, paths) so the renderer sees triangles only
    for name in list(scene.geometry):
        if name not in meshes or len(meshes[name].faces) == 0:
            scene.delete_geometry(name)
    with _bounded_images(cfg.max_image_pixels):
        for mesh in scene.geometry.values() if not geometry_only else ():
            _prepare_textures(mesh, cfg.max_texture_size, path.name)
            _fix_untextured(mesh)

    bounds = scene.bounds
    if bounds is None or not np.isfinite(bounds).all():
        raise AssetError(f"{path.name}: bounding box is not finite")
    extent = float((bounds[1] - bounds[0]).max())
    if not extent > 0 or not math.isfinite(extent):
        raise AssetError(f"{path.name}: degenerate bounding box (all vertices coincide)")
    scale = 1.0 / extent
    normalization = np.eye(4)
    normalization[:3, :3] *= scale
    normalization[:3, 3] = -scale * (bounds[0] + bounds[1]) / 2.0
    part_names = sorted(scene.graph.nodes_geometry)
    return LoadedAsset(scene, normalization, num_faces, len(part_names), part_names)
