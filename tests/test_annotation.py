"""Annotation: output contract, parts backend, OpenAI-compatible client against a local server."""

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from know3d.annotation.base import PairRequest
from know3d.annotation.config import AnnotateConfig
from know3d.annotation.openai_backend import OpenAIAnnotator
from know3d.annotation.parts import back_parts, part_phrases
from know3d.annotation.schema import AnnotationError, parse_components, validate_components
from know3d.annotation.stage import AnnotationCache, annotate_assets, cache_key

# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "raw, expected, repaired",
    [
        ('["a handle", "two straps"]', ["a handle", "two straps"], False),
        ('```json\n["a handle"]\n```', ["a handle"], True),
        (
            "Sure! Here you go: ['a zipper pocket', 'a curved handle'] Hope it helps.",
            ["a zipper pocket", "a curved handle"],
            True,
        ),
        ('["a handle", "a lid",]', ["a handle", "a lid"], True),
        ('{"components": ["a spout"]}', ["a spout"], False),
    ],
)
def test_almost_json_is_repaired(raw: str, expected: list[str], repaired: bool):
    parsed = parse_components(raw)
    assert parsed.components == expected and parsed.repaired == repaired


@pytest.mark.parametrize("raw", ["no list here", "[1, 2]", "", "[unclosed"])
def test_garbage_is_rejected(raw: str):
    with pytest.raises(AnnotationError):
        parse_components(raw)


def test_validation_rules():
    assert validate_components(["A handle.", "a handle", "  two   straps "], 4, 5) == ["A handle", "two straps"]
    with pytest.raises(AnnotationError, match="at most 3 words"):
        validate_components(["a very long padded shoulder strap"], 4, 3)
    with pytest.raises(AnnotationError, match="talks about the picture"):
        validate_components(["the back view of a mug"], 4, 8)
    with pytest.raises(AnnotationError, match="at most 2"):
        validate_components(["a", "b", "c"], 2, 3)
    with pytest.raises(AnnotationError, match="empty"):
        validate_components(["", " . "], 2, 3)


# --------------------------------------------------------------------------- parts


def test_part_phrases_group_twins_and_skip_meaningless_names():
    names = [
        "shoulder_strap_left",
        "shoulder_strap_right",
        "wheel_front_left",
        "wheel_front_right",
        "battery_cover",
        "lens",
        "vents",
        "1",
        "Cylinder.003",
        "mesh_0",
        "eye_left",
    ]
    assert part_phrases(names) == [
        "two shoulder straps",
        "two front wheels",
        "a battery cover",
        "a lens",
        "vents",
        "an eye",
    ]


def test_back_parts_thresholds():
    front = {"body": 1000, "logo": 200}
    back = {"body": 900, "handle": 300, "speck": 3, "logo": 5}
    assert back_parts(front, back, 10_000, 0.002, 1.5) == ["handle"]
    assert back_parts(front, back, 10_000, 0.0, 1.0) == ["handle", "speck"]
    assert back_parts(front, {}, 10_000, 0.002, 1.5) == []


@pytest.fixture(scope="module")
def procedural_rendered(tmp_path_factory) -> tuple[Path, list[dict]]:
    from know3d.rendering.config import ProceduralSourceConfig
    from know3d.rendering.sources.procedural import ProceduralSource

    tmp = tmp_path_factory.mktemp("parts")
    records, _ = ProceduralSource(ProceduralSourceConfig(num_assets=3), tmp / "assets").discover()
    return tmp, _render([Path(r.uri) for r in records], tmp / "work", 96, [r.to_json() for r in records])


def _render(paths: list[Path], work: Path, resolution: int, records: list[dict] | None = None) -> list[dict]:
    """Render in a child process: Mesa's llvmpipe and triton's LLVM (imported by transformers)
    cannot share a process, so this test process never opens a GL context."""
    from know3d.pipeline.config import BuildConfig
    from know3d.rendering.assets import file_sha256
    from know3d.rendering.isolation import IsolatedRenderer
    from know3d.rendering.process import read_asset

    cfg = BuildConfig.model_validate({"render": {"resolution": resolution}})
    summaries = []
    with IsolatedRenderer(cfg, work) as iso:
        for path, record in zip(paths, records or [{}] * len(paths)):
            sha = file_sha256(path)
            assert iso.run(path, sha, record).status == "ok"
            summaries.append(read_asset(work, sha))
    return summaries


def test_parts_backend_finds_the_mug_handle_from_the_back(procedural_rendered):
    tmp, summaries = procedural_rendered
    cfg = AnnotateConfig(backend="parts")
    records, metrics = annotate_assets(summaries, tmp / "work", tmp / "cache", cfg)
    by_name = {s["meta"]["name"]: s for s in summaries}
    mug = by_name["mug_000"]
    # pair 0: front at azimuth 0 (the logo side), back at 180 (the handle side)
    assert records[(mug["sha256"], 0)]["components"] == ["a handle"]
    assert "a handle" not in records[(mug["sha256"], 3)]["components"]  # 90 vs 270: handle seen from the side
    backpack = by_name["backpack_000"]
    assert records[(backpack["sha256"], 0)]["components"][0] == "two shoulder straps"
    assert metrics["annotate.pairs"] == 18 and metrics["annotate.cached"] == 0
    # a second run costs nothing: every record comes from the cache
    again, metrics2 = annotate_assets(summaries, tmp / "work", tmp / "cache", cfg)
    assert again == records and metrics2["annotate.cached"] == 18


def test_parts_backend_on_real_assets(real_dir: Path, tmp_path: Path):
    summaries = _render([real_dir / n for n in ("Duck.glb", "pins.glb", "simple_pole.glb")], tmp_path, 64)
    records, metrics = annotate_assets(summaries, tmp_path, tmp_path / "cache", AnnotateConfig(backend="parts"))
    assert len(records) == 18
    assert all(r["status"] in ("ok", "no_parts") for r in records.values())
    # meaningless node names ("2", "dowel#1:10:6:8:7") never become descriptions
    assert all(not any(ch.isdigit() for c in r["components"] for ch in c) for r in records.values())


# --------------------------------------------------------------------------- openai


class ScriptedServer:
    """An OpenAI-compatible server on 127.0.0.1 answering from a script per request."""

    def __init__(self, script):
        self.script = script  # callable(request_index, body) -> (status, text_or_json, delay_s)
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        index = self.calls
        self.calls += 1
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, content, delay = self.script(index, body)
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        if status != 200:
            return web.Response(status=status, text="error")
        return web.json_response({"choices": [{"message": {"content": content}}], "usage": {"completion_tokens": 7}})

    def __enter__(self) -> "ScriptedServer":
        started = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_post("/v1/chat/completions", self.handle)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _cfg(url: str, **api) -> AnnotateConfig:
    return AnnotateConfig(
        backend="openai", max_retries=1, openai={"base_url": url, "backoff_s": 0.01, "timeout_s": 2.0, **api}
    )


def _requests(n: int) -> list[PairRequest]:
    return [PairRequest(f"k{i}", b"\x89PNG front", b"\x89PNG back") for i in range(n)]


def _pair_of(body: dict) -> str:
    """The test puts each pair's name in its part hint, which the prompt carries."""
    text = body["messages"][0]["content"][0]["text"]
    return text.rsplit("include: ", 1)[1].rstrip(".")


def test_openai_backend_outcomes(monkeypatch):
    monkeypatch.setenv("KNOW3D_TEST_KEY", "sk-secret-123")
    seen: dict[str, int] = {}

    def script(i, body):
        pair = _pair_of(body)
        seen[pair] = seen.get(pair, 0) + 1
        answers = {
            "valid": (200, '["a curved handle", "a lid"]', 0),
            "fenced": (200, '```json\n["a zipper pocket"]\n```', 0),
            "garbage": (200, "I cannot see anything.", 0),
            "bad_then_ok": (200, '["a strap"]' if len(body["messages"]) > 1 else "nope", 0),
            "http500": (500, "", 0),
            "http429_once": (429, "", 0) if seen[pair] == 1 else (200, '["a spout"]', 0),
            "slow": (200, '["a knob"]', 5.0),
        }
        return answers[pair]

    names = ["valid", "fenced", "garbage", "bad_then_ok", "http500", "http429_once", "slow"]
    with ScriptedServer(script) as server:
        annotator = OpenAIAnnotator(_cfg(server.url, api_key_env="KNOW3D_TEST_KEY", max_attempts=3))
        results = annotator.annotate([PairRequest(n, b"f", b"b", [n]) for n in names])
    out = dict(zip(names, results))
    assert len(results) == len(names)  # every pair ends with exactly one record
    assert out["valid"]["status"] == "ok" and out["valid"]["components"] == ["a curved handle", "a lid"]
    assert out["fenced"]["status"] == "repaired" and out["fenced"]["components"] == ["a zipper pocket"]
    assert out["garbage"]["status"] == "annotation_failed" and out["garbage"]["components"] == []
    assert out["garbage"]["raw"] == "I cannot see anything." and "JSON list" in out["garbage"]["error"]
    assert out["bad_then_ok"]["status"] == "repaired" and out["bad_then_ok"]["attempts"] == 2
    assert out["http500"]["status"] == "annotation_failed" and "HTTP 500 after 3 attempts" in out["http500"]["error"]
    assert out["http429_once"]["status"] == "ok" and seen["http429_once"] == 2
    assert out["slow"]["status"] == "annotation_failed" and "Timeout" in out["slow"]["error"]
    # garbage is asked max_retries + 1 times with the validation error; HTTP 500 max_attempts times
    assert seen["garbage"] == 2 and seen["http500"] == 3 and seen["slow"] == 3
    retry = [b for b in server.bodies if _pair_of(b) == "garbage"][1]
    assert "That answer is invalid" in retry["messages"][-1]["content"]
    # the key travels only in the Authorization header and never reaches the results
    assert all(h.get("Authorization") == "Bearer sk-secret-123" for h in server.headers)
    assert "sk-secret" not in json.dumps(results)
    # both images travel as data URLs
    images = server.bodies[0]["messages"][0]["content"][1:]
    assert [i["image_url"]["url"][:22] for i in images] == ["data:image/png;base64,"] * 2


def test_openai_concurrency_is_bounded():
    with ScriptedServer(lambda i, body: (200, '["a lid"]', 0.05)) as server:
        annotator = OpenAIAnnotator(_cfg(server.url, concurrency=4))
        start = time.perf_counter()
        results = annotator.annotate(_requests(24))
        elapsed = time.perf_counter() - start
    assert [r["status"] for r in results] == ["ok"] * 24
    assert server.max_in_flight == 4 and annotator.max_in_flight == 4
    assert elapsed >= 6 * 0.05  # 24 requests, 4 at a time, 50 ms each


def test_cache_key_and_cache(tmp_path: Path):
    a = AnnotateConfig(backend="openai")
    assert cache_key("f", "b", a) == cache_key("f", "b", a)
    assert cache_key("f", "b", a) != cache_key("f", "b", a.model_copy(update={"prompt_version": "v2"}))
    assert cache_key("f", "b", a) != cache_key("b", "f", a)
    cache = AnnotationCache(tmp_path)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, {"components": ["x"]})
    assert cache.get("ab" * 32) == {"components": ["x"]}
    (tmp_path / "ab" / f"{'cd' * 32}.json").write_text("{torn")
    assert cache.get("cd" * 32) is None


def test_main_body_is_not_a_component():
    from know3d.annotation.parts import main_body

    back = {"body": 9000, "handle": 800}
    assert back_parts({}, back, 100_000, 0.002, 1.5, frozenset({"body"})) == ["handle"]
    assert back_parts({}, back, 100_000, 0.002, 1.5) == ["body", "handle"]
    # the body is the part seen most over all views, even where another part dominates one view
    views = [{"body": 500, "screen": 4000}, {"body": 3000, "panel": 2000}, {"body": 3000, "panel": 100}]
    assert main_body(views) == "body"
    assert main_body([{"only": 5}]) is None


def test_review_gallery_escapes_untrusted_text(tmp_path: Path):
    import io

    import webdataset as wds
    from PIL import Image

    from know3d.annotation.review import write_gallery

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(buf, format="PNG")
    meta = {
        "asset_id": "a" * 64,
        "name": "mug",
        "pair_index": 0,
        "front_camera": {"azimuth_deg": 0},
        "back_camera": {"azimuth_deg": 180},
        "components": ["<script>alert(1)</script>"],
        "annotation": {"status": "annotation_failed", "backend": "openai", "raw": "<b>raw</b>"},
    }
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "front.png": buf.getvalue(), "back.png": buf.getvalue(), "json": meta})
    assert write_gallery([tmp_path / "s.tar"], tmp_path / "g.html", num_samples=2) == 2
    page = (tmp_path / "g.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;raw&lt;/b&gt;" in page and "annotation_failed: 2" in page
    assert page.count('<div class="card">') == 2 and page.count("data:image/png;base64,") == 4


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tests.tiny_qwen_vl import build_tiny_qwen_vl

    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen-vl"))


def test_transformers_backend_gibberish_goes_through_retries_to_failure(tiny_vl: Path, procedural_rendered):
    from know3d.annotation.transformers_backend import TransformersAnnotator

    tmp, summaries = procedural_rendered
    cfg = AnnotateConfig(
        backend="transformers",
        max_retries=1,
        transformers={
            "model": str(tiny_vl),
            "batch_size": 4,
            "max_new_tokens": 12,
            "min_pixels": 4 * 28 * 28,
            "max_pixels": 16 * 28 * 28,
        },
    )
    annotator = TransformersAnnotator(cfg)  # loads through from_pretrained (safetensors), like the real model
    calls = []
    generate = annotator._generate
    annotator._generate = lambda conv, imgs: calls.append(len(conv)) or generate(conv, imgs)
    records, metrics = annotate_assets(summaries[:1], tmp / "work", tmp / "vlm-cache", cfg, annotator.annotate)
    assert len(records) == 6
    assert metrics["annotate.failed"] + metrics["annotate.ok"] + metrics["annotate.repaired"] == 6
    failed = [r for r in records.values() if r["status"] == "annotation_failed"]
    assert len(failed) == metrics["annotate.failed"] >= 5  # random weights: (almost surely) no valid JSON
    for r in failed:
        assert r["components"] == [] and r["attempts"] == 2 and r["raw"] and r["error"]
        assert r["backend"] == "transformers" and r["model"] == str(tiny_vl)
    assert calls == [4, 2, 4, 2][: len(calls)] and sum(calls) == 6 + len(failed)  # batches of 4, retry of failures
    assert metrics["annotate.tokens_per_s"] > 0
    # cached: the second run asks the model nothing
    again, metrics2 = annotate_assets(summaries[:1], tmp / "work", tmp / "vlm-cache", cfg, annotator.annotate)
    assert metrics2["annotate.cached"] == 6 and len(calls) == 4 and again == records


@pytest.mark.gpu
def test_real_qwen25_vl_describes_the_back_of_a_backpack(procedural_rendered):
    """With real weights (KNOW3D_QWEN25_VL = local folder) on a GPU: the straps are named."""
    import os

    import torch

    path = os.environ.get("KNOW3D_QWEN25_VL")
    if not path or not torch.cuda.is_available():
        pytest.skip("needs a GPU and KNOW3D_QWEN25_VL pointing at Qwen2.5-VL weights")
    from know3d.annotation.transformers_backend import TransformersAnnotator

    tmp, summaries = procedural_rendered
    backpack = next(s for s in summaries if s["meta"]["name"] == "backpack_000")
    cfg = AnnotateConfig(backend="transformers", transformers={"model": path})
    records, _ = annotate_assets(
        [backpack], tmp / "work", tmp / "real-vlm-cache", cfg, TransformersAnnotator(cfg).annotate
    )
    assert records[(backpack["sha256"], 0)]["status"] in ("ok", "repaired")
    assert any("strap" in c for c in records[(backpack["sha256"], 0)]["components"])


class EchoAnnotator:
    """A backend defined outside the package: one class, one registry line."""

    calls: list[int] = []

    @staticmethod
    def replicas(cfg: AnnotateConfig) -> None:
        return None

    @staticmethod
    def wants_parts(cfg: AnnotateConfig) -> bool:
        return True

    @staticmethod
    def model_name(cfg: AnnotateConfig) -> str:
        return "echo-1"

    @staticmethod
    def cache_salt(cfg: AnnotateConfig) -> str:
        return ""

    def __init__(self, cfg: AnnotateConfig) -> None:
        self.cfg = cfg

    def annotate(self, requests: list[PairRequest]) -> list[dict]:
        EchoAnnotator.calls.append(len(requests))
        return [{"components": [p.upper() for p in r.hint], "status": "ok"} for r in requests]


def test_a_registered_annotator_is_used_by_the_stage(procedural_rendered, monkeypatch):
    from know3d.annotation import base

    tmp, summaries = procedural_rendered
    monkeypatch.setitem(base.ANNOTATORS, "parts", f"{__name__}:EchoAnnotator")
    records, metrics = annotate_assets(summaries, tmp / "work", tmp / "echo-cache", AnnotateConfig(backend="parts"))
    mug = next(s for s in summaries if s["meta"]["name"] == "mug_000")
    assert records[(mug["sha256"], 0)]["components"] == ["A HANDLE"]
    assert records[(mug["sha256"], 0)]["model"] == "echo-1"
    assert sum(EchoAnnotator.calls) == metrics["annotate.requests"] > 0  # one batched call for the uncached pairs


def test_unknown_annotator_is_named_with_the_known_ones():
    from know3d.annotation.base import annotator_class

    assert annotator_class("none") is None
    with pytest.raises(ValueError, match="unknown annotation backend 'blip'.*parts, openai, transformers"):
        annotator_class("blip")
