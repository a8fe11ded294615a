"""Streaming front/back pairs from the data build's WebDataset shards.

Deterministic for a seed and resumable mid-epoch: each epoch permutes the shards with
``(seed, epoch)``, rank ``r`` of ``w`` reads every ``w``-th shard of that order, and a shuffle
buffer seeded with ``(seed, epoch, rank)`` mixes samples across shards. The sequence a rank sees
is therefore a pure function of (shards, seed, epoch, rank, world size); resuming replays it and
skips the samples already consumed *before* decoding any image. Shard URLs are anything
``webdataset`` opens (local paths, ``http(s)://``, ``pipe:`` commands for object stores).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds
from PIL import Image

from know3d.core.shards import open_image


@dataclass
class StreamState:
    """Where a rank is: restore it from a checkpoint to continue mid-epoch."""

    epoch: int = 0
    consumed: int = 0  # samples of this epoch already yielded by this rank

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}


def shards_for(urls: list[str], seed: int, epoch: int, rank: int, world_size: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    order = sorted(urls)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order[rank::world_size]


def _raw_samples(urls: list[str]) -> Iterator[dict]:
    if not urls:
        return iter(())
    return iter(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False))


def _shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def image_to_array(img: Image.Image, size: int | None = None) -> np.ndarray:
    """Any PIL image -> float32 [3, H, W] in [-1, 1], alpha composited on white (what image VAEs expect)."""
    img = img.convert("RGBA")
    canvas = Image.new("RGB", img.size, (255, 255, 255))
    canvas.paste(img, mask=img.split()[3])
    if size is not None and canvas.size != (size, size):
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
    return (np.asarray(canvas, np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def decode_image(png: bytes, size: int | None = None, what: str = "image") -> np.ndarray:
    """RGBA PNG bytes -> float32 [3, H, W] in [-1, 1] on white; an image above the shard format's
    bound is refused before decoding (:func:`know3d.core.shards.open_image`)."""
    with open_image(png, what) as img:
        return image_to_array(img, size)


class PairStream:
    """Iterates one rank's samples of one epoch from ``state`` on (and advances ``state``)."""

    def __init__(
        self,
        urls: list[str],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 256,
        image_size: int | None = None,
        decode: bool = True,
        keys: list[str] | None = None,
        max_pairs: int | None = None,
        max_pairs_per_asset: int | None = None,
    ) -> None:
        if not urls:
            raise ValueError("no shards to read")
        self.urls = list(urls)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.image_size = image_size
        self.decode = decode  # False: keys and descriptions only (training from a latent cache)
        self.keys_wanted = set(keys or ())
        self.max_pairs = max_pairs
        self.max_pairs_per_asset = max_pairs_per_asset
        self._selection: list[dict] | None = None

    @property
    def selective(self) -> bool:
        return bool(self.keys_wanted or self.max_pairs or self.max_pairs_per_asset)

    def keys(self, epoch: int) -> Iterator[str]:
        """Sample keys in this rank's order for ``epoch`` (no image decoding)."""
        for sample in self._ordered(epoch):
            yield sample["__key__"]

    def selection(self) -> list[dict]:
        """The selected pairs, in shard order, undecoded: those in ``keys`` (all when empty), at
        most ``max_pairs_per_asset`` per asset, then the first ``max_pairs``. One streaming pass
        that stops once the selection is complete; computed once."""
        if self._selection is None:
            kept: list[dict] = []
            per_asset: dict[str, int] = {}
            for s in _raw_samples(sorted(self.urls)):
                if self.keys_wanted and s["__key__"] not in self.keys_wanted:
                    continue
                if self.max_pairs_per_asset:
                    asset = json.loads(s["json"])["asset_id"]
                    per_asset[asset] = per_asset.get(asset, 0) + 1
                    if per_asset[asset] > self.max_pairs_per_asset:
                        continue
                kept.append(s)
                if self.max_pairs and len(kept) == self.max_pairs:
                    break
            missing = self.keys_wanted - {s["__key__"] for s in kept}
            if missing and not (self.max_pairs and len(kept) == self.max_pairs):
                raise ValueError(f"data.keys not in the training shards: {', '.join(sorted(missing)[:5])}")
            self._selection = kept
        return self._selection

    def _ordered(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"samples:{self.seed}:{epoch}:{self.rank}")
        if self.selective:  # a small selection, held in memory
            chosen = self.selection()
            if len(chosen) < self.world_size:
                raise ValueError(f"{len(chosen)} selected pairs cannot feed {self.world_size} workers")
            mine = chosen[self.rank :: self.world_size]
            return _shuffled(iter(mine), self.shuffle_buffer, rng)
        if len(self.urls) >= self.world_size:
            urls = shards_for(self.urls, self.seed, epoch, self.rank, self.world_size)
            return _shuffled(_raw_samples(urls), self.shuffle_buffer, rng)
        # Fewer shards than ranks: every rank reads all shards and keeps every w-th sample.
        urls = shards_for(self.urls, self.seed, epoch, 0, 1)
        mine = (s for i, s in enumerate(_raw_samples(urls)) if i % self.world_size == self.rank)
        return _shuffled(mine, self.shuffle_buffer, rng)

    def forever(self, state: StreamState) -> Iterator[dict]:
        """Samples across epochs, from ``state`` on (``state`` advances; epochs roll over)."""
        while True:
            produced = False
            for sample in self.iterate(state):
                produced = True
                yield sample
            if not produced and state.consumed == 0:
                raise ValueError(f"rank {self.rank}: the shards hold no samples for this rank")
            state.epoch += 1
            state.consumed = 0

    def iterate(self, state: StreamState) -> Iterator[dict]:
        """Decoded samples from ``state``; ``state.consumed`` counts what was yielded."""
        for index, sample in enumerate(self._ordered(state.epoch)):
            if index < state.consumed:
                continue
            meta = json.loads(sample["json"])
            state.consumed = index + 1
            out = {
                "key": sample["__key__"],
                "components": list(meta.get("components") or []),
                "asset_id": meta["asset_id"],
                "pair_index": meta["pair_index"],
            }
            if self.decode:
                where = f"{sample.get('__url__', 'shard')}: {sample['__key__']}"
                out["front"] = decode_image(sample["front.png"], self.image_size, f"{where} front.png")
                out["back"] = decode_image(sample["back.png"], self.image_size, f"{where} back.png")
            yield out
