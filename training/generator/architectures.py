"""Full-size architectures' checkpoint keys, for checking real weights (``know3d models keys``).

Each entry builds the released model's architecture on the ``meta`` device (no memory, no
weights) and lists ``{key: shape}`` under the names its official checkpoint uses, so a user can
diff a downloaded file's keys against what our loaders expect before a long job starts::

    know3d models keys ss-encoder > expected.json

Later stages add their entries here (the generator's flows and VAEs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _shapes(module: torch.nn.Module, rename: Callable[[str], str] = str) -> dict[str, list[int]]:
    return {rename(k): list(v.shape) for k, v in module.state_dict().items()}


def _ss_vae(part: str) -> dict[str, list[int]]:
    from know3d.training.generator.ss_vae import SSVaeConfig, build

    with torch.device("meta"):
        return _shapes(build(part, SSVaeConfig.full()))


def _dinov3() -> dict[str, list[int]]:
    from transformers import DINOv3ViTModel

    from know3d.training.generator.dino import checkpoint_key, dinov3_vitl16_config

    with torch.device("meta"):
        return _shapes(DINOv3ViTModel(dinov3_vitl16_config()), checkpoint_key)


def _ss_flow() -> dict[str, list[int]]:
    from know3d.training.generator.ss_flow import ss_flow_key_shapes

    return ss_flow_key_shapes(branch=True)


def _slat_flow() -> dict[str, list[int]]:
    from know3d.training.generator.slat_flow import slat_flow_key_shapes

    return slat_flow_key_shapes(branch=True)


def _shape_vae(part: str) -> dict[str, list[int]]:
    from know3d.training.generator.shape_vae import shape_vae_key_shapes

    return shape_vae_key_shapes(part)


ARCHITECTURES: dict[str, tuple[str, Callable[[], dict[str, list[int]]]]] = {
    "ss-encoder": (
        "TRELLIS sparse-structure VAE encoder ss_enc_conv3d_16l8 (64³ -> 8x16³)",
        lambda: _ss_vae("encoder"),
    ),
    "ss-decoder": (
        "TRELLIS sparse-structure VAE decoder ss_dec_conv3d_16l8 (8x16³ -> 64³)",
        lambda: _ss_vae("decoder"),
    ),
    "ss-flow": (
        "TRELLIS.2 ss_flow_img_dit_1_3B_64 + the Know3D H branch (know3d_* keys; H = 4 layers x 3072)",
        _ss_flow,
    ),
    "slat-flow-shape": (
        "TRELLIS.2 slat_flow_img2shape_dit_1_3B_512 + the Know3D H branch (know3d_* keys)",
        _slat_flow,
    ),
    "shape-encoder": (
        "TRELLIS.2 shape SC-VAE encoder shape_enc_next_dc_f16c32 (flex_gemm conv layout)",
        lambda: _shape_vae("encoder"),
    ),
    "shape-decoder": (
        "TRELLIS.2 shape SC-VAE decoder shape_dec_next_dc_f16c32 (flex_gemm conv layout)",
        lambda: _shape_vae("decoder"),
    ),
    "dinov3-vitl16": ("DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m), on-disk names", _dinov3),
}


def architecture_keys(name: str) -> dict[str, list[int]]:
    """``{key: shape}`` of one full-size architecture; an unknown name lists the known ones."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture '{name}' (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name][1]()
