"""Hub sources against caches seeded in the exact layout each library reads.

Nothing here mocks ``objaverse.load_objects``/``load_annotations`` or ``hf_hub_download``: the
real functions find the seeded files, and every network path is shut (``urlretrieve`` raises,
the HF hub runs in offline mode), so a wrong layout fails loudly instead of downloading.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import objaverse
import pytest

from know3d.rendering.config import LocalSourceConfig, ObjaverseSourceConfig, SourceConfig, TexVerseSourceConfig
from know3d.rendering.sources import build_source
from know3d.rendering.sources.base import FetchError
from know3d.rendering.sources.objaverse import ObjaverseSource
from know3d.rendering.sources.texverse import TexVerseSource

_REPO_ROOT = Path(__file__).resolve().parents[1]


def _real_assets() -> Path:
    for shared in (_REPO_ROOT / "shared", _REPO_ROOT.parent / "shared"):
        candidate = shared / "assets" / "real"
        if (candidate / "Duck.glb").is_file():
            return candidate
    pytest.skip("shared/assets/real not available")


@pytest.fixture
def real() -> Path:
    return _real_assets()


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise OSError("network disabled in tests")


# --------------------------------------------------------------------------- objaverse

DUCK, BOX, MONKEY, GONE, POLE = (
    hashlib.md5(name.encode()).hexdigest() for name in ("duck", "box", "monkey", "gone", "pole")
)


def _ann(uid: str, name: str, license_: str, faces: int, cats: list[str], tags: list[str]) -> dict[str, Any]:
    """An annotation shaped like the real Sketchfab-derived ones (extra keys included)."""
    return {
        "uid": uid,
        "name": name,
        "license": license_,
        "faceCount": faces,
        "vertexCount": faces // 2,
        "categories": [{"name": c, "uri": f"https://api.sketchfab.com/v3/categories/{c}"} for c in cats],
        "tags": [{"name": t, "slug": t} for t in tags],
        "viewerUrl": f"https://sketchfab.com/3d-models/{uid}",
    }


def _write_gz_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(data, f)


@pytest.fixture
def objaverse_cache(tmp_path: Path, real: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``<tmp>/hf-objaverse-v1`` with two metadata shards; GONE's glb is not downloaded."""
    monkeypatch.setattr(urllib.request, "urlretrieve", _no_network)
    root = tmp_path / "hf-objaverse-v1"
    paths = {u: f"glbs/000-000/{u}.glb" for u in (DUCK, BOX, MONKEY, GONE)}
    paths[POLE] = f"glbs/000-001/{POLE}.glb"
    _write_gz_json(root / "object-paths.json.gz", paths)
    _write_gz_json(
        root / "metadata" / "000-000.json.gz",
        {
            DUCK: _ann(DUCK, "Duck", "by", 4212, ["animals-pets"], ["duck", "toy"]),
            BOX: _ann(BOX, "Box", "cc0", 12, ["furniture-home"], ["box"]),
            MONKEY: _ann(MONKEY, "Suzanne", "by-nc", 968, ["characters-creatures"], ["monkey"]),
            GONE: _ann(GONE, "Gone", "by", 100, ["animals-pets"], ["toy"]),
        },
    )
    _write_gz_json(root / "metadata" / "000-001.json.gz", {POLE: _ann(POLE, "Pole", "by-sa", 64, [], [])})
    for uid, src in ((DUCK, "Duck.glb"), (BOX, "BoxTextured.glb"), (MONKEY, "monkey.glb"), (POLE, "simple_pole.glb")):
        dst = root / paths[uid]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((real / src).read_bytes())
    return tmp_path


def _discover_objaverse(cache: Path, **kw: Any) -> tuple[list[str], dict[str, str]]:
    kept, filtered = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(cache), **kw)).discover()
    return [r.uri for r in kept], {f.record.uri: f.filter for f in filtered}


def test_objaverse_discover_shards_and_records(objaverse_cache: Path) -> None:
    before = objaverse._VERSIONED_PATH
    kept, filtered = ObjaverseSource(
        ObjaverseSourceConfig(download_dir=str(objaverse_cache), metadata_shards=["000-000"])
    ).discover()
    assert objaverse._VERSIONED_PATH == before  # the package global is restored
    assert [r.uri for r in kept] == sorted([DUCK, BOX, MONKEY, GONE]) and filtered == []
    duck = next(r for r in kept if r.uri == DUCK)
    assert duck.key == f"objaverse:{DUCK}" and duck.source == "objaverse" and duck.license == "by"
    assert duck.meta == {
        "uid": DUCK,
        "name": "Duck",
        "face_count": 4212,
        "categories": ["animals-pets"],
        "tags": ["duck", "toy"],
        "object_path": f"glbs/000-000/{DUCK}.glb",
    }
    json.dumps(duck.to_json())
    # No shards given: every shard of object-paths (only the two seeded ones are read).
    assert set(_discover_objaverse(objaverse_cache)[0]) == {DUCK, BOX, MONKEY, GONE, POLE}


@pytest.mark.parametrize(
    ("kw", "dropped"),
    [
        ({"licenses": ["by", "cc0", "by-sa"]}, {MONKEY: "license"}),
        ({"max_face_count": 1000}, {DUCK: "max_face_count"}),
        ({"categories": ["animals-pets"]}, {BOX: "categories", MONKEY: "categories", POLE: "categories"}),
        ({"tags": ["TOY"]}, {BOX: "tags", MONKEY: "tags", POLE: "tags"}),
        # The first failing filter names the drop: license before faces before categories.
        (
            {"licenses": ["cc0"], "max_face_count": 10, "categories": ["nothing"]},
            {DUCK: "license", MONKEY: "license", GONE: "license", POLE: "license", BOX: "max_face_count"},
        ),
    ],
)
def test_objaverse_filters(objaverse_cache: Path, kw: dict[str, Any], dropped: dict[str, str]) -> None:
    kept, filtered = _discover_objaverse(objaverse_cache, **kw)
    assert filtered == dropped
    assert set(kept) == {DUCK, BOX, MONKEY, GONE, POLE} - set(dropped)


def test_objaverse_uids_unknown_and_limit(objaverse_cache: Path, tmp_path: Path) -> None:
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text(f"# wanted\n{POLE}\nnot-a-uid\n{BOX}.glb\n")
    kept, filtered = _discover_objaverse(objaverse_cache, uids=[MONKEY], uids_file=str(uid_file))
    assert kept == [MONKEY, POLE, BOX]  # order of the request, '.glb' suffix tolerated
    assert filtered == {"not-a-uid": "unknown_uid"}
    kept, filtered = _discover_objaverse(
        objaverse_cache, uids=[MONKEY, POLE, BOX, DUCK], limit=2, licenses=["by", "cc0", "by-sa"]
    )
    assert kept == [POLE, BOX] and filtered == {MONKEY: "license"}  # beyond the limit: neither kept nor filtered


def test_objaverse_limit_reads_only_needed_shards(objaverse_cache: Path) -> None:
    # Shard 000-001 is gone and downloads fail: a limit met in shard 000-000 must not need it.
    (objaverse_cache / "hf-objaverse-v1" / "metadata" / "000-001.json.gz").unlink()
    assert _discover_objaverse(objaverse_cache, limit=3) == (sorted([DUCK, BOX, MONKEY, GONE])[:3], {})
    with pytest.raises(RuntimeError, match="metadata shards 000-000, 000-001.*no network"):
        _discover_objaverse(objaverse_cache)


def test_objaverse_fetch_returns_cached_file(objaverse_cache: Path, real: Path) -> None:
    kept, _ = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache))).discover()
    objaverse._VERSIONED_PATH = "/nonexistent"  # as in a fresh worker process: fetch must set it itself
    try:
        source = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache)))
        for uid, name in ((DUCK, "Duck.glb"), (POLE, "simple_pole.glb")):
            path = source.fetch(next(r for r in kept if r.uri == uid))
            assert path == objaverse_cache / "hf-objaverse-v1" / "glbs" / path.parent.name / f"{uid}.glb"
            assert path.read_bytes() == (real / name).read_bytes()
        with pytest.raises(FetchError, match=f"{GONE}.*no network"):
            source.fetch(next(r for r in kept if r.uri == GONE))
        assert objaverse._VERSIONED_PATH == "/nonexistent"
    finally:
        objaverse._VERSIONED_PATH = os.path.join(objaverse.BASE_PATH, "hf-objaverse-v1")


def test_objaverse_fetch_of_a_cached_file_skips_the_path_index(
    objaverse_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept, _ = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache))).discover()

    def no_reparse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_objects re-reads the whole object-paths index")

    monkeypatch.setattr(objaverse, "load_objects", no_reparse)
    source = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache)))
    assert source.fetch(next(r for r in kept if r.uri == DUCK)).is_file()
    with pytest.raises(FetchError, match="AssertionError"):  # not cached: the package is asked
        source.fetch(next(r for r in kept if r.uri == GONE))


def test_objaverse_fetch_refuses_an_object_path_outside_the_download_folder(
    objaverse_cache: Path, tmp_path: Path, real: Path
) -> None:
    """A tampered object-paths index cannot make any local file the asset."""
    kept, _ = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache))).discover()
    duck = next(r for r in kept if r.uri == DUCK)
    source = ObjaverseSource(ObjaverseSourceConfig(download_dir=str(objaverse_cache)))
    elsewhere = tmp_path / "private.glb"
    elsewhere.write_bytes(b"glTF")
    for bad in (str(elsewhere), "../../private.glb"):
        duck.meta["object_path"] = bad
        with pytest.raises(FetchError, match="points outside .* \\(refused\\)"):
            source.fetch(duck)


def test_objaverse_offline_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlretrieve", _no_network)
    with pytest.raises(RuntimeError, match="could not download objaverse object-paths.*no network") as info:
        ObjaverseSource(ObjaverseSourceConfig(download_dir=str(tmp_path))).discover()
    message = str(info.value)
    assert "\n" not in message  # one line: the CLI prints it after 'error: '
    assert "set source.objaverse.download_dir to a folder that already holds hf-objaverse-v1/" in message


# --------------------------------------------------------------------------- texverse

MAIN, ONE_K = "YiboZhang2001/TexVerse", "YiboZhang2001/TexVerse-1K"
MAIN_COMMIT, ONE_K_COMMIT = "1" * 40, "2" * 40


def _hf_put(cache: Path, repo_id: str, commit: str, filename: str, data: bytes) -> None:
    """Place a file as huggingface_hub stores it: a blob plus a relative snapshot symlink."""
    repo_dir = cache / f"datasets--{repo_id.replace('/', '--')}"
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)  # no trailing newline: the hub reads it verbatim


def _tv(uid: str, license_: str, faces: int, tex: int, pbr: str, res: list[str]) -> dict[str, Any]:
    sizes = {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}
    return {
        "name": uid.title(),
        "license": license_,
        "vertexCount": faces // 2,
        "faceCount": faces,
        "max_texture": tex,
        "pbrType": pbr,
        "isRigged": False,
        "categories": ["animals-pets"],
        "tags": ["toy"],
        "glb_paths": [f"glbs/glbs_{r}/000-000/{uid}_{sizes[r]}.glb" for r in res],
    }


@pytest.fixture
def hf_cache(tmp_path: Path, real: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # constants.HF_HUB_OFFLINE is read once at import; is_offline_mode() returns that constant.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf"
    metadata = {
        "duck": _tv("duck", "CC Attribution", 4212, 2048, "metalness", ["1k", "2k"]),
        "box": _tv("box", "CC0 Public Domain", 50_000, 1024, "specularGlossiness", ["1k"]),
        "monkey": _tv("monkey", "CC Attribution-NonCommercial", 968, 2048, "metalness", ["1k", "2k"]),
        "big": _tv("big", "CC Attribution", 500, 8192, "metalness", ["1k", "2k", "4k", "8k"]),
        "flat": _tv("flat", "CC Attribution", 64, 2048, "", ["2k"]),
    }
    captions = {
        "duck": "a yellow rubber duck",
        "box": {"caption": "a textured box"},
        "big": {"score": 0.9, "v": "big one"},  # no caption/text field: the first string
    }
    _hf_put(cache, MAIN, MAIN_COMMIT, "metadata.json", json.dumps(metadata).encode())
    _hf_put(cache, MAIN, MAIN_COMMIT, "caption.json", json.dumps(captions).encode())
    _hf_put(cache, MAIN, MAIN_COMMIT, "glbs/glbs_2k/000-000/duck_2048.glb", (real / "Duck.glb").read_bytes())
    # Different files per resolution, so a fetch from the wrong repo shows in the bytes.
    _hf_put(cache, ONE_K, ONE_K_COMMIT, "glbs/glbs_1k/000-000/duck_1024.glb", (real / "BoxTextured.glb").read_bytes())
    _hf_put(cache, ONE_K, ONE_K_COMMIT, "glbs/glbs_1k/000-000/box_1024.glb", (real / "monkey.glb").read_bytes())
    return cache


def _tv_source(cache: Path, **kw: Any) -> TexVerseSource:
    return TexVerseSource(TexVerseSourceConfig(cache_dir=str(cache), **kw))


def _discover_texverse(cache: Path, **kw: Any) -> tuple[list[str], dict[str, str]]:
    kept, filtered = _tv_source(cache, **kw).discover()
    return [r.meta["uid"] for r in kept], {f.record.meta["uid"]: f.filter for f in filtered}


def test_texverse_discover_records_and_captions(hf_cache: Path) -> None:
    kept, filtered = _tv_source(hf_cache).discover()
    assert [r.meta["uid"] for r in kept] == ["big", "box", "duck", "monkey"]
    assert {f.record.meta["uid"]: f.filter for f in filtered} == {"flat": "resolution"}
    duck = next(r for r in kept if r.meta["uid"] == "duck")
    assert duck.key == "texverse:duck" and duck.license == "CC Attribution"
    assert duck.uri == f"{ONE_K}::glbs/glbs_1k/000-000/duck_1024.glb"
    assert duck.meta == {
        "uid": "duck",
        "name": "Duck",
        "face_count": 4212,
        "max_texture": 2048,
        "caption": "a yellow rubber duck",
    }
    by_uid = {r.meta["uid"]: r.meta for r in kept}
    assert by_uid["box"]["caption"] == "a textured box" and by_uid["big"]["caption"] == "big one"
    assert "caption" not in by_uid["monkey"]
    assert "caption" not in _tv_source(hf_cache, with_captions=False).discover()[0][0].meta


@pytest.mark.parametrize(
    ("kw", "dropped"),
    [
        ({"licenses": ["cc attribution", "CC0 Public Domain"]}, {"monkey": "license", "flat": "resolution"}),
        ({"max_face_count": 10_000}, {"box": "max_face_count", "flat": "resolution"}),
        ({"max_texture": 4096}, {"big": "max_texture", "flat": "resolution"}),
        ({"require_pbr": True}, {"flat": "pbr"}),
        ({"resolution": "2k"}, {"box": "resolution"}),
        ({"resolution": "8k"}, {u: "resolution" for u in ("box", "duck", "flat", "monkey")}),
    ],
)
def test_texverse_filters(hf_cache: Path, kw: dict[str, Any], dropped: dict[str, str]) -> None:
    kept, filtered = _discover_texverse(hf_cache, **kw)
    assert filtered == dropped
    assert kept == sorted({"big", "box", "duck", "flat", "monkey"} - set(dropped))


def test_texverse_uids_unknown_limit_and_revision(hf_cache: Path) -> None:
    kept, filtered = _discover_texverse(hf_cache, uids=["monkey", "nope", "duck", "box"], limit=2)
    assert kept == ["monkey", "duck"] and filtered == {"nope": "unknown_uid"}
    # A pinned commit applies to the main repo only; the 1K repo keeps its own 'main'.
    source = _tv_source(hf_cache, revision=MAIN_COMMIT, uids=["duck"])
    (record,), _ = source.discover()
    assert source.fetch(record).parent.parent.parent.parent.name == ONE_K_COMMIT


def test_texverse_fetch(hf_cache: Path, real: Path) -> None:
    kept, _ = _tv_source(hf_cache).discover()
    by_uid = {r.meta["uid"]: r for r in kept}
    source = _tv_source(hf_cache)
    path = source.fetch(by_uid["duck"])
    assert path.read_bytes() == (real / "BoxTextured.glb").read_bytes()
    assert hf_cache / "datasets--YiboZhang2001--TexVerse-1K" / "snapshots" / ONE_K_COMMIT in path.parents
    assert source.fetch(by_uid["box"]).read_bytes() == (real / "monkey.glb").read_bytes()
    with pytest.raises(FetchError, match="big_1024.glb"):
        source.fetch(by_uid["big"])  # listed in metadata, not in the offline cache

    (duck_2k,), _ = _tv_source(hf_cache, resolution="2k", uids=["duck"]).discover()
    assert duck_2k.uri == f"{MAIN}::glbs/glbs_2k/000-000/duck_2048.glb"
    assert source.fetch(duck_2k).read_bytes() == (real / "Duck.glb").read_bytes()


def test_texverse_missing_captions_and_metadata(hf_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    (hf_cache / "datasets--YiboZhang2001--TexVerse" / "snapshots" / MAIN_COMMIT / "caption.json").unlink()
    with caplog.at_level(logging.WARNING, logger="know3d.rendering.sources.texverse"):
        kept, _ = _tv_source(hf_cache).discover()
    assert len(kept) == 4 and all("caption" not in r.meta for r in kept)
    assert "captions unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="metadata.json") as info:
        _tv_source(hf_cache.parent / "empty").discover()
    message = str(info.value)
    assert "\n" not in message
    assert f"not in the HF cache {hf_cache.parent / 'empty'} (HF_HUB_OFFLINE=1 is set)" in message
    assert "set source.texverse.cache_dir to the cache that holds it" in message


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hub client against a closed local port, retries without their sleeps: what an
    offline machine sees, in a second."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    endpoint = "http://127.0.0.1:9"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)


def _retry_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(("huggingface_hub", "urllib3"))]


def test_texverse_unreachable_hub_is_one_line(
    unreachable_hub: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KNOW3D_VERBOSE", "1")  # the control: with --verbose the retries show
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError):
        _tv_source(tmp_path / "hf").discover()
    assert any("Retrying" in m for m in _retry_records(caplog))
    monkeypatch.setenv("KNOW3D_VERBOSE", "0")
    caplog.clear()
    capfd.readouterr()
    level = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError) as info:
        _tv_source(tmp_path / "hf").discover()
    message = str(info.value)
    assert "\n" not in message
    assert "no network? with the files already in an HF cache, run with HF_HUB_OFFLINE=1" in message
    assert f"set source.texverse.cache_dir to that cache (now {tmp_path / 'hf'})" in message
    assert "(ConnectError: " in message  # the innermost cause, not the hub's multi-line advice
    assert _retry_records(caplog) == []
    err = capfd.readouterr().err
    assert "Retrying" not in err and "thrown while requesting" not in err
    assert logging.getLogger("huggingface_hub").level == level  # restored after discovery


# --------------------------------------------------------------------------- factory


def test_build_source_dispatch(tmp_path: Path) -> None:
    local = SourceConfig(kind="local", local=LocalSourceConfig(input=[str(tmp_path)]))
    assert build_source(local, tmp_path).name == "local"
    assert isinstance(build_source(SourceConfig(kind="objaverse"), tmp_path), ObjaverseSource)
    assert isinstance(build_source(SourceConfig(kind="texverse"), tmp_path), TexVerseSource)
    pytest.importorskip("know3d.rendering.sources.procedural")
    assert build_source(SourceConfig(kind="procedural"), tmp_path).name == "procedural"
