"""Headless pyrender rendering of normalized assets.

One :class:`ViewRenderer` per worker process, reused across assets (creating a GL context costs
~0.05-0.1 s). The GL platform (``egl`` or ``osmesa``) must be chosen before PyOpenGL is first
imported, so :func:`configure_gl` runs before the lazy pyrender import; it also makes pyglet
headless, so no X11 library is needed (bare GPU nodes have only the driver and GLVND's EGL).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, MutableSet
from dataclasses import dataclass, field

import numpy as np

from know3d.rendering.assets import LoadedAsset
from know3d.rendering.camera import Camera

_GL_PLATFORM: str | None = None


def configure_gl(backend: str) -> None:
    """Select the PyOpenGL platform once per process (EGL or OSMesa)."""
    global _GL_PLATFORM
    if _GL_PLATFORM is not None and _GL_PLATFORM != backend:
        raise RuntimeError(f"GL platform already set to '{_GL_PLATFORM}' in this process; cannot switch to '{backend}'")
    os.environ["PYOPENGL_PLATFORM"] = backend
    # pyrender imports its viewer, and with it pyglet's X11 window backend, at import time; on a
    # bare GPU node (driver + GLVND EGL, no X11 libraries) that import fails. Headless pyglet
    # needs no X11 and renders nothing itself (pyrender's OffscreenRenderer owns the context).
    os.environ.setdefault("PYGLET_HEADLESS", "1")
    if not hasattr(np, "infty"):  # pyrender 0.1.45 uses np.infty, removed in NumPy 2
        np.infty = np.inf  # type: ignore[attr-defined]
    _GL_PLATFORM = backend


class _InsertionOrderedSet(MutableSet):
    """A set that iterates in insertion order (a dict underneath)."""

    def __init__(self, items: Iterable[object] = ()) -> None:
        self._items = dict.fromkeys(items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[object]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: object) -> None:
        self._items[item] = None

    def discard(self, item: object) -> None:
        self._items.pop(item, None)


_SCENE_NODE_SETS = (
    "_nodes",
    "_mesh_nodes",
    "_point_light_nodes",
    "_spot_light_nodes",
    "_directional_light_nodes",
    "_camera_nodes",
)


def deterministic_scene(scene: object) -> object:
    """Make a pyrender scene draw in the order its nodes were added.

    pyrender keeps nodes in plain ``set``s, which iterate by object address — a different order
    in every process. The draw order decides which of two coplanar surfaces wins the depth test,
    and the light order the rounding of the shading sum, so renders differed by a pixel between
    runs. With ordered sets the same asset gives the same bytes in every run."""
    for name in _SCENE_NODE_SETS:
        current = getattr(scene, name, None)
        if isinstance(current, set):
            setattr(scene, name, _InsertionOrderedSet(current))
    return scene


@dataclass
class View:
    """One rendered view. rgba: [H, W, 4] uint8 (straight alpha); depth: [H, W] float32 z-depth
    in unit-cube units (0 = background); mask: [H, W] bool; K: [3, 3] intrinsics; ``normal``:
    [H, W, 3] float32 unit normals in the OpenCV camera frame (0 = background), computed from the
    depth on first access, so that the render loop leaves that work to the writer's threads."""

    rgba: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    K: np.ndarray
    part_pixels: dict[str, int] | None = None  # visible pixels per part (scene node), if asked
    _normal: np.ndarray | None = field(default=None, repr=False)

    @property
    def normal(self) -> np.ndarray:
        if self._normal is None:
            self._normal = normals_from_depth(self.depth, self.K)
        return self._normal


# Camera-relative three-light rig (directions in the OpenGL camera frame, light shines along -z
# of its own pose): key from upper left, fill from the right, rim from behind/above.
_RIG = (
    ("key", 1.0, (-35.0, 40.0)),
    ("fill", 0.5, (45.0, 10.0)),
    ("rim", 0.6, (170.0, 50.0)),
)


def _rig_pose(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rotation whose -z axis points from the light towards the origin (in camera frame)."""
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    direction_to_light = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    z = direction_to_light / np.linalg.norm(direction_to_light)
    x = np.cross([0.0, 1.0, 0.0], z)
    if np.linalg.norm(x) < 1e-6:
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = x, y, z
    return pose


def light_setup(intensity: float, ambient: float) -> dict:
    """What is recorded with every asset so renders can be reproduced."""
    return {
        "type": "camera-relative directional rig + ambient",
        "ambient": ambient,
        "lights": [{"name": n, "intensity": intensity * w, "yaw_deg": y, "pitch_deg": p} for n, w, (y, p) in _RIG],
    }


def normals_from_depth(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame (OpenCV) unit normals [H, W, 3] from z-depth [H, W]; zero where depth is 0.

    With P(u, v) = z * r, r = ((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1), the cross product
    dP/du x dP/dv is proportional to (-fx z_u, -fy z_v, fx rx z_u + fy ry z_v + z), so only the
    two scalar depth gradients are needed. Gradients are central inside the surface and
    one-sided next to the silhouette, so edges never mix with the background. Work is limited
    to the mask's bounding box.
    """
    h, w = depth.shape
    out = np.zeros((h, w, 3), np.float32)
    valid_full = depth > 0
    rows, cols = np.flatnonzero(valid_full.any(1)), np.flatnonzero(valid_full.any(0))
    if rows.size == 0:
        return out
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, h)
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, w)
    z = np.pad(depth[r0:r1, c0:c1].astype(np.float32), 1)
    valid = z > 0
    core = (slice(1, -1), slice(1, -1))

    def gradient(axis: int) -> np.ndarray:
        if axis == 1:
            nxt, prv = (slice(1, -1), slice(2, None)), (slice(1, -1), slice(None, -2))
        else:
            nxt, prv = (slice(2, None), slice(1, -1)), (slice(None, -2), slice(1, -1))
        ok_n, ok_p = valid[nxt] & valid[core], valid[prv] & valid[core]
        zc = z[core]
        forward = np.where(ok_n, z[nxt] - zc, 0.0)
        backward = np.where(ok_p, zc - z[prv], 0.0)
        both = ok_n & ok_p
        return np.where(both, (forward + backward) * 0.5, forward + backward).astype(np.float32)

    fx, fy = np.float32(K[0, 0]), np.float32(K[1, 1])
    zu, zv = gradient(1), gradient(0)
    v, u = np.ogrid[r0:r1, c0:c1]
    rx = ((u + 0.5 - K[0, 2]) / K[0, 0]).astype(np.float32)
    ry = ((v + 0.5 - K[1, 2]) / K[1, 1]).astype(np.float32)
    zc = z[core]
    n = np.empty(zc.shape + (3,), np.float32)
    n[..., 0] = -fx * zu
    n[..., 1] = -fy * zv
    n[..., 2] = fx * rx * zu + fy * ry * zv + zc
    n /= np.maximum(np.sqrt((n * n).sum(-1, keepdims=True)), np.float32(1e-12))
    facing_away = n[..., 0] * rx + n[..., 1] * ry + n[..., 2] > 0  # r . n > 0
    sign = np.where(facing_away, np.float32(-1.0), np.float32(1.0)) * valid[core]
    n *= sign[..., None]
    out[r0:r1, c0:c1] = n
    return out


class ViewRenderer:
    """Renders :class:`Camera` views of a :class:`LoadedAsset`; reuse one per worker."""

    def __init__(self, resolution: int, backend: str, light_intensity: float = 3.0, ambient: float = 0.3):
        configure_gl(backend)
        import pyrender

        self._pyrender = pyrender
        self.resolution = resolution
        self.backend = backend
        self.light_intensity = light_intensity
        self.ambient = ambient
        self._renderer = pyrender.OffscreenRenderer(resolution, resolution)
        self.last_gl_seconds = 0.0  # GL draw + readback time of the last render() call

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.delete()
            self._renderer = None

    def build_scene(self, asset: LoadedAsset) -> object:
        pyrender = self._pyrender
        scene = deterministic_scene(pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[self.ambient] * 3))
        meshes: dict[str, object] = {}
        graph = asset.scene.graph
        for node_name in sorted(graph.nodes_geometry):
            transform, geometry_name = graph[node_name]
            if geometry_name not in meshes:
                geometry = asset.scene.geometry[geometry_name]
                # pyrender cannot smooth-shade per-face colours
                smooth = getattr(geometry.visual, "kind", None) != "face"
                meshes[geometry_name] = pyrender.Mesh.from_trimesh(geometry, smooth=smooth)
            scene.add(meshes[geometry_name], pose=asset.normalization @ transform, name=node_name)
        return scene

    def _part_pixels(self, scene: object) -> dict[str, int]:
        """Visible pixels per mesh node from a flat-colour segmentation pass (ids in RGB)."""
        pyrender = self._pyrender
        nodes = [n for n in scene.mesh_nodes]
        seg_map = {n: ((i + 1) & 255, ((i + 1) >> 8) & 255, ((i + 1) >> 16) & 255) for i, n in enumerate(nodes)}
        color, _ = self._renderer.render(scene, flags=pyrender.RenderFlags.SEG, seg_node_map=seg_map)
        ids = (
            color[..., 0].astype(np.int64)
            | (color[..., 1].astype(np.int64) << 8)
            | (color[..., 2].astype(np.int64) << 16)
        )
        counts = np.bincount(ids.ravel(), minlength=len(nodes) + 1)
        out: dict[str, int] = {}
        for i, node in enumerate(nodes):
            if counts[i + 1]:
                out[node.name] = out.get(node.name, 0) + int(counts[i + 1])
        return out

    def render(
        self,
        asset: LoadedAsset,
        cameras: list[Camera],
        part_visibility: bool = False,
        on_view: Callable[[int, View], None] | None = None,
    ) -> list[View]:
        """The views of ``cameras``; ``on_view(index, view)`` is called as soon as each is read
        back (several views in flight: the caller's encoder works while GL renders the next)."""
        pyrender = self._pyrender
        scene = self.build_scene(asset)
        cam_node = scene.add(pyrender.IntrinsicsCamera(1.0, 1.0, 0.0, 0.0))
        light_nodes = [
            (
                scene.add(pyrender.DirectionalLight(color=np.ones(3), intensity=self.light_intensity * w)),
                _rig_pose(y, p),
            )
            for _, w, (y, p) in _RIG
        ]
        views = []
        gl_seconds = 0.0
        for cam in cameras:
            if cam.width != self.resolution or cam.height != self.resolution:
                raise ValueError("camera resolution differs from the renderer's")
            cam_node.camera = pyrender.IntrinsicsCamera(
                fx=cam.K[0, 0],
                fy=cam.K[1, 1],
                cx=cam.K[0, 2],
                cy=cam.K[1, 2],
                znear=max(1e-3, cam.distance - 1.0),
                zfar=cam.distance + 1.0,
            )
            pose = cam.c2w_gl
            scene.set_pose(cam_node, pose)
            for node, rig in light_nodes:
                scene.set_pose(node, pose @ rig)
            start = time.perf_counter()
            color, depth = self._renderer.render(scene, flags=pyrender.RenderFlags.RGBA)
            gl_seconds += time.perf_counter() - start
            # pyrender's cx/cy follow OpenGL (origin bottom-left) but its output is top-down;
            # with a centred principal point this is the same image.
            mask = depth > 0
            rgb = color[..., :3]
            alpha = (mask * 255).astype(np.uint8)  # OSMesa ignores RGBA: alpha from depth
            rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
            parts = self._part_pixels(scene) if part_visibility else None
            view = View(rgba, depth.astype(np.float32), mask, np.asarray(cam.K), parts)
            views.append(view)
            if on_view is not None:
                on_view(len(views) - 1, view)  # e.g. the writer encodes it while the next one renders
        self.last_gl_seconds = gl_seconds
        return views
