"""The training data stream: deterministic, rank-disjoint, resumable mid-epoch."""

import io
import json

import pytest
import webdataset as wds
from PIL import Image

from know3d.training.data import PairStream, StreamState, decode_image, shards_for


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Six small shards of 10 pairs each, in the data build's sample layout."""
    folder = tmp_path_factory.mktemp("shards")
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(buf, format="PNG")
    urls = []
    for s in range(6):
        url = str(folder / f"train-{s:06d}.tar")
        with wds.TarWriter(url) as w:
            for i in range(10):
                meta = {"asset_id": f"{s:02d}{i:02d}", "pair_index": i % 6, "components": ["a handle"] if i % 2 else []}
                w.write(
                    {
                        "__key__": f"s{s}_{i}",
                        "front.png": buf.getvalue(),
                        "back.png": buf.getvalue(),
                        "json": json.dumps(meta).encode(),
                    }
                )
        urls.append(url)
    return urls


def test_order_is_deterministic_and_changes_per_epoch(shards):
    stream = PairStream(shards, seed=3, shuffle_buffer=16)
    a, b = list(stream.keys(0)), list(stream.keys(0))
    assert a == b and len(a) == 60 and len(set(a)) == 60
    assert list(stream.keys(1)) != a and sorted(stream.keys(1)) == sorted(a)
    assert list(PairStream(shards, seed=4, shuffle_buffer=16).keys(0)) != a


def test_ranks_read_disjoint_shards_covering_all(shards):
    parts = [set(PairStream(shards, seed=0, rank=r, world_size=3).keys(2)) for r in range(3)]
    assert sum(len(p) for p in parts) == 60 and len(set().union(*parts)) == 60
    assert sorted(sum((shards_for(shards, 0, 2, r, 3) for r in range(3)), [])) == sorted(shards)
    with pytest.raises(ValueError):
        shards_for(shards, 0, 0, 3, 3)


def test_resume_mid_epoch_yields_exactly_the_rest(shards):
    stream = PairStream(shards, seed=1, rank=1, world_size=2, shuffle_buffer=8)
    full = [s["key"] for s in stream.iterate(StreamState(epoch=5))]
    state = StreamState(epoch=5)
    first = []
    for sample in stream.iterate(state):
        first.append(sample["key"])
        if len(first) == 11:
            break
    saved = StreamState(**state.to_dict())  # as a checkpoint would store it
    rest = [s["key"] for s in PairStream(shards, seed=1, rank=1, world_size=2, shuffle_buffer=8).iterate(saved)]
    assert first + rest == full and saved.consumed == len(full)


def test_decoded_sample(shards):
    sample = next(PairStream(shards, seed=0, image_size=8).iterate(StreamState()))
    assert sample["front"].shape == (3, 8, 8) and sample["back"].dtype.name == "float32"
    assert -1.0 <= sample["front"].min() and sample["front"].max() <= 1.0
    # 50 % red over white: R stays 1, G and B are halfway
    px = decode_image(_png((255, 0, 0, 128)))
    assert px[0, 0, 0] == pytest.approx(1.0) and px[1, 0, 0] == pytest.approx(127 / 127.5 - 1, abs=0.01)


def _png(rgba) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), rgba).save(buf, format="PNG")
    return buf.getvalue()


def test_no_shards_is_an_error():
    with pytest.raises(ValueError, match="no shards"):
        PairStream([], seed=0)


def test_keys_select_exactly_those_pairs_every_epoch(shards):
    wanted = ["s0_3", "s2_7", "s5_0"]
    stream = PairStream(shards, seed=0, shuffle_buffer=4, keys=wanted)
    for epoch in range(3):
        assert sorted(stream.keys(epoch)) == sorted(wanted)
    # split over ranks: disjoint, complete
    parts = [list(PairStream(shards, seed=0, rank=r, world_size=2, keys=wanted).keys(0)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(wanted) and not set(parts[0]) & set(parts[1])


def test_max_pairs_takes_the_first_pairs_in_shard_order(shards):
    stream = PairStream(shards, seed=9, shuffle_buffer=8, max_pairs=4)
    assert sorted(stream.keys(0)) == ["s0_0", "s0_1", "s0_2", "s0_3"] == sorted(stream.keys(7))
    both = PairStream(shards, seed=0, keys=["s4_1", "s1_2", "s3_3"], max_pairs=2)
    assert sorted(both.keys(0)) == ["s1_2", "s3_3"]  # keys first, then the first 2 of them in shard order
    state = StreamState()
    decoded = list(stream.iterate(state))
    assert len(decoded) == 4 and decoded[0]["front"].shape == (3, 16, 16) and state.consumed == 4


def test_bad_selection_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="s9_9"):
        list(PairStream(shards, seed=0, keys=["s0_1", "s9_9"]).keys(0))
    with pytest.raises(ValueError, match="2 selected pairs cannot feed 3 workers"):
        list(PairStream(shards, seed=0, rank=0, world_size=3, max_pairs=2).keys(0))


def test_max_pairs_per_asset_picks_distinct_objects(tmp_path):
    url = str(tmp_path / "train-000000.tar")
    with wds.TarWriter(url) as w:
        for asset in ("a", "b", "c"):
            for pair in range(3):
                w.write(
                    {
                        "__key__": f"{asset}_{pair}",
                        "front.png": _png((0, 0, 0, 255)),
                        "back.png": _png((0, 0, 0, 255)),
                        "json": json.dumps({"asset_id": asset, "pair_index": pair}).encode(),
                    }
                )
    assert sorted(PairStream([url], seed=0, max_pairs_per_asset=1).keys(0)) == ["a_0", "b_0", "c_0"]
    assert sorted(PairStream([url], seed=0, max_pairs_per_asset=2, max_pairs=3).keys(0)) == ["a_0", "a_1", "b_0"]


def _huge_png_header(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's first bytes)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_an_oversized_image_in_a_shard_is_refused_before_decoding(tmp_path):
    from know3d.core.shards import MAX_SAMPLE_PIXELS

    bomb = _huge_png_header(8192, 8192)
    assert Image.open(io.BytesIO(bomb)).size == (8192, 8192)  # the header is what PIL reads
    assert 8192 * 8192 > MAX_SAMPLE_PIXELS
    url = str(tmp_path / "train-000000.tar")
    with wds.TarWriter(url) as w:
        meta = json.dumps({"asset_id": "a", "pair_index": 0}).encode()
        w.write({"__key__": "a_0", "front.png": bomb, "back.png": _png((0, 0, 0, 255)), "json": meta})
    with pytest.raises(
        ValueError, match=r"train-000000.tar: a_0 front.png: 8192x8192 is larger than .* \(not decoded\)"
    ):
        next(PairStream([url], seed=0).iterate(StreamState()))
    assert decode_image(_png((0, 0, 0, 255)), 4).shape == (3, 4, 4)  # ordinary samples still decode
