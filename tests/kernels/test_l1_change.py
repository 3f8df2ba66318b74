"""The fused cache probe: the Triton kernel (run by Triton's interpreter on CPU) against the
PyTorch reference, and the reference against the unfused definition, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from dacc.kernels import l1_change, l1_change_reference
from tests.kernels.conftest import route_to_triton


def _definition(current, previous, base):
    value = current.float() - base.float() if base is not None else current.float()
    return value, torch.stack([(value - previous.float()).abs().sum(), previous.float().abs().sum()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_matches_the_definition(dtype):
    g = torch.Generator().manual_seed(1)
    cur, base, prev = (torch.randn(2, 37, 24, generator=g).to(dtype) for _ in range(3))
    for b in (base, None):
        value, stats = l1_change_reference(cur, prev, b)
        want_value, want_stats = _definition(cur, prev, b)
        tol = 1e-6 if dtype != torch.bfloat16 else 1e-2
        assert torch.allclose(value.float(), want_value, rtol=tol, atol=tol)
        assert stats.dtype == torch.float32
        assert torch.allclose(stats, want_stats.float(), rtol=tol)
    value, stats = l1_change_reference(cur, None, base)
    assert stats is None and torch.equal(value, cur - base)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest set TRITON_INTERPRET=1


@pytest.fixture
def triton_interpreted(monkeypatch):
    return route_to_triton(monkeypatch, "dacc.kernels.l1_change_triton", "l1_change_triton")


# sizes below, at, and across the kernel's block, and one that leaves a ragged last block
@pytest.mark.parametrize("shape", [(5,), (2048,), (3, 1000, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_the_reference(triton_interpreted, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    cur, base, prev = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for b, p in ((base, prev), (None, prev), (base, None)):
        value, stats = l1_change(cur, p, b)
        want_value, want_stats = l1_change_reference(cur, p, b)
        assert value.dtype == dtype and value.shape == cur.shape
        assert torch.allclose(value.float(), want_value.float(), rtol=tol, atol=tol)
        if p is None:
            assert stats is None
        else:
            assert torch.allclose(stats, want_stats, rtol=tol)
    assert len(triton_interpreted) == 3


def test_triton_kernel_reads_non_contiguous_inputs(triton_interpreted):
    g = torch.Generator().manual_seed(3)
    cur, base, prev = (torch.randn(64, 48, generator=g).to(DEVICE).t() for _ in range(3))
    value, stats = l1_change(cur, prev, base)
    want_value, want_stats = l1_change_reference(cur, prev, base)
    assert torch.allclose(value, want_value) and torch.allclose(stats, want_stats, rtol=1e-5)
    assert triton_interpreted == [1]


def test_bad_shapes_and_choice_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="previous has shape"):
        l1_change(torch.zeros(3), torch.zeros(4))
    monkeypatch.setenv("DACC_KERNELS", "fast")
    with pytest.raises(ValueError, match="DACC_KERNELS='fast'"):
        l1_change(torch.zeros(3), None)
