"""The fused skip (x + Σ w_k r_k): the Triton kernel (run by Triton's interpreter on CPU) against
the PyTorch reference, and the reference against the definition, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from dacc.kernels import add_weighted, add_weighted_reference
from tests.kernels.conftest import route_to_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest set TRITON_INTERPRET=1


def _case(shape, dtype, terms: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x, *rs = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(terms + 1))
    weights = (torch.rand(terms, generator=g) * 4 - 2).tolist()
    return x, rs, weights


def _definition(x, rs, weights):
    return x.double() + sum(w * r.double() for w, r in zip(weights, rs))


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_matches_the_definition(terms, dtype):
    x, rs, weights = _case((2, 37, 24), dtype, terms, seed=terms)
    got = add_weighted_reference(x, rs, weights)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 3e-2
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.allclose(got.double(), _definition(x, rs, weights), rtol=tol, atol=tol)


@pytest.fixture
def triton_interpreted(monkeypatch):
    return route_to_triton(monkeypatch, "dacc.kernels.add_weighted_triton", "add_weighted_triton")


# sizes below, at, and across the kernel's block, and one that leaves a ragged last block
@pytest.mark.parametrize("shape", [(5,), (2048,), (3, 1000, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_the_reference(triton_interpreted, shape, dtype):
    for terms in (1, 2, 3):
        x, rs, weights = _case(shape, dtype, terms, seed=sum(shape) + terms)
        got = add_weighted(x, rs, weights)
        # the kernel sums in fp32 and rounds once: against the definition, not the bf16 reference
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.allclose(got.double(), _definition(x, rs, weights), rtol=tol, atol=tol)
    assert len(triton_interpreted) == 3


def test_triton_kernel_reads_non_contiguous_inputs(triton_interpreted):
    x, rs, weights = _case((64, 48), torch.float32, 2, seed=9)
    x, rs = x.t(), [r.t() for r in rs]
    got = add_weighted(x, rs, weights)
    assert torch.allclose(got, add_weighted_reference(x, rs, weights), rtol=1e-5, atol=1e-5)
    assert triton_interpreted == [1]


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_weights_in_a_tensor_and_an_out_buffer(triton_interpreted, terms):
    """The form a CUDA graph replays: weights read from device memory, the result written into a
    given buffer. Kernel and reference both, against the definition; a later write to the
    weights tensor changes the next result (nothing was read at call time from the host)."""
    x, rs, weights = _case((3, 700), torch.float32, terms, seed=40 + terms)
    w = torch.tensor(weights, device=DEVICE)
    for fn in (add_weighted, add_weighted_reference):
        out = torch.full_like(x, float("nan"))
        assert fn(x, rs, w, out=out) is out
        assert torch.allclose(out.double(), _definition(x, rs, weights), rtol=1e-5, atol=1e-5)
        w.mul_(-0.5)
        fn(x, rs, w, out=out)
        assert torch.allclose(out.double(), _definition(x, rs, [v * -0.5 for v in weights]), rtol=1e-5, atol=1e-5)
        w.copy_(torch.tensor(weights))
    assert len(triton_interpreted) == 2


def test_a_non_contiguous_out_buffer_takes_the_reference(triton_interpreted):
    x, rs, weights = _case((64, 48), torch.float32, 2, seed=11)
    out = torch.empty(48, 64).t()
    add_weighted(x, rs, torch.tensor(weights), out=out)
    assert torch.allclose(out.double(), _definition(x, rs, weights), rtol=1e-5, atol=1e-5)
    assert triton_interpreted == []


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="4 terms"):
        add_weighted(torch.zeros(3), [torch.zeros(3)] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="a term has shape"):
        add_weighted(torch.zeros(3), [torch.zeros(4)], [1.0])
    with pytest.raises(ValueError, match="out has shape"):
        add_weighted(torch.zeros(3), [torch.zeros(3)], [1.0], out=torch.zeros(2))
    with pytest.raises(ValueError, match="tensor weights must be 1-D"):
        add_weighted(torch.zeros(3), [torch.zeros(3)], torch.ones(1, 1))
