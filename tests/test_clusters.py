"""Cluster launch files name configs and overrides that exist and validate."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from know3d.evaluation.config import EvalConfig
from know3d.pipeline.config import BuildConfig, load_config
from know3d.training.config import TrainBackviewConfig

ROOT = Path(__file__).resolve().parents[1]


def _check_entrypoint(cmd: str) -> None:
    argv = shlex.split(cmd)
    assert argv[0] == "know3d"
    models = {
        ("train", "backview"): TrainBackviewConfig,
        ("data", "build"): BuildConfig,
        ("eval", "shapes"): EvalConfig,
    }
    assert tuple(argv[1:3]) in models, argv[:3]
    model = models[tuple(argv[1:3])]
    config = ROOT / argv[3]
    assert config.is_file(), config
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides, model=model)
    if model is TrainBackviewConfig:
        assert cfg.lora.rank == 64 and cfg.deepspeed.zero_stage == 2
    if model is EvalConfig:  # the protocol's numbers, and every scorer checkpoint given
        assert (cfg.points.surface_samples, cfg.points.fps_points, cfg.points.fps_h) == (300_000, 8192, 5)
        assert {"--pred", "--images", "--gt", "--output", "--ulip-ckpt", "--uni3d-ckpt", "--clip-ckpt"} <= set(argv)


def test_rayjob_entrypoints_validate():
    files = sorted((ROOT / "clusters" / "kuberay").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        spec = yaml.safe_load(f.read_text())
        assert spec["kind"] == "RayJob"
        _check_entrypoint(spec["spec"]["entrypoint"])


@pytest.mark.parametrize(
    ("name", "workers"), [("backview_qwen_image_edit_2511.yaml", 32), ("backview_qwen_image_edit_2511_8gpu.yaml", 8)]
)
def test_paper_config_matches_the_paper(name: str, workers: int):
    cfg = load_config(ROOT / "configs" / name, model=TrainBackviewConfig)
    assert cfg.model.name == "Qwen/Qwen-Image-Edit-2511" and cfg.lora.rank == 64
    assert cfg.ray.num_workers == workers
    assert cfg.ray.num_workers * cfg.schedule.micro_batch_size * cfg.schedule.grad_accum == 32  # global batch
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 == "on" and cfg.ray.use_gpu == "on"


def test_sbatch_scripts_parse_and_use_existing_commands():
    import subprocess

    for f in sorted((ROOT / "clusters" / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(f)], check=True)
        text = f.read_text()
        config = text.split('know3d" ', 1)[1].split()[2]  # <command> <sub> <config>
        assert (ROOT / config).is_file() or config.startswith('"$'), (f.name, config)


def test_the_image_is_built_by_the_install_ci_runs():
    """One install for CI and the cluster image: the Dockerfile runs scripts/install.sh (which
    scripts/setup.sh runs too) and installs scripts/apt-packages.txt (setup.sh's list too); every
    KubeRay manifest runs that image; the GPU render group has EGL's graphics capability."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/install.sh" in dockerfile and "bash scripts/install.sh .venv/bin/python" in setup
    assert "scripts/apt-packages.txt" in dockerfile and "scripts/apt-packages.txt" in setup
    assert "pip install" not in setup.replace("install.sh", "")  # no second, diverging pip install
    lines = (ROOT / "scripts" / "apt-packages.txt").read_text().splitlines()
    packages = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {"libegl1", "libegl-mesa0", "libosmesa6", "libglvnd0"} <= set(packages)
    assert not any("x11" in p.lower() or p.startswith("libx") for p in packages)
    images = set()
    for f in (ROOT / "clusters" / "kuberay").glob("*.yaml"):
        images |= {line.split("image:")[1].strip() for line in f.read_text().splitlines() if "image:" in line}
    assert images == {"ghcr.io/your-org/know3d:latest"} and "know3d:latest" in dockerfile
    spec = yaml.safe_load((ROOT / "clusters" / "kuberay" / "data-build-rayjob.yaml").read_text())
    gpu = next(g for g in spec["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-render")
    container = gpu["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "graphics" in env["NVIDIA_DRIVER_CAPABILITIES"] and env["__EGL_VENDOR_LIBRARY_FILENAMES"].endswith(".json")
    assert container["resources"]["limits"]["nvidia.com/gpu"]
