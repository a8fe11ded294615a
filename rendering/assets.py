"""Safe loading and normalization of untrusted 3D assets.

Assets come from the internet, so before trimesh parses anything:

* every file an asset refers to (glTF buffers/images, OBJ ``mtllib`` and ``map_*`` textures) must
  resolve inside the asset's own folder — no absolute paths, no ``..``, no symlinks out;
* every image (sidecar or embedded in a GLB) has its header read and its pixel count bounded
  before it is decoded (no decompression bombs);
* OBJ text is checked for malformed faces, out-of-range indices and non-finite numbers, which
  trimesh otherwise drops or turns into zeros silently.

After loading, the scene is validated (non-empty, triangles, finite vertices) and a
normalization is computed that centres its bounding box at the origin and scales its longest
side to 1: the asset then lies in the unit cube [-0.5, 0.5]^3.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from PIL import Image

from pipeline.config import LoadConfig

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
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


# --------------------------------------------------------------------------- references


def resolve_inside(root: Path, uri: str, owner: Path) -> Path:
    """Resolve ``uri`` (relative, URL-quoted) against ``root``; refuse anything outside it."""
    name = unquote(uri).replace("\\", "/")
    if name.startswith("/") or re.match(r"^[a-zA-Z]:", name) or "://" in name:
        raise AssetError(f"{owner.name}: refers to '{uri}', an absolute path or URL (refused)")
    candidate = (root / name).resolve()
    root_resolved = root.resolve()
    if not candidate.is_relative_to(root_resolved):
        raise AssetError(f"{owner.name}: refers to '{uri}', outside the asset's folder (refused)")
    return candidate


def _check_image_header(data: bytes | Path, what: str, cfg: LoadConfig) -> None:
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise AssetError(f"{what}: image too large to decode (decompression bomb guard)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the asset's fault
        raise AssetError(f"{what}: unreadable image ({type(exc).__name__}: {exc})") from None
    if width * height > cfg.max_image_pixels:
        raise AssetError(
            f"{what}: image is {width}x{height}, above the decoding bound of {cfg.max_image_pixels} pixels"
        )


def _read_glb(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    if data[:4] != b"glTF":
        raise AssetError(f"{path.name}: not a GLB file (bad magic {data[:4]!r})")
    if len(data) < 20:
        raise AssetError(f"{path.name}: truncated GLB ({len(data)} bytes)")
    _, version, length = struct.unpack_from("<4sII", data, 0)
    if version != 2:
        raise AssetError(f"{path.name}: GLB version {version} is not supported (needs 2)")
    if length != len(data):
        raise AssetError(f"{path.name}: truncated GLB (header says {length} bytes, file has {len(data)})")
    offset, doc, binary = 12, None, b""
    while offset + 8 <= len(data):
        chunk_len, chunk_type = struct.unpack_from("<II", data, offset)
        body = data[offset + 8 : offset + 8 + chunk_len]
        if len(body) != chunk_len:
            raise AssetError(f"{path.name}: truncated GLB chunk")
        if chunk_type == 0x4E4F534A:  # JSON
            try:
                doc = json.loads(body)
            except ValueError as exc:
                raise AssetError(f"{path.name}: GLB JSON chunk is invalid ({exc})") from None
        elif chunk_type == 0x004E4942:  # BIN
            binary = body
        offset += 8 + chunk_len
    if not isinstance(doc, dict):
        raise AssetError(f"{path.name}: GLB has no JSON chunk")
    return doc, binary


def _gltf_references(path: Path, doc: dict, binary: bytes, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    root, files = path.parent, []
    for kind in ("buffers", "images"):
        for item in doc.get(kind, []) or []:
            uri = item.get("uri") if isinstance(item, dict) else None
            if uri and not uri.startswith("data:"):
                ref = resolve_inside(root, uri, path)  # refused outside the folder, even unused
                if kind == "images" and geometry_only:
                    continue
                if not ref.is_file():
                    raise AssetError(f"{path.name}: missing referenced file '{uri}'")
                files.append(ref)
    if geometry_only:
        return files
    views = doc.get("bufferViews", []) or []
    for i, image in enumerate(doc.get("images", []) or []):
        if not isinstance(image, dict):
            continue
        if image.get("uri") and not image["uri"].startswith("data:"):
            _check_image_header(resolve_inside(root, image["uri"], path), f"{path.name} image {i}", cfg)
        elif "bufferView" in image and binary:
            try:
                view = views[image["bufferView"]]
                start = int(view.get("byteOffset", 0))
                blob = binary[start : start + int(view["byteLength"])]
            except (IndexError, KeyError, TypeError, ValueError):
                raise AssetError(f"{path.name}: image {i} points to an invalid bufferView") from None
            _check_image_header(blob, f"{path.name} image {i}", cfg)
    return files


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_obj(path: Path, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    """Validate OBJ text; return the referenced .mtl files and their textures."""
    counts = {"v": 0, "vt": 0, "vn": 0}
    mtl_names: list[str] = []
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line or line[0] not in "vfm":
                continue
            parts = line.split()
            if not parts:
                continue
            tag = parts[0]
            if tag in counts:
                counts[tag] += 1
                numbers = parts[1:]
                for token in numbers:
                    if not _FLOAT.match(token):
                        raise AssetError(f"{path.name}: line {lineno}: non-finite or invalid number '{token}'")
            elif tag == "f":
                refs = parts[1:]
                if len(refs) < 3:
                    raise AssetError(f"{path.name}: line {lineno}: face has {len(refs)} vertices (needs >= 3)")
                for ref in refs:
                    for kind, token in zip(("v", "vt", "vn"), ref.split("/")):
                        if not token:
                            continue
                        try:
                            index = int(token)
                        except ValueError:
                            raise AssetError(f"{path.name}: line {lineno}: bad face index '{token}'") from None
                        if index < 0 and not cfg.allow_relative_obj_indices:
                            raise AssetError(
                                f"{path.name}: line {lineno}: negative (relative) face index {index} "
                                "is not supported (load.allow_relative_obj_indices=true accepts it)"
                            )
                        if index == 0 or index > counts[kind] or -index > counts[kind]:
                            raise AssetError(
                                f"{path.name}: line {lineno}: face index {index} out of range "
                                f"({counts[kind]} '{kind}' defined so far)"
                            )
            elif tag == "mtllib":
                mtl_names.extend(parts[1:])
    files: list[Path] = []
    for name in mtl_names:
        mtl = resolve_inside(path.parent, name, path)
        if geometry_only or not mtl.is_file():
            continue  # a missing .mtl renders with the default material, like other tools
        files.append(mtl)
        with open(mtl, "r", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[0].lower().startswith(("map_", "bump", "disp", "norm")) and len(parts) > 1:
                    texture = resolve_inside(mtl.parent, parts[-1], mtl)
                    if texture.is_file():
                        _check_image_header(texture, f"{mtl.name}: {parts[-1]}", cfg)
                        files.append(texture)
    return files


def inspect_asset(path: Path, cfg: LoadConfig, geometry_only: bool = False) -> list[Path]:
    """Pre-parse checks; returns the sidecar files the asset uses (all inside its folder).

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
    if ext == "glb":
        doc, binary = _read_glb(path)
        return _gltf_references(path, doc, binary, cfg, geometry_only)
    if ext == "gltf":
        try:
            doc = json.loads(path.read_bytes())
        except ValueError as exc:
            raise AssetError(f"{path.name}: invalid glTF JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise AssetError(f"{path.name}: glTF top level is not an object")
        return _gltf_references(path, doc, b"", cfg, geometry_only)
    if ext == "obj":
        return _check_obj(path, cfg, geometry_only)
    if ext not in MESH_EXTENSIONS:
        raise AssetError(f"{path.name}: unsupported file type '.{ext}'")
    return []


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedAsset:
    """A validated scene with named parts; ``normalization`` maps it into the unit cube."""

    scene: "object"  # trimesh.Scene (kept untyped so this module imports without trimesh)
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


def _prepare_textures(geometry: "object", max_size: int, owner: str) -> None:
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
            raise AssetError(f"{owner}: texture '{key}' cannot be decoded ({type(exc).__name__}: {exc})") from None
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


def _fix_untextured(geometry: "object") -> None:
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
    """Parse, validate and normalize one asset. Raises AssetError / AssetFiltered.

    ``geometry_only`` (evaluation): materials and textures are skipped entirely, so a broken or
    huge texture cannot fail a mesh whose geometry is fine."""
    import trimesh

    inspect_asset(path, cfg, geometry_only)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                scene = trimesh.load_scene(
                    str(path), resolver=trimesh.resolvers.FilePathResolver(str(path)), skip_materials=geometry_only
                )
            except AssetError:
                raise
            except Exception as exc:  # noqa: BLE001 - parser errors are the asset's fault
                raise AssetError(f"{path.name}: cannot parse ({type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous

    meshes = {name: g for name, g in scene.geometry.items() if isinstance(g, trimesh.Trimesh)}
    if not scene.geometry:
        raise AssetError(f"{path.name}: no geometry (empty scene)")
    if not meshes:
        kinds = sorted({type(g).__name__ for g in scene.geometry.values()})
        raise AssetError(f"{path.name}: no triangle meshes (only {', '.join(kinds)})")
    num_faces = 0
    for name, mesh in meshes.items():
        if len(mesh.faces) == 0:
            continue
        if not np.isfinite(mesh.vertices).all():
            raise AssetError(f"{path.name}: mesh '{name}' has non-finite vertex coordinates")
        if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices):
            raise AssetError(f"{path.name}: mesh '{name}' has face indices out of range")
        num_faces += len(mesh.faces)
    if num_faces == 0:
        raise AssetError(f"{path.name}: no faces")
    if num_faces > cfg.max_faces:
        raise AssetFiltered("max_faces", f"{path.name}: {num_faces} faces > {cfg.max_faces}")
    # drop non-mesh geometry (points, paths) so the renderer sees triangles only
    for name in list(scene.geometry):
        if name not in meshes or len(meshes[name].faces) == 0:
            scene.delete_geometry(name)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels
    try:
        for mesh in scene.geometry.values() if not geometry_only else ():
            _prepare_textures(mesh, cfg.max_texture_size, path.name)
            _fix_untextured(mesh)
    finally:
        Image.MAX_IMAGE_PIXELS = previous

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
