"""Loading untrusted assets: every bad input is a clear per-asset error; real assets normalize."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from know3d.rendering.assets import AssetError, AssetFiltered, asset_sha256, file_sha256, inspect_asset, load_asset
from know3d.rendering.config import LoadConfig
from tests.conftest import ACCEPTED_FROM_BAD, BAD_ASSETS, REAL_ASSETS, REFUSED_BAD

EXPECTED_BAD = {
    "empty.obj": "no geometry",
    "empty_nodes.glb": "no geometry",
    "nancolor.obj": "line 7: non-finite or invalid number in 'v' field 4",
    "not_a_mesh.glb": "not a GLB file",
    "notenoughindices.obj": "face has 2 vertices",
    "truncated_duck.glb": "truncated GLB",
    "zero_bytes.glb": "empty file",
}


def test_expected_table_covers_every_bad_file(bad_dir: Path):
    assert (
        sorted(p.name for p in bad_dir.iterdir()) == sorted([*EXPECTED_BAD, *ACCEPTED_FROM_BAD]) == sorted(BAD_ASSETS)
    )
    assert sorted(EXPECTED_BAD) == sorted(REFUSED_BAD)


@pytest.mark.parametrize("name", sorted(EXPECTED_BAD))
def test_bad_assets_fail_with_a_reason_naming_the_file(bad_dir: Path, name: str):
    with pytest.raises(AssetError) as exc:
        load_asset(bad_dir / name, LoadConfig())
    assert str(exc.value).startswith(name + ":")
    assert EXPECTED_BAD[name] in str(exc.value)


def test_relative_obj_indices_are_accepted_by_default(bad_dir: Path):
    asset = load_asset(bad_dir / "negative_indices.obj", LoadConfig())
    assert asset.num_faces == 12  # the 6 quads of a cube
    with pytest.raises(AssetError, match=r"negative_indices.obj: line \d+: negative \(relative\) face index"):
        load_asset(bad_dir / "negative_indices.obj", LoadConfig(allow_relative_obj_indices=False))


@pytest.mark.parametrize("face", ["f -1 -2 -4", "f 1 2 -4", "f -1 -2 -3/-1"])
def test_out_of_range_relative_obj_indices_are_refused(tmp_path: Path, face: str):
    (tmp_path / "m.obj").write_text(f"v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\n{face}\n")
    if face.endswith("/-1"):
        load_asset(tmp_path / "m.obj", LoadConfig())  # -1 'vt' is the one texture coordinate: valid
        return
    with pytest.raises(AssetError, match=r"m.obj: line 5: face corner 3 'v' index out of range \(3 'v' defined"):
        load_asset(tmp_path / "m.obj", LoadConfig())


@pytest.mark.parametrize("name", REAL_ASSETS)
def test_real_assets_normalize_into_the_unit_cube(real_dir: Path, name: str):
    asset = load_asset(real_dir / name, LoadConfig())
    assert asset.num_faces > 0 and asset.part_names
    bounds = asset.scene.bounds
    corners = np.c_[bounds, np.ones(2)] @ asset.normalization.T
    lo, hi = corners[0, :3], corners[1, :3]
    assert np.allclose((lo + hi) / 2, 0, atol=1e-9)
    assert (hi - lo).max() == pytest.approx(1.0)
    assert lo.min() >= -0.5 - 1e-9 and hi.max() <= 0.5 + 1e-9


def test_filters_on_size_and_faces(real_dir: Path):
    with pytest.raises(AssetFiltered) as exc:
        load_asset(real_dir / "Duck.glb", LoadConfig(max_faces=1000))
    assert exc.value.filter == "max_faces" and "4212 faces" in str(exc.value)
    with pytest.raises(AssetFiltered) as exc:
        inspect_asset(real_dir / "Duck.glb", LoadConfig(max_file_bytes=1000))
    assert exc.value.filter == "max_file_bytes"


def test_textures_are_downsampled(real_dir: Path):
    asset = load_asset(real_dir / "Duck.glb", LoadConfig(max_texture_size=32))
    material = next(iter(asset.scene.geometry.values())).visual.material
    assert max(material.baseColorTexture.size) == 32


def test_image_decoding_is_bounded(real_dir: Path, tmp_path: Path):
    # the Duck's embedded texture is 512x512; a bound of 100k pixels rejects it before decoding
    with pytest.raises(AssetError, match="above the decoding bound"):
        load_asset(real_dir / "Duck.glb", LoadConfig(max_image_pixels=100_000))
    # a sidecar texture of an OBJ is bounded the same way
    folder = tmp_path / "fuze"
    shutil.copytree(real_dir / "fuze", folder)
    with pytest.raises(AssetError, match="fuze_uv.jpg.*above the decoding bound"):
        load_asset(folder / "fuze.obj", LoadConfig(max_image_pixels=1000))


def test_decompression_bomb_is_refused(tmp_path: Path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    # 30000 x 30000 one-bit image: a few KB on disk, 900 M pixels once decoded
    Image.new("1", (30000, 30000)).save(folder / "tex.png")
    (folder / "m.mtl").write_text("newmtl a\nmap_Kd tex.png\n")
    (folder / "m.obj").write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nusemtl a\nf 1/1 2/1 3/1\n")
    with pytest.raises(AssetError, match="tex.png.*(decompression bomb|above the decoding bound)"):
        load_asset(folder / "m.obj", LoadConfig())


def _gltf_with_image_uri(folder: Path, uri: str) -> Path:
    import trimesh

    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(
        uv=np.zeros((len(box.vertices), 2)),
        material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.new("RGB", (4, 4), "red")),
    )
    files = trimesh.Scene(box).export(file_type="gltf")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    doc = json.loads((folder / "model.gltf").read_text())
    doc["images"] = [{"uri": uri}]
    (folder / "model.gltf").write_text(json.dumps(doc))
    return folder / "model.gltf"


def test_gltf_image_outside_the_folder_is_refused(tmp_path: Path):
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    path = _gltf_with_image_uri(tmp_path / "asset", "../secret.png")
    with pytest.raises(AssetError, match=r"model.gltf: images\[0\].uri points outside the asset's folder \(refused\)"):
        load_asset(path, LoadConfig())


@pytest.mark.parametrize("uri", ["/etc/passwd", "file:///etc/passwd", "C:/x.png", "%2E%2E/secret.png"])
def test_gltf_absolute_or_encoded_escapes_are_refused(tmp_path: Path, uri: str):
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    path = _gltf_with_image_uri(tmp_path / "asset", uri)
    with pytest.raises(AssetError, match="refused"):
        load_asset(path, LoadConfig())


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path):
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    path = _gltf_with_image_uri(tmp_path / "asset", "tex.png")
    (tmp_path / "asset" / "tex.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(AssetError, match="outside the asset's folder"):
        load_asset(path, LoadConfig())


def test_gltf_inside_the_folder_loads(tmp_path: Path):
    folder = tmp_path / "asset"
    folder.mkdir()
    Image.new("RGB", (8, 8), "blue").save(folder / "tex.png")
    path = _gltf_with_image_uri(folder, "tex.png")
    asset = load_asset(path, LoadConfig())
    assert asset.num_faces == 12
    assert sorted(p.name for p in inspect_asset(path, LoadConfig())) == sorted(
        ["tex.png"] + [p.name for p in folder.glob("*.bin")]
    )


def test_obj_mtllib_outside_the_folder_is_refused(tmp_path: Path):
    (tmp_path / "evil.mtl").write_text("newmtl a\n")
    folder = tmp_path / "asset"
    folder.mkdir()
    (folder / "m.obj").write_text("mtllib ../evil.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(AssetError, match="outside the asset's folder"):
        load_asset(folder / "m.obj", LoadConfig())


def test_obj_index_out_of_range(tmp_path: Path):
    (tmp_path / "m.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n")
    with pytest.raises(AssetError, match=r"line 4: face corner 3 'v' index out of range \(3 'v' defined so far\)"):
        load_asset(tmp_path / "m.obj", LoadConfig())


def test_degenerate_and_point_cloud_assets(tmp_path: Path):
    (tmp_path / "flat.obj").write_text("v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n")
    with pytest.raises(AssetError, match="degenerate bounding box"):
        load_asset(tmp_path / "flat.obj", LoadConfig())
    import trimesh

    trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(tmp_path / "cloud.ply")
    with pytest.raises(AssetFiltered, match="cloud.ply: no triangle meshes \\(only PointCloud\\)") as exc:
        load_asset(tmp_path / "cloud.ply", LoadConfig())
    assert exc.value.filter == "no_triangles"


def test_unsupported_extension(tmp_path: Path):
    (tmp_path / "x.fbx").write_bytes(b"Kaydara FBX Binary")
    with pytest.raises(AssetError, match="unsupported file type"):
        inspect_asset(tmp_path / "x.fbx", LoadConfig())


def test_identity_covers_sidecar_files(real_dir: Path, tmp_path: Path):
    folder = tmp_path / "fuze"
    shutil.copytree(real_dir / "fuze", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    main = folder / "fuze.obj"
    before = asset_sha256(main, inspect_asset(main, LoadConfig()))
    assert before != file_sha256(main)
    img = Image.open(folder / "fuze_uv.jpg")
    img.rotate(90).save(folder / "fuze_uv.jpg")  # same OBJ, different texture -> different asset
    after = asset_sha256(main, inspect_asset(main, LoadConfig()))
    assert after != before
    assert file_sha256(real_dir / "Duck.glb") == asset_sha256(real_dir / "Duck.glb", [])


def test_untextured_uvs_get_a_visible_default_material(real_dir: Path):
    asset = load_asset(real_dir / "quadknot.obj", LoadConfig())
    visual = next(iter(asset.scene.geometry.values())).visual
    assert visual.kind == "vertex"
    assert visual.vertex_colors[0, :3].min() >= 150  # light grey, not near-black


def test_truncated_texture_fails_at_load(real_dir: Path, tmp_path: Path):
    folder = tmp_path / "fuze"
    shutil.copytree(real_dir / "fuze", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    data = (folder / "fuze_uv.jpg").read_bytes()
    (folder / "fuze_uv.jpg").write_bytes(data[: len(data) // 3])  # header intact, pixels cut
    with pytest.raises(AssetError, match="fuze.obj: texture .* cannot be decoded"):
        load_asset(folder / "fuze.obj", LoadConfig())
