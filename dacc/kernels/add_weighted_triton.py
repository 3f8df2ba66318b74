"""Triton kernel for `add_weighted`: reads x and up to three residuals once, sums in fp32, and
rounds once to the storage type. The weights are kernel arguments, or read from a device tensor
(W_IN_MEMORY) so that a captured CUDA graph takes new weights on each replay."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _add_weighted_kernel(x_ptr, r0_ptr, r1_ptr, r2_ptr, out_ptr, w_ptr, w0, w1, w2, n,
                         TERMS: tl.constexpr, W_IN_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if W_IN_MEMORY:  # one branch is compiled: the other's names need not match its types
        a0 = tl.load(w_ptr).to(tl.float32)
        a1 = a0
        a2 = a0
        if TERMS > 1:
            a1 = tl.load(w_ptr + 1).to(tl.float32)
        if TERMS > 2:
            a2 = tl.load(w_ptr + 2).to(tl.float32)
    else:
        a0 = w0
        a1 = w1
        a2 = w2
    acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc += a0 * tl.load(r0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS > 1:
        acc += a1 * tl.load(r1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TERMS > 2:
        acc += a2 * tl.load(r2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def add_weighted_triton(x: torch.Tensor, terms: list[torch.Tensor], weights: list[float] | torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """`out`, when given, is contiguous (add_weighted checks)."""
    x = x.contiguous()
    rs = [t.contiguous() for t in terms] + [x] * (3 - len(terms))  # unused slots: never read
    in_memory = isinstance(weights, torch.Tensor)
    ws = [0.0] * 3 if in_memory else [float(w) for w in weights] + [0.0] * (3 - len(weights))
    w_ptr = weights.contiguous() if in_memory else x  # never read without W_IN_MEMORY
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    _add_weighted_kernel[(triton.cdiv(n, BLOCK),)](x, *rs, out, w_ptr, *ws, n, TERMS=len(terms),
                                                   W_IN_MEMORY=in_memory, BLOCK=BLOCK)
    return out
