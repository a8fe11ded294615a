"""Evaluation metrics on shapes and images with known answers (no Ray, no models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from know3d.evaluation import geometry
from know3d.evaluation.geometry import GeometryOptions, compare_meshes, point_metrics, voxel_iou
from know3d.evaluation.images import ImageError, Lpips, compare_images, load_rgb, psnr, ssim
from know3d.evaluation.meshes import MeshError, farthest_points, load_mesh, normalize, semantic_points, uid_rng
from know3d.rendering import voxelize
from know3d.rendering.voxelize import fill_interior, voxelize_surface


def sphere_points(
    n: int, radius: float, centre: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    normals = v / np.linalg.norm(v, axis=1, keepdims=True)
    return normals * radius + np.asarray(centre), normals


def expected_sphere_distance(radius: float, shift: float) -> tuple[float, float]:
    """E|dist| and E[dist²] from a point of one sphere to a second sphere shifted by ``shift``.

    For a point at polar cosine u (uniform on [-1, 1]) the distance to the shifted sphere's
    surface is | sqrt(r² + d² - 2 r d u) - r |."""
    u = np.linspace(-1.0, 1.0, 2_000_001)
    d = np.abs(np.sqrt(radius**2 + shift**2 - 2 * radius * shift * u) - radius)
    return float(d.mean()), float((d**2).mean())


def test_sphere_vs_shifted_sphere_matches_the_analytic_chamfer():
    r, shift = 0.5, 0.1
    a, na = sphere_points(100_000, r, (0, 0, 0), 1)
    b, nb = sphere_points(100_000, r, (shift, 0, 0), 2)
    m = point_metrics(a, na, b, nb, thresholds=(0.01, 0.02))
    l1, l2 = expected_sphere_distance(r, shift)
    assert m["chamfer_l1"] == pytest.approx(l1, rel=0.03)
    assert m["chamfer_l2"] == pytest.approx(l2, rel=0.03)
    # both directions are the same distribution (the geometry is symmetric)
    assert m["accuracy"] == pytest.approx(m["completeness"], rel=0.02)
    # share of sphere points within tau of the other sphere: |sqrt(r²+d²-2rdu) - r| < tau
    u = np.linspace(-1, 1, 2_000_001)
    share = float((np.abs(np.sqrt(r**2 + shift**2 - 2 * r * shift * u) - r) < 0.02).mean())
    assert m["fscore@0.02"] == pytest.approx(share, abs=0.02)
    assert 0.0 < m["fscore@0.01"] < m["fscore@0.02"] < 1.0


def test_identical_point_sets_score_perfectly_and_metrics_are_symmetric():
    a, na = sphere_points(20_000, 0.7, (0, 0, 0), 3)
    same = point_metrics(a, na, a, na)
    assert same["chamfer_l1"] == 0.0 and same["chamfer_l2"] == 0.0
    assert same["fscore@0.01"] == 1.0 and same["normal_consistency"] == pytest.approx(1.0)
    b, nb = sphere_points(20_000, 0.6, (0.05, 0, 0), 4)
    ab, ba = point_metrics(a, na, b, nb), point_metrics(b, nb, a, na)
    for key in ("chamfer_l1", "chamfer_l2", "fscore@0.01", "fscore@0.02", "normal_consistency"):
        assert ab[key] == pytest.approx(ba[key], rel=1e-12)
    assert ab["accuracy"] == ba["completeness"] and ab["precision@0.01"] == ba["recall@0.01"]


def test_cube_vs_itself_and_vs_half_cube_iou():
    cube = normalize(trimesh.creation.box(extents=[1.0, 1.0, 1.0]))
    half = normalize(trimesh.creation.box(extents=[1.0, 1.0, 0.5]))
    same = compare_meshes(cube, cube, "cube", 0, GeometryOptions(num_samples=50_000))
    assert same["iou_surface@64"] == 1.0 and same["iou_volume@64"] == 1.0
    # two independent 50k sample sets of the same cube (area 23) differ only by sampling
    # noise: ~0.02 spacing, so F@0.02 is high but not 1 (the convention's noise floor)
    assert same["fscore@0.02"] > 0.9 and same["chamfer_l1"] < 0.015
    assert same["normal_consistency"] > 0.99
    iou = voxel_iou(half, cube, 64)
    # cube -> [-0.49, 0.49]³ fills all 64 layers; the half cube fills z layers 16..47 exactly
    assert iou["iou_volume@64"] == 0.5
    # surface: shared side walls 252 x 32 voxels / union of 23,816 + 15,752 - 8,064
    assert iou["iou_surface@64"] == pytest.approx(8064 / 31504, abs=1e-12)


def test_metrics_are_invariant_to_translation_and_scale_of_the_prediction():
    mesh = trimesh.creation.annulus(r_min=0.2, r_max=0.5, height=0.3, sections=48)
    moved = mesh.copy()
    moved.apply_scale(3.7)
    moved.apply_translation([5.0, -2.0, 1.0])
    gt = normalize(mesh)
    options = GeometryOptions(num_samples=20_000)
    a = compare_meshes(normalize(mesh), gt, "u", 0, options)
    b = compare_meshes(normalize(moved), gt, "u", 0, options)
    for key in ("chamfer_l1", "chamfer_l2", "fscore@0.01", "iou_surface@64", "iou_volume@64"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9)
    rotated = mesh.copy()
    rotated.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(25), [0, 1, 0]))
    c = compare_meshes(normalize(rotated), gt, "u", 0, options)
    assert c["chamfer_l1"] > 3 * a["chamfer_l1"]


def test_icp_recovers_a_small_rotation_and_records_it():
    mesh = normalize(trimesh.creation.box(extents=[1.0, 0.6, 0.3]))
    rotated = mesh.copy()
    rotated.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(8), [0, 1, 0]))
    plain = compare_meshes(rotated, mesh, "b", 0, GeometryOptions(num_samples=20_000))
    aligned = compare_meshes(rotated, mesh, "b", 0, GeometryOptions(num_samples=20_000, icp=True))
    assert plain["icp"] is False and "icp_transform" not in plain
    assert aligned["icp"] is True and np.asarray(aligned["icp_transform"]).shape == (4, 4)
    assert aligned["chamfer_l1"] < 0.5 * plain["chamfer_l1"]
    assert aligned["iou_surface@64"] > plain["iou_surface@64"]  # the IoU is of the aligned mesh


def test_normalization_puts_the_longest_side_at_1_96_centred():
    mesh = trimesh.creation.box(extents=[4.0, 2.0, 1.0])
    mesh.apply_translation([10, 20, 30])
    n = normalize(mesh)
    assert np.allclose(n.bounds, [[-0.98, -0.49, -0.245], [0.98, 0.49, 0.245]])


def test_semantic_points_are_seeded_per_uid_and_spread_by_fps():
    mesh = normalize(trimesh.creation.icosphere(subdivisions=3))
    a = semantic_points(mesh, "uid-a", seed=0, num_samples=30_000, num_points=1024)
    assert a.shape == (1024, 3) and a.dtype == np.float32
    assert np.array_equal(a, semantic_points(mesh, "uid-a", seed=0, num_samples=30_000, num_points=1024))
    assert not np.array_equal(a, semantic_points(mesh, "uid-a", seed=1, num_samples=30_000, num_points=1024))
    assert not np.array_equal(a, semantic_points(mesh, "uid-b", seed=0, num_samples=30_000, num_points=1024))
    # farthest points are spread out: their nearest-neighbour gap beats a random subset's
    from scipy.spatial import cKDTree

    pool = np.asarray(trimesh.sample.sample_surface(mesh, 30_000, seed=5)[0], dtype=np.float32)
    fps = pool[farthest_points(pool, 1024, uid_rng("x", 0, "t"))]
    rand = pool[np.random.default_rng(0).choice(len(pool), 1024, replace=False)]
    gap = lambda p: cKDTree(p).query(p, k=2)[0][:, 1].min()
    assert gap(fps) > 3 * gap(rand)
    with pytest.raises(MeshError, match="cannot take"):
        farthest_points(pool[:10], 20, uid_rng("x", 0, "t"))


def test_voxelization_is_exact_and_chunking_does_not_change_it(monkeypatch):
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.45)
    grid = voxelize_surface(sphere.vertices, sphere.faces, 32)
    pts = trimesh.sample.sample_surface(sphere, 400_000, seed=0)[0]
    idx = np.floor((pts + 0.5) * 32).astype(int)
    sampled = np.zeros_like(grid)
    sampled[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    assert (sampled & ~grid).sum() == 0  # every voxel a surface point lies in is found
    assert grid.sum() <= sampled.sum() * 1.1  # and barely more (corner-grazing triangles)
    monkeypatch.setattr(voxelize, "_CHUNK_CANDIDATES", 97)
    assert np.array_equal(voxelize_surface(sphere.vertices, sphere.faces, 32), grid)
    solid = fill_interior(grid)
    assert solid[16, 16, 16] and not solid[0, 0, 0]
    # geometry outside the unit cube is clipped, not wrapped
    far = trimesh.creation.box(extents=[0.2] * 3)
    far.apply_translation([2.0, 0, 0])
    assert voxelize_surface(far.vertices, far.faces, 16).sum() == 0


def test_bad_meshes_raise_mesh_errors_naming_the_file(real_dir: Path, bad_dir: Path, tmp_path: Path):
    expectations = {
        "zero_bytes.glb": "empty file",
        "truncated_duck.glb": "truncated GLB",
        "empty.obj": "no geometry",
        "nancolor.obj": "non-finite",
        "not_a_mesh.glb": "not a GLB",
    }
    for name, reason in expectations.items():
        with pytest.raises(MeshError, match=reason) as info:
            load_mesh(bad_dir / name)
        assert name in str(info.value)
    with pytest.raises(MeshError, match="non-manifold mesh \\(125 edges"):
        load_mesh(real_dir / "bunny.ply")
    mesh, info = load_mesh(real_dir / "bunny.ply", allow_non_manifold=True)
    assert info.non_manifold_edges == 125 and len(mesh.faces) == info.num_faces
    nan_obj = tmp_path / "nanvert.obj"
    nan_obj.write_text("v 0 0 0\nv 1 0 0\nv 0 nan 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match="nanvert.obj"):
        load_mesh(nan_obj)
    duck, info = load_mesh(real_dir / "Duck.glb")
    assert info.num_faces == 4212 and info.watertight and info.non_manifold_edges == 0


# --------------------------------------------------------------------------- images


def test_psnr_ssim_known_values():
    gt = np.zeros((32, 32, 3))
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0)
    assert psnr(gt, gt) == pytest.approx(100.0)  # MSE floor, not inf
    rng = np.random.default_rng(0)
    img = rng.random((64, 64, 3))
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
    s = ssim(noisy, img)
    assert 0.3 < s < 0.99 and s == pytest.approx(ssim(img, noisy), rel=1e-12)


def test_images_are_composited_on_the_same_background_and_bounded(tmp_path: Path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = [200, 10, 10, 255]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    white = load_rgb(tmp_path / "a.png", "white")
    assert white.shape == (16, 16, 3) and (white[0, 0] == 255).all() and (white[8, 8] == [200, 10, 10]).all()
    assert (load_rgb(tmp_path / "a.png", "black")[0, 0] == 0).all()
    Image.fromarray(white).resize((32, 32)).save(tmp_path / "big.png")
    m = compare_images(load_rgb(tmp_path / "big.png"), white)
    assert m["resized"] is True and m["size"] == [16, 16] and m["psnr"] > 15
    with pytest.raises(ImageError, match="big.png: 32x32 pixels exceeds"):
        load_rgb(tmp_path / "big.png", max_pixels=500)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="junk.png: cannot decode"):
        load_rgb(tmp_path / "junk.png")


def test_lpips_is_skipped_with_a_reason_or_runs_from_a_local_backbone(tmp_path: Path):
    import torch
    import torchvision

    missing = Lpips(tmp_path / "nope.pth")
    assert not missing.status.available and "nope.pth" in missing.status.reason and missing.model is None
    img = np.random.default_rng(0).random((64, 64, 3))
    assert "lpips" not in compare_images((img * 255).astype(np.uint8), (img * 255).astype(np.uint8), missing)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pth")
    model = Lpips(tmp_path / "alexnet.pth")
    assert model.status.available
    a = (img * 255).astype(np.uint8)
    b = (np.clip(img + 0.2, 0, 1) * 255).astype(np.uint8)
    assert compare_images(a, a, model)["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert compare_images(a, b, model)["lpips"] > 0.0
    torch.save({"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    assert "not an AlexNet" in Lpips(tmp_path / "other.pth").status.reason


def test_geometry_uses_all_points(monkeypatch):
    """The KD-tree query is over the full sample sets (a regression guard on the conventions)."""
    calls = []
    real = geometry.nearest_distances

    def spy(source, target, workers=-1):
        calls.append((len(source), len(target)))
        return real(source, target, workers)

    monkeypatch.setattr(geometry, "nearest_distances", spy)
    mesh = normalize(trimesh.creation.box())
    compare_meshes(mesh, mesh, "c", 0, GeometryOptions(num_samples=12_345))
    assert calls == [(12_345, 12_345), (12_345, 12_345)]


def test_image_modes_decode_to_the_right_pixels(tmp_path: Path):
    cases = {
        "i16.png": (Image.fromarray(np.full((16, 16), 32768, np.uint16)), {}, [128, 128, 128]),
        "f.tiff": (Image.fromarray(np.full((16, 16), 0.5, np.float32), "F"), {}, [128, 128, 128]),
        "trns.png": (Image.fromarray(np.full((16, 16), 7, np.uint8), "L"), {"transparency": 7}, [255, 255, 255]),
        "la.png": (Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA"), {}, [255, 255, 255]),
        "p.png": (
            Image.fromarray(np.full((16, 16, 3), [10, 200, 30], np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE),
            {},
            [10, 200, 30],
        ),
    }
    for name, (img, kw, expected) in cases.items():
        img.save(tmp_path / name, **kw)
        assert load_rgb(tmp_path / name, "white")[3, 3].tolist() == expected, name
    Image.new("RGB", (8, 40)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError, match="thin.png: 8x40 pixels is below the 11-pixel SSIM window"):
        load_rgb(tmp_path / "thin.png")


def test_lpips_reports_unusable_backbone_files(tmp_path: Path):
    import torch

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "junk.pth: cannot be loaded" in Lpips(tmp_path / "junk.pth").status.reason
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    assert "tensor.pth: not a state_dict" in Lpips(tmp_path / "tensor.pth").status.reason
    torch.save(
        {
            "features.0.weight": torch.zeros(2, 2),
            "features.0.bias": torch.zeros(2),
            **{f"features.{i}.{w}": torch.zeros(1) for i in (3, 6, 8, 10) for w in ("weight", "bias")},
        },
        tmp_path / "shapes.pth",
    )
    assert "shapes.pth: not AlexNet weights" in Lpips(tmp_path / "shapes.pth").status.reason


def test_geometry_only_loading_ignores_broken_textures(real_dir: Path, tmp_path: Path):
    from know3d.rendering.assets import AssetError, load_asset
    from know3d.rendering.config import LoadConfig

    data = bytearray((real_dir / "Duck.glb").read_bytes())
    start = data.find(b"IDAT")  # corrupt the embedded texture's pixel data, keep its header
    data[start + 8 : start + 200] = bytes(192)
    (tmp_path / "Duck.glb").write_bytes(bytes(data))
    with pytest.raises(AssetError, match="texture"):
        load_asset(tmp_path / "Duck.glb", LoadConfig())  # the data build still refuses it
    mesh, info = load_mesh(tmp_path / "Duck.glb")
    assert info.num_faces == 4212


def test_degenerate_faces_do_not_make_a_mesh_non_manifold():
    from know3d.evaluation.meshes import count_non_manifold_edges

    tet = trimesh.creation.box()
    faces = np.vstack([tet.faces, [[0, 1, 1]], tet.faces[:1]])  # a collapsed and a duplicated face
    assert count_non_manifold_edges(trimesh.Trimesh(tet.vertices, faces, process=False)) == 0
    fin = np.vstack([tet.faces, [[0, 1, 2]]])
    verts = tet.vertices
    a, b = tet.faces[0][:2]
    extra = trimesh.Trimesh(np.vstack([verts, [[5, 5, 5]]]), np.vstack([fin[:-1], [[a, b, len(verts)]]]), process=False)
    assert count_non_manifold_edges(extra) == 1  # a third face on an existing edge


def test_eval_config_rejects_inconsistent_settings():
    from know3d.evaluation.config import EvalConfig
    from know3d.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="surface_samples .* must exceed points.fps_points"):
        load_config(None, ["points.surface_samples=1000", "points.fps_points=8192"], model=EvalConfig)
    with pytest.raises(ConfigError, match="fscore_thresholds must be positive"):
        load_config(None, ["geometry.fscore_thresholds=[0.0]"], model=EvalConfig)


def test_a_render_failure_keeps_the_metrics(real_dir: Path, tmp_path: Path, monkeypatch):
    from know3d.evaluation import shapes
    from know3d.evaluation.config import EvalConfig
    from know3d.evaluation.shapes import ShapeJob, measure_shape

    def broken(*args, **kwargs):
        raise RuntimeError("GL context lost")

    monkeypatch.setattr(shapes, "render_normals", broken)
    cfg = EvalConfig.model_validate({"semantic": {"enabled": False}, "geometry": {"samples": 5000}})
    duck = str(real_dir / "Duck.glb")
    result, points = measure_shape(ShapeJob("duck", duck, gt=duck), cfg, tmp_path)
    assert result["status"] == "ok" and result["geometry"]["iou_volume@64"] == 1.0
    assert result["render_error"] == "RuntimeError: GL context lost" and "renders" not in result and points is None


def test_front_consistency_on_known_geometry():
    """A flat front at z = 0.3 seen from +z (view_dir -z): a mesh surface 0.05 behind it gives
    front -> mesh 0.05; mesh samples behind the centre plane do not count in the reverse."""
    from know3d.evaluation.geometry import front_consistency

    g = np.linspace(-0.2, 0.2, 41)
    x, y = np.meshgrid(g, g)
    front = np.stack([x.ravel(), y.ravel(), np.full(x.size, 0.3)], 1)
    near = front + [0, 0, -0.05]  # on the camera's side of the centre: counted both ways
    far = front * [1, 1, -1]  # z = -0.3, behind the centre plane: only in the forward direction's pool
    out = front_consistency(front, np.concatenate([near, far]), view_dir=np.array([0, 0, -1.0]))
    assert out["front_to_mesh"] == pytest.approx(0.05)
    assert out["mesh_front_to_front"] == pytest.approx(0.05) and out["mesh_front_share"] == pytest.approx(0.5)
    assert out["front_within@0.02"] == 0.0
    exact = front_consistency(front, front, view_dir=np.array([0, 0, -1.0]))
    assert exact["front_to_mesh"] == 0 and exact["front_within@0.02"] == 1.0
    # the direction matters: seen from -z, the near sheet is behind the centre plane
    flipped = front_consistency(front, np.concatenate([near, far]), view_dir=np.array([0, 0, 1.0]))
    assert flipped["mesh_front_to_front"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="needs front points"):
        front_consistency(np.zeros((0, 3)), front, np.array([0, 0, 1.0]))
