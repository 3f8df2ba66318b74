"""fp8 and int4 references against their defining formulas, and their dacc operators
(schema, fake, FLOP formula) through torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dacc  # noqa: F401  registers the operators
from dacc.kernels.fp8 import FP8, FP8_MAX, linear_fp8_dynamic_reference, quantize_rows_fp8, quantize_weight_fp8
from dacc.kernels.int4 import (dequantize_weight_int4, linear_int4_weight_reference, quantize_weight_int4,
                               unpack_int4)

SHAPES = [((2, 7, 64), 48), ((3, 128), 17), ((1, 64), 16), ((4, 5, 192), 70)]


def _inputs(xshape, out, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xshape, generator=g)
    x[..., 3] *= 20  # an outlier channel
    w = torch.randn(out, xshape[-1], generator=g) / xshape[-1] ** 0.5
    return x, w, torch.randn(out, generator=g)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("xshape, out", SHAPES)
def test_int4_packs_two_per_byte_within_half_a_step(xshape, out, group):
    _, w, _ = _inputs(xshape, out, seed=1)
    packed, scales = quantize_weight_int4(w, group)
    k = xshape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (out, k // 2) and scales.shape == (out, k // group)
    q = unpack_int4(packed)
    assert q.abs().max() <= 7
    # element 2i is the low nibble of byte i, offset by 8
    assert torch.equal((packed & 0xF).to(torch.int8) - 8, q[:, 0::2])
    assert torch.equal((packed >> 4).to(torch.int8) - 8, q[:, 1::2])
    step = scales.repeat_interleave(group, dim=1)
    assert ((dequantize_weight_int4(packed, scales, torch.float32) - w).abs() <= step / 2 + 1e-7).all()
    # each group uses its whole range: its absmax maps to +-7
    assert torch.equal(q.reshape(out, -1, group).abs().amax(-1), torch.full((out, k // group), 7, dtype=torch.int8))


def test_int4_refuses_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="not a multiple of the group size 64"):
        quantize_weight_int4(torch.randn(8, 96), 64)


@pytest.mark.parametrize("xshape, out", SHAPES)
def test_fp8_reference_is_the_scaled_formula(xshape, out):
    x, w, b = _inputs(xshape, out, seed=2)
    q, scale = quantize_weight_fp8(w)
    assert q.dtype == FP8 and q.float().abs().max() <= FP8_MAX
    xq, xs = quantize_rows_fp8(x)
    expected = F.linear(xq.float() * xs, q.float() * scale[:, None], b)
    got = linear_fp8_dynamic_reference(x, q, scale, b)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
    exact = F.linear(x, w, b)
    assert (got - exact).norm() / exact.norm() < 0.08  # e4m3: 3 mantissa bits on both operands


def test_fp8_keeps_the_activation_dtype():
    x, w, b = _inputs((3, 64), 16, seed=4)
    q, scale = quantize_weight_fp8(w)
    y = linear_fp8_dynamic_reference(x.bfloat16(), q, scale, b.bfloat16())
    assert y.dtype == torch.bfloat16
    assert (y.float() - linear_fp8_dynamic_reference(x, q, scale, b)).abs().max() < 0.05 * y.float().abs().max()


@pytest.mark.parametrize("xshape, out", SHAPES[:2])
def test_operators_are_registered_correctly(xshape, out):
    x, w, b = _inputs(xshape, out, seed=3)
    k = xshape[-1]
    # opcheck's schema test compares inputs by arithmetic torch lacks for float8 on CPU, so the fp8
    # op gets the fake-tensor test only (its schema is the same as the int8 ops')
    cases = [(torch.ops.dacc.linear_fp8_dynamic, quantize_weight_fp8(w), ("test_faketensor",)),
             (torch.ops.dacc.linear_int4_weight, quantize_weight_int4(w, 32), ("test_schema", "test_faketensor"))]
    for op, (q, scale), checks in cases:
        for bias in (b, None):
            torch.library.opcheck(op, (x, q, scale, bias), test_utils=checks)
        with FlopCounterMode(display=False) as counter:
            y = op(x, q, scale, b)
        assert counter.get_total_flops() == 2 * x[..., 0].numel() * out * k
        assert y.shape == (*xshape[:-1], out)
    assert torch.equal(torch.ops.dacc.linear_int4_weight(x, *cases[1][1], b),
                       linear_int4_weight_reference(x, *cases[1][1], b))
