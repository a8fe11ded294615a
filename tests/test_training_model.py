"""The back-view model on the tiny Qwen-Image-Edit built in code: latents, LoRA, one training
step's loss, overfitting, export -> diffusers ``load_lora_weights``, generation CLI errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from know3d.training.backview_train import training_loss
from know3d.training.config import LORA_TARGETS, TrainBackviewConfig
from know3d.training.debug_models import DEBUG_EDIT_MODEL
from know3d.training.edit_model import (
    EditModel,
    add_lora,
    export_lora,
    load_pipeline,
    pack_latents,
    pad_prompts,
    unpack_latents,
)
from know3d.training.engine.config import deepspeed_config, derive_seed

SIZE = 32


@pytest.fixture(scope="module")
def base_pipe():
    pipe = load_pipeline(DEBUG_EDIT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fresh_model(lora: bool = True) -> EditModel:
    pipe = load_pipeline(DEBUG_EDIT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    model = EditModel(pipe, torch.device("cpu"), torch.float32, SIZE)
    if lora:
        torch.manual_seed(0)
        add_lora(model.transformer, rank=4, alpha=4, dropout=0.0, targets=list(LORA_TARGETS))
    return model


def _samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        front = rng.uniform(-1, 1, (3, SIZE, SIZE)).astype(np.float32)
        out.append(
            {
                "front": front,
                "back": -front[:, :, ::-1].copy(),
                "components": ["a handle"] if i % 2 else [],
                "key": f"k{i}",
                "asset_id": f"a{i}",
                "pair_index": 0,
            }
        )
    return out


def _cfg(**kw) -> TrainBackviewConfig:
    cfg = TrainBackviewConfig()
    cfg.data.image_size = SIZE
    for k, v in kw.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg


def test_pack_unpack_match_the_pipeline(base_pipe):
    from diffusers import QwenImageEditPlusPipeline

    x = torch.randn(2, 4, 1, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed, QwenImageEditPlusPipeline._pack_latents(x[:, :, 0], 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)


def test_encoders_shapes_and_prompt_padding():
    model = _fresh_model(lora=False)
    s = _samples(2)
    lat = model.encode_images(torch.from_numpy(np.stack([x["front"] for x in s])))
    assert lat.shape == (2, 4, 1, SIZE // model.vae_scale, SIZE // model.vae_scale)
    a = model.encode_prompt("short", s[0]["front"])
    b = model.encode_prompt("a much longer prompt than the other one", s[1]["front"])
    assert a.ndim == 2 and a.shape[1] == 32 and b.shape[0] > a.shape[0]
    padded, mask = pad_prompts([a, b], torch.device("cpu"))
    assert padded.shape == (2, b.shape[0], 32)
    assert mask[0].sum() == a.shape[0] and mask[1].sum() == b.shape[0]
    assert torch.equal(padded[0, : a.shape[0]], a) and not padded[0, a.shape[0] :].any()
    assert pad_prompts([a, a], torch.device("cpu"))[1] is None


def _set_zero_cond_t(transformer, on: bool) -> None:
    transformer.zero_cond_t = on
    for block in transformer.transformer_blocks:
        block.zero_cond_t = on


def test_zero_cond_t_modulates_reference_tokens_at_t0():
    """2511's zero_cond_t: reference tokens are modulated with t = 0. At t = 0 it makes no
    difference; at t > 0 it does — which also checks that img_shapes separates target tokens
    from reference tokens the way the pipeline does."""
    model = _fresh_model(lora=False)
    assert model.transformer.config.zero_cond_t is True
    assert model.img_shapes(3, (8, 8)) == [[(1, 4, 4), (1, 4, 4)]] * 3
    s = _samples(1)
    pair = model.encode_pair(torch.from_numpy(s[0]["front"][None]), torch.from_numpy(s[0]["back"][None]))
    embeds, mask = pad_prompts([model.encode_prompt("rotate", s[0]["front"])], model.device)
    noisy = torch.randn(pair.target.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for on in (True, False):
            _set_zero_cond_t(model.transformer, on)
            for tv in (0.0, 0.7):
                t = torch.full((1,), tv)
                out[on, tv] = model.velocity(model.transformer, noisy, pair.reference, t, embeds, mask, pair.latent_hw)
    assert out[True, 0.0].shape == pair.target.shape
    torch.testing.assert_close(out[True, 0.0], out[False, 0.0])
    assert (out[True, 0.7] - out[False, 0.7]).abs().max() > 1e-4


def test_only_lora_parameters_train():
    model = _fresh_model(lora=True)
    trainable = {n for n, p in model.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for target in LORA_TARGETS:  # image and text streams, in every block
        for block in range(2):
            assert any(f"transformer_blocks.{block}.attn.{target}.lora_A" in n for n in trainable), target
    frozen = [p for n, p in model.transformer.named_parameters() if not p.requires_grad]
    assert len(frozen) > 0
    assert not any(p.requires_grad for p in model.pipe.vae.parameters())
    assert not any(p.requires_grad for p in model.pipe.text_encoder.parameters())
    # rank 4: A is [4, in], B is [out, 4]
    name = "transformer_blocks.0.attn.to_q.lora_A.default.weight"
    assert dict(model.transformer.named_parameters())[name].shape == (4, 32)
    assert all(p.dtype == torch.float32 for n, p in model.transformer.named_parameters() if n in trainable)
    # bf16 LoRA weights (DeepSpeed's bf16 mode keeps the fp32 master copies): the trainer's default there
    pipe = load_pipeline(DEBUG_EDIT_MODEL)
    params = add_lora(pipe.transformer, 4, 4, 0.0, list(LORA_TARGETS), dtype=torch.bfloat16)
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    assert TrainBackviewConfig().model.lora_dtype == "auto"


def test_training_loss_is_deterministic_and_uses_p():
    model = _fresh_model()
    cfg = _cfg(data__prompt_probability=1.0)
    s = _samples(2)
    l1, per1, t1, used = training_loss(model, model.transformer, s, cfg, (0, 0, 5, 0))
    l2, per2, t2, _ = training_loss(model, model.transformer, s, cfg, (0, 0, 5, 0))
    assert torch.equal(per1, per2) and torch.equal(t1, t2)
    assert used == [None, "a handle"]  # p = 1: the pair with a description always gets it
    l3, *_ = training_loss(model, model.transformer, s, cfg, (0, 0, 6, 0))
    assert float(l3.detach()) != float(l1.detach())
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_loss_falls_when_one_batch_is_repeated():
    model = _fresh_model()
    cfg = _cfg()
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    batch = _samples(2)
    losses = []
    for step in range(30):
        loss, *_ = training_loss(model, model.transformer, batch, cfg, (0, 0, 0, 0))  # same noise, t, prompts
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses


def test_lora_export_loads_with_diffusers_and_reproduces_the_trained_model(tmp_path: Path, base_pipe):
    from diffusers import QwenImageEditPlusPipeline

    from know3d.training.generate import generate

    model = _fresh_model()
    with torch.no_grad():  # a "trained" LoRA: B != 0
        g = torch.Generator().manual_seed(1)
        for n, p in model.transformer.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    front = _samples(1)[0]["front"]
    trained = generate(model.pipe, front, "rotate", SIZE, steps=3, seed=0, cfg_scale=1.0)
    folder = export_lora(model.transformer, tmp_path / "lora", {"model": DEBUG_EDIT_MODEL, "image_size": SIZE})
    assert (folder / "pytorch_lora_weights.safetensors").is_file()

    base = generate(base_pipe, front, "rotate", SIZE, steps=3, seed=0, cfg_scale=1.0)
    loaded = load_pipeline(DEBUG_EDIT_MODEL)
    assert isinstance(loaded, QwenImageEditPlusPipeline)
    loaded.set_progress_bar_config(disable=True)
    loaded.load_lora_weights(str(folder))
    reloaded = generate(loaded, front, "rotate", SIZE, steps=3, seed=0, cfg_scale=1.0)
    np.testing.assert_allclose(reloaded, trained, atol=1e-5)
    assert np.abs(reloaded - base).max() > 1e-2


def test_deepspeed_config_from_the_run_config():
    cfg = _cfg(schedule__micro_batch_size=2, schedule__grad_accum=4)
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 1e6}, "seed_extra": 1}
    ds = deepspeed_config(cfg.optim, cfg.schedule, cfg.deepspeed, world_size=8, bf16=True)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_bucket_size"] == 1e6
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0 and ds["seed_extra"] == 1
    cfg.deepspeed.zero_stage = 0
    cfg.deepspeed.extra = {}
    assert deepspeed_config(cfg.optim, cfg.schedule, cfg.deepspeed, 1, False)["zero_optimization"] == {"stage": 0}


def test_generate_cli_rejects_bad_inputs(tmp_path: Path):
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["generate", "backview", "--image", str(tmp_path / "missing.png"), "--model", DEBUG_EDIT_MODEL]
    )
    assert res.exit_code == 2 and "missing.png" in res.output and "no such image" in res.output
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    res = runner.invoke(app, ["generate", "backview", "--image", str(junk), "--model", DEBUG_EDIT_MODEL])
    assert res.exit_code == 2 and "junk.png" in res.output and "not a readable image" in res.output
    res = runner.invoke(app, ["generate", "backview", "--image", str(junk), "--lora", str(tmp_path)])
    assert res.exit_code == 2 and "pytorch_lora_weights.safetensors" in res.output


def test_generate_cli_several_images_load_the_model_once(tmp_path: Path):
    from PIL import Image
    from typer.testing import CliRunner

    from know3d.pipeline.cli import app

    fronts = []
    for i, color in enumerate(("red", "blue")):
        fronts += ["--image", str(tmp_path / f"f{i}.png")]
        Image.new("RGB", (40, 40), color).save(tmp_path / f"f{i}.png")
    runner = CliRunner()
    common = [
        "generate",
        "backview",
        "--model",
        DEBUG_EDIT_MODEL,
        "--size",
        str(SIZE),
        "--steps",
        "2",
        "--output",
        str(tmp_path / "out"),
        *fronts,
    ]
    res = runner.invoke(app, [*common, "--prompt", "a handle", "--prompt", ""])
    assert res.exit_code == 0, res.output
    backs = sorted((tmp_path / "out").glob("*.png"))
    assert [b.name for b in backs] == ["f0.png", "f1.png"]
    assert all(Image.open(b).size == (SIZE, SIZE) for b in backs)
    res = runner.invoke(app, [*common, "--prompt", "a", "--prompt", "b", "--prompt", "c"])
    assert res.exit_code == 2 and "3 --prompt for 2 --image" in res.output
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "sub" / "f0.png")
    res = runner.invoke(app, [*common, "--image", str(tmp_path / "sub" / "f0.png")])
    assert res.exit_code == 2 and "share a file name" in res.output


def test_lr_warmup_then_cosine_decay():
    from know3d.training.engine.config import lr_lambda

    constant = lr_lambda(4)
    assert [constant(s) for s in (0, 1, 3, 4, 1000)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = lr_lambda(4, "cosine", total=104, min_ratio=0.1)
    assert cosine(0) == 0.25 and cosine(4) == pytest.approx(1.0)
    assert cosine(54) == pytest.approx(0.55) and cosine(104) == pytest.approx(0.1) == cosine(500)
    values = [cosine(s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_stochastic_prompts_in_training_follow_p():
    """The per-step prompt generators of training give descriptions at rate p."""
    from know3d.training.prompting import stochastic_prompt

    cfg = _cfg(data__prompt_probability=0.3)
    with_desc = 0
    for step in range(2000):
        rng = random.Random(derive_seed("prompt", 0, 0, step, 0))
        _, d = stochastic_prompt(["a handle", "a lid"], cfg.data.prompt_probability, rng)
        with_desc += d is not None
    assert abs(with_desc / 2000 - 0.3) < 0.04


def test_latent_cache_gives_the_same_loss_as_the_encoders(tmp_path: Path):
    """The pre-pass stores exactly what the encoders compute: a step from the cache (no VAE, no
    text encoder loaded) has the same loss as a step that runs the encoders."""
    import io

    from PIL import Image

    from know3d.training.latent_cache import LatentEncoder, cache_folder, load_entry

    cfg = _cfg(data__prompt_probability=1.0, model__name=DEBUG_EDIT_MODEL)
    cfg.output = str(tmp_path)
    rng = np.random.default_rng(0)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    fronts = [rng.integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8) for _ in range(2)]
    backs = [rng.integers(0, 255, (SIZE, SIZE, 4), dtype=np.uint8) for _ in range(2)]
    comps = [[], ["a handle", "a lid"]]
    rows = [{"key": f"k{i}", "front": png(fronts[i]), "back": png(backs[i]), "components": comps[i]} for i in range(2)]
    encoder = LatentEncoder(cfg.model_dump_json())
    assert encoder.encode(rows) == ["encoded", "encoded"]
    assert encoder.encode(rows) == ["cached", "cached"]  # resumable: present files are skipped
    folder = cache_folder(cfg)
    entry = load_entry(folder, "k1")
    assert sorted(entry) == ["back_latent", "components", "front_latent", "prompt_0", "prompt_1", "prompt_2"]
    with pytest.raises(FileNotFoundError, match="not in the latent cache"):
        load_entry(folder, "missing")

    from know3d.training.data import decode_image

    samples = [
        {
            "key": f"k{i}",
            "front": decode_image(png(fronts[i]), SIZE),
            "back": decode_image(png(backs[i]), SIZE),
            "components": comps[i],
        }
        for i in range(2)
    ]
    model = _fresh_model()
    direct, per_direct, _, used = training_loss(model, model.transformer, samples, cfg, (0, 0, 1, 0))
    lean = load_pipeline(DEBUG_EDIT_MODEL, vae=None, text_encoder=None)
    lean_model = EditModel(lean, torch.device("cpu"), torch.float32, SIZE)
    lean_model.pipe.transformer = model.transformer  # same LoRA'd MMDiT
    keys_only = [{"key": s["key"], "components": s["components"]} for s in samples]
    cached, per_cached, _, used_cached = training_loss(
        lean_model, model.transformer, keys_only, cfg, (0, 0, 1, 0), cache=folder
    )
    assert used == used_cached and used[1] in comps[1]
    torch.testing.assert_close(per_cached, per_direct, rtol=1e-5, atol=1e-6)


def test_latent_cache_folder_follows_the_weights_not_just_the_name(tmp_path: Path):
    """A rebuilt or edited model behind the same name must not reuse stale latents/prompt embeddings."""
    from know3d.training.latent_cache import cache_folder

    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text('{"a": 1}')
    (model / "vae" / "config.json").write_text('{"z_dim": 16}')
    cfg = _cfg(model__name=str(model))
    first = cache_folder(cfg)
    assert cache_folder(cfg) == first
    (model / "vae" / "config.json").write_text('{"z_dim": 8}')
    assert cache_folder(cfg) != first
    tiny = cache_folder(_cfg(model__name=DEBUG_EDIT_MODEL))
    assert tiny != cache_folder(_cfg(model__name="debug:small-qwen-image-edit")) and tiny != first


def test_micro_batches_give_the_same_losses_and_gradient_as_single_samples():
    """One step of 4 pairs split as 1 x 4, 2 x 2 or 4 x 1 micro-batches: the same per-sample
    losses (prompts of different lengths padded under a mask), the same mean loss and the same
    accumulated gradient (fp32 here; bf16 adds rounding only)."""
    model = _fresh_model()
    cfg = _cfg(data__prompt_probability=1.0)
    samples = _samples(4)  # samples 1 and 3 carry a description: longer prompts than 0 and 2
    params = [p for p in model.transformer.parameters() if p.requires_grad]

    def step(micro: int) -> tuple[torch.Tensor, list[torch.Tensor], list]:
        for p in params:
            p.grad = None
        per, used = [], []
        for start in range(0, 4, micro):
            loss, per_sample, _, chosen = training_loss(
                model, model.transformer, samples[start : start + micro], cfg, (0, 0, 7), offset=start
            )
            (loss * micro / 4).backward()  # accumulation: the step's mean over its 4 samples
            per.append(per_sample)
            used += chosen
        return torch.cat(per), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params], used

    reference, grads, used = step(4)
    assert used == [None, "a handle", None, "a handle"] and sum(float(g.abs().sum()) for g in grads) > 0
    for micro in (2, 1):
        per, g, u = step(micro)
        assert u == used
        assert torch.allclose(per, reference, rtol=1e-4, atol=1e-6), (micro, per, reference)
        for a, b in zip(g, grads):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-7), micro
    # and the per-sample draws do depend on the position in the step
    shifted, *_ = training_loss(model, model.transformer, samples[:1], cfg, (0, 0, 7), offset=1)
    assert not torch.allclose(shifted, reference[:1])


def test_random_weights_build_the_configured_mmdit_deterministically_not_the_checkpoint():
    """``model.random_weights``: the MMDiT from its config.json, seeded (the same on every rank),
    not the saved weights."""
    from know3d.training.edit_model import random_transformer

    saved = load_pipeline(DEBUG_EDIT_MODEL).transformer.state_dict()
    a = random_transformer(DEBUG_EDIT_MODEL, torch.float32, torch.device("cpu"), seed=3).state_dict()
    b = random_transformer(DEBUG_EDIT_MODEL, torch.float32, torch.device("cpu"), seed=3).state_dict()
    c = random_transformer(DEBUG_EDIT_MODEL, torch.bfloat16, torch.device("cpu"), seed=4).state_dict()
    assert a.keys() == saved.keys() and all(a[k].shape == saved[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith(".weight") and a[k].dim() == 2]
    assert not any(torch.equal(a[k], saved[k]) for k in weights)
    assert {v.dtype for v in c.values()} == {torch.bfloat16}
    assert not torch.equal(a[weights[0]], c[weights[0]].float())


@pytest.mark.slow
def test_full_size_debug_model_is_2511s_architecture_with_real_width_encoders():
    """``debug:full-size-qwen-image-edit``: 2511's MMDiT config (20.43 B parameters, counted on the
    meta device), no weights to load, and encoders whose outputs have the real widths and token
    counts (16 latent channels at 1/8 resolution, 3584-wide prompt embeddings)."""
    import json

    from diffusers import QwenImageTransformer2DModel

    from know3d.training.debug_models import DEBUG_FULL_SIZE_EDIT_MODEL, QWEN_IMAGE_EDIT_2511_TRANSFORMER
    from know3d.training.edit_model import resolve_model_path

    folder = Path(resolve_model_path(DEBUG_FULL_SIZE_EDIT_MODEL))
    assert sorted(p.name for p in (folder / "transformer").iterdir()) == ["config.json"]
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in QWEN_IMAGE_EDIT_2511_TRANSFORMER} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in QWEN_IMAGE_EDIT_2511_TRANSFORMER.items()
    }
    with torch.device("meta"):
        mmdit = QwenImageTransformer2DModel.from_config(config)
    assert sum(p.numel() for p in mmdit.parameters()) == 20_430_401_088
    with pytest.raises(RuntimeError, match="cannot load the edit model 'debug:full-size-qwen-image-edit'"):
        load_pipeline(DEBUG_FULL_SIZE_EDIT_MODEL)  # no weights: only random_weights builds its MMDiT

    pipe = load_pipeline(DEBUG_FULL_SIZE_EDIT_MODEL, transformer=None)
    pipe.set_progress_bar_config(disable=True)
    model = EditModel(pipe, torch.device("cpu"), torch.float32, 64)
    assert tuple(model.encode_images(torch.zeros(1, 3, 64, 64)).shape) == (1, 16, 1, 8, 8)
    embeds = model.encode_prompt("make the back view", np.zeros((3, 64, 64), np.float32))
    assert embeds.dim() == 2 and embeds.shape[-1] == 3584
