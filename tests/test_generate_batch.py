"""`know3d generate shapes`: a folder of front views -> HY3D-Bench meshes on Ray.

Fast tier: input discovery (both layouts, prompts), resume planning, one uid's generation with a
stand-in chain (mesh moved into place, no mesh, a raising chain, a crashed actor), usage errors.
Slow tier: a real stage-1 generator (the debug trainer, 5 steps: only the mechanics matter) over
good and bad front views on a local Ray, the resume, and `know3d eval shapes` reading the output.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from know3d.pipeline.cli import app
from know3d.pipeline.generate_batch import (
    MESH_NAME,
    GenerationError,
    Job,
    crashed_entry,
    discover_inputs,
    generate_one,
    is_done,
    plan,
    read_prompts,
    read_record,
)
from tests.test_generator_train import HIDDEN, _cfg, _train

slow = pytest.mark.slow


def _front(path: Path, alpha: bool = True) -> Path:
    """A 48² front view: a disc on transparency (or, without alpha, on white)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA" if alpha else "RGB", (48, 48), (0, 0, 0, 0) if alpha else (255, 255, 255))
    ImageDraw.Draw(img).ellipse((8, 8, 40, 40), fill=(200, 60, 40, 255) if alpha else (200, 60, 40))
    img.save(path)
    return path


class FakeChain:
    """Stands in for ShapeGenerator: writes what its ``run`` writes (mesh.glb unless ``mesh`` is
    False), or raises ``error``."""

    def __init__(self, mesh: bool = True, error: Exception | None = None) -> None:
        self.mesh, self.error, self.calls = mesh, error, []

    def run(self, image: Path, output: Path, prompt: str | None = None, seed: int = 0) -> dict:
        self.calls.append((image, prompt, seed))
        if self.error is not None:
            raise self.error
        output.mkdir(parents=True, exist_ok=True)
        summary = {"image": str(image), "mesh": None, "no_mesh_reason": "stage 1 produced an empty sparse structure"}
        if self.mesh:
            (output / "mesh.glb").write_bytes(b"glTF")
            summary.update(mesh=str(output / "mesh.glb"), no_mesh_reason=None)
        (output / "shape.json").write_text(json.dumps(summary))
        return summary


# --------------------------------------------------------------------------- inputs


def test_hy3d_layout_with_prompts_from_json_and_prompt_txt(tmp_path: Path):
    for uid in ("b", "a", "c"):
        _front(tmp_path / uid / "000.png")
    (tmp_path / "a" / "prompt.txt").write_text("two straps\n")
    (tmp_path / "b" / "prompt.txt").write_text("a zipper")
    (tmp_path / "empty").mkdir()  # a uid folder without its image: reported, not dropped
    (tmp_path / ".hidden").mkdir()
    found = discover_inputs(tmp_path, {"b": "a pocket", "c": "", "zz": "no such uid"})
    assert found.layout == "hy3d"
    assert [j.uid for j in found.jobs] == ["a", "b", "c", "empty"]
    by_uid = {j.uid: j for j in found.jobs}
    assert by_uid["a"].prompt == "two straps"  # prompt.txt
    assert by_uid["b"].prompt == "a pocket"  # the JSON wins over prompt.txt
    assert by_uid["c"].prompt is None  # an empty prompt is none
    assert by_uid["a"].image == str((tmp_path / "a" / "000.png").resolve()) and by_uid["a"].problem is None
    assert by_uid["empty"].image is None and "no 000.png" in by_uid["empty"].problem
    assert found.unmatched_prompts == ["zz"]


def test_flat_layout_uses_file_stems(tmp_path: Path):
    for name in ("z.png", "a.PNG", "m.webp"):
        _front(tmp_path / name) if name.lower().endswith("png") else (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "other").mkdir()  # subfolders without 000.png do not make a flat folder HY3D
    found = discover_inputs(tmp_path, {"a": "a hood"})
    assert found.layout == "flat" and [j.uid for j in found.jobs] == ["a", "m", "z"]
    assert found.jobs[0].prompt == "a hood" and found.jobs[0].image.endswith("a.PNG")


def test_files_linking_outside_the_input_folder_are_refused_alone(tmp_path: Path):
    """An input folder from elsewhere cannot make the run read a file outside it: a ``000.png`` or
    ``prompt.txt`` that links out becomes that uid's problem; the other uids are unaffected."""
    secret = tmp_path / "private"
    _front(secret / "face.png")
    (secret / "credentials").write_text("aws_secret_access_key = x")
    hy3d = tmp_path / "hy3d"
    for uid in ("good", "img", "txt"):
        (hy3d / uid).mkdir(parents=True)
    _front(hy3d / "good" / "000.png")
    (hy3d / "good" / "prompt.txt").write_text("a zipper")
    (hy3d / "img" / "000.png").symlink_to(secret / "face.png")
    _front(hy3d / "txt" / "000.png")
    (hy3d / "txt" / "prompt.txt").symlink_to(secret / "credentials")
    jobs = {j.uid: j for j in discover_inputs(hy3d).jobs}
    assert jobs["good"].problem is None and jobs["good"].prompt == "a zipper"
    assert jobs["img"].image is None and "links outside --images" in jobs["img"].problem
    assert jobs["txt"].prompt is None and "prompt.txt: links outside --images" in jobs["txt"].problem
    assert all("aws" not in (j.prompt or "") for j in jobs.values())
    flat = tmp_path / "flat"
    _front(flat / "a.png")
    (flat / "b.png").symlink_to(secret / "face.png")
    jobs = {j.uid: j for j in discover_inputs(flat).jobs}
    assert jobs["a"].problem is None and jobs["b"].image is None and "links outside" in jobs["b"].problem


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no images"),
        (lambda p: (_front(p / "u" / "000.png"), _front(p / "loose.png")), "one layout"),
        (lambda p: (_front(p / "a.png"), _front(p / "a.webp")), "share one uid"),
    ],
)
def test_unusable_image_folders_are_refused_in_one_line(tmp_path: Path, setup, message: str):
    setup(tmp_path)
    with pytest.raises(GenerationError, match=message):
        discover_inputs(tmp_path)
    with pytest.raises(GenerationError, match="not a folder"):
        discover_inputs(tmp_path / "missing")


def test_prompts_file_must_map_uids_to_strings(tmp_path: Path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"a": "a zipper"}))
    assert read_prompts(good) == {"a": "a zipper"}
    for text, message in (("[1]", "JSON object"), ('{"a": 3}', "'a' is not a string"), ("{", "not a readable")):
        good.write_text(text)
        with pytest.raises(GenerationError, match=message):
            read_prompts(good)
    with pytest.raises(GenerationError, match="no such file"):
        read_prompts(tmp_path / "nope.json")


# --------------------------------------------------------------------------- one uid, resume


def test_generate_one_moves_the_mesh_into_the_hy3d_layout(tmp_path: Path):
    chain = FakeChain()
    result = generate_one(chain, Job("u", "front.png", "a zipper"), tmp_path, seed=3)
    assert result["status"] == "ok" and result["reason"] is None and result["seconds"] >= 0
    assert chain.calls == [(Path("front.png"), "a zipper", 3)]
    assert (tmp_path / "u" / MESH_NAME).read_bytes() == b"glTF"
    assert not (tmp_path / "u" / "work" / "mesh.glb").exists()
    assert json.loads((tmp_path / "u" / "work" / "shape.json").read_text())["mesh"] == str(tmp_path / "u" / MESH_NAME)
    assert is_done(tmp_path, "u")


def test_no_mesh_and_errors_are_entries_and_drop_an_older_mesh(tmp_path: Path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / MESH_NAME).write_bytes(b"old")
    result = generate_one(FakeChain(mesh=False), Job("u", "f.png"), tmp_path, 0)
    assert result["status"] == "no_mesh" and "empty sparse structure" in result["reason"]
    assert not (tmp_path / "u" / MESH_NAME).exists() and not is_done(tmp_path, "u")
    bad = generate_one(FakeChain(error=ValueError("f.png: no alpha channel\nmore")), Job("u", "f.png"), tmp_path, 0)
    assert bad["status"] == "failed" and bad["reason"] == "f.png: no alpha channel"
    boom = generate_one(FakeChain(error=RuntimeError("CUDA out of memory")), Job("v", "f.png"), tmp_path, 0)
    assert boom["reason"] == "RuntimeError: CUDA out of memory"
    died = crashed_entry(Job("w", "f.png"), RuntimeError("actor died"))
    assert died["status"] == "failed" and "crashed (RuntimeError)" in died["reason"]


def test_plan_reuses_finished_uids_unless_fresh_or_changed(tmp_path: Path):
    images, out = tmp_path / "images", tmp_path / "out"
    for uid in ("a", "b", "c"):
        _front(images / uid / "000.png")
    (images / "d").mkdir()
    settings = {"generator": "0123", "seed": 0}
    _, todo = plan(discover_inputs(images), out, False, {}, settings)
    assert [j.uid for j in todo] == ["a", "b", "c"] and todo[0].made_from["generator"] == "0123"
    generate_one(FakeChain(), todo[0], out, 0)  # a: done
    (out / "b").mkdir(parents=True)
    (out / "b" / MESH_NAME).write_bytes(b"torn")  # b: a mesh without shape.json (killed mid-way)
    inputs = discover_inputs(images)
    known, todo = plan(inputs, out, False, {"a": {"status": "ok", "seconds": 4.5}}, settings)
    assert [j.uid for j in todo] == ["b", "c"]
    assert known["a"] == {"uid": "a", "status": "ok", "reason": None, "seconds": 4.5, "skipped": True}
    assert known["d"]["status"] == "failed" and "no 000.png" in known["d"]["reason"]
    known, todo = plan(inputs, out, True, {}, settings)
    assert [j.uid for j in todo] == ["a", "b", "c"] and list(known) == ["d"]
    # another seed, another prompt or another front view: the mesh is made again
    assert [j.uid for j in plan(inputs, out, False, {}, {**settings, "seed": 1})[1]] == ["a", "b", "c"]
    assert [j.uid for j in plan(discover_inputs(images, {"a": "a hood"}), out, False, {}, settings)[1]][0] == "a"
    _front(images / "a" / "000.png", alpha=False)
    assert [j.uid for j in plan(inputs, out, False, {}, settings)[1]][0] == "a"


def test_cli_usage_errors_exit_2_before_ray(tmp_path: Path):
    _front(tmp_path / "images" / "a" / "000.png")
    base = ["generate", "shapes", "--output", str(tmp_path / "out")]
    res = CliRunner().invoke(app, [*base, "--images", str(tmp_path / "nope"), "--generator", str(tmp_path)])
    assert res.exit_code == 2 and "not a folder" in res.output
    res = CliRunner().invoke(app, [*base, "--images", str(tmp_path / "images"), "--generator", str(tmp_path)])
    assert res.exit_code == 2 and "not an exported generator" in res.output
    lora = ["--backview-lora", str(tmp_path / "no-lora")]
    res = CliRunner().invoke(
        app, [*base, "--images", str(tmp_path / "images"), "--generator", str(_exported(tmp_path / "g")), *lora]
    )
    assert res.exit_code == 2 and "no pytorch_lora_weights.safetensors" in res.output
    assert not (tmp_path / "out").exists()  # nothing written
    helped = CliRunner().invoke(app, ["generate", "shapes", "--help"], env={"COLUMNS": "200"})
    assert helped.exit_code == 0 and "know3d eval shapes --pred" in helped.output


# --------------------------------------------------------------------------- the fan-out, on a stand-in Ray


class Crash(BaseException):
    """What a dying actor process looks like to the stand-in: not an ordinary exception."""


class FakeRay:
    """The part of Ray that generate_batch uses, in-process: actors are plain objects, a call runs
    at once and its ref holds the result; an actor that dies under a call (:class:`Crash`) fails
    that call with an error, as a ``RayActorError`` does."""

    class Ref:
        def __init__(self, fn, *args) -> None:
            try:
                self.value, self.error = fn(*args), None
            except Crash as exc:
                self.value, self.error = None, RuntimeError(f"the actor died: {exc}")

    def __init__(self) -> None:
        self.options, self.killed = {}, 0

    def cluster_resources(self) -> dict:
        return {"CPU": 4.0}

    def remote(self, **options):
        self.options = options
        return lambda cls: SimpleNamespace(remote=lambda *a: self._actor(cls(*a)))

    def _actor(self, obj):
        return SimpleNamespace(
            **{m: SimpleNamespace(remote=functools.partial(self.Ref, getattr(obj, m))) for m in ("info", "generate")}
        )

    def get(self, refs):
        if isinstance(refs, list):
            return [self.get(r) for r in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def kill(self, actor) -> None:
        self.killed += 1


class StandInChain(FakeChain):
    """ShapeGenerator's stand-in inside the worker: an image named ``crash`` kills the actor,
    one named ``boom`` raises; a generator folder named ``broken`` does not load."""

    def __init__(
        self, generator, shape_generator=None, backview_lora=None, sampler=None, shape_sampler=None, device=None
    ):
        if Path(generator).name == "broken":
            raise FileNotFoundError(f"{generator}: adapter.safetensors unreadable")
        super().__init__()
        self.device, self.load_seconds = device, 0.1

    def run(self, image: Path, output: Path, prompt: str | None = None, seed: int = 0) -> dict:
        if image.parent.name == "crash":
            raise Crash("segfault")
        if image.parent.name == "boom":
            raise RuntimeError("sampler exploded")
        return super().run(image, output, prompt, seed)


@pytest.fixture()
def fake_ray(monkeypatch) -> FakeRay:
    from know3d.pipeline import generate_batch as module
    from know3d.training.generator import generate

    ray = FakeRay()
    monkeypatch.setattr(module, "ray_session", lambda cfg: contextlib.nullcontext(ray))
    monkeypatch.setattr(generate, "ShapeGenerator", StandInChain)
    monkeypatch.setenv("KNOW3D_PROGRESS", "off")
    return ray


def _exported(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "know3d_generator.json").write_text("{}")
    return folder


def test_every_uid_is_one_entry_whatever_happens_to_it(tmp_path: Path, fake_ray: FakeRay):
    from know3d.pipeline.generate_batch import generate_batch

    images, out = tmp_path / "images", tmp_path / "out"
    for uid in ("boom", "crash", "fine", "later"):
        _front(images / uid / "000.png")
    _front(images / "flat" / "000.png", alpha=False)
    summary = generate_batch(images, out, _exported(tmp_path / "gen"), workers=3)
    assert fake_ray.options == {"num_cpus": 1, "num_gpus": 0, "max_restarts": 2, "max_task_retries": 0}
    assert fake_ray.killed == 3
    uids = read_record(out)
    assert {u: e["status"] for u, e in uids.items()} == {
        "boom": "failed",
        "crash": "failed",
        "fine": "ok",
        "flat": "failed",
        "later": "ok",
    }
    assert uids["boom"]["reason"] == "RuntimeError: sampler exploded"
    assert uids["crash"]["reason"] == "the generation worker crashed (RuntimeError)"
    assert "flat/000.png" in uids["flat"]["reason"] and "no alpha" in uids["flat"]["reason"]
    assert (out / "fine" / MESH_NAME).is_file() and (out / "later" / MESH_NAME).is_file()
    assert summary.counts == {"ok": 2, "no_mesh": 0, "failed": 3, "skipped": 0}
    assert [u for u, _ in summary.failures] == ["boom", "crash", "flat"]
    record = json.loads((out / "generation.json").read_text())
    assert record["finished"] and record["generator"] == str(tmp_path / "gen") and record["seconds"] >= 0
    again = generate_batch(images, out, tmp_path / "gen")
    assert again.counts["skipped"] == 2 and again.counts["failed"] == 3
    (tmp_path / "gen" / "know3d_generator.json").write_text('{"retrained": true}')
    assert generate_batch(images, out, tmp_path / "gen").counts["skipped"] == 0  # another model: made again


def test_workers_are_capped_by_what_the_cluster_holds():
    from know3d.pipeline.generate_batch import _num_workers

    cluster = lambda **r: SimpleNamespace(cluster_resources=lambda: r)
    assert _num_workers(cluster(CPU=16.0, GPU=2.0), 4, 1.0) == 2
    assert _num_workers(cluster(CPU=16.0, GPU=2.0), 4, 0.5) == 4
    assert _num_workers(cluster(CPU=2.0), 4, 0) == 2
    assert _num_workers(cluster(CPU=64.0), 3, 0) == 3


def test_a_generator_that_does_not_load_stops_the_run_in_one_line(tmp_path: Path, fake_ray: FakeRay):
    _front(tmp_path / "images" / "a" / "000.png")
    broken = _exported(tmp_path / "broken")
    args = ["generate", "shapes", "--images", str(tmp_path / "images"), "--generator", str(broken)]
    res = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "adapter.safetensors unreadable" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and fake_ray.killed == 1
    assert not (tmp_path / "out").exists()  # nothing written


# --------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """test_generator_train's tiny build, smaller: 1 procedural asset rendered at 32², its
    debug SS-VAE target and hidden-state cache (no val split: nothing is validated here)."""
    from know3d.core.shards import ShardConfig, resolve_shards, write_index
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.shards import plan_shards, write_shard
    from know3d.rendering.sources.procedural import ProceduralSource
    from know3d.training.generator.config import HiddenStatesConfig
    from know3d.training.generator.debug_ss_vae import resolve_debug_ss_vae
    from know3d.training.generator.hidden_states import build_hidden_cache
    from know3d.training.generator.targets import TargetStore, build_targets
    from tests.test_annotation import _render
    from tests.test_hidden_states import LocalRay

    root = tmp_path_factory.mktemp("gen-batch-data")
    out = root / "ds"
    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=1), out / "procedural").discover()
    work = out / "work" / "fp0"
    summaries = _render([Path(r.uri) for r in records], work, 32, [r.to_json() for r in records])
    plans = plan_shards(work, summaries, ShardConfig(val_fraction=0.0), 0)
    write_index(out, [write_shard(work, out, plan) for plan in plans], {"render_fingerprint": "fp0"})
    assert build_targets(TargetStore(out, resolve_debug_ss_vae()))[0]["encoded"] == 1
    hidden = HiddenStatesConfig(**HIDDEN, cache_dir=str(root / "hidden"))
    build_hidden_cache(hidden, resolve_shards([str(out)], "train")[0], LocalRay())
    return out


@pytest.fixture(scope="module")
def generator(data: Path, tmp_path_factory, one_rank) -> Path:
    """A stage-1 generator from the debug trainer, 2 steps on the tiny data build (only the
    mechanics matter: the mesh of a barely trained model is still a mesh), trained in this process
    (the torchrun launcher is tested in test_generator_train)."""
    root = tmp_path_factory.mktemp("gen-batch")
    sets = ("model.base=debug", "schedule.max_steps=2", "schedule.validate_every=0", "schedule.checkpoint_every=2")
    _train(_cfg(data, root / "run", *sets))
    return root / "run" / "generator"


@pytest.fixture(scope="module")
def batch(generator: Path, tmp_path_factory, ray_local) -> dict:
    """``know3d generate shapes`` over 2 good and 2 bad front views (HY3D layout)."""
    root = tmp_path_factory.mktemp("batch")
    images = root / "images"
    _front(images / "a" / "000.png")
    _front(images / "b" / "000.png")
    (images / "b" / "prompt.txt").write_text("a zipper")
    _front(images / "c" / "000.png", alpha=False)
    (images / "d").mkdir()
    (images / "d" / "000.png").write_bytes(b"this is no image")
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"a": "two straps"}))
    args = ["generate", "shapes", "--images", str(images), "--generator", str(generator), "--prompts", str(prompts)]
    res = CliRunner().invoke(app, [*args, "--output", str(root / "out"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    return {"root": root, "images": images, "out": root / "out", "output": res.output, "generator": generator}


@slow
def test_a_folder_becomes_meshes_and_bad_images_fail_alone(batch: dict):
    import trimesh

    out = batch["out"]
    record = json.loads((out / "generation.json").read_text())
    uids = record["uids"]
    assert record["finished"] and record["layout"] == "hy3d"
    assert record["counts"] == {"ok": 2, "no_mesh": 0, "failed": 2, "skipped": 0}, uids
    assert {u: e["status"] for u, e in uids.items()} == {"a": "ok", "b": "ok", "c": "failed", "d": "failed"}
    assert "c/000.png" in uids["c"]["reason"] and "no alpha" in uids["c"]["reason"]
    assert "d/000.png" in uids["d"]["reason"] and "not a readable image" in uids["d"]["reason"]
    for uid, prompt in (("a", "two straps"), ("b", "a zipper")):
        mesh = trimesh.load(out / uid / "000.glb", force="mesh")
        assert len(mesh.faces) > 0
        shape = json.loads((out / uid / "work" / "shape.json").read_text())
        assert shape["prompt"].endswith(f"The back shows {prompt}.") and shape["mesh"] == str(out / uid / "000.glb")
        assert (out / uid / "work" / "back.png").is_file() and (out / uid / "work" / "occupancy.npz").is_file()
        assert uids[uid]["seconds"] > 0
    assert not (out / "c").exists() and not (out / "d").exists()  # refused before any work
    lines = (out / "generation.json").read_text().splitlines()
    assert sum('"c": {' in line and "no alpha" in line for line in lines) == 1  # one line per uid
    assert "2 meshes, 0 without a mesh, 2 failed of 4 uids" in batch["output"]


@slow
def test_a_second_run_keeps_finished_uids(batch: dict):
    from know3d.pipeline.generate_batch import generate_batch

    out = batch["out"]
    before = {u: os.stat(out / u / "000.glb").st_mtime_ns for u in ("a", "b")}
    prompts = read_prompts(batch["root"] / "prompts.json")  # the same inputs: nothing left to generate
    summary = generate_batch(batch["images"], out, batch["generator"], prompts=prompts)
    assert summary.counts == {"ok": 2, "no_mesh": 0, "failed": 2, "skipped": 2}
    assert {u: os.stat(out / u / "000.glb").st_mtime_ns for u in ("a", "b")} == before
    assert read_record(out)["a"]["skipped"] and read_record(out)["a"]["seconds"] > 0


@slow
def test_the_output_is_what_eval_shapes_reads(batch: dict, tmp_path: Path):
    import trimesh

    gt = tmp_path / "gt"
    for uid in ("a", "b"):
        (gt / uid).mkdir(parents=True)
        trimesh.creation.box(extents=(0.6, 0.6, 0.6)).export(gt / uid / "000.glb")
    args = ["eval", "shapes", "--pred", str(batch["out"]), "--images", str(batch["images"]), "--gt", str(gt)]
    sets = ["geometry.samples=5000", "report.renders=false", "mlflow.enabled=false"]
    res = CliRunner().invoke(
        app, [*args, "--no-semantic", "--output", str(tmp_path / "ev"), *(a for s in sets for a in ("--set", s))]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["errors"] == 0, summary
    results = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "ev" / "results").glob("*.json")}
    assert sorted(u for u, r in results.items() if "geometry" in r) == ["a", "b"]
