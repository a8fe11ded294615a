"""Stochastic prompting for the back-view model (Know3D §3.1.2).

The prompt is a fixed instruction describing the camera rotation to the back view, plus — with
probability ``p`` — one description drawn from the pair's annotation set. Pairs without
descriptions always get the bare instruction, so unconditional back-view training keeps using
them. Randomness is explicit (a ``random.Random`` per call site), so a seed reproduces a run.
"""

from __future__ import annotations

import random

DEFAULT_INSTRUCTION = (
    "Rotate the camera 180 degrees around the object and show the back view of the same object, "
    "keeping its identity, pose, proportions and style."
)


def build_prompt(description: str | None, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The instruction, plus "The back shows <description>." when a description is given."""
    description = (description or "").strip().rstrip(".")
    return f"{instruction} The back shows {description}." if description else instruction


def stochastic_prompt(
    components: list[str], p: float, rng: random.Random, instruction: str = DEFAULT_INSTRUCTION
) -> tuple[str, str | None]:
    """(prompt, the description used or None)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if components and rng.random() < p:
        description = rng.choice(components)
        return build_prompt(description, instruction), description
    return instruction, None


def prompt_variants(components: list[str], instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
    """Every prompt a pair can get: used to pre-compute prompt embeddings once per variant."""
    return [instruction] + [build_prompt(c, instruction) for c in components]
