"""DINOv3 front-view features for the TRELLIS.2-based generator (issue 14).

The generator is conditioned on the front view the way TRELLIS.2 conditions on its input image:

1. :func:`crop_front_view` (TRELLIS.2 ``trellis2/pipelines/trellis2_image_to_3d.py``,
   ``Trellis2ImageTo3DPipeline.preprocess_image``): downscale so the longer side is at most 1024
   (LANCZOS), take the bounding box of the pixels with ``alpha > 0.8 * 255``, crop a square of side
   ``max(bbox width, bbox height)`` (margin factor 1, i.e. no margin; box ``center +- size // 2``,
   rounded by PIL, outside the image is transparent black) and premultiply: ``RGB * alpha`` on a
   black background, back to 8 bit by truncation.
2. :meth:`FrontFeatures.preprocess` (TRELLIS.2 ``trellis2/modules/image_feature_extractor.py``,
   ``DinoV3FeatureExtractor.__call__``): resize to ``resolution`` (512) with LANCZOS, scale to
   [0, 1], ImageNet normalization (mean 0.485/0.456/0.406, std 0.229/0.224/0.225).
3. :meth:`FrontFeatures.encode` (``DinoV3FeatureExtractor.extract_features``): embeddings, RoPE and
   every transformer layer of ``DINOv3ViTModel`` *without* the model's final (affine) norm, then a
   non-affine ``F.layer_norm`` over channels. Tokens: 1 CLS + 4 registers + (resolution / 16)^2
   patches, i.e. 1029 x 1024 for ViT-L/16 at 512.

Deviations from upstream, on inputs upstream does not handle: an image without alpha (RGB, L, or
RGBA whose alpha is all 255) is used whole (upstream runs background removal, which Know3D's renders
never need); an image with no pixel above the alpha threshold raises :class:`FrontViewError`
naming the image; a one-pixel object still gives a 2x2 crop instead of an empty one.

The real weights load with :func:`load_dino` (hub id or local folder, safetensors only; transformers
maps the checkpoint names ``layer.N.*`` onto the module's ``model.layer.N.*``). :func:`build_debug_dino`
builds a tiny random model of the same class (4 registers, patch 16) for tests and debug runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from know3d.training.generator.config import DINOV3_VITL16_HUB_ID

__all__ = [
    "DINOV3_VITL16_CONFIG",
    "DINOV3_VITL16_HUB_ID",
    "FrontFeatures",
    "FrontViewError",
    "alpha_crop_box",
    "build_debug_dino",
    "checkpoint_key",
    "crop_front_view",
    "debug_dino_config",
    "dinov3_vitl16_config",
    "front_features",
    "load_dino",
    "num_tokens",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ALPHA_THRESHOLD = 0.8 * 255  # upstream: bbox of alpha > 0.8 * 255
MAX_SIDE = 1024  # upstream downscales the input so that max(w, h) <= 1024 before cropping
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # refuse to decode larger files given by path
NUM_REGISTER_TOKENS = 4
PATCH_SIZE = 16

# The full-size DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m config.json).
DINOV3_VITL16_CONFIG: dict = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_register_tokens": NUM_REGISTER_TOKENS,
    "patch_size": PATCH_SIZE,
    "image_size": 224,
    "hidden_act": "gelu",
    "attention_dropout": 0.0,
    "drop_path_rate": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "layerscale_value": 1.0,
    "mlp_bias": True,
    "proj_bias": True,
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "use_gated_mlp": False,
    "rope_theta": 100.0,
    "pos_embed_rescale": 2.0,
    "pos_embed_jitter": None,
    "pos_embed_shift": None,
}


class FrontViewError(ValueError):
    """A front view that cannot be turned into features (empty alpha, too large, unreadable)."""


def num_tokens(resolution: int, patch_size: int = PATCH_SIZE, registers: int = NUM_REGISTER_TOKENS) -> int:
    """Tokens per image: CLS + registers + (resolution / patch)^2 (1029 at 512 for ViT-L/16)."""
    return 1 + registers + (resolution // patch_size) ** 2


def dinov3_vitl16_config():
    """The full-size DINOv3ViTConfig (ViT-L/16, 4 registers)."""
    from transformers import DINOv3ViTConfig

    return DINOv3ViTConfig(**DINOV3_VITL16_CONFIG)


def debug_dino_config(hidden_size: int = 32, layers: int = 2, heads: int = 2):
    """A tiny DINOv3ViTConfig: same class, patch 16 and 4 registers, so token counts match the real model."""
    from transformers import DINOv3ViTConfig

    fields = dict(DINOV3_VITL16_CONFIG)
    fields.update(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads
    )
    return DINOv3ViTConfig(**fields)


def build_debug_dino(seed: int = 0, **config_kwargs):
    """A tiny random DINOv3ViTModel, the same weights for the same seed (the global RNG is left untouched)."""
    from transformers import DINOv3ViTModel

    config = debug_dino_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DINOv3ViTModel(config)
    return model.eval()


def checkpoint_key(module_key: str) -> str:
    """The on-disk name of a ``DINOv3ViTModel`` state_dict key: released checkpoints store the
    blocks as ``layer.N.*``; transformers renames them to ``model.layer.N.*`` on load (its
    ``conversion_mapping`` for ``dinov3_vit``)."""
    return module_key[len("model.") :] if module_key.startswith("model.layer.") else module_key


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def load_dino(source: str | Path = DINOV3_VITL16_HUB_ID, *, device="cpu", dtype: torch.dtype | None = None):
    """Load DINOv3ViTModel weights from a hub id or a local folder, safetensors only.

    A local folder without ``*.safetensors`` raises :class:`FileNotFoundError` naming the folder (pickled
    ``.bin`` weights are never loaded).
    """
    from transformers import DINOv3ViTModel

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"DINOv3 weights: {path} is not a folder (expected a model folder)")
        if not _has_safetensors(path):
            raise FileNotFoundError(f"DINOv3 weights: no *.safetensors in {path} (only safetensors are loaded)")
        source = str(path)
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = DINOv3ViTModel.from_pretrained(str(source), **kwargs)
    return model.to(device).eval()


def front_features(source: str, resolution: int = 512, *, device="cpu", dtype=None) -> FrontFeatures:
    """A :class:`FrontFeatures` from a config string: a hub id or folder (:func:`load_dino`), or
    ``debug`` / ``debug:<seed>`` for the tiny random model built in code."""
    if source == "debug" or source.startswith("debug:"):
        seed = int(source.partition(":")[2] or 0)
        features = FrontFeatures(build_debug_dino(seed), resolution=resolution)
        features.model.to(device)
        return features
    return FrontFeatures.from_pretrained(source, device=device, dtype=dtype, resolution=resolution)


def _open_bounded(path: Path, max_pixels: int) -> Image.Image:
    """Decode an image file, refusing (before decoding) more than ``max_pixels`` pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise FrontViewError(f"{path}: {w}x{h} image exceeds the {max_pixels}-pixel cap")
            im.load()
            return im.copy()
    except (OSError, Image.DecompressionBombError) as exc:
        raise FrontViewError(f"{path}: cannot decode image ({exc})") from exc


def _as_rgba(image: Image.Image) -> Image.Image | None:
    """RGBA if the image carries transparency, None if it has none (RGB, L, or alpha all 255)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if np.all(np.asarray(rgba)[:, :, 3] == 255):
            return None
        return rgba
    return None


def alpha_crop_box(alpha: np.ndarray, name: str = "image") -> tuple[int, int, int, int]:
    """The square crop box (left, top, right, bottom; right/bottom exclusive) of TRELLIS.2 ``preprocess_image``.

    Bounding box of ``alpha > 0.8 * 255``, side ``max(width, height)`` of that box (its ``max - min``, as
    upstream), centred, ``center +- side // 2`` rounded the way PIL's ``crop`` rounds. Raises
    :class:`FrontViewError` naming ``name`` when no pixel passes the threshold.
    """
    ys, xs = np.nonzero(alpha > ALPHA_THRESHOLD)
    if xs.size == 0:
        raise FrontViewError(f"{name}: empty alpha (no pixel with alpha > {ALPHA_THRESHOLD:g}), nothing to crop")
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(max(x1 - x0, y1 - y0) // 2, 1)
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def crop_front_view(image: Image.Image, name: str = "image") -> Image.Image:
    """TRELLIS.2 ``preprocess_image`` without background removal: square alpha-bbox crop, premultiplied RGB.

    An image without transparency is returned whole as RGB. Raises :class:`FrontViewError` (naming
    ``name``) when no pixel has alpha > 0.8 * 255.
    """
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale < 1:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
    rgba = _as_rgba(image)
    if rgba is None:
        return image.convert("RGB")
    crop = rgba.crop(alpha_crop_box(np.asarray(rgba)[:, :, 3], name))  # outside the image -> (0, 0, 0, 0)
    arr = np.asarray(crop).astype(np.float32) / 255
    rgb = arr[:, :, :3] * arr[:, :, 3:4]
    return Image.fromarray((rgb * 255).astype(np.uint8))


class FrontFeatures:
    """Front-view DINOv3 features: ``encode(images) -> [B, 1 + 4 + (resolution/16)^2, hidden]``.

    ``model`` is a ``DINOv3ViTModel`` (:func:`load_dino` or :func:`build_debug_dino`). Images are PIL
    images or paths (decoded with a ``max_pixels`` cap); ``crop=False`` skips the alpha crop for
    views that are already cropped and premultiplied.
    """

    def __init__(
        self, model, resolution: int = 512, *, crop: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        patch = model.config.patch_size
        if resolution <= 0 or resolution % patch:
            raise ValueError(f"resolution {resolution} must be a positive multiple of the patch size {patch}")
        self.model = model.eval()
        self.resolution = resolution
        self.crop = crop
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(cls, source: str | Path = DINOV3_VITL16_HUB_ID, *, device="cpu", dtype=None, **kwargs):
        return cls(load_dino(source, device=device, dtype=dtype), **kwargs)

    @classmethod
    def debug(cls, resolution: int = 64, seed: int = 0, **kwargs) -> FrontFeatures:
        return cls(build_debug_dino(seed), resolution=resolution, **kwargs)

    @property
    def num_tokens(self) -> int:
        return num_tokens(self.resolution, self.model.config.patch_size, self.model.config.num_register_tokens)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def _load(self, images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
        out = []
        for i, item in enumerate(images):
            if isinstance(item, (str, Path)):
                path = Path(item)
                image, name = _open_bounded(path, self.max_pixels), str(path)
            elif isinstance(item, Image.Image):
                image, name = item, f"image {i}"
            else:
                raise TypeError(f"image {i}: expected a PIL image or a path, got {type(item).__name__}")
            out.append(crop_front_view(image, name) if self.crop else image.convert("RGB"))
        return out

    def to_unit(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """Cropped, premultiplied, resized views in [0, 1] before normalization: [B, 3, res, res]."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        size = (self.resolution, self.resolution)
        arrays = [
            np.asarray(im.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255 for im in self._load(images)
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def preprocess(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """ImageNet-normalized pixel values [B, 3, res, res] (float32, CPU)."""
        x = self.to_unit(images)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (before the model's affine norm) with a non-affine LayerNorm."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        model = self.model
        weight = model.embeddings.patch_embeddings.weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        hidden = model.embeddings(pixel_values, bool_masked_pos=None)
        rope = model.rope_embeddings(pixel_values)
        for layer in model.model.layer:
            hidden = layer(hidden, position_embeddings=rope)
        return F.layer_norm(hidden, hidden.shape[-1:])

    def encode(self, images: Sequence[Image.Image | str | Path] | torch.Tensor) -> torch.Tensor:
        """[B, num_tokens, dim] features; a tensor is taken as already-preprocessed pixel values."""
        pixel_values = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        return self.features(pixel_values)

    __call__ = encode
