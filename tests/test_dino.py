"""DINOv3 front-view features (issue 14): TRELLIS.2 preprocessing, the tiny debug model, key conformance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from know3d.training.generator.dino import (
    DINOV3_VITL16_CONFIG,
    FrontFeatures,
    FrontViewError,
    alpha_crop_box,
    build_debug_dino,
    crop_front_view,
    dinov3_vitl16_config,
    load_dino,
    num_tokens,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov3_vitl16.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def front() -> FrontFeatures:
    return FrontFeatures.debug(resolution=64, seed=0)


def object_image() -> Image.Image:
    """100x80 transparent canvas, opaque red box x 10..49, y 20..39, one half-transparent pixel at (12, 45)."""
    arr = np.zeros((80, 100, 4), dtype=np.uint8)
    arr[20:40, 10:50] = (255, 0, 0, 255)
    arr[45, 12] = (255, 255, 255, 128)  # below the 0.8 * 255 threshold: not in the bbox, but kept (premultiplied)
    return Image.fromarray(arr, "RGBA")


def test_crop_box_resize_premultiply(front):
    image = object_image()
    # bbox x 10..49, y 20..39 -> side max(39, 19) = 39, half 19, centre (29.5, 29.5) -> PIL-rounded 10..48
    assert alpha_crop_box(np.asarray(image)[:, :, 3]) == (10, 10, 48, 48)
    crop = np.asarray(crop_front_view(image))
    assert crop.shape == (38, 38, 3)
    assert (crop[10:30, 0:38] == (255, 0, 0)).all()  # the object, opaque
    assert (crop[0:10] == 0).all() and (crop[30:35] == 0).all()  # transparent -> black
    assert tuple(crop[35, 2]) == (128, 128, 128)  # premultiplied: 255 * 128 / 255, truncated
    unit = front.to_unit([image])
    assert unit.shape == (1, 3, 64, 64) and unit.dtype == torch.float32
    assert (unit[0, :, :10] == 0).all()  # transparent rows stay exactly 0 before normalization
    assert 0.0 <= unit.min() and unit.max() <= 1.0
    pixels = front.preprocess([image])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(pixels[0], (unit[0] - mean) / std)


def test_rgb_image_is_used_whole(front):
    rgb = Image.new("RGB", (40, 30), (10, 20, 30))
    assert crop_front_view(rgb).size == (40, 30)
    opaque = Image.new("RGBA", (40, 30), (10, 20, 30, 255))  # alpha all 255 = no alpha
    assert crop_front_view(opaque).size == (40, 30)
    assert front.encode([rgb]).shape == (1, 21, 32)


def test_large_input_is_downscaled_before_crop():
    arr = np.zeros((200, 2048, 4), dtype=np.uint8)
    arr[50:150, 200:1800] = 255  # 1600 wide; after the upstream downscale to 1024 wide: ~800
    width, height = crop_front_view(Image.fromarray(arr, "RGBA")).size
    assert width == height and 795 <= width <= 805


def test_debug_tokens_channels_and_non_affine_layernorm(front):
    image = object_image()
    feats = front.encode([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert front.num_tokens == num_tokens(64) == 1 + 4 + 16
    assert feats.shape == (2, 21, 32) and front.dim == 32
    torch.testing.assert_close(feats.mean(-1), torch.zeros(2, 21), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.std(-1, unbiased=False), torch.ones(2, 21), atol=3e-2, rtol=0)  # eps 1e-5
    # the same as transformers' last layer output before the model's own (affine) final norm
    pixels = front.preprocess([image])
    with torch.no_grad():
        last = front.model(pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(feats[:1], torch.nn.functional.layer_norm(last, last.shape[-1:]))
    small = FrontFeatures(front.model, resolution=32)
    assert small.encode([image]).shape == (1, 1 + 4 + 4, 32)
    assert num_tokens(512) == 1029
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FrontFeatures(front.model, resolution=50)


def test_determinism(front):
    image = object_image()
    again = FrontFeatures.debug(resolution=64, seed=0)
    first = front.encode([image])
    torch.testing.assert_close(front.encode([image]), first, atol=0, rtol=0)
    torch.testing.assert_close(again.encode([image]), first, atol=0, rtol=0)
    assert not torch.equal(FrontFeatures.debug(resolution=64, seed=1).encode([image]), first)


def test_empty_alpha_and_pixel_cap_errors(front, tmp_path):
    empty = Image.new("RGBA", (32, 32), (255, 255, 255, 0))
    with pytest.raises(FrontViewError, match="image 1: empty alpha"):
        front.preprocess([object_image(), empty])
    path = tmp_path / "empty.png"
    empty.save(path)
    with pytest.raises(FrontViewError, match=re.escape(str(path))):
        front.encode([path])
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(big)
    with pytest.raises(FrontViewError, match="pixel cap"):
        FrontFeatures(front.model, resolution=64, max_pixels=99 * 100).preprocess([big])
    assert FrontFeatures(front.model, resolution=64).preprocess([big]).shape == (1, 3, 64, 64)


def test_full_size_keys_match_reference_on_meta(reference):
    from transformers import DINOv3ViTModel

    for field, value in DINOV3_VITL16_CONFIG.items():
        assert reference["config"][field] == value, field
    with torch.device("meta"):
        model = DINOv3ViTModel(dinov3_vitl16_config())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == reference["keys"]
    assert len(got) == reference["num_keys"] == 415


def test_checkpoint_keys_load_into_module(reference, tmp_path):
    from safetensors import safe_open

    tiny = build_debug_dino(seed=3)
    tiny.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    # the tiny checkpoint uses the reference's on-disk names (layers 0 and 1), not the module names
    layers = tiny.config.num_hidden_layers
    expected = {
        k for k in reference["checkpoint_keys"] if not re.match(r"layer\.(\d+)\.", k) or int(k.split(".")[1]) < layers
    }
    assert on_disk == expected
    assert any(k.startswith("model.layer.") for k in reference["keys"]) and "layer.0.norm1.weight" in on_disk
    loaded = load_dino(tmp_path)
    for key, value in tiny.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)
    image = object_image()
    torch.testing.assert_close(
        FrontFeatures(loaded, resolution=32).encode([image]), FrontFeatures(tiny, resolution=32).encode([image])
    )


def test_folder_without_safetensors(tmp_path):
    folder = tmp_path / "dino_bin_only"
    folder.mkdir()
    build_debug_dino().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        load_dino(folder)
