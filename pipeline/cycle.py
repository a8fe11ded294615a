"""`know3d run CONFIG`: one retraining cycle as one command.

    data      incremental build (only new or changed assets render; the build's own cache)
    backview  back-view LoRA on the refreshed shards (latent cache inside), warm-started from
              the champion, resumed, or fresh (``backview.start``)
    evaluate  generated back views of a fixed held-out set (chosen at the first cycle) against
              their true back views: PSNR / SSIM
    register  a new version in the MLflow Model Registry with its lineage and metrics; the
              ``champion`` alias moves only when the rule of :func:`know3d.core.registry.decide`
              says so, and the version records why either way

Each step has a fingerprint of its inputs (the data: the source's discovered assets and the
build config; training: the data digest and the training config; evaluation: the model and the
held-out set). A step whose fingerprint is unchanged since it last succeeded is skipped, so a
cycle with nothing new does nothing and says so. The state lives in ``state`` (``steps.json``,
``heldout.json``, one ``cycles/<id>.json`` per cycle, the trained models under ``models/``).

A failing step stops the cycle: nothing is registered, the champion stays where it was, the
cycle's record names the step and the reason, and the command exits 1. Two cycles on one state
folder cannot run at once: the second is refused (exit 3) while the first holds ``cycle.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from know3d.core.config import RayConfig, StrictModel, TrackingConfig, load_config
from know3d.core.errors import describe_exception
from know3d.core.io import atomic_write

STEPS = (
    "data",
    "backview",
    "evaluate",
    "geometry",
    "generator",
    "evaluate_generator",
    "register",
    "register_generator",
)


class CycleDataConfig(StrictModel):
    config: str = Field(
        default="configs/quickstart.yaml", description="The data build's YAML (as for `know3d data build`)."
    )
    output: str = Field(
        default="runs/retrain/data", description="The data set folder; kept across cycles (the build is incremental)."
    )
    set: list[str] = Field(default_factory=list, description="--set overrides of the build.")


class CycleBackviewConfig(StrictModel):
    config: str = Field(
        default="configs/backview_quickstart.yaml",
        description="The back-view training YAML (as for `know3d train backview`).",
    )
    set: list[str] = Field(default_factory=list, description="--set overrides of the training.")
    start: Literal["warm", "fresh"] = Field(
        default="warm",
        description="warm = from the champion's LoRA (fresh when there is none); fresh = a new LoRA. "
        "An interrupted training of the same inputs always resumes from its last checkpoint.",
    )


class CycleEvalConfig(StrictModel):
    heldout: int = Field(default=8, ge=1, description="Held-out pairs, chosen at the first cycle and fixed.")
    split: Literal["val", "train"] = Field(default="val", description="Where the held-out pairs come from.")
    metric: Literal["psnr", "ssim"] = "psnr"
    margin: float = Field(default=0.0, ge=0, description="The candidate must beat the champion by more than this.")
    steps: int = Field(default=28, ge=2, description="Sampling steps of the generated back views.")
    cfg_scale: float = Field(default=4.0, ge=1.0)
    seed: int = 0


class CycleGeneratorConfig(StrictModel):
    """The 3D generator's stage 1 in the cycle: a `geometry` build of the same source, its targets,
    the hidden-state pre-pass with the cycle's new back-view LoRA, training, held-out shapes."""

    enabled: bool = False
    data: CycleDataConfig | None = Field(
        default=None, description="The geometry build (render.profile=geometry); required when enabled."
    )
    config: str | None = Field(default=None, description="Stage-1 training YAML (as for `know3d train generator`).")
    set: list[str] = Field(default_factory=list, description="--set overrides of the generator training.")
    ss_vae: str = Field(default="debug", description="SS-VAE encoder for the targets (as `know3d data targets`).")
    heldout: int = Field(default=8, ge=1, description="Held-out assets, chosen at the first cycle and fixed.")
    split: Literal["val", "train", "all"] = "val"
    metric: Literal["iou", "chamfer_l1", "f_score"] = "iou"
    margin: float = Field(default=0.0, ge=0)
    eval_set: list[str] = Field(
        default_factory=lambda: ["mesh.allow_non_manifold=true"],
        description="--set overrides of the shape evaluation (dual-grid meshes have non-manifold edges).",
    )


class CycleRegistryConfig(StrictModel):
    backview: str = Field(default="know3d-backview", description="Registered model name of the back-view LoRA.")
    generator: str = Field(default="know3d-generator", description="Registered model name of the stage-1 generator.")
    alias: str = "champion"


class CycleTrackingConfig(TrackingConfig):
    experiment: str = "know3d-cycles"


class CycleConfig(StrictModel):
    state: str = Field(default="runs/retrain", description="Lock, step fingerprints, cycle records, trained models.")
    source_set: list[str] = Field(
        default_factory=list,
        description="--set overrides of every data build of the cycle (after each build's own): the source they "
        "share, e.g. ['source.procedural.num_assets=26'].",
    )
    data: CycleDataConfig = Field(default_factory=CycleDataConfig)
    backview: CycleBackviewConfig = Field(default_factory=CycleBackviewConfig)
    evaluation: CycleEvalConfig = Field(default_factory=CycleEvalConfig)
    generator: CycleGeneratorConfig = Field(default_factory=CycleGeneratorConfig)
    registry: CycleRegistryConfig = Field(default_factory=CycleRegistryConfig)
    mlflow: CycleTrackingConfig = Field(default_factory=CycleTrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class CycleLocked(RuntimeError):
    """Another cycle holds the state folder's lock."""


class StepFailed(RuntimeError):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step '{step}' failed: {reason}")
        self.step, self.reason = step, reason


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def cycle_lock(state: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``state/cycle.lock`` (released by the kernel if the process dies);
    a second cycle is refused with the holder's pid and start time."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "cycle.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise CycleLocked(f"another cycle is running on {state} ({holder}); not starting a second one") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()


@dataclass
class StepResult:
    name: str
    status: str  # done | skipped | failed
    fingerprint: str | None = None
    seconds: float = 0.0
    detail: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


class Cycle:
    """One cycle on a state folder; :meth:`run` does the steps, each skipped when unchanged."""

    def __init__(self, cfg: CycleConfig, say: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.state = Path(cfg.state).resolve()
        self.say = say
        self.id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.results: list[StepResult] = []
        self.tracking_uri = self._tracking_uri()

    # ------------------------------------------------------------------ state

    def _tracking_uri(self) -> str:
        from know3d.core.tracking import check_uri, default_tracking_uri

        if not self.cfg.mlflow.enabled:
            raise ValueError("mlflow.enabled is false: a cycle registers its models, it needs a tracking server")
        return check_uri(
            self.cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
        )

    def _steps(self) -> dict[str, dict]:
        path = self.state / "steps.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _remember(self, name: str, fingerprint: str, outputs: dict[str, Any]) -> None:
        steps = self._steps()
        steps[name] = {"fingerprint": fingerprint, "outputs": outputs, "cycle": self.id}
        atomic_write(self.state / "steps.json", json.dumps(steps, indent=1, sort_keys=True))

    def _unchanged(self, name: str, fingerprint: str) -> dict | None:
        prev = self._steps().get(name)
        return prev["outputs"] if prev and prev["fingerprint"] == fingerprint else None

    def _step(self, name: str, inputs: Callable[[], tuple[str, Callable[[], tuple[dict, str]]]]) -> dict:
        """``inputs()`` -> (fingerprint, work). Runs ``work`` unless the fingerprint is what the
        step last succeeded with; returns the step's outputs. Any exception (in either) fails
        the step, and with it the cycle, naming the step."""
        start = time.perf_counter()
        fingerprint = None
        try:
            fingerprint, work = inputs()
            if (outputs := self._unchanged(name, fingerprint)) is not None and self._still_there(outputs):
                self.results.append(
                    StepResult(name, "skipped", fingerprint, detail="inputs unchanged", outputs=outputs)
                )
                self.say(f"{name:9} skipped (inputs unchanged)")
                return outputs
            self.say(f"{name:9} running")
            outputs, detail = work()
        except Exception as exc:  # any failure of a step ends the cycle, named
            reason = describe_exception(exc)
            self.results.append(StepResult(name, "failed", fingerprint, time.perf_counter() - start, reason))
            (self.state / "cycles").mkdir(parents=True, exist_ok=True)
            (self.state / "cycles" / f"{self.id}.{name}.traceback.txt").write_text(traceback.format_exc())
            raise StepFailed(name, reason) from exc
        seconds = time.perf_counter() - start
        self._remember(name, fingerprint, outputs)
        self.results.append(StepResult(name, "done", fingerprint, seconds, detail, outputs))
        self.say(f"{name:9} done in {seconds:.0f} s: {detail}")
        return outputs

    @staticmethod
    def _still_there(outputs: dict) -> bool:
        return all(Path(p).exists() for k, p in outputs.items() if k.endswith("_path"))

    # ------------------------------------------------------------------ steps

    def build_config(self, data: CycleDataConfig | None = None):
        from know3d.pipeline.config import BuildConfig

        data = data or self.cfg.data
        overrides = [*data.set, *self.cfg.source_set, f"output={json.dumps(str(Path(data.output).resolve()))}"]
        overrides += self._shared_overrides()
        return load_config(data.config, overrides, BuildConfig)

    def train_config(self, data: str, output: Path):
        from know3d.training.config import TrainBackviewConfig

        overrides = [*self.cfg.backview.set, f"data.shards={json.dumps([data])}", f"output={json.dumps(str(output))}"]
        overrides += self._shared_overrides()
        return load_config(self.cfg.backview.config, overrides, TrainBackviewConfig)

    def _shared_overrides(self) -> list[str]:
        """The cycle's tracking server and Ray cluster for every stage it runs."""
        out = [f"mlflow.tracking_uri={json.dumps(self.tracking_uri)}"]
        if self.cfg.ray.address:
            out.append(f"ray.address={json.dumps(self.cfg.ray.address)}")
        return out

    def data_fingerprint(self, bcfg) -> tuple[str, int]:
        """The discovered assets (key, location, size, mtime) and the build config: what decides
        whether a build could produce anything new."""
        from know3d.rendering.sources import build_source

        out = Path(bcfg.output)
        out.mkdir(parents=True, exist_ok=True)
        records, filtered = build_source(bcfg.source, out / "procedural").discover()
        assets = []
        for r in [*records, *(f.record for f in filtered)]:
            path = Path(r.uri) if "://" not in r.uri else None
            stat = path.stat() if path is not None and path.is_file() else None
            assets.append([r.key, r.uri, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
        settings = bcfg.model_dump(mode="json")
        for volatile in ("ray", "mlflow"):
            settings.pop(volatile, None)
        return digest(settings, sorted(assets)), len(assets)

    def step_data(self, name: str = "data", data: CycleDataConfig | None = None) -> dict:
        from know3d.core.shards import load_index
        from know3d.pipeline.build import run_build

        def inputs():
            bcfg = self.build_config(data)
            fingerprint, num = self.data_fingerprint(bcfg)
            return fingerprint, lambda: work(bcfg, num)

        def work(bcfg, num: int) -> tuple[dict, str]:
            self._ray()
            summary = run_build(bcfg)
            index = load_index(Path(bcfg.output))
            rendered = int(summary.metrics.get("num_assets_rendered_now", 0))
            detail = (
                f"{num} assets, {rendered} rendered now, {summary.num_failed} failed; {summary.num_samples} samples"
            )
            outputs = {
                "output_path": str(bcfg.output),
                "digest": index["digest"],
                "mlflow_run_id": summary.mlflow_run_id,
                "rendered_now": rendered,
                "num_samples": summary.num_samples,
            }
            return outputs, detail

        return self._step(name, inputs)

    def step_backview(self, data: dict) -> dict:
        from know3d.core.registry import ModelRegistry
        from know3d.pipeline.train import prepare, run_train_backview
        from know3d.training.engine.launch import last_checkpoint

        def inputs():
            fingerprint = self.backview_fingerprint(data)
            output = self.state / "models" / f"backview-{fingerprint[:12]}"
            return fingerprint, lambda: work(output)

        def work(output: Path) -> tuple[dict, str]:
            tcfg = self.train_config(data["output_path"], output)
            self._ray()
            warm = ""
            resuming = last_checkpoint(prepare(tcfg)) is not None  # an interrupted run of these inputs
            if self.cfg.backview.start == "warm" and not resuming:
                registry = ModelRegistry(self.tracking_uri)
                champion = registry.champion(self.cfg.registry.backview, self.cfg.registry.alias)
                if champion is not None:
                    folder = self.state / "champion" / f"v{champion.version}"
                    if not (folder / "pytorch_lora_weights.safetensors").is_file():
                        tmp = folder.with_name(folder.name + ".download")
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp.mkdir(parents=True)
                        Path(registry.download(champion, str(tmp))).rename(folder)
                        shutil.rmtree(tmp, ignore_errors=True)
                    tcfg.lora.init_from = str(folder)
                    warm = f", warm-started from {self.cfg.registry.backview} v{champion.version}"
            metrics = run_train_backview(tcfg)
            meta = json.loads((output / "lora" / "know3d_lora.json").read_text())
            outputs = {
                "output_path": str(output),
                "lora_path": str(output / "lora"),
                "mlflow_run_id": meta.get("mlflow_run_id"),
                "loss": metrics.get("loss"),
                "warm_start": tcfg.lora.init_from,
            }
            return outputs, f"{metrics.get('step')} steps, loss {metrics.get('loss', float('nan')):.4f}{warm}"

        return self._step("backview", inputs)

    def backview_fingerprint(self, data: dict) -> str:
        """The data digest and the training settings (not where things are written or run)."""
        settings = self.train_config(data["output_path"], Path("/")).model_dump(mode="json")
        for volatile in ("output", "ray", "mlflow"):
            settings.pop(volatile, None)
        settings["data"].pop("shards", None)
        return digest(data["digest"], settings, self.cfg.backview.start)

    def heldout(self, data: dict) -> list[str]:
        """The fixed held-out pair keys: chosen from the first cycle's data and kept, so every
        candidate is measured on the same pairs as the champion."""
        from know3d.core.shards import iter_shard_keys, resolve_shards

        path = self.state / "heldout.json"
        if path.is_file():
            return json.loads(path.read_text())["keys"]
        urls, _ = resolve_shards([data["output_path"]], self.cfg.evaluation.split)
        keys = sorted(k for url in urls for k in iter_shard_keys(Path(url)))
        if not keys:
            raise ValueError(f"no '{self.cfg.evaluation.split}' pairs in {data['output_path']} to hold out")
        chosen = keys[:: max(1, len(keys) // self.cfg.evaluation.heldout)][: self.cfg.evaluation.heldout]
        atomic_write(path, json.dumps({"split": self.cfg.evaluation.split, "keys": chosen}, indent=1))
        return chosen

    def step_evaluate(self, data: dict, model: dict) -> dict:
        ecfg = self.cfg.evaluation

        def inputs():
            keys = self.heldout(data)
            model_fp = self._steps()["backview"]["fingerprint"]
            return digest(model["lora_path"], model_fp, keys, ecfg.model_dump()), lambda: work(keys)

        def work(keys: list[str]) -> tuple[dict, str]:
            metrics = evaluate_backviews(
                Path(data["output_path"]), keys, Path(model["lora_path"]), self.state / "evals" / self.id, ecfg
            )
            outputs = {"metrics": metrics, "keys": len(keys)}
            return outputs, f"{len(keys)} held-out pairs: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())

        return self._step("evaluate", inputs)

    def step_register(self, data: dict, model: dict, evaluation: dict) -> dict:
        ecfg = self.cfg.evaluation
        tags = {
            "know3d.data.digest": data["digest"],
            "know3d.data.run_id": str(data.get("mlflow_run_id")),
            "know3d.config.digest": digest(self.train_config(data["output_path"], Path("/")).model_dump()),
            "know3d.heldout": f"{evaluation['keys']} pairs ({ecfg.split})",
        }
        if model.get("warm_start"):
            tags["know3d.warm_start"] = Path(model["warm_start"]).name
        return self._register(
            "register",
            name=self.cfg.registry.backview,
            model_step="backview",
            run_id=model.get("mlflow_run_id"),
            artifact="lora",
            tags=tags,
            metrics=evaluation["metrics"],
            metric=ecfg.metric,
            margin=ecfg.margin,
            higher_is_better=True,
        )

    def _register(
        self,
        step: str,
        *,
        name: str,
        model_step: str,
        run_id: str | None,
        artifact: str,
        tags: dict[str, str],
        metrics: dict[str, float],
        metric: str,
        margin: float,
        higher_is_better: bool,
    ) -> dict:
        """Register the model of ``model_step`` (once per fingerprint) and apply the champion rule."""
        from know3d.core.registry import FINGERPRINT_TAG, ModelRegistry
        from know3d.core.tracking import git_commit

        alias = self.cfg.registry.alias

        def inputs():
            model_fp = self._steps()[model_step]["fingerprint"]
            fingerprint = digest(model_fp, metrics, name, alias, metric, margin, higher_is_better)
            return fingerprint, lambda: work(model_fp)

        def work(model_fp: str) -> tuple[dict, str]:
            registry = ModelRegistry(self.tracking_uri)
            version = registry.find(name, model_fp)
            if version is None:
                if not run_id:
                    raise ValueError(f"the {model_step} training run has no MLflow run id: its model was not logged")
                lineage = {
                    FINGERPRINT_TAG: model_fp,
                    "know3d.cycle": self.id,
                    "mlflow.source.git.commit": git_commit() or "unknown",
                    **tags,
                }
                version = registry.register(name, run_id, artifact, lineage, metrics)
            decision = registry.decide_and_promote(version, metric, margin, higher_is_better, alias=alias)
            champion = registry.champion(name, alias)
            outputs = {
                "version": version.version,
                "promoted": decision.promote,
                "reason": decision.reason,
                "champion": champion.version if champion else None,
            }
            verdict = "promoted to" if decision.promote else "refused as"
            return outputs, f"{name} v{version.version} {verdict} {alias}: {decision.reason}"

        return self._step(step, inputs)

    # ------------------------------------------------------------------ the generator

    def generator_config(self, dataset: str, output: Path, lora: str):
        from know3d.training.generator.config import TrainGeneratorConfig

        gc = self.cfg.generator
        overrides = [
            *gc.set,
            f"data.dataset={json.dumps(dataset)}",
            f"data.hidden.lora={json.dumps(lora)}",
            f"output={json.dumps(str(output))}",
            *self._shared_overrides(),
        ]
        return load_config(gc.config, overrides, TrainGeneratorConfig)

    def step_generator(self, geometry: dict, model: dict) -> dict:
        """Targets (occupancy + SS latent, cached per asset), the hidden-state pre-pass with this
        cycle's back-view LoRA (cached per pair and LoRA), then stage-1 training."""
        from know3d.pipeline.generator_data import run_hidden_states
        from know3d.pipeline.train import run_train_generator
        from know3d.training.generator.config import HiddenPrepassConfig

        gc = self.cfg.generator

        def inputs():
            if not gc.config or gc.data is None:
                raise ValueError("generator.enabled needs generator.data (a geometry build) and generator.config")
            settings = self.generator_config(geometry["output_path"], Path("/"), model["lora_path"])
            settings = settings.model_dump(mode="json")
            for volatile in ("output", "ray", "mlflow"):
                settings.pop(volatile, None)
            settings["data"].pop("dataset", None)
            settings["data"]["hidden"].pop("lora", None)
            backview_fp = self._steps()["backview"]["fingerprint"]
            fingerprint = digest(geometry["digest"], backview_fp, settings, gc.ss_vae)
            return fingerprint, lambda: work(self.state / "models" / f"generator-{fingerprint[:12]}")

        def work(output: Path) -> tuple[dict, str]:
            tcfg = self.generator_config(geometry["output_path"], output, model["lora_path"])
            self._ray()
            counts, failures = build_ss_targets(Path(geometry["output_path"]), gc.ss_vae)
            if not counts.get("encoded", 0) + counts.get("cached", 0):
                raise ValueError(f"no generator targets ({dict(counts)}; e.g. {next(iter(failures.values()), '')})")
            pre = HiddenPrepassConfig(
                shards=[geometry["output_path"]], hidden=tcfg.data.hidden, ray=self.cfg.ray, mlflow=tcfg.mlflow
            )
            hidden = run_hidden_states(pre)
            metrics = run_train_generator(tcfg)
            meta = json.loads((Path(metrics["generator"]) / "know3d_generator.json").read_text())
            outputs = {
                "output_path": str(output),
                "generator_path": metrics["generator"],
                "mlflow_run_id": meta.get("mlflow_run_id"),
                "loss": metrics.get("loss"),
            }
            detail = (
                f"targets {dict(counts)}, hidden states {hidden['counts']}, {metrics.get('step')} steps, "
                f"loss {metrics.get('loss', float('nan')):.4f}"
            )
            return outputs, detail

        return self._step("generator", inputs)

    def generator_heldout(self, geometry: dict) -> list[dict]:
        """The fixed held-out assets of the generator (front image + mesh), written once."""
        from know3d.pipeline.ablation import heldout_cases

        path = self.state / "generator_heldout.json"
        if path.is_file():
            return json.loads(path.read_text())["cases"]
        gc = self.cfg.generator
        cases = heldout_cases(Path(geometry["output_path"]), self.state / "generator_heldout", gc.heldout, gc.split)
        atomic_write(path, json.dumps({"split": gc.split, "cases": cases}, indent=1))
        return cases

    def step_evaluate_generator(self, geometry: dict, trained: dict) -> dict:
        gc = self.cfg.generator

        def inputs():
            cases = self.generator_heldout(geometry)
            model_fp = self._steps()["generator"]["fingerprint"]
            fingerprint = digest(model_fp, cases, gc.eval_set, gc.metric)
            return fingerprint, lambda: work(cases)

        def work(cases: list[dict]) -> tuple[dict, str]:
            metrics = evaluate_generator(
                cases, Path(trained["generator_path"]), self.state / "evals" / f"{self.id}-generator", gc.eval_set
            )
            outputs = {"metrics": metrics, "keys": len(cases)}
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            return outputs, f"{len(cases)} held-out assets: {shown}"

        return self._step("evaluate_generator", inputs)

    def step_register_generator(self, geometry: dict, trained: dict, evaluation: dict) -> dict:
        gc = self.cfg.generator
        tags = {
            "know3d.data.digest": geometry["digest"],
            "know3d.data.run_id": str(geometry.get("mlflow_run_id")),
            "know3d.backview.fingerprint": self._steps()["backview"]["fingerprint"],
            "know3d.heldout": f"{evaluation['keys']} assets ({gc.split})",
        }
        return self._register(
            "register_generator",
            name=self.cfg.registry.generator,
            model_step="generator",
            run_id=trained.get("mlflow_run_id"),
            artifact="generator",
            tags=tags,
            metrics={k: v for k, v in evaluation["metrics"].items() if isinstance(v, float)},
            metric=gc.metric,
            margin=gc.margin,
            higher_is_better=gc.metric != "chamfer_l1",
        )

    # ------------------------------------------------------------------ the cycle

    def run(self) -> dict:
        """All steps under the lock; the cycle's record (also ``state/cycles/<id>.json``)."""
        started = time.time()
        status, failed = "FINISHED", None
        with cycle_lock(self.state), contextlib.ExitStack() as stack:
            self._stack = stack  # Ray starts (or is joined) once, by the first step that runs
            self.say(f"cycle {self.id} on {self.state}")
            try:
                data = self.step_data()
                model = self.step_backview(data)
                evaluation = self.step_evaluate(data, model)
                generator = None
                if self.cfg.generator.enabled:
                    geometry = self.step_data("geometry", self.cfg.generator.data)
                    trained = self.step_generator(geometry, model)
                    generator = (geometry, trained, self.step_evaluate_generator(geometry, trained))
                self.step_register(data, model, evaluation)  # only after every step succeeded
                if generator is not None:
                    self.step_register_generator(*generator)
            except StepFailed as exc:
                status, failed = "FAILED", exc
            record = self._record(started, status, failed)
        return record

    def _ray(self) -> None:
        """One Ray for the cycle's steps (their sessions join it), started only when a step runs:
        a cycle with nothing new never starts Ray."""
        from know3d.core.runtime import ray_session

        if not getattr(self, "_ray_started", False):
            self._stack.enter_context(ray_session(self.cfg.ray))
            self._ray_started = True

    def _record(self, started: float, status: str, failed: StepFailed | None) -> dict:
        done = [r.name for r in self.results if r.status == "done"]
        record = {
            "cycle": self.id,
            "status": status,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "nothing_new": status == "FINISHED" and not done,
            "failed_step": failed.step if failed else None,
            "reason": failed.reason if failed else None,
            "steps": [r.__dict__ for r in self.results],
        }
        (self.state / "cycles").mkdir(parents=True, exist_ok=True)
        atomic_write(self.state / "cycles" / f"{self.id}.json", json.dumps(record, indent=1, default=str))
        self._track(record, started)
        return record

    def _track(self, record: dict, started: float) -> None:
        """The cycle as one MLflow run: each step's status and seconds, the decision."""
        from know3d.core.tracking import make_tracker

        tracker = make_tracker(
            self.cfg.mlflow, stage="cycle", output=self.state, tags={"know3d.cycle": self.id}, start_time=started
        )
        try:
            tracker.log_params({"cycle": self.cfg.model_dump(mode="json")})
            tags = {f"know3d.step.{r.name}": r.status for r in self.results}
            for r in self.results:
                if r.name == "register" and r.outputs:
                    tags["know3d.decision"] = "promoted" if r.outputs.get("promoted") else "refused"
                    tags["know3d.reason"] = str(r.outputs.get("reason"))[:500]
            if record["failed_step"]:
                tags["know3d.failed_step"] = record["failed_step"]
                tags["know3d.reason"] = str(record["reason"])[:500]
            tracker.set_tags(tags)
            tracker.log_metrics({f"seconds.{r.name}": r.seconds for r in self.results})
            for r in self.results:
                if r.name == "evaluate":
                    tracker.log_metrics({f"heldout.{k}": v for k, v in r.outputs.get("metrics", {}).items()})
        finally:
            tracker.close("FINISHED" if record["status"] == "FINISHED" else "FAILED")


def evaluate_backviews(dataset: Path, keys: list[str], lora: Path, work: Path, ecfg: CycleEvalConfig) -> dict:
    """Generate the back view of each held-out pair's front with ``lora`` and compare it with the
    true back view: the mean PSNR and SSIM (at the LoRA's training resolution)."""
    import numpy as np

    from know3d.core.shards import iter_samples, resolve_shards
    from know3d.evaluation.images import compare_images, load_rgb
    from know3d.training.data import decode_image
    from know3d.training.edit_model import to_pil
    from know3d.training.generate import generate_backviews, read_lora_meta

    size = int(read_lora_meta(lora).get("image_size", 512))
    wanted = set(keys)
    fronts, gts, outputs = [], [], []
    for split in ("val", "train"):
        for sample in iter_samples(resolve_shards([str(dataset)], split)[0], fields=("front.png", "back.png")):
            if sample["__key__"] in wanted:
                wanted.discard(sample["__key__"])
                name = sample["__key__"].replace("/", "_")
                (work / "front").mkdir(parents=True, exist_ok=True)
                (work / "gt").mkdir(parents=True, exist_ok=True)
                for field, folder in (("front", "front"), ("back", "gt")):
                    image = decode_image(sample[f"{field}.png"], size, f"{sample['__key__']}.{field}.png")
                    to_pil(image).save(work / folder / f"{name}.png")
                fronts.append(work / "front" / f"{name}.png")
                gts.append(work / "gt" / f"{name}.png")
                outputs.append(work / "pred" / f"{name}.png")
    if wanted:
        raise ValueError(f"{len(wanted)} held-out pairs are no longer in {dataset} (e.g. {sorted(wanted)[0]})")
    generate_backviews(
        fronts, outputs, lora, [None] * len(fronts), steps=ecfg.steps, seed=ecfg.seed, cfg_scale=ecfg.cfg_scale
    )
    scores = [compare_images(load_rgb(p), load_rgb(g)) for p, g in zip(outputs, gts)]
    return {m: float(np.mean([s[m] for s in scores])) for m in ("psnr", "ssim")}


def build_ss_targets(dataset: Path, ss_vae: str) -> tuple[dict, dict]:
    """Stage 1's targets beside a geometry build (what `know3d data targets` does; cached per asset)."""
    from know3d.training.generator.targets import TargetStore, build_targets, encoder_for_targets

    return build_targets(TargetStore(dataset, encoder_for_targets(ss_vae)))


def evaluate_generator(cases: list[dict], generator: Path, work: Path, eval_set: list[str]) -> dict:
    """Shapes of the held-out fronts with ``generator`` (its recorded back-view model), scored
    against their meshes: IoU (volume, 64³), Chamfer-L1, F-score@0.01, and how many meshes came out."""
    from know3d.evaluation.config import EvalConfig
    from know3d.pipeline.ablation import heldout_shapes, shape_means
    from know3d.pipeline.evaluate import evaluate_shapes

    pred = heldout_shapes(cases, generator, work)
    if not pred.is_dir():
        raise ValueError(f"the generator made no mesh for any of the {len(cases)} held-out assets")
    root = Path(cases[0]["image"]).parents[2]  # <held-out folder>/images/<uid>/000.png
    cfg = load_config(None, ["semantic.enabled=false", "mlflow.enabled=false", *eval_set], EvalConfig)
    summary = evaluate_shapes(cfg, pred, root / "images", root / "gt", work / "eval", fresh=True)
    out = shape_means(summary)
    return {**{k: float(v) for k, v in out.items() if v is not None}, "meshes": float(summary.ok)}


def load_cycle_config(path: str | Path, overrides: list[str] | None = None) -> CycleConfig:
    return load_config(path, overrides, CycleConfig)
