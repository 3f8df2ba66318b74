"""Model file of the glyphs model: `dacc compile dacc/models/glyphs/model.py`.

The transformer is called with batched classifier-free guidance, so its batch is twice the number
of images; the batch dimension is dynamic, so one program serves every grid size.
"""
from __future__ import annotations

import torch

from dacc.models.flow import generate
from dacc.models.glyphs import GLYPHS


def build():
    return GLYPHS.load_transformer()


def _call(labels: torch.Tensor, sigma: float, seed: int) -> dict:
    n = labels.shape[0]
    prompt, pooled = GLYPHS.load_encoder()(torch.cat([labels, torch.full_like(labels, GLYPHS.null_class)]))
    x = GLYPHS.noise(n, seed)
    return dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=prompt.detach(),
                pooled_projections=pooled.detach(), timestep=torch.full((2 * n,), sigma * 1000))


def example_inputs():
    return _call(torch.tensor([3, 7]), 0.7, seed=0)


def more_example_inputs():
    return [_call(torch.arange(10), 0.3, seed=1)]


def sample(model, seed: int, steps: int = 50) -> torch.Tensor:
    """One generation: one image of every class from `seed`, (10, 16, 16) in [0, 1]."""
    return generate(GLYPHS, model, GLYPHS.load_encoder(), torch.arange(10), steps=steps, seed=seed).images
