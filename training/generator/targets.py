"""The generator's per-asset 3D targets, stored beside a data build and joined to its pairs.

Occupancy and the sparse-structure latent belong to an *asset* (all its pairs share them), so
they live in a keyed side store next to the shards instead of being repeated in every sample::

    <dataset>/targets/<tag>/<sha[:2]>/<sha256>.safetensors
        coords  int16 [N, 3]   occupied voxels (know3d.training.generator.occupancy convention)
        latent  float32 [8, r, r, r]   SS-VAE encoder mean
        metadata: resolution, encoder

``tag`` names the encoder (its weights' digest) and the grid resolution, so another SS-VAE gets
another folder. Writes are atomic and existing entries are skipped: the pass resumes.
:func:`generator_records` then yields one record per pair — front, back, description,
occupancy, latent — from the shards plus this store.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from know3d.core.errors import describe_exception
from know3d.core.io import atomic_write
from know3d.core.shards import iter_samples, load_index, resolve_shards
from know3d.training.generator.occupancy import Occupancy, asset_occupancy
from know3d.training.generator.ss_vae import SSVae

TARGETS_DIR = "targets"


class TargetError(Exception):
    """An asset whose targets cannot be made (the reason names it)."""


def encoder_digest(vae: SSVae) -> str:
    """Identity of the encoder weights (what the stored latents depend on)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TargetStore:
    """One data build's targets for one encoder and grid resolution."""

    def __init__(self, dataset: Path, vae: SSVae) -> None:
        self.dataset = Path(dataset)
        self.vae = vae
        self.resolution = vae.cfg.resolution
        self.encoder = encoder_digest(vae)
        self.root = Path(dataset) / TARGETS_DIR / f"r{self.resolution}-{self.encoder}"

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def get(self, sha: str) -> dict | None:
        from safetensors.numpy import load_file

        file = self.path(sha)
        if not file.is_file():
            return None
        arrays = load_file(str(file))
        return {"coords": arrays["coords"].astype(np.int64), "latent": arrays["latent"]}

    def put(self, sha: str, occupancy: Occupancy) -> dict:
        """Encode ``occupancy`` and store it with its latent."""
        from safetensors.numpy import save

        grid = torch.from_numpy(occupancy.grid.astype(np.float32))[None, None]
        with torch.no_grad():
            latent = self.vae.encoder(grid)[0].float().numpy()
        arrays = {
            "coords": np.ascontiguousarray(occupancy.coords, dtype=np.int16),
            "latent": np.ascontiguousarray(latent),
        }
        meta = {"resolution": str(self.resolution), "encoder": self.encoder}
        atomic_write(self.path(sha), save(arrays, metadata=meta))
        return {"coords": occupancy.coords, "latent": latent}


def _rendered_assets(dataset: Path) -> Iterator[dict]:
    """asset.json of every asset rendered for the dataset's current shards."""
    fingerprint = load_index(dataset).get("render_fingerprint")
    if not fingerprint:
        raise FileNotFoundError(f"{dataset}: no shard index with a render fingerprint (run `know3d data build`)")
    for file in sorted((Path(dataset) / "work" / fingerprint).glob("*/*/asset.json")):
        yield json.loads(file.read_text())


def asset_name(summary: dict) -> str:
    """How messages name a rendered asset: its file name, else its key, else its hash."""
    uri = summary.get("uri") or ""
    return Path(uri).name or summary.get("key") or summary["sha256"]


def build_each(store, make) -> tuple[dict[str, int], dict[str, str]]:
    """The per-asset pass both target stores share: for every rendered asset of ``store.dataset``
    not yet at ``store.path(sha)``, ``make(sha, path)`` with its local mesh file. Returns counts
    (``encoded`` / ``cached`` / ``failed``) and, per failed asset (by key), a reason naming its file;
    one asset's failure never stops the others."""
    from know3d.rendering.assets import AssetError

    counts: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for summary in _rendered_assets(store.dataset):
        sha, uri = summary["sha256"], summary.get("uri") or ""
        if store.path(sha).is_file():
            counts["cached"] += 1
            continue
        name = asset_name(summary)
        try:
            if not uri or not Path(uri).is_file():
                raise TargetError(f"{name}: not a local file")
            make(sha, Path(uri))
            counts["encoded"] += 1
        except Exception as exc:  # noqa: BLE001 - one asset's problem is that asset's alone
            counts["failed"] += 1
            if isinstance(exc, (TargetError, AssetError)):  # plain messages that name the file
                reason = str(exc)
            else:
                message = describe_exception(exc)
                reason = message if name in str(exc) else f"{name}: {message}"
            failures[summary.get("key") or sha] = reason
    return dict(counts), failures


def encoder_for_targets(ss_vae: str) -> SSVae:
    """The SS-VAE whose encoder makes stage 1's latents: 'debug' (the shipped 32³ CPU model) or a
    folder / .safetensors / hub id with TRELLIS's ss_enc weights (no decoder loaded)."""
    from know3d.training.generator.debug_ss_vae import resolve_debug_ss_vae
    from know3d.training.generator.ss_vae import load_ss_vae

    if ss_vae == "debug":
        return resolve_debug_ss_vae()
    encoder = load_ss_vae(ss_vae, "encoder")
    return SSVae(encoder, None, encoder.cfg)


def build_targets(store: TargetStore) -> tuple[dict[str, int], dict[str, str]]:
    """Occupancy + latent of every rendered asset of the store's data build (those already
    stored are skipped). The asset file is the record's ``uri`` when it is a local file (local
    and procedural sources). Returns counts per status and a reason per failed asset."""
    return build_each(store, lambda sha, path: store.put(sha, asset_occupancy(path, store.resolution)))


def generator_records(store: TargetStore, split: str = "train") -> Iterator[dict]:
    """One record per pair: ``key``, ``front``/``back`` (PNG bytes), ``components``,
    ``coords`` (occupied voxels) and ``latent``. Pairs whose asset has no stored target are
    skipped (build them with :func:`build_targets`)."""
    urls = resolve_shards([str(store.dataset)], split)[0]
    for sample in iter_samples([Path(u) for u in urls]):
        meta = json.loads(sample["json"])
        target = store.get(meta["asset_id"])
        if target is None:
            continue
        yield {
            "key": sample["__key__"],
            "front": sample["front.png"],
            "back": sample["back.png"],
            "components": list(meta.get("components") or []),
            **target,
        }
