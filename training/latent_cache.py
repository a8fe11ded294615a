"""Pre-pass that caches what the frozen encoders compute, so training loads only the MMDiT.

Encoder actors (one VAE + text encoder each, on GPUs when the cluster has them) take one shard at
a time through :func:`know3d.core.fanout.run_bounded` and write one ``<key>.npz`` per pair: normalized VAE latents of front and back at the training resolution and
the Qwen2.5-VL prompt embedding of *every* prompt variant of the pair (the bare instruction and
instruction + each description), since stochastic prompting picks one per step. Files are
written atomically and skipped when present, so the pass resumes; the cache folder is keyed by
model, resolution and instruction. ``np.load`` runs with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from know3d.core.fanout import make_progress, run_bounded, task_error_kind
from know3d.core.io import atomic_write
from know3d.core.logs import quiet_third_party
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


def _shard_rows(url: str) -> Iterator[dict]:
    """One shard -> rows of (key, front png, back png, components); local paths or fsspec URLs."""
    import fsspec

    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        current: dict = {}
        for member in tar:
            key, _, field = member.name.partition(".")
            if current and current["key"] != key:
                yield from _complete(current)
                current = {}
            current["key"] = key
            if field in ("front.png", "back.png", "json") and member.isfile():
                current[field] = tar.extractfile(member).read()
        yield from _complete(current)


def _complete(sample: dict) -> Iterator[dict]:
    if {"front.png", "back.png", "json"} <= set(sample):
        components = list(json.loads(sample["json"]).get("components") or [])
        yield {"key": sample["key"], "front": sample["front.png"], "back": sample["back.png"], "components": components}


class LatentEncoder:
    """One pipeline (VAE + text encoder) per Ray actor; encodes shards into the cache folder."""

    def __init__(self, cfg_json: str) -> None:
        import torch

        from know3d.training.edit_model import EditModel, load_pipeline, torch_dtype

        quiet_third_party()
        self.cfg = TrainBackviewConfig.model_validate_json(cfg_json)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(self.cfg.model.dtype, device)
        pipe = load_pipeline(self.cfg.model.name, self.cfg.model.revision, dtype=dtype, transformer=None)
        pipe.set_progress_bar_config(disable=True)
        self.model = EditModel(pipe, device, dtype, self.cfg.data.image_size)
        self.folder = cache_folder(self.cfg)
        self.folder.mkdir(parents=True, exist_ok=True)

    def encode_shard(self, url: str, wanted: list[str] | None = None) -> dict[str, int]:
        """Encode the shard's pairs (only ``wanted`` keys when given); counts per status."""
        keep = set(wanted) if wanted is not None else None
        rows = (r for r in _shard_rows(url) if keep is None or r["key"] in keep)
        return dict(Counter(self.encode(list(rows))))

    def encode(self, rows: list[dict]) -> list[str]:
        """``encoded`` or ``cached`` (the file exists: the pass resumes) per row; the VAE sees
        ``cache.batch_size`` pairs per call."""
        todo = [r for r in rows if not self._target(r).is_file()]
        size = self.cfg.cache.batch_size
        for start in range(0, len(todo), size):
            self._encode_chunk(todo[start : start + size])
        fresh = {r["key"] for r in todo}
        return ["encoded" if r["key"] in fresh else "cached" for r in rows]

    def _target(self, row: dict) -> Path:
        return self.folder / f"{row['key']}.npz"

    def _encode_chunk(self, rows: list[dict]) -> None:
        import torch

        size = self.cfg.data.image_size
        images = [
            decode_image(bytes(r[side]), size, f"{r['key']}.{side}.png") for r in rows for side in ("front", "back")
        ]
        latents = self.model.encode_images(torch.from_numpy(np.stack(images))).cpu().numpy()
        for i, row in enumerate(rows):
            arrays = {
                "front_latent": latents[2 * i],
                "back_latent": latents[2 * i + 1],
                "components": np.array(row["components"], dtype=np.str_),
            }
            front = images[2 * i]
            for k, prompt in enumerate(prompt_variants(row["components"], self.cfg.data.instruction)):
                arrays[f"prompt_{k}"] = self.model.encode_prompt(prompt, front).cpu().numpy()
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write(self._target(row), buf.getvalue())


def _wanted(cfg: TrainBackviewConfig, urls: list[str]) -> list[str] | None:
    """The selected keys when a subset trains (only those are encoded); None = all."""
    if not (cfg.data.keys or cfg.data.max_pairs or cfg.data.max_pairs_per_asset):
        return None
    from know3d.training.data import PairStream

    d = cfg.data
    stream = PairStream(urls, cfg.seed, keys=d.keys, max_pairs=d.max_pairs, max_pairs_per_asset=d.max_pairs_per_asset)
    return [s["__key__"] for s in stream.selection()]


def build_cache(cfg: TrainBackviewConfig, urls: list[str], ray: Any) -> dict[str, int]:
    """Run the pre-pass over ``urls`` (``cache.concurrency`` encoder actors, one shard per call);
    returns counts per status. A shard that fails raises, naming it, after the others finished."""
    gpus = cfg.cache.num_gpus_per_worker if ray.cluster_resources().get("GPU", 0) > 0 else 0
    wanted = _wanted(cfg, urls)
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=1)(LatentEncoder)
    actors = [actor_cls.remote(cfg.model_dump_json()) for _ in range(min(cfg.cache.concurrency, len(urls)))]
    counts: Counter[str] = Counter()
    errors: list[str] = []

    def on_done(url: str, result: dict[str, int] | Exception) -> None:
        (errors.append(f"{url}: {task_error_kind(result)}") if isinstance(result, Exception) else counts.update(result))

    with make_progress() as progress:  # the pre-pass takes minutes on a real data set: say how far it is
        run_bounded(
            ray, lambda url, actor: actor.encode_shard.remote(url, wanted), urls, actors, on_done, progress, "cache"
        )
    for actor in actors:
        ray.kill(actor)
    if errors:
        raise RuntimeError(f"latent cache: {len(errors)} shard(s) failed, e.g. {errors[0]}")
    return dict(counts)


def load_entry(folder: Path, key: str) -> dict[str, np.ndarray]:
    path = folder / f"{key}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the latent cache (run the pre-pass: cache.enabled=true)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
