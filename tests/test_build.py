"""End to end: `know3d data build` over the real and bad assets on a local Ray."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from know3d.pipeline.build import run_build
from know3d.pipeline.config import load_config
from tests.conftest import ACCEPTED_FROM_BAD, REAL_ASSETS, REFUSED_BAD
from tests.test_assets import EXPECTED_BAD

pytestmark = pytest.mark.slow
RES = 48


def _cfg(inputs: list[Path], out: Path, *extra: str):
    cfg = load_config(
        None,
        [
            f"output={out}",
            "source.kind=local",
            f"render.resolution={RES}",
            "shard.max_samples=25",
            "shard.val_fraction=0.2",
            f"mlflow.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}",
            "ray.render_concurrency=2",
            *extra,
        ],
    )
    cfg.source.local.input = [str(p) for p in inputs]
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_dir: Path, bad_dir: Path, ray_local):
    root = tmp_path_factory.mktemp("build")
    assets = root / "assets"
    shutil.copytree(real_dir, assets / "real")
    shutil.copytree(bad_dir, assets / "bad")
    for f in assets.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    shutil.copy(real_dir / "Duck.glb", assets / "real" / "Duck_copy.glb")  # a duplicate
    # a glTF whose image lives outside its folder must be refused
    from tests.test_assets import _gltf_with_image_uri

    Image.new("RGB", (4, 4)).save(assets / "secret.png")
    _gltf_with_image_uri(assets / "bad" / "escape", "../../secret.png")
    out = root / "out"
    cfg = _cfg([assets / "real", assets / "bad"], out)
    first = run_build(cfg)
    second = run_build(cfg)
    return {"root": root, "out": out, "cfg": cfg, "first": first, "second": second}


def test_manifest_has_one_failed_row_per_bad_file(built):
    rows = pq.read_table(built["out"] / "manifest.parquet").to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    by_file = {r["key"].split("/", 1)[1]: r for r in failed}
    assert sorted(by_file) == sorted([*REFUSED_BAD, "escape/model.gltf"])
    assert len(failed) == len(by_file)  # exactly one failed row per bad file
    for name, row in by_file.items():
        if name in EXPECTED_BAD:
            assert EXPECTED_BAD[name] in row["reason"] and row["reason"].startswith(name)
    assert "outside the asset's folder" in by_file["escape/model.gltf"]["reason"]
    rendered = [r for r in rows if r["stage"] == "render" and r["status"] == "ok"]
    assert len(rendered) == len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD)  # relative OBJ indices are valid
    dupes = [r for r in rows if r["filter"] == "duplicate"]
    assert len(dupes) == 1 and dupes[0]["key"].endswith("Duck_copy.glb")
    assert "local:real/Duck.glb" in dupes[0]["reason"]
    shard_rows = [r for r in rows if r["stage"] == "shard"]
    assert sum(r["num_samples"] for r in shard_rows) == 6 * (len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD))
    assert {r["split"] for r in shard_rows} <= {"train", "val"}


def test_shards_read_back_with_webdataset_and_ray_data(built, ray_local):
    out = built["out"]
    index = json.loads((out / "shard_index.json").read_text())
    assert index["num_samples"] == 6 * (len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD))
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(e["name"] for e in index["shards"])
    assert all(e["num_samples"] <= 25 for e in index["shards"])
    urls = [str(out / e["name"]) for e in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == index["num_samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    for s in samples:
        assert s["json"]["split"] in s["__url__"].split("/")[-1]
        assert Image.open(io.BytesIO(s["front.png"])).size == (RES, RES)

    ds = ray_local.data.read_webdataset(urls, decoder=None)
    assert ds.count() == index["num_samples"]
    row = ds.take(1)[0]
    assert {"front.png", "back.png", "json"} <= set(row)


def test_val_split_holds_whole_assets(built):
    out = built["out"]
    index = json.loads((out / "shard_index.json").read_text())
    splits: dict[str, set] = {}
    for e in index["shards"]:
        for s in wds.WebDataset(str(out / e["name"]), shardshuffle=False).decode():
            splits.setdefault(s["json"]["asset_id"], set()).add(e["split"])
    assert all(len(v) == 1 for v in splits.values())


def test_second_run_skips_everything(built):
    first, second = built["first"], built["second"]
    assert first.metrics["num_shards_rewritten"] == first.num_shards > 0
    assert second.metrics["num_shards_rewritten"] == 0
    assert "render_views_per_s" in first.metrics and "render_views_per_s" not in second.metrics
    assert second.num_samples == first.num_samples
    assert second.counts == first.counts


def test_mlflow_run_has_config_counts_and_artifacts(built):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{built['root'] / 'mlflow.db'}")
    run = client.get_run(built["first"].mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["render.resolution"] == str(RES)
    assert run.data.metrics["num_samples"] == 6 * (len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD))
    assert run.data.metrics["render.ok"] == len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD)
    assert run.data.metrics["render_views_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "manifest.parquet", "contact_sheet.png", "shard_index.json", "summary.json"} <= artifacts
    sheet = Image.open(built["out"] / "contact_sheet.png")
    assert sheet.size[0] > 2 * 192 and np.asarray(sheet).std() > 10


def test_new_settings_render_again(built, ray_local):
    cfg = built["cfg"].model_copy(deep=True)
    cfg.render.resolution = 32
    cfg.source.local.input = [str(built["root"] / "assets" / "real" / "Duck.glb")]
    summary = run_build(cfg)
    assert summary.num_samples == 6
    assert len(list((built["out"] / "work").iterdir())) == 2  # one work folder per render setting
    assert len(list(built["out"].glob("*.tar"))) == summary.num_shards  # stale shards removed


def test_cli_strict_and_status(tmp_path: Path, real_dir: Path, bad_dir: Path):
    cmd = [
        sys.executable,
        "-m",
        "know3d.pipeline.cli",
        "data",
        "build",
        "--source",
        "local",
        "--input",
        str(real_dir / "Duck.glb"),
        "--input",
        str(bad_dir / "zero_bytes.glb"),
        "--output",
        str(tmp_path / "out"),
        "--set",
        "render.resolution=32",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        "--set",
        "ray.num_cpus=2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "6 samples in 1 shards" in res.stdout and "1 failed" in res.stdout
    res = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    status = subprocess.run(
        [sys.executable, "-m", "know3d.pipeline.cli", "data", "status", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0
    assert "zero_bytes.glb: empty file" in status.stdout
    assert "shards: 1 (" in status.stdout and ": 6 samples / 1 shards" in status.stdout
    bad = subprocess.run([*cmd[:-2], "--set", "render.resolutio=3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Did you mean 'render.resolution'" in bad.stderr


def test_geometry_profile_has_clean_and_perturbed_pairs(tmp_path: Path, real_dir: Path, ray_local):
    cfg = _cfg(
        [real_dir / "Duck.glb"],
        tmp_path / "out",
        "render.profile=geometry",
        "render.resolution=32",
        "mlflow.enabled=false",
        "shard.val_fraction=0",
    )
    summary = run_build(cfg)
    assert summary.num_samples == 8
    samples = list(wds.WebDataset([str(p) for p in (tmp_path / "out").glob("*.tar")], shardshuffle=False).decode())
    metas = sorted((s["json"] for s in samples), key=lambda m: m["pair_index"])
    assert [m["pair_index"] for m in metas] == list(range(8))
    assert [m["perturbed"] for m in metas] == [False] * 4 + [True] * 4
    assert all(m["profile"] == "geometry" for m in metas)
    for m in metas[:4]:
        assert m["back_camera"]["azimuth_deg"] - m["front_camera"]["azimuth_deg"] == 180
        assert m["front_camera"]["azimuth_deg"] == 45 * m["pair_index"]


def test_annotations_land_in_shards_and_second_run_is_free(built):
    first, second = built["first"], built["second"]
    pairs = 6 * (len(REAL_ASSETS) + len(ACCEPTED_FROM_BAD))
    assert first.metrics["annotate.pairs"] == pairs and first.metrics["annotate.cached"] == 0
    assert second.metrics["annotate.cached"] == pairs  # same settings: nothing annotated again
    urls = sorted(str(p) for p in built["out"].glob("*.tar"))
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        ann = s["json"]["annotation"]
        assert ann["backend"] == "parts" and ann["status"] in ("ok", "no_parts")
        assert isinstance(s["json"]["components"], list)


def test_review_cli_writes_a_gallery(built, tmp_path: Path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "know3d.pipeline.cli",
            "data",
            "review",
            "--output",
            str(built["out"]),
            "--num",
            "5",
            "--html",
            str(tmp_path / "r.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "5 pairs" in res.stdout
    assert (tmp_path / "r.html").read_text().count('<div class="card">') == 5


def test_transformers_backend_runs_on_ray_actors(tmp_path: Path, real_dir: Path, ray_local):
    pytest.importorskip("transformers")
    from tests.tiny_qwen_vl import build_tiny_qwen_vl

    model = build_tiny_qwen_vl(tmp_path / "tiny-vl")
    cfg = _cfg(
        [real_dir / "Duck.glb"],
        tmp_path / "out",
        "render.resolution=32",
        "mlflow.enabled=false",
        "annotate.backend=transformers",
        f"annotate.transformers.model={model}",
        "annotate.transformers.max_new_tokens=8",
        "annotate.max_retries=0",
        "annotate.transformers.batch_size=2",
        "annotate.transformers.num_actors=2",
    )
    summary = run_build(cfg)
    assert summary.num_samples == 6
    assert summary.metrics["annotate.pairs"] == 6
    assert (
        summary.metrics["annotate.failed"] + summary.metrics["annotate.ok"] + summary.metrics["annotate.repaired"] == 6
    )
    samples = list(wds.WebDataset([str(p) for p in (tmp_path / "out").glob("*.tar")], shardshuffle=False).decode())
    for s in samples:
        ann = s["json"]["annotation"]
        assert ann["backend"] == "transformers" and ann["model"] == str(model)
        if ann["status"] == "annotation_failed":
            assert s["json"]["components"] == [] and ann["raw"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--source", "local", "--input", "/nonexistent/assets"],
            "input '/nonexistent/assets' matches no file or folder",
        ),
        (["--source", "local"], "needs at least one input"),
        (["--source", "sideways"], "source.kind"),
    ],
)
def test_cli_build_errors_are_short_and_clear(tmp_path: Path, args: list[str], message: str):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "know3d.pipeline.cli",
            "data",
            "build",
            *args,
            "--output",
            str(tmp_path / "new" / "o"),
            "--set",
            "mlflow.enabled=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) <= 3
    assert not (tmp_path / "new").exists()  # a build that never started leaves no folders behind
