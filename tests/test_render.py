"""Rendering: image contents agree with the camera math; files on disk are what json says."""

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from know3d.pipeline.config import BuildConfig
from know3d.rendering.assets import file_sha256, load_asset
from know3d.rendering.camera import backview_plan, make_camera, project
from know3d.rendering.config import LoadConfig
from know3d.rendering.isolation import IsolatedRenderer
from know3d.rendering.process import Rendered, asset_dir, compose_background, read_asset, render_asset
from know3d.rendering.render import ViewRenderer, normals_from_depth

RES = 96


@pytest.fixture(scope="module")
def renderer():
    r = ViewRenderer(RES, os.environ.get("PYOPENGL_PLATFORM", "egl"))
    yield r
    r.close()


def _cfg(**render) -> BuildConfig:
    return BuildConfig.model_validate({"render": {"resolution": RES, **render}})


def test_silhouette_matches_projected_vertices(real_dir: Path, renderer: ViewRenderer):
    """The renderer and the recorded OpenCV cameras agree to within a pixel."""
    asset = load_asset(real_dir / "Duck.glb", LoadConfig())
    mesh = next(iter(asset.scene.geometry.values()))
    transform, _ = asset.scene.graph[asset.part_names[0]]
    world = np.c_[mesh.vertices, np.ones(len(mesh.vertices))] @ (asset.normalization @ transform).T
    plan = backview_plan("f" * 64, 0, RES, (30, 60), (-10, 30))
    views = renderer.render(asset, plan.cameras[:4])
    for cam, view in zip(plan.cameras, views):
        uv = project(world[:, :3], cam)
        ys, xs = np.nonzero(view.mask)
        assert abs(xs.min() - uv[:, 0].min()) <= 1.5 and abs(xs.max() + 1 - uv[:, 0].max()) <= 1.5
        assert abs(ys.min() - uv[:, 1].min()) <= 1.5 and abs(ys.max() + 1 - uv[:, 1].max()) <= 1.5
        # z-depth of the visible surface lies within the unit cube's bounding sphere
        d = view.depth[view.mask]
        assert d.min() >= cam.distance - 0.87 and d.max() <= cam.distance + 0.87


def test_view_channels_are_consistent(real_dir: Path, renderer: ViewRenderer):
    asset = load_asset(real_dir / "BoxTextured.glb", LoadConfig())
    cam = make_camera(30, 20, 40, RES)
    view = renderer.render(asset, [cam])[0]
    assert view.rgba.shape == (RES, RES, 4) and view.rgba.dtype == np.uint8
    assert np.array_equal(view.rgba[..., 3] == 255, view.mask)
    assert 0.05 < view.mask.mean() < 0.9
    n = view.normal[view.mask]
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-4)
    assert (view.normal[~view.mask] == 0).all()
    # a box seen from (30 deg, 20 deg) shows three faces: three dominant normal directions
    rounded = {tuple(v) for v in np.round(n[np.abs(n).max(1) > 0.3] * 2) / 2}
    assert len(rounded) >= 3


def test_normals_from_depth_of_a_plane():
    K = np.array([[50.0, 0, 32], [0, 50.0, 32], [0, 0, 1]])
    v, u = np.mgrid[0:64, 0:64].astype(np.float64)
    # plane z = 2 + 0.5 x (camera frame): normal ~ (-0.5, 0, 1) normalized, towards the camera
    x_over_z = (u + 0.5 - 32) / 50
    z = 2.0 / (1 - 0.5 * x_over_z)
    n = normals_from_depth(z.astype(np.float32), K)
    expected = np.array([0.5, 0, -1]) / np.linalg.norm([0.5, 0, -1])
    assert np.allclose(n[5:-5, 5:-5].reshape(-1, 3), expected, atol=1e-3)


def test_white_background_composite():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = compose_background(rgba, "white")
    assert tuple(out[0, 0]) == (10, 20, 30, 255) and tuple(out[1, 1, :3]) == (255, 255, 255)
    assert compose_background(rgba, "transparent") is rgba


def test_render_asset_writes_complete_folder(real_dir: Path, tmp_path: Path, renderer: ViewRenderer):
    cfg = _cfg()
    path = real_dir / "fuze" / "fuze.obj"
    sha = file_sha256(path)
    summary = render_asset(path, sha, {"key": "local:fuze"}, cfg, tmp_path, renderer)
    folder = asset_dir(tmp_path, sha)
    assert read_asset(tmp_path, sha) == json.loads((folder / "asset.json").read_text()) == summary
    for sub in ("rgba", "depth", "normal", "mask"):
        assert sorted(p.name for p in (folder / sub).iterdir()) == [f"{i:03d}.png" for i in range(12)]
    depth = np.asarray(Image.open(folder / "depth" / "000.png"))
    mask = np.asarray(Image.open(folder / "mask" / "000.png")) > 0
    assert depth.dtype == np.uint16 and np.array_equal(depth > 0, mask)
    metres = depth[mask] * summary["depth_scale"]
    cam = summary["cameras"][0]
    assert metres.min() >= cam["distance"] - 0.87 and metres.max() <= cam["distance"] + 0.87
    rgba = Image.open(folder / "rgba" / "000.png")
    assert rgba.mode == "RGBA" and rgba.size == (RES, RES)
    assert summary["pairs"] == [[i, i + 6] for i in range(6)] and summary["key"] == "local:fuze"
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary folder left behind


def test_isolated_renderer_survives_timeout_and_crash(real_dir: Path, tmp_path: Path):
    cfg = _cfg(timeout_s=60)
    duck = real_dir / "Duck.glb"
    sha = file_sha256(duck)
    with IsolatedRenderer(cfg, tmp_path) as iso:
        # a time limit far below the render time kills the child and fails only this asset
        result = iso.run(duck, sha, {}, timeout_s=0.05)
        assert result.status == "failed" and result.reason.startswith("Duck.glb: timeout")
        assert read_asset(tmp_path, sha) is None

        # a segfault in the child (as a broken C extension would cause) fails only this asset
        def crash_soon() -> None:
            for _ in range(200):
                if iso.pid is not None:
                    break
                time.sleep(0.01)
            time.sleep(0.3)
            os.kill(iso.pid, signal.SIGSEGV)

        killer = threading.Thread(target=crash_soon)
        killer.start()
        result = iso.run(duck, sha, {})
        killer.join()
        assert result == Rendered("failed", reason="Duck.glb: render process crashed (SIGSEGV)")

        # the next asset gets a fresh child and succeeds
        result = iso.run(duck, sha, {"key": "duck"})
        assert result.status == "ok" and result.num_pairs == 6
        assert read_asset(tmp_path, sha)["key"] == "duck"
        assert iso.num_restarts == 2


def test_isolated_renderer_reports_bad_assets(bad_dir: Path, tmp_path: Path):
    with IsolatedRenderer(_cfg(), tmp_path) as iso:
        bad = iso.run(bad_dir / "empty_nodes.glb", "0" * 64, {})
        assert bad == Rendered("failed", reason="empty_nodes.glb: no geometry (empty scene)", wall_s=bad.wall_s)
        filtered = iso.run(bad_dir.parent / "real" / "Duck.glb", "1" * 64, {}, timeout_s=60)
        assert filtered.status == "ok"
        assert iso.num_restarts == 0  # asset errors do not cost a new child


def test_osmesa_and_egl_render_the_same_silhouette(real_dir: Path, tmp_path: Path):
    """Both CPU GL back ends work (each in its own child process) and agree."""
    duck = real_dir / "Duck.glb"
    sha = file_sha256(duck)
    masks = {}
    for backend in ("egl", "osmesa"):
        with IsolatedRenderer(_cfg(backend=backend), tmp_path / backend) as iso:
            result = iso.run(duck, sha, {})
        assert result.status == "ok", result
        summary = read_asset(tmp_path / backend, sha)
        assert summary["gl_backend"] == backend
        masks[backend] = np.asarray(Image.open(asset_dir(tmp_path / backend, sha) / "mask" / "003.png")) > 0
    disagree = (masks["egl"] != masks["osmesa"]).mean()
    assert masks["egl"].mean() > 0.05 and disagree < 0.01


_NO_X11 = """
import ctypes, ctypes.util, importlib.abc, os, sys
# a bare GPU node: no X11 client libraries, so pyglet's X11 backend cannot import or load them
class NoX11(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("pyglet.libs.x11", "Xlib")):
            raise ImportError(f"{name}: no X11 on this node")
sys.meta_path.insert(0, NoX11())
find = ctypes.util.find_library
ctypes.util.find_library = lambda name: None if name.startswith(("X", "xkb")) else find(name)
init = ctypes.CDLL.__init__
def cdll(self, name, *args, **kwargs):
    if name and os.path.basename(str(name)).startswith(("libX", "libxkb")):
        raise OSError(f"{name}: no X11 on this node")
    init(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = cdll
"""


def test_renders_headless_without_any_x11_library(tmp_path: Path):
    """Bare GPU nodes have the driver's EGL and no X11: with X11 made absent, a plain
    `import pyrender` fails as it does there (the control), and our renderer still renders."""
    import subprocess
    import sys

    import trimesh

    trimesh.creation.box(extents=(0.6, 0.6, 0.6)).export(tmp_path / "box.glb")
    backend = os.environ.get("PYOPENGL_PLATFORM", "egl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYGLET_HEADLESS", "DISPLAY")}
    control = (
        _NO_X11
        + f"import os; os.environ['PYOPENGL_PLATFORM'] = {backend!r}\nimport numpy; numpy.infty = numpy.inf\nimport pyrender\n"
    )
    res = subprocess.run([sys.executable, "-c", control], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "no X11 on this node" in res.stderr, res.stderr[-2000:]
    ours = (
        _NO_X11
        + f"""
from pathlib import Path
from know3d.rendering.assets import load_asset
from know3d.rendering.camera import make_camera
from know3d.rendering.config import LoadConfig
from know3d.rendering.render import ViewRenderer
renderer = ViewRenderer(48, {backend!r})
view = renderer.render(load_asset(Path({str(tmp_path / "box.glb")!r}), LoadConfig()), [make_camera(30, 20, 40, 48)])[0]
renderer.close()
assert not any("x11" in m.lower() for m in sys.modules), [m for m in sys.modules if "x11" in m.lower()]
print("mask", int(view.mask.sum()), "depth", float(view.depth.max()))
"""
    )
    res = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    pixels = int(res.stdout.split()[1])
    assert 300 < pixels < 48 * 48 and float(res.stdout.split()[3]) > 0  # the box covers part of the view


def test_fast_png_writer_decodes_to_the_same_pixels_as_pillow(real_dir: Path, renderer: ViewRenderer, tmp_path: Path):
    """The views written by the threaded fast writer, fed by the render loop, decode to exactly the
    arrays the former Pillow path wrote (rgba, 16-bit depth, normals, mask)."""
    from know3d.rendering.encode import ViewWriter, encode_png, view_images
    from know3d.rendering.process import view_writer

    cfg = _cfg(encode_threads=3)
    asset = load_asset(real_dir / "Duck.glb", LoadConfig())
    cameras = backview_plan("a" * 64, 0, RES, (30, 60), (-10, 30)).cameras[:4]
    with view_writer(tmp_path / "fast", cfg, 1e-4) as writer:
        assert writer.threads == 3 and writer.encoder == "fast"
        views = renderer.render(asset, cameras, on_view=writer.submit)
    for i, view in enumerate(views):
        for sub, array in view_images(view, 1e-4, cfg.render.outputs, cfg.render.background).items():
            written = np.asarray(Image.open(tmp_path / "fast" / sub / f"{i:03d}.png"))
            legacy = np.asarray(Image.open(io.BytesIO(encode_png(array, "pillow"))))
            assert written.dtype == legacy.dtype and np.array_equal(written, legacy), (i, sub)
    assert sorted(p.name for p in (tmp_path / "fast" / "depth").iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
    ]
    assert Image.open(tmp_path / "fast" / "depth" / "000.png").mode.startswith("I;16")
    # an encoder error surfaces when the writer closes (not lost in a thread)
    broken = views[0]
    broken.rgba = np.zeros((RES, RES, 7), np.uint8)
    with (
        pytest.raises(Exception),
        ViewWriter(tmp_path / "broken", 1e-4, cfg.render.outputs, "transparent", threads=2) as w,
    ):
        w.submit(0, broken)


def test_render_actors_per_node_kind():
    """CPU actors: one CPU, render.backend, no GPU. GPU actors: a GPU share (4 per GPU at 0.25),
    render.gpu_backend, the NVIDIA EGL vendor and headless pyglet in their environment; the
    rendered-pixel fingerprint is the same (the backend is not part of it)."""
    from know3d.pipeline.build import render_actor_setup
    from know3d.rendering.process import render_fingerprint

    cpu_cfg = BuildConfig.model_validate({"render": {"backend": "osmesa"}})
    options, job = render_actor_setup(cpu_cfg)
    assert options["num_cpus"] == 1 and "num_gpus" not in options and "runtime_env" not in options
    assert job.render.backend == "osmesa"
    gpu_cfg = BuildConfig.model_validate(
        {"render": {"backend": "osmesa"}, "ray": {"render_gpus_per_actor": 0.25, "render_cpus_per_actor": 2}}
    )
    options, job = render_actor_setup(gpu_cfg)
    assert options["num_gpus"] == 0.25 and options["num_cpus"] == 2 and job.render.backend == "egl"
    env = options["runtime_env"]["env_vars"]
    assert env["__EGL_VENDOR_LIBRARY_FILENAMES"].endswith("10_nvidia.json") and env["PYGLET_HEADLESS"] == "1"
    assert render_fingerprint(job) == render_fingerprint(cpu_cfg.render_job())
    with pytest.raises(ValueError, match="less than or equal to 1"):
        BuildConfig.model_validate({"ray": {"render_gpus_per_actor": 2}})
