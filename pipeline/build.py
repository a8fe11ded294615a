"""`know3d data build`: discover -> ingest -> render -> shard, orchestrated on Ray.

Output folder::

    <output>/
        config.yaml              resolved config of the last run
        manifest.parquet         one row per asset and stage
        shard_index.json         every shard with its sample count and sha256
        train-000000.tar ...     WebDataset shards (val-000000.tar ... for the val split)
        contact_sheet.png        sample pairs read back from the shards
        runs/<run>/              config, summary and contact sheet of each run
        work/<fingerprint>/      rendered views per asset (the resumable state)
        procedural/              the built-in procedural assets, when used

Every per-asset result is persisted as soon as it exists (atomic renames), so a run killed at
any point — driver or worker, even ``kill -9`` — resumes where it stopped; shards are a
deterministic function of the rendered assets and are replaced atomically.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress

from know3d.annotation.base import AnnotatorReplica, Replicas, annotator_class, worker_failure
from know3d.annotation.stage import annotate_assets
from know3d.core.fanout import console, make_progress, run_bounded, task_error_kind
from know3d.core.io import remove_temps
from know3d.core.manifest import ManifestRow, summarize, write_manifest
from know3d.core.runtime import OutputUnusable, UsageError, check_output, ray_session
from know3d.core.shards import INDEX_FILE, load_index, remove_stale, write_index
from know3d.core.tracking import make_tracker
from know3d.pipeline.config import BuildConfig, dump_config
from know3d.rendering.config import RenderJob
from know3d.rendering.contact_sheet import make_contact_sheet
from know3d.rendering.ingest import Ingested, dedupe, file_name, ingest_batch
from know3d.rendering.process import (
    Rendered,
    failure_file,
    read_asset,
    read_failure,
    remember_failure,
    render_fingerprint,
    usable_pairs,
)
from know3d.rendering.shards import ShardPlan, annotation_id, plan_shards, reusable_entry, split_of, write_shard
from know3d.rendering.sources.base import AssetRecord, AssetSource

RENDER_REQUEUE = 2  # times an asset goes to another render actor when its actor was lost


class BuildError(UsageError):
    """The build as a whole cannot run (bad source, output locked); not an asset's fault."""


# --------------------------------------------------------------------------- stage functions


class RenderActor:
    """Ray actor: one isolated renderer child per actor, reused across assets. An actor holding a
    GPU share renders on that GPU: EGL picks the device Ray assigned (``EGL_DEVICE_ID``, read by
    pyrender; EGL enumerates every device whatever ``CUDA_VISIBLE_DEVICES`` says)."""

    def __init__(self, cfg_json: str, work: str) -> None:
        import os

        import ray

        from know3d.rendering.isolation import IsolatedRenderer

        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        if gpus:
            os.environ.setdefault("EGL_DEVICE_ID", str(int(gpus[0])))
        self.renderer = IsolatedRenderer(RenderJob.model_validate_json(cfg_json), Path(work))

    def render(self, path: str, sha: str, record: dict) -> Rendered:
        return self.renderer.run(Path(path), sha, record)


def render_actor_setup(cfg: BuildConfig) -> tuple[dict[str, Any], RenderJob]:
    """Ray options of the render actors and their job, by node kind: CPU actors render with
    ``render.backend``; with ``ray.render_gpus_per_actor`` > 0 they take that share of a GPU
    (several actors per GPU), render with ``render.gpu_backend`` and load the NVIDIA EGL vendor."""
    r = cfg.ray
    # Ray restarts a lost actor wherever there is room but does not retry its calls: the render
    # stage hands the assets of a lost actor to the others (run_bounded's requeue), so none
    # waits on an actor that cannot come back (its node lost, no room elsewhere)
    options: dict[str, Any] = {"num_cpus": r.render_cpus_per_actor, "max_restarts": -1, "max_task_retries": 0}
    job = cfg.render_job()
    if r.render_gpus_per_actor > 0:
        options["num_gpus"] = r.render_gpus_per_actor
        job = job.model_copy(update={"render": job.render.model_copy(update={"backend": job.render.gpu_backend})})
        env = {"PYGLET_HEADLESS": "1"}
        if r.render_egl_vendor:
            env["__EGL_VENDOR_LIBRARY_FILENAMES"] = r.render_egl_vendor
        options["runtime_env"] = {"env_vars": env}
    return options, job


def _write_shard_task(
    work: str, out: str, plan: ShardPlan, records: dict[str, dict], annotations: dict[str, dict]
) -> dict:
    return write_shard(Path(work), Path(out), plan, records, annotations)


# --------------------------------------------------------------------------- the build


@dataclass
class BuildSummary:
    output: Path
    run_id: str
    counts: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 0
    num_shards: int = 0
    num_failed: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None


@contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Create and lock the output folder; a new folder is removed again if the build fails
    before its first run record is written (``out/runs``)."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # topmost new folder
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")
    except OSError as exc:
        raise OutputUnusable(
            f"--output {out}: cannot create the folder ({exc.strerror or type(exc).__name__})"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildError(f"another build is writing to {out} (lock {out / '.lock'})") from None
        try:
            yield
        except BaseException:
            if created is not None and not (out / "runs").exists():
                shutil.rmtree(created, ignore_errors=True)
            raise


def _remove_leftovers(out: Path) -> None:
    """Temporary files of an interrupted run (we hold the output lock, so none is live)."""
    for pattern in (".*.tmp", "work/*/*/.*.tmp", "work/*/_failed/.*.tmp", "annotations/*/.*.tmp"):
        remove_temps(out, pattern)


def run_build(cfg: BuildConfig, retry_failed: bool = False) -> BuildSummary:
    """The whole build. Raises BuildError / ClusterUnreachable (usage problems, one line each)
    before anything is written when the output or the cluster is unusable."""
    out = check_output(cfg.output)
    with ray_session(cfg.ray) as ray, _output_folder(out):
        source, records, filtered = _discover(cfg, out)
        return _run_build(cfg, out, retry_failed, ray, source, records, filtered)


def _run_build(
    cfg: BuildConfig,
    out: Path,
    retry_failed: bool,
    ray: Any,
    source: AssetSource,
    records: list[AssetRecord],
    filtered: list,
) -> BuildSummary:
    t_start = time.perf_counter()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    config_text = dump_config(cfg)
    (out / "config.yaml").write_text(config_text)
    (run_dir / "config.yaml").write_text(config_text)
    work = out / "work" / render_fingerprint(cfg.render_job())
    work.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)

    tracker = make_tracker(cfg.mlflow, stage="data.build", output=out, tags={"know3d.run": run_id})
    tracker.log_params(cfg.model_dump(mode="json"))
    tracker.log_artifact(run_dir / "config.yaml")
    status = "FAILED"
    try:
        by_key = {r.key: r for r in [*records, *(f.record for f in filtered)]}
        run = _Run(cfg, out, work, run_id, by_key, mlflow_run_id=tracker.run_id)
        summary = _stages(run, ray, source, records, filtered, run_dir, retry_failed, tracker, t_start)
        status = "FINISHED"
        return summary
    finally:
        tracker.close(status)


@dataclass
class _Run:
    """State shared by the stages of one build."""

    cfg: BuildConfig
    out: Path
    work: Path
    run_id: str
    by_key: dict[str, AssetRecord]
    mlflow_run_id: str | None = None
    rows: list[ManifestRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self, key: str, stage: str, status: str, **fields: Any) -> None:
        rec = self.by_key[key]
        self.rows.append(
            ManifestRow(
                rec.key, rec.source, stage, status, uri=rec.uri, license=rec.license, run_id=self.run_id, **fields
            )
        )


def _discover(cfg: BuildConfig, out: Path) -> tuple[AssetSource, list[AssetRecord], list]:
    from know3d.rendering.sources import build_source

    try:
        source = build_source(cfg.source, out / "procedural")
        records, filtered = source.discover()
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        raise BuildError(f"source '{cfg.source.kind}': {exc}") from None
    return source, records, filtered


def _ingest_stage(
    run: _Run, ray: Any, progress: Progress, source: AssetSource, records: list[AssetRecord]
) -> list[Ingested]:
    """Fetch + security checks + content hash on Ray tasks; returns the unique assets."""
    t0 = time.perf_counter()
    ingest_remote = ray.remote(num_cpus=0.5)(ingest_batch)
    source_ref = ray.put(source)
    batches = [records[i : i + 16] for i in range(0, len(records), 16)]
    ingested: list[Ingested] = []
    retry: list[list[AssetRecord]] = []

    def on_batch(batch: list[AssetRecord], result: Any) -> None:
        # ingest_one never raises, so a failed batch means its worker died (a segfault or the
        # OOM killer on one file): every record of it is tried again on its own
        (retry.extend([r] for r in batch) if isinstance(result, Exception) else ingested.extend(result))

    def on_single(batch: list[AssetRecord], result: Any) -> None:
        if not isinstance(result, Exception):
            ingested.extend(result)
            return
        record = batch[0]
        reason = f"{file_name(record)}: ingest worker died ({task_error_kind(result)})"
        ingested.append(Ingested(record.key, "failed", reason=reason))

    def submit(batch: list[AssetRecord], _: Any) -> Any:
        return ingest_remote.remote(source_ref, [r.to_json() for r in batch], run.cfg.load)

    slots = [None] * run.cfg.ray.fetch_concurrency
    run_bounded(ray, submit, batches, slots, on_batch, progress, "ingest", weight=len)
    if retry:
        run_bounded(ray, submit, retry, slots, on_single, progress, "ingest (retry one by one)", weight=len)
    kept, dupes = dedupe(ingested)
    for r in ingested:
        if r.status != "ok":
            run.row(r.key, "ingest", r.status, filter=r.filter, reason=r.reason, seconds=r.seconds)
    for r in dupes:
        run.row(r.key, "ingest", "filtered", sha256=r.sha256, filter="duplicate", reason=r.reason)
    for r in kept:
        run.row(r.key, "ingest", "ok", sha256=r.sha256, seconds=r.seconds)
    run.metrics["ingest_s"] = time.perf_counter() - t0
    return kept


def _render_stage(run: _Run, ray: Any, progress: Progress, kept: list[Ingested], retry_failed: bool) -> list[dict]:
    """Isolated, time-limited renders on Ray actors; finished (or remembered failed) assets are
    skipped. Returns the asset.json summaries of every rendered asset, with this run's record."""
    t0 = time.perf_counter()
    cfg, work = run.cfg, run.work
    results: dict[str, Rendered] = {}
    summaries: dict[str, dict] = {}  # asset.json of rendered assets, read once
    todo: list[Ingested] = []
    for r in kept:
        failure = None if retry_failed else read_failure(failure_file(work, r.sha256))
        done = read_asset(work, r.sha256)
        if done is not None:
            summaries[r.sha256] = done
            results[r.sha256] = Rendered("ok", skipped=True)
        elif failure is not None:
            results[r.sha256] = dataclasses.replace(failure, skipped=True)
        else:
            todo.append(r)
    options, job = render_actor_setup(cfg)
    actor_cls = ray.remote(**options)(RenderActor)
    num_actors = min(cfg.ray.render_concurrency, len(todo))
    actors = [actor_cls.remote(job.model_dump_json(), str(work)) for _ in range(num_actors)]

    def submit(r: Ingested, actor: Any) -> Any:
        return actor.render.remote(r.path, r.sha256, run.by_key[r.key].to_json())

    def on_render(r: Ingested, result: Rendered | Exception) -> None:
        failure = failure_file(work, r.sha256)
        if isinstance(result, Exception):
            # the worker, not the asset, failed (after Ray's retries): not remembered
            result = Rendered("failed", reason=f"{Path(r.path).name}: render worker died ({task_error_kind(result)})")
        elif result.status != "ok":
            remember_failure(failure, result)
        else:
            failure.unlink(missing_ok=True)
        results[r.sha256] = result

    # two calls per actor: the next asset is already queued when the current one finishes; an
    # asset whose actor was lost (a node gone) is rendered by another one, up to 2 times
    run_bounded(ray, submit, todo, actors * 2, on_render, progress, "render", requeue=RENDER_REQUEUE)
    for actor in actors:
        ray.kill(actor)
    seconds = run.metrics["render_s"] = time.perf_counter() - t0
    fresh = [res for res in results.values() if res.status == "ok" and not res.skipped]
    run.metrics["num_assets_rendered_now"] = len(fresh)  # this run's renders (the rest were done before)
    if fresh:
        run.metrics["render_views_per_s"] = sum(2 * res.num_pairs for res in fresh) / seconds
        run.metrics["render_assets_per_s"] = len(fresh) / seconds

    ok_assets: list[dict] = []
    for r in kept:
        res = results[r.sha256]
        summary = summaries.get(r.sha256) or (read_asset(work, r.sha256) if res.status == "ok" else None)
        if summary is not None:
            # metadata of this run wins over what was stored when the asset was rendered
            ok_assets.append({**summary, **run.by_key[r.key].to_json()})
        run.row(
            r.key,
            "render",
            res.status,
            sha256=r.sha256,
            filter=res.filter,
            reason=res.reason,
            traceback=res.traceback,
            seconds=res.wall_s,
        )
    return ok_assets


def _replica_runner(run: _Run, ray: Any, progress: Progress, replicas: Replicas) -> Any:
    """Spread an annotator's requests over Ray actors holding one replica each (GPUs when the
    cluster has them)."""
    gpus = replicas.num_gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0
    cfg_json = run.cfg.annotate.model_dump_json()

    def runner(requests: list) -> list[dict]:
        actor_cls = ray.remote(num_gpus=gpus, num_cpus=1, max_restarts=1, max_task_retries=1)(AnnotatorReplica)
        actors = [actor_cls.remote(cfg_json) for _ in range(min(replicas.num_actors, len(requests)))]
        chunk = replicas.batch_size * 4
        chunks = [list(range(i, min(i + chunk, len(requests)))) for i in range(0, len(requests), chunk)]
        results: list[dict | None] = [None] * len(requests)

        def on_done(ids: list[int], result: Any) -> None:
            if isinstance(result, Exception):
                result = [worker_failure(task_error_kind(result))] * len(ids)
            for i, r in zip(ids, result, strict=False):
                results[i] = r

        def submit(ids: list[int], actor: Any) -> Any:
            return actor.annotate.remote([requests[i] for i in ids])

        run_bounded(ray, submit, chunks, actors * 2, on_done, progress, "annotate")
        for actor in actors:
            ray.kill(actor)
        # one result per request, in order: a missing one must not shift the others onto other pairs
        return [r if r is not None else worker_failure("no answer") for r in results]

    return runner


def _annotate_stage(run: _Run, ray: Any, progress: Progress, ok_assets: list[dict]) -> dict[str, dict]:
    """Annotation records keyed ``sha:pair`` (cached by content; see know3d.annotation.stage)."""
    annotator = annotator_class(run.cfg.annotate.backend)
    replicas = annotator.replicas(run.cfg.annotate) if annotator is not None else None
    runner = _replica_runner(run, ray, progress, replicas) if replicas is not None else None
    records, metrics = annotate_assets(
        ok_assets, run.work, run.out / "annotations", run.cfg.annotate, runner, run.cfg.shard.min_view_coverage
    )
    run.metrics.update(metrics)
    return {annotation_id(sha, pair): record for (sha, pair), record in records.items()}


def _shard_stage(run: _Run, ray: Any, progress: Progress, ok_assets: list[dict], annotations: dict[str, dict]) -> dict:
    """Deterministic plan; unchanged shards reused; new ones written atomically on Ray tasks;
    then the index is replaced and shards it no longer lists are removed."""
    t0 = time.perf_counter()
    cfg, out, work = run.cfg, run.out, run.work
    plans = plan_shards(work, ok_assets, cfg.shard, cfg.seed)
    previous = {e["name"]: e for e in load_index(out).get("shards", [])}
    records_by_sha = {a["sha256"]: run.by_key[a["key"]].to_json() for a in ok_assets}

    def members_records(plan: ShardPlan) -> dict[str, dict]:
        return {sha: records_by_sha[sha] for sha, _ in plan.members}

    def members_annotations(plan: ShardPlan) -> dict[str, dict]:
        ids = (annotation_id(sha, pair) for sha, pair in plan.members)
        return {i: annotations[i] for i in ids if i in annotations}

    entries: list[dict] = []
    to_write: list[ShardPlan] = []
    for plan in plans:
        entry = reusable_entry(out, work, plan, previous, members_records(plan), members_annotations(plan))
        (entries.append(entry) if entry else to_write.append(plan))
    shard_remote = ray.remote(num_cpus=0.5)(_write_shard_task)
    errors: list[str] = []

    def on_shard(plan: ShardPlan, result: Any) -> None:
        (errors.append(f"{plan.name}: {result}") if isinstance(result, Exception) else entries.append(result))

    def submit(plan: ShardPlan, _: Any) -> Any:
        return shard_remote.remote(str(work), str(out), plan, members_records(plan), members_annotations(plan))

    run_bounded(ray, submit, to_write, [None] * cfg.ray.shard_concurrency, on_shard, progress, "shard")
    if errors:
        raise BuildError("writing shards failed: " + "; ".join(errors[:3]))
    index = write_index(
        out,
        entries,
        {
            "profile": cfg.render.profile,
            "render_fingerprint": work.name,
            "seed": cfg.seed,
            "run_id": run.run_id,
            "mlflow_run_id": run.mlflow_run_id,
        },
    )
    removed = remove_stale(out, {e["name"] for e in entries})
    samples_per_asset = Counter(sha for plan in plans for sha, _ in plan.members)
    num_pairs_filtered = 0
    for a in ok_assets:
        dropped = usable_pairs(a, cfg.shard.min_view_coverage)[1]
        for _, reason in dropped:
            run.row(
                a["key"],
                "pairs",
                "filtered",
                sha256=a["sha256"],
                filter="min_view_coverage",
                reason=f"{Path(a['uri']).name}: {reason}",
            )
        num_pairs_filtered += len(dropped)
        split = split_of(a["sha256"], cfg.seed, cfg.shard.val_fraction)
        if samples_per_asset[a["sha256"]]:
            run.row(
                a["key"], "shard", "ok", sha256=a["sha256"], num_samples=samples_per_asset[a["sha256"]], split=split
            )
        else:
            run.row(
                a["key"],
                "shard",
                "filtered",
                sha256=a["sha256"],
                num_samples=0,
                split=split,
                filter="min_view_coverage",
                reason=f"{Path(a['uri']).name}: no pair with both views covered",
            )
    run.metrics["num_pairs_filtered_coverage"] = num_pairs_filtered
    run.metrics.update(
        shard_s=time.perf_counter() - t0, num_shards_rewritten=len(to_write), num_shards_removed=len(removed)
    )
    return index


def _stages(
    run: _Run,
    ray: Any,
    source: AssetSource,
    records: list[AssetRecord],
    filtered: list,
    run_dir: Path,
    retry_failed: bool,
    tracker: Any,
    t_start: float,
) -> BuildSummary:
    cfg, out, run_id = run.cfg, run.out, run.run_id
    for f in filtered:
        run.row(f.record.key, "discover", "filtered", filter=f.filter, reason=f.detail)
    for r in records:
        run.row(r.key, "discover", "ok")
    console.print(
        f"[bold]know3d data build[/] {cfg.source.kind}: {len(records)} assets, "
        f"{len(filtered)} filtered by metadata -> {out}"
    )

    with make_progress() as progress:
        kept = _ingest_stage(run, ray, progress, source, records)
        ok_assets = _render_stage(run, ray, progress, kept, retry_failed)
        annotations = _annotate_stage(run, ray, progress, ok_assets)
        index = _shard_stage(run, ray, progress, ok_assets, annotations)
    manifest_path = write_manifest(out, run.rows)

    counts = summarize([asdict(r) for r in run.rows])
    num_failed = sum(c.get("failed", 0) for c in counts["stages"].values())
    metrics = run.metrics
    metrics.update(
        total_s=time.perf_counter() - t_start,
        num_assets_discovered=len(records) + len(filtered),
        num_assets_rendered=len(ok_assets),
        num_failed=num_failed,
        num_samples=index["num_samples"],
        num_shards=index["num_shards"],
    )
    for stage, c in counts["stages"].items():
        for status, n in c.items():
            metrics[f"{stage}.{status}"] = n

    sheet = None
    if cfg.mlflow.num_contact_pairs:
        shards = [out / e["name"] for e in index["shards"]]
        sheet = make_contact_sheet(shards, cfg.mlflow.num_contact_pairs, out / "contact_sheet.png")
    (run_dir / "summary.json").write_text(
        json.dumps({"run_id": run_id, "counts": counts, "metrics": metrics, "output": str(out)}, indent=1)
    )
    if sheet is not None:
        (run_dir / "contact_sheet.png").write_bytes(sheet.read_bytes())
    tracker.log_metrics(metrics)
    tracker.log_dataset(out.name, index["digest"], out.as_uri(), context="output")
    for artifact in (manifest_path, out / INDEX_FILE, run_dir / "summary.json", sheet):
        if artifact is not None and artifact.is_file():
            tracker.log_artifact(artifact)
    return BuildSummary(
        out,
        run_id,
        counts,
        index["num_samples"],
        index["num_shards"],
        num_failed,
        metrics,
        getattr(tracker, "run_id", None),
    )
