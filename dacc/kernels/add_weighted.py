"""A skipped step's outputs in one pass: out = x + Σ w_k r_k, the stream's input plus the cached
residuals weighted for this step (a reuse: one residual, weight 1; a Taylor forecast: the newest
order + 1 residuals, their interpolation weights at this step, `cache.forecast_weights`).

Unfused, an order-1 forecast is five elementwise passes per stream (divided differences, then
the polynomial) plus the add; this is one, so a skipped step costs one launch per stream on
CUDA. The weights are host floats: they depend on the step indices alone."""
from __future__ import annotations

import torch

from dacc.kernels.dispatch import use_triton

MAX_TERMS = 3  # Taylor order 2 at most (plan schema): three residuals


def add_weighted_reference(x: torch.Tensor, terms: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.add(x, terms[0], alpha=weights[0])
    for t, w in zip(terms[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def add_weighted(x: torch.Tensor, terms: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if not 1 <= len(terms) <= MAX_TERMS or len(weights) != len(terms):
        raise ValueError(f"add_weighted: {len(terms)} terms and {len(weights)} weights (1 to {MAX_TERMS}, one each)")
    for t in terms:
        if t.shape != x.shape:
            raise ValueError(f"add_weighted: a term has shape {tuple(t.shape)}, x {tuple(x.shape)}")
    if use_triton(x) and x.numel() > 0:
        from dacc.kernels.add_weighted_triton import add_weighted_triton
        return add_weighted_triton(x, terms, weights)
    return add_weighted_reference(x, terms, weights)
