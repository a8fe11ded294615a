"""Issue 10 end to end on Ray: good assets mixed with malformed, hostile and odd ones; reproducible
shards; annotation re-runs that change nothing; a dying ingest worker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh

from know3d.core.manifest import safe_text
from know3d.pipeline.build import run_build
from know3d.pipeline.config import load_config
from tests.hostile import (
    MUTATIONS,
    CrashingSource,
    coincident_boxes,
    good_assets,
    malformed_assets,
    one_sided_quad,
    write_good,
)
from tests.test_hostile_inputs import SECRET, _multi_primitive_gltf

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _cfg(inputs: list[Path], out: Path, *extra: str):
    cfg = load_config(
        None,
        [
            f"output={out}",
            "source.kind=local",
            "render.resolution=48",
            "shard.max_samples=40",
            f"mlflow.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}",
            *extra,
        ],
    )
    cfg.source.local.input = [str(p) for p in inputs]
    return cfg


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, ray_local):
    """N good assets, every mutation (and random repeats), the reported ``"buffers": 5`` glTF
    beside a good GLB, a point cloud, unsupported files, a one-sided quad and a main file that
    links to a secret outside the input — one folder, one build."""
    root = tmp_path_factory.mktemp("mixed")
    inputs = root / "in"
    good = good_assets(inputs, 8)
    # file names are bytes: one that is not UTF-8, one with a line break
    good.append(write_good(inputs, 60, "glb").rename(inputs / "good_60_glb" / "not-utf8-\udcff.glb"))
    good.append(write_good(inputs, 61, "obj").rename(inputs / "good_61_obj" / "line\nbreak.obj"))
    bad = malformed_assets(inputs, len(MUTATIONS) + 8, seed=10)
    pair = inputs / "reported"
    write_good(pair, 50, "glb").rename(pair / "Duck.glb")
    wrong = write_good(pair, 51, "gltf")
    doc = json.loads(wrong.read_text())
    doc["buffers"] = 5
    wrong.write_text(json.dumps(doc))
    bad.append((wrong, None))
    (inputs / "cloud").mkdir()
    trimesh.PointCloud(np.random.default_rng(0).random((64, 3))).export(inputs / "cloud" / "cloud.ply")
    (inputs / "scene.dae").write_text("<COLLADA/>")
    (inputs / "pack.zip").write_bytes(b"PK\x03\x04")
    quad = one_sided_quad(inputs / "quad")
    (root / "secret.obj").write_text(f"v {SECRET} 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (inputs / "link.obj").symlink_to(root / "secret.obj")
    out = root / "out"
    summary = run_build(_cfg([inputs], out, "ray.fetch_concurrency=2"))
    return {
        "root": root,
        "inputs": inputs,
        "out": out,
        "good": good + [pair / "Duck.glb"],
        "bad": bad,
        "quad": quad,
        "summary": summary,
    }


def _key(inputs: Path, path: Path) -> str:
    return safe_text(f"local:{inputs.name}/{path.relative_to(inputs).as_posix()}")


def test_every_good_asset_completes_beside_malformed_ones(mixed):
    rows = _rows(mixed["out"])
    for path in mixed["good"]:
        mine = [r for r in rows if r["key"] == _key(mixed["inputs"], path)]
        assert [r["stage"] for r in mine] == ["discover", "ingest", "render", "shard"], path
        assert all(r["status"] == "ok" for r in mine), mine
        assert mine[-1]["num_samples"] == 6


def test_each_malformed_file_has_exactly_one_row_with_a_plain_reason(mixed):
    rows = _rows(mixed["out"])
    for path, mutation in mixed["bad"]:
        mine = [r for r in rows if r["key"] == _key(mixed["inputs"], path)]
        problems = [r for r in mine if r["status"] != "ok"]
        assert len(problems) == 1, (mutation and mutation.name, mine)
        reason = problems[0]["reason"]
        assert reason.startswith(f"{path.name}: ") and "\n" not in reason and "\x1b" not in reason, reason
        assert "ingest task error" not in reason and "Traceback" not in reason
    reported = [r for r in rows if r["key"].endswith("reported/good_51_gltf/model.gltf") and r["status"] == "failed"]
    assert reported[0]["reason"] == "model.gltf: glTF 'buffers' is a number, expected an array"


def test_odd_inputs_are_explicit_rows(mixed):
    rows = _rows(mixed["out"])
    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"].split("/", 1)[1], []).append(r)
    assert [(r["stage"], r["status"], r["filter"]) for r in by_key["scene.dae"]] == [
        ("discover", "filtered", "unsupported_format")
    ]
    assert by_key["pack.zip"][0]["filter"] == "unsupported_format"
    cloud = [r for r in by_key["cloud/cloud.ply"] if r["status"] != "ok"]
    assert [(r["stage"], r["status"], r["filter"]) for r in cloud] == [("render", "filtered", "no_triangles")]
    assert "good_60_glb/not-utf8-\\xff.glb" in by_key  # escaped, so the manifest can be written
    link = [r for r in by_key["link.obj"] if r["status"] != "ok"]
    assert link[0]["reason"] == "link.obj: symlink to a file outside the input folder (refused)"


def test_blank_views_are_filtered_pairs_counted_in_the_summary(mixed):
    rows = _rows(mixed["out"])
    quad = [r for r in rows if r["key"] == _key(mixed["inputs"], mixed["quad"])]
    pairs = [r for r in quad if r["stage"] == "pairs"]
    assert pairs and all(r["status"] == "filtered" and r["filter"] == "min_view_coverage" for r in pairs)
    assert all(r["reason"].startswith("model.gltf: pair ") and "of the image < 0.20%" in r["reason"] for r in pairs)
    kept = 6 - len(pairs)
    shard = [r for r in quad if r["stage"] == "shard"][0]
    assert shard["num_samples"] == kept
    summary = mixed["summary"]
    assert summary.metrics["num_pairs_filtered_coverage"] == len(pairs)
    assert summary.counts["filters"]["pairs/min_view_coverage"] == len(pairs)
    run_summary = json.loads(next((mixed["out"] / "runs").glob("*/summary.json")).read_text())
    assert run_summary["metrics"]["num_pairs_filtered_coverage"] == len(pairs)


def test_no_secret_reaches_the_manifest_or_mlflow(mixed):
    leaked = [
        p
        for p in mixed["root"].rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != "secret.obj" and SECRET.encode() in p.read_bytes()
    ]
    assert leaked == []
    assert (mixed["root"] / "mlartifacts").is_dir()  # the MLflow artifacts were searched too


def test_a_dying_ingest_worker_costs_only_its_own_asset(tmp_path: Path, ray_local, monkeypatch):
    import ray

    import know3d.pipeline.build as build
    import tests.hostile

    ray.cloudpickle.register_pickle_by_value(tests.hostile)
    inputs = tmp_path / "in"
    good = good_assets(inputs, 5)
    from know3d.rendering.sources.local import LocalSource

    def discover(cfg, out):
        source = CrashingSource(LocalSource(cfg.source.local), "crash.obj")
        records, filtered = source.discover()
        return source, records, filtered

    crash = write_good(inputs, 9, "obj").rename(inputs / "good_09_obj" / "crash.obj")
    monkeypatch.setattr(build, "_discover", discover)
    summary = run_build(_cfg([inputs], tmp_path / "out", "mlflow.enabled=false"))
    rows = _rows(tmp_path / "out")
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["key"] for r in failed] == [_key(inputs, crash)]
    assert failed[0]["reason"].startswith("crash.obj: ingest worker died (")
    assert summary.num_samples == 6 * len(good)


def test_symmetric_asset_rerun_changes_nothing(tmp_path: Path, ray_local):
    # a 12-sided prism about +Y looks exactly the same from all 12 azimuths (every 30 degrees)
    prism = trimesh.creation.cylinder(radius=0.4, height=1.0, sections=12)
    prism.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    prism.visual.vertex_colors = np.tile([200, 60, 60, 255], (len(prism.vertices), 1))
    (tmp_path / "in").mkdir()
    prism.export(tmp_path / "in" / "prism.glb")
    cfg = _cfg([tmp_path / "in"], tmp_path / "out", "mlflow.enabled=false", "render.elevation_range_deg=[0, 0]")
    first = run_build(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")}
    second = run_build(cfg)
    assert first.metrics["annotate.requests"] == 1 and first.metrics["annotate.shared"] == 5
    assert second.metrics["annotate.cached"] == 6 and second.metrics["num_shards_rewritten"] == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.tar")} == before


def test_two_fresh_builds_give_byte_identical_shards(tmp_path: Path, real_dir: Path):
    """Separate processes (set order and ``random`` differ per process), fresh outputs. Besides
    the real assets: a glTF whose part names trimesh draws at random, and coincident boxes whose
    pixels depend on the draw order alone (rendered in plain separate processes before the fix,
    they came out 3 different ways in 4 runs)."""
    inputs = tmp_path / "in"
    shutil.copytree(real_dir, inputs)
    _multi_primitive_gltf(inputs / "multi")
    coincident_boxes(inputs / "coincident")
    digests = []
    for run in ("a", "b"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "know3d.pipeline.cli",
                "data",
                "build",
                "--source",
                "local",
                "--input",
                str(inputs),
                "--output",
                str(tmp_path / run),
                "--set",
                "render.resolution=96",
                "--set",
                "mlflow.enabled=false",
                "--set",
                "ray.num_cpus=2",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        index = json.loads((tmp_path / run / "shard_index.json").read_text())
        digests.append([(s["name"], s["sha256"]) for s in index["shards"]])
    assert digests[0] == digests[1] and len(digests[0]) >= 1
    for name, _ in digests[0]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
