"""Camera math: conventions, pairing, determinism, pinned values."""

import numpy as np
import pytest

from know3d.rendering.camera import (
    CV_TO_GL,
    UNIT_CUBE_RADIUS,
    backview_plan,
    camera_distance,
    geometry_plan,
    look_at_c2w,
    make_camera,
    project,
)

SHA = "ab" * 32
CUBE = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])


def test_distance_makes_bounding_sphere_fill_the_frame():
    for fov in (20.0, 40.0, 60.0):
        d = camera_distance(fov)
        assert d == pytest.approx(UNIT_CUBE_RADIUS / np.sin(np.deg2rad(fov) / 2))
        cam = make_camera(0.0, 0.0, fov, 256)
        # the tangent from the camera to the sphere lies exactly on the frame's top edge
        half = np.deg2rad(fov) / 2
        tangent_point = np.array([0.0, d * np.sin(half) * np.cos(half), d - d * np.cos(half) ** 2])
        uv = project(tangent_point[None], cam)[0]
        assert uv[1] == pytest.approx(0.0, abs=1e-6)
        assert uv[0] == pytest.approx(128.0, abs=1e-6)


@pytest.mark.parametrize("az, el", [(0, 0), (30, 10), (200, -10), (330, 29)])
def test_c2w_is_opencv_look_at(az: float, el: float):
    cam = make_camera(az, el, 40.0, 128)
    R = cam.c2w[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)
    # the origin projects to the image centre, and the camera sits at the chosen distance
    assert np.allclose(project(np.zeros((1, 3)), cam)[0], [64.0, 64.0])
    assert np.linalg.norm(cam.c2w[:3, 3]) == pytest.approx(cam.distance)
    # world up (+Y) points up in the image (v decreases) — OpenCV's y axis points down
    up = project(np.array([[0.0, 0.3, 0.0]]), cam)[0]
    assert up[1] < 64.0
    # every corner of the unit cube is inside the frame
    uv = project(CUBE, cam)
    assert (uv >= 0).all() and (uv <= 128).all()


def test_front_is_plus_z_and_azimuth_turns_towards_plus_x():
    assert np.allclose(look_at_c2w(0, 0, 2.0)[:3, 3], [0, 0, 2.0])
    assert np.allclose(look_at_c2w(90, 0, 2.0)[:3, 3], [2.0, 0, 0], atol=1e-12)
    cam = make_camera(0, 0, 40, 100)
    # seen from the front, +X is on the right of the image
    assert project(np.array([[0.3, 0, 0]]), cam)[0, 0] > 50


def test_opengl_conversion_flips_y_and_z():
    cam = make_camera(45, 20, 40, 64)
    gl = cam.c2w_gl
    assert np.allclose(gl[:3, 0], cam.c2w[:3, 0])
    assert np.allclose(gl[:3, 1], -cam.c2w[:3, 1])
    assert np.allclose(gl[:3, 2], -cam.c2w[:3, 2])
    assert np.allclose(CV_TO_GL @ CV_TO_GL, np.eye(4))


def test_backview_plan_pairs_opposite_views():
    plan = backview_plan(SHA, 0, 64, (30, 60), (-10, 30))
    assert len(plan.cameras) == 12
    assert plan.pairs == [(i, i + 6) for i in range(6)]
    for f, b in plan.pairs:
        cf, cb = plan.cameras[f], plan.cameras[b]
        assert (cb.azimuth_deg - cf.azimuth_deg) % 360 == pytest.approx(180.0)
        assert cf.fov_deg == cb.fov_deg == plan.fov_deg
        assert cf.elevation_deg == cb.elevation_deg == plan.elevation_deg
    assert [c.azimuth_deg for c in plan.cameras] == pytest.approx([30.0 * i for i in range(12)])
    assert 30 <= plan.fov_deg <= 60 and -10 <= plan.elevation_deg <= 30


def test_plan_is_deterministic_per_asset_and_seed():
    a = backview_plan(SHA, 0, 64, (30, 60), (-10, 30))
    b = backview_plan(SHA, 0, 64, (30, 60), (-10, 30))
    c = backview_plan("cd" * 32, 0, 64, (30, 60), (-10, 30))
    d = backview_plan(SHA, 1, 64, (30, 60), (-10, 30))
    assert (a.fov_deg, a.elevation_deg) == (b.fov_deg, b.elevation_deg)
    assert (a.fov_deg, a.elevation_deg) != (c.fov_deg, c.elevation_deg)
    assert (a.fov_deg, a.elevation_deg) != (d.fov_deg, d.elevation_deg)


def test_pinned_camera_values():
    """Regression: refactors must not change the cameras of existing data sets."""
    plan = backview_plan(SHA, 0, 512, (30, 60), (-10, 30))
    assert plan.fov_deg == pytest.approx(PINNED["fov"], abs=1e-9)
    assert plan.elevation_deg == pytest.approx(PINNED["elevation"], abs=1e-9)
    assert np.allclose(plan.cameras[1].c2w, PINNED["c2w1"], atol=1e-9)
    assert np.allclose(plan.cameras[1].K, PINNED["K"], atol=1e-9)


def test_geometry_plan_has_clean_and_perturbed_pairs():
    plan = geometry_plan(SHA, 0, 64, (30, 60), (-10, 30), (0.8, 1.2), 5.0, 4.0)
    assert len(plan.cameras) == 16 and len(plan.pairs) == 8
    assert [c.azimuth_deg for c in plan.cameras[:8]] == pytest.approx([45.0 * i for i in range(8)])
    assert plan.pairs[:4] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert not any(c.perturbed for c in plan.cameras[:8])
    assert all(c.perturbed for c in plan.cameras[8:])
    for p, (f, b) in enumerate(plan.pairs[4:]):
        cf, cb = plan.cameras[f], plan.cameras[b]
        assert abs(((cf.azimuth_deg - 45.0 * p) + 180) % 360 - 180) <= 5.0
        assert abs(((cb.azimuth_deg - 45.0 * p - 180) + 180) % 360 - 180) <= 5.0
        for c in (cf, cb):
            assert 0.8 * plan.fov_deg - 1e-9 <= c.fov_deg <= 1.2 * plan.fov_deg + 1e-9
            assert abs(c.elevation_deg - plan.elevation_deg) <= 4.0 + 1e-9
            assert c.distance == pytest.approx(camera_distance(c.fov_deg))
    again = geometry_plan(SHA, 0, 64, (30, 60), (-10, 30), (0.8, 1.2), 5.0, 4.0)
    assert [c.fov_deg for c in again.cameras] == [c.fov_deg for c in plan.cameras]


PINNED = {
    "fov": 57.01106839257133,
    "elevation": 14.477456389266408,
    "c2w1": [
        [0.8660254037844387, 0.12499952854386139, -0.48412304000513373, 0.8785090328837616],
        [0.0, -0.9682460800102677, -0.2499990570877228, 0.4536582887310191],
        [-0.49999999999999994, 0.21650553436012407, -0.8385257024035919, 1.521622279862873],
        [0.0, 0.0, 0.0, 1.0],
    ],
    "K": [[471.38476207423946, 0.0, 256.0], [0.0, 471.38476207423946, 256.0], [0.0, 0.0, 1.0]],
}
