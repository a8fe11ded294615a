"""The generator's loader: one record per pair from a data build, its targets and its condition.

Everything the 3D generator trains on is joined by keys, never copied into new shards:

* the pair (front view, description) from the data build's shards — indexed once by byte
  offset, so a record reads one front PNG with one seek (random access, any shuffle);
* the asset's targets, by the pair's ``asset_id``: stage 1's (occupancy + SS latent) from a
  :mod:`~know3d.training.generator.targets` store, or stage 2's (shape latent on its sparse
  coordinates + the fine dual grid) from a :mod:`~know3d.training.generator.shape_targets` store —
  whichever ``targets`` is (told apart by its ``shape-`` folder prefix or its entries' ``kind``);
* the condition from the hidden-state cache (:mod:`~know3d.training.generator.hidden_states`),
  by pair key: ``hidden`` (H), or an ablation variant ``vae_latent`` / ``dino_back``; ``none``
  reads no condition (plain TRELLIS.2 fine-tuning);
* the front view's DINOv3 tokens, computed from the front view by a frozen
  :class:`~know3d.training.generator.dino.FrontFeatures` when one is given (TRELLIS.2 encodes the
  image in the training step too; a trainer on a GPU passes ``dino=None`` and encodes the batch's
  ``front`` images itself).

Pairs whose target or condition is missing are left out and counted in ``skipped`` (a trainer
logs them), so a partially built cache trains on what is there instead of failing mid-epoch.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from know3d.core.shards import open_image, resolve_shards
from know3d.training.generator.config import CONDITIONS


class GeneratorDataError(Exception):
    """The loader's inputs are unusable (the message names the file and why)."""


@dataclass(frozen=True)
class PairRef:
    key: str
    shard: str
    offset: int  # byte offset of front.png's data in the (uncompressed) tar
    size: int
    asset: str  # asset sha256: the targets key
    components: tuple[str, ...]


def index_pairs(urls: list[str]) -> tuple[list[PairRef], Counter[str]]:
    """Every pair of local, uncompressed tar shards with its front view's byte range (headers and
    the small JSON are read; PNG payloads are skipped)."""
    refs: list[PairRef] = []
    skipped: Counter[str] = Counter()
    for url in urls:
        path = Path(url)
        if not path.is_file() or path.suffix != ".tar":
            raise GeneratorDataError(f"{url}: the generator's loader reads local .tar shards")
        fronts: dict[str, tuple[int, int]] = {}
        metas: dict[str, dict] = {}
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                if not member.isfile():
                    continue
                if field == "front.png":
                    fronts[key] = (member.offset_data, member.size)
                elif field == "json":
                    metas[key] = json.loads(tar.extractfile(member).read())
        for key, meta in metas.items():
            if key not in fronts:
                skipped["no_front_view"] += 1
                continue
            refs.append(PairRef(key, str(path), *fronts[key], meta["asset_id"], tuple(meta.get("components") or ())))
    return refs, skipped


def read_front(ref: PairRef) -> Image.Image:
    """The pair's front view (RGBA), size-bounded before decoding (the shard format's bound)."""
    with open(ref.shard, "rb") as fh:
        fh.seek(ref.offset)
        data = fh.read(ref.size)
    try:
        image = open_image(data, f"{ref.key}.front.png")
    except ValueError as exc:
        raise GeneratorDataError(str(exc)) from None
    with image:
        return image.convert("RGBA")


class GeneratorPairs(torch.utils.data.Dataset):
    """Map-style dataset of a data build's pairs for the 3D generator.

    ``targets``: a target store folder — stage 1's ``<dataset>/targets/r<res>-<encoder>`` or
    stage 2's ``<dataset>/targets/shape-r<res>-<encoder>`` (:attr:`stage` says which);
    ``condition``: one of :data:`CONDITIONS`; ``condition_dir``: the hidden-state cache folder
    (``cache_folder(cfg)``) holding that variant. A record is ``{key, asset, front (PIL RGBA),
    components, condition float32 [T, C] | None, prompt, description}`` plus ``dino`` [N, D] when
    ``dino`` is given, plus the targets:

    * stage 1 (``stage == "ss"``): ``latent`` float32 [8, r, r, r], ``occupancy`` bool [R, R, R];
    * stage 2 (``stage == "shape"``): ``shape_coords`` int64 [M, 3] (latent coordinates),
      ``shape_feats`` float32 [M, C] (normalized latent) and ``grid``, the fine
      :class:`~know3d.training.generator.dual_grid.DualGrid` (vertices quantized to 1/255 as
      stored; the truth validation meshes and scores are made from).
    """

    def __init__(
        self,
        dataset: str | Path,
        targets: str | Path,
        condition: str = "hidden",
        condition_dir: str | Path | None = None,
        split: str = "train",
        dino=None,
        keys: list[str] | None = None,
    ) -> None:
        if condition not in CONDITIONS:
            raise GeneratorDataError(f"condition '{condition}' is not one of {', '.join(CONDITIONS)}")
        self.targets = Path(targets)
        if not self.targets.is_dir():
            raise GeneratorDataError(f"{self.targets}: no target store (run `know3d data targets`)")
        from know3d.training.generator.shape_targets import is_shape_store

        self.stage = "shape" if is_shape_store(self.targets) else "ss"
        self.condition = condition
        self.condition_dir = Path(condition_dir) if condition_dir else None
        if condition != "none" and (self.condition_dir is None or not self.condition_dir.is_dir()):
            raise GeneratorDataError(
                f"condition '{condition}' needs the hidden-state cache folder (run `know3d data hidden-states`), "
                f"got {self.condition_dir}"
            )
        self.dino = dino
        urls, _ = resolve_shards([str(dataset)], split)
        if not urls:
            raise GeneratorDataError(f"{dataset}: no {split} shards")
        refs, self.skipped = index_pairs(urls)
        wanted = set(keys) if keys is not None else None
        self.refs: list[PairRef] = []
        for ref in refs:
            if wanted is not None and ref.key not in wanted:
                continue
            if not self._target_path(ref.asset).is_file():
                self.skipped["no_target"] += 1
            elif condition != "none" and not self._condition_path(ref.key).is_file():
                self.skipped["no_condition"] += 1
            else:
                self.refs.append(ref)

    def _target_path(self, sha: str) -> Path:
        return self.targets / sha[:2] / f"{sha}.safetensors"

    def _condition_path(self, key: str) -> Path:
        assert self.condition_dir is not None
        return self.condition_dir / f"{key}.safetensors"

    def __len__(self) -> int:
        return len(self.refs)

    def target(self, sha: str) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1: (latent float32 [8, r, r, r], occupancy bool [R, R, R]) of one asset."""
        from safetensors import safe_open

        path = self._target_path(sha)
        with safe_open(str(path), framework="np") as f:
            resolution = int(f.metadata()["resolution"])
            latent, coords = f.get_tensor("latent"), f.get_tensor("coords").astype(np.int64)
        occupancy = np.zeros((resolution,) * 3, dtype=bool)
        occupancy[tuple(coords.T)] = True
        return latent.astype(np.float32), occupancy

    def shape_target(self, sha: str) -> dict[str, Any]:
        """Stage 2: ``{shape_coords int64 [M, 3], shape_feats float32 [M, C], grid DualGrid}``."""
        from know3d.training.generator.shape_targets import read_shape_target

        path = self._target_path(sha)
        try:
            entry = read_shape_target(path)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file is reported by path
            raise GeneratorDataError(f"{path}: unreadable shape target ({exc})") from None
        return {
            "shape_coords": torch.from_numpy(entry["coords"]),
            "shape_feats": torch.from_numpy(entry["feats"]),
            "grid": entry["grid"],
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.refs[index]
        record: dict[str, Any] = {
            "key": ref.key,
            "asset": ref.asset,
            "front": read_front(ref),
            "components": list(ref.components),
        }
        if self.stage == "shape":
            record.update(self.shape_target(ref.asset))
        else:
            latent, occupancy = self.target(ref.asset)
            record.update(latent=torch.from_numpy(latent), occupancy=torch.from_numpy(occupancy))
        record.update(condition=None, prompt=None, description=None)
        if self.condition != "none":
            from know3d.training.generator.hidden_states import load_entry

            tensors, meta = load_entry(self.condition_dir, ref.key)
            if self.condition not in tensors:
                raise GeneratorDataError(
                    f"{self._condition_path(ref.key)}: no '{self.condition}' tensor "
                    f"(the cache holds {sorted(tensors)}; set hidden.variants)"
                )
            record.update(
                condition=tensors[self.condition].float(), prompt=meta["prompt"], description=meta["description"]
            )
        if self.dino is not None:
            record["dino"] = self.dino.encode([record["front"]])[0].float().cpu()
        return record
