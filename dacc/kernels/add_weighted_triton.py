"""Triton kernel for `add_weighted`: reads x and up to three residuals once, sums in fp32, and
rounds once to the storage type."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _add_weighted_kernel(x_ptr, r0_ptr, r1_ptr, r2_ptr, out_ptr, w0, w1, w2, n,
                         TERMS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc += w0 * tl.load(r0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS > 1:
        acc += w1 * tl.load(r1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS > 2:
        acc += w2 * tl.load(r2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def add_weighted_triton(x: torch.Tensor, terms: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    x = x.contiguous()
    rs = [t.contiguous() for t in terms] + [x] * (3 - len(terms))  # unused slots: never read
    ws = [float(w) for w in weights] + [0.0] * (3 - len(weights))
    out = torch.empty_like(x)
    n = x.numel()
    _add_weighted_kernel[(triton.cdiv(n, BLOCK),)](x, *rs, out, *ws, n, TERMS=len(terms), BLOCK=BLOCK)
    return out
