"""Euler sampler for the rectified-flow demo model, with batched classifier-free guidance
(dacc/models/flow.py's, bound to the demo).

It calls the transformer exactly as a diffusers Flux pipeline does (keyword arguments,
`timestep` = sigma in [1, 0], `return_dict=False`), so a compiled artifact is a drop-in.
"""
from __future__ import annotations

import torch

from dacc.models import flow
from dacc.models.demo import DEMO, ClassEncoder
from dacc.models.flow import Generation

__all__ = ["Generation", "generate", "initial_noise"]


def initial_noise(n: int, seed: int) -> torch.Tensor:
    return DEMO.noise(n, seed)


def generate(transformer, encoder: ClassEncoder, labels: torch.Tensor, **kwargs) -> Generation:
    """`flow.generate` for the demo: steps (50), guidance (4.0), seed, progress, desc, on_step."""
    return flow.generate(DEMO, transformer, encoder, labels, **kwargs)
