"""The ``vggt`` point-map source of front guidance: VGGT-1B (Wang et al. 2025) on the input image.

Public interface used (facebookresearch/vggt, imported lazily): ``from vggt.models.vggt import VGGT``;
``VGGT.from_pretrained("facebook/VGGT-1B")`` (a ``PyTorchModelHubMixin``: hub id or local folder) or
``VGGT()`` + ``load_state_dict`` of the released ``model.pt``; ``model(images)`` with ``images``
``[S, 3, H, W]`` (or ``[B, S, 3, H, W]``) in [0, 1], H = W = 518 here, returns a dict with
``world_points [B, S, H, W, 3]`` and ``world_points_conf [B, S, H, W]`` (``1 + exp(.)``, >= 1),
``depth [B, S, H, W, 1]`` and ``depth_conf``, and ``pose_enc [B, S, 9]`` (translation, quaternion
xyzw, vertical / horizontal field of view). The "world" is the **first camera's frame** (OpenCV:
x right, y down, z forward) at VGGT's normalized scale (training scenes are scaled to a mean point
distance of 1), so for our single image the points are camera-frame points known up to a scale.

Alignment to the generator's frame (:func:`align_to_camera`) assumes **the input view's camera is
known**, as in our renders (``rendering.camera.Camera``: intrinsics, OpenCV camera-to-world in the
glTF Y-up world whose unit cube is the object's normalized box). Then only VGGT's scale is unknown:

* the points are re-cast along *our* pixel rays with VGGT's z-depth (``reproject``, default), so the
  point map is pixel-aligned with the known intrinsics whatever focal length VGGT inferred;
* the scale ``s`` is given, or fitted: each confident point ``o + s d_i`` (camera centre ``o``)
  stays inside the unit cube [-0.5, 0.5]³ for ``s`` in an interval; the intersection over the points
  (robust to ``outlier_fraction``) is ``[s_lo, s_hi]`` and ``s`` its midpoint. The object fills its
  box (longest side 1), so the interval is tight when a long side of the box is seen across the
  image, and ``(s_hi - s_lo) / s`` is reported as the fit's uncertainty.

Left for an unknown camera (a real photo): a similarity alignment (rotation, translation, scale) of
VGGT's points to the generator's frame, e.g. from VGGT's own camera (pose_enc) with a canonical
look-at placement and the silhouette's extent; not implemented here.

:class:`DebugVGGT` is a tiny in-code stand-in with the same call interface and outputs (no
weights): from a known z-depth (and its intrinsics) it returns that depth's camera-frame point map
at VGGT's normalized scale, so tests can check the plumbing; without a depth it inflates the
image's non-white silhouette into a bulging front surface.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from know3d.training.generator.front_guidance import FrontGuidanceError, pixel_rays
from know3d.training.generator.occupancy import GLTF_TO_ZUP

VGGT_HUB_ID = "facebook/VGGT-1B"
VGGT_SIZE = 518  # the released model's input side (multiple of its 14-pixel patches)
VGGT_INSTALL = "pip install git+https://github.com/facebookresearch/vggt"


# --------------------------------------------------------------------------- loading


def load_vggt(source: str | Path = VGGT_HUB_ID, device: str | torch.device | None = None) -> torch.nn.Module:
    """VGGT in eval mode on ``device``: ``source`` a hub id (``facebook/VGGT-1B``) or a local folder
    (``VGGT.from_pretrained``), a weights file (``model.pt`` / ``.safetensors`` into ``VGGT()``), or
    ``"debug"`` (:class:`DebugVGGT`). A missing ``vggt`` package or unloadable weights raise
    :class:`~.front_guidance.FrontGuidanceError` saying which and what to do."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if str(source) == "debug":
        return DebugVGGT().to(device).eval()
    try:
        from vggt.models.vggt import VGGT
    except ImportError as exc:
        raise FrontGuidanceError(
            f"front guidance source 'vggt' needs the `vggt` package, which is not importable ({exc}); "
            f"install it with `{VGGT_INSTALL}`"
        ) from None
    path = Path(str(source)).expanduser()
    try:
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]
            model = VGGT()
            model.load_state_dict(state, strict=True)
        else:
            model = VGGT.from_pretrained(str(source))
    except Exception as exc:  # noqa: BLE001 - network, missing files, wrong keys: one clear line naming the weights
        raise FrontGuidanceError(
            f"VGGT weights {str(source)!r} could not be loaded ({type(exc).__name__}: {exc}); offline, download "
            f"{VGGT_HUB_ID}'s model.pt and pass its path as the front-guidance setting vggt_model"
        ) from None
    return model.to(device).eval()


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- the stand-in


class DebugVGGT(torch.nn.Module):
    """A weightless stand-in with VGGT's call interface (see the module docstring).

    ``depth [H0, W0]`` (z-depth, 0 = background) with its pixel intrinsics ``K [3, 3]``: every call
    resamples it to the input's ``H x W`` (nearest pixel centre; intrinsics scaled by ``W / W0``,
    ``H / H0`` — exact for a square render resized to 518) and returns its camera-frame points,
    scaled so that the mean distance of the valid points to the camera is 1 (VGGT's normalization).
    Confidence ``valid_conf`` on the object, ``invalid_conf`` (VGGT's floor, 1) on the background,
    whose points are put at twice the largest depth. Without ``depth``: the non-white pixels of each
    image (any channel < 0.98) bulge towards the camera by up to 0.3 around depth 2.5, ``K`` a 40°
    field of view."""

    def __init__(
        self,
        depth: np.ndarray | None = None,
        K: np.ndarray | None = None,
        valid_conf: float = 10.0,
        invalid_conf: float = 1.0,
    ) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # carries the device
        if depth is not None:
            depth = np.asarray(depth, dtype=np.float64)
            if depth.ndim != 2:
                raise FrontGuidanceError(f"DebugVGGT: depth must be [H, W], got shape {depth.shape}")
            if K is None:
                raise FrontGuidanceError("DebugVGGT: a known depth needs its intrinsics K")
        self.depth = depth
        self.K = None if K is None else np.asarray(K, dtype=np.float64)
        self.valid_conf, self.invalid_conf = float(valid_conf), float(invalid_conf)

    @classmethod
    def from_view(cls, depth: np.ndarray, camera, **kwargs) -> DebugVGGT:
        """The stand-in for one rendered view (its z-depth and camera)."""
        return cls(depth, camera.K, **kwargs)

    def _depth_at(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        _, h, w = image.shape
        if self.depth is not None:
            h0, w0 = self.depth.shape
            rows = np.clip(np.floor((np.arange(h) + 0.5) * h0 / h).astype(np.int64), 0, h0 - 1)
            cols = np.clip(np.floor((np.arange(w) + 0.5) * w0 / w).astype(np.int64), 0, w0 - 1)
            depth = self.depth[rows][:, cols]
            K = self.K.copy()
            K[0] *= w / w0
            K[1] *= h / h0
            return np.where(np.isfinite(depth), depth, 0.0), K
        from scipy.ndimage import distance_transform_edt

        silhouette = (image.detach().float().cpu().numpy() < 0.98).any(axis=0)
        focal = (h / 2.0) / np.tan(np.deg2rad(20.0))
        K = np.array([[focal, 0.0, w / 2.0], [0.0, focal, h / 2.0], [0.0, 0.0, 1.0]])
        if not silhouette.any():
            return np.zeros((h, w)), K
        inner = distance_transform_edt(silhouette)
        return np.where(silhouette, 2.5 - 0.3 * np.sqrt(inner / inner.max()), 0.0), K

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[2] != 3:
            raise FrontGuidanceError(f"VGGT input must be [S, 3, H, W] or [B, S, 3, H, W], got {list(images.shape)}")
        b, s, _, h, w = images.shape
        points = np.zeros((b, s, h, w, 3))
        conf = np.zeros((b, s, h, w))
        pose = np.zeros((b, s, 9))
        for i in range(b):
            for j in range(s):
                depth, K = self._depth_at(images[i, j])
                valid = depth > 0
                far = 2.0 * depth[valid].max() if valid.any() else 5.0
                z = np.where(valid, depth, far)
                cam = pixel_rays(K, h, w) * z[..., None]  # camera frame (OpenCV)
                norm = np.linalg.norm(cam[valid], axis=1).mean() if valid.any() else 1.0
                points[i, j] = cam / norm
                conf[i, j] = np.where(valid, self.valid_conf, self.invalid_conf)
                fov_h = 2 * np.arctan(h / 2 / K[1, 1])
                fov_w = 2 * np.arctan(w / 2 / K[0, 0])
                pose[i, j] = [0, 0, 0, 0, 0, 0, 1, fov_h, fov_w]
        device = images.device
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)
        return {
            "world_points": as_t(points),
            "world_points_conf": as_t(conf),
            "depth": as_t(points[..., 2:3]),
            "depth_conf": as_t(conf),
            "pose_enc": as_t(pose),
            "images": images,
        }


# --------------------------------------------------------------------------- image in, points out


@dataclasses.dataclass(frozen=True)
class Preprocessed:
    images: torch.Tensor  # [1, 3, S, S] float32 in [0, 1]: RGB over white, padded square, resized
    alpha: np.ndarray  # [S, S] bool object mask
    pad: tuple[int, int]  # (left, top) white padding added to make the input square
    scale: float  # S / padded side


def _read_rgba(image: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(image, str | Path):
        from know3d.training.generate import read_image  # bounded decoding, errors naming the file

        return read_image(Path(image), lambda img: np.asarray(img.convert("RGBA")))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGBA"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise FrontGuidanceError(f"VGGT input image: expected [H, W, 3 | 4], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255 + 0.5).astype(np.uint8)
    if array.shape[2] == 3:
        array = np.concatenate([array, np.full(array.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return array


def preprocess_image(image: Any, size: int = VGGT_SIZE) -> Preprocessed:
    """An RGBA image (path, PIL or ``[H, W, 3|4]`` array) -> VGGT's input: RGB composited over white
    (VGGT's own preprocessing does the same for RGBA), padded with white to a square (centred), resized
    to ``size``² (bicubic; the alpha bilinear, > 0.5), values in [0, 1]."""
    from PIL import Image

    rgba = _read_rgba(image)
    h, w = rgba.shape[:2]
    side = max(h, w)
    left, top = (side - w) // 2, (side - h) // 2
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) * alpha + 255.0 * (1 - alpha)
    canvas = np.full((side, side, 3), 255.0)
    canvas[top : top + h, left : left + w] = rgb
    mask = np.zeros((side, side), np.float32)
    mask[top : top + h, left : left + w] = alpha[..., 0]
    rgb_img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    mask_img = Image.fromarray(mask).resize((size, size), Image.Resampling.BILINEAR)
    images = torch.from_numpy(np.asarray(rgb_img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return Preprocessed(images, np.asarray(mask_img) > 0.5, (left, top), size / side)


def preprocessed_camera(camera, pre: Preprocessed):
    """The known camera of the original image, for VGGT's padded and resized input: principal point
    shifted by the padding, intrinsics scaled, same extrinsics."""
    K = np.asarray(camera.K, dtype=np.float64).copy()
    K[0, 2] += pre.pad[0]
    K[1, 2] += pre.pad[1]
    K[:2] *= pre.scale
    size = pre.images.shape[-1]
    return dataclasses.replace(camera, K=K, width=size, height=size)


@torch.no_grad()
def run_vggt(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """One forward pass on ``images [S, 3, H, W]`` (bf16 autocast on Ampere+ GPUs, fp16 on older
    ones, as VGGT's README); the first frame's outputs as float numpy arrays: ``points [H, W, 3]``
    (camera frame of frame 0, OpenCV, VGGT's scale), ``conf [H, W]``, ``depth [H, W]``,
    ``depth_conf [H, W]``."""
    device = _model_device(model)
    images = images.to(device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            out = model(images)
    else:
        out = model(images)
    for key in ("world_points", "world_points_conf"):
        if key not in out:
            raise FrontGuidanceError(f"VGGT output has no {key!r} (keys: {sorted(out)})")
    first = lambda key: out[key][0, 0].float().cpu().numpy().astype(np.float64)
    result = {"points": first("world_points"), "conf": first("world_points_conf")}
    if "depth" in out:
        result["depth"] = first("depth")[..., 0]
        result["depth_conf"] = first("depth_conf") if "depth_conf" in out else result["conf"]
    return result


def fit_unit_cube_scale(
    origin: np.ndarray, directions: np.ndarray, outlier_fraction: float = 0.01, margin: float = 0.01
) -> tuple[float, float, float]:
    """``(s, s_lo, s_hi)``: the scales ``s > 0`` for which the points ``origin + s * directions``
    (``[N, 3]``, any frame whose unit cube is [-0.5, 0.5]³) lie in the cube, each point giving an
    interval; ``s_lo`` is the ``1 - outlier_fraction`` quantile of the lower ends, ``s_hi`` the
    ``outlier_fraction`` quantile of the upper ends, ``s`` their midpoint."""
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    d = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    if len(d) == 0:
        raise FrontGuidanceError("VGGT scale fit: no confident point")
    half = 0.5 + float(margin)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (-half - origin) / d
        b = (half - origin) / d
    lo = np.where(d > 0, a, np.where(d < 0, b, np.where(np.abs(origin) <= half, -np.inf, np.inf)))
    hi = np.where(d > 0, b, np.where(d < 0, a, np.where(np.abs(origin) <= half, np.inf, -np.inf)))
    lo_i = np.maximum(lo.max(axis=1), 0.0)
    hi_i = hi.min(axis=1)
    q = float(outlier_fraction)
    s_lo = float(np.quantile(lo_i, 1.0 - q)) if q > 0 else float(lo_i.max())
    s_hi = float(np.quantile(hi_i, q)) if q > 0 else float(hi_i.min())
    if not (np.isfinite(s_lo) and np.isfinite(s_hi)) or s_lo > s_hi or s_hi <= 0:
        raise FrontGuidanceError(
            f"VGGT scale fit: no scale puts the point map inside the unit cube with the known camera "
            f"(lower bound {s_lo:.4g} > upper bound {s_hi:.4g}); check the camera or pass vggt_scale"
        )
    return 0.5 * (s_lo + s_hi), s_lo, s_hi


def align_to_camera(
    points_cam: np.ndarray,
    confidence: np.ndarray,
    camera,
    conf_threshold: float = 0.5,
    scale: float | None = None,
    reproject: bool = True,
    outlier_fraction: float = 0.01,
) -> tuple[np.ndarray, dict[str, float]]:
    """VGGT's camera-frame point map ``[H, W, 3]`` (OpenCV, VGGT's scale) of the view of the known
    ``camera`` (intrinsics for this ``H x W``) -> ``(points [H, W, 3] in the Z-up unit cube, info)``.

    ``reproject``: point = ``s * z * K^-1 [u + 0.5, v + 0.5, 1]`` (our rays, VGGT's z-depth), else
    ``s * points_cam``; then camera-to-world and ``GLTF_TO_ZUP``. ``scale`` None: fitted by
    :func:`fit_unit_cube_scale` on the pixels with ``confidence > conf_threshold``. ``info``:
    ``scale``, ``scale_lo``, ``scale_hi`` (equal to ``scale`` when given)."""
    points_cam = np.asarray(points_cam, dtype=np.float64)
    if points_cam.ndim != 3 or points_cam.shape[2] != 3:
        raise FrontGuidanceError(f"VGGT point map: expected [H, W, 3], got shape {points_cam.shape}")
    if points_cam.shape[:2] != (camera.height, camera.width):
        raise FrontGuidanceError(
            f"VGGT point map {points_cam.shape[:2]} does not match the camera's {camera.height} x {camera.width}"
        )
    confidence = np.asarray(confidence, dtype=np.float64)
    z = points_cam[..., 2]
    valid = np.isfinite(points_cam).all(axis=2) & (np.nan_to_num(confidence, nan=-np.inf) > conf_threshold)
    valid &= np.nan_to_num(z, nan=-1.0) > 0
    c2w = np.asarray(camera.c2w, dtype=np.float64)
    if reproject:
        cam = pixel_rays(camera.K, *z.shape) * z[..., None]
    else:
        cam = points_cam
    directions = cam @ c2w[:3, :3].T  # glTF world, before scaling
    if scale is None:
        s, s_lo, s_hi = fit_unit_cube_scale(c2w[:3, 3], directions[valid], outlier_fraction)
    else:
        if not (np.isfinite(scale) and scale > 0):
            raise FrontGuidanceError(f"VGGT scale must be finite and > 0, got {scale}")
        s = s_lo = s_hi = float(scale)
    world = c2w[:3, 3] + s * directions
    points = world @ GLTF_TO_ZUP.T
    points[~valid] = np.nan
    return points, {"scale": s, "scale_lo": s_lo, "scale_hi": s_hi, "valid_pixels": int(valid.sum())}


def vggt_pointmap(
    model: torch.nn.Module,
    image: Any,
    camera,
    conf_threshold: float = 0.5,
    scale: float | None = None,
    points_from: str = "world_points",
    reproject: bool = True,
    outlier_fraction: float = 0.01,
    size: int = VGGT_SIZE,
    erode: int = 1,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The ``vggt`` source: the RGBA input ``image`` (the view of the known ``camera``, same pixel
    size) -> ``(points [size, size, 3] in the Z-up unit cube, confidence [size, size], info)``.

    Confidence is VGGT's (``world_points_conf``, or ``depth_conf`` with ``points_from="depth"``, which
    takes the z-depth from the depth head), set to 0 outside the image's alpha mask eroded by ``erode``
    pixels (silhouette pixels mix object and background: VGGT's "flying" points); points are NaN
    where the confidence is <= ``conf_threshold``. See :func:`align_to_camera` for the frame."""
    from scipy.ndimage import binary_erosion

    rgba = _read_rgba(image)
    if rgba.shape[:2] != (camera.height, camera.width):
        raise FrontGuidanceError(
            f"VGGT input image is {rgba.shape[1]} x {rgba.shape[0]} pixels, its camera {camera.width} x {camera.height}"
        )
    if points_from not in ("world_points", "depth"):
        raise FrontGuidanceError(f"points_from must be 'world_points' or 'depth', got {points_from!r}")
    pre = preprocess_image(rgba, size)
    if not pre.alpha.any():
        raise FrontGuidanceError("VGGT input image: the alpha mask is empty (no object pixels)")
    out = run_vggt(model, pre.images)
    points_cam, conf = out["points"], out["conf"]
    if points_from == "depth":
        if "depth" not in out:
            raise FrontGuidanceError("VGGT output has no 'depth' (points_from='depth')")
        points_cam = points_cam.copy()
        points_cam[..., 2] = out["depth"]
        conf = out["depth_conf"]
        reproject = True  # only the depth head's z is used
    mask = binary_erosion(pre.alpha, iterations=erode) if erode > 0 else pre.alpha
    conf = np.where(mask, conf, 0.0)
    points, info = align_to_camera(
        points_cam, conf, preprocessed_camera(camera, pre), conf_threshold, scale, reproject, outlier_fraction
    )
    return points, conf.astype(np.float32), info
