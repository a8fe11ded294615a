"""ULIP / Uni3D scorers: key-for-key conformance with the official checkpoints, tiny models end to end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from know3d.evaluation.models.pointtok import Group, farthest_point_sample
from know3d.evaluation.models.ulip import UlipConfig, UlipPointBert
from know3d.evaluation.models.uni3d import UNI3D_COLOR, Uni3d, Uni3dModelConfig, clip_image_tower
from know3d.evaluation.semantic import CheckpointError, ScorerSpec, SemanticScorer, load_ulip


def reference(shared_assets: Path, name: str) -> dict:
    return json.loads((shared_assets.parent / "reference" / name).read_text())["keys"]


def shapes(model: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "name, build, prefix",
    [
        ("ulip_pointbert.json", lambda: UlipPointBert(UlipConfig()), ""),
        ("uni3d_g.json", lambda: Uni3d(Uni3dModelConfig()), ""),
        ("eva02_e_14_plus_visual.json", lambda: clip_image_tower(Uni3dModelConfig()), "visual."),
    ],
)
def test_full_size_architectures_match_the_official_key_lists(shared_assets: Path, name, build, prefix):
    with torch.device("meta"):
        model = build()
    ours, ref = shapes(model, prefix), reference(shared_assets, name)
    assert sorted(ours) == sorted(ref)
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


def test_grouping_centres_each_group_on_an_fps_point():
    torch.manual_seed(0)
    xyz = torch.rand(2, 500, 3) * 2 - 1
    xyz[:, 0] = torch.tensor([0.9, 0.9, 0.9])
    idx = farthest_point_sample(xyz, 32)
    assert (idx[:, 0] == 0).all() and all(len(set(row.tolist())) == 32 for row in idx)
    xyz[0, 5] = 0.0  # a point at the origin is never picked (pointnet2's kernel skips it)
    assert 5 not in farthest_point_sample(xyz, 400)[0].tolist()
    groups, centres = Group(32, 16)(xyz, torch.full_like(xyz, 0.4))
    assert groups.shape == (2, 32, 16, 6) and centres.shape == (2, 32, 3)
    assert torch.allclose(groups[:, :, 0, :3], torch.zeros(2, 32, 3))  # the centre is its own nearest
    assert torch.allclose(groups[..., 3:], torch.tensor(0.4))
    assert groups[..., :3].norm(dim=-1).max() < 1.0


def write_tiny_checkpoints(root: Path) -> dict[str, Path]:
    """Tiny random models saved exactly in the upstream checkpoint formats."""
    torch.manual_seed(0)
    ulip = UlipPointBert(UlipConfig.tiny())
    arch = Uni3dModelConfig.tiny()
    uni3d, clip = Uni3d(arch), clip_image_tower(arch)
    paths = {"ulip": root / "ulip.pt", "uni3d": root / "uni3d.pt", "clip": root / "open_clip_pytorch_model.bin"}
    # ULIP: DDP-prefixed state_dict next to the training args (argparse.Namespace)
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in ulip.state_dict().items()},
            "epoch": 1,
            "args": argparse.Namespace(model="ULIP_PointBERT"),
        },
        paths["ulip"],
    )
    torch.save({"module": uni3d.state_dict(), "epoch": 1}, paths["uni3d"])
    torch.save(
        {f"visual.{k}": v for k, v in clip.state_dict().items()} | {"logit_scale": torch.ones([])}, paths["clip"]
    )
    return paths


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def spec(paths: dict[str, Path], **kw) -> ScorerSpec:
    return ScorerSpec(str(paths["ulip"]), str(paths["uni3d"]), str(paths["clip"]), arch="tiny", device="cpu", **kw)


def test_tiny_models_score_end_to_end_like_the_reference_computation(tiny_ckpts, tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 60, 4)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    points = (rng.random((512, 3)) * 1.96 - 0.98).astype(np.float32)
    scorer = SemanticScorer(spec(tiny_ckpts, uni3d_batchnorm="running"))
    scores = scorer.score(points, tmp_path / "img.png")
    assert set(scores) == {"ulip", "uni3d"} and all(-1.0 <= v <= 1.0 for v in scores.values())
    assert scorer.score(points, tmp_path / "img.png") == scores  # deterministic

    # the same numbers by hand from the checkpoint files: strip module., cosine of normalized embeddings
    sd = torch.load(tiny_ckpts["ulip"], weights_only=False)["state_dict"]
    ulip = UlipPointBert(UlipConfig.tiny())
    ulip.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    ulip.eval()
    image = Image.open(tmp_path / "img.png").convert("RGB")
    with torch.no_grad():
        pc = ulip.encode_pc(torch.from_numpy(points)[None])
        im = ulip.encode_image(ulip.image_transform()(image)[None])
    expected = torch.nn.functional.cosine_similarity(pc, im).item()
    assert scores["ulip"] == pytest.approx(expected, abs=1e-5)

    arch = Uni3dModelConfig.tiny()
    uni3d, clip = Uni3d(arch), clip_image_tower(arch)
    uni3d.load_state_dict(torch.load(tiny_ckpts["uni3d"], weights_only=True)["module"])
    clip_sd = torch.load(tiny_ckpts["clip"], weights_only=True)
    clip.load_state_dict({k[7:]: v for k, v in clip_sd.items() if k.startswith("visual.")})
    uni3d.eval(), clip.eval()
    from know3d.evaluation.models.uni3d import clip_image_transform

    with torch.no_grad():
        xyz = torch.from_numpy(points)[None]
        pc = uni3d.encode_pc(torch.cat([xyz, torch.full_like(xyz, 100 / 255)], -1))
        im = clip(clip_image_transform(arch)(image)[None])
    assert scores["uni3d"] == pytest.approx(torch.nn.functional.cosine_similarity(pc, im).item(), abs=1e-5)
    assert UNI3D_COLOR == pytest.approx(100 / 255)

    # HY3D-Bench's Uni3D runs without .eval(): batch statistics give another (stable) number
    batch = SemanticScorer(spec(tiny_ckpts, uni3d_batchnorm="batch"))
    first = batch.score(points, tmp_path / "img.png")
    assert first["ulip"] == pytest.approx(scores["ulip"], abs=1e-6)
    assert first["uni3d"] != pytest.approx(scores["uni3d"], abs=1e-6)
    assert batch.score(points, tmp_path / "img.png") == first  # stored stats untouched (momentum 0)


def test_checkpoint_errors_are_clear(tiny_ckpts, tmp_path: Path):
    with pytest.raises(
        CheckpointError, match="no ulip checkpoint given.*huggingface.co/datasets/SFXX/ulip.*--no-semantic"
    ):
        ScorerSpec(None, None, None).check()
    with pytest.raises(CheckpointError, match="uni3d checkpoint not found: .*missing.pt.*BAAI/Uni3D"):
        ScorerSpec(str(tiny_ckpts["ulip"]), str(tmp_path / "missing.pt"), None).check()
    # the full-size architecture refuses the tiny file and says why
    with pytest.raises(CheckpointError, match="ulip.pt: does not match the architecture: .*with other shapes"):
        load_ulip(tiny_ckpts["ulip"], UlipConfig())
    # a pickle that is more than tensors and containers is refused (weights_only=True)
    torch.save({"state_dict": {}, "hook": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: cannot be loaded with weights_only=True"):
        load_ulip(tmp_path / "evil.pt", UlipConfig.tiny())
    torch.save({"model": {}}, tmp_path / "nokey.pt")
    with pytest.raises(CheckpointError, match="nokey.pt: no 'state_dict' entry"):
        load_ulip(tmp_path / "nokey.pt", UlipConfig.tiny())
    # safetensors are accepted as the state_dict itself
    from safetensors.torch import save_file

    sd = torch.load(tiny_ckpts["ulip"], weights_only=False)["state_dict"]
    save_file({k.removeprefix("module."): v.contiguous() for k, v in sd.items()}, str(tmp_path / "ulip.safetensors"))
    model = load_ulip(tmp_path / "ulip.safetensors", UlipConfig.tiny())
    assert not any(p.is_meta for p in model.parameters()) and not model.training


def test_image_preprocessing_is_the_benchmarks():
    """ULIP: timm's eval transform of vit_base_patch16_224 (resize 248 bicubic, crop 224, mean/std
    0.5); Uni3D: open_clip's (resize 224 bicubic, crop 224, OpenAI mean/std)."""
    from torchvision import transforms as T

    from know3d.evaluation.models.uni3d import clip_image_transform

    with torch.device("meta"):
        ulip = UlipPointBert(UlipConfig())
    steps = {type(t).__name__: t for t in ulip.image_transform().transforms}
    assert steps["Resize"].size == 248 and steps["Resize"].interpolation == T.InterpolationMode.BICUBIC
    assert list(steps["CenterCrop"].size) == [224, 224]
    assert list(steps["Normalize"].mean) == pytest.approx([0.5] * 3) and list(steps["Normalize"].std) == pytest.approx(
        [0.5] * 3
    )
    steps = {type(t).__name__: t for t in clip_image_transform(Uni3dModelConfig()).transforms}
    assert steps["Resize"].size == 224 and steps["Resize"].interpolation == T.InterpolationMode.BICUBIC
    assert list(steps["CenterCrop"].size) == [224, 224]
    assert list(steps["Normalize"].mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


@pytest.mark.gpu
def test_real_checkpoints_score_a_matching_image_above_a_mismatched_one(real_dir: Path, tmp_path: Path):
    """With the official weights (KNOW3D_ULIP_CKPT, KNOW3D_UNI3D_CKPT, KNOW3D_CLIP_CKPT) on a GPU:
    the full-size models load strictly and the Duck mesh agrees more with a render of itself than
    with a render of the fandisk."""
    import os

    from know3d.evaluation.demo import make_demo_set
    from know3d.evaluation.meshes import load_mesh, normalize, semantic_points

    paths = [os.environ.get(k) for k in ("KNOW3D_ULIP_CKPT", "KNOW3D_UNI3D_CKPT", "KNOW3D_CLIP_CKPT")]
    if not all(paths) or not torch.cuda.is_available():
        pytest.skip("needs a GPU and KNOW3D_ULIP_CKPT / KNOW3D_UNI3D_CKPT / KNOW3D_CLIP_CKPT")
    make_demo_set([real_dir / "Duck.glb", real_dir / "fandisk.obj"], tmp_path, resolution=512, broken=False)
    scorer = SemanticScorer(ScorerSpec(*paths, device="cuda"))
    points = semantic_points(normalize(load_mesh(real_dir / "Duck.glb")[0]), "Duck", 0)
    duck = scorer.score(points, tmp_path / "image" / "Duck" / "000.png")
    other = scorer.score(points, tmp_path / "image" / "fandisk" / "000.png")
    assert duck["ulip"] > other["ulip"] and duck["uni3d"] > other["uni3d"]
    print("peak GPU memory (GiB):", torch.cuda.max_memory_allocated() / 2**30)
