"""`know3d eval shapes|backviews` end to end on Ray (tiny ULIP/Uni3D checkpoints, real assets)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from know3d.evaluation.demo import make_demo_set
from know3d.pipeline.cli import main
from tests.test_eval_models import write_tiny_checkpoints
from tests.test_reports import Page, assert_self_contained

pytestmark = pytest.mark.slow

ASSETS = ["Duck.glb", "fandisk.obj", "monkey.glb", "pins.glb", "quadknot.obj", "simple_pole.glb"]


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, real_dir: Path, bad_dir: Path, ray_local):
    root = tmp_path_factory.mktemp("eval")
    kinds = make_demo_set([real_dir / a for a in ASSETS], root / "set", seed=0, resolution=96)
    # bad predictions, each with a condition image: non-manifold, NaN vertex, empty, unreadable
    for uid, src in (
        ("bunny_nonmanifold", real_dir / "bunny.ply"),
        ("empty_obj", bad_dir / "empty.obj"),
        ("truncated", bad_dir / "truncated_duck.glb"),
    ):
        (root / "set" / "pred" / uid).mkdir(parents=True)
        shutil.copy(src, root / "set" / "pred" / uid / f"000{src.suffix}")
        (root / "set" / "image" / uid).mkdir(parents=True)
        shutil.copy(root / "set" / "image" / "Duck" / "000.png", root / "set" / "image" / uid / "000.png")
    # a good mesh whose condition image is corrupt: geometry is kept, the scores are missing
    for sub in ("pred", "gt"):
        shutil.copytree(root / "set" / sub / "fandisk", root / "set" / sub / "bad_image")
    (root / "set" / "image" / "bad_image").mkdir()
    (root / "set" / "image" / "bad_image" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "set" / "pred" / "nan_vertex").mkdir()
    (root / "set" / "pred" / "nan_vertex" / "000.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 nan 0\nf 1 2 3\n")
    ckpt = write_tiny_checkpoints(root)
    out = root / "out"
    code = run_cli(
        [
            "eval",
            "shapes",
            "--pred",
            str(root / "set" / "pred"),
            "--images",
            str(root / "set" / "image"),
            "--gt",
            str(root / "set" / "gt"),
            "--output",
            str(out),
            "--ulip-ckpt",
            str(ckpt["ulip"]),
            "--uni3d-ckpt",
            str(ckpt["uni3d"]),
            "--clip-ckpt",
            str(ckpt["clip"]),
            "--set",
            "semantic.arch=tiny",
            "--set",
            "semantic.device=cpu",
            "--set",
            "points.surface_samples=20000",
            "--set",
            "points.fps_points=1024",
            "--set",
            "geometry.samples=30000",
            "--set",
            "report.resolution=96",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        ]
    )
    return {"root": root, "out": out, "kinds": kinds, "code": code, "ckpt": ckpt}


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}


def test_every_uid_gets_a_result_and_bad_meshes_become_error_entries(evaluated):
    assert evaluated["code"] == 0
    res = results(evaluated["out"])
    good = [Path(a).stem for a in ASSETS] + ["bad_image"]
    assert sorted(res) == sorted(
        good + ["broken_prediction", "missing_prediction", "bunny_nonmanifold", "empty_obj", "truncated", "nan_vertex"]
    )
    assert all(res[u]["status"] == "ok" for u in good)
    errors = {u: r["error"] for u, r in res.items() if r["status"] == "error"}
    assert set(errors) == {"broken_prediction", "bunny_nonmanifold", "empty_obj", "truncated", "nan_vertex"}
    assert "non-manifold" in errors["bunny_nonmanifold"] and "truncated GLB" in errors["truncated"]
    assert "no geometry" in errors["empty_obj"] and "000.obj" in errors["nan_vertex"]
    assert "non-finite" in errors["nan_vertex"]
    assert "semantic" not in res["bad_image"] and "cannot decode" in res["bad_image"]["semantic_error"]
    assert res["bad_image"]["geometry"]["chamfer_l1"] == pytest.approx(
        res["fandisk"]["geometry"]["chamfer_l1"], rel=0.2
    )
    assert res["missing_prediction"]["status"] == "missing"
    summary = json.loads((evaluated["out"] / "summary.json").read_text())
    assert (summary["total"], summary["ok"], summary["errors"], summary["missing"]) == (13, 7, 5, 1)
    assert [f["uid"] for f in summary["semantic_failures"]] == ["bad_image"]
    assert summary["unmatched"]["image_without_prediction"] == ["missing_prediction"]
    assert summary["unmatched"]["prediction_without_image"] == ["broken_prediction", "nan_vertex"]
    assert {f["uid"] for f in summary["failures"]} == set(errors) | {"missing_prediction"}


def test_metrics_follow_the_known_perturbations(evaluated):
    res, kinds = results(evaluated["out"]), evaluated["kinds"]
    by_kind: dict[str, list[dict]] = {}
    for uid, kind in kinds.items():
        if res[uid]["status"] == "ok":
            by_kind.setdefault(kind, []).append(res[uid])
    identity = by_kind["identity"][0]["geometry"]
    similar = by_kind["similarity"][0]["geometry"]
    # scale + translation are removed by the normalization: a similar copy scores like the GT itself
    assert identity["iou_surface@64"] == 1.0 and similar["iou_surface@64"] == 1.0
    assert identity["chamfer_l1"] < 0.015 and similar["chamfer_l1"] < 0.015
    for kind in ("noise", "rotate", "cut"):
        g = by_kind[kind][0]["geometry"]
        assert g["chamfer_l1"] > identity["chamfer_l1"] and g["iou_surface@64"] < 1.0, kind
    for r in res.values():
        if r["status"] == "ok" and r["uid"] != "bad_image":
            assert set(r["semantic"]) == {"ulip", "uni3d"} and all(-1 <= v <= 1 for v in r["semantic"].values())
            assert {
                "chamfer_l1",
                "chamfer_l2",
                "fscore@0.01",
                "fscore@0.02",
                "normal_consistency",
                "iou_surface@64",
                "iou_volume@64",
                "icp",
            } <= set(r["geometry"])


def test_tables_report_and_mlflow_run(evaluated):
    out = evaluated["out"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 13 and {"uid", "status", "ulip", "uni3d", "chamfer_l2", "error"} <= set(rows[0])
    ok = [r for r in rows if r["status"] == "ok"]
    summary = json.loads((out / "summary.json").read_text())
    mean = np.mean([float(r["chamfer_l2"]) for r in ok])
    assert summary["metrics"]["chamfer_l2"]["mean"] == pytest.approx(mean, rel=1e-4)
    assert summary["metrics"]["ulip"]["count"] == 6
    md = (out / "metrics.md").read_text()
    assert md.startswith("| metric | mean | std | n |") and "| chamfer_l2 |" in md
    html = (out / "report.html").read_text()
    for uid in ("Duck", "bunny_nonmanifold", "missing_prediction"):
        assert f">{uid}</h3>" in html  # its card
    assert "non-manifold" in html
    for name in ("Duck_pred_front.png", "Duck_pred_back.png", "Duck_gt_front.png"):
        img = np.asarray(Image.open(out / "renders" / name))
        assert img.shape[0] > 0 and img.std() > 5, name  # an object, not a blank image
    page = Page(html)  # self-contained: the renders are inlined, nothing is linked
    assert_self_contained(page)
    assert len(page.rows) == 13 and page.rows[0][0][1] == "Duck"  # the first card: condition + 4 renders
    assert all(np.asarray(img).std() > 5 for img in page.images()[:5])
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{evaluated['root'] / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["chamfer_l2_mean"] == pytest.approx(summary["metrics"]["chamfer_l2"]["mean"])
    assert run.data.metrics["num_errors"] == 5 and "fscore_at_0.01_mean" in run.data.metrics
    assert run.data.params["seed"] == "0" and run.data.tags["know3d.stage"] == "eval.shapes"
    assert "images.lpips" not in run.data.params and "geometry.samples" in run.data.params  # its sections only
    assert run.info.end_time - run.info.start_time >= 1000 * summary["seconds"] * 0.5  # the real duration
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.csv", "report.html", "results", "renders"} <= arts


def test_reruns_are_deterministic_and_no_semantic_needs_no_checkpoints(evaluated, tmp_path: Path):
    root = evaluated["root"]
    args = [
        "eval",
        "shapes",
        "--pred",
        str(root / "set" / "pred"),
        "--gt",
        str(root / "set" / "gt"),
        "--no-semantic",
        "--set",
        "geometry.samples=30000",
        "--set",
        "report.renders=false",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    assert run_cli([*args, "--output", str(tmp_path / "a")]) == 0
    assert run_cli([*args, "--output", str(tmp_path / "b"), "--set", "ray.concurrency=1"]) == 0
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert a["Duck"]["geometry"] == b["Duck"]["geometry"]  # seeded: same numbers at any parallelism
    assert a["Duck"]["geometry"]["chamfer_l2"] == results(evaluated["out"])["Duck"]["geometry"]["chamfer_l2"]
    assert "semantic" not in a["Duck"] and not (tmp_path / "a" / "renders").exists()
    assert run_cli([*args, "--output", str(tmp_path / "c"), "--strict"]) == 1  # errors present


def test_an_interrupted_or_repeated_evaluation_reuses_finished_uids(evaluated, tmp_path: Path):
    root = evaluated["root"]
    pred = tmp_path / "pred"
    shutil.copytree(root / "set" / "pred", pred)
    args = [
        "eval",
        "shapes",
        "--pred",
        str(pred),
        "--gt",
        str(root / "set" / "gt"),
        "--no-semantic",
        "--output",
        str(tmp_path / "o"),
        "--set",
        "geometry.samples=20000",
        "--set",
        "report.renders=false",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]
    assert run_cli(args) == 0
    first = results(tmp_path / "o")
    summary = lambda: json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary()["reused"] == 0
    assert first["Duck"]["metrics"]["chamfer_l2"] == first["Duck"]["geometry"]["chamfer_l2"]  # flat copy
    # a result file whose uid is gone is pruned; a changed input is recomputed; the rest is reused
    (tmp_path / "o" / "results" / "gone.json").write_text("{}")
    mesh = pred / "monkey" / "000.glb"
    mesh.write_bytes(mesh.read_bytes())  # same bytes, new mtime: treated as a new input
    import os

    os.utime(mesh, ns=(mesh.stat().st_atime_ns, mesh.stat().st_mtime_ns + 10**9))
    assert run_cli(args) == 0
    again = results(tmp_path / "o")
    assert summary()["reused"] == 11  # 12 uids with a prediction (7 ok, 5 errors) minus the changed one
    assert "gone" not in again and set(again) == set(first)
    assert again["Duck"] == first["Duck"] and again["monkey"]["geometry"] == first["monkey"]["geometry"]
    # another protocol setting invalidates everything
    assert run_cli([*args, "--set", "geometry.samples=20001"]) == 0
    assert summary()["reused"] == 0
    assert run_cli([*args, "--set", "geometry.samples=20001", "--fresh"]) == 0
    assert summary()["reused"] == 0


def test_usage_errors_exit_2_with_a_clear_message(evaluated, tmp_path: Path, capsys):
    root = evaluated["root"]
    # semantic scores on (the default) without checkpoints: says where to get them
    code = run_cli(
        [
            "eval",
            "shapes",
            "--pred",
            str(root / "set" / "pred"),
            "--images",
            str(root / "set" / "image"),
            "--output",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no ulip checkpoint given" in err and "huggingface.co" in err
    assert not (tmp_path / "x").exists()  # nothing started
    # a scorer that cannot be loaded (here: CUDA asked for on a CPU machine) stops the run cleanly
    ck = evaluated["ckpt"]
    code = run_cli(
        [
            "eval",
            "shapes",
            "--pred",
            str(root / "set" / "pred"),
            "--images",
            str(root / "set" / "image"),
            "--output",
            str(tmp_path / "w"),
            "--ulip-ckpt",
            str(ck["ulip"]),
            "--uni3d-ckpt",
            str(ck["uni3d"]),
            "--clip-ckpt",
            str(ck["clip"]),
            "--set",
            "semantic.arch=tiny",
            "--set",
            "semantic.device=cuda:0",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ]
    )
    assert code == 2 and "cannot load the ULIP/Uni3D scorers" in capsys.readouterr().err
    assert (
        run_cli(
            ["eval", "shapes", "--pred", str(tmp_path / "nowhere"), "--no-semantic", "--output", str(tmp_path / "y")]
        )
        == 2
    )
    assert "predictions folder not found" in capsys.readouterr().err
    assert (
        run_cli(
            [
                "eval",
                "shapes",
                "--pred",
                str(root / "set" / "pred"),
                "--no-semantic",
                "--output",
                str(tmp_path / "z"),
                "--set",
                "geometry.bogus=1",
            ]
        )
        == 2
    )
    assert "bogus" in capsys.readouterr().err


def test_backviews(tmp_path: Path, ray_local):
    rng = np.random.default_rng(0)
    for uid in ("a", "b", "c", "only_pred", "corrupt"):
        for sub in ("pred", "gt", "front"):
            (tmp_path / sub / uid).mkdir(parents=True)
    gt = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    for uid, pred in (
        ("a", gt),
        ("b", np.clip(gt.astype(int) + 25, 0, 255).astype(np.uint8)),
        ("c", (rng.random((48, 48, 3)) * 255).astype(np.uint8)),
    ):
        Image.fromarray(gt).save(tmp_path / "gt" / uid / "000.png")
        Image.fromarray(pred).save(tmp_path / "pred" / uid / "000.png")
        Image.fromarray(np.ascontiguousarray(gt[:, ::-1])).save(tmp_path / "front" / uid / "000.png")
    Image.fromarray(gt).save(tmp_path / "pred" / "only_pred" / "000.png")
    Image.fromarray(gt).save(tmp_path / "gt" / "corrupt" / "000.png")
    (tmp_path / "pred" / "corrupt" / "000.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    code = run_cli(
        [
            "eval",
            "backviews",
            "--pred",
            str(tmp_path / "pred"),
            "--gt",
            str(tmp_path / "gt"),
            "--images",
            str(tmp_path / "front"),
            "--output",
            str(out),
            "--set",
            f"images.lpips_backbone={tmp_path / 'no-alexnet.pth'}",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ]
    )
    assert code == 0
    res = results(out)
    assert res["a"]["backview"]["psnr"] == pytest.approx(100.0) and res["a"]["backview"]["ssim"] == pytest.approx(1.0)
    assert 15 < res["b"]["backview"]["psnr"] < 25 and res["c"]["backview"]["ssim"] < res["b"]["backview"]["ssim"] < 1
    assert res["corrupt"]["status"] == "error" and "cannot decode" in res["corrupt"]["error"]
    assert res["only_pred"]["status"] == "missing"
    # the front view (--images) as the prediction: the baseline a back-view model must beat
    from know3d.evaluation.images import psnr, ssim

    flipped = gt[:, ::-1].astype(np.float64) / 255
    for uid in ("a", "b", "c"):
        assert res[uid]["backview"]["baseline_front_psnr"] == pytest.approx(psnr(flipped, gt / 255))
        assert res[uid]["backview"]["baseline_front_ssim"] == pytest.approx(ssim(flipped, gt / 255))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["baseline_front_psnr"]["count"] == 3
    assert "no-alexnet.pth" in summary["skipped_metrics"]["lpips"] and "lpips" not in summary["metrics"]
    assert summary["metrics"]["psnr"]["count"] == 3 and summary["errors"] == 1 and summary["missing"] == 1
    html = (out / "report.html").read_text()
    page = Page(html)
    assert_self_contained(page)
    assert len(page.images()) >= 3 * 3 and [row[0][1] for row in page.rows] == sorted(res)  # a, b, c: all three


def test_odd_uids_long_uids_and_unusable_folders(evaluated, tmp_path: Path):
    root = evaluated["root"]
    odd, long = "we<ird> #1 [bold]b?%", "x" * 250  # rich markup, HTML and URL specials
    for sub in ("pred", "gt"):
        for uid in (odd, long):
            shutil.copytree(root / "set" / sub / "Duck", tmp_path / sub / uid)
    (tmp_path / "pred" / "upper").mkdir()
    shutil.copy(root / "set" / "pred" / "Duck" / "000.glb", tmp_path / "pred" / "upper" / "000.GLB")
    (tmp_path / "pred" / "empty_folder").mkdir()
    (tmp_path / "pred" / "escape").mkdir()
    (tmp_path / "pred" / "escape" / "000.glb").symlink_to(root / "set" / "pred" / "Duck" / "000.glb")
    out = tmp_path / "out"
    code = run_cli(
        [
            "eval",
            "shapes",
            "--pred",
            str(tmp_path / "pred"),
            "--gt",
            str(tmp_path / "gt"),
            "--no-semantic",
            "--output",
            str(out),
            "--set",
            "geometry.samples=20000",
            "--set",
            "report.resolution=64",
            "--set",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unmatched"]["prediction_folder_without_usable_000_file"] == ["empty_folder", "escape"]
    res = {json.loads(p.read_text())["uid"]: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert set(res) == {odd, long, "upper"} and all(r["status"] == "ok" for r in res.values())
    assert all(len(p.name) < 120 for p in (out / "results").glob("*")) and all(
        len(p.name) < 140 for p in (out / "renders").glob("*")
    )
    html = (out / "report.html").read_text()
    assert ">we&lt;ird&gt; #1 [bold]b?%</h3>" in html and "<ird>" not in html
    page = Page(html)
    assert_self_contained(page)
    assert sorted(row[0][1] for row in page.rows) == sorted(res)
    assert len(page.images()) == sum(len(r["renders"]) for r in res.values())  # all renders, no condition images
    assert "upper" in summary["unmatched"]["prediction_without_gt"]


def test_mlflow_problems_never_lose_results(evaluated, tmp_path: Path, monkeypatch, capsys):
    root = evaluated["root"]
    args = [
        "eval",
        "shapes",
        "--pred",
        str(root / "set" / "pred"),
        "--gt",
        str(root / "set" / "gt"),
        "--no-semantic",
        "--set",
        "geometry.samples=20000",
        "--set",
        "report.renders=false",
    ]
    # credentials in the URI: refused before any work
    assert (
        run_cli([*args, "--output", str(tmp_path / "a"), "--set", "mlflow.tracking_uri=http://u:secret@127.0.0.1:9"])
        == 2
    )
    err = capsys.readouterr().err
    assert "must not contain credentials" in err and "secret" not in err and not (tmp_path / "a").exists()
    # an unreachable server: the evaluation completes, results and summary are on disk
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert run_cli([*args, "--output", str(tmp_path / "b"), "--set", "mlflow.tracking_uri=http://127.0.0.1:9"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["ok"] == 7 and summary["mlflow_run_id"] is None
