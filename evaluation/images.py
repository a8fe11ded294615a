"""Back-view image metrics: PSNR, SSIM and (when its weights are local) LPIPS.

Both images are decoded with a pixel bound, alpha-composited onto the *same* background colour
and compared as float RGB in [0, 1]. SSIM is the Wang et al. (2004) definition with a Gaussian
window (σ = 1.5, truncated at 11 pixels), data range 1, population covariance, averaged over the
three channels (scikit-image's ``structural_similarity``). A prediction whose size differs from
its ground truth is resized to it (bicubic) and the result says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet (IMAGENET1K_V1) file name
#: the eval config key of the LPIPS backbone, as ``--set`` takes it (named in the skip reason)
LPIPS_BACKBONE_KEY = "images.lpips_backbone"


MIN_SIDE = 11  # the SSIM window


class ImageError(Exception):
    """The image cannot be used; the message names the file and the reason."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grey images scaled (not clipped) to 8 bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray((array / peak * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        return Image.fromarray((array * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    return img


def load_rgb(path: Path, background: str = "white", max_pixels: int = 4096 * 4096) -> np.ndarray:
    """Decode ``path`` (bounded), composite any alpha onto ``background``: [H, W, 3] uint8."""
    path = Path(path)
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{path.name}: {w}x{h} pixels exceeds the decoding bound of {max_pixels}")
            if min(w, h) < MIN_SIDE:
                raise ImageError(f"{path.name}: {w}x{h} pixels is below the {MIN_SIDE}-pixel SSIM window")
            img.load()
            img = _to_8bit(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, BACKGROUNDS[background] + (255,))
                return np.asarray(Image.alpha_composite(canvas, rgba).convert("RGB"))
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path.name}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this file's fault
        raise ImageError(f"{path.name}: cannot decode image ({type(exc).__name__}: {exc})") from None


def match_size(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, bool]:
    if pred.shape == gt.shape:
        return pred, False
    resized = Image.fromarray(pred).resize((gt.shape[1], gt.shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(resized), True


PSNR_MSE_FLOOR = 1e-10  # identical images score 100 dB instead of an infinity JSON cannot hold


def psnr(pred: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB of float images in [0, 1] (MSE floored at 1e-10: at most 100 dB)."""
    mse = float(np.mean((pred.astype(np.float64) - gt.astype(np.float64)) ** 2))
    return float(10.0 * np.log10(1.0 / max(mse, PSNR_MSE_FLOOR)))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """SSIM (Gaussian window σ 1.5 / 11 px, data range 1) of float RGB images in [0, 1]."""
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            pred.astype(np.float64),
            gt.astype(np.float64),
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def _torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))


def default_alexnet_path() -> Path:
    return _torch_home() / "hub" / "checkpoints" / ALEXNET_WEIGHTS


@dataclass
class LpipsStatus:
    available: bool
    reason: str = ""


class Lpips:
    """LPIPS (AlexNet) with the backbone loaded from a local file only (weights_only).

    lpips ships its linear calibration layers; the AlexNet backbone normally comes from a
    torchvision download, which is not attempted here: without the file LPIPS is *skipped*.
    """

    def __init__(self, backbone: Path | None = None) -> None:
        self.path = Path(backbone) if backbone else default_alexnet_path()
        self.model = None
        if not self.path.is_file():
            self.status = LpipsStatus(
                False,
                f"AlexNet weights not found at {self.path} (torchvision's {ALEXNET_WEIGHTS}; "
                f"copy it there or --set {LPIPS_BACKBONE_KEY}=PATH)",
            )
            return
        import lpips

        from know3d.evaluation.checkpoints import CheckpointError, read_checkpoint

        try:
            state = read_checkpoint(self.path)
        except CheckpointError as exc:  # any unreadable file: LPIPS is skipped, with why
            self.status = LpipsStatus(False, str(exc))
            return
        if not isinstance(state, dict):
            self.status = LpipsStatus(False, f"{self.path.name}: not a state_dict ({type(state).__name__})")
            return
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        backbone_state = {}
        for name, _ in model.net.named_parameters():
            slice_name, rest = name.split(".", 1)  # slice<k>.<feature index>.<weight|bias>
            if rest not in features:
                self.status = LpipsStatus(False, f"{self.path.name}: no 'features.{rest}' (not an AlexNet state_dict)")
                return
            backbone_state[name] = features[rest]
        try:
            model.net.load_state_dict(backbone_state, strict=True)
        except RuntimeError as exc:  # wrong shapes
            self.status = LpipsStatus(False, f"{self.path.name}: not AlexNet weights ({str(exc)[:200]})")
            return
        self.model = model.eval()
        self.status = LpipsStatus(True)

    def __call__(self, pred: np.ndarray, gt: np.ndarray) -> float:
        import torch

        def to_tensor(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None] * 2.0 - 1.0

        with torch.no_grad():
            return float(self.model(to_tensor(pred), to_tensor(gt)).item())


def compare_images(pred: np.ndarray, gt: np.ndarray, lpips_model: Lpips | None = None) -> dict:
    """Metrics of two uint8 RGB images (the prediction is resized to the GT if needed)."""
    pred, resized = match_size(pred, gt)
    p, g = pred.astype(np.float64) / 255.0, gt.astype(np.float64) / 255.0
    out: dict = {"psnr": psnr(p, g), "ssim": ssim(p, g), "resized": resized, "size": [gt.shape[1], gt.shape[0]]}
    if lpips_model is not None and lpips_model.model is not None:
        out["lpips"] = lpips_model(p, g)
    return out
