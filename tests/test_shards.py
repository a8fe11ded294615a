"""Shards: deterministic plans and bytes, split by asset, readable by webdataset."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from know3d.core.shards import ShardConfig, iter_shard_keys, sample_key, shard_sha256, write_index
from know3d.pipeline.config import BuildConfig
from know3d.rendering.assets import file_sha256
from know3d.rendering.process import read_asset, render_asset
from know3d.rendering.render import ViewRenderer
from know3d.rendering.shards import plan_shards, reusable_entry, split_of, write_shard

NAMES = ["Duck.glb", "BoxTextured.glb", "monkey.glb", "testplate.glb"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, real_dir: Path) -> tuple[Path, list[dict]]:
    work = tmp_path_factory.mktemp("work")
    cfg = BuildConfig.model_validate({"render": {"resolution": 48}})
    renderer = ViewRenderer(48, "egl")
    summaries = []
    for name in NAMES:
        path = real_dir / name
        rec = {"key": f"local:{name}", "source": "local", "license": "CC-BY-4.0", "meta": {"name": name}}
        summaries.append(render_asset(path, file_sha256(path), rec, cfg, work, renderer))
    renderer.close()
    return work, summaries


def test_split_is_by_asset_and_deterministic():
    shas = [f"{i:064x}" for i in range(2000)]
    splits = [split_of(s, 0, 0.1) for s in shas]
    assert splits == [split_of(s, 0, 0.1) for s in shas]
    assert 0.07 < splits.count("val") / len(shas) < 0.13
    assert all(split_of(s, 0, 0.0) == "train" for s in shas[:50])
    assert all(split_of(s, 0, 1.0) == "val" for s in shas[:50])


def test_plan_respects_limits_and_keeps_pairs_of_an_asset_in_one_split(work):
    work_dir, summaries = work
    cfg = ShardConfig(max_samples=5, val_fraction=0.5)
    plans = plan_shards(work_dir, summaries, cfg, seed=3)
    assert sum(len(p.members) for p in plans) == 6 * len(NAMES)
    assert all(len(p.members) <= 5 for p in plans)
    split_by_asset: dict[str, set] = {}
    for p in plans:
        for sha, _ in p.members:
            split_by_asset.setdefault(sha, set()).add(p.split)
    assert all(len(s) == 1 for s in split_by_asset.values())
    assert [p.name for p in plans] == [p.name for p in plan_shards(work_dir, list(reversed(summaries)), cfg, 3)]
    # byte limit: every shard but single-sample ones stays under it
    small = plan_shards(work_dir, summaries, ShardConfig(max_bytes=1 << 16, max_samples=1000), seed=3)
    assert len(small) > len(plan_shards(work_dir, summaries, ShardConfig(max_samples=1000), seed=3))
    assert all(p.est_bytes <= 1 << 16 or len(p.members) == 1 for p in small)


def test_shards_are_byte_identical_and_read_back(work, tmp_path: Path):
    work_dir, summaries = work
    cfg = ShardConfig(max_samples=10, val_fraction=0.0)
    plans = plan_shards(work_dir, summaries, cfg, seed=0)
    a = [write_shard(work_dir, tmp_path / "a", p) for p in plans]
    b = [write_shard(work_dir, tmp_path / "b", p) for p in plans]
    assert [e["sha256"] for e in a] == [e["sha256"] for e in b]
    assert all(shard_sha256(tmp_path / "a" / e["name"]) == e["sha256"] for e in a)

    urls = [str(tmp_path / "a" / e["name"]) for e in a]
    # default decoders: json is parsed, PNGs stay bytes (PIL's "pil" decoder would drop alpha)
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 6 * len(NAMES)
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    by_sha = {s["sha256"]: s for s in summaries}
    for s in samples:
        meta = s["json"]
        summary = by_sha[meta["asset_id"]]
        assert s["__key__"] == sample_key(meta["asset_id"], "backview", meta["pair_index"])
        assert {"asset_id", "source", "license", "pair_index", "profile", "front_camera", "back_camera"} <= meta.keys()
        assert meta["license"] == "CC-BY-4.0" and meta["source"] == "local" and meta["components"] == []
        f, b = summary["pairs"][meta["pair_index"]]
        assert meta["front_camera"] == summary["cameras"][f] and meta["back_camera"] == summary["cameras"][b]
        assert (meta["back_camera"]["azimuth_deg"] - meta["front_camera"]["azimuth_deg"]) % 360 == 180
        front, back = Image.open(io.BytesIO(s["front.png"])), Image.open(io.BytesIO(s["back.png"]))
        assert front.size == (48, 48) and back.mode == "RGBA"
        assert {"front.depth.png", "back.depth.png", "front.normal.png", "back.mask.png"} <= s.keys()
        assert Image.open(io.BytesIO(s["front.depth.png"])).mode.startswith("I;16")
        on_disk = Image.open(work_dir / summary["sha256"][:2] / summary["sha256"] / "rgba" / f"{b:03d}.png")
        assert np.array_equal(np.asarray(back), np.asarray(on_disk))


def test_optional_channels_can_be_left_out(real_dir: Path, tmp_path: Path):
    """The shards ship the optional images the renderer wrote: render.outputs is their one switch."""
    cfg = BuildConfig.model_validate(
        {"render": {"resolution": 48, "outputs": {"depth": False, "normal": False, "mask": False}}}
    )
    work_dir = tmp_path / "work"
    path = real_dir / NAMES[0]
    renderer = ViewRenderer(48, "egl")
    summaries = [render_asset(path, file_sha256(path), {"key": "local:x"}, cfg.render_job(), work_dir, renderer)]
    renderer.close()
    plan = plan_shards(work_dir, summaries, ShardConfig(), seed=0)[0]
    entry = write_shard(work_dir, tmp_path, plan)
    import tarfile

    with tarfile.open(tmp_path / entry["name"]) as tar:
        suffixes = {m.name.split(".", 1)[1] for m in tar}
    assert suffixes == {"front.png", "back.png", "json"}
    assert iter_shard_keys(tmp_path / entry["name"]) == [
        sample_key(summaries[0]["sha256"], "backview", i) for i in range(6)
    ]


def test_reuse_only_when_content_is_unchanged(work, tmp_path: Path):
    work_dir, summaries = work
    cfg = ShardConfig()
    plan = plan_shards(work_dir, summaries, cfg, seed=0)[0]
    records = {summaries[0]["sha256"]: {"license": "a"}}
    entry = write_shard(work_dir, tmp_path, plan, records)
    index = write_index(tmp_path, [entry], {})
    previous = {e["name"]: e for e in index["shards"]}
    assert reusable_entry(tmp_path, work_dir, plan, previous, records) == entry
    assert reusable_entry(tmp_path, work_dir, plan, previous, {summaries[0]["sha256"]: {"license": "b"}}) is None
    # another render setting (another work folder) never reuses the shard
    assert reusable_entry(tmp_path, work_dir.with_name("other-fingerprint"), plan, previous, records) is None
    (tmp_path / entry["name"]).write_bytes(b"truncated")
    assert reusable_entry(tmp_path, work_dir, plan, previous, records) is None
    assert json.loads((tmp_path / "shard_index.json").read_text())["num_samples"] == len(plan.members)
    assert read_asset(work_dir, summaries[0]["sha256"])["license"] == "CC-BY-4.0"


def test_sample_images_above_the_bound_are_refused_before_decoding_by_every_reader(tmp_path: Path):
    """The gallery and the contact sheet open a shard's PNGs through the same bounded opener as
    training (tests/test_training_data.py): the header's size is checked, nothing is decoded."""
    from know3d.annotation.review import _thumb
    from know3d.core.shards import MAX_SAMPLE_PIXELS, open_image
    from tests.test_training_data import _huge_png_header

    bomb = _huge_png_header(5000, 5000)
    assert 5000 * 5000 > MAX_SAMPLE_PIXELS
    with pytest.raises(ValueError, match=r"k_0 front.png: 5000x5000 is larger than \d+ pixels \(not decoded\)"):
        open_image(bomb, "k_0 front.png")
    with pytest.raises(ValueError, match="front view: 5000x5000"):
        _thumb(bomb, 64, "front view")
    with open_image(_huge_png_header(4096, 4096), "at the bound") as img:
        assert img.size == (4096, 4096)
    from know3d.rendering.contact_sheet import collect_pairs

    shard = tmp_path / "train-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        meta = json.dumps({"asset_id": "a", "pair_index": 0}).encode()
        w.write({"__key__": "a_0", "front.png": bomb, "back.png": bomb, "json": meta})
    with pytest.raises(ValueError, match="a_0 front.png: 5000x5000"):
        collect_pairs([shard], 1)


def test_the_generators_front_reader_uses_the_same_bound(tmp_path: Path):
    from know3d.training.generator.data import GeneratorDataError, PairRef, read_front
    from tests.test_training_data import _huge_png_header

    shard = tmp_path / "front.bin"
    shard.write_bytes(b"xx" + _huge_png_header(5000, 5000))
    ref = PairRef("k_0", str(shard), 2, shard.stat().st_size - 2, "a", ())
    with pytest.raises(GeneratorDataError, match=r"k_0.front.png: 5000x5000 is larger than \d+ pixels"):
        read_front(ref)
