"""Triton kernel for `l1_change`: reads current, base and previous once, writes the value, and
leaves one partial [Σ|value - previous|, Σ|previous|] per block; the partials are summed in a
fixed order afterwards (no atomics), so the statistic is deterministic run to run."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _l1_change_kernel(cur_ptr, base_ptr, prev_ptr, out_ptr, partial_ptr, n,
                      HAS_BASE: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(cur_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        # rounded to the storage type as an unfused subtraction would, before the statistic sees it
        value = (v - tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, value, mask=mask)
        v = value.to(tl.float32)
    if HAS_PREV:
        p = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.abs(v - p), axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.abs(p), axis=0))


def l1_change_triton(current: torch.Tensor, previous: torch.Tensor | None,
                     base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    cur = current.contiguous()
    if base is None and previous is None:
        return cur, None
    n = cur.numel()
    blocks = triton.cdiv(n, BLOCK)
    value = torch.empty_like(cur) if base is not None else cur
    partial = torch.empty((blocks, 2), dtype=torch.float32, device=cur.device) if previous is not None else cur
    _l1_change_kernel[(blocks,)](
        cur, base.contiguous() if base is not None else cur, previous.contiguous() if previous is not None else cur,
        value, partial, n, HAS_BASE=base is not None, HAS_PREV=previous is not None, BLOCK=BLOCK)
    return value, (partial.sum(0) if previous is not None else None)
