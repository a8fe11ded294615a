"""Reading weight files safely: safetensors, or torch pickles restricted to tensors (weights_only)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


class CheckpointError(Exception):
    """A checkpoint is missing, unsafe to load, or does not match the architecture."""


def read_checkpoint(path: Path) -> Any:
    """safetensors, or a torch pickle restricted to tensors/containers (weights_only=True)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a corrupt file is reported, not raised through
            raise CheckpointError(
                f"{path.name}: not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
    try:
        # ULIP/Uni3D training checkpoints also store their argparse namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # memory-mapped: a 17 GB file is not read into memory twice
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise CheckpointError(
            f"{path.name}: cannot be loaded with weights_only=True ({type(exc).__name__}: {str(exc)[:200]}). "
            "Only tensors and plain containers are accepted; convert a trusted file to .safetensors"
        ) from None
