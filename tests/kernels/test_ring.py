"""Ring attention's merge: attention over key blocks, merged by log-sum-exp, equals attention over
all keys, whatever the blocks' sizes and order (the distributed op is in tests/runtime/test_parallel.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dacc.kernels.ring import attend_with_lse, default_scale, merge_by_lse


@pytest.mark.parametrize("sizes, order", [([5, 5], [0, 1]), ([3, 7, 1], [2, 0, 1]), ([16], [0])])
def test_blocks_merged_by_lse_equal_attention_over_all_keys(sizes, order):
    g = torch.Generator().manual_seed(sum(sizes))
    q = torch.randn(2, 3, 6, 8, generator=g) * 2  # large-ish scores: the merge must stay stable
    k = torch.randn(2, 3, sum(sizes), 8, generator=g) * 2
    v = torch.randn(2, 3, sum(sizes), 8, generator=g)
    blocks = list(zip(k.split(sizes, 2), v.split(sizes, 2)))
    out = lse = None
    for i in order:
        part, part_lse = attend_with_lse(q, *blocks[i], default_scale(8))
        out, lse = (part, part_lse) if out is None else merge_by_lse(out, lse, part, part_lse)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    ref_lse = torch.logsumexp(q @ k.transpose(-2, -1) * default_scale(8), -1)
    assert torch.allclose(lse, ref_lse, atol=1e-5)


def test_one_rank_ring_attention_is_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    got = torch.ops.dacc.ring_attention(q, k, v, 0.3, "ring", 1)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-6)
