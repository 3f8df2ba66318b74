"""Euler sampler for the rectified-flow demo model, with batched classifier-free guidance.

It calls the transformer exactly as a diffusers Flux pipeline does (keyword arguments,
`timestep` = sigma in [1, 0], `return_dict=False`), so a compiled artifact is a drop-in.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dacc.models.demo import NULL_CLASS, GRID, CHANNELS, ClassEncoder, image_ids, text_ids, unpack


@dataclass
class Generation:
    images: torch.Tensor  # (B, 16, 16) in [0, 1]
    transformer_seconds: float


def initial_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, GRID * GRID, CHANNELS, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(transformer, encoder: ClassEncoder, labels: torch.Tensor, *, steps: int = 50,
             guidance: float = 4.0, seed: int = 0, progress: bool = False, desc: str = "sampling",
             on_step=None) -> Generation:
    """`on_step(i, timestep)` is called before each transformer call (as a pipeline's
    `_current_timestep` would be set)."""
    labels = labels.long()
    n = labels.shape[0]
    x = initial_noise(n, seed)
    cond = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    prompt, pooled = encoder(cond)
    img, txt = image_ids(), text_ids()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    spent = 0.0
    context = getattr(transformer, "cache_context", None) or (lambda name: contextlib.nullcontext())
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        sigma = sigmas[i]
        if on_step is not None:
            on_step(i, float(sigma) * 1000)
        start = time.perf_counter()
        with context("cond"):  # as diffusers pipelines call their transformer
            v = transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=prompt,
                            pooled_projections=pooled, timestep=sigma.expand(2 * n).contiguous(), img_ids=img,
                            txt_ids=txt, return_dict=False)[0]
        spent += time.perf_counter() - start
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (sigmas[i + 1] - sigma) * v
    images = ((unpack(x) + 1) / 2).clamp(0, 1)
    return Generation(images, spent)
