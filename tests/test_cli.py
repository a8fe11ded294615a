"""The `know3d` command line without Ray: flags, required options, examples, --verbose, and
that every config key a message tells the user to set is one `--set` accepts."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from know3d.core.config import load_config
from know3d.core.manifest import ManifestRow, write_manifest
from know3d.evaluation.config import EvalConfig
from know3d.pipeline.cli import app
from know3d.pipeline.config import BuildConfig
from know3d.pipeline.cycle import CycleConfig
from know3d.training.config import TrainBackviewConfig
from know3d.training.generator.config import HiddenPrepassConfig, TrainGeneratorConfig

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str) -> Any:
    """Run the CLI in-process, wide enough that help lines do not wrap mid-word."""
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def _commands(group: Any = None, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(argv path, click command) of the app, every group and every command."""
    group = group or typer.main.get_command(app)
    found = [(path, group)]
    for name, command in getattr(group, "commands", {}).items():
        found += _commands(command, (*path, name)) if hasattr(command, "commands") else [((*path, name), command)]
    return found


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A build output with a manifest (one failed asset) and no shards."""
    out = tmp_path / "ds"
    out.mkdir()
    rows = [
        ManifestRow("local:a.glb", "local", "render", "ok"),
        ManifestRow("local:b.glb", "local", "render", "failed", reason="empty file"),
    ]
    write_manifest(out, rows)
    return out


# --------------------------------------------------------------------------- data status / review


def test_status_reads_dataset(dataset: Path) -> None:
    res = invoke("data", "status", "--dataset", str(dataset))
    assert res.exit_code == 0, res.output
    assert "local:b.glb" in res.stdout and "empty file" in res.stdout
    assert "deprecated" not in res.stderr


def test_output_is_a_deprecated_alias(dataset: Path) -> None:
    res = invoke("data", "status", "--output", str(dataset))
    assert res.exit_code == 0, res.output
    assert "local:b.glb" in res.stdout
    assert res.stderr.strip() == "note: --output is deprecated here; use --dataset"
    res = invoke("data", "review", "--output", str(dataset))
    assert res.exit_code == 2 and f"no shards in {dataset}" in res.stderr  # the alias reached the command
    assert "deprecated here; use --dataset" in res.stderr
    assert "--output" not in invoke("data", "status", "--help").stdout  # hidden


def test_review_reads_dataset_and_dataset_is_required(dataset: Path) -> None:
    res = invoke("data", "review", "--dataset", str(dataset))
    assert res.exit_code == 2 and f"no shards in {dataset}" in res.stderr
    for command in ("status", "review"):
        res = invoke("data", command)
        assert res.exit_code == 2 and "Missing option '--dataset'" in res.output


# --------------------------------------------------------------------------- flags


def _fake_build(monkeypatch: pytest.MonkeyPatch) -> list[BuildConfig]:
    """Replace the Ray build by one that records the config it was given."""
    import know3d.pipeline.build as build

    seen: list[BuildConfig] = []

    def run_build(cfg: BuildConfig, retry_failed: bool = False) -> Any:
        seen.append(cfg)
        counts = {"stages": {}, "filters": {}, "reasons": {}}
        return SimpleNamespace(
            counts=counts, metrics={}, num_samples=0, num_shards=0, output=cfg.output, mlflow_run_id=None, num_failed=0
        )

    monkeypatch.setattr(build, "run_build", run_build)
    return seen


def test_strict_is_a_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    help_text = invoke("data", "build", "--help").stdout
    line = next(x for x in help_text.splitlines() if "--strict" in x)
    assert "--no-strict" in line and "<bool>" not in line  # no value to give
    seen = _fake_build(monkeypatch)
    yaml_strict = tmp_path / "strict.yaml"
    yaml_strict.write_text("strict: true\n")
    assert invoke("data", "build", "--strict").exit_code == 0
    assert invoke("data", "build").exit_code == 0
    assert invoke("data", "build", str(yaml_strict), "--no-strict").exit_code == 0
    assert invoke("data", "build", str(yaml_strict)).exit_code == 0
    assert [cfg.strict for cfg in seen] == [True, False, False, True]


@pytest.mark.parametrize("value", ["true", "false", "1"])
def test_flag_given_a_value_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    seen = _fake_build(monkeypatch)
    res = invoke("data", "build", "--strict", value)
    assert res.exit_code == 2 and seen == []
    assert "take no value: write --strict, not --strict" in res.output and "config file not found" not in res.output
    res = invoke("eval", "backviews", "--pred", "p", "--gt", "g", "--output", "o", "--fresh", value)
    assert res.exit_code == 2 and "take no value: write --strict, not --strict" in res.output
    res = invoke("data", "status", "--dataset", "d", "--failures", "3", value)
    assert res.exit_code == 2 and "unexpected extra argument" in res.output and f"({value})" in res.output


def test_semantic_flag_pair(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import know3d.pipeline.evaluate as evaluate
    from know3d.evaluation.discovery import EvalError

    seen: list[EvalConfig] = []

    def evaluate_shapes(cfg: EvalConfig, *args: Any) -> Any:
        seen.append(cfg)
        raise EvalError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_shapes", evaluate_shapes)
    base = ("eval", "shapes", "--pred", str(tmp_path), "--output", str(tmp_path / "out"))
    for extra in (["--no-semantic"], ["--semantic"], []):
        res = invoke(*base, *extra)
        assert res.exit_code == 2 and "stop here" in res.stderr
    assert [cfg.semantic.enabled for cfg in seen] == [False, True, True]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(("path", "command"), _commands(), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_help_has_example_required_and_bare_flags(path: tuple[str, ...], command: Any) -> None:
    res = invoke(*path, "--help")
    assert res.exit_code == 0, res.output
    assert "Example: know3d " in res.stdout
    assert "<bool>" not in res.stdout  # flags are listed without a value
    for param in command.params:
        if param.hidden or param.param_type_name != "option":
            continue
        row = re.compile(rf"^[│\s*]*{re.escape(param.opts[0])}\b")
        line = next(x for x in res.stdout.splitlines() if row.match(x))
        # --dataset is required except where a training config names it (data.dataset)
        if param.required or (param.opts[0] == "--dataset" and "config" not in (param.help or "")):
            assert "[required]" in line, line
        if param.is_bool_flag:
            assert "<" not in line.split(param.help or "", 1)[0], line


# --------------------------------------------------------------------------- --verbose


@pytest.mark.parametrize(("args", "expected"), [(["--verbose"], "1"), ([], "0")])
def test_verbose_sets_the_environment(
    monkeypatch: pytest.MonkeyPatch, dataset: Path, args: list[str], expected: str
) -> None:
    monkeypatch.setenv("KNOW3D_VERBOSE", "unset")
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)  # configure() sets them; restored after the test
    res = invoke(*args, "data", "status", "--dataset", str(dataset))
    assert res.exit_code == 0, res.output
    assert os.environ["KNOW3D_VERBOSE"] == expected


# --------------------------------------------------------------------------- config keys in hints


def _hint_constants() -> list[tuple[str, type[BaseModel]]]:
    """Keys the messages take from module constants (so a renamed key fails here)."""
    from know3d.evaluation import backviews, images, semantic
    from know3d.rendering.sources import objaverse, texverse

    keys = [
        (objaverse.DOWNLOAD_DIR_KEY, BuildConfig),
        (texverse.CACHE_DIR_KEY, BuildConfig),
        (images.LPIPS_BACKBONE_KEY, EvalConfig),
        (backviews.LPIPS_KEY, EvalConfig),
    ]
    return keys + [(key, EvalConfig) for key in semantic.CHECKPOINT_KEYS.values()]


#: a dotted key where a message tells the user to set it: "set k", "--set k", "(k", "k=", "k is"
_KEY = r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+"
_HINT = re.compile(
    rf"(?:\b(?:set|pass|use|or)\s+(?:--set\s+)?|--set\s+|\()({_KEY})\b(?![.(/])|\b({_KEY})(?:=(?!=)|\s+(?:is|must)\b)"
)
_NOT_KEYS = {"key.path"}  # the placeholder of --set's help
_FILE_SUFFIXES = {"bin", "html", "json", "pt", "pth", "safetensors", "yaml", "glb", "png", "csv", "md", "tar"}
#: which config a package's messages speak of; None = any of them (shared code, the CLI)
_MODELS: dict[str, type[BaseModel] | None] = {
    "core": None,
    "rendering": BuildConfig,
    "annotation": BuildConfig,
    "training": TrainBackviewConfig,
    "evaluation": EvalConfig,
    "pipeline/build.py": BuildConfig,
    "pipeline/train.py": None,  # both trainers
    "training/generator": None,  # the generator's and the pre-pass's configs
    "pipeline/evaluate.py": EvalConfig,
    "pipeline/cycle.py": None,  # the cycle's own keys and those of the stages it runs
    "pipeline": None,
}


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """String literals (f-string parts included) that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def _scanned_hints() -> list[tuple[str, str, type[BaseModel] | None]]:
    found = []
    for package in ("core", "rendering", "annotation", "training", "evaluation", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            owner = max((k for k in _MODELS if rel == k or rel.startswith(k + "/")), key=len, default=package)
            model = _MODELS[owner]
            for line, text in _message_strings(path):
                for match in _HINT.finditer(text):
                    key = match.group(1) or match.group(2)
                    if key not in _NOT_KEYS and key.rsplit(".", 1)[1] not in _FILE_SUFFIXES:
                        found.append((f"{rel}:{line}", key, model))
    return found


def _default_value(model: type[BaseModel], key: str) -> str:
    """A value `--set key=...` accepts: the default, as YAML (JSON is YAML)."""
    node: Any = model().model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return json.dumps(node)


def _accepts(model: type[BaseModel], key: str) -> bool:
    try:
        load_config(None, [f"{key}={_default_value(model, key)}"], model)
    except (KeyError, TypeError, ValueError):  # ConfigError is a ValueError
        return False
    return True


@pytest.mark.parametrize(("key", "model"), _hint_constants(), ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_hint_constants_are_settable(key: str, model: type[BaseModel]) -> None:
    assert _accepts(model, key), f"--set {key}=... is rejected by {model.__name__}"


@pytest.mark.parametrize(
    ("where", "key", "model"),
    _scanned_hints(),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_config_keys_named_in_messages_are_settable(where: str, key: str, model: type[BaseModel] | None) -> None:
    models = (
        [model]
        if model
        else [BuildConfig, TrainBackviewConfig, TrainGeneratorConfig, EvalConfig, HiddenPrepassConfig, CycleConfig]
    )
    assert any(_accepts(m, key) for m in models), f"{where}: '{key}' is not a key of {[m.__name__ for m in models]}"


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (("data", "build"), BuildConfig),
        (("train", "backview"), TrainBackviewConfig),
        (("eval", "shapes"), EvalConfig),
        (("eval", "backviews"), EvalConfig),
        (("data", "hidden-states"), HiddenPrepassConfig),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, tuple) else x.__name__,
)
def test_set_example_in_help_is_accepted(path: tuple[str, ...], model: type[BaseModel]) -> None:
    """Each command's --set help shows a key of its own config, with a value that loads."""
    example = re.search(rf"e\.g\. ({_KEY}=\S+?)\.?\s", invoke(*path, "--help").stdout)
    assert example, "no --set example"
    load_config(None, [example.group(1)], model)


def test_the_scan_sees_the_known_hints() -> None:
    """The regex must keep finding hints (a too-narrow pattern would pass vacuously)."""
    keys = {key for _, key, _ in _scanned_hints()}
    assert {"data.shards", "source.local.input", "semantic.num_gpus", "load.allow_relative_obj_indices"} <= keys


def test_eval_model_option_reaches_the_config(monkeypatch, tmp_path: Path):
    """--model is recorded for lineage (config key `model`), without touching the protocol."""
    import know3d.pipeline.evaluate as evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_backviews", lambda cfg, *a, **k: seen.setdefault("cfg", cfg) and None)
    args = [
        "eval",
        "backviews",
        "--pred",
        str(tmp_path),
        "--gt",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--model",
        "runs:/abc/lora",
    ]
    CliRunner().invoke(app, args)
    assert seen["cfg"].model == "runs:/abc/lora"
