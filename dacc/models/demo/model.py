"""Model file of the demo (see README.md 'Model files'): `dacc compile dacc/models/demo/model.py`.

The transformer is called with batched classifier-free guidance, so its batch is twice the number
of images; the batch dimension is dynamic, so one program serves every grid size.
"""
from __future__ import annotations

import torch

from dacc.models.demo import NULL_CLASS, image_ids, load_encoder, load_transformer, text_ids
from dacc.models.demo.sampler import generate, initial_noise


def build():
    return load_transformer()


def _call(labels: torch.Tensor, sigma: float, seed: int) -> dict:
    n = labels.shape[0]
    prompt, pooled = load_encoder()(torch.cat([labels, torch.full_like(labels, NULL_CLASS)]))
    x = initial_noise(n, seed)
    return dict(hidden_states=torch.cat([x, x]), encoder_hidden_states=prompt.detach(),
                pooled_projections=pooled.detach(), timestep=torch.full((2 * n,), sigma),
                img_ids=image_ids(), txt_ids=text_ids())


def example_inputs():
    return _call(torch.tensor([3, 7]), 0.7, seed=0)


def more_example_inputs():
    return [_call(torch.arange(10), 0.3, seed=1)]


def sample(model, seed: int, steps: int = 50) -> torch.Tensor:
    """One generation: one image of every class from `seed`, (10, 16, 16) in [0, 1]."""
    return generate(model, load_encoder(), torch.arange(10), steps=steps, seed=seed).images
