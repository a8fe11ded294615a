"""Front-partial guidance (Consistent3DGen, Algorithm 1 and Eq. 8-9) for the generator's two stages.

The visible front of the input view becomes a partial latent for each stage, and the Euler sampler
is pulled towards it on the visible region only, while the back is completed freely (training-free).

Pipeline, with the frame of every array:

1. **Point map** ``points [H, W, 3]`` + ``confidence [H, W]``, pixel-aligned with the input view.
   Points are in the generator's frame: the **Z-up unit cube** [-0.5, 0.5]³ of
   :mod:`know3d.training.generator.occupancy` (glTF ``(x, y, z) -> (x, -z, y)``, i.e.
   ``GLTF_TO_ZUP @ p_gltf``). Sources: ``depth`` (:func:`pointmap_from_depth`: a rendered z-depth and
   its known camera) and ``vggt`` (:mod:`know3d.training.generator.vggt`).
2. **Front sheet** (:func:`pointmap_to_mesh`, Algorithm 1): two triangles per 2x2 block of valid
   pixels, minus the triangles that cross a depth discontinuity. A single-layer open surface.
3. **Thin band** (:func:`band_field`): unsigned distance of the fine grid's voxel centres to the
   sheet, kept below ``band`` and normalized to [-1, 1]; the zero level set is a thin watertight
   shell around the sheet (the paper's Fig. 3).
4. **Into our VAEs** (:func:`encode_front`): our stage-2 shape SC-VAE encodes a flexible dual grid
   built *from a mesh* (not an SDF grid as Direct3D-S2's VAE), so the band's zero level set is
   meshed (:func:`band_shell_mesh`, marching cubes at level 0 on the band field with +1 outside
   the band: closed by construction, exactly the surface the normalized field defines), then
   ``mesh_to_dual_grid`` -> ``ShapeVAE.encode``. The occupancy of that dual grid at the SS-VAE's
   grid (``coarse_occupancy``, TRELLIS.2's own fine-coords -> sparse-structure reduction) is
   encoded by the SS-VAE into the stage-1 dense latent. Both are cut to the **front half**
   (:func:`front_half`) relative to the view direction: :class:`FrontTargets`.
5. **Guided sampling** (:class:`GuidedEulerSampler`, Eq. 8-9) on each stage.

Reading of Eq. 8-9 (the paper writes ``x_{t-1} = x_t - (eps(x_t) + lambda * Delta_t)``)
----------------------------------------------------------------------------------------------
The paper's own plain update (its Eq. 2 and 4) also omits the step size, so its ``t-1`` notation
is "the next step" and the dt is implicit in both terms. We apply our Euler step size to the whole
bracket: ``x_{t_prev} = x_t - (t - t_prev) * (v + lambda * Delta_t)`` with
``Delta_t = M * (x_t - x_fg)`` (``x_fg`` is only defined on the mask; Eq. 8's ``(x_t ⊙ M) - x_fg``
with ``x_fg`` zero outside M is the same thing). The guidance is then an extra velocity
``lambda * M * (x - x_fg)``: integrated from t = 1 to 0 it relaxes the masked entries towards
``x_fg`` at rate ``lambda`` per unit of t (``lambda`` is independent of the step count, which is why
we keep the dt). Explicit Euler on that term is stable for ``lambda * dt < 2`` and monotone for
``lambda * dt <= 1``. Its Delta is taken at x_t, *before* the step, so even lambda -> inf cannot
beat the last step's ``- dt * v`` (the last Euler step lands on the model's own x0 prediction; with
12 steps and ``rescale_t = 5`` that step is dt = 0.31). ``integrator="implicit"`` treats the pull
implicitly (IMEX: the model explicit, the stiff linear pull backward Euler), Delta at the new point
and the reference at ``t_prev``: ``x' = (x - dt v + dt lambda M ref) / (1 + dt lambda M)``; equal to
Euler to first order, stable for every lambda, and lambda -> inf *replaces* the mask by the
reference after every step (with ``target_at_noise_level`` that is replacement inpainting).

``x_fg`` at which noise level? Eq. 8 compares the *noisy* x_t with the *clean* target, which drags
the masked entries off the model's marginal at high t (they become cleaner than t says). The
alternative compares with the target diffused to t along the sampler's own noise ``eps`` (the
``noise`` given to the sampler): ``x_fg(t) = (1 - t) x_fg + (sigma_min + (1 - sigma_min) t) eps``,
which equals ``x_fg`` at t = 0 and is the straight flow-matching path the model was trained on.
``target_at_noise_level`` picks it; the default is **False**, the paper's literal form, so that
the lambda sweep reproduces the paper first (the sweep can compare both).

Starting from the front (the paper's dense stage uses ``x_fg^dense`` as the initial latent):
``start_from_front`` sets the initial x at t = 1 to ``(1 - M) * eps + M * x_fg(start_t)``, the target
diffused to ``start_t`` along ``eps``. ``start_t = 0`` (default) is the paper's literal choice (the
front latent itself, plus ``sigma_min * eps``) on the mask; ``start_t = 1`` gives back pure noise.

Band normalization (paper §3.2.3: "normalize these values to [-1, 1] where the zero-level set
emerges"): with ``d`` the unsigned distance in voxels and ``band`` the kept width,
``value = 2 d / band - 1`` for ``d < band`` — -1 on the sheet, 0 at ``d = band / 2``, -> +1 at the
band's edge; negative is inside the shell (the SDF sign convention). A min-max normalization of the
kept values (the other literal reading) gives the same field up to ``d_min ~ 0`` and
``d_max ~ band``; the fixed form does not depend on which voxels happen to be sampled. The shell
is therefore ``band`` voxels thick, its two faces ``band / 2`` voxels from the sheet.

Bad point maps (wrong shape, NaN everywhere, no valid pixel, no triangle) and bad input files
(missing, unreadable, wrong size, no camera) raise :class:`FrontGuidanceError` naming the input and
the reason. ``know3d generate shape`` stops with that message by default
(``on_bad_front="error"``); with ``on_bad_front="unguided"`` it warns, generates without guidance
and writes the reason to ``shape.json`` (``front_guidance.unguided_reason``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from know3d.core.config import StrictModel
from know3d.training.generator.config import SIGMA_MIN, SamplerConfig
from know3d.training.generator.dual_grid import box_cells
from know3d.training.generator.flow import (
    EulerCfgSampler,
    SampleResult,
    timestep_schedule,
)
from know3d.training.generator.occupancy import GLTF_TO_ZUP

AUTO_JUMP = 4.0  # automatic depth_jump: this many times the point map's median pixel spacing
_PAIR_CHUNK = 1_000_000  # (triangle, voxel) candidate pairs per vectorized pass


class FrontGuidanceError(ValueError):
    """A front-guidance input cannot be used; the message names the input and the reason."""


class FrontGuidanceConfig(StrictModel):
    """Consistent3DGen's front-partial guidance (training-free, on both generator stages)."""

    source: Literal["depth", "vggt"] = Field(
        default="depth",
        description="Point-map source: 'depth' = a rendered z-depth with its known camera; 'vggt' = "
        "facebook/VGGT-1B on the input image (camera known, scale fitted to the unit cube).",
    )
    vggt_model: str = Field(
        default="facebook/VGGT-1B",
        description="VGGT weights: hub id, local folder (from_pretrained), a model.pt / .safetensors file, "
        "or 'debug' (the in-code stand-in).",
    )
    vggt_scale: float | None = Field(
        default=None,
        gt=0,
        description="VGGT's point-map scale to unit-cube units; None = fitted (midpoint of the scales that "
        "keep every confident point inside the unit cube).",
    )
    conf_threshold: float = Field(
        default=0.5,
        ge=0.0,
        description="A pixel is valid when its confidence is > this (and its point finite). 'depth' gives "
        "0/1; VGGT gives 1 + exp(.) >= 1 (zeroed outside the image's alpha), so 0.5 keeps the whole "
        "object and e.g. 2-5 drops VGGT's unsure pixels.",
    )
    depth_jump: float | None = Field(
        default=None,
        gt=0.0,
        description="A triangle is dropped when any of its 3 edges is longer than this (3D Euclidean length "
        "in unit-cube units). None (default): 4 x the point map's median pixel spacing, which fits any "
        "resolution; a fixed value should be a few pixel footprints (about 2.2 * tan(fov / 2) * 2 / pixels: "
        "0.016 at 96 px and 40 deg, 0.003 at 518 px).",
    )
    band: float = Field(
        default=2.0,
        gt=0.0,
        description="Band half-width in voxels of the shape VAE's fine grid: voxels closer than this to the "
        "front sheet are kept; the shell's faces sit band / 2 from the sheet.",
    )
    front_cut: Literal["shell", "grid_centre"] = Field(
        default="shell",
        description="Which half of the encoded band is kept: 'shell' = the voxels on the camera's side of the "
        "front sheet (the shell's front layer, wherever the front lies); 'grid_centre' = the voxels on the "
        "camera's side of the plane through the grid centre.",
    )
    front_margin: float = Field(
        default=0.0,
        description="Front-half cut: keep latent voxels whose centre is at most this far (unit-cube units) "
        "behind the cut (the sheet, or the plane through the grid centre); > 0 keeps more than half.",
    )
    ss_occupancy: Literal["band", "surface"] = Field(
        default="band",
        description="Stage-1 front occupancy: 'band' = the shell's dual-grid coordinates reduced to the SS "
        "grid (the paper: from x_fg's sparse index); 'surface' = the front sheet voxelized at the SS grid.",
    )
    ss_mask_dilation: int = Field(
        default=0, ge=0, description="Grow the stage-1 latent mask M_ss by this many latent cells (3³ max-pool)."
    )
    lam_ss: float = Field(
        default=0.0,
        ge=0.0,
        description="lambda of Eq. 9 on stage 1 (the dense SS latent). The paper only starts its dense "
        "stage from the front latent (start_from_front) and guides the sparse stages.",
    )
    lam_shape: float = Field(default=1.0, ge=0.0, description="lambda of Eq. 9 on stage 2 (the shape latent).")
    start_from_front: bool = Field(
        default=True,
        description="Stage 1 starts at t = 1 from (1 - M) * noise + M * x_fg diffused to start_t (the paper's "
        "dense stage).",
    )
    start_t: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Noise level of the front latent in the initial x: 0 = the latent itself (paper), 1 = noise.",
    )
    target_at_noise_level: bool = Field(
        default=False,
        description="Delta_t against x_fg diffused to t along the sampler's noise instead of the clean x_fg "
        "(the paper's literal Eq. 8).",
    )
    integrator: Literal["euler", "implicit"] = Field(
        default="euler",
        description="'euler': x -= dt * (v + lambda * Delta(x_t)) (Eq. 9 with our dt; stable for lambda * dt < 2); "
        "'implicit': the pull at the new point, x' = (x - dt v + dt lambda M ref) / (1 + dt lambda M) "
        "(stable for any lambda; lambda -> inf replaces the mask by the reference).",
    )
    on_bad_front: Literal["error", "unguided"] = Field(
        default="error",
        description="A front input that cannot be used (no camera or depth file, a point map with no valid "
        "pixel, no front half): 'error' stops with the file and the reason; 'unguided' warns, runs "
        "without guidance and records the reason in shape.json.",
    )
    union_coords: bool = Field(
        default=True,
        description="Stage 2 samples on the union of stage 1's structure and x_fg's coordinates (the paper).",
    )


# --------------------------------------------------------------------------- frames


def _as_zup(points_gltf: np.ndarray) -> np.ndarray:
    return points_gltf @ GLTF_TO_ZUP.T


def camera_center(camera) -> np.ndarray:
    """The camera's centre [3] in the Z-up unit-cube frame."""
    return _as_zup(np.asarray(camera.c2w, dtype=np.float64)[:3, 3])


def camera_view_dir(camera) -> np.ndarray:
    """The unit direction [3] the camera looks along (its OpenCV +z, from the camera into the scene),
    in the Z-up unit-cube frame."""
    forward = _as_zup(np.asarray(camera.c2w, dtype=np.float64)[:3, 2])
    return forward / np.linalg.norm(forward)


def pixel_rays(K: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-frame (OpenCV) rays ``[H, W, 3]`` with z = 1 through the pixel centres:
    ``K^-1 [u + 0.5, v + 0.5, 1]`` for row v, column u (the renderer's and
    :func:`know3d.rendering.camera.project`'s convention: pixel u covers [u, u + 1))."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], axis=-1)
    return pix @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T


def backproject(z: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Z-depth ``[H, W]`` (OpenCV camera z, unit-cube units) -> points ``[H, W, 3]`` in the Z-up unit
    cube: ``p_cam = z * pixel_rays(K)``, ``p_gltf = c2w p_cam`` (camera-to-world, OpenCV, into the
    glTF Y-up world), then ``GLTF_TO_ZUP``."""
    z = np.asarray(z, dtype=np.float64)
    cam = pixel_rays(K, *z.shape) * z[..., None]
    c2w = np.asarray(c2w, dtype=np.float64)
    return _as_zup(cam @ c2w[:3, :3].T + c2w[:3, 3])


def pointmap_from_depth(depth: np.ndarray, camera) -> tuple[np.ndarray, np.ndarray]:
    """The ``depth`` source: a rendered view's z-depth ``[H, W]`` (float, unit-cube units, 0 =
    background, :class:`know3d.rendering.render.View`) and its :class:`~know3d.rendering.camera.Camera`
    -> ``(points [H, W, 3] float64 in the Z-up unit cube, confidence [H, W] float32)``, confidence 1
    where ``depth > 0`` (and finite), else 0 (those points are NaN)."""
    depth = np.asarray(depth)
    if depth.ndim != 2 or min(depth.shape) < 2:
        raise FrontGuidanceError(f"depth map: expected [H, W] with H, W >= 2, got shape {depth.shape}")
    if depth.shape != (camera.height, camera.width):
        raise FrontGuidanceError(
            f"depth map: shape {depth.shape} does not match the camera's {camera.height} x {camera.width} pixels"
        )
    depth = depth.astype(np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise FrontGuidanceError("depth map: no pixel with a finite depth > 0 (empty view)")
    points = backproject(np.where(valid, depth, np.nan), camera.K, camera.c2w)
    return points, valid.astype(np.float32)


# --------------------------------------------------------------------------- input files

MAX_DEPTH_PIXELS = 4096 * 4096  # decoding bound of a depth map file


@dataclass
class FrontView:
    """The known camera of the input front view, and its z-depth when the source is ``depth``
    (``[H, W]`` float64, unit-cube units, 0 = background)."""

    camera: Any
    depth: np.ndarray | None = None
    depth_file: str | None = None
    camera_file: str | None = None


def camera_from_json(data: dict, where: str = "camera") -> Any:
    """A :class:`know3d.rendering.camera.Camera` from its JSON (``c2w_opencv`` [4, 4], ``K`` [3, 3],
    ``width``, ``height``; the angles are optional). Wrong fields raise :class:`FrontGuidanceError`
    naming ``where``."""
    from know3d.rendering.camera import Camera

    try:
        c2w = np.asarray(data["c2w_opencv"], dtype=np.float64)
        K = np.asarray(data["K"], dtype=np.float64)
        width, height = int(data["width"]), int(data["height"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FrontGuidanceError(
            f"{where}: not a camera (needs c2w_opencv [4x4], K [3x3], width, height): {exc!r}"
        ) from None
    if c2w.shape != (4, 4) or K.shape != (3, 3) or not (np.isfinite(c2w).all() and np.isfinite(K).all()):
        raise FrontGuidanceError(f"{where}: c2w_opencv must be a finite 4x4 and K a finite 3x3 matrix")
    if not (0 < width <= 16384 and 0 < height <= 16384) or abs(np.linalg.det(c2w[:3, :3]) - 1) > 1e-3:
        raise FrontGuidanceError(f"{where}: implausible camera (size {width} x {height}, rotation det != 1)")
    return Camera(
        azimuth_deg=float(data.get("azimuth_deg", float("nan"))),
        elevation_deg=float(data.get("elevation_deg", float("nan"))),
        fov_deg=float(data.get("fov_deg", float("nan"))),
        distance=float(np.linalg.norm(c2w[:3, 3])),
        c2w=c2w,
        K=K,
        width=width,
        height=height,
    )


def read_camera_file(path, view: int | None = None) -> tuple[Any, float | None]:
    """``(camera, depth_scale or None)`` from a JSON file in any of the layouts our data writes:
    a camera (:meth:`Camera.to_json`, optionally with ``depth_scale``), a shard sample's ``.json``
    (``front_camera``), or a render's ``asset.json`` (``cameras[view]``)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FrontGuidanceError(f"{path}: no such camera file")
    if path.stat().st_size > 16 * 2**20:
        raise FrontGuidanceError(f"{path}: larger than 16 MiB, not a camera file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrontGuidanceError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FrontGuidanceError(f"{path}: expected a JSON object")
    scale = data.get("depth_scale")
    if "cameras" in data:
        cameras = data["cameras"]
        if view is None:
            raise FrontGuidanceError(f"{path}: holds {len(cameras)} cameras; say which view (--front-view N)")
        if not 0 <= view < len(cameras):
            raise FrontGuidanceError(f"{path}: no view {view} (it holds {len(cameras)} cameras)")
        data = cameras[view]
    elif "front_camera" in data:
        data = data["front_camera"]
    return camera_from_json(data, str(path)), (None if scale is None else float(scale))


def read_depth_file(path, depth_scale: float | None) -> np.ndarray:
    """A z-depth map file -> ``[H, W]`` float64 in unit-cube units: a 16-bit PNG as the renderer
    writes it (``value * depth_scale``, 0 = background; needs ``depth_scale``) or a float ``.npy``
    (``allow_pickle=False``). Decoding is bounded (:data:`MAX_DEPTH_PIXELS`)."""
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FrontGuidanceError(f"{path}: no such depth map")
    if path.suffix.lower() == ".npy":
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only, until read
            if mapped.size > MAX_DEPTH_PIXELS:
                raise FrontGuidanceError(f"{path}: {mapped.shape} is larger than {MAX_DEPTH_PIXELS} pixels")
            depth = np.array(mapped)
        except (ValueError, OSError) as exc:
            if isinstance(exc, FrontGuidanceError):
                raise
            raise FrontGuidanceError(f"{path}: not a readable .npy depth map ({exc})") from None
        if not np.issubdtype(depth.dtype, np.number):
            raise FrontGuidanceError(f"{path}: depth must be numeric, got {depth.dtype}")
        return depth.astype(np.float64)
    if depth_scale is None or not depth_scale > 0:
        raise FrontGuidanceError(f"{path}: a PNG depth map needs its depth_scale (from the camera JSON)")
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_DEPTH_PIXELS:
                raise FrontGuidanceError(f"{path}: {img.width}x{img.height} is larger than {MAX_DEPTH_PIXELS} pixels")
            if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
                raise FrontGuidanceError(f"{path}: expected a 16-bit greyscale depth PNG, got mode {img.mode}")
            raw = np.asarray(img).astype(np.float64)
    except (OSError, Image.DecompressionBombError) as exc:
        raise FrontGuidanceError(f"{path}: not a readable image ({exc})") from None
    return raw * float(depth_scale)


def rendered_view_files(image) -> tuple[Any, Any, int] | None:
    """``(asset.json, depth/NNN.png, NNN)`` when ``image`` is a rendered view ``<asset>/rgba/NNN.png``
    of our renderer and both files exist (inside the same asset folder), else None."""
    from pathlib import Path

    image = Path(image)
    if image.parent.name != "rgba" or not image.stem.isdigit():
        return None
    folder = image.parent.parent
    meta, depth = folder / "asset.json", folder / "depth" / f"{image.stem}.png"
    return (meta, depth, int(image.stem)) if meta.is_file() and depth.is_file() else None


def read_front_view(image, source: str, depth=None, camera=None, view: int | None = None) -> FrontView:
    """The camera (and, for ``source="depth"``, the z-depth) of the front view ``image``.

    ``camera``: a JSON file (:func:`read_camera_file`); ``depth``: a depth file
    (:func:`read_depth_file`). Both default to the render's own files when ``image`` is
    ``<asset>/rgba/NNN.png`` (:func:`rendered_view_files`: ``asset.json`` camera NNN and
    ``depth/NNN.png``). The depth must have the camera's pixel size."""
    found = rendered_view_files(image) if camera is None or (source == "depth" and depth is None) else None
    if camera is None:
        if found is None:
            raise FrontGuidanceError(
                f"{image}: front guidance needs the view's camera (--front-camera FILE.json; found automatically "
                "only for rendered views <asset>/rgba/NNN.png)"
            )
        camera, view = found[0], found[2] if view is None else view
    cam, scale = read_camera_file(camera, view)
    result = FrontView(camera=cam, camera_file=str(camera))
    if source == "depth":
        if depth is None:
            if found is None:
                raise FrontGuidanceError(
                    f"{image}: front guidance 'depth' needs the view's depth map (--front-depth FILE)"
                )
            depth = found[1]
        z = read_depth_file(depth, scale)
        if z.shape != (cam.height, cam.width):
            raise FrontGuidanceError(
                f"{depth}: depth map is {z.shape[1]} x {z.shape[0]} pixels, its camera {cam.width} x {cam.height}"
            )
        result.depth, result.depth_file = z, str(depth)
    return result


# --------------------------------------------------------------------------- Algorithm 1


def _check_pointmap(points: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = np.asarray(points)
    confidence = np.asarray(confidence)
    if points.ndim != 3 or points.shape[2] != 3 or points.shape[0] < 2 or points.shape[1] < 2:
        raise FrontGuidanceError(f"point map: expected points [H, W, 3] with H, W >= 2, got shape {points.shape}")
    if confidence.shape != points.shape[:2]:
        raise FrontGuidanceError(
            f"point map: confidence must be [H, W] = {list(points.shape[:2])}, got shape {confidence.shape}"
        )
    if not (np.issubdtype(points.dtype, np.number) and np.issubdtype(confidence.dtype, np.number)):
        raise FrontGuidanceError(
            f"point map: points / confidence must be numeric, got {points.dtype}, {confidence.dtype}"
        )
    return points.astype(np.float64), confidence.astype(np.float64)


def valid_pixels(points: np.ndarray, confidence: np.ndarray, conf_threshold: float) -> np.ndarray:
    """Algorithm 1's validity mask ``[H, W]`` bool: confidence > threshold and a finite point
    (a NaN confidence is invalid). Raises :class:`FrontGuidanceError` when nothing is valid."""
    points, confidence = _check_pointmap(points, confidence)
    finite = np.isfinite(points).all(axis=2)
    if not finite.any():
        raise FrontGuidanceError("point map: no finite point (NaN / inf everywhere)")
    with np.errstate(invalid="ignore"):
        confident = np.nan_to_num(confidence, nan=-np.inf) > conf_threshold
    valid = finite & confident
    if not valid.any():
        best = float(np.nanmax(confidence)) if np.isfinite(confidence).any() else float("nan")
        raise FrontGuidanceError(
            f"point map: no valid pixel (no finite point has confidence > {conf_threshold}; highest confidence {best:.4g})"
        )
    return valid


def pointmap_to_mesh(
    points: np.ndarray,
    confidence: np.ndarray,
    conf_threshold: float = 0.5,
    depth_jump: float | None = 0.05,
    compact: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1: the front sheet of a point map ``[H, W, 3]`` (any frame; the mesh is in it).

    * A pixel is **valid** when ``confidence > conf_threshold`` and its point is finite.
    * For every 2x2 block of valid pixels, in row-major order of its top-left pixel ``(i, j)``
      (the algorithm's loop), with ``p1 = i W + j`` (top left), ``p2 = p1 + 1`` (top right),
      ``p3 = p1 + W`` (bottom left), ``p4 = p3 + 1`` (bottom right): the triangles
      ``[p1, p3, p2]`` then ``[p2, p3, p4]``. The paper's split (diagonal p2-p3, same vertex sets);
      its first triangle is listed ``[p1, p2, p3]``, which winds opposite to its second, so we list
      it ``[p1, p3, p2]``: both wind counter-clockwise seen from the camera (normals towards it).
    * **Depth jump**: a triangle is dropped when the 3D Euclidean length of any of its three edges
      (``|p_a - p_b|`` in the point map's units, unit-cube units for our sources) is
      ``> depth_jump``; the other triangle of its block may stay. ``depth_jump=None``: automatic,
      :data:`AUTO_JUMP` times the median over the candidate triangles of their shortest edge (the
      point map's pixel spacing on the surface), so one setting fits every resolution.

    Returns ``(vertices [V, 3] float64, faces [F, 3] int64)``. With ``compact`` (default) only the
    pixels used by a face are kept, in increasing pixel order, and faces index them; with
    ``compact=False`` vertices are all ``H * W`` pixels (NaN where invalid) and faces are the pixel
    indices of Algorithm 1. Raises :class:`FrontGuidanceError` for a malformed / empty map or when
    no triangle survives.
    """
    valid = valid_pixels(points, confidence, conf_threshold)
    points = np.asarray(points, dtype=np.float64)
    h, w = valid.shape
    block = valid[:-1, :-1] & valid[:-1, 1:] & valid[1:, :-1] & valid[1:, 1:]
    i, j = np.nonzero(block)  # row-major: Algorithm 1's loop order
    if len(i) == 0:
        raise FrontGuidanceError(
            f"point map: no 2x2 block of valid pixels ({int(valid.sum())} valid pixels, none with 3 valid neighbours)"
        )
    p1 = i * w + j
    p2, p3 = p1 + 1, p1 + w
    p4 = p3 + 1
    faces = np.stack([np.stack([p1, p3, p2], 1), np.stack([p2, p3, p4], 1)], axis=1).reshape(-1, 3)
    flat = points.reshape(-1, 3)
    tri = flat[faces]  # [F, 3, 3]
    edges = np.linalg.norm(tri - tri[:, [1, 2, 0]], axis=2)  # |p0-p1|, |p1-p2|, |p2-p0|
    if depth_jump is None:
        depth_jump = AUTO_JUMP * float(np.median(edges.min(axis=1)))
    faces = faces[edges.max(axis=1) <= depth_jump]
    if len(faces) == 0:
        raise FrontGuidanceError(
            f"point map: every triangle has an edge longer than depth_jump = {depth_jump} "
            f"(shortest longest-edge {float(edges.max(axis=1).min()):.4g}); raise depth_jump (or None: automatic)"
        )
    faces = faces.astype(np.int64)
    if not compact:
        vertices = np.where(valid.reshape(-1, 1), flat, np.nan)
        return vertices, faces
    used, inverse = np.unique(faces, return_inverse=True)
    return flat[used].copy(), inverse.reshape(-1, 3).astype(np.int64)


# --------------------------------------------------------------------------- distances


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    den = np.einsum("nk,nk->n", ab, ab)
    t = np.einsum("nk,nk->n", p - a, ab) / np.where(den > 0, den, 1.0)
    t = np.clip(np.where(den > 0, t, 0.0), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


def point_triangle_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Euclidean distance ``[N]`` of points ``p [N, 3]`` to triangles ``(a, b, c)`` (each ``[N, 3]``):
    the distance to the plane when the point projects inside the triangle, else to the nearest edge
    (degenerate triangles: edges only)."""
    n = np.cross(b - a, c - a)
    nn = np.einsum("nk,nk->n", n, n)
    ok = nn > 1e-24
    safe = np.where(ok, nn, 1.0)
    h = np.einsum("nk,nk->n", p - a, n) / safe
    q = p - h[:, None] * n  # projection onto the plane
    inside = ok.copy()
    for u, v in ((a, b), (b, c), (c, a)):
        inside &= np.einsum("nk,nk->n", np.cross(v - u, q - u), n) >= 0
    plane = np.abs(h) * np.sqrt(safe)
    edges = np.minimum(np.minimum(_segment_distance(p, a, b), _segment_distance(p, b, c)), _segment_distance(p, c, a))
    return np.where(inside, plane, edges)


def _check_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise FrontGuidanceError(
            f"front mesh: expected vertices [V, 3] and a non-empty faces [F, 3], got {vertices.shape}, {faces.shape}"
        )
    if not np.issubdtype(faces.dtype, np.integer) or faces.min() < 0 or faces.max() >= len(vertices):
        raise FrontGuidanceError(f"front mesh: face indices must be integers in [0, {len(vertices)})")
    if not np.isfinite(vertices[np.unique(faces)]).all():
        raise FrontGuidanceError("front mesh: a face uses a NaN / inf vertex")
    return vertices, faces.astype(np.int64)


def band_field(
    vertices: np.ndarray, faces: np.ndarray, resolution: int, band: float = 2.0
) -> tuple[np.ndarray, np.ndarray]:
    """The thin band around a surface on the ``resolution``³ grid (paper §3.2.3, Fig. 3).

    ``vertices [V, 3]`` are in the Z-up unit cube; voxel ``[i, j, k]`` has its centre at
    ``(index + 0.5) / R - 0.5`` (:mod:`.occupancy`'s convention). ``d`` is the unsigned Euclidean
    distance of the voxel centre to the nearest triangle, in **voxels** (grid units, 1 = 1 / R of
    the cube). Kept: the voxels with ``d < band``; value ``2 d / band - 1`` in [-1, 1): -1 on the
    surface, 0 at ``d = band / 2`` (the zero level set: a closed shell around the sheet, negative
    inside), -> +1 at the band's edge. Returns ``(coords [N, 3] int64 in C order, values [N]
    float32)``. Vertices outside the cube are allowed (only voxels inside the grid are kept).
    """
    vertices, faces = _check_mesh(vertices, faces)
    res = int(resolution)
    if res != resolution or res < 2:
        raise FrontGuidanceError(f"band field: resolution must be an integer >= 2, got {resolution!r}")
    if not band > 0:
        raise FrontGuidanceError(f"band field: band must be > 0 voxels, got {band}")
    g = (vertices + 0.5) * res - 0.5  # grid units: voxel centre i at i
    tri = g[faces]  # [T, 3, 3]
    lo = np.clip(np.ceil(tri.min(1) - band), 0, res - 1).astype(np.int64)
    hi = np.clip(np.floor(tri.max(1) + band), 0, res - 1).astype(np.int64)
    # skip triangles whose expanded box misses the grid entirely
    inside = (tri.max(1) + band >= 0).all(1) & (tri.min(1) - band <= res - 1).all(1)
    hi = np.where(inside[:, None], hi, lo - 1)
    keys = np.zeros(0, np.int64)
    dist = np.zeros(0, np.float64)
    for owner, cell in box_cells(lo, hi, _PAIR_CHUNK):
        t = tri[owner]
        d = point_triangle_distance(cell.astype(np.float64), t[:, 0], t[:, 1], t[:, 2])
        near = d < band
        k = (cell[near, 0] * res + cell[near, 1]) * res + cell[near, 2]
        keys, dist = _min_by_key(np.concatenate([keys, k]), np.concatenate([dist, d[near]]))
    coords = np.stack([keys // (res * res), keys // res % res, keys % res], axis=1).astype(np.int64)
    values = (2.0 * dist / band - 1.0).astype(np.float32)
    return coords, values


def _min_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key (sorted ascending) the smallest value."""
    if len(keys) == 0:
        return keys, values
    order = np.lexsort((values, keys))
    keys, values = keys[order], values[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], values[first]


def band_shell_mesh(coords: np.ndarray, values: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The zero level set of a band field as a closed triangle mesh in the Z-up unit cube.

    Marching cubes (scikit-image, Lewiner) at level 0 on the field sampled at the voxel centres,
    +1 everywhere outside the band (and on a one-voxel padding), so the surface is closed; vertices
    ``(grid + 0.5) / R - 0.5``, faces oriented outwards (positive signed volume). Why marching
    cubes: our shape SC-VAE encodes a flexible dual grid made from a mesh, so the band has to
    become the surface it defines, and the level-0 isosurface of the normalized field is exactly
    the paper's "thin watertight mesh" (no other parameter). Returns ``(vertices [V, 3] float64,
    faces [F, 3] int64)``.
    """
    from skimage.measure import marching_cubes

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if len(coords) != len(values):
        raise FrontGuidanceError(f"band: {len(coords)} coords but {len(values)} values")
    if len(coords) == 0 or not (values < 0).any():
        raise FrontGuidanceError(
            "band: no voxel inside the shell (no value < 0); the surface is empty or band too thin"
        )
    lo = coords.min(0) - 1  # one voxel of +1 padding around the band's box
    size = coords.max(0) - lo + 2
    grid = np.ones(tuple(size), dtype=np.float32)
    local = coords - lo
    grid[local[:, 0], local[:, 1], local[:, 2]] = values
    verts, faces, _, _ = marching_cubes(grid, 0.0)
    verts = (verts.astype(np.float64) + lo + 0.5) / resolution - 0.5
    faces = faces.astype(np.int64)
    tri = verts[faces]
    volume = np.einsum("nk,nk->n", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    if volume < 0:
        faces = faces[:, ::-1].copy()
    return np.clip(verts, -0.5, 0.5), faces


# --------------------------------------------------------------------------- front half and targets


def front_half(
    coords: np.ndarray,
    resolution: int,
    view_dir: np.ndarray,
    center: np.ndarray | None = None,
    margin: float = 0.0,
) -> np.ndarray:
    """Mask ``[N]`` bool of the voxels ``coords [N, 3]`` (at ``resolution``, Z-up index convention)
    on the camera's side of the plane through ``center`` perpendicular to ``view_dir``.

    ``view_dir [3]``: the direction the camera looks (into the scene), Z-up frame
    (:func:`camera_view_dir`). ``center`` defaults to the **grid centre** (the unit cube's origin),
    which is the object's bounding-box centre in our normalization (renderer and targets alike);
    pass the object's own centre when it is known otherwise. A voxel is kept when its centre
    ``p = (index + 0.5) / R - 0.5`` satisfies ``(p - center) . (-view_dir) >= -margin``.
    """
    coords = np.asarray(coords).reshape(-1, 3)
    v = np.asarray(view_dir, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise FrontGuidanceError(f"front half: view_dir must be a finite non-zero 3-vector, got {view_dir!r}")
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64).reshape(3)
    p = (coords.astype(np.float64) + 0.5) / resolution - 0.5
    return (p - c) @ (-v / norm) >= -margin


def shell_front(
    coords: np.ndarray,
    resolution: int,
    view_dir: np.ndarray,
    sheet: np.ndarray,
    margin: float = 0.0,
) -> np.ndarray:
    """Mask ``[N]`` bool of the voxels ``coords [N, 3]`` (at ``resolution``) on the camera's side of
    the front sheet itself: a voxel centre ``p`` is kept when ``(p - q) . (-view_dir) >= -margin``,
    ``q`` the nearest of the sheet's points ``sheet [V, 3]`` (its vertices, pixel-dense). This cuts
    the thick band shell's rear half wherever the front lies, the paper's reading ("retain only the
    front surface of this mesh ... the front half of the mesh", §3.2.3), where :func:`front_half`'s
    fixed plane also cuts visible surface behind the grid centre (a flat face at the centre, the
    inside of a cup seen from above)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords).reshape(-1, 3)
    v = np.asarray(view_dir, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise FrontGuidanceError(f"front half: view_dir must be a finite non-zero 3-vector, got {view_dir!r}")
    sheet = np.asarray(sheet, dtype=np.float64).reshape(-1, 3)
    if not len(sheet) or not np.isfinite(sheet).all():
        raise FrontGuidanceError("front half: the sheet needs finite points")
    p = (coords.astype(np.float64) + 0.5) / resolution - 0.5
    _, nearest = cKDTree(sheet).query(p)
    return (p - sheet[nearest]) @ (-v / norm) >= -margin


def map_front_latent(
    front_coords: np.ndarray, front_feats: torch.Tensor, coords: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage-2 target on the coordinates stage 1 produced: ``(x_fg [N, C], mask [N] bool)``.

    ``coords [N, 3]`` and ``front_coords [M, 3]`` are shape-latent indices at the same resolution;
    a coordinate that is one of ``front_coords`` gets that latent (mask True), every other one zeros
    (mask False, unguided)."""
    coords = torch.as_tensor(coords).long().reshape(-1, 3).cpu().numpy()
    front_coords = np.asarray(front_coords, dtype=np.int64).reshape(-1, 3)
    feats = torch.as_tensor(front_feats, dtype=torch.float32).cpu()
    if len(front_coords) != len(feats):
        raise FrontGuidanceError(f"front latent: {len(front_coords)} coords but {len(feats)} feature rows")
    span = int(max(coords.max(initial=0), front_coords.max(initial=0))) + 1
    key = lambda c: (c[:, 0] * span + c[:, 1]) * span + c[:, 2]
    fkeys = key(front_coords)
    order = np.argsort(fkeys, kind="stable")
    sorted_keys = fkeys[order]
    qkeys = key(coords)
    pos = np.minimum(np.searchsorted(sorted_keys, qkeys), max(len(sorted_keys) - 1, 0))
    hit = (sorted_keys[pos] == qkeys) if len(sorted_keys) else np.zeros(len(coords), bool)
    target = torch.zeros(len(coords), feats.shape[1] if feats.ndim == 2 else 0)
    mask = torch.from_numpy(hit)
    if hit.any():
        target[mask] = feats[torch.from_numpy(order[pos[hit]])]
    return target, mask


def union_coords(coords: np.ndarray, front_coords: np.ndarray) -> np.ndarray:
    """The paper's stage-2 index: the union of stage 1's structure and x_fg's coordinates, ``[N, 3]``
    int64 in C order (sorted, unique)."""
    both = np.concatenate([np.asarray(coords).reshape(-1, 3), np.asarray(front_coords).reshape(-1, 3)]).astype(np.int64)
    return np.unique(both, axis=0)


@dataclass
class FrontTargets:
    """The front-partial latents of both stages (Z-up index convention everywhere).

    * ``x_fg_ss [C, r, r, r]``: SS-VAE posterior mean of the front occupancy (un-normalized, as
      stage 1's training targets); ``M_ss [1, r, r, r]`` float 0/1: the latent cells holding front
      occupancy (any-pooled from the SS grid, optionally dilated); broadcasts against ``[C, r, r, r]``.
    * ``shape_coords [M, 3]``, ``shape_feats [M, C]``: the front half of the shape SC-VAE latent of
      the band shell (normalized features, as stage 2's targets), at ``shape_resolution``.
    * ``ss_occupancy [R_ss]³`` bool: the front occupancy the SS-VAE encoded.
    """

    x_fg_ss: torch.Tensor
    M_ss: torch.Tensor
    shape_coords: np.ndarray
    shape_feats: torch.Tensor
    shape_resolution: int
    ss_occupancy: np.ndarray
    view_dir: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def ss_guidance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target [1, C, r, r, r], mask [1, 1, r, r, r])`` for :class:`GuidedEulerSampler` on stage 1."""
        return self.x_fg_ss[None], self.M_ss[None]

    def shape_on(self, coords: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_fg_shape [N, C], mask [N] bool)`` on stage 1's shape-latent coordinates ``[N, 3]``."""
        return map_front_latent(self.shape_coords, self.shape_feats, coords)

    def shape_guidance(self, coords: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target [1, N, C], mask [1, N, 1])`` for the sampler on :class:`~.flow.SparseSample`'s batch of one."""
        target, mask = self.shape_on(coords)
        return target[None], mask.float()[None, :, None]


def _pool_mask(occupancy: np.ndarray, latent: int, dilation: int) -> torch.Tensor:
    r = occupancy.shape[0]
    if r % latent:
        raise FrontGuidanceError(f"SS grid {r}³ is not a multiple of its latent grid {latent}³")
    f = r // latent
    cells = occupancy.reshape(latent, f, latent, f, latent, f).any(axis=(1, 3, 5))
    mask = torch.from_numpy(cells.astype(np.float32))[None]  # [1, r, r, r]
    if dilation:
        mask = torch.nn.functional.max_pool3d(mask[None], 2 * dilation + 1, stride=1, padding=dilation)[0]
    return mask


@torch.no_grad()
def encode_front(
    vertices: np.ndarray,
    faces: np.ndarray,
    view_dir: np.ndarray,
    shape_vae,
    ss_vae,
    cfg: FrontGuidanceConfig | None = None,
) -> FrontTargets:
    """The front sheet (Z-up unit cube) -> :class:`FrontTargets` with our two VAEs.

    ``shape_vae``: a :class:`~.shape_vae.ShapeVAE` with an encoder (fine grid ``R_f =
    shape_vae.resolution``); ``ss_vae``: an :class:`~.ss_vae.SSVae` or its encoder (grid ``R_ss =
    encoder.cfg.resolution``, ``R_f`` a multiple of it). Steps: :func:`band_field` at ``R_f`` ->
    :func:`band_shell_mesh` -> ``mesh_to_dual_grid(R_f)`` -> ``shape_vae.encode`` -> front half of
    the latent coordinates; the dual grid's coordinates reduced to ``R_ss`` (``cfg.ss_occupancy =
    "band"``; ``"surface"``: the sheet voxelized at ``R_ss``) -> front half -> SS encoder.
    """
    from know3d.training.generator.dual_grid import coarse_occupancy, mesh_to_dual_grid
    from know3d.training.generator.occupancy import occupancy_from_mesh

    cfg = cfg or FrontGuidanceConfig()
    encoder = getattr(ss_vae, "encoder", ss_vae)
    r_f, r_ss = int(shape_vae.resolution), int(encoder.cfg.resolution)
    if r_f % r_ss:
        raise FrontGuidanceError(f"shape VAE grid {r_f}³ is not a multiple of the SS-VAE grid {r_ss}³")
    coords, values = band_field(vertices, faces, r_f, cfg.band)
    shell_v, shell_f = band_shell_mesh(coords, values, r_f)
    try:
        grid = mesh_to_dual_grid(shell_v, shell_f, r_f)
    except ValueError as exc:
        raise FrontGuidanceError(f"band shell: no dual grid ({exc})") from None
    lat_coords, lat_feats = shape_vae.encode(grid)
    r_lat = int(shape_vae.latent_resolution)

    def cut(coords: np.ndarray, resolution: int) -> np.ndarray:
        if cfg.front_cut == "shell":
            return shell_front(coords, resolution, view_dir, vertices, margin=cfg.front_margin)
        return front_half(coords, resolution, view_dir, margin=cfg.front_margin)

    keep = cut(lat_coords, r_lat)
    if cfg.ss_occupancy == "band":
        occ = coarse_occupancy(grid.coords, r_f, r_ss)
    else:
        occ = occupancy_from_mesh(np.clip(vertices, -0.5, 0.5), faces, r_ss).grid
    idx = np.argwhere(occ)
    front = cut(idx, r_ss)
    occ = np.zeros_like(occ)
    occ[tuple(idx[front].T)] = True
    if not occ.any() or not keep.any():
        raise FrontGuidanceError(
            "front half: nothing of the front surface lies on the camera's side of the grid centre"
        )
    device = next(encoder.parameters()).device
    x_fg_ss = encoder(torch.from_numpy(occ)[None, None].float().to(device))[0].float().cpu()
    mask = _pool_mask(occ, x_fg_ss.shape[-1], cfg.ss_mask_dilation)
    info = {
        "band_voxels": len(coords),
        "shell_faces": len(shell_f),
        "dual_grid_voxels": len(grid),
        "shape_latent_voxels": len(lat_coords),
        "shape_front_voxels": int(keep.sum()),
        "ss_front_voxels": int(occ.sum()),
        "ss_mask_cells": int(mask.sum()),
    }
    return FrontTargets(
        x_fg_ss=x_fg_ss,
        M_ss=mask,
        shape_coords=np.asarray(lat_coords)[keep],
        shape_feats=lat_feats[torch.from_numpy(keep)],
        shape_resolution=r_lat,
        ss_occupancy=occ,
        view_dir=np.asarray(view_dir, dtype=np.float64) / np.linalg.norm(view_dir),
        info=info,
    )


def front_pointmap(
    cfg: FrontGuidanceConfig,
    camera,
    depth: np.ndarray | None = None,
    image: Any = None,
    vggt_model: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The point map of ``cfg.source`` in the Z-up unit cube: ``depth`` needs ``depth`` (z-depth of
    the view of ``camera``); ``vggt`` needs the input ``image`` (RGBA, the view of ``camera``) and
    a model (``vggt_model``, else loaded from ``cfg.vggt_model``)."""
    if cfg.source == "depth":
        if depth is None:
            raise FrontGuidanceError("front guidance source 'depth' needs the view's depth map")
        return pointmap_from_depth(depth, camera)
    from know3d.training.generator.vggt import load_vggt, vggt_pointmap

    if image is None:
        raise FrontGuidanceError("front guidance source 'vggt' needs the input image")
    model = vggt_model if vggt_model is not None else load_vggt(cfg.vggt_model)
    points, confidence, _ = vggt_pointmap(model, image, camera, cfg.conf_threshold, scale=cfg.vggt_scale)
    return points, confidence


def front_targets(
    points: np.ndarray, confidence: np.ndarray, view_dir: np.ndarray, shape_vae, ss_vae, cfg: FrontGuidanceConfig
) -> FrontTargets:
    """Point map (Z-up unit cube) -> Algorithm 1 -> :func:`encode_front`."""
    vertices, faces = pointmap_to_mesh(points, confidence, cfg.conf_threshold, cfg.depth_jump)
    targets = encode_front(vertices, faces, view_dir, shape_vae, ss_vae, cfg)
    targets.info.update(sheet_vertices=len(vertices), sheet_faces=len(faces))
    return targets


# --------------------------------------------------------------------------- guided sampler


@dataclass
class GuidedSampleResult(SampleResult):
    residual: list[float] = field(default_factory=list)  # RMS of Delta_t over the mask at each step


class GuidedEulerSampler(EulerCfgSampler):
    """:class:`~.flow.EulerCfgSampler` with Consistent3DGen's front-partial guidance (Eq. 8-9).

    ``target`` and ``mask`` broadcast against the sampled ``x`` (stage 1: ``[1, C, r, r, r]`` and
    ``[1, 1, r, r, r]``; stage 2 on :class:`~.flow.SparseSample`: ``[1, N, C]`` and ``[1, N, 1]``);
    ``mask`` is 0/1 (bool or float). Each step, with ``h = t - t_prev`` and the (CFG) velocity ``v``::

        Delta = mask * (x - ref),   ref = target               (paper, target_at_noise_level=False)
                                    ref = ref(t) = (1 - t) target + (sigma_min + (1 - sigma_min) t) noise
        euler:     x <- x - h * (v + lam * Delta)
        implicit:  x <- (x - h * v + h * lam * mask * ref(t_prev)) / (1 + h * lam * mask)

    See the module docstring for this reading of Eq. 9's missing dt. ``lam = 0`` (and no
    ``start_from_front``) runs exactly :meth:`EulerCfgSampler.sample`'s operations (bitwise equal).
    ``start_from_front``: the initial x is ``noise + mask * (ref(start_t) - noise)``, the target
    diffused to ``start_t`` on the mask, the noise elsewhere. ``noise`` is the eps of both.
    """

    def __init__(
        self,
        config: SamplerConfig | None = None,
        sigma_min: float = SIGMA_MIN,
        *,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lam: float = 0.0,
        target_at_noise_level: bool = False,
        integrator: Literal["euler", "implicit"] = "euler",
        start_from_front: bool = False,
        start_t: float = 0.0,
    ) -> None:
        super().__init__(config, sigma_min)
        if not (math.isfinite(lam) and lam >= 0):
            raise FrontGuidanceError(f"guidance lambda must be finite and >= 0, got {lam}")
        if integrator not in ("euler", "implicit"):
            raise FrontGuidanceError(f"integrator must be 'euler' or 'implicit', got {integrator!r}")
        if not 0.0 <= start_t <= 1.0:
            raise FrontGuidanceError(f"start_t must be in [0, 1], got {start_t}")
        if (lam > 0 or start_from_front) and (target is None or mask is None):
            raise FrontGuidanceError("front guidance needs a target and a mask (lam > 0 or start_from_front)")
        self.target, self.mask, self.lam = target, mask, float(lam)
        self.target_at_noise_level = target_at_noise_level
        self.integrator = integrator
        self.start_from_front, self.start_t = start_from_front, float(start_t)
        if integrator == "euler" and self.lam > 0:
            steps = timestep_schedule(self.config.steps, self.config.rescale_t)
            h = max(a - b for a, b in zip(steps[:-1], steps[1:], strict=True))
            if self.lam * h >= 2:
                warnings.warn(
                    f"front guidance: lambda * dt = {self.lam * h:.3g} >= 2 on the largest step: explicit Euler on "
                    "the pull diverges (use integrator='implicit' or a smaller lambda)",
                    stacklevel=2,
                )

    @classmethod
    def for_stage(
        cls,
        stage: Literal["ss", "shape"],
        sampler: SamplerConfig,
        guidance: FrontGuidanceConfig,
        target: torch.Tensor,
        mask: torch.Tensor,
        sigma_min: float = SIGMA_MIN,
    ) -> GuidedEulerSampler:
        """The sampler of one stage from the configs: stage 1 (``"ss"``) uses ``lam_ss`` and
        ``start_from_front``; stage 2 (``"shape"``) uses ``lam_shape`` and starts from noise."""
        if stage not in ("ss", "shape"):
            raise FrontGuidanceError(f"stage must be 'ss' or 'shape', got {stage!r}")
        return cls(
            sampler,
            sigma_min,
            target=target,
            mask=mask,
            lam=guidance.lam_ss if stage == "ss" else guidance.lam_shape,
            target_at_noise_level=guidance.target_at_noise_level,
            integrator=guidance.integrator,
            start_from_front=guidance.start_from_front and stage == "ss",
            start_t=guidance.start_t,
        )

    def _reference(self, target: torch.Tensor, t: float, noise: torch.Tensor) -> torch.Tensor:
        if not self.target_at_noise_level:
            return target
        return (1 - t) * target + (self.sigma_min + (1 - self.sigma_min) * t) * noise

    def _prepared(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.as_tensor(self.target).to(x.device, x.dtype)
        mask = torch.as_tensor(self.mask).to(x.device, x.dtype)
        for name, value in (("target", target), ("mask", mask)):
            try:
                shape = torch.broadcast_shapes(value.shape, x.shape)
            except RuntimeError:
                shape = None
            if shape != x.shape:
                raise FrontGuidanceError(
                    f"front guidance {name} of shape {list(value.shape)} does not broadcast to the latent {list(x.shape)}"
                )
        if not torch.isfinite(target).all():
            raise FrontGuidanceError("front guidance target holds NaN / inf")
        return target, mask

    # the hooks of EulerCfgSampler.sample: the loop is the plain sampler's
    def new_result(self, noise: torch.Tensor) -> GuidedSampleResult:
        return GuidedSampleResult(samples=noise, timesteps=[], guided=[])

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """Noise, or with ``start_from_front`` the diffused front target on the mask; prepares the
        target and mask of this run."""
        self._run = None
        if self.lam == 0 and not self.start_from_front:
            return noise
        target, mask = self._prepared(noise)
        self._run = (target, mask, float(mask.expand_as(noise).sum()))
        if not self.start_from_front:
            return noise
        start = (1 - self.start_t) * target + (self.sigma_min + (1 - self.sigma_min) * self.start_t) * noise
        return noise + mask * (start - noise)

    def step(self, x, v, t: float, t_prev: float, noise: torch.Tensor, result) -> torch.Tensor:
        """Eq. 9 (see the class docstring); the plain Euler step when λ = 0."""
        if self.lam == 0:
            return super().step(x, v, t, t_prev, noise, result)
        target, mask, count = self._run
        delta = mask * (x - self._reference(target, t, noise))
        result.residual.append(math.sqrt(float(delta.square().sum()) / max(count, 1.0)))
        if self.integrator == "euler":
            return x - (t - t_prev) * (v + self.lam * delta)
        pull = (t - t_prev) * self.lam * mask
        return (x - (t - t_prev) * v + pull * self._reference(target, t_prev, noise)) / (1 + pull)
