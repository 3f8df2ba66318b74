"""A skipped step's outputs in one pass: out = x + Σ w_k r_k, the stream's input plus the cached
residuals weighted for this step (a reuse: one residual, weight 1; a Taylor forecast: the newest
order + 1 residuals, their interpolation weights at this step, `cache.forecast_weights`).

Unfused, an order-1 forecast is five elementwise passes per stream (divided differences, then
the polynomial) plus the add; this is one, so a skipped step costs one launch per stream on
CUDA. The weights are host floats (they depend on the step indices alone), or a 1-D tensor on
x's device: a CUDA graph replays one captured skip with this step's weights
(dacc/runtime/graph_step.py), and `out=` writes where the captured computed path wrote."""
from __future__ import annotations

import torch

from dacc.kernels.dispatch import use_triton

MAX_TERMS = 3  # Taylor order 2 at most (plan schema): three residuals

Weights = list[float] | torch.Tensor


def add_weighted_reference(x: torch.Tensor, terms: list[torch.Tensor], weights: Weights,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):  # x + t0 * w[0], then + t_k * w[k]: no host read of w
        out = torch.addcmul(x, terms[0], weights[0], out=out)  # out=None: a new tensor
        for k, t in enumerate(terms[1:], 1):
            out.addcmul_(t, weights[k])
        return out
    out = torch.add(x, terms[0], alpha=weights[0], out=out)
    for t, w in zip(terms[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def add_weighted(x: torch.Tensor, terms: list[torch.Tensor], weights: Weights,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    if not 1 <= len(terms) <= MAX_TERMS or len(weights) != len(terms):
        raise ValueError(f"add_weighted: {len(terms)} terms and {len(weights)} weights (1 to {MAX_TERMS}, one each)")
    for what, t in [*(("a term", t) for t in terms), ("out", out)]:
        if t is not None and t.shape != x.shape:
            raise ValueError(f"add_weighted: {what} has shape {tuple(t.shape)}, x {tuple(x.shape)}")
    if isinstance(weights, torch.Tensor) and (weights.dim() != 1 or weights.device != x.device):
        raise ValueError(f"add_weighted: tensor weights must be 1-D on {x.device}, got {tuple(weights.shape)} on "
                         f"{weights.device}")
    if use_triton(x) and x.numel() > 0 and (out is None or out.is_contiguous()):
        from dacc.kernels.add_weighted_triton import add_weighted_triton
        return add_weighted_triton(x, terms, weights, out)
    return add_weighted_reference(x, terms, weights, out)
