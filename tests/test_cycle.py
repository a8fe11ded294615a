"""`know3d run`: one retraining cycle (incremental build -> back-view LoRA -> held-out evaluation ->
registry with the champion rule), skipping, locking, failures, and the registry itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from know3d.core.registry import DECISION_TAG, REASON_TAG, ModelRegistry, decide
from know3d.pipeline.cycle import STEPS, CycleLocked, cycle_lock

ROOT = Path(__file__).resolve().parents[1]
KNOW3D = str(Path(sys.executable).with_name("know3d"))


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "higher", "promote", "says"),
    [
        (20.0, None, 0.5, True, True, "first model"),
        (20.6, 20.0, 0.5, True, True, "better"),
        (20.5, 20.0, 0.5, True, False, "not better by the margin"),  # equal to the margin is not enough
        (19.0, 20.0, 0.0, True, False, "not better"),
        (0.1, 0.2, 0.05, False, True, "better"),  # lower is better (e.g. Chamfer distance)
        (float("nan"), 20.0, 0.0, True, False, "not a number"),
        (None, 20.0, 0.0, True, False, "missing"),
    ],
)
def test_the_champion_rule(candidate, champion, margin, higher, promote, says):
    decision = decide("psnr", candidate, champion, margin, higher)
    assert decision.promote is promote and says in decision.reason


def _logged_run(uri: str, tmp: Path, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run = client.create_run(exp.experiment_id)
    lora = tmp / name / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(name.encode())
    client.log_artifacts(run.info.run_id, str(lora), "lora")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_registry_registers_promotes_refuses_and_records_why(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = ModelRegistry(uri)
    assert registry.champion("m") is None and registry.find("m", "fp1") is None

    v1 = registry.register("m", _logged_run(uri, tmp_path, "a"), "lora", {"know3d.fingerprint": "fp1"}, {"psnr": 20.0})
    assert registry.decide_and_promote(v1, "psnr", margin=0.5).promote
    v2 = registry.register("m", _logged_run(uri, tmp_path, "b"), "lora", {"know3d.fingerprint": "fp2"}, {"psnr": 20.3})
    refused = registry.decide_and_promote(v2, "psnr", margin=0.5)
    assert not refused.promote and registry.champion("m").version == v1.version == "1"
    v3 = registry.register("m", _logged_run(uri, tmp_path, "c"), "lora", {"know3d.fingerprint": "fp3"}, {"psnr": 21.0})
    assert registry.decide_and_promote(v3, "psnr", margin=0.5).promote

    versions = {v.version: v for v in registry.versions("m")}
    assert registry.champion("m").version == "3"
    assert versions["2"].tags[DECISION_TAG] == "refused" and "20.3 vs champion 20" in versions["2"].tags[REASON_TAG]
    assert versions["1"].tags[DECISION_TAG] == versions["3"].tags[DECISION_TAG] == "promoted"
    assert versions["3"].metric("psnr") == 21.0 and registry.find("m", "fp2").version == "2"
    files = Path(registry.download(versions["3"], str(tmp_path / "dl")))
    assert (files / "pytorch_lora_weights.safetensors").read_bytes() == b"c"


def test_a_second_cycle_on_the_same_state_is_refused(tmp_path: Path):
    with cycle_lock(tmp_path):
        with pytest.raises(CycleLocked, match=f"another cycle is running on {tmp_path} \\(pid {os.getpid()}"):
            with cycle_lock(tmp_path):
                pass
    with cycle_lock(tmp_path):  # released: the next cycle runs
        pass


def _write_cycle(tmp: Path, **overrides) -> Path:
    cfg = {
        "state": str(tmp / "state"),
        "data": {
            "config": str(ROOT / "configs" / "quickstart.yaml"),
            "output": str(tmp / "data"),
            "set": [
                "source.kind=procedural",
                "source.procedural.num_assets=6",
                "render.resolution=64",
                "shard.val_fraction=0.4",
                "shard.max_samples=16",
                "ray.num_cpus=2",
            ],
        },
        "backview": {
            "config": str(ROOT / "configs" / "backview_debug.yaml"),
            "start": "warm",
            "set": [
                "data.image_size=32",
                "data.shuffle_buffer=4",
                "schedule.max_steps=2",
                "schedule.log_every=1",
                "schedule.checkpoint_every=2",
                "schedule.validate_every=0",
                "ray.num_workers=1",
                # the LoRA trains in the cycle's process (ray.launcher=local: no Ray Train start, same
                # losses, tests/test_feedback.py); the generator below trains on Ray Train
                "ray.launcher=local",
                "lora.rank=4",
            ],
        },
        "evaluation": {"heldout": 2, "steps": 2, "cfg_scale": 1.0},
        "generator": {
            "enabled": True,
            "data": {
                "config": str(ROOT / "configs" / "quickstart.yaml"),
                "output": str(tmp / "geo"),
                "set": [
                    "source.kind=procedural",
                    "source.procedural.num_assets=6",
                    "render.profile=geometry",
                    "render.resolution=32",
                    "shard.val_fraction=0.4",
                    "ray.num_cpus=2",
                ],
            },
            "config": str(ROOT / "configs" / "generator_ss_debug.yaml"),
            "set": [
                "model.base=debug",
                "model.dino_resolution=32",
                "data.hidden.model=debug:tiny-qwen-image-edit",
                "data.hidden.image_size=32",
                "data.hidden.layers=[0,1]",
                "data.hidden.steps=2",
                "data.hidden.compute_dtype=float32",
                "data.hidden.variants=[hidden]",
                "data.hidden.dino_resolution=32",
                f"data.hidden.cache_dir={tmp / 'hidden'}",
                "schedule.max_steps=2",
                "schedule.log_every=1",
                "schedule.checkpoint_every=2",
                "schedule.validate_every=0",
            ],
            "heldout": 1,
            "split": "val",
        },
        "registry": {"backview": "test-backview", "generator": "test-generator"},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "ray": {"num_cpus": 2},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    if not cfg["generator"]["enabled"]:
        cfg["generator"] = {"enabled": False}
    path = tmp / f"cycle-{len(list(tmp.glob('cycle-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    return subprocess.run(
        [KNOW3D, "run", str(config), *args], capture_output=True, text=True, timeout=900, env=env, cwd=config.parent
    )


def test_cli_refuses_a_cycle_while_another_holds_the_lock(tmp_path: Path):
    config = _write_cycle(tmp_path)
    with cycle_lock(tmp_path / "state"):
        res = _run(config)
    assert res.returncode == 3, res.stderr
    assert "refused:" in res.stderr and "another cycle is running" in res.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def _records(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state / "cycles").glob("*.json"))]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_cycles_skip_what_is_unchanged_retrain_on_new_assets_and_apply_the_rule(tmp_path: Path):
    """Cycle 1 builds, trains, evaluates and registers v1 (champion). The same cycle again does
    nothing. Two new procedural assets: only those render, the LoRA retrains (warm from v1), is
    evaluated on the same held-out pairs and registered as v2, refused by a margin no model can
    beat; the champion stays v1 and v2 records why. A failing step changes nothing and is named."""
    state = tmp_path / "state"
    first = _run(_write_cycle(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (rec1,) = _records(state)
    assert rec1["status"] == "FINISHED" and [s["status"] for s in rec1["steps"]] == ["done"] * 8
    assert [s["name"] for s in rec1["steps"]] == list(STEPS[:3]) + ["geometry", "generator", "evaluate_generator"] + [
        "register",
        "register_generator",
    ]
    data1 = rec1["steps"][0]["outputs"]
    assert data1["rendered_now"] == 6
    heldout = json.loads((state / "heldout.json").read_text())["keys"]
    assert len(heldout) == 2
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (v1,) = registry.versions("test-backview")
    assert registry.champion("test-backview").version == "1" and v1.tags[DECISION_TAG] == "promoted"
    assert v1.tags["know3d.data.digest"] == data1["digest"] and v1.tags["mlflow.source.git.commit"]
    assert v1.metric("psnr") == pytest.approx(rec1["steps"][2]["outputs"]["metrics"]["psnr"])
    assert v1.source.endswith("/lora") and v1.run_id == rec1["steps"][1]["outputs"]["mlflow_run_id"]
    (g1,) = registry.versions("test-generator")
    assert registry.champion("test-generator").version == "1" and g1.source.endswith("/generator")
    gen_eval = rec1["steps"][5]["outputs"]["metrics"]
    assert (
        gen_eval["meshes"] == 1.0
        and 0.0 <= gen_eval["iou"] <= 1.0
        and g1.metric("iou") == pytest.approx(gen_eval["iou"])
    )
    assert g1.tags["know3d.backview.fingerprint"] == rec1["steps"][1]["fingerprint"]

    again = _run(_write_cycle(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing new" in again.stdout and again.stdout.count("skipped (inputs unchanged)") == 8
    assert [s["status"] for s in _records(state)[-1]["steps"]] == ["skipped"] * 8
    assert len(registry.versions("test-backview")) == 1

    grown_cfg = yaml.safe_load(_write_cycle(tmp_path).read_text().replace("num_assets=6", "num_assets=8"))
    # both builds grow; cycle 1 trained the generator on Ray Train, cycle 2 trains it in the cycle's process (either
    # launcher serves a cycle; the launcher is not part of the training's fingerprint)
    grown_cfg["generator"]["set"].append("ray.launcher=local")
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(grown_cfg))
    second = _run(grown, "--set", "evaluation.margin=1000")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rec2 = _records(state)[-1]
    assert [s["status"] for s in rec2["steps"]] == ["done"] * 8
    data2, model2 = rec2["steps"][0]["outputs"], rec2["steps"][1]["outputs"]
    assert data2["rendered_now"] == 2 and data2["digest"] != data1["digest"]
    assert model2["warm_start"].endswith("champion/v1")
    assert json.loads((state / "heldout.json").read_text())["keys"] == heldout
    versions = registry.versions("test-backview")
    assert [v.version for v in versions] == ["1", "2"] and registry.champion("test-backview").version == "1"
    assert versions[1].tags[DECISION_TAG] == "refused" and "margin 1000" in versions[1].tags[REASON_TAG]
    assert "refused as champion" in second.stdout
    assert rec2["steps"][3]["outputs"]["rendered_now"] == 2  # the geometry build, too
    assert [v.version for v in registry.versions("test-generator")] == ["1", "2"]
    gen1, gen2 = (Path(r["steps"][4]["outputs"]["output_path"]) for r in (rec1, rec2))
    assert (gen1 / "ray").is_dir() and not (gen1 / "checkpoints").exists()  # Ray Train's storage
    assert (gen2 / "checkpoints").is_dir() and not (gen2 / "ray").exists()  # the local launcher's

    broken = _run(grown, "--set", 'backview.set=["data.max_pairs=0"]')  # an invalid training config
    assert broken.returncode == 1
    assert "cycle failed at step 'backview'" in broken.stderr and "champion is unchanged" in broken.stderr
    assert _records(state)[-1]["failed_step"] == "backview"
    assert registry.champion("test-backview").version == "1" and len(registry.versions("test-backview")) == 2
