"""Int8 references against their defining formulas, and the dacc operators against the
references: registration (schema, fake, dispatch) checked by torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dacc  # noqa: F401  registers the operators
from dacc.kernels import int8_onednn
from dacc.kernels.dispatch import int8_activation_qmax
from dacc.kernels.int8 import (dequantize_weight_int8, linear_int8_dynamic_reference, quantize_rows_int8,
                               quantize_weight_int8)

SHAPES = [((2, 7, 64), 48), ((3, 33), 17), ((1, 16), 16), ((4, 5, 130), 70)]  # some not multiples of 8/16


def _inputs(xshape, out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xshape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as DiT activations have
    w = torch.randn(out, xshape[-1], generator=g) / xshape[-1] ** 0.5
    return x, w, torch.randn(out, generator=g)


@pytest.mark.parametrize("xshape, out", SHAPES)
def test_weight_quantization_is_within_half_a_step(xshape, out):
    _, w, _ = _inputs(xshape, out, seed=1)
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (out,)
    assert torch.equal(q.abs().amax(1), torch.full((out,), 127, dtype=torch.int8))  # the range is used fully
    err = (dequantize_weight_int8(q, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_rows_quantizer_and_zero_rows():
    x = torch.randn(5, 40)
    x[2] = 0
    q, s = quantize_rows_int8(x)
    assert torch.equal(q[2], torch.zeros(40, dtype=torch.int8))
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-7).all()


@pytest.mark.parametrize("xshape, out", SHAPES)
def test_dynamic_reference_is_the_int8_formula(xshape, out):
    """Integer matmul of the quantized operands, rescaled, equals the float matmul of the
    dequantized operands (exact in fp32 at these sizes)."""
    x, w, b = _inputs(xshape, out, seed=2)
    q, scale = quantize_weight_int8(w)
    xq, xs = quantize_rows_int8(x)
    expected = F.linear(xq.float() * xs, dequantize_weight_int8(q, scale, torch.float32), b)
    got = linear_int8_dynamic_reference(x, q, scale, b)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - F.linear(x, w, b)).abs().max() / F.linear(x, w, b).abs().max() < 0.05  # and still a linear


@pytest.mark.parametrize("name", ["linear_int8_weight", "linear_int8_dynamic"])
@pytest.mark.parametrize("xshape, out", SHAPES[:2])
def test_operators_are_registered_correctly(name, xshape, out):
    x, w, b = _inputs(xshape, out, seed=3)
    q, scale = quantize_weight_int8(w)
    op = getattr(torch.ops.dacc, name)
    for bias in (b, None):
        torch.library.opcheck(op, (x, q, scale, bias), test_utils=("test_schema", "test_faketensor"))
    with FlopCounterMode(display=False) as counter:
        y = op(x, q, scale, b)
    assert counter.get_total_flops() == 2 * x[..., 0].numel() * out * xshape[-1]
    assert y.shape == (*xshape[:-1], out)


needs_onednn = pytest.mark.skipif(not int8_onednn.available(), reason="oneDNN's quantized linear needs an x86 CPU")


@needs_onednn
@pytest.mark.parametrize("xshape, out", SHAPES + [((0, 24), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_gemm_is_the_reference_at_its_activation_range(xshape, out, dtype):
    """The CPU kernel computes the int8 formula exactly (7-bit activations where it must)."""
    x, w, b = _inputs(xshape, out, seed=4)
    q, scale = quantize_weight_int8(w)
    x, b = x.to(dtype), b.to(dtype)
    got = torch.ops.dacc.linear_int8_dynamic(x, q, scale, b)
    expected = linear_int8_dynamic_reference(x, q, scale, b, int8_activation_qmax(x))
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.allclose(got.float(), expected.float(), rtol=1e-5, atol=1e-5) if dtype == torch.float32 else \
        torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@needs_onednn
def test_onednn_repacks_a_weight_changed_in_place_and_forgets_a_dead_one(monkeypatch):
    x, w, b = _inputs((3, 40), 12, seed=5)
    q, scale = quantize_weight_int8(w)
    first = torch.ops.dacc.linear_int8_dynamic(x, q, scale, b)
    q.neg_()  # same tensor, new contents: the packed copy must not be reused
    assert torch.allclose(torch.ops.dacc.linear_int8_dynamic(x, q, scale, b) - b, -(first - b), atol=1e-5)
    key = id(q)
    assert key in int8_onednn._PACKED
    del q
    assert key not in int8_onednn._PACKED
    monkeypatch.setenv("DACC_KERNELS", "reference")  # the reference keeps the full 8 bits
    q, scale = quantize_weight_int8(w)
    assert torch.equal(torch.ops.dacc.linear_int8_dynamic(x, q, scale, b), linear_int8_dynamic_reference(x, q, scale, b))
