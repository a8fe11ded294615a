"""The evaluation stage library without Ray: discovery, protocol, result store, summary, per-uid bodies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from know3d.evaluation.backviews import crashed_backview, measure_backview, missing_backviews, resolve_lpips
from know3d.evaluation.config import EvalConfig
from know3d.evaluation.discovery import EvalError, discover, discover_backviews, scan, unmatched_lines
from know3d.evaluation.protocol import check_semantic, inputs_key, protocol_fingerprint, shape_skips
from know3d.evaluation.scoring import ScoringActor, add_scores
from know3d.evaluation.shapes import ShapeJob, evaluate_shape
from know3d.evaluation.store import ResultStore, open_output, plan_backviews, plan_shapes, worker_error
from know3d.evaluation.summary import finish

NO_SEMANTIC = {"semantic": {"enabled": False}}


def touch(root: Path, uid: str, name: str, data: bytes = b"x") -> Path:
    (root / uid).mkdir(parents=True, exist_ok=True)
    (root / uid / name).write_bytes(data)
    return root / uid / name


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture()
def shape_set(tmp_path: Path) -> dict[str, Path]:
    pred, images, gt = tmp_path / "pred", tmp_path / "images", tmp_path / "gt"
    for uid in ("a", "b", "no_image"):
        touch(pred, uid, "000.glb")
    touch(pred, "upper", "000.GLB")  # extension case is ignored
    (pred / "empty").mkdir()
    (pred / "escape").mkdir()
    (pred / "escape" / "000.glb").symlink_to(touch(tmp_path / "outside", "x", "000.glb"))
    for uid in ("a", "b", "upper", "image_only"):
        touch(images, uid, "000.png")
    (images / "bad_image").mkdir()
    for uid in ("a", "upper", "gt_only"):
        touch(gt, uid, "000.obj")
    return {"pred": pred, "images": images, "gt": gt, "root": tmp_path}


# --------------------------------------------------------------------------- discovery


def test_discovery_names_every_left_out_folder_by_why(shape_set):
    found = discover(shape_set["pred"], shape_set["images"], shape_set["gt"])
    assert sorted(found.preds) == ["a", "b", "no_image", "upper"] and found.preds["upper"].name == "000.GLB"
    assert found.unmatched == {
        "prediction_folder_without_usable_000_file": ["empty", "escape"],  # the symlink leaves the root
        "prediction_without_image": ["no_image"],
        "image_without_prediction": ["image_only"],
        "image_folder_without_usable_000_file": ["bad_image"],
        "prediction_without_gt": ["b", "no_image"],
        "gt_without_prediction": ["gt_only"],
        "gt_folder_without_usable_000_file": [],
    }
    assert found.uids == ["a", "b", "image_only", "no_image", "upper"]  # an image alone is a missing result
    assert found.pairs == ["a", "upper"]
    assert list(discover(shape_set["pred"], None, None).unmatched) == ["prediction_folder_without_usable_000_file"]


def test_discovery_refuses_missing_folders_and_empty_predictions(tmp_path: Path, shape_set):
    with pytest.raises(EvalError, match="predictions folder not found"):
        discover(tmp_path / "nowhere", None, None)
    (tmp_path / "empty_pred" / "u").mkdir(parents=True)
    with pytest.raises(EvalError, match="no predictions found"):
        discover(tmp_path / "empty_pred", None, None)
    with pytest.raises(EvalError, match="ground-truth folder not found"):
        discover_backviews(shape_set["pred"], tmp_path / "nowhere", None)
    assert scan(None, ("png",), "images") == ({}, [])


def test_unmatched_lines_escape_markup_and_shorten():
    lines = unmatched_lines({"prediction_without_gt": ["[bold]x", *"abcdef"], "gt_without_prediction": []})
    assert lines == ["[yellow]prediction without gt: 7 (\\[bold]x, a, b, c, d ...)[/]"]


def test_backview_discovery_pairs_predictions_with_ground_truth(tmp_path: Path):
    for uid in ("a", "b", "only_pred"):
        touch(tmp_path / "pred", uid, "000.png")
    for uid in ("a", "b", "only_gt"):
        touch(tmp_path / "gt", uid, "000.jpg")
    touch(tmp_path / "front", "a", "000.png")
    found = discover_backviews(tmp_path / "pred", tmp_path / "gt", tmp_path / "front")
    assert found.pairs == ["a", "b"] and list(found.images) == ["a"]
    assert found.unmatched["prediction_without_gt"] == ["only_pred"]
    assert found.unmatched["gt_without_prediction"] == ["only_gt"]
    assert missing_backviews(found) == [
        {
            "uid": "only_pred",
            "prediction": str(tmp_path / "pred" / "only_pred" / "000.png"),
            "status": "missing",
            "error": "no ground-truth image",
        },
        {
            "uid": "only_gt",
            "ground_truth": str(tmp_path / "gt" / "only_gt" / "000.jpg"),
            "status": "missing",
            "error": "no prediction",
        },
    ]


# --------------------------------------------------------------------------- protocol


def test_fingerprint_follows_the_protocol_not_ray_mlflow_or_report_size(tmp_path: Path):
    base = EvalConfig()
    same = EvalConfig.model_validate(
        {"ray": {"concurrency": 7}, "mlflow": {"enabled": False, "experiment": "x"}, "report": {"max_rows": 3}}
    )
    assert protocol_fingerprint(same) == protocol_fingerprint(base)
    assert len(protocol_fingerprint(base)) == 16
    for change in ({"seed": 1}, {"geometry": {"samples": 1000}}, {"images": {"lpips": False}}, NO_SEMANTIC):
        assert protocol_fingerprint(EvalConfig.model_validate(change)) != protocol_fingerprint(base), change
    # a checkpoint replaced at the same path changes the scores, so the fingerprint too
    ckpt = tmp_path / "ulip.pt"
    ckpt.write_bytes(b"one")
    cfg = EvalConfig.model_validate({"semantic": {"ulip": {"checkpoint": str(ckpt)}}})
    before = protocol_fingerprint(cfg)
    bump_mtime(ckpt)
    assert protocol_fingerprint(cfg) != before


def test_inputs_key_is_path_size_and_mtime(tmp_path: Path):
    f = tmp_path / "000.glb"
    f.write_bytes(b"mesh")
    key = inputs_key(str(f), None)
    assert key == inputs_key(str(f), None) and key != inputs_key(str(f), str(f)) and key != inputs_key(str(f))
    bump_mtime(f)
    assert inputs_key(str(f), None) != key


def test_semantic_settings_are_refused_before_any_work(tmp_path: Path):
    check_semantic(EvalConfig.model_validate(NO_SEMANTIC), None)  # nothing to check
    with pytest.raises(EvalError, match="need --images"):
        check_semantic(EvalConfig(), None)
    both_off = {"semantic": {"ulip": {"enabled": False}, "uni3d": {"enabled": False}}}
    with pytest.raises(EvalError, match="both ulip and uni3d are disabled"):
        check_semantic(EvalConfig.model_validate(both_off), tmp_path)
    with pytest.raises(EvalError, match="no ulip checkpoint given"):
        check_semantic(EvalConfig(), tmp_path)


def test_shape_skips_say_why():
    assert shape_skips(EvalConfig.model_validate(NO_SEMANTIC), None) == {
        "semantic": "disabled (--no-semantic)",
        "geometry": "no --gt given",
    }
    uni3d_off = EvalConfig.model_validate({"semantic": {"uni3d": {"enabled": False}}})
    assert shape_skips(uni3d_off, Path("gt")) == {"uni3d": "disabled (semantic.uni3d.enabled=false)"}


# --------------------------------------------------------------------------- result store


def ok_result(uid: str, value: float = 0.5) -> dict:
    return {"uid": uid, "status": "ok", "geometry": {"chamfer_l1": value, "icp": False}}


def test_store_reuses_only_results_of_the_same_protocol_and_inputs(tmp_path: Path):
    cfg = EvalConfig.model_validate(NO_SEMANTIC)
    store = ResultStore(tmp_path, cfg, fresh=False)
    store.put(ok_result("a"), "k1")
    stored = json.loads((tmp_path / "results" / "a.json").read_text())
    assert stored["fingerprint"] == protocol_fingerprint(cfg) and stored["inputs_key"] == "k1"
    assert stored["metrics"] == {"chamfer_l1": 0.5}  # flat copy; booleans are not metrics
    assert not [p for p in (tmp_path / "results").iterdir() if p.suffix != ".json"]  # no temp file left
    assert store.reusable("a", "k1")["geometry"]["chamfer_l1"] == 0.5
    assert store.reusable("a", "k2") is None  # inputs changed
    assert store.reusable("b", "k1") is None  # never stored
    other = ResultStore(tmp_path, cfg.model_copy(update={"seed": 3}), fresh=False)
    assert other.reusable("a", "k1") is None  # another protocol
    assert ResultStore(
        tmp_path, cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"concurrency": 9})}), False
    ).reusable("a", "k1")


@pytest.mark.parametrize(
    "result",
    [
        {"uid": "a", "status": "error", "stage": "worker", "error": "died"},
        {"uid": "a", "status": "error", "stage": "semantic", "error": "oom"},
        {**ok_result("a"), "semantic_error": "cannot decode"},
        {"uid": "a", "status": "missing", "error": "no prediction"},
    ],
    ids=["worker-crash", "scorer-crash", "no-scores", "missing"],
)
def test_store_retries_what_says_nothing_about_the_uid(tmp_path: Path, result: dict):
    store = ResultStore(tmp_path, EvalConfig(), fresh=False)
    store.put(result, "k")
    assert store.reusable("a", "k") is None
    store.put({"uid": "a", "status": "error", "stage": "prediction", "error": "non-manifold"}, "k")
    assert store.reusable("a", "k")["error"] == "non-manifold"  # a bad mesh stays bad
    store.path("a").write_text("{torn")
    assert store.reusable("a", "k") is None


def test_store_fresh_finalize_and_prune(tmp_path: Path):
    store = ResultStore(tmp_path, EvalConfig(), fresh=False)
    for uid in ("gone", "b"):
        store.put(ok_result(uid), "k")
    (tmp_path / "renders").mkdir()
    results = [ok_result("c"), {"uid": "a", "status": "missing", "error": "no prediction"}]
    store.put(results[0], "k")
    store.finalize(results)
    assert [r["uid"] for r in results] == ["a", "c"]
    assert sorted(p.stem for p in (tmp_path / "results").glob("*.json")) == ["a", "c"]
    assert json.loads(store.path("a").read_text())["inputs_key"] == ""  # recorded, never reused
    ResultStore(tmp_path, EvalConfig(), fresh=True)
    assert not list((tmp_path / "results").iterdir()) and not (tmp_path / "renders").exists()


def test_open_output_saves_the_resolved_config(tmp_path: Path):
    cfg = EvalConfig.model_validate({"seed": 4})
    store = open_output(tmp_path / "out", cfg, fresh=False)
    assert store.output == (tmp_path / "out").resolve() and store.dir.is_dir()
    assert "seed: 4" in (tmp_path / "out" / "config.yaml").read_text()


def test_plans_reuse_unchanged_uids_and_queue_the_rest(shape_set):
    found = discover(shape_set["pred"], shape_set["images"], shape_set["gt"])
    cfg = EvalConfig.model_validate(NO_SEMANTIC)
    store = ResultStore(shape_set["root"] / "out", cfg, fresh=False)
    first = plan_shapes(found, cfg, store)
    assert [j["uid"] for j in first.todo] == found.uids and not first.reused
    assert first.todo[0] == {
        "uid": "a",
        "pred": str((shape_set["pred"] / "a" / "000.glb").resolve()),
        "gt": str((shape_set["gt"] / "a" / "000.obj").resolve()),
        "image": str((shape_set["images"] / "a" / "000.png").resolve()),
    }
    for job in first.todo:
        store.put({**ok_result(job["uid"]), "prediction": job["pred"], "image": None}, first.keys[job["uid"]])
    bump_mtime(shape_set["pred"] / "b" / "000.glb")
    again = plan_shapes(found, cfg, store)
    assert [j["uid"] for j in again.todo] == ["b"]
    assert {r["uid"]: r["image"] for r in again.reused}["a"] == first.todo[0]["image"]  # refreshed
    # with semantic scores the condition image is part of the key
    scored = EvalConfig()
    assert ResultStore(shape_set["root"] / "out", scored, False).fingerprint != store.fingerprint
    pairs = plan_backviews(found, store)
    assert [j["uid"] for j in pairs.todo] == ["a", "upper"] and pairs.todo[0]["front"].endswith("000.png")


# --------------------------------------------------------------------------- summary


def test_finish_writes_tables_report_and_summary(tmp_path: Path):
    store = ResultStore(tmp_path, EvalConfig(), fresh=False)
    results = [
        ok_result("b", 0.25),
        ok_result("a", 0.75),
        {**ok_result("c", 0.5), "semantic_error": "cannot decode"},
        worker_error({"uid": "d"}, RuntimeError("boom")),
        {"uid": "e", "status": "missing", "error": "no prediction"},
    ]
    reports = []
    summary = finish(
        "shapes",
        store,
        EvalConfig(),
        results,
        {"prediction_without_gt": ["e"]},
        {"geometry": "no --gt given"},
        lambda *args: reports.append(args),
        started=0.0,
        measure_seconds=1.234,
        reused=2,
    )
    assert (summary.total, summary.ok, summary.errors, summary.missing, summary.reused) == (5, 3, 1, 1, 2)
    assert summary.table["chamfer_l1"]["mean"] == pytest.approx(0.5) and summary.table["chamfer_l1"]["count"] == 3
    assert summary.failures == [("d", "RuntimeError: boom"), ("e", "no prediction")]
    assert summary.semantic_failures == [("c", "cannot decode")]
    assert len(reports) == 1 and [r["uid"] for r in reports[0][1]] == ["a", "b", "c", "d", "e"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["measure_seconds"] == 1.23 and on_disk["skipped_metrics"] == {"geometry": "no --gt given"}
    assert on_disk["mlflow_run_id"] is None and on_disk["failures"][0] == {"uid": "d", "reason": "RuntimeError: boom"}
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "uid,status,chamfer_l1,error" and rows[1] == "a,ok,0.75," and len(rows) == 6
    assert "| chamfer_l1 | 0.5 |" in (tmp_path / "metrics.md").read_text()
    summary.run_id = "r1"
    summary.write()
    assert json.loads((tmp_path / "summary.json").read_text())["mlflow_run_id"] == "r1"


# --------------------------------------------------------------------------- per-uid bodies


def test_backview_body_measures_baselines_and_failures(tmp_path: Path):
    gt = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for name, image in (("gt", gt), ("pred", gt), ("front", np.ascontiguousarray(gt[:, ::-1]))):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    cfg, skipped = resolve_lpips(EvalConfig.model_validate({"images": {"lpips": False}}))
    assert skipped == {"lpips": "disabled (images.lpips=false)"}
    job = {"uid": "u", "pred": str(tmp_path / "pred.png"), "gt": str(tmp_path / "gt.png"), "front": None}
    result = measure_backview(job, cfg)
    assert result["status"] == "ok" and result["backview"]["psnr"] == pytest.approx(100.0)
    assert "condition" not in result and "baseline_front_psnr" not in result["backview"]
    with_front = measure_backview({**job, "front": str(tmp_path / "front.png")}, cfg)
    assert with_front["backview"]["baseline_front_ssim"] < 1.0 and list(with_front)[-1] == "condition"
    broken = measure_backview({**job, "pred": str(tmp_path / "bad.png")}, cfg)
    assert broken["status"] == "error" and broken["stage"] == "decode" and "cannot decode" in broken["error"]
    crash = crashed_backview({**job, "front": "f.png"}, RuntimeError("worker died"))
    assert crash == {
        "uid": "u",
        "status": "error",
        "stage": "worker",
        "error": "RuntimeError: worker died",
        "condition": "f.png",
    }


def test_lpips_without_weights_is_switched_off_with_the_reason(tmp_path: Path):
    cfg = EvalConfig.model_validate({"images": {"lpips_backbone": str(tmp_path / "no-alexnet.pth")}})
    resolved, skipped = resolve_lpips(cfg)
    assert resolved.images.lpips is False and cfg.images.lpips is True
    assert "no-alexnet.pth" in skipped["lpips"]


def test_scoring_actor_reports_load_and_score_failures(tmp_path: Path):
    actor = ScoringActor({"ulip_checkpoint": str(tmp_path / "none.pt"), "uni3d": False, "arch": "tiny"})
    assert "none.pt" in actor.info()["error"] and actor.scorer is None

    class Scorer:
        metrics, device = ["ulip"], "cpu"

        def score(self, points, image):
            if not Path(image).is_file():
                raise FileNotFoundError(image)
            return {"ulip": float(len(points))}

    actor.scorer = Scorer()
    assert actor.info() == {"metrics": ["ulip"], "device": "cpu"}
    (tmp_path / "img.png").write_bytes(b"")
    assert actor.score(np.zeros((3, 3)), str(tmp_path / "img.png")) == {"scores": {"ulip": 3.0}}
    assert actor.score(np.zeros((3, 3)), "missing.png") == {"error": "FileNotFoundError: missing.png"}
    assert add_scores({}, {"scores": {"ulip": 0.1}}) == {"semantic": {"ulip": 0.1}}
    assert add_scores({}, {"error": "e"}) == {"semantic_error": "e"}


def test_shape_body_scores_only_measured_point_clouds(real_dir: Path, tmp_path: Path):
    cfg = EvalConfig.model_validate(
        {
            "points": {"surface_samples": 2000, "fps_points": 256},
            "geometry": {"samples": 2000},
            "report": {"renders": False},
        }
    )
    duck = str(real_dir / "Duck.glb")
    calls = []

    def score(points: np.ndarray, image: str) -> dict:
        calls.append((points.shape, image))
        return {"scores": {"ulip": 0.25}}

    result = evaluate_shape(ShapeJob("duck", duck, gt=duck, image="cond.png"), cfg, tmp_path, score)
    assert result["status"] == "ok" and result["semantic"] == {"ulip": 0.25} and calls == [((256, 3), "cond.png")]
    assert result["geometry"]["iou_volume@64"] == 1.0  # the duck against itself
    failed = evaluate_shape(ShapeJob("duck", duck, image="cond.png"), cfg, tmp_path, lambda p, i: {"error": "dead"})
    assert failed["semantic_error"] == "dead" and "mesh" in failed
    missing = evaluate_shape(ShapeJob("gone", None, image="cond.png"), cfg, tmp_path, score)
    assert missing["status"] == "missing" and len(calls) == 1
