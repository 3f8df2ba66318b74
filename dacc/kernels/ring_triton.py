"""Triton kernel for ring attention's merge (dacc/kernels/ring.py `merge_by_lse`): two partial
outputs over disjoint key blocks and their log-sum-exps -> the output over both, in one pass over
the [rows, head_dim] outputs (the PyTorch reference makes five temporaries of that size). Rows are
every (batch, head, query) position; fp32 throughout, as the reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, part_ptr, part_lse_ptr, merged_ptr, total_ptr, rows, dim,
                  BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    a = tl.load(lse_ptr + r, mask=row_ok, other=0.0)
    b = tl.load(part_lse_ptr + r, mask=row_ok, other=0.0)
    top = tl.maximum(a, b)  # logaddexp, shifted by the larger so neither exp overflows
    total = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
    tl.store(total_ptr + r, total, mask=row_ok)
    wa = tl.exp(a - total)[:, None]
    wb = tl.exp(b - total)[:, None]
    offs = r[:, None] * dim + d[None, :]
    ok = row_ok[:, None] & (d[None, :] < dim)
    x = tl.load(out_ptr + offs, mask=ok, other=0.0)
    y = tl.load(part_ptr + offs, mask=ok, other=0.0)
    tl.store(merged_ptr + offs, x * wa + y * wb, mask=ok)


def merge_by_lse_triton(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor,
                        part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dim = out.shape[-1]
    rows = out.numel() // dim
    merged = torch.empty_like(out, dtype=torch.float32).contiguous()
    total = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    _merge_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        out.float().contiguous(), lse.float().contiguous(), part.float().contiguous(), part_lse.float().contiguous(),
        merged, total, rows, dim, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(dim))
    return merged, total
