"""The house rules, checked: import direction, one namespace, every package shipped."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("rendering", "annotation", "training", "evaluation")
FOLDERS = ("core", *STAGES, "pipeline")
GENERIC = {*FOLDERS}  # bare top-level names that must never be imported


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import; relative ones resolved against the file's package
    (``from ..pipeline import cli`` in ``training/x.py`` is ``know3d.pipeline``), and ``from . import
    name`` counted as ``<package>.name``."""
    parts = path.relative_to(root).parent.parts
    package = [("know3d." if parts and parts[0] in FOLDERS else "") + ".".join(parts)] if parts else []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[0].split(".")[: len(package[0].split(".")) - node.level + 1]) if package else ""
            if node.module:
                found.append((node.lineno, f"{base}.{node.module}"))
            else:
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def test_relative_imports_are_resolved(tmp_path: Path):
    """The rules below must see ``from ..pipeline import cli`` as an import of know3d.pipeline."""
    module = tmp_path / "training" / "generator" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ...pipeline import cli\nfrom .. import engine\nfrom .train import run_worker\n")
    assert _imports(module, tmp_path) == [
        (1, "know3d.pipeline"),
        (2, "know3d.training.engine"),
        (3, "know3d.training.generator.train"),
    ]


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", STAGES)
def test_no_stage_package_imports_pipeline(folder: str):
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules(folder)
        for line, module in _imports(path)
        if module == "know3d.pipeline" or module.startswith("know3d.pipeline.")
    ]
    assert not offenders, "\n".join(offenders)


def test_core_imports_nothing_else_from_know3d():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules("core")
        for line, module in _imports(path)
        if module.startswith("know3d.") and not module.startswith("know3d.core")
    ]
    assert not offenders, "\n".join(offenders)


def test_nothing_imports_the_folders_by_their_generic_names():
    files = [p for f in (*FOLDERS, "tests", "benchmarks", "scripts") for p in _modules(f)]
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in _imports(path)
        if module.split(".")[0] in GENERIC
    ]
    assert not offenders, "\n".join(offenders)


def test_every_package_folder_is_listed_and_mapped_into_the_know3d_namespace():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setup["package-dir"]
    assert set(mapping) == {f"know3d.{f}" for f in FOLDERS}
    on_disk = {
        "know3d." + ".".join(init.parent.relative_to(ROOT).parts)
        for f in FOLDERS
        for init in (ROOT / f).rglob("__init__.py")
    }
    assert set(setup["packages"]) == on_disk
    assert all(p.startswith("know3d.") for p in setup["packages"])


@pytest.mark.slow
def test_the_installed_wheel_has_one_top_level_name(tmp_path: Path):
    """`pip install` puts only `know3d` (and its dist-info) into site-packages, and the CLI
    module imports from there without the source tree."""
    source = tmp_path / "src"  # a copy: setuptools writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top == {"know3d"}
    assert (target / "know3d" / "training" / "assets" / "debug-qwen-image-vae").is_dir()
    code = "import know3d.pipeline.cli as c, know3d.core.shards as s; print(c.__file__)"
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().startswith(str(target))
