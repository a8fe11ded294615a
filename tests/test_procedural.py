"""The built-in procedural source: real GLB files, read back with trimesh and the project loader.

Nothing is mocked: objects are generated into temporary folders, exported, re-loaded from disk,
and checked for what the rest of the pipeline relies on — stable bytes (content hashes),
named parts with distinct colours (per-part masks), and front (+Z) / back (-Z) features that
really differ (front/back view pairs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from know3d.rendering.assets import load_asset
from know3d.rendering.config import LoadConfig, ProceduralSourceConfig
from know3d.rendering.sources.base import AssetRecord, FetchError
from know3d.rendering.sources.procedural import CATEGORIES, ProceduralSource, generate_asset, list_assets

NUM_ASSETS = 2 * len(CATEGORIES) + 3  # every category twice, a few three times


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProceduralSource, list[AssetRecord]]:
    source = ProceduralSource(ProceduralSourceConfig(num_assets=NUM_ASSETS, seed=3), tmp_path_factory.mktemp("a"))
    records, filtered = source.discover()
    assert filtered == []
    return source, records


def _scene(record: AssetRecord) -> trimesh.Scene:
    return trimesh.load_scene(record.uri)


def _centroids(scene: trimesh.Scene) -> dict[str, np.ndarray]:
    """World-space centroid of every part node (node transforms applied)."""
    out = {}
    for node in scene.graph.nodes_geometry:
        transform, geometry = scene.graph[node]
        out[node] = trimesh.transform_points(scene.geometry[geometry].centroid[None], transform)[0]
    return out


def _by_category(records: list[AssetRecord], category: str) -> list[AssetRecord]:
    found = [r for r in records if r.meta["category"] == category]
    assert found, category
    return found


def test_records_describe_every_object(generated: tuple[ProceduralSource, list[AssetRecord]]) -> None:
    _, records = generated
    assert len(records) == NUM_ASSETS
    assert len(CATEGORIES) >= 8
    assert {r.meta["category"] for r in records} == set(CATEGORIES)
    assert len({r.key for r in records}) == NUM_ASSETS
    for record, (name, category, _) in zip(records, list_assets(NUM_ASSETS, 3)):
        assert record.key == f"procedural:{name}"
        assert record.source == "procedural" and record.license == "CC0-1.0"
        assert record.meta["name"] == name and record.meta["category"] == category
        assert Path(record.uri).is_absolute() and Path(record.uri).is_file()
        assert Path(record.uri).name == f"{name}.glb"
    assert [r.meta["name"] for r in records[: len(CATEGORIES) + 1]] == [
        *(f"{c}_000" for c in CATEGORIES),
        f"{CATEGORIES[0]}_001",
    ]


def test_same_config_gives_identical_bytes(
    generated: tuple[ProceduralSource, list[AssetRecord]], tmp_path: Path
) -> None:
    _, records = generated
    again, _ = ProceduralSource(ProceduralSourceConfig(num_assets=NUM_ASSETS, seed=3), tmp_path / "b").discover()
    assert [r.key for r in again] == [r.key for r in records]
    for first, second in zip(records, again):
        assert first.uri != second.uri
        assert Path(first.uri).read_bytes() == Path(second.uri).read_bytes(), first.key
        assert first.meta == second.meta
    other = generate_asset(CATEGORIES[0], 0, seed=4).export(file_type="glb")
    assert other != Path(records[0].uri).read_bytes()  # the seed matters


def test_variation_within_a_category() -> None:
    sizes = {tuple(np.round(generate_asset("mug", i, 0).extents, 4)) for i in range(3)}
    assert len(sizes) == 3


def test_parts_are_named_nodes_with_distinct_materials(
    generated: tuple[ProceduralSource, list[AssetRecord]],
) -> None:
    _, records = generated
    for record in records:
        scene = _scene(record)
        parts = record.meta["parts"]
        assert len(parts) >= 3 and len(set(parts)) == len(parts)
        assert sorted(scene.graph.nodes_geometry) == sorted(parts), record.key
        colors, names = set(), set()
        for node in parts:
            _, geometry = scene.graph[node]
            material = scene.geometry[geometry].visual.material
            assert isinstance(material, trimesh.visual.material.PBRMaterial)
            colors.add(tuple(np.asarray(material.baseColorFactor).tolist()))
            names.add(material.name)
        assert len(colors) == len(parts), f"{record.key}: parts share a colour"
        assert names == set(parts)


def test_mug_handle_is_on_the_back(generated: tuple[ProceduralSource, list[AssetRecord]]) -> None:
    for record in _by_category(generated[1], "mug"):
        c = _centroids(_scene(record))
        assert c["handle"][2] < -0.2
        assert abs(c["body"][0]) < 0.02 and abs(c["body"][2]) < 0.02
        assert c["logo"][2] > 0.1


def test_backpack_straps_back_pocket_front(generated: tuple[ProceduralSource, list[AssetRecord]]) -> None:
    for record in _by_category(generated[1], "backpack"):
        c = _centroids(_scene(record))
        assert c["shoulder_strap_left"][2] < 0 and c["shoulder_strap_right"][2] < 0
        assert c["front_pocket"][2] > 0
        assert c["shoulder_strap_left"][0] > 0 > c["shoulder_strap_right"][0]  # object's own left is +X


# (category, parts on the front (+Z), parts on the back (-Z)) relative to the main body
FRONT_BACK = [
    ("chair", [], ["backrest"]),
    ("robot", ["eye_left", "eye_right", "chest_panel"], ["jetpack", "thrusters"]),
    ("lamp", [], ["power_switch", "cable"]),
    ("alarm_clock", ["face", "hour_hand", "minute_hand"], ["battery_cover", "stand_leg"]),
    ("monitor", ["screen"], ["back_panel", "vents", "ports"]),
    ("teapot", ["spout"], ["handle"]),
    ("car", ["windshield", "headlights"], ["rear_window", "taillights", "spoiler"]),
    ("camera", ["lens", "lens_glass"], ["lcd_screen"]),
]


@pytest.mark.parametrize(("category", "front", "back"), FRONT_BACK, ids=[f[0] for f in FRONT_BACK])
def test_front_and_back_features(
    generated: tuple[ProceduralSource, list[AssetRecord]], category: str, front: list[str], back: list[str]
) -> None:
    for record in _by_category(generated[1], category):
        c = _centroids(_scene(record))
        assert all(c[p][2] > 0.01 for p in front), {p: c[p][2] for p in front}
        assert all(c[p][2] < -0.01 for p in back), {p: c[p][2] for p in back}


def test_every_object_passes_the_loader(generated: tuple[ProceduralSource, list[AssetRecord]]) -> None:
    for record in generated[1]:
        asset = load_asset(Path(record.uri), LoadConfig())
        assert asset.part_names == sorted(record.meta["parts"])
        assert 0 < asset.num_faces < 20_000
        lo, hi = asset.scene.bounds
        assert np.isclose((hi - lo).max(), 1.0, atol=1e-4)  # generated at unit size
        assert abs(lo[1]) < 1e-4  # standing on y = 0
        assert np.all(np.abs((lo + hi)[[0, 2]] / 2) < 0.2)  # near the vertical axis


def test_second_discover_reuses_files(generated: tuple[ProceduralSource, list[AssetRecord]]) -> None:
    source, records = generated
    before = {r.uri: Path(r.uri).stat().st_mtime_ns for r in records}
    again, _ = source.discover()
    assert again == records
    assert {r.uri: Path(r.uri).stat().st_mtime_ns for r in again} == before
    assert sorted(p.name for p in source.root.iterdir()) == sorted(Path(r.uri).name for r in records)  # no temp files


def test_fetch(generated: tuple[ProceduralSource, list[AssetRecord]], tmp_path: Path) -> None:
    source, records = generated
    assert source.fetch(records[0]) == Path(records[0].uri)
    missing = AssetRecord("procedural:gone", "procedural", str(tmp_path / "gone.glb"), "CC0-1.0", {})
    with pytest.raises(FetchError):
        source.fetch(missing)


def test_unknown_category_and_negative_seed() -> None:
    with pytest.raises(ValueError, match="unknown procedural category"):
        generate_asset("spaceship", 0, 0)
    a = generate_asset("robot", 0, -5).export(file_type="glb")
    assert a == generate_asset("robot", 0, -5).export(file_type="glb")
