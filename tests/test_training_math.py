"""Flow-matching math and stochastic prompting (pure functions)."""

import random

import pytest
import torch

from know3d.training.flow_matching import (
    binned_means,
    euler_step,
    flow_matching_loss,
    interpolate,
    sample_timesteps,
    timestep_bins,
    velocity_target,
)
from know3d.training.prompting import DEFAULT_INSTRUCTION, prompt_variants, stochastic_prompt


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "shifted"])
def test_timesteps_are_deterministic_and_in_range(scheme: str):
    a = sample_timesteps(scheme, 4096, torch.Generator().manual_seed(0))
    b = sample_timesteps(scheme, 4096, torch.Generator().manual_seed(0))
    c = sample_timesteps(scheme, 4096, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4096,) and (a > 0).all() and (a < 1).all()


def test_timestep_distributions():
    g = torch.Generator().manual_seed(0)
    assert abs(float(sample_timesteps("uniform", 20000, g).mean()) - 0.5) < 0.01
    assert abs(float(sample_timesteps("logit_normal", 20000, g).median()) - 0.5) < 0.02
    shifted = sample_timesteps("shifted", 20000, g, shift=3.0)
    # u = 0.5 maps to 3 * 0.5 / (1 + 2 * 0.5) = 0.75: the median moves to high noise
    assert abs(float(shifted.median()) - 0.75) < 0.02
    with pytest.raises(ValueError, match="unknown timestep scheme"):
        sample_timesteps("cosine", 2, g)  # type: ignore[arg-type]


def test_interpolation_endpoints_and_velocity():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.allclose(interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(interpolate(x0, eps, torch.ones(3)), eps)
    t = torch.tensor([0.1, 0.5, 0.9])
    xt = interpolate(x0, eps, t)
    # d x_t / d t is the velocity target, so an Euler step with the true velocity is exact
    v = velocity_target(x0, eps)
    assert torch.allclose(euler_step(xt, v, 0.5, 0.0)[1], x0[1], atol=1e-6)
    assert torch.allclose(flow_matching_loss(v, x0, eps), torch.zeros(3))
    assert torch.allclose(flow_matching_loss(v + 1.0, x0, eps), torch.ones(3))


def test_timestep_bins():
    t = torch.tensor([0.0, 0.24, 0.25, 0.7, 0.999])
    assert timestep_bins(t, 4).tolist() == [0, 0, 1, 2, 3]
    assert binned_means(torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]), t, 4) == {
        "t0.00-0.25": 2.0,
        "t0.25-0.50": 5.0,
        "t0.50-0.75": 7.0,
        "t0.75-1.00": 9.0,
    }


def test_stochastic_prompting_rate_and_content():
    rng = random.Random(0)
    comps = ["two shoulder straps", "a zipper pocket"]
    results = [stochastic_prompt(comps, 0.3, rng) for _ in range(5000)]
    used = [d for _, d in results if d is not None]
    assert abs(len(used) / 5000 - 0.3) < 0.02
    assert set(used) == set(comps)
    for prompt, d in results[:50]:
        assert prompt.startswith(DEFAULT_INSTRUCTION)
        assert (d is None and prompt == DEFAULT_INSTRUCTION) or (d is not None and d in prompt)
    # pairs without descriptions always get the bare instruction
    assert all(stochastic_prompt([], 1.0, rng) == (DEFAULT_INSTRUCTION, None) for _ in range(10))
    assert [stochastic_prompt(comps, 0.5, random.Random(7)) for _ in range(3)] == [
        stochastic_prompt(comps, 0.5, random.Random(7)) for _ in range(3)
    ]
    assert len(prompt_variants(comps)) == 3
    with pytest.raises(ValueError):
        stochastic_prompt(comps, 1.5, rng)
