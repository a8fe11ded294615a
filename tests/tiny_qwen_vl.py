"""Tests use the product's tiny offline Qwen2.5-VL (see training/debug_models.py)."""

from know3d.training.debug_models import build_tiny_qwen_vl

__all__ = ["build_tiny_qwen_vl"]
