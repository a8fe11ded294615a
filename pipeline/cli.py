"""The `know3d` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from know3d.pipeline.config import ConfigError, load_config


class _BareHelp:
    """``--help`` listed without a value type: typer labels every flag ``<bool>``, which reads as
    if it took a value (the reason ``--strict true`` was tried)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_BareHelp, TyperGroup):
    pass


class _Command(_BareHelp, TyperCommand):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Know3D data-and-training pipeline.",
    epilog="Example: know3d --verbose data build configs/quickstart.yaml --source procedural --output runs/quickstart",
)
data_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Build and inspect front/back view data sets.",
    epilog="Example: know3d data status --dataset runs/quickstart",
)
app.add_typer(data_app, name="data")
train_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Train the Know3D models (Ray Train + DeepSpeed).",
    epilog="Example: know3d train backview configs/backview_quickstart.yaml --shards runs/quickstart",
)
app.add_typer(train_app, name="train")
generate_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Run trained models.",
    epilog="Example: know3d generate backview --image front.png --lora runs/train/lora --output back.png",
)
app.add_typer(generate_app, name="generate")
eval_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Evaluate generated meshes and back views (HY3D-Bench protocol).",
    epilog="Example: know3d eval backviews --pred runs/bv/pred --gt runs/bv/gt --output runs/eval-backviews",
)
app.add_typer(eval_app, name="eval")
models_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="Inspect the full-size model architectures (for checking real checkpoints).",
    epilog="Example: know3d models keys ss-encoder > ss_encoder_keys.json",
)
app.add_typer(models_app, name="models")
mlflow_app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    help="MLflow housekeeping: records kept while the tracking server was down.",
    epilog="Example: know3d mlflow replay runs/quickstart/mlflow-buffer/*.jsonl",
)
app.add_typer(mlflow_app, name="mlflow")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _flag(decls: str, help: str) -> Any:
    """A boolean option (``--x`` or ``--x/--no-x``), listed in --help without a value type."""
    return typer.Option(decls, help=help, metavar="")


@app.callback()
def main_options(
    verbose: Annotated[bool, _flag("--verbose", "Show third-party logs (Ray, MLflow, HF hub, ...).")] = False,
) -> None:
    """Options of every command; set before the command runs, so its workers inherit them."""
    from know3d.core.logs import configure

    configure(verbose)  # quiet by default: workers and children inherit the choice


def _quiet_libraries() -> None:
    """Library chatter off for a run; the loggers stay as they are with --verbose."""
    from know3d.core.logs import verbose

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # diffusers/transformers loading bars
    if verbose():
        return
    warnings.filterwarnings("ignore", module="trimesh")
    for name in ("trimesh", "mlflow", "alembic", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _config_file(value: Path | None) -> Path | None:
    """A bare ``true`` where the config file goes is a value given to a flag (``--strict true``);
    say so instead of 'config file not found: true'."""
    if value is not None and str(value).casefold() in _BOOL_WORDS and not value.exists():
        raise typer.BadParameter(
            f"'{value}' is not a config file. Flags such as --strict take no value: "
            f"write --strict, not --strict {value}."
        )
    return value


ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="YAML file of config differences.", callback=_config_file, show_default=False),
]


def _set_opt(example: str) -> Any:
    """``--set``, with an example key of the command's own config (keys differ per command)."""
    return typer.Option("--set", help=f"Override: key.path=value (repeatable), e.g. {example}.")


AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster to join ('auto', ray://host:10001); default: a local Ray.")
]


def _load(config: Path | None, set_: list[str] | None, flags: dict[str, Any], model: Any = None) -> Any:
    """A command's config: the YAML file, then ``--set``, then the command's own flags (those given,
    as ``key -> value``); a config error exits 2 in one message."""
    overrides = [*(set_ or []), *(f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None)]
    try:
        return load_config(config, overrides, model=model) if model else load_config(config, overrides)
    except ConfigError as exc:
        err.print(f"[red]config error:[/] {exc}")
        raise typer.Exit(2) from None


@data_app.command(
    "build",
    cls=_Command,
    epilog="Example: know3d data build configs/quickstart.yaml --source procedural --output runs/quickstart --strict",
)
def data_build(
    config: ConfigArg = None,
    source: Annotated[
        str | None, typer.Option(help="local | objaverse | texverse | procedural; default: the config's source.kind.")
    ] = None,
    input: Annotated[
        list[str] | None, typer.Option("--input", help="Folder, file or glob (repeatable; source local).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (the dataset); default: the config's output.")
    ] = None,
    set_: Annotated[list[str] | None, _set_opt("render.resolution=256")] = None,
    address: AddressOpt = None,
    strict: Annotated[
        bool | None, _flag("--strict/--no-strict", "Exit 1 if any asset failed; default: the config's strict (off).")
    ] = None,
    retry_failed: Annotated[bool, _flag("--retry-failed", "Render assets that failed before again.")] = False,
) -> None:
    """Discover, render and shard 3D assets into front/back pair WebDatasets."""
    _quiet_libraries()
    flags = {"source.kind": source, "output": output and str(output), "ray.address": address, "strict": strict}
    cfg = _load(config, set_, {**flags, "source.local.input": list(input) if input else None})
    if input and cfg.source.kind != "local":
        err.print(f"[yellow]warning:[/] --input has no effect with source '{cfg.source.kind}'")

    from know3d.core.runtime import UsageError
    from know3d.pipeline.build import run_build

    try:
        summary = run_build(cfg, retry_failed=retry_failed)
    except UsageError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    _print_counts(summary.counts)
    m = summary.metrics
    out.print(
        f"{summary.num_samples} samples in {summary.num_shards} shards "
        f"({int(m.get('num_shards_rewritten', 0))} written) -> {summary.output}"
    )
    if "render_views_per_s" in m:
        out.print(f"rendered {m['render_views_per_s']:.1f} views/s, {m['render_assets_per_s']:.2f} assets/s")
    if summary.mlflow_run_id:
        out.print(f"mlflow run {summary.mlflow_run_id}")
    if summary.num_failed:
        out.print(f"[yellow]{summary.num_failed} failed[/] (details: know3d data status --dataset {summary.output})")
        if cfg.strict:
            raise typer.Exit(1) from None


def _print_counts(counts: dict) -> None:
    table = Table(title="assets per stage")
    for col in ("stage", "ok", "filtered", "failed"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for stage, c in counts["stages"].items():
        table.add_row(stage, str(c.get("ok", 0)), str(c.get("filtered", 0)), str(c.get("failed", 0)))
    out.print(table)
    if counts["filters"]:
        out.print("filtered: " + ", ".join(f"{k} {v}" for k, v in counts["filters"].items()))
    if counts["reasons"]:
        out.print("failed:")
        for reason, n in counts["reasons"].items():
            out.print(f"  {n:>5}  {reason}")


DatasetOpt = Annotated[
    Path | None, typer.Option("--dataset", help="A data build's output folder. \\[required]", show_default=False)
]
OutputAlias = Annotated[Path | None, typer.Option("--output", hidden=True, help="Deprecated: --dataset.")]


def _dataset(dataset: Path | None, output: Path | None) -> Path:
    """The folder a read-only command reads: ``--dataset``, or the old ``--output`` name with a
    note (both commands read a dataset; --output suggested they would write one)."""
    if output is not None:
        err.print("[yellow]note:[/] --output is deprecated here; use --dataset", highlight=False)
    folder = dataset or output
    if folder is None:
        raise _Missing("Missing option '--dataset' (a data build's output folder).")
    return folder


class _Missing(typer.BadParameter):
    """A usage error (exit 2, usage line) worded like click's own for a required option; needed
    where the option cannot be declared required because a deprecated alias may stand in."""

    def format_message(self) -> str:
        return self.message


@data_app.command("status", cls=_Command, epilog="Example: know3d data status --dataset runs/quickstart --failures 50")
def data_status(
    dataset: DatasetOpt = None,
    failures: Annotated[int, typer.Option(help="List up to N failed assets.")] = 20,
    output: OutputAlias = None,
) -> None:
    """Counts per stage, filter and failure reason of a build, and its shards."""
    from know3d.core.manifest import read_manifest, summarize
    from know3d.core.shards import load_index

    dataset = _dataset(dataset, output)
    try:
        rows = read_manifest(dataset)
    except FileNotFoundError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    _print_counts(summarize(rows))
    index = load_index(dataset)
    splits = ", ".join(
        f"{k}: {v['num_samples']} samples / {v['num_shards']} shards" for k, v in index.get("splits", {}).items()
    )
    out.print(f"shards: {index.get('num_shards', 0)} ({splits or 'none'})")
    failed = [r for r in rows if r["status"] == "failed"][:failures]
    if failed:
        table = Table(title="failed assets")
        table.add_column("asset")
        table.add_column("stage")
        table.add_column("reason")
        for r in failed:
            table.add_row(r["key"], r["stage"], r["reason"] or "")
        out.print(table)


@data_app.command(
    "targets",
    cls=_Command,
    epilog="Example: know3d data targets --dataset runs/quickstart --ss-vae debug; stage 2: "
    "know3d data targets --dataset runs/quickstart --stage shape --shape-vae debug",
)
def data_targets(
    dataset: DatasetOpt = None,
    stage: Annotated[
        str,
        typer.Option(
            "--stage",
            help="Which generator stage's targets: 'ss' (occupancy + SS-VAE latent, stage 1) or 'shape' "
            "(fine dual grid + shape SC-VAE latent, stage 2).",
        ),
    ] = "ss",
    ss_vae: Annotated[
        str,
        typer.Option(
            "--ss-vae",
            help="Sparse-structure VAE: a folder, .safetensors or hub id holding the TRELLIS ss_enc weights, "
            "or 'debug' (the shipped 32³ CPU model).",
        ),
    ] = "debug",
    shape_vae: Annotated[
        str,
        typer.Option(
            "--shape-vae",
            help="Shape SC-VAE for --stage shape: a folder with its encoder weights and latent normalization "
            "(ours, or TRELLIS.2's shape_enc_next_dc_f16c32_fp16 + pipeline.json), or 'debug' (the shipped "
            "64³ -> 16³ CPU model).",
        ),
    ] = "debug",
    shape_resolution: Annotated[
        int | None,
        typer.Option(
            "--shape-resolution",
            help="Fine dual-grid resolution for --stage shape; default: the shape VAE's stored one (TRELLIS.2's "
            "released weights store none: give 512 or 1024).",
        ),
    ] = None,
) -> None:
    """The 3D generator's per-asset targets beside a data build: stage 1's occupancy + SS-VAE latent,
    or with --stage shape stage 2's dual grid + shape latent."""
    from know3d.training.generator.ss_vae import SSVaeLoadError
    from know3d.training.generator.targets import TargetStore, build_targets, encoder_for_targets

    if stage not in ("ss", "shape"):
        raise typer.BadParameter(f"'{stage}' is not 'ss' or 'shape'", param_hint="--stage")
    dataset = _dataset(dataset, None)
    if stage == "shape":
        _shape_targets(dataset, shape_vae, shape_resolution)
        return
    try:
        store = TargetStore(dataset, encoder_for_targets(ss_vae))
        counts, failures = build_targets(store)
    except (SSVaeLoadError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    out.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no rendered assets")
    for key, reason in list(failures.items())[:20]:
        out.print(f"  {escape(key)}: {escape(reason)}")
    out.print(f"targets -> {store.root}")


def _shape_targets(dataset: Path, shape_vae: str, resolution: int | None) -> None:
    from know3d.training.generator.shape_targets import ShapeTargetStore, build_shape_targets
    from know3d.training.generator.shape_vae import ShapeVAELoadError, load_shape_vae

    try:
        vae = load_shape_vae(shape_vae, parts=("encoder",), resolution=resolution)
        store = ShapeTargetStore(dataset, vae)
        counts, failures = build_shape_targets(store)
    except (ShapeVAELoadError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no rendered assets")
    for key, reason in list(failures.items())[:20]:
        out.print(f"  {escape(key)}: {escape(reason)}")
    out.print(f"shape targets -> {store.root}")


@data_app.command(
    "hidden-states",
    cls=_Command,
    epilog="Example: know3d data hidden-states --shards runs/quickstart --lora runs/train-backview-debug/lora "
    "--set hidden.model=debug:small-qwen-image-edit --set hidden.image_size=64 --set hidden.layers=[1,3]",
)
def data_hidden_states(
    config: ConfigArg = None,
    shards: Annotated[
        list[str] | None,
        typer.Option("--shards", help="Data-build output / shards (repeatable); default: the config's shards."),
    ] = None,
    lora: Annotated[
        Path | None, typer.Option("--lora", help="The back-view LoRA folder; default: the config's hidden.lora.")
    ] = None,
    set_: Annotated[list[str] | None, _set_opt("hidden.layers=[12,24,36,48]")] = None,
    address: AddressOpt = None,
) -> None:
    """Hidden states of the frozen back-view model for every pair (the generator's condition),
    cached beside the other pre-computed inputs; resumes where it stopped."""
    from know3d.core.runtime import UsageError
    from know3d.pipeline.generator_data import run_hidden_states
    from know3d.training.generator.config import HiddenPrepassConfig

    flags = {"shards": shards or None, "hidden.lora": lora and str(lora), "ray.address": address}
    cfg = _load(config, set_, flags, HiddenPrepassConfig)
    try:
        result = run_hidden_states(cfg)
    except (ValueError, FileNotFoundError, UsageError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result["counts"].items()))
    out.print(f"{counts or 'no pairs'} in {result['seconds']:.1f} s -> {result['folder']}")


@data_app.command(
    "review", cls=_Command, epilog="Example: know3d data review --dataset runs/quickstart --num 48 --split val"
)
def data_review(
    dataset: DatasetOpt = None,
    num: Annotated[int, typer.Option(help="Number of pairs to show (a seeded random sample).")] = 48,
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Where to write the gallery; default: <dataset>/review.html.")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only shards of this split (train, val); default: all.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    output: OutputAlias = None,
) -> None:
    """Write a static HTML gallery (front, back, descriptions, status) for N pairs."""
    from know3d.annotation.review import write_gallery
    from know3d.core.shards import load_index

    dataset = _dataset(dataset, output)
    index = load_index(dataset)
    shards = [dataset / e["name"] for e in index.get("shards", []) if split is None or e["split"] == split]
    if not shards:
        err.print(f"[red]error:[/] no shards in {dataset}" + (f" for split '{split}'" if split else ""))
        raise typer.Exit(2) from None
    target = html_path or dataset / "review.html"
    count = write_gallery(shards, target, num, seed)
    out.print(f"{count} pairs -> {target}")


@train_app.command(
    "backview",
    cls=_Command,
    epilog="Example: know3d train backview configs/backview_quickstart.yaml --shards runs/quickstart "
    "--output runs/train-backview --fresh",
)
def train_backview(
    config: ConfigArg = None,
    shards: Annotated[
        list[str] | None,
        typer.Option("--shards", help="Data-build output / shards (repeatable); default: the config's data.shards."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Run folder (checkpoints, LoRA); default: the config's output.")
    ] = None,
    set_: Annotated[list[str] | None, _set_opt("schedule.max_steps=1000")] = None,
    address: AddressOpt = None,
    fresh: Annotated[bool, _flag("--fresh", "Ignore existing checkpoints and start over.")] = False,
) -> None:
    """LoRA of Qwen-Image-Edit for front -> back views; resumes from the last checkpoint."""
    _quiet_libraries()
    from know3d.training.config import TrainBackviewConfig

    flags = {"data.shards": shards or None, "output": output and str(output), "ray.address": address}
    cfg = _load(config, set_, flags, TrainBackviewConfig)
    from know3d.core.runtime import UsageError
    from know3d.pipeline.train import run_train_backview

    try:
        metrics = run_train_backview(cfg, fresh=fresh)
    except (ValueError, FileNotFoundError, UsageError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if metrics.get("already_done"):  # the "already at step N/N" line said it all
        out.print(f"LoRA -> {metrics['lora']}")
        return
    loss = metrics.get("loss")
    out.print(f"trained {metrics.get('step')} steps, loss {loss:.4f}" if loss is not None else "trained")
    if "samples_per_s" in metrics:
        out.print(f"{metrics['samples_per_s']:.1f} samples/s (last logging window)")
    out.print(f"LoRA -> {metrics['lora']}")


@train_app.command(
    "generator",
    cls=_Command,
    epilog="Example: know3d train generator configs/generator_ss_debug.yaml --dataset runs/geo --fresh",
)
def train_generator(
    config: Annotated[Path | None, typer.Argument(help="YAML config (e.g. configs/generator_ss_debug.yaml).")] = None,
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="Data build with targets; default: the config's data.dataset.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Run folder (checkpoints, generator); default: the config's output.")
    ] = None,
    set_: Annotated[list[str] | None, _set_opt("model.condition=vae_latent")] = None,
    address: AddressOpt = None,
    fresh: Annotated[bool, _flag("--fresh", "Ignore existing checkpoints and start over.")] = False,
) -> None:
    """The Know3D generator: stage 1 (TRELLIS.2 sparse-structure flow + H branch), or stage 2
    with model.stage=shape (structured-latent flow); resumes."""
    _quiet_libraries()
    from know3d.training.generator.config import TrainGeneratorConfig

    flags = {"data.dataset": dataset and str(dataset), "output": output and str(output), "ray.address": address}
    cfg = _load(config, set_, flags, TrainGeneratorConfig)
    from know3d.core.runtime import UsageError
    from know3d.pipeline.train import run_train_generator
    from know3d.training.generator.data import GeneratorDataError

    try:
        metrics = run_train_generator(cfg, fresh=fresh)
    except (ValueError, FileNotFoundError, UsageError, GeneratorDataError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    shown = {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "val_iou", "val_chamfer") and v is not None}
    out.print(f"generator -> {metrics['generator']}  " + "  ".join(f"{k} {v}" for k, v in shown.items()))


@train_app.command(
    "ablation",
    cls=_Command,
    epilog="Example: know3d train ablation configs/generator_ss_debug.yaml --output runs/ablation "
    "--variants hidden,vae_latent,dino_back,none",
)
def train_ablation(
    config: Annotated[Path | None, typer.Argument(help="Generator config shared by every variant.")] = None,
    output: Annotated[Path, typer.Option("--output", help="Folder: one run per variant, ablation.md.")] = Path(
        "runs/ablation"
    ),
    variants: Annotated[
        str, typer.Option("--variants", help="Comma-separated model.condition values.")
    ] = "hidden,vae_latent,dino_back,none",
    dataset: Annotated[Path | None, typer.Option("--dataset", help="Data build; default: the config's.")] = None,
    heldout: Annotated[int, typer.Option("--heldout", help="Held-out (val split) assets scored.")] = 8,
    set_: Annotated[list[str] | None, _set_opt("schedule.max_steps=500")] = None,
    eval_set: Annotated[
        list[str] | None,
        typer.Option("--eval-set", help="Evaluation override (repeatable), e.g. semantic.enabled=true."),
    ] = None,
    address: AddressOpt = None,
    fresh: Annotated[bool, _flag("--fresh", "Retrain every variant from scratch.")] = False,
) -> None:
    """The conditioning ablation (paper §4.3): train each variant, score held-out shapes, one table."""
    _quiet_libraries()
    from know3d.training.generator.config import TrainGeneratorConfig

    flags = {"data.dataset": dataset and str(dataset), "ray.address": address}
    cfg = _load(config, set_, flags, TrainGeneratorConfig)
    from know3d.core.runtime import UsageError
    from know3d.pipeline.ablation import run_ablation
    from know3d.training.generator.data import GeneratorDataError

    try:
        result = run_ablation(
            cfg, [v.strip() for v in variants.split(",") if v.strip()], output, eval_set, heldout, fresh
        )
    except (ValueError, FileNotFoundError, UsageError, GeneratorDataError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out.print(Path(result["table"]).read_text())
    out.print(f"table -> {result['table']}")


@generate_app.command(
    "backview",
    cls=_Command,
    epilog="Example: know3d generate backview --image front.png --lora runs/train-backview/lora "
    "--prompt 'two shoulder straps' --output back.png",
)
def generate_backview_cmd(
    image: Annotated[
        list[Path],
        typer.Option(
            "--image",
            help="Front view (PNG/JPEG; alpha is composited on white); repeat for several (the model loads once).",
        ),
    ],
    lora: Annotated[
        Path | None, typer.Option("--lora", help="Exported LoRA folder (<run>/lora); without it, --model alone.")
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            help="A back-view component, e.g. 'two shoulder straps': one for all images, or one per --image "
            "in order ('' = none).",
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option(
            "--output", help="Where to write the back view; with several --image, a folder receiving <front name>.png."
        ),
    ] = Path("back.png"),
    model: Annotated[str | None, typer.Option(help="Base model; default: the one the LoRA was trained on.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 28,
    cfg_scale: Annotated[float, typer.Option(help="True CFG scale (1 = off).")] = 4.0,
    size: Annotated[int | None, typer.Option(help="Resolution; default: the training resolution.")] = None,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
) -> None:
    """Generate the back view of an object from its front view (+ an optional description)."""
    _quiet_libraries()
    from know3d.training.generate import generate_backviews

    prompts = [p or None for p in (prompt or [None])]
    if len(prompts) == 1:
        prompts = prompts * len(image)
    if len(prompts) != len(image):
        err.print(f"[red]error:[/] {len(prompt or [])} --prompt for {len(image)} --image: give one, or one per image")
        raise typer.Exit(2) from None
    if len(image) == 1:
        outputs = [output]
    else:
        names = [p.stem for p in image]
        if len(set(names)) != len(names):
            err.print("[red]error:[/] several --image share a file name; their back views would overwrite each other")
            raise typer.Exit(2) from None
        outputs = [output / f"{name}.png" for name in names]
    try:
        paths = generate_backviews(
            image, outputs, lora, prompts, model=model, image_size=size, steps=steps, seed=seed, cfg_scale=cfg_scale
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    for path in paths:
        out.print(f"back view -> {path}")


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="The model that produced --pred (an exported folder such as <run>/lora, or a runs:/ URI): links this "
        "evaluation to its training run in MLflow.",
    ),
]


def _run_eval(
    config: Path | None, set_: list[str] | None, extra: list[str], address: str | None, strict: bool, run
) -> None:
    """Resolve the eval config (file, flags, --set), run, print the summary; usage errors exit 2."""
    from know3d.evaluation.config import EvalConfig
    from know3d.evaluation.discovery import EvalError

    if address:
        extra.append(f"ray.address={json.dumps(address)}")
    try:
        cfg = load_config(config, extra + list(set_ or []), model=EvalConfig)
    except ConfigError as exc:
        err.print(f"[red]config error:[/] {exc}")
        raise typer.Exit(2) from None
    from know3d.core.runtime import UsageError

    try:
        summary = run(cfg)
    except (EvalError, UsageError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    _print_eval(summary, strict)


def _print_eval(summary, strict: bool) -> None:
    from know3d.evaluation.results import order_metrics

    table = Table(
        title=f"eval {summary.kind}: {summary.ok} ok, {summary.errors} errors, {summary.missing} missing of {summary.total}"
    )
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("n", justify="right")
    for key in order_metrics(list(summary.table)):
        t = summary.table[key]
        table.add_row(key, f"{t['mean']:.5g}", str(t["count"]))
    out.print(table)
    for uid, reason in summary.failures[:10]:
        out.print(f"[red]{escape(uid)}[/]: {escape(reason)}")
    if len(summary.failures) > 10:
        out.print(f"... {len(summary.failures) - 10} more in summary.json")
    if summary.semantic_failures:
        out.print(
            f"{len(summary.semantic_failures)} uid(s) without ULIP/Uni3D scores (geometry kept), e.g. "
            f"{escape(summary.semantic_failures[0][0])}: {escape(summary.semantic_failures[0][1])}"
        )
    for name, reason in summary.skipped.items():
        out.print(f"skipped {escape(name)}: {escape(reason)}")
    reused = f"; {summary.reused} reused from an earlier run" if summary.reused else ""
    out.print(f"results -> {summary.output} (report.html, metrics.csv, metrics.md, results/){reused}")
    if summary.run_id:
        out.print(f"mlflow run {summary.run_id}")
    if strict and (summary.errors or summary.missing):
        raise typer.Exit(1) from None


EvalConfigArg = Annotated[
    Path | None,
    typer.Argument(
        help="YAML file of eval config differences (see configs/eval_hy3d.yaml).",
        callback=_config_file,
        show_default=False,
    ),
]
EvalSetOpt = Annotated[list[str] | None, _set_opt("geometry.icp=true")]
EvalStrictOpt = Annotated[bool, _flag("--strict", "Exit 1 if any uid failed or is missing.")]
FreshOpt = Annotated[
    bool,
    _flag(
        "--fresh", "Recompute every uid (default: reuse results of an earlier run with the same protocol and inputs)."
    ),
]


@generate_app.command(
    "shape",
    cls=_Command,
    epilog="Example: know3d generate shape --image front.png --prompt 'a zipper and two straps' "
    "--backview-lora runs/train-backview-debug/lora --generator runs/train-generator-debug/generator --output out/",
)
def generate_shape_cmd(
    image: Annotated[Path, typer.Option("--image", help="Front view (RGBA PNG with the object on transparency).")],
    generator: Annotated[Path, typer.Option("--generator", help="An exported stage-1 generator (<run>/generator).")],
    output: Annotated[Path, typer.Option("--output", help="Folder for back.png, occupancy.npz, mesh.glb.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="What the back shows (optional).")] = None,
    shape_generator: Annotated[
        Path | None,
        typer.Option(
            "--shape-generator",
            help="An exported stage-2 (shape) generator: the mesh comes from its decoded dual grid; without it, "
            "from stage 1's occupancy (coarse).",
        ),
    ] = None,
    backview_lora: Annotated[
        Path | None,
        typer.Option("--backview-lora", help="Back-view LoRA folder; default: the one the generator was trained with."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default: 12, TRELLIS.2).")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", help="Guidance strength (default: 7.5).")] = None,
    multiview: Annotated[
        str | None,
        typer.Option(
            "--multiview",
            help="The multi-view baseline (paper §4.2): front + generated back view as two DINOv3 image conditions "
            "instead of H, TRELLIS's 'stochastic' or 'multidiffusion' mode; needs generators trained with "
            "model.condition=none.",
        ),
    ] = None,
    front_guidance: Annotated[
        str | None,
        typer.Option(
            "--front-guidance",
            help="Keep the visible front faithful (Consistent3DGen): the point map of the front view from its "
            "rendered 'depth' + camera, or from 'vggt'; needs --shape-generator.",
        ),
    ] = None,
    guidance_lambda: Annotated[
        float | None,
        typer.Option(
            "--guidance-lambda", help="lambda of the pull on stage 2 (default 1.0; stage 1: --guidance-set lam_ss=...)."
        ),
    ] = None,
    front_depth: Annotated[
        Path | None,
        typer.Option(
            "--front-depth",
            help="The front view's z-depth: 16-bit PNG (scale from --front-camera) or float .npy; default for a "
            "rendered <asset>/rgba/NNN.png: <asset>/depth/NNN.png.",
        ),
    ] = None,
    front_camera: Annotated[
        Path | None,
        typer.Option(
            "--front-camera",
            help="JSON with the front view's camera (a camera, a shard sample's .json or a render's asset.json "
            "with --front-view); default for a rendered view: its asset.json.",
        ),
    ] = None,
    front_view: Annotated[
        int | None, typer.Option("--front-view", help="Camera index in a render's asset.json.")
    ] = None,
    guidance_set: Annotated[
        list[str] | None,
        typer.Option(
            "--guidance-set",
            help="Front-guidance setting key=value (repeatable), e.g. lam_ss=0.5, integrator=implicit, "
            "on_bad_front=unguided, vggt_model=debug.",
        ),
    ] = None,
) -> None:
    """Front view (+ description of the back) -> back view -> H -> sparse structure -> shape latent -> mesh (GLB)."""
    _quiet_libraries()
    from know3d.core.config import ConfigError, load_config
    from know3d.training.generator.front_guidance import FrontGuidanceConfig
    from know3d.training.generator.generate import generate_shape
    from know3d.training.generator.model import GeneratorLoadError

    overrides = {k: v for k, v in (("steps", steps), ("guidance_strength", cfg_scale)) if v is not None}
    guidance, front = None, None
    if front_guidance is None and (guidance_lambda is not None or guidance_set or front_depth or front_camera):
        err.print(
            "[red]error:[/] --guidance-lambda, --guidance-set, --front-depth and --front-camera need --front-guidance"
        )
        raise typer.Exit(2)
    if front_guidance is not None:
        extra = [f"source={front_guidance}", *(guidance_set or [])]
        if guidance_lambda is not None:
            extra.append(f"lam_shape={guidance_lambda}")
        try:
            guidance = load_config(None, extra, model=FrontGuidanceConfig)
        except ConfigError as exc:
            err.print(f"[red]error:[/] front guidance: {escape(str(exc))}")
            raise typer.Exit(2) from None
        front = {"depth": front_depth, "camera": front_camera, "view": front_view}
    try:
        summary = generate_shape(
            image,
            generator,
            output,
            prompt,
            backview_lora,
            seed,
            overrides,
            shape_generator=shape_generator,
            multiview=multiview,
            front_guidance=guidance,
            front=front,
        )
    except (GeneratorLoadError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out.print(f"back view -> {summary['back']}")
    out.print(f"occupancy -> {summary['occupancy']} ({summary['occupied_voxels']} voxels)")
    if summary["mesh"]:
        out.print(f"mesh -> {summary['mesh']} (from the {summary['mesh_from'].replace('_', ' ')})")
    else:
        out.print(f"mesh: none ({summary['no_mesh_reason']})")
    fg = summary.get("front_guidance")
    if fg is not None and fg.get("unguided_reason"):
        out.print(f"front guidance: off ({escape(fg['unguided_reason'])})")
    elif fg is not None:
        t = fg["targets"]
        out.print(
            f"front guidance ({fg['source']}, lambda ss {fg['lam_ss']} / shape {fg['lam_shape']}): "
            f"{t['sheet_faces']} front triangles -> {t['shape_front_voxels']} shape-latent voxels, "
            f"{t['ss_mask_cells']} stage-1 cells; points -> {fg['points']}"
        )
    out.print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["seconds"].items()))


@generate_app.command(
    "shapes",
    cls=_Command,
    epilog="Example: know3d generate shapes --images bench/images --generator runs/train-generator/generator "
    "--prompts bench/prompts.json --output runs/gen --workers 4 && know3d eval shapes --pred runs/gen "
    "--images bench/images --gt bench/gt --output runs/eval-gen",
)
def generate_shapes_cmd(
    images: Annotated[
        Path,
        typer.Option(
            "--images",
            help="Front views (RGBA, object on transparency): <images>/<uid>/000.png (HY3D-Bench, optional "
            "<uid>/prompt.txt) or a folder of <uid>.png.",
        ),
    ],
    generator: Annotated[Path, typer.Option("--generator", help="An exported stage-1 generator (<run>/generator).")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            help="<output>/<uid>/000.glb (what `know3d eval shapes --pred` reads), <uid>/work/, generation.json.",
        ),
    ],
    shape_generator: Annotated[
        Path | None,
        typer.Option(
            "--shape-generator",
            help="An exported stage-2 (shape) generator; without it, meshes come from stage 1's occupancy (coarse).",
        ),
    ] = None,
    backview_lora: Annotated[
        Path | None,
        typer.Option("--backview-lora", help="Back-view LoRA folder; default: the one the generator was trained with."),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help='JSON {"<uid>": "what the back shows"}; wins over <uid>/prompt.txt.'),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Ray actors, each holding the models (and a GPU, on a GPU cluster).")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed (the same for every uid).")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampler steps (default: 12, TRELLIS.2).")] = None,
    cfg_scale: Annotated[float | None, typer.Option("--cfg", help="Guidance strength (default: 7.5).")] = None,
    fresh: Annotated[
        bool,
        _flag(
            "--fresh",
            "Generate every uid again (default: keep a uid whose 000.glb was made from the same front view, prompt, "
            "models, seed and sampler settings).",
        ),
    ] = False,
    address: AddressOpt = None,
) -> None:
    """Front views of a folder -> one mesh per uid in HY3D-Bench's layout, on Ray; resumes."""
    _quiet_libraries()
    from know3d.core.config import RayConfig
    from know3d.core.runtime import UsageError
    from know3d.pipeline.generate_batch import generate_batch, read_prompts

    overrides = {k: v for k, v in (("steps", steps), ("guidance_strength", cfg_scale)) if v is not None}
    try:
        summary = generate_batch(
            images,
            output,
            generator,
            shape_generator,
            backview_lora,
            read_prompts(prompts) if prompts is not None else None,
            seed,
            overrides,
            ray_cfg=RayConfig(address=address),
            workers=workers,
            fresh=fresh,
        )
    except UsageError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if summary.unmatched_prompts:
        shown = ", ".join(escape(u) for u in summary.unmatched_prompts[:5])
        err.print(f"[yellow]prompts without an image: {len(summary.unmatched_prompts)} ({shown})[/]")
    c = summary.counts
    skipped = f" ({c['skipped']} kept from an earlier run)" if c["skipped"] else ""
    out.print(
        f"{c['ok']} meshes{skipped}, {c['no_mesh']} without a mesh, {c['failed']} failed "
        f"of {summary.total} uids in {summary.seconds:.1f} s"
    )
    for uid, reason in (summary.failures + summary.no_mesh)[:10]:
        out.print(f"[red]{escape(uid)}[/]: {escape(reason)}")
    if len(summary.failures) + len(summary.no_mesh) > 10:
        out.print(f"... {len(summary.failures) + len(summary.no_mesh) - 10} more in {summary.record}")
    out.print(f"meshes -> {summary.output}/<uid>/000.glb (per uid: {summary.record})")


@eval_app.command(
    "shapes",
    cls=_Command,
    epilog="Example: know3d eval shapes configs/eval_hy3d.yaml --pred outputs/method --images outputs/image "
    "--gt outputs/gt --output runs/eval-shapes",
)
def eval_shapes_cmd(
    pred: Annotated[Path, typer.Option("--pred", help="A method's meshes: <pred>/<uid>/000.glb.")],
    output: Annotated[Path, typer.Option("--output", help="Output folder (results, tables, report).")],
    images: Annotated[Path | None, typer.Option("--images", help="Condition images: <images>/<uid>/000.png.")] = None,
    gt: Annotated[
        Path | None, typer.Option("--gt", help="Ground-truth meshes: <gt>/<uid>/000.glb (geometry metrics).")
    ] = None,
    semantic: Annotated[
        bool | None,
        _flag(
            "--semantic/--no-semantic", "Compute the ULIP / Uni3D scores; default: the config's semantic.enabled (on)."
        ),
    ] = None,
    ulip_ckpt: Annotated[Path | None, typer.Option("--ulip-ckpt", help="ULIP-2 PointBERT checkpoint.")] = None,
    uni3d_ckpt: Annotated[Path | None, typer.Option("--uni3d-ckpt", help="Uni3D-g model.pt.")] = None,
    clip_ckpt: Annotated[Path | None, typer.Option("--clip-ckpt", help="open_clip EVA02-E-14-plus weights.")] = None,
    model: ModelOpt = None,
    config: EvalConfigArg = None,
    set_: EvalSetOpt = None,
    address: AddressOpt = None,
    strict: EvalStrictOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """Image–shape (ULIP, Uni3D) and geometry (CD, F-score, NC, IoU) metrics of generated meshes."""
    _quiet_libraries()
    extra = [f"model={json.dumps(model)}"] if model else []
    if semantic is not None:
        extra.append(f"semantic.enabled={json.dumps(semantic)}")
    for key, value in (
        ("ulip.checkpoint", ulip_ckpt),
        ("uni3d.checkpoint", uni3d_ckpt),
        ("uni3d.clip_checkpoint", clip_ckpt),
    ):
        if value is not None:
            extra.append(f"semantic.{key}={json.dumps(str(value))}")
    from know3d.pipeline.evaluate import evaluate_shapes

    _run_eval(config, set_, extra, address, strict, lambda cfg: evaluate_shapes(cfg, pred, images, gt, output, fresh))


@eval_app.command(
    "backviews",
    cls=_Command,
    epilog="Example: know3d eval backviews --pred runs/bv/pred --gt runs/bv/gt --images runs/bv/front "
    "--model runs/train-backview/lora --output runs/eval-backviews",
)
def eval_backviews_cmd(
    pred: Annotated[Path, typer.Option("--pred", help="Generated back views: <pred>/<uid>/000.png.")],
    gt: Annotated[Path, typer.Option("--gt", help="True back views: <gt>/<uid>/000.png.")],
    output: Annotated[Path, typer.Option("--output", help="Output folder (results, tables, report).")],
    images: Annotated[
        Path | None, typer.Option("--images", help="Front (condition) views, shown in the report.")
    ] = None,
    background: Annotated[
        str | None,
        typer.Option(help="Background both images are composited on: white|black|gray; default: the config's (white)."),
    ] = None,
    model: ModelOpt = None,
    config: EvalConfigArg = None,
    set_: EvalSetOpt = None,
    address: AddressOpt = None,
    strict: EvalStrictOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """PSNR / SSIM (and LPIPS when its weights are local) of generated back views."""
    _quiet_libraries()
    extra = [f"model={json.dumps(model)}"] if model else []
    if background:
        extra.append(f"images.background={background}")
    from know3d.pipeline.evaluate import evaluate_backviews

    _run_eval(
        config, set_, extra, address, strict, lambda cfg: evaluate_backviews(cfg, pred, gt, output, images, fresh)
    )


@eval_app.command(
    "guidance-sweep",
    cls=_Command,
    epilog="Example: know3d eval guidance-sweep --dataset runs/geo --generator runs/train-generator-debug/generator "
    "--shape-generator runs/train-generator-shape-debug/generator --lambdas 0.25,1,4,16 --output runs/guidance-sweep",
)
def eval_guidance_sweep_cmd(
    dataset: Annotated[
        list[Path], typer.Option("--dataset", help="Data build(s) whose held-out assets are generated (repeatable).")
    ],
    generator: Annotated[Path, typer.Option("--generator", help="An exported stage-1 generator.")],
    shape_generator: Annotated[Path, typer.Option("--shape-generator", help="An exported stage-2 generator.")],
    output: Annotated[Path, typer.Option("--output", help="Folder: one subfolder per setting, guidance_sweep.md.")],
    lambdas: Annotated[
        str, typer.Option("--lambdas", help="Comma-separated lambda values (the unguided run is always added).")
    ] = "0.25,0.5,1,2,4,8,16",
    key: Annotated[
        str, typer.Option("--key", help="The swept setting: lam_shape (stage 2) or lam_ss (stage 1).")
    ] = "lam_shape",
    split: Annotated[str, typer.Option("--split", help="Assets from the val split, train or all.")] = "val",
    heldout: Annotated[int, typer.Option("--heldout", help="Assets per data build.")] = 8,
    backview_lora: Annotated[
        Path | None, typer.Option("--backview-lora", help="Back-view LoRA; default: the generator's own.")
    ] = None,
    guidance_set: Annotated[
        list[str] | None,
        typer.Option("--guidance-set", help="Front-guidance setting key=value (repeatable), e.g. integrator=implicit."),
    ] = None,
    set_: EvalSetOpt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Front-partial guidance on held-out assets: front consistency and IoU / Chamfer, unguided and per lambda."""
    _quiet_libraries()
    from know3d.core.config import ConfigError
    from know3d.pipeline.ablation import run_guidance_sweep
    from know3d.training.generator.model import GeneratorLoadError

    if split not in ("val", "train", "all"):
        err.print(f"[red]error:[/] --split must be val, train or all, got {escape(split)}")
        raise typer.Exit(2)
    try:
        values = [float(v) for v in lambdas.split(",") if v.strip()]
        result = run_guidance_sweep(
            generator,
            shape_generator,
            dataset,
            output,
            values,
            heldout,
            split,
            key,
            backview_lora,
            guidance_set,
            set_,
            seed,
        )
    except (ConfigError, GeneratorLoadError, FileNotFoundError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    out.print(Path(result["table"]).read_text())
    out.print(f"table -> {result['table']}")


@mlflow_app.command(
    "replay", cls=_Command, epilog="Example: know3d mlflow replay runs/quickstart/mlflow-buffer/*.jsonl"
)
def mlflow_replay(
    files: Annotated[list[Path], typer.Argument(help="Buffer files (<output>/mlflow-buffer/*.jsonl).")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="Send them to this store instead of the one each file names.")
    ] = None,
) -> None:
    """Send what a run kept on disk while its MLflow server was down, in order; each file is removed
    once all of it is through. Exit 1 if a server still does not answer (the file is kept)."""
    from know3d.core.tracking import replay_buffer

    failed = 0
    for path in files:
        try:
            run_id = replay_buffer(path, tracking_uri)
        except (OSError, ValueError, RuntimeError) as exc:
            err.print(f"[red]{escape(str(path))}:[/] {escape(str(exc))}")
            failed += 1
            continue
        out.print(f"{escape(str(path))}: replayed into run {run_id}")
    if failed:
        raise typer.Exit(1)


@app.command(
    "run",
    cls=_Command,
    epilog="Example: know3d run configs/retrain_quickstart.yaml   (a second run with nothing new does nothing)",
)
def run_cycle(
    config: Annotated[Path, typer.Argument(help="The cycle's YAML (configs/retrain.yaml).", show_default=False)],
    set_: Annotated[list[str] | None, _set_opt("evaluation.margin=0.5")] = None,
    address: AddressOpt = None,
) -> None:
    """One retraining cycle: incremental data build -> back-view LoRA -> held-out evaluation ->
    (with generator.enabled: geometry build -> generator -> its held-out evaluation) -> model
    registry (a champion alias moves only if the new model is better). Unchanged steps are
    skipped. Exit 0 done, 1 a step failed (named; the champion is untouched), 2 usage, 3 locked."""
    _quiet_libraries()
    from know3d.pipeline.cycle import Cycle, CycleConfig, CycleLocked

    cfg = _load(config, set_, {"ray.address": address}, CycleConfig)
    try:
        record = Cycle(cfg, say=lambda line: out.print(escape(line), highlight=False)).run()
    except CycleLocked as exc:
        err.print(f"[red]refused:[/] {escape(str(exc))}")
        raise typer.Exit(3) from None
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    if record["status"] != "FINISHED":
        err.print(
            f"[red]cycle failed at step '{record['failed_step']}':[/] {escape(str(record['reason']))} "
            "(the champion is unchanged)"
        )
        raise typer.Exit(1)
    if record["nothing_new"]:
        out.print("nothing new: every step's inputs are unchanged since the last cycle")
    else:
        out.print(f"cycle {record['cycle']} finished in {record['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """Console entry point; exits with the command's status (0 ok, 1 --strict failures, 2 usage)."""
    app(args=argv, prog_name="know3d")


if __name__ == "__main__":
    main(sys.argv[1:])


@models_app.command("keys", cls=_Command, epilog="Example: know3d models keys dinov3-vitl16 > dinov3_keys.json")
def models_keys_cmd(
    name: Annotated[
        str,
        typer.Argument(
            help="Architecture: ss-encoder, ss-decoder, ss-flow, slat-flow, shape-encoder, shape-decoder, dinov3-vitl16."
        ),
    ],
) -> None:
    """Print a full-size architecture's checkpoint {key: shape} as JSON (built on the meta device)."""
    from know3d.training.generator.architectures import architecture_keys

    try:
        keys = architecture_keys(name)
    except KeyError as exc:
        err.print(f"[red]error:[/red] {escape(exc.args[0])}")
        raise typer.Exit(2) from None
    sys.stdout.write(json.dumps(keys, indent=1) + "\n")


@models_app.command("list", cls=_Command, epilog="Example: know3d models list")
def models_list_cmd() -> None:
    """The architectures `know3d models keys` knows."""
    from know3d.training.generator.architectures import ARCHITECTURES

    for name, (about, _) in ARCHITECTURES.items():
        out.print(f"{name:16} {escape(about)}")
