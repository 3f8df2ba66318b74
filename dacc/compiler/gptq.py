"""GPTQ rounding for `int4_weight` (`quantize.rounding`): the same stored format as rounding to
nearest (dacc/kernels/int4.py: values in [-7, 7], one fp16 scale per group), better values in it.

Rounding each weight to its nearest level minimises the weight's error, not the layer's output
error. GPTQ quantizes the input columns one at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by how the layer's inputs correlate:

    H = sum over calibration tokens of x x^T          (input features x input features)
    for column j: q_j = round(w_j); w_{>j} -= (w_j - q_j) * Hinv[j, >j] / Hinv[j, j]

with Hinv the upper Cholesky factor of H^-1 (H damped by 1% of its mean diagonal: the published
default, not tuned here). A group's scale is taken when the sweep reaches the group, from the
weights as updated so far. H is measured on `sample()` over the calibration seeds, on the
compiler's own copy of the model, never on the seeds quality is judged on. Memory: one fp32
in x in matrix per quantized linear while the compile runs. Time: out x in^2 multiply-adds per
linear, most of them in one matmul per block of 128 columns (BLOCK below, GPTQ's lazy batch
updates).
"""
from __future__ import annotations

from typing import Callable

import torch

from dacc.compiler.search_seeds import CALIBRATION_SEEDS
from dacc.compiler.smoothing import fold_inputs
from dacc.kernels.int4 import group_scales, pack_int4, round_int4
from dacc.kernels.schemes import Tensors
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan

# Columns swept per lazy update: inside a block each column's error updates the block's later
# columns; the columns after the block take the whole block's errors in one matmul. The same
# arithmetic as updating every later column at every step, at matmul speed.
BLOCK = 128
DAMP = 0.01  # of the mean diagonal of H: keeps H^-1 well conditioned where inputs are nearly collinear
GPTQ_MODES = ("int4_weight",)


def input_hessians(model: torch.nn.Module, paths: list[str], sample: Callable,
                   seeds: tuple[int, ...] = CALIBRATION_SEEDS) -> dict[str, torch.Tensor]:
    """{path: sum of x x^T (fp32)} over every token each listed linear sees in sample() on `seeds`."""
    return fold_inputs(model, paths, sample, seeds, lambda x: x.T @ x, torch.add)


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group: int) -> Tensors:
    """The int4 tensors ({"int4": packed, "scales": fp16}) of `weight` [out, in], GPTQ-rounded."""
    wt = weight.detach().float().T.contiguous()  # [in, out]: the sweep walks input columns, each a row here
    k, n = wt.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never non-zero: any value is exact, take 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    h += DAMP * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    qt = torch.empty_like(wt)
    scales = torch.empty(n, k // group, dtype=torch.float16)
    for start in range(0, k, BLOCK):  # a group never straddles two blocks: BLOCK is a multiple of it
        end = min(start + BLOCK, k)
        errors = torch.empty(end - start, n)
        for j in range(start, end):
            g = j // group
            if j % group == 0:
                scales[:, g] = group_scales(wt[j:j + group].T)
            qt[j] = round_int4(wt[j, :, None], scales[:, g])[:, 0]
            err = (wt[j] - qt[j] * scales[:, g].float()) / hinv[j, j]
            wt[j + 1:end] -= hinv[j, j + 1:end, None] * err[None, :]
            errors[j - start] = err
        wt[end:] -= hinv[start:end, end:].T @ errors  # the block's updates to every later column, at once
    return {"int4": pack_int4(qt.T.contiguous()), "scales": scales}


def measure_hessians(plan: Plan, model: torch.nn.Module, sample: Callable | None,
                     log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """{module path: H} for every linear the plan quantizes with GPTQ rounding (none otherwise)."""
    from dacc.passes.quantize_linears import linear_modes

    q = plan.quantize
    chosen = [p for p, m in linear_modes(model, plan).items() if m in GPTQ_MODES]  # overrides included
    if not chosen or q.rounding == "nearest":
        return {}
    if sample is None:
        if q.rounding == "gptq":
            raise DaccError("quantize.rounding gptq measures the linears' inputs on sample(model, seed), which the "
                            "model file does not define", "model file",
                            "add sample(), or set quantize.rounding: nearest")
        log("quantize rounding: to nearest (the model file has no sample() to measure GPTQ's inputs on)")
        return {}
    hessians = input_hessians(model, chosen, sample)
    size = sum(h.numel() * h.element_size() for h in hessians.values())
    log(f"quantize rounding: GPTQ for {len(hessians)} linears, inputs measured on calibration seeds "
        f"{list(CALIBRATION_SEEDS)} ({size / 2**20:.1f} MiB of input statistics)"
        + (f"; {len(chosen) - len(hessians)} never ran in sample() and round to nearest"
           if len(hessians) < len(chosen) else ""))
    return hessians
