"""Camera math for the render profiles (pure functions, explicit randomness).

Conventions
-----------
* World frame: the asset's own glTF frame, **+Y up**, the asset's front facing **+Z**. After
  normalization the asset's bounding box is centred at the origin and its longest side is 1, so
  it lies in the unit cube [-0.5, 0.5]^3.
* Azimuth 0 looks at the front (camera on +Z), azimuth grows counter-clockwise seen from above
  (camera moves towards +X at 90 degrees). Elevation > 0 looks down from above.
* Extrinsics are **camera-to-world, OpenCV** (x right, y down, z forward). The OpenGL / pyrender
  camera-to-world is ``c2w_cv @ diag(1, -1, -1, 1)``. For Blender (Z-up world, camera looking
  down -Z like OpenGL) use ``R_yup_to_zup @ c2w_gl`` with
  ``R_yup_to_zup = [[1,0,0,0],[0,0,-1,0],[0,1,0,0],[0,0,0,1]]``.
* Intrinsics are pixels: fx = fy = (W/2) / tan(fov/2), principal point at the image centre.
* Camera distance makes the unit cube's bounding sphere (radius sqrt(3)/2) exactly fill the
  vertical field of view: r = (sqrt(3)/2) / sin(fov/2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

UNIT_CUBE_RADIUS = float(np.sqrt(3.0) / 2.0)
CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True, slots=True)
class Camera:
    """One view. ``c2w``: [4, 4] camera-to-world (OpenCV); ``K``: [3, 3] pixel intrinsics."""

    azimuth_deg: float
    elevation_deg: float
    fov_deg: float
    distance: float
    c2w: np.ndarray
    K: np.ndarray
    width: int
    height: int
    perturbed: bool = False

    @property
    def c2w_gl(self) -> np.ndarray:
        return self.c2w @ CV_TO_GL

    def to_json(self) -> dict:
        return {
            "azimuth_deg": self.azimuth_deg,
            "elevation_deg": self.elevation_deg,
            "fov_deg": self.fov_deg,
            "distance": self.distance,
            "c2w_opencv": self.c2w.tolist(),
            "K": self.K.tolist(),
            "width": self.width,
            "height": self.height,
            "perturbed": self.perturbed,
        }


def asset_rng(asset_sha256: str, seed: int, stream: str = "camera") -> np.random.Generator:
    """A generator that depends only on the asset, the run seed and a stream name."""
    digest = hashlib.sha256(f"{asset_sha256}:{seed}:{stream}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def camera_distance(fov_deg: float, radius: float = UNIT_CUBE_RADIUS) -> float:
    return radius / float(np.sin(np.deg2rad(fov_deg) / 2.0))


def intrinsics(fov_deg: float, width: int, height: int) -> np.ndarray:
    focal = (height / 2.0) / float(np.tan(np.deg2rad(fov_deg) / 2.0))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def look_at_c2w(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """OpenCV camera-to-world for a camera on a sphere looking at the origin."""
    az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    eye = distance * np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    forward = -eye / np.linalg.norm(eye)  # +z of the OpenCV camera
    world_up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, world_up)
    if np.linalg.norm(right) < 1e-8:  # looking straight up/down
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def make_camera(
    azimuth_deg: float, elevation_deg: float, fov_deg: float, resolution: int, perturbed: bool = False
) -> Camera:
    distance = camera_distance(fov_deg)
    return Camera(
        azimuth_deg=float(azimuth_deg),
        elevation_deg=float(elevation_deg),
        fov_deg=float(fov_deg),
        distance=distance,
        c2w=look_at_c2w(azimuth_deg, elevation_deg, distance),
        K=intrinsics(fov_deg, resolution, resolution),
        width=resolution,
        height=resolution,
        perturbed=perturbed,
    )


@dataclass(frozen=True, slots=True)
class ViewPlan:
    """The views of one asset and how they pair up: ``pairs[p] = (front_view, back_view)``."""

    cameras: list[Camera]
    pairs: list[tuple[int, int]]
    fov_deg: float
    elevation_deg: float


def backview_plan(
    asset_sha256: str,
    seed: int,
    resolution: int,
    fov_range_deg: tuple[float, float],
    elevation_range_deg: tuple[float, float],
    num_views: int = 12,
) -> ViewPlan:
    """12 azimuths uniformly over 360 deg -> 6 opposite pairs (i, i + 6).

    FoV and elevation are drawn once per asset and shared by all its views.
    """
    if num_views % 2:
        raise ValueError("num_views must be even to form opposite pairs")
    rng = asset_rng(asset_sha256, seed)
    fov = float(rng.uniform(*fov_range_deg))
    elevation = float(rng.uniform(*elevation_range_deg))
    step = 360.0 / num_views
    cameras = [make_camera(i * step, elevation, fov, resolution) for i in range(num_views)]
    half = num_views // 2
    return ViewPlan(cameras, [(i, i + half) for i in range(half)], fov, elevation)


def geometry_plan(
    asset_sha256: str,
    seed: int,
    resolution: int,
    fov_range_deg: tuple[float, float],
    elevation_range_deg: tuple[float, float],
    fov_scale_range: tuple[float, float],
    azimuth_jitter_deg: float,
    elevation_jitter_deg: float,
) -> ViewPlan:
    """8 azimuths every 45 deg -> 4 pairs (i, i + 4), then 4 perturbed pairs.

    Each perturbed view gets its own FoV scale and small azimuth/elevation offsets, so the two
    views of a perturbed pair are only approximately opposite (as in Know3D's perturbed set).
    """
    base = backview_plan(asset_sha256, seed, resolution, fov_range_deg, elevation_range_deg, 8)
    rng = asset_rng(asset_sha256, seed, "perturb")
    cameras = list(base.cameras)
    pairs = list(base.pairs)
    for p in range(4):
        ids = []
        for azimuth in (p * 45.0, p * 45.0 + 180.0):
            fov = float(np.clip(base.fov_deg * rng.uniform(*fov_scale_range), 1.0, 170.0))
            az = azimuth + float(rng.uniform(-azimuth_jitter_deg, azimuth_jitter_deg))
            el = base.elevation_deg + float(rng.uniform(-elevation_jitter_deg, elevation_jitter_deg))
            el = float(np.clip(el, -89.0, 89.0))
            cameras.append(make_camera(az % 360.0, el, fov, resolution, perturbed=True))
            ids.append(len(cameras) - 1)
        pairs.append((ids[0], ids[1]))
    return ViewPlan(cameras, pairs, base.fov_deg, base.elevation_deg)


def project(points: np.ndarray, camera: Camera) -> np.ndarray:
    """World points [N, 3] -> pixel coordinates [N, 2] (OpenCV); used by tests and tools."""
    w2c = np.linalg.inv(camera.c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ camera.K.T
    return uv[:, :2] / uv[:, 2:3]
