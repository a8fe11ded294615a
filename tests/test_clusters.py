"""Cluster launch files name configs and overrides that exist and validate."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from pipeline.config import BuildConfig, TrainBackviewConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _check_entrypoint(cmd: str) -> None:
    argv = shlex.split(cmd)
    assert argv[0] == "know3d"
    model = TrainBackviewConfig if argv[1:3] == ["train", "backview"] else BuildConfig
    assert argv[1:3] in (["train", "backview"], ["data", "build"]), argv[:3]
    config = ROOT / argv[3]
    assert config.is_file(), config
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides, model=model)
    if model is TrainBackviewConfig:
        assert cfg.lora.rank == 64 and cfg.deepspeed.zero_stage == 2


def test_rayjob_entrypoints_validate():
    files = sorted((ROOT / "clusters" / "kuberay").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        spec = yaml.safe_load(f.read_text())
        assert spec["kind"] == "RayJob"
        _check_entrypoint(spec["spec"]["entrypoint"])


def test_paper_config_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "backview_qwen_image_edit_2511.yaml", model=TrainBackviewConfig)
    assert cfg.model.name == "Qwen/Qwen-Image-Edit-2511" and cfg.lora.rank == 64
    assert cfg.ray.num_workers * cfg.schedule.micro_batch_size * cfg.schedule.grad_accum == 32  # global batch
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 == "on" and cfg.ray.use_gpu == "on"
