"""Cluster launch files name configs and overrides that exist and validate."""

from __future__ import annotations

import shlex
from pathlib import Path

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


def test_paper_config_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "backview_qwen_image_edit_2511.yaml", model=TrainBackviewConfig)
    assert cfg.model.name == "Qwen/Qwen-Image-Edit-2511" and cfg.lora.rank == 64
    assert cfg.ray.num_workers * cfg.schedule.micro_batch_size * cfg.schedule.grad_accum == 32  # global batch
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 == "on" and cfg.ray.use_gpu == "on"


def test_sbatch_scripts_parse_and_use_existing_commands():
    import subprocess

    for f in sorted((ROOT / "clusters" / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(f)], check=True)
        text = f.read_text()
        config = text.split('know3d" ', 1)[1].split()[2]  # <command> <sub> <config>
        assert (ROOT / config).is_file() or config.startswith('"$'), (f.name, config)
