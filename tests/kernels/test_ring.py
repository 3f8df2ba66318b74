"""Ring attention's merge: attention over key blocks, merged by log-sum-exp, equals attention over
all keys, whatever the blocks' sizes and order (the distributed op is in tests/runtime/test_parallel.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dacc.kernels.ring import attend_with_lse, default_scale, merge_by_lse, merge_by_lse_reference


@pytest.fixture(params=["reference", "triton"])
def kernels(request, monkeypatch):
    """The merge as dispatched: the PyTorch reference, or the Triton kernel (in Triton's interpreter
    without a GPU), with its launches counted."""
    monkeypatch.setenv("DACC_KERNELS", request.param)
    launches = []
    if request.param == "triton":
        pytest.importorskip("triton", reason="the test extra installs triton")
        import dacc.kernels.ring_triton as kernel_module
        kernel = kernel_module.merge_by_lse_triton
        monkeypatch.setattr(kernel_module, "merge_by_lse_triton", lambda *a: launches.append(1) or kernel(*a))
    return request.param, launches


@pytest.mark.parametrize("sizes, order", [([5, 5], [0, 1]), ([3, 7, 1], [2, 0, 1]), ([16], [0])])
def test_blocks_merged_by_lse_equal_attention_over_all_keys(kernels, sizes, order):
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
    assert len(kernels[1]) == (len(sizes) - 1 if kernels[0] == "triton" else 0)


def test_triton_merge_matches_the_reference_on_odd_shapes(kernels):
    """Head dims that are not powers of two, rows that do not fill a block, far-apart log-sum-exps."""
    if kernels[0] != "triton":
        pytest.skip("the reference is the comparison")
    from dacc.kernels.ring_triton import merge_by_lse_triton

    g = torch.Generator().manual_seed(5)
    for shape in [(1, 1, 1, 3), (2, 3, 17, 24), (1, 5, 33, 72)]:
        out, part = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        lse, part_lse = torch.randn(shape[:-1], generator=g) * 30, torch.randn(shape[:-1], generator=g) * 30
        got, got_lse = merge_by_lse_triton(out, lse, part, part_lse)
        ref, ref_lse = merge_by_lse_reference(out, lse, part, part_lse)
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5) and torch.allclose(got_lse, ref_lse, atol=1e-5)


def test_one_rank_ring_attention_is_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=g) for _ in range(3))
    got = torch.ops.dacc.ring_attention(q, k, v, 0.3, "ring", 1, [9], 1)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-6)
