"""H, the back-view model's hidden states (issue 14), on the tiny debug Qwen-Image-Edit: hooks vs a
manual forward, early exit vs a full run, the cached pre-pass (determinism, resume, LoRA key)
and the bad-input errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from know3d.core.shards import write_tar
from know3d.training.debug_models import DEBUG_EDIT_MODEL
from know3d.training.generator import hidden_states as hs
from know3d.training.generator.config import HiddenStatesConfig

SIZE = 32


def _cfg(**kw) -> HiddenStatesConfig:
    base = dict(model=DEBUG_EDIT_MODEL, image_size=SIZE, layers=[0, 1], steps=4, compute_dtype="float32")
    return HiddenStatesConfig(**(base | kw))


@pytest.fixture(scope="module")
def pipe():
    return hs.load_backview_pipeline(_cfg(), "cpu")


@pytest.fixture(scope="module")
def front():
    return np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    from diffusers import QwenImageTransformer2DModel

    from know3d.training.config import LORA_TARGETS
    from know3d.training.edit_model import add_lora, export_lora, resolve_model_path

    transformer = QwenImageTransformer2DModel.from_pretrained(
        resolve_model_path(DEBUG_EDIT_MODEL), subfolder="transformer", use_safetensors=True
    )
    torch.manual_seed(0)
    add_lora(transformer, rank=2, alpha=2, dropout=0.0, targets=list(LORA_TARGETS))
    return export_lora(transformer, tmp_path_factory.mktemp("lora"), {"model": DEBUG_EDIT_MODEL})


def _record_transformer_inputs(pipe) -> tuple[list[dict], object]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    return calls, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _manual_blocks(transformer, kw: dict, upto: int) -> list[torch.Tensor]:
    """The transformer's preamble and blocks 0..upto by hand; the image stream after each block."""
    from math import prod

    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

    x = transformer.img_in(kw["hidden_states"])
    t = kw["timestep"].to(x.dtype)
    shapes = kw["img_shapes"]
    t = torch.cat([t, t * 0])  # zero_cond_t (2511 and the debug model)
    modulate = torch.tensor([[0] * prod(s[0]) + [1] * sum(prod(r) for r in s[1:]) for s in shapes], dtype=torch.int)
    txt = transformer.txt_in(transformer.txt_norm(kw["encoder_hidden_states"]))
    text_len, _, mask = compute_text_seq_len_from_mask(txt, kw["encoder_hidden_states_mask"])
    temb = transformer.time_text_embed(t, x, None)
    rope = transformer.pos_embed(shapes, max_txt_seq_len=text_len, device=x.device)
    outs = []
    for block in list(transformer.transformer_blocks)[: upto + 1]:
        txt, x = block(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            temb=temb,
            image_rotary_emb=rope,
            joint_attention_kwargs={},
            modulate_index=modulate,
        )
        outs.append(x)
    return outs


def test_hooks_equal_a_manual_forward_of_the_blocks(pipe, front):
    cfg = _cfg(cfg_scale=4.0)
    assert pipe.transformer.config.zero_cond_t
    calls, handle = _record_transformer_inputs(pipe)
    try:
        out = hs.capture(pipe, front, "a prompt", cfg)
    finally:
        handle.remove()
    step = cfg.capture_step()
    kw = calls[2 * step]  # CFG: (conditional, negative) per step; the conditional pass is first
    assert len(calls) == 2 * step + 1  # early exit inside the capture step's conditional pass
    target = kw["img_shapes"][0][0][1] * kw["img_shapes"][0][0][2]
    assert kw["hidden_states"].shape[1] == 2 * target  # target + one reference image
    with torch.no_grad():
        outs = _manual_blocks(pipe.transformer, kw, max(cfg.layers))
    manual = torch.cat([outs[i][0, :target] for i in cfg.layers], dim=-1)
    width = pipe.transformer.inner_dim
    assert out["hidden"].shape == (target, len(cfg.layers) * width)
    assert torch.allclose(out["hidden"], manual, atol=1e-5, rtol=1e-5)
    assert out["step"] == step and out["prompt"] == "a prompt"


def test_early_exit_matches_a_full_run_and_runs_less(pipe, front):
    cfg = _cfg(steps=6, fraction=0.5, cfg_scale=3.0)
    early = hs.capture(pipe, front, "p", cfg, seed=7)
    full = hs.capture(pipe, front, "p", cfg, seed=7, early_exit=False)
    assert torch.equal(early["hidden"], full["hidden"]) and early["timestep"] == full["timestep"]
    assert early["transformer_calls"] == 2 * 3 + 1 and full["transformer_calls"] == 2 * 6
    other = hs.capture(pipe, front, "p", cfg, seed=8)
    assert not torch.equal(early["hidden"], other["hidden"])


def test_pooling_averages_token_groups(pipe, front):
    plain = hs.capture(pipe, front, "p", _cfg())
    pooled = hs.capture(pipe, front, "p", _cfg(pooling="avg", pool_k=2))
    h, w = plain["grid"]
    grid = plain["hidden"].reshape(h, w, -1)
    assert pooled["hidden"].shape == (h * w // 4, plain["hidden"].shape[1])
    assert torch.allclose(pooled["hidden"][0], grid[:2, :2].mean(dim=(0, 1)), atol=1e-6)


# --------------------------------------------------------------------------- the cached pre-pass


class _Ref:
    def __init__(self, value) -> None:
        self.value = value


class LocalRay:
    """Enough of Ray for build_hidden_cache: actors are local objects, calls finish at once."""

    def __init__(self) -> None:
        self.actors = 0

    def cluster_resources(self) -> dict:
        return {"CPU": 2}

    def remote(self, **options):
        def wrap(cls):
            def make(*args):
                self.actors += 1
                obj = cls(*args)
                return SimpleNamespace(
                    encode_shard=SimpleNamespace(remote=lambda *a: _Ref(obj.encode_shard(*a))),
                )

            return SimpleNamespace(remote=make)

        return wrap

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref.value

    def kill(self, actor) -> None:
        pass


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8)
    arr[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shards")
    urls = []
    for s in range(2):
        samples = []
        for i in range(2):
            key = f"s{s}p{i}"
            meta = {"components": ["a handle", "a zipper"] if i else []}
            samples.append(
                {"__key__": key, "front.png": _png(10 * s + i), "back.png": _png(99), "json": json.dumps(meta).encode()}
            )
        path = root / f"train-{s:06d}.tar"
        write_tar(path, samples)
        urls.append(str(path))
    broken = root / "train-000002.tar"
    write_tar(broken, [{"__key__": "nofront", "back.png": _png(1), "json": b"{}"}])
    return urls + [str(broken)]


def test_cache_is_deterministic_resumes_and_is_keyed_by_the_lora(tmp_path, shards, lora):
    cfg = _cfg(lora=str(lora), cache_dir=str(tmp_path / "a"), prompt_probability=0.5, pooling="avg", pool_k=2)
    counts = hs.build_hidden_cache(cfg, shards, LocalRay())
    assert counts == {"encoded": 4, "no_front_view": 1}
    folder = hs.cache_folder(cfg)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["s0p0.safetensors", "s0p1.safetensors", "s1p0.safetensors", "s1p1.safetensors"]
    tensors, meta = hs.load_entry(folder, "s0p1")
    hidden = tensors["hidden"]
    assert list(tensors) == ["hidden"] and hidden.dtype == torch.bfloat16 and hidden.shape == (4, 2 * 32)
    assert meta["prompt"].startswith(cfg.instruction) and json.loads(meta["layers"]) == [0, 1]
    assert meta["description"] in ("", "a handle", "a zipper")

    again = cfg.model_copy(update={"cache_dir": str(tmp_path / "b")})
    assert hs.build_hidden_cache(again, shards[:2], LocalRay()) == {"encoded": 4}
    for name in files:  # same seed -> the same bytes
        assert (folder / name).read_bytes() == (hs.cache_folder(again) / name).read_bytes()

    (folder / "s1p0.safetensors").unlink()
    assert hs.build_hidden_cache(cfg, shards[:2], LocalRay()) == {"cached": 3, "encoded": 1}
    assert (folder / "s1p0.safetensors").read_bytes() == (hs.cache_folder(again) / "s1p0.safetensors").read_bytes()

    changed = tmp_path / "lora2"
    shutil.copytree(lora, changed)
    from safetensors.torch import load_file, save_file

    weights = load_file(changed / hs.LORA_FILE)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    save_file(weights, changed / hs.LORA_FILE)
    assert hs.cache_folder(cfg.model_copy(update={"lora": str(changed)})) != folder
    for change in ({"seed": 1}, {"layers": [1]}, {"fraction": 0.5}, {"dtype": "fp16"}, {"pool_k": 4}):
        assert hs.cache_folder(cfg.model_copy(update=change)) != folder


def test_ablation_variants_come_from_the_same_pass(pipe, front):
    """vae_latent = the finished sampler's latent tokens; dino_back = DINOv3 of its decoded image;
    H from that pass equals the early-exit H (the full run only adds steps after the capture)."""
    from know3d.training.edit_model import to_pil, vae_image_size
    from know3d.training.generator.dino import front_features

    dino = front_features("debug", 32)
    cfg = _cfg(variants=["hidden", "vae_latent", "dino_back"])
    out = hs.capture(pipe, front, "p", cfg, seed=3, dino=dino)
    early = hs.capture(pipe, front, "p", _cfg(), seed=3)
    assert torch.equal(out["hidden"], early["hidden"])
    assert out["transformer_calls"] == 2 * cfg.steps > early["transformer_calls"]  # CFG: 2 calls per step
    grid = SIZE // pipe.vae_scale_factor // 2
    tokens = grid**2
    assert out["vae_latent"].shape == (tokens, 4 * pipe.vae.config.z_dim)
    with vae_image_size(SIZE * SIZE):  # as capture() runs the pipeline
        full = pipe(
            image=[to_pil(front)],
            prompt="p",
            height=SIZE,
            width=SIZE,
            num_inference_steps=cfg.steps,
            generator=torch.Generator().manual_seed(3),
            output_type="latent",
            true_cfg_scale=cfg.cfg_scale,
            negative_prompt=" ",
        ).images[0]
    assert torch.allclose(out["vae_latent"], full.float(), atol=1e-6)
    image = hs.decode_packed(pipe, full[None], (grid, grid))
    assert image.shape == (3, SIZE, SIZE) and -1 <= image.min() <= image.max() <= 1
    assert torch.allclose(out["dino_back"], dino.encode([to_pil(image)])[0], atol=1e-5)
    assert out["dino_back"].shape == (1 + 4 + (32 // 16) ** 2, dino.dim)
    only = hs.capture(pipe, front, "p", _cfg(variants=["vae_latent"]), seed=3)
    assert "hidden" not in only and torch.equal(only["vae_latent"], out["vae_latent"])


def test_cache_stores_the_variants_and_keys_the_dino(tmp_path, shards):
    cfg = _cfg(cache_dir=str(tmp_path), variants=["hidden", "dino_back"], dino="debug", dino_resolution=32)
    assert hs.build_hidden_cache(cfg, shards[:1], LocalRay()) == {"encoded": 2}
    tensors, _ = hs.load_entry(hs.cache_folder(cfg), "s0p0")
    assert sorted(tensors) == ["dino_back", "hidden"] and tensors["dino_back"].shape == (9, 32)
    assert hs.cache_folder(cfg.model_copy(update={"dino": "debug:1"})) != hs.cache_folder(cfg)
    assert hs.cache_folder(cfg.model_copy(update={"variants": ["hidden"]})) != hs.cache_folder(cfg)


def test_capture_pair_records_the_stochastic_prompt(pipe):
    cfg = _cfg(prompt_probability=1.0)
    out = hs.capture_pair(pipe, cfg, {"key": "k", "front": _png(3), "components": ["a red cap"]})
    assert out["description"] == "a red cap" and out["prompt"].endswith("The back shows a red cap.")
    bare = hs.capture_pair(pipe, _cfg(prompt_probability=0.0), {"key": "k", "front": _png(3), "components": ["x"]})
    assert bare["description"] is None and bare["prompt"] == cfg.instruction


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_give_short_clear_errors(tmp_path, pipe, front):
    with pytest.raises(FileNotFoundError, match="LoRA folder .* does not exist"):
        hs.check_inputs(_cfg(lora=str(tmp_path / "missing")))
    (tmp_path / "empty_lora").mkdir()
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors"):
        hs.check_inputs(_cfg(lora=str(tmp_path / "empty_lora")))
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="has no .safetensors weights"):
        hs.build_hidden_cache(_cfg(model=str(model)), ["x.tar"], LocalRay())
    with pytest.raises(hs.MissingFrontView, match="pair k9: no front view"):
        hs.capture_pair(pipe, _cfg(), {"key": "k9", "front": None, "components": []})
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: the transformer has 2 blocks"):
        hs.capture(pipe, front, "p", _cfg(layers=[0, 5]))
    with pytest.raises(ValueError, match="needs a DINOv3 model"):
        hs.capture(pipe, front, "p", _cfg(variants=["hidden", "dino_back"]))
    with pytest.raises(ValueError, match="variants must be distinct"):
        _cfg(variants=["hidden", "hidden"])
    with pytest.raises(ValueError, match="distinct non-negative"):
        _cfg(layers=[1, 1])


def test_prepass_command_tracks_counts_and_lineage(tmp_path, shards, lora, monkeypatch):
    """`know3d data hidden-states`: the pre-pass on (here, an in-process stand-in for) Ray, then one
    MLflow run with the counts, the throughput and the input shards as its dataset."""
    from contextlib import contextmanager

    import mlflow
    from typer.testing import CliRunner

    import know3d.pipeline.generator_data as gd
    from know3d.pipeline.cli import app

    monkeypatch.setattr(gd, "ray_session", contextmanager(lambda _cfg: (yield LocalRay())))
    db = tmp_path / "m.db"
    args = ["data", "hidden-states", "--lora", str(lora), "--set", f"mlflow.tracking_uri=sqlite:///{db}"]
    for key, value in _cfg(cache_dir=str(tmp_path / "cache")).model_dump(mode="json").items():
        if key in ("model", "image_size", "layers", "steps", "compute_dtype", "cache_dir"):
            args += ["--set", f"hidden.{key}={json.dumps(value)}"]
    for url in shards[:2]:
        args += ["--shards", url]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 encoded" in res.output
    (run,) = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{db}").get_experiment_by_name("know3d-data").experiment_id]
    )
    assert run.data.metrics["pairs.encoded"] == 4 and run.data.metrics["pairs_per_s"] > 0
    assert run.data.tags["know3d.stage"] == "data.hidden_states" and run.data.params["hidden.layers"] == "[0, 1]"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["shards"]
    missing = CliRunner().invoke(
        app, ["data", "hidden-states", "--lora", str(tmp_path / "nope"), "--shards", shards[0]]
    )
    assert missing.exit_code == 2 and "nope" in missing.output
