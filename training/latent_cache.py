"""Pre-pass that caches what the frozen encoders compute, so training loads only the MMDiT.

A Ray Data pipeline over the shards (``from_items(shards) → flat_map(read shard) →
map_batches(LatentEncoder)``; the encoder actors take GPUs when the cluster has them) writes one
``<key>.npz`` per pair: normalized VAE latents of front and back at the training resolution and
the Qwen2.5-VL prompt embedding of *every* prompt variant of the pair (the bare instruction and
instruction + each description), since stochastic prompting picks one per step. Files are
written atomically and skipped when present, so the pass resumes; the cache folder is keyed by
model, resolution and instruction. ``np.load`` runs with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from know3d.training.config import TrainBackviewConfig
from know3d.training.data import decode_image
from know3d.training.prompting import prompt_variants


def model_identity(name: str) -> str:
    """What identifies the encoders' weights behind a model name: for ``debug:`` models the cached
    build folder (its name carries the build tag), for local folders the bytes of every config
    file and the size and mtime of every weight file; hub ids are identified by name + revision."""
    from know3d.training.edit_model import resolve_model_path

    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return name
    parts = [str(path.resolve())]
    for f in sorted(path.rglob("*")):
        if f.suffix == ".json":
            parts.append(f"{f.relative_to(path)}:{hashlib.sha256(f.read_bytes()).hexdigest()}")
        elif f.suffix == ".safetensors":
            st = f.stat()
            parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def cache_folder(cfg: TrainBackviewConfig) -> Path:
    """Keyed by the encoders' identity, resolution and instruction: a rebuilt debug model or
    changed local weights get a new folder instead of stale latents."""
    tag = hashlib.sha256(
        json.dumps(
            [model_identity(cfg.model.name), cfg.model.revision, cfg.data.image_size, cfg.data.instruction]
        ).encode()
    ).hexdigest()[:12]
    root = Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.output) / "latent_cache"
    return root / tag


def _shard_rows(row: dict) -> list[dict]:
    """One shard -> rows of (key, front png, back png, components); local paths or fsspec URLs."""
    import fsspec

    rows, current = [], {}
    with fsspec.open(row["url"], "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            if current and current["key"] != key:
                rows.append(current)
                current = {}
            current["key"] = key
            if field in ("front.png", "back.png", "json") and member.isfile():
                current[field] = tar.extractfile(member).read()
    if current:
        rows.append(current)
    out = []
    for r in rows:
        if {"front.png", "back.png", "json"} <= set(r):
            meta = json.loads(r["json"])
            out.append(
                {
                    "key": r["key"],
                    "front": r["front.png"],
                    "back": r["back.png"],
                    "components": json.dumps(list(meta.get("components") or [])),
                }
            )
    return out


class LatentEncoder:
    """Ray Data callable class: one pipeline (VAE + text encoder) per actor."""

    def __init__(self, cfg_json: str) -> None:
        import torch

        from know3d.training.edit_model import EditModel, load_pipeline, torch_dtype

        self.cfg = TrainBackviewConfig.model_validate_json(cfg_json)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(
            self.cfg.model.name,
            self.cfg.model.revision,
            dtype=torch_dtype(self.cfg.model.dtype, device),
            transformer=None,
        )
        pipe.set_progress_bar_config(disable=True)
        self.model = EditModel(pipe, device, torch_dtype(self.cfg.model.dtype, device), self.cfg.data.image_size)
        self.folder = cache_folder(self.cfg)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict) -> dict:
        import torch

        statuses = []
        for key, front_png, back_png, comps in zip(batch["key"], batch["front"], batch["back"], batch["components"]):
            target = self.folder / f"{key}.npz"
            if target.is_file():
                statuses.append("cached")
                continue
            size = self.cfg.data.image_size
            front, back = decode_image(bytes(front_png), size), decode_image(bytes(back_png), size)
            lat = self.model.encode_images(torch.from_numpy(np.stack([front, back])))
            arrays = {
                "front_latent": lat[0].cpu().numpy(),
                "back_latent": lat[1].cpu().numpy(),
                "components": np.array(json.loads(comps), dtype=np.str_),
            }
            for i, prompt in enumerate(prompt_variants(json.loads(comps), self.cfg.data.instruction)):
                arrays[f"prompt_{i}"] = self.model.encode_prompt(prompt, front).cpu().numpy()
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, target)
            statuses.append("encoded")
        return {"key": list(batch["key"]), "status": statuses}


def build_cache(cfg: TrainBackviewConfig, urls: list[str], ray) -> dict[str, int]:
    """Run the pre-pass over ``urls``; returns counts per status."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = cfg.cache.num_gpus_per_worker if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ray.data.from_items([{"url": u} for u in urls]).flat_map(_shard_rows)
    if cfg.data.keys or cfg.data.max_pairs or cfg.data.max_pairs_per_asset:  # a subset trains: encode only it
        from know3d.training.data import PairStream

        stream = PairStream(
            urls,
            cfg.seed,
            keys=cfg.data.keys,
            max_pairs=cfg.data.max_pairs,
            max_pairs_per_asset=cfg.data.max_pairs_per_asset,
        )
        wanted = {s["__key__"] for s in stream.selection()}
        ds = ds.filter(lambda row: row["key"] in wanted)
    ds = ds.map_batches(
        LatentEncoder,
        fn_constructor_args=(cfg.model_dump_json(),),
        batch_size=cfg.cache.batch_size,
        concurrency=cfg.cache.concurrency,
        num_gpus=gpus,
        batch_format="numpy",
    )
    counts: dict[str, int] = {}
    for row in ds.iter_rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def load_entry(folder: Path, key: str) -> dict[str, np.ndarray]:
    path = folder / f"{key}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the latent cache (run the pre-pass: cache.enabled=true)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
