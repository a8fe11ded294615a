"""``know3d generate shapes``: :class:`~know3d.training.generator.generate.ShapeGenerator` over a
folder of front views on Ray, written in HY3D-Bench's layout so ``know3d eval shapes --pred``
scores it as it is.

Inputs, uids in sorted order, one of two layouts (not both)::

    <images>/<uid>/000.png        HY3D-Bench (000.jpg/.webp too; optional <uid>/prompt.txt)
    <images>/<uid>.png            a flat folder (uid = the file's stem)

A prompts file (``{uid: prompt}``, JSON) wins over ``prompt.txt``. Output::

    <output>/<uid>/000.glb        the mesh (moved in atomically: present means complete)
    <output>/<uid>/work/          back.png, occupancy.npz, shape.json of the chain
    <output>/generation.json      per uid: status (ok | no_mesh | failed), reason, seconds

Every uid ends as one entry of ``generation.json`` and nothing stops the others: a bad image
(no alpha, not an image) is refused on the driver before any model slot is spent on it, a uid
whose generation raises is ``failed`` with the error, one whose actor crashed is ``failed`` with
that (the actor restarts for the rest). A generator that cannot be loaded stops the run before
any uid, with one line. A uid whose ``000.glb`` and ``shape.json`` exist is reused unless
``fresh`` — so a killed run continues where it stopped — as long as its ``shape.json`` says it was
made from the same front view (content), prompt, generator exports, seed and sampler settings;
a uid whose inputs changed is generated again.

Split as every stage is: pure functions (:func:`discover_inputs`, :func:`plan`,
:func:`generate_one`) usable without Ray, and a thin actor (:class:`GenerationWorker`, one loaded
chain each) fanned out with :func:`~know3d.core.fanout.run_bounded`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from know3d.core.config import RayConfig
from know3d.core.fanout import make_progress, run_bounded, task_error_kind
from know3d.core.io import atomic_write
from know3d.core.runtime import UsageError, check_output, ray_session

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # as `know3d eval shapes --images` reads them
PROMPT_FILE = "prompt.txt"
MESH_NAME = "000.glb"
WORK_DIR = "work"
RECORD_FILE = "generation.json"
STATUSES = ("ok", "no_mesh", "failed")
MAX_REASON = 500
log = logging.getLogger(__name__)


class GenerationError(UsageError):
    """The batch cannot run as given (bad folders, a generator that does not load); one line."""


@dataclass(frozen=True)
class Job:
    """One uid: its front view and prompt, or ``problem``, why it cannot be generated."""

    uid: str
    image: str | None
    prompt: str | None = None
    problem: str | None = None
    made_from: dict[str, Any] | None = None  # what the mesh depends on: see :func:`made_from`


@dataclass
class Inputs:
    """What :func:`discover_inputs` found; ``unmatched_prompts``: prompt uids without an image."""

    layout: str  # "hy3d" | "flat"
    jobs: list[Job]
    unmatched_prompts: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    """The finished batch: counts per status (``skipped``: reused from an earlier run, also
    counted as ``ok``), the failed and mesh-less uids with their reasons, wall seconds."""

    output: Path
    record: Path
    counts: dict[str, int]
    seconds: float
    failures: list[tuple[str, str]]
    no_mesh: list[tuple[str, str]]
    unmatched_prompts: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts[s] for s in STATUSES)


# --------------------------------------------------------------------------- inputs


def _image_in(folder: Path) -> Path | None:
    """``<folder>/000.<ext>`` for the first of :data:`IMAGE_EXTENSIONS` present."""
    by_ext = {p.suffix.lower().lstrip("."): p for p in folder.iterdir() if p.stem == "000" and p.is_file()}
    return next((by_ext[ext] for ext in IMAGE_EXTENSIONS if ext in by_ext), None)


def _outside(path: Path, real_root: Path) -> str | None:
    """The problem of a file that resolves outside the input folder (a link out of it), or None:
    nothing outside ``--images`` is read because an input folder says so."""
    if path.resolve().is_relative_to(real_root):
        return None
    return f"{path}: links outside --images {real_root}; refused"


def _prompt_txt(folder: Path, real_root: Path) -> tuple[str | None, str | None]:
    """(prompt of ``<folder>/prompt.txt`` or None, the problem reading it or None)."""
    path = folder / PROMPT_FILE
    if not path.is_file():
        return None, None
    if problem := _outside(path, real_root):
        return None, problem
    try:
        return path.read_text(encoding="utf-8").strip() or None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: unreadable prompt ({type(exc).__name__})"


def read_prompts(path: Path) -> dict[str, str]:
    """``{uid: prompt}`` from a JSON file; anything else is a :class:`GenerationError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GenerationError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"--prompts {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise GenerationError(f'--prompts {path}: expected a JSON object {{"<uid>": "<prompt>"}}')
    bad = next((k for k, v in data.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise GenerationError(f"--prompts {path}: the prompt of {bad!r} is not a string")
    return data


def discover_inputs(images: Path, prompts: dict[str, str] | None = None) -> Inputs:
    """The jobs of ``images`` (either layout), uids sorted; a uid folder without a ``000`` image is
    a job with a problem (it is reported, never dropped). Prompts: ``prompts`` first, then
    ``<uid>/prompt.txt``; an empty prompt is none."""
    images = Path(images)
    if not images.is_dir():
        raise GenerationError(f"--images {images}: not a folder")
    real_root = images.resolve()
    entries = sorted((p for p in images.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    folders = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    found = {f.name: _image_in(f) for f in folders}
    prompts = dict(prompts or {})
    jobs: list[Job] = []
    if any(found.values()):
        if loose:
            raise GenerationError(
                f"--images {images}: holds both <uid>/000.png folders and loose images ({loose[0].name}); "
                "use one layout"
            )
        layout = "hy3d"
        for folder in folders:
            text, problem = _prompt_txt(folder, real_root)
            image = found[folder.name]
            if image is None:
                problem = f"{folder}: no 000.png (or .jpg/.webp) in the uid folder"
            elif outside := _outside(image, real_root):
                image, problem = None, outside
            prompt = prompts[folder.name] if folder.name in prompts else text
            jobs.append(Job(folder.name, image and str(image.resolve()), prompt or None, problem))
    elif loose:
        layout = "flat"
        stems: dict[str, list[str]] = {}
        for path in loose:
            stems.setdefault(path.stem, []).append(path.name)
        clash = next((names for names in stems.values() if len(names) > 1), None)
        if clash:
            raise GenerationError(f"--images {images}: {', '.join(clash)} would share one uid; rename one")
        for p in loose:
            outside = _outside(p, real_root)
            jobs.append(Job(p.stem, None if outside else str(p.resolve()), prompts.get(p.stem) or None, outside))
    else:
        raise GenerationError(f"--images {images}: no images (expected <uid>/000.png folders or *.png files)")
    uids = {job.uid for job in jobs}
    return Inputs(layout, jobs, sorted(set(prompts) - uids))


# --------------------------------------------------------------------------- outputs


def mesh_path(output: Path, uid: str) -> Path:
    return Path(output) / uid / MESH_NAME


def work_dir(output: Path, uid: str) -> Path:
    return Path(output) / uid / WORK_DIR


def fingerprint(folder: Path | None) -> str | None:
    """Names, sizes and modification times of an export's files: a retrained or replaced export
    changes it (so does a copy: generating again is the safe side)."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def made_from(job: Job, settings: dict[str, Any]) -> dict[str, Any]:
    """What one uid's mesh depends on — the run's ``settings`` (model fingerprints, seed, sampler
    overrides), the front view's content and the prompt — stored in its ``shape.json``."""
    image = hashlib.sha256(Path(job.image).read_bytes()).hexdigest()[:16]
    return {**settings, "image_sha256": image, "prompt": job.prompt}


def is_done(output: Path, uid: str, key: dict[str, Any] | None = None) -> bool:
    """The uid's mesh is in place and its ``shape.json`` (written after the move) says so, made
    from ``key`` (any, when None)."""
    summary = work_dir(output, uid) / "shape.json"
    if not (mesh_path(output, uid).is_file() and summary.is_file()):
        return False
    try:
        data = json.loads(summary.read_text())
        mesh = data.get("mesh")
    except (OSError, ValueError, AttributeError):
        return False
    same = key is None or data.get("batch") == json.loads(json.dumps(key))
    return same and isinstance(mesh, str) and Path(mesh).name == MESH_NAME


def read_record(output: Path) -> dict[str, dict]:
    """Per-uid entries of an earlier run's ``generation.json`` ({} when none or unreadable)."""
    try:
        uids = json.loads((Path(output) / RECORD_FILE).read_text()).get("uids", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return uids if isinstance(uids, dict) else {}


def entry(uid: str, status: str, reason: str | None, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "status": status, "reason": reason, "seconds": round(seconds, 3), **extra}


def _reason(exc: BaseException) -> str:
    """One line: the message alone for the chain's own refusals (they name the file), else the type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not isinstance(exc, (ValueError, FileNotFoundError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:MAX_REASON]


def plan(
    inputs: Inputs, output: Path, fresh: bool, previous: dict[str, dict], settings: dict[str, Any] | None = None
) -> tuple[dict[str, dict], list[Job]]:
    """(entries known before any generation — uids with a problem, uids whose mesh an earlier run
    made from the same :func:`made_from` — , the jobs to run, each with its ``made_from``)."""
    known: dict[str, dict] = {}
    todo: list[Job] = []
    for job in inputs.jobs:
        if job.problem is not None:
            known[job.uid] = entry(job.uid, "failed", job.problem, 0.0)
            continue
        try:
            job = replace(job, made_from=made_from(job, settings or {}))
        except OSError as exc:
            known[job.uid] = entry(job.uid, "failed", f"{job.image}: unreadable ({exc.strerror})", 0.0)
            continue
        if not fresh and is_done(output, job.uid, job.made_from):
            old = previous.get(job.uid) or {}
            seconds = old.get("seconds") if isinstance(old.get("seconds"), (int, float)) else 0.0
            known[job.uid] = entry(job.uid, "ok", None, seconds, skipped=True)
        else:
            todo.append(job)
    return known, todo


def check_image(job: Job) -> Job:
    """The job, or the job with the problem of its front view (no alpha, not an image): refused
    here, on the driver, before a model slot is spent on it."""
    from know3d.training.generator.generate import check_front

    try:
        check_front(Path(job.image))
    except (ValueError, FileNotFoundError) as exc:
        return replace(job, problem=_reason(exc))
    return job


def generate_one(chain: Any, job: Job, output: Path, seed: int) -> dict[str, Any]:
    """Run ``chain`` (a :class:`ShapeGenerator`) for one uid -> its ``generation.json`` entry.
    Never raises: whatever goes wrong is this uid's ``failed`` reason. An older ``000.glb`` goes
    first, so a uid that now fails or yields no mesh is never scored with a stale one."""
    started = time.perf_counter()
    mesh, work = mesh_path(output, job.uid), work_dir(output, job.uid)
    mesh.unlink(missing_ok=True)
    try:
        summary = chain.run(Path(job.image), work, job.prompt, seed)
        if not summary.get("mesh"):
            reason = summary.get("no_mesh_reason") or "no mesh"
            return entry(job.uid, "no_mesh", reason, time.perf_counter() - started)
        os.replace(summary["mesh"], mesh)  # same folder tree: an atomic rename
        summary["mesh"] = str(mesh)
        summary["batch"] = job.made_from
        atomic_write(work / "shape.json", json.dumps(summary, indent=1))
    except Exception as exc:  # noqa: BLE001 - one uid's failure is its entry, never the run's end
        return entry(job.uid, "failed", _reason(exc), time.perf_counter() - started)
    return entry(job.uid, "ok", None, time.perf_counter() - started)


def crashed_entry(job: Job, exc: BaseException) -> dict[str, Any]:
    """The entry of a uid whose actor died under it (out of memory, a segfault)."""
    return entry(job.uid, "failed", f"the generation worker crashed ({task_error_kind(exc)})", 0.0)


class Record:
    """``generation.json``, rewritten (atomically) as each uid lands: a killed run leaves the
    uids it finished. One uid per line."""

    def __init__(self, output: Path, header: dict[str, Any]) -> None:
        self.path = Path(output) / RECORD_FILE
        self.header = header
        self.entries: dict[str, dict] = {}

    def put(self, item: dict[str, Any]) -> None:
        self.entries[item["uid"]] = {k: v for k, v in item.items() if k != "uid"}

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for e in self.entries.values():
            counts[e["status"]] += 1
        counts["skipped"] = sum(1 for e in self.entries.values() if e.get("skipped"))
        return counts

    def write(self, seconds: float, finished: bool) -> None:
        head = {**self.header, "finished": finished, "seconds": round(seconds, 3), "counts": self.counts()}
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(self.entries.items())]
        body = json.dumps(head, indent=1)[:-2] + ',\n "uids": {\n' + ",\n".join(lines) + "\n }\n}\n"
        atomic_write(self.path, body)


# --------------------------------------------------------------------------- Ray adapter


class GenerationWorker:
    """A Ray actor holding one loaded chain; :meth:`generate` one uid per call."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from know3d.training.generator.generate import ShapeGenerator
        from know3d.training.generator.model import GeneratorLoadError

        self.chain, self.error = None, None
        try:
            self.chain = ShapeGenerator(**spec)
        except (GeneratorLoadError, FileNotFoundError) as exc:
            self.error = str(exc).splitlines()[0][:MAX_REASON]
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while loading: one clear line
            self.error = f"cannot load the generator: {_reason(exc)}"

    def info(self) -> dict[str, Any]:
        """``{"device", "load_seconds"}`` of the loaded chain, or ``{"error"}``."""
        if self.chain is None:
            return {"error": self.error}
        return {"device": str(self.chain.device), "load_seconds": self.chain.load_seconds}

    def generate(self, job: Job, output: str, seed: int) -> dict[str, Any]:
        if self.chain is None:  # a restarted actor whose reload failed
            return entry(job.uid, "failed", self.error or "the generator is not loaded", 0.0)
        return generate_one(self.chain, job, Path(output), seed)


def _start_workers(ray: Any, spec: dict[str, Any], num: int, gpus: float) -> list[Any]:
    """``num`` actors with their chains loaded before any uid is sent (a load failure stops the
    run with one line instead of failing every uid). A crashed actor restarts for the next uid."""
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=0)(GenerationWorker)
    actors = [actor_cls.remote(spec) for _ in range(num)]
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except Exception as exc:  # noqa: BLE001 - e.g. killed by the OOM killer while loading
        infos = [
            {"error": f"a generation worker died while loading the models ({task_error_kind(exc)}); out of memory?"}
        ]
    problem = next((i["error"] for i in infos if "error" in i), None)
    if problem is not None:
        for actor in actors:
            ray.kill(actor)
        raise GenerationError(problem)
    return actors


def _check_exports(generator: Path, shape_generator: Path | None, backview_lora: Path | None) -> None:
    """Folders that hold no exported generator or LoRA are refused before Ray starts (the chain
    reads the LoRA per image: unchecked, it would fail every uid alike)."""
    from know3d.training.generate import read_lora_meta
    from know3d.training.generator.model import GeneratorLoadError, read_meta

    try:
        for folder in (generator, shape_generator):
            if folder is not None:
                read_meta(folder)
        if backview_lora is not None:
            read_lora_meta(backview_lora)
    except (GeneratorLoadError, OSError, ValueError) as exc:
        raise GenerationError(str(exc).splitlines()[0]) from None


def _num_workers(ray: Any, wanted: int, gpus: float) -> int:
    """``wanted`` actors, or as many as the cluster can hold now (1 CPU and ``gpus`` GPUs each):
    an actor that cannot be placed would wait for resources forever before loading."""
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 0) // 1)
    if gpus > 0:
        fits = min(fits, int(resources.get("GPU", 0) // gpus))
    if fits < wanted:
        log.warning("--workers %d: the cluster holds %d generation workers now; starting %d", wanted, fits, fits)
    return max(1, min(wanted, fits))


def _begin(record: Record, seconds: float) -> None:
    """The run really starts: the output exists, uids failed up front lose any older mesh (never
    scored as this run's), the record lists what is known."""
    record.path.parent.mkdir(parents=True, exist_ok=True)
    for uid, item in record.entries.items():
        if item["status"] == "failed":
            mesh_path(record.path.parent, uid).unlink(missing_ok=True)
    record.write(seconds, finished=False)


def generate_batch(
    images: Path,
    output: Path,
    generator: Path,
    shape_generator: Path | None = None,
    backview_lora: Path | None = None,
    prompts: dict[str, str] | None = None,
    seed: int = 0,
    sampler: dict[str, Any] | None = None,
    shape_sampler: dict[str, Any] | None = None,
    ray_cfg: RayConfig | None = None,
    workers: int = 1,
    num_gpus_per_worker: float = 1.0,
    fresh: bool = False,
) -> BatchSummary:
    """Generate a mesh for every uid of ``images`` into ``output`` (see the module docstring).
    ``workers`` actors each hold one chain, with ``num_gpus_per_worker`` GPUs when the cluster has
    GPUs (none otherwise). Raises :class:`GenerationError` (or another ``UsageError``: output,
    cluster) only for the run as a whole, before any uid is generated."""
    started = time.perf_counter()
    if workers < 1:
        raise GenerationError(f"--workers {workers}: at least 1")
    out = check_output(str(output))
    images = Path(images).expanduser().resolve()
    if out == images:
        raise GenerationError(f"--output {out}: is the --images folder; give another")
    generator = Path(generator).expanduser().resolve()
    shape_generator = shape_generator and Path(shape_generator).expanduser().resolve()
    backview_lora = backview_lora and Path(backview_lora).expanduser().resolve()
    inputs = discover_inputs(images, prompts)
    _check_exports(generator, shape_generator, backview_lora)
    settings = {
        "generator": fingerprint(generator),
        "shape_generator": fingerprint(shape_generator),
        "backview_lora": fingerprint(backview_lora),
        "seed": seed,
        "sampler": sampler or {},
        "shape_sampler": shape_sampler or {},
    }
    known, todo = plan(inputs, out, fresh, {} if fresh else read_record(out), settings)
    checked = [check_image(job) for job in todo]
    todo = [job for job in checked if job.problem is None]
    known.update((job.uid, entry(job.uid, "failed", job.problem, 0.0)) for job in checked if job.problem)
    header = {
        "images": str(images),
        "layout": inputs.layout,
        "generator": str(generator),
        "shape_generator": shape_generator and str(shape_generator),
        "backview_lora": backview_lora and str(backview_lora),
        "seed": seed,
        "sampler": sampler or {},
        "shape_sampler": shape_sampler or {},
    }
    record = Record(out, header)
    for item in known.values():
        record.put(item)
    if todo:
        spec = {
            "generator": generator,
            "shape_generator": shape_generator,
            "backview_lora": backview_lora,
            "sampler": sampler,
            "shape_sampler": shape_sampler,
        }
        with ray_session(ray_cfg or RayConfig()) as ray:
            gpus = num_gpus_per_worker if ray.cluster_resources().get("GPU", 0) > 0 else 0
            num = _num_workers(ray, min(workers, len(todo)), gpus)
            actors = _start_workers(ray, {**spec, "device": "cuda" if gpus > 0 else "cpu"}, num, gpus)
            _begin(record, time.perf_counter() - started)

            def finished(job: Job, result: dict | BaseException) -> None:
                record.put(crashed_entry(job, result) if isinstance(result, BaseException) else result)
                record.write(time.perf_counter() - started, finished=False)

            try:
                with make_progress() as progress:
                    submit = lambda job, actor: actor.generate.remote(job, str(out), seed)
                    run_bounded(ray, submit, todo, actors, finished, progress, "generate")
            finally:
                for actor in actors:
                    ray.kill(actor)
    else:
        _begin(record, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    record.write(seconds, finished=True)
    rows = record.entries
    return BatchSummary(
        output=out,
        record=record.path,
        counts=record.counts(),
        seconds=seconds,
        failures=[(u, e["reason"]) for u, e in sorted(rows.items()) if e["status"] == "failed"],
        no_mesh=[(u, e["reason"]) for u, e in sorted(rows.items()) if e["status"] == "no_mesh"],
        unmatched_prompts=inputs.unmatched_prompts,
    )
