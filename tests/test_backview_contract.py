"""The training/inference contract of the back-view model, pinned directly (issue 11).

A mismatch in timestep scale, sigma schedule or shift, latent normalization, token packing, the
reference-image size, ``zero_cond_t``'s image shapes or the prompt template would train a LoRA
for inputs the sampler never gives it. Here the MMDiT's inputs are recorded as
``QwenImageEditPlusPipeline`` calls it and as the training code calls it, for the same image,
prompt, noise and sigma, and must be equal; and one Euler step of the pipeline's own scheduler
with the true velocity must land on the training interpolation at the next sigma.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from know3d.training.edit_model import EditModel, load_pipeline, pack_latents, to_pil, vae_image_size
from know3d.training.flow_matching import interpolate, velocity_target
from know3d.training.prompting import build_prompt

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("debug:tiny-qwen-image-edit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _front() -> np.ndarray:
    """An object on white, with values a PNG can hold (as every training front view does)."""
    rng = np.random.default_rng(0)
    img = np.full((3, SIZE, SIZE), 255, np.uint8)
    img[:, 8:24, 10:22] = rng.integers(0, 200, (3, 16, 12))
    return img.astype(np.float32) / 127.5 - 1.0


def _record(module: torch.nn.Module, calls: list[dict]):
    return module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)


@pytest.mark.parametrize("description", [None, "two shoulder straps"])
def test_training_feeds_the_mmdit_exactly_what_the_pipeline_feeds_it(pipe, description):
    model = EditModel(pipe, torch.device("cpu"), torch.float32, SIZE)
    front = _front()
    prompt = build_prompt(description)
    h, w = model.latent_hw
    z = pipe.vae.config.z_dim
    noise = pack_latents(torch.randn(1, z, 1, h, w, generator=torch.Generator().manual_seed(1)))

    calls: list[dict] = []
    hook = _record(pipe.transformer, calls)
    try:
        with vae_image_size(SIZE * SIZE):
            pipe(
                image=[to_pil(front)],
                prompt=prompt,
                height=SIZE,
                width=SIZE,
                num_inference_steps=3,
                latents=noise.clone(),
                output_type="latent",
                true_cfg_scale=1.0,
            )
        sigma = float(pipe.scheduler.sigmas[0])
        at_inference = calls[0]
        calls.clear()
        reference = pack_latents(model.encode_images(torch.from_numpy(front)[None]))
        embeds = model.encode_prompt(prompt, front)[None]
        model.velocity(pipe.transformer, noise, reference, torch.tensor([sigma]), embeds, None, (h, w))
        in_training = calls[0]
    finally:
        hook.remove()

    # timestep: the pipeline passes scheduler timestep / 1000, training passes sigma itself
    assert torch.allclose(at_inference["timestep"].float(), in_training["timestep"].float(), atol=1e-6)
    # image shapes for zero_cond_t / RoPE: target grid, then the reference grid
    assert at_inference["img_shapes"] == in_training["img_shapes"] == [[(1, h // 2, w // 2), (1, h // 2, w // 2)]]
    # tokens: noisy target first, then the VAE-encoded, normalized, 2x2-packed front view
    assert at_inference["hidden_states"].shape == in_training["hidden_states"].shape
    assert torch.allclose(at_inference["hidden_states"], in_training["hidden_states"], atol=1e-5)
    # the prompt template with the front view at the condition size
    assert torch.allclose(at_inference["encoder_hidden_states"], in_training["encoder_hidden_states"], atol=1e-5)


@pytest.mark.parametrize("num_steps", [2, 4, 28])
def test_an_euler_step_with_the_true_velocity_lands_on_the_training_interpolation(pipe, num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    seq_len = (SIZE // pipe.vae_scale_factor // 2) ** 2
    mu = calculate_shift(
        seq_len,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, seq_len, 16, generator=gen), torch.randn(2, seq_len, 16, generator=gen)
    sigmas = scheduler.sigmas
    assert float(sigmas[-1]) == 0.0 and len(sigmas) == num_steps + 1
    x = interpolate(x0, eps, sigmas[0].repeat(2))
    for i, t in enumerate(scheduler.timesteps):
        # the transformer sees timestep / 1000: the sigma the training code interpolates with
        assert abs(float(t) / 1000 - float(sigmas[i])) < 1e-6
        x = scheduler.step(velocity_target(x0, eps), t, x).prev_sample
        assert torch.allclose(x, interpolate(x0, eps, sigmas[i + 1].repeat(2)), atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)  # the true velocity takes the sampler to the data


def test_a_one_step_schedule_is_refused_not_sampled_as_nan(pipe, tmp_path):
    """With shift_terminal (set by Qwen-Image's scheduler) diffusers' 1-step schedule is 0/0."""
    from know3d.training.generate import generate

    with pytest.raises(ValueError, match="steps must be at least 2"):
        generate(pipe, _front(), build_prompt(None), SIZE, steps=1)
    out = generate(pipe, _front(), build_prompt(None), SIZE, steps=2, cfg_scale=1.0)
    assert np.isfinite(out).all() and out.shape == (3, SIZE, SIZE)
