"""Per-uid results on disk (``<output>/results/<uid>.json``) and what a rerun may take over.

Each uid's result is written atomically as soon as it finishes, so an interrupted evaluation
resumes where it stopped: :func:`plan_shapes` / :func:`plan_backviews` reuse a stored result
when the protocol fingerprint and the uid's input files are unchanged, and queue the rest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from know3d.core.config import dump_config
from know3d.core.io import atomic_write
from know3d.core.runtime import check_output
from know3d.evaluation.config import EvalConfig
from know3d.evaluation.discovery import Discovery
from know3d.evaluation.protocol import inputs_key, protocol_fingerprint
from know3d.evaluation.results import flat_metrics, json_safe, uid_filename

console = Console(stderr=True)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (non-finite numbers as null), replaced atomically: readers never see half a file."""
    atomic_write(path, json.dumps(json_safe(data), indent=2, allow_nan=False))


def worker_error(base: dict, exc: BaseException) -> dict:
    """The result of a uid whose worker crashed (stage ``worker``: retried by the next run)."""
    return {**base, "status": "error", "stage": "worker", "error": f"{type(exc).__name__}: {exc}"[:500]}


class ResultStore:
    """``<output>/results/<uid>.json`` of one protocol; errors caused by a crashed worker or the
    scorer are never reused (they say nothing about the uid), every other stored result is."""

    RETRY_STAGES = ("worker", "semantic")

    def __init__(self, output: Path, cfg: EvalConfig, fresh: bool) -> None:
        self.output = Path(output)
        self.dir = self.output / "results"
        self.fingerprint = protocol_fingerprint(cfg)
        if fresh:
            for sub in ("results", "renders"):
                if (self.output / sub).exists():
                    shutil.rmtree(self.output / sub)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, uid: str) -> Path:
        return self.dir / f"{uid_filename(uid)}.json"

    def reusable(self, uid: str, key: str) -> dict | None:
        """The stored result of ``uid`` when it was computed by this protocol from the inputs ``key``."""
        path = self.path(uid)
        if not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
        except ValueError:
            return None
        if result.get("fingerprint") != self.fingerprint or result.get("inputs_key") != key:
            return None
        if result.get("uid") != uid or result.get("status") not in ("ok", "error"):
            return None
        if result.get("stage") in self.RETRY_STAGES or result.get("semantic_error"):
            return None
        return result

    def put(self, result: dict, key: str) -> None:
        """Store ``result`` (stamped with the protocol and ``key``, plus its flat metrics)."""
        result["fingerprint"], result["inputs_key"] = self.fingerprint, key
        result["metrics"] = flat_metrics(result)
        try:
            write_json(self.path(result["uid"]), result)
        except OSError as exc:  # e.g. a full disk: the run goes on, this uid is not resumable
            console.print(f"[yellow]cannot write the result of {escape(result['uid'])}: {escape(str(exc))}[/]")

    def prune(self, uids: set[str]) -> None:
        """Remove results of uids that are no longer part of the evaluation."""
        keep = {uid_filename(u) for u in uids}
        for path in self.dir.glob("*.json"):
            if path.stem not in keep:
                path.unlink()

    def finalize(self, results: list[dict]) -> None:
        """Sort ``results`` by uid, store those never stored (missing uids, recorded but never
        reused: their key is empty) and drop the files of uids no longer evaluated."""
        results.sort(key=lambda r: r["uid"])
        for r in results:
            if "fingerprint" not in r:
                self.put(r, "")
        self.prune({r["uid"] for r in results})


def open_output(output: Path, cfg: EvalConfig, fresh: bool) -> ResultStore:
    """The checked output folder's store, with the resolved config saved beside it."""
    store = ResultStore(check_output(str(output)), cfg, fresh)
    (store.output / "config.yaml").write_text(dump_config(cfg))
    return store


@dataclass
class Plan:
    """What a run computes (``todo``: one job per uid) and takes over from an earlier one."""

    todo: list[dict] = field(default_factory=list)
    reused: list[dict] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # uid -> inputs key

    def take(self, store: ResultStore, job: dict, key: str) -> dict | None:
        """The reusable stored result of ``job``'s uid (kept in ``reused``); else ``job`` is queued."""
        self.keys[job["uid"]] = key
        previous = store.reusable(job["uid"], key)
        if previous is None:
            self.todo.append(job)
        else:
            self.reused.append(previous)
        return previous


def plan_shapes(found: Discovery, cfg: EvalConfig, store: ResultStore) -> Plan:
    """Jobs ``{uid, pred, gt, image}`` (absolute paths) of the uids not reusable from ``store``."""
    plan = Plan()
    for uid in found.uids:
        p, i, g = found.preds.get(uid), found.images.get(uid), found.gts.get(uid)
        job = {
            "uid": uid,
            "pred": str(p.resolve()) if p else None,
            "gt": str(g.resolve()) if g else None,
            "image": str(i.resolve()) if i else None,
        }
        key = inputs_key(job["pred"], job["gt"], job["image"] if cfg.semantic.enabled else None)
        previous = plan.take(store, job, key)
        if previous is not None:  # without semantic scores the image is not in the key: it may differ
            previous["image"] = job["image"]
    return plan


def plan_backviews(found: Discovery, store: ResultStore) -> Plan:
    """Jobs ``{uid, pred, gt, front}`` of the (prediction, ground truth) pairs not reusable from ``store``."""
    plan = Plan()
    for uid in found.pairs:
        front = found.images.get(uid)
        job = {
            "uid": uid,
            "pred": str(found.preds[uid]),
            "gt": str(found.gts[uid]),
            "front": str(front) if front else None,
        }
        plan.take(store, job, inputs_key(job["pred"], job["gt"], job["front"]))
    return plan
