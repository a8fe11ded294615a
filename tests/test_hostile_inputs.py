"""Hostile and odd inputs, without Ray: one regression test per defect of issue 10 that can be
shown on a single file or function (the build-level ones are in test_build_hardening.py)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from know3d.annotation.config import AnnotateConfig
from know3d.core.errors import describe_exception
from know3d.core.runtime import ClusterUnreachable, check_reachable
from know3d.rendering.assets import AssetError, AssetFiltered, inspect_asset, load_asset
from know3d.rendering.config import LoadConfig, LocalSourceConfig
from know3d.rendering.ingest import Ingested, ingest_one
from know3d.rendering.process import usable_pairs
from know3d.rendering.sources.base import AssetRecord
from know3d.rendering.sources.local import LocalSource
from tests.hostile import MUTATIONS, good_assets, malformed_assets, write_good

SECRET = "TOPSECRET-4f1c"


def _plain(reason: str) -> bool:
    return "\n" not in reason and "\x1b" not in reason and "Traceback" not in reason and len(reason) < 300


# --------------------------------------------------------------------------- 1. per-asset isolation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_mutation_is_refused_with_one_plain_reason_naming_the_file(tmp_path: Path, seed: int):
    """Property: good files load; each malformed file (type change, truncation, bad index, bad
    URI, deep nesting) raises exactly the asset's own error, naming the file, in plain text."""
    for path in good_assets(tmp_path, 4):
        assert load_asset(path, LoadConfig()).num_faces > 0
    bad = malformed_assets(tmp_path, 2 * len(MUTATIONS), seed)
    assert {m.name for _, m in bad} == {m.name for m in MUTATIONS}
    for path, mutation in bad:
        with pytest.raises((AssetError, AssetFiltered)) as exc:
            load_asset(path, LoadConfig())
        reason = str(exc.value)
        assert reason.startswith(f"{path.name}: "), (mutation.name, reason)
        assert _plain(reason), (mutation.name, reason)


class _Source:
    """A source whose fetch raises whatever it is told to (the kinds a hub client can raise)."""

    name = "test"

    def __init__(self, error: BaseException | None, path: Path) -> None:
        self.error, self.path = error, path

    def discover(self):
        return [], []

    def fetch(self, record: AssetRecord) -> Path:
        if self.error is not None:
            raise self.error
        return self.path


@pytest.mark.parametrize(
    "error",
    [
        KeyError("x"),
        TypeError("unhashable"),
        RecursionError(),
        IndexError(3),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
        AttributeError("no"),
    ],
)
def test_ingest_one_turns_any_exception_into_this_assets_failure(tmp_path: Path, error: BaseException):
    record = AssetRecord("hub:abc", "test", "https://example.org/files/abc.glb")
    out = ingest_one(_Source(error, tmp_path), record, LoadConfig())
    assert out.status == "failed" and out.key == "hub:abc"
    assert out.reason.startswith(f"abc.glb: {type(error).__name__}") and _plain(out.reason)


def test_wrong_types_in_a_gltf_fail_that_asset_only(tmp_path: Path):
    """The reported case: ``"buffers": 5``, an image URI that is a list, a NUL byte in a URI and
    JSON nested 200k deep each give one failed row; the good asset beside them is ok."""
    good = write_good(tmp_path, 0, "glb")
    cases = {"buffers": 5, "images": [{"uri": ["a.png"]}], "nul": None, "deep": None}
    rows = [ingest_one(_Source(None, good), AssetRecord("local:good", "local", str(good)), LoadConfig())]
    for name, value in cases.items():
        path = write_good(tmp_path, 1, "gltf").parent.rename(tmp_path / name) / "model.gltf"
        doc = json.loads(path.read_text())
        if name == "nul":
            doc["buffers"][0]["uri"] = "model\x00.bin"
        elif name != "deep":
            doc[name] = value
        text = json.dumps(doc)
        if name == "deep":
            text = text[:-1] + ', "extras": ' + "[" * 200_000 + "]" * 200_000 + "}"
        path.write_text(text)
        rows.append(ingest_one(_Source(None, path), AssetRecord(f"local:{name}", "local", str(path)), LoadConfig()))
    assert rows[0].status == "ok"
    reasons = {r.key: r.reason for r in rows[1:]}
    assert all(r.status == "failed" for r in rows[1:])
    assert reasons["local:buffers"] == "model.gltf: glTF 'buffers' is a number, expected an array"
    assert reasons["local:images"] == "model.gltf: glTF images[0].uri is an array, expected a string"
    assert reasons["local:nul"] == "model.gltf: buffers[0].uri contains control characters (refused)"
    assert reasons["local:deep"] == "model.gltf: glTF is nested too deeply to parse"


def test_describe_exception_keeps_kind_and_positions_but_no_quoted_content():
    exc = ValueError(f"could not convert string to float: '{SECRET}' \x1b[31mat line 3\x1b[0m\n\"{SECRET}\"")
    assert describe_exception(exc) == "ValueError: could not convert string to float: '…'"
    cases = [
        ValueError(f"could not convert string to float: '{SECRET}\\'\"LEAK'"),  # mixed quotes
        NotImplementedError(f"only GLTF 2 is supported not `1.0 {SECRET}`"),  # backticks
        FileNotFoundError(2, "No such file or directory", f"data:{SECRET}"),  # OS errors: errno text only
        KeyError(SECRET),
        ValueError(f"bad uri data:{SECRET} in buffer"),  # unquoted URI-like tokens
    ]
    for exc in cases:
        text = describe_exception(exc)
        assert SECRET not in text and "LEAK" not in text, text
    assert describe_exception(cases[2]) == "FileNotFoundError: No such file or directory"
    assert describe_exception(OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2b>")) == "OSError"
    assert describe_exception(ValueError("cannot identify image file <_io.BytesIO object at 0x7f3a2b>")).endswith(
        "at 0x…>"
    )  # no memory address: the same file gives the same reason in every run
    try:
        json.loads('{"a": [1, 2')
    except ValueError as exc:
        assert describe_exception(exc) == "JSONDecodeError: invalid JSON at line 1 column 12"
    assert len(describe_exception(RuntimeError("x" * 1000))) < 200


# --------------------------------------------------------------------------- 4. symlinks and secrets


def test_main_file_symlink_out_of_the_input_is_refused_and_its_content_never_quoted(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.obj").write_text(f"v {SECRET} 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    inputs = tmp_path / "inputs"
    (inputs / "ok").mkdir(parents=True)
    (inputs / "evil.obj").symlink_to(outside / "secret.obj")
    good = write_good(inputs / "ok", 0, "obj")
    (inputs / "ok" / "alias.obj").symlink_to(good)  # a link that stays inside is fine
    source = LocalSource(LocalSourceConfig(input=[str(inputs)]))
    records, filtered = source.discover()
    by_key = {r.key: r for r in records}
    assert sorted(by_key) == [
        "local:inputs/evil.obj",
        "local:inputs/ok/alias.obj",
        "local:inputs/ok/good_00_obj/model.obj",
    ]
    rows = {k: ingest_one(source, r, LoadConfig()) for k, r in by_key.items()}
    assert rows["local:inputs/evil.obj"] == Ingested(
        "local:inputs/evil.obj",
        "failed",
        reason="evil.obj: symlink to a file outside the input folder (refused)",
        seconds=rows["local:inputs/evil.obj"].seconds,
    )
    assert rows["local:inputs/ok/alias.obj"].status == "ok"
    # the OBJ check itself never quotes the offending token
    with pytest.raises(AssetError) as exc:
        load_asset(outside / "secret.obj", LoadConfig())
    assert SECRET not in str(exc.value) and "line 1" in str(exc.value)


@pytest.mark.parametrize("uri", ["../" + SECRET + ".bin", "/" + SECRET, f"file:///{SECRET}", "missing-" + SECRET])
def test_reference_reasons_name_the_position_not_the_uri(tmp_path: Path, uri: str):
    path = write_good(tmp_path, 0, "gltf")
    doc = json.loads(path.read_text())
    doc["buffers"][0]["uri"] = uri
    path.write_text(json.dumps(doc))
    with pytest.raises(AssetError) as exc:
        load_asset(path, LoadConfig())
    assert SECRET not in str(exc.value) and str(exc.value).startswith("model.gltf: buffers[0].uri ")


# --------------------------------------------------------------------------- 5. blank views


def test_pairs_with_a_nearly_blank_view_are_left_out_with_the_reason():
    summary = {"pairs": [[0, 2], [1, 3]], "coverage": [0.2, 0.0005, 0.3, 0.25]}
    kept, dropped = usable_pairs(summary, 0.002)
    assert kept == [0]
    assert dropped == [(1, "pair 1: front view 1 covers 0.05% of the image < 0.20%")]
    assert usable_pairs(summary, 0.0)[0] == [0, 1]


# --------------------------------------------------------------------------- 6. determinism


def _multi_primitive_gltf(folder: Path) -> Path:
    """An unnamed node whose mesh has two primitives: trimesh names the second frame with
    ``random`` — the source of the random part names in shards."""
    scene = trimesh.Scene()
    a, b = trimesh.creation.box(), trimesh.creation.icosphere()
    b.apply_translation([2, 0, 0])
    scene.add_geometry(a, geom_name="a")
    scene.add_geometry(b, geom_name="b")
    files = scene.export(file_type="gltf")
    doc = json.loads(files["model.gltf"])
    doc["meshes"] = [{"primitives": [p for m in doc["meshes"] for p in m["primitives"]]}]
    doc["nodes"] = [{"mesh": 0}]
    doc["scenes"] = [{"nodes": [0]}]
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "model.gltf").write_text(json.dumps(doc))
    return folder / "model.gltf"


def test_part_names_are_the_same_in_every_process(tmp_path: Path):
    path = _multi_primitive_gltf(tmp_path / "multi")
    code = (
        "import json, sys; from pathlib import Path; from know3d.pipeline.config import LoadConfig; "
        "from know3d.rendering.assets import load_asset; "
        "print(json.dumps(load_asset(Path(sys.argv[1]), LoadConfig()).part_names))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        .stdout.strip()
        .splitlines()[-1]
        for _ in range(3)
    ]
    assert len(json.loads(runs[0])) == 2
    assert runs[0] == runs[1] == runs[2]


def test_pyrender_scene_nodes_iterate_in_insertion_order():
    from know3d.rendering.render import configure_gl, deterministic_scene

    configure_gl(os.environ.get("PYOPENGL_PLATFORM", "egl"))
    import pyrender

    scene = deterministic_scene(pyrender.Scene())
    meshes = [pyrender.Mesh.from_trimesh(trimesh.creation.box()) for _ in range(50)]
    nodes = [scene.add(m, name=f"n{i}") for i, m in enumerate(meshes)]
    lights = [scene.add(pyrender.DirectionalLight()) for _ in range(5)]
    assert list(scene.mesh_nodes) == nodes
    assert list(scene.directional_light_nodes) == lights
    scene.remove_node(nodes[3])
    assert list(scene.mesh_nodes) == nodes[:3] + nodes[4:]


# --------------------------------------------------------------------------- 7. annotation cache


def test_identical_pairs_make_one_request_and_identical_records_on_rerun(tmp_path: Path):
    from know3d.annotation.stage import annotate_assets
    from know3d.rendering.process import asset_dir

    sha = "ab" * 32
    folder = asset_dir(tmp_path / "work", sha) / "rgba"
    folder.mkdir(parents=True)
    from PIL import Image

    for view in range(4):  # a symmetric asset: every view looks the same
        Image.new("RGBA", (8, 8), (200, 10, 10, 255)).save(folder / f"{view:03d}.png")
    summary = {"sha256": sha, "pairs": [[0, 2], [1, 3]], "coverage": [0.5] * 4}
    calls: list[int] = []

    def runner(requests: list) -> list[dict]:
        calls.append(len(requests))
        return [{"components": [f"answer {len(calls)}"], "status": "ok"} for _ in requests]

    cfg = AnnotateConfig(backend="openai")
    first, m1 = annotate_assets([summary], tmp_path / "work", tmp_path / "cache", cfg, runner)
    assert calls == [1] and m1["annotate.requests"] == 1 and m1["annotate.shared"] == 1
    assert first[(sha, 0)] == first[(sha, 1)] and first[(sha, 0)]["components"] == ["answer 1"]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    again, m2 = annotate_assets([summary], tmp_path / "work", tmp_path / "cache", cfg, runner)
    assert calls == [1] and again == first and m2["annotate.cached"] == 2


# --------------------------------------------------------------------------- 8. explicit outcomes


def test_unsupported_files_are_explicit_filtered_rows(tmp_path: Path):
    root = tmp_path / "in"
    good = write_good(root, 0, "obj")
    (root / "scene.dae").write_text("<COLLADA/>")
    (root / "pack.zip").write_bytes(b"PK\x03\x04")
    (root / "notes").write_text("x")
    (good.parent / "texture.png").write_bytes(b"")  # a sidecar: belongs to its asset
    (root / ".DS_Store").write_bytes(b"")
    (root / "gone.glb").symlink_to(root / "deleted.glb")  # dangling
    source = LocalSource(LocalSourceConfig(input=[str(root)]))
    records, filtered = source.discover()
    assert [r.key for r in records] == ["local:in/gone.glb", f"local:in/{good.parent.name}/model.obj"]
    gone = ingest_one(source, records[0], LoadConfig())
    assert (gone.status, gone.reason) == ("failed", "gone.glb: file not found")
    reasons = {f.record.key: (f.filter, f.detail) for f in filtered}
    assert sorted(reasons) == ["local:in/notes", "local:in/pack.zip", "local:in/scene.dae"]
    assert reasons["local:in/scene.dae"][0] == "unsupported_format"
    assert reasons["local:in/scene.dae"][1].startswith(
        "scene.dae: '.dae' is not a supported mesh format (supported: glb"
    )
    assert "archives ('.zip') are not unpacked" in reasons["local:in/pack.zip"][1]
    # a file named on the command line always gets a row, even a texture
    records, filtered = LocalSource(LocalSourceConfig(input=[str(good.parent / "texture.png")])).discover()
    assert records == [] and [f.filter for f in filtered] == ["unsupported_format"]


def test_point_cloud_is_filtered_not_failed(tmp_path: Path):
    trimesh.PointCloud(np.random.default_rng(0).random((40, 3))).export(tmp_path / "cloud.ply")
    record = AssetRecord("local:cloud", "local", str(tmp_path / "cloud.ply"))
    with pytest.raises(AssetFiltered) as exc:
        load_asset(tmp_path / "cloud.ply", LoadConfig())
    assert exc.value.filter == "no_triangles"
    assert ingest_one(_Source(None, tmp_path / "cloud.ply"), record, LoadConfig()).status == "ok"  # header: 0 faces


# --------------------------------------------------------------------------- 9. face caps before parsing


def _huge_headers(folder: Path) -> dict[str, Path]:
    """Files that *declare* 8M faces but hold almost nothing: filtered from the header, so the
    parser (which would fail, or allocate gigabytes for the real thing) never runs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["ply"] = folder / "big.ply"
    files["ply"].write_bytes(
        b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
        b"property float y\nproperty float z\nelement face 8000000\n"
        b"property list uchar int vertex_indices\nend_header\n" + b"\0" * 64
    )
    files["off"] = folder / "big.off"
    files["off"].write_text("OFF\n# comment\n3 8000000 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    files["stl"] = folder / "big.stl"
    n = 300
    files["stl"].write_bytes(b"\0" * 80 + struct.pack("<I", n) + b"\0" * (50 * n))
    files["stl_ascii"] = folder / "big_ascii.stl"
    facet = "facet normal 0 0 1\nouter loop\nvertex 0 0 0\nvertex 1 0 0\nvertex 0 1 0\nendloop\nendfacet\n"
    files["stl_ascii"].write_text("solid x\n" + facet * n + "endsolid x\n")
    gltf = write_good(folder, 1, "gltf")
    doc = json.loads(gltf.read_text())
    doc["accessors"][doc["meshes"][0]["primitives"][0]["indices"]]["count"] = 24_000_000
    gltf.write_text(json.dumps(doc))
    files["gltf"] = gltf
    files["obj"] = folder / "big.obj"
    files["obj"].write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 1 1 0\n" + "f 1 2 3 4\n" * 200)
    return files


@pytest.mark.parametrize("kind", ["ply", "off", "stl", "stl_ascii", "gltf", "obj"])
def test_face_cap_is_applied_from_the_header_before_parsing(tmp_path: Path, kind: str, monkeypatch):
    path = _huge_headers(tmp_path)[kind]
    cfg = LoadConfig(max_faces=8_000_000 if kind in ("ply", "off", "gltf") else 250)
    cfg.max_faces -= 1
    monkeypatch.setattr(trimesh, "load_scene", lambda *a, **k: pytest.fail("parsed despite the header"))
    with pytest.raises(AssetFiltered) as exc:
        load_asset(path, cfg)
    assert exc.value.filter == "max_faces"
    declared = {"obj": 400, "stl": 300, "stl_ascii": 300}.get(kind, 8_000_000)
    if kind == "obj":
        assert str(exc.value).startswith(f"big.obj: {cfg.max_faces + 1} faces (counted up to line")
    else:
        assert str(exc.value).startswith(f"{path.name}: {declared} faces (")


def test_header_counts_below_the_cap_still_parse(tmp_path: Path):
    for path in good_assets(tmp_path, 4):
        assert inspect_asset(path, LoadConfig(max_faces=10_000)) is not None
        load_asset(path, LoadConfig(max_faces=10_000))


# --------------------------------------------------------------------------- 2/3/10. usage errors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_one_clear_error(tmp_path: Path):
    port = _closed_port()
    with pytest.raises(ClusterUnreachable, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port} .*within 2 s"):
        check_reachable(f"127.0.0.1:{port}", 2.0)
    with pytest.raises(ClusterUnreachable, match="not host:port"):
        check_reachable("nonsense", 2.0)


@pytest.mark.parametrize("reply", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_something_else_listening_is_not_taken_for_a_cluster(reply: bytes | None):
    """A port that accepts but stays silent (ray.init would hang there for minutes) or answers
    in another protocol fails within the connect timeout."""
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        if reply is not None:
            conn.recv(64)
            conn.sendall(reply)
        time.sleep(3)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    start = time.monotonic()
    message = "timed out" if reply is None else "answers, but not as a Ray cluster"
    with pytest.raises(ClusterUnreachable, match=message):
        check_reachable(f"127.0.0.1:{port}", 1.0)
    assert time.monotonic() - start < 2.5
    server.close()


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "know3d.pipeline.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_cli_address_pointing_at_nothing_fails_fast_and_leaves_nothing(tmp_path: Path):
    asset = write_good(tmp_path / "in", 0, "glb")
    res = _cli(
        "data",
        "build",
        "--source",
        "local",
        "--input",
        str(asset),
        "--output",
        str(tmp_path / "out"),
        "--address",
        f"127.0.0.1:{_closed_port()}",
        "--set",
        "ray.connect_timeout_s=3",
        cwd=tmp_path,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:")
    assert "Traceback" not in res.stderr and "Failed to connect to GCS" not in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ("file", "exists and is not a folder"),
        ("/proc/know3d-x", "cannot create folders in /proc"),
        ("file/sub", "is not a folder"),
    ],
)
def test_cli_bad_output_is_a_short_error(tmp_path: Path, target: str, message: str):
    (tmp_path / "file").write_text("x")
    asset = write_good(tmp_path / "in", 0, "glb")
    output = str(tmp_path / target) if not target.startswith("/") else target
    res = _cli("data", "build", "--source", "local", "--input", str(asset), "--output", output, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_refuse_a_file_as_output_too(tmp_path: Path, command: str):
    (tmp_path / "file").write_text("x")
    if command == "train":
        args = [
            "train",
            "backview",
            str(Path(__file__).resolve().parents[1] / "configs" / "backview_debug.yaml"),
            "--shards",
            str(tmp_path),
            "--output",
            str(tmp_path / "file"),
        ]
    else:
        write_good(tmp_path / "pred", 0, "obj").parent.rename(tmp_path / "pred" / "uid0")
        (tmp_path / "pred" / "uid0" / "model.obj").rename(tmp_path / "pred" / "uid0" / "000.obj")
        args = [
            "eval",
            "shapes",
            "--pred",
            str(tmp_path / "pred"),
            "--no-semantic",
            "--output",
            str(tmp_path / "file"),
            "--set",
            "mlflow.enabled=false",
        ]
    res = _cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-1500:]
    assert res.stderr.strip().splitlines()[-1] == f"error: --output {tmp_path / 'file'}: exists and is not a folder"
    assert "Traceback" not in res.stderr


def test_generate_without_lora_says_what_to_give(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "front.png")
    res = _cli("generate", "backview", "--image", str(tmp_path / "front.png"), cwd=tmp_path)
    assert res.returncode == 2
    assert "give --lora DIR (a trained back-view LoRA) or --model NAME" in res.stderr


def test_generate_with_the_base_model_alone(tmp_path: Path):
    from PIL import Image

    from know3d.training.generate import generate_backview

    Image.new("RGB", (48, 48), "red").save(tmp_path / "front.png")
    path = generate_backview(
        tmp_path / "front.png",
        tmp_path / "back.png",
        None,
        model="debug:tiny-qwen-image-edit",
        image_size=32,
        steps=2,
        device="cpu",
    )
    with Image.open(path) as img:
        assert img.size == (32, 32)
        assert np.asarray(img).std() > 0  # an actual image, not a blank


def test_a_torn_failure_record_means_render_again(tmp_path: Path):
    from know3d.rendering.process import Rendered, read_failure, remember_failure

    path = tmp_path / "_failed" / "x.json"
    remember_failure(path, Rendered("failed", reason="x.glb: no faces"))
    assert read_failure(path) == Rendered("failed", reason="x.glb: no faces")
    path.write_text('{"status": "fail')  # killed mid-write by an older version
    assert read_failure(path) is None
    assert read_failure(tmp_path / "missing.json") is None
    assert not list(path.parent.glob(".*.tmp"))


def test_one_broken_pair_does_not_stop_the_annotation_of_the_others(tmp_path: Path):
    from PIL import Image

    from know3d.annotation.stage import annotate_assets
    from know3d.rendering.process import asset_dir

    summaries = []
    for n, sha in enumerate(("cd" * 32, "ef" * 32)):
        folder = asset_dir(tmp_path / "work", sha) / "rgba"
        folder.mkdir(parents=True)
        for view in range(2):
            Image.new("RGBA", (8, 8), (n * 100, view * 100, 10, 255)).save(folder / f"{view:03d}.png")
        summaries.append(
            {
                "sha256": sha,
                "pairs": [[0, 1]],
                "coverage": [0.5, 0.5],
                "resolution": 8,
                "part_pixels": [{"body": 10}, {"body": 10, "strap": 5}],
            }
        )
    (asset_dir(tmp_path / "work", summaries[0]["sha256"]) / "rgba" / "001.png").unlink()  # a lost view
    records, metrics = annotate_assets(
        summaries, tmp_path / "work", tmp_path / "cache", AnnotateConfig(backend="parts")
    )
    broken, fine = records[(summaries[0]["sha256"], 0)], records[(summaries[1]["sha256"], 0)]
    assert broken["status"] == "annotation_failed" and broken["error"].startswith("pair 0: FileNotFoundError")
    assert fine["status"] in ("ok", "no_parts") and metrics["annotate.failed"] == 1


# --------------------------------------------------------------------------- found in review


def _glb(chunks: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<II", len(data), kind) + data for kind, data in chunks)
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


def test_glb_chunks_are_checked_as_the_parser_reads_them(tmp_path: Path):
    """The parser takes chunk 0 as the document: a decoy second JSON chunk must not hide it."""
    real = json.dumps({"asset": {"version": "2.0"}, "buffers": [{"uri": "../outside.bin", "byteLength": 4}]}).encode()
    decoy = json.dumps({"asset": {"version": "2.0"}}).encode()
    pad = lambda b: b + b" " * (-len(b) % 4)
    (tmp_path / "two.glb").write_bytes(_glb([(0x4E4F534A, pad(real)), (0x4E4F534A, pad(decoy))]))
    (tmp_path / "bin_first.glb").write_bytes(_glb([(0x004E4942, b"\0" * 8), (0x4E4F534A, pad(decoy))]))
    with pytest.raises(AssetError, match="two.glb: GLB has more than one JSON chunk"):
        inspect_asset(tmp_path / "two.glb", LoadConfig())
    with pytest.raises(AssetError, match="bin_first.glb: GLB does not start with a JSON chunk"):
        inspect_asset(tmp_path / "bin_first.glb", LoadConfig())


def test_repeated_material_references_cost_one_check(tmp_path: Path):
    import time

    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "t.png")
    (tmp_path / "a.mtl").write_text("newmtl a\n" + "map_Kd t.png\n" * 2000)
    (tmp_path / "m.obj").write_text("mtllib a.mtl\n" * 2000 + "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    start = time.perf_counter()
    sidecars = inspect_asset(tmp_path / "m.obj", LoadConfig())
    assert sorted(p.name for p in sidecars) == ["a.mtl", "t.png"]
    assert time.perf_counter() - start < 2.0  # was quadratic: minutes for a few KB


def test_names_with_spaces_are_part_of_the_identity(tmp_path: Path):
    from PIL import Image

    from know3d.rendering.assets import asset_sha256

    shas = []
    for color in ("red", "blue"):
        folder = tmp_path / color
        folder.mkdir()
        Image.new("RGB", (4, 4), color).save(folder / "my tex.png")
        (folder / "my mat.mtl").write_text("newmtl a\nmap_Kd my tex.png\n")
        (folder / "m.obj").write_text("mtllib my mat.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nusemtl a\nf 1/1 2/1 3/1\n")
        sidecars = inspect_asset(folder / "m.obj", LoadConfig())
        assert sorted(p.name for p in sidecars) == ["my mat.mtl", "my tex.png"]
        shas.append(asset_sha256(folder / "m.obj", sidecars))
    assert shas[0] != shas[1]  # different textures: not duplicates


def test_data_uris_unicode_names_and_bad_accessors(tmp_path: Path, monkeypatch):
    from PIL import Image

    path = write_good(tmp_path / "a", 0, "gltf")
    doc = json.loads(path.read_text())
    doc["buffers"][0]["uri"] = f"data:{SECRET}"  # not base64: a parser would read it as a file name
    path.write_text(json.dumps(doc))
    with pytest.raises(AssetError) as exc:
        load_asset(path, LoadConfig())
    assert SECRET not in str(exc.value) and "buffers[0].uri is an absolute path or URL" in str(exc.value)
    embedded = tmp_path / "b"
    embedded.mkdir()
    (embedded / "m.gltf").write_bytes(
        trimesh.Scene(trimesh.creation.box()).export(file_type="gltf", embed_buffers=True)["model.gltf"]
    )
    assert load_asset(embedded / "m.gltf", LoadConfig()).num_faces == 12  # base64 data URIs are fine
    cjk = tmp_path / "c"
    from tests.test_assets import _gltf_with_image_uri

    cjk.mkdir()
    Image.new("RGB", (8, 8), "blue").save(cjk / "テクスチャ\u30001.png")
    assert load_asset(_gltf_with_image_uri(cjk, "テクスチャ\u30001.png"), LoadConfig()).num_faces == 12
    for name, change in {
        "nodata": {"count": 30_000_000},
        "view": {"bufferView": -1},
        "bool": {"bufferView": True},
    }.items():
        path = write_good(tmp_path / name, 1, "gltf")
        doc = json.loads(path.read_text())
        doc["accessors"].append({"componentType": 5126, "type": "VEC3", "count": 3, **change})
        path.write_text(json.dumps(doc))
        monkeypatch.setattr(trimesh, "load_scene", lambda *a, **k: pytest.fail("parsed"))
        with pytest.raises((AssetError, AssetFiltered)) as exc:
            load_asset(path, LoadConfig())
        if name == "nodata":  # would be allocated as 30M zeros
            assert exc.value.filter == "max_faces" and "an accessor declares 30000000 elements" in str(exc.value)
        else:
            assert "accessors[" in str(exc.value) and "bufferView does not name a buffer view" in str(exc.value)
        monkeypatch.undo()


def test_off_point_cloud_is_filtered(tmp_path: Path):
    (tmp_path / "pc.off").write_text("OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n")
    with pytest.raises(AssetFiltered) as exc:
        load_asset(tmp_path / "pc.off", LoadConfig())
    assert exc.value.filter == "no_triangles"


def test_odd_names_and_globs_in_the_local_source(tmp_path: Path):
    good = write_good(tmp_path / "set1", 0, "gltf")
    (good.parent / "model.gltf").rename(good.parent / "caf\udce9.gltf")  # not UTF-8, with a .bin sidecar
    (good.parent / "gone.gltf").symlink_to(tmp_path / "deleted.gltf")  # dangling, found by the glob too
    source = LocalSource(LocalSourceConfig(input=[str(tmp_path / "set?" / "*" / "*.gltf")]))
    records, _ = source.discover()
    assert len(records) == 2
    rows = {Path(r.uri).name: ingest_one(source, r, LoadConfig()) for r in records}
    assert rows["caf\udce9.gltf"].status == "ok", rows  # glob root without wildcards: not a symlink out
    assert rows["gone.gltf"].reason == "gone.gltf: file not found"
    hidden = write_good(tmp_path / "h", 1, "glb").rename(tmp_path / "h" / ".hidden.glb")
    records, _ = LocalSource(LocalSourceConfig(input=[str(hidden)])).discover()
    assert [r.key for r in records] == ["local:.hidden.glb/.hidden.glb"]


def test_output_name_too_long_is_a_usage_error(tmp_path: Path):
    from know3d.core.runtime import OutputUnusable, check_output

    with pytest.raises(OutputUnusable, match="cannot be used"):
        check_output(str(tmp_path / ("a" * 300) / "out"))


def test_inputs_with_the_same_folder_name_do_not_collide(tmp_path: Path):
    a = write_good(tmp_path / "a" / "models", 0, "glb")
    b = write_good(tmp_path / "b" / "models", 0, "glb")
    records, _ = LocalSource(LocalSourceConfig(input=[str(a.parents[1]), str(b.parents[1])])).discover()
    assert sorted(r.key for r in records) == [
        "local:models/good_00_glb/model.glb",
        "local:models~2/good_00_glb/model.glb",
    ]
    assert {r.uri for r in records} == {str(a), str(b)}


def test_a_dead_vlm_worker_is_not_cached(tmp_path: Path):
    from PIL import Image

    from know3d.annotation.base import worker_failure
    from know3d.annotation.stage import annotate_assets
    from know3d.rendering.process import asset_dir

    sha = "12" * 32
    folder = asset_dir(tmp_path / "work", sha) / "rgba"
    folder.mkdir(parents=True)
    for view in range(2):
        Image.new("RGBA", (8, 8), (view * 90, 0, 0, 255)).save(folder / f"{view:03d}.png")
    summary = {"sha256": sha, "pairs": [[0, 1]], "coverage": [0.5, 0.5]}
    answers = [
        lambda reqs: [worker_failure("ActorDiedError")] * len(reqs),
        lambda reqs: [{"components": ["a handle"], "status": "ok"}] * len(reqs),
    ]
    cfg = AnnotateConfig(backend="openai")
    first, _ = annotate_assets([summary], tmp_path / "work", tmp_path / "cache", cfg, answers[0])
    assert first[(sha, 0)]["status"] == "annotation_failed"
    second, metrics = annotate_assets([summary], tmp_path / "work", tmp_path / "cache", cfg, answers[1])
    assert second[(sha, 0)]["components"] == ["a handle"] and metrics["annotate.cached"] == 0


def test_the_image_bound_is_the_configured_one(tmp_path: Path):
    """PIL refuses headers above twice its default (~179 M pixels) by itself; the check must
    apply load.max_image_pixels instead, in both directions."""
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("1", (20000, 10000)).save(folder / "tex.png")  # 200 M pixels, a few KB on disk
    (folder / "m.mtl").write_text("newmtl a\nmap_Kd tex.png\n")
    (folder / "m.obj").write_text("mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nusemtl a\nf 1/1 2/1 3/1\n")
    assert [p.name for p in inspect_asset(folder / "m.obj", LoadConfig(max_image_pixels=250_000_000))] == [
        "m.mtl",
        "tex.png",
    ]
    with pytest.raises(AssetError, match=r"tex.png: image is 20000x10000, above the decoding bound"):
        inspect_asset(folder / "m.obj", LoadConfig())
