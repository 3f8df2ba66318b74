"""Model file of the demo (see README.md 'Model files'): `dacc compile dacc/models/demo/model.py`.

The transformer is called with batched classifier-free guidance, so its batch is twice the number
of images; the batch dimension is dynamic, so one program serves every grid size.
"""
from __future__ import annotations

import torch

from dacc.models import flow
from dacc.models.demo import DEMO


def build():
    return DEMO.load_transformer()


def example_inputs():
    return flow.cfg_inputs(DEMO, torch.tensor([3, 7]), 0.7, seed=0)


def more_example_inputs():
    return [flow.cfg_inputs(DEMO, torch.arange(10), 0.3, seed=1)]


def sample(model, seed: int, steps: int | None = None) -> torch.Tensor:
    """One generation: one image of every class from `seed`, (10, 16, 16) in [0, 1], in the
    artifact's number of steps (50 for a plain module)."""
    return flow.sample(DEMO, model, seed, steps)
