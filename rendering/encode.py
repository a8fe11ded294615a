"""Lossless PNG encoding of rendered views, off the render loop's critical path.

At 512² a view is 4 PNGs (RGBA, 16-bit depth, normals, mask). Pillow at compression level 3 spent
73 % of a GPU render actor's time on them (issue 18). Two changes, decoded pixels unchanged:

* ``png_encoder: fast`` (default): imagecodecs' libpng with zlib-ng at level 1, run-length strategy
  and the SUB filter (OpenCV's fast setting); files are about as small as Pillow's level 3.
  ``pillow`` keeps the former encoder (level 3) for comparison.
* :class:`ViewWriter`: a pool of ``encode_threads`` threads per render actor encodes (and computes
  the normals of) each view as soon as GL has read it back, while the next one renders. zlib-ng,
  libpng and NumPy release the GIL, so the threads run in parallel.

Any decoder reads these PNGs to the same arrays (the shard format is unchanged).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

PNG_LEVEL = 3  # the Pillow path's zlib level (the format's original setting)
FAST_LEVEL, FAST_STRATEGY, FAST_FILTER = 1, 3, 16  # zlib-ng speed, Z_RLE, PNG SUB filter


def encode_png(array: np.ndarray, encoder: Literal["fast", "pillow"] = "fast") -> bytes:
    """``[H, W]`` (uint8 / uint16) or ``[H, W, 3 | 4]`` uint8 -> PNG bytes."""
    if encoder == "fast":
        import imagecodecs

        return bytes(
            imagecodecs.png_encode(
                np.ascontiguousarray(array), level=FAST_LEVEL, strategy=FAST_STRATEGY, filter=FAST_FILTER
            )
        )
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def view_images(view, depth_scale: float, outputs, background: str) -> dict[str, np.ndarray]:
    """The arrays written for one view, by subfolder (``rgba`` always; ``depth`` uint16 =
    round(depth / depth_scale), ``normal`` (n + 1) * 127.5 on the mask, ``mask`` 0/255 as enabled)."""
    from know3d.rendering.process import compose_background

    images = {"rgba": compose_background(view.rgba, background)}
    if outputs.depth:
        images["depth"] = np.clip(np.round(view.depth / depth_scale), 0, 65535).astype(np.uint16)
    if outputs.normal:
        encoded = np.where(view.mask[..., None], (view.normal + 1.0) * 127.5, 0.0)
        images["normal"] = np.clip(np.round(encoded), 0, 255).astype(np.uint8)
    if outputs.mask:
        images["mask"] = (view.mask * 255).astype(np.uint8)
    return images


def default_threads() -> int:
    """Encoder threads when the config says 0: the cores this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class ViewWriter:
    """Writes each submitted view's PNGs into ``out/<sub>/NNN.png`` on a thread pool; use as a
    context manager (leaving it waits for every view and raises the first error)."""

    def __init__(
        self,
        out: Path,
        depth_scale: float,
        outputs,
        background: str,
        encoder: Literal["fast", "pillow"] = "fast",
        threads: int = 0,
    ) -> None:
        self.out, self.depth_scale, self.outputs = Path(out), depth_scale, outputs
        self.background, self.encoder = background, encoder
        self.threads = threads or default_threads()
        subs = ("rgba", *(s for s in ("depth", "normal", "mask") if getattr(outputs, s)))
        for sub in subs:
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png") if self.threads > 1 else None
        self._jobs: list[Future] = []

    def _write(self, index: int, view) -> None:
        for sub, array in view_images(view, self.depth_scale, self.outputs, self.background).items():
            (self.out / sub / f"{index:03d}.png").write_bytes(encode_png(array, self.encoder))

    def submit(self, index: int, view) -> None:
        if self._pool is None:
            self._write(index, view)
        else:
            self._jobs.append(self._pool.submit(self._write, index, view))

    def close(self) -> None:
        if self._pool is None:
            return
        try:
            for job in self._jobs:
                job.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ViewWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
