"""The quantized-linear Triton kernels against their PyTorch references, on fresh random inputs:
run by Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), and
on the GPU by the CUDA test. Shapes are on and off the block sizes so the ragged-edge masks run."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (the test extra installs it)")

from dacc.kernels.fp8 import quantize_rows_fp8  # noqa: E402
from dacc.kernels.int4 import linear_int4_weight_reference, quantize_weight_int4  # noqa: E402
from dacc.kernels.int8 import linear_int8_dynamic_reference, quantize_rows_int8, quantize_weight_int8  # noqa: E402
from dacc.kernels.quant_triton import int4_linear_triton, int8_linear_triton, quantize_rows_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter
INTERPRETED = DEVICE == "cpu"


def _randn(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape).to(device, dtype)


def _bits(q: torch.Tensor) -> torch.Tensor:
    """int8 or fp8 as bytes, so equality is bitwise (fp8 -0.0 included)."""
    return q.view(torch.uint8)


def _check_quantize(x: torch.Tensor, fp8: bool, **blocks) -> None:
    q, scale = quantize_rows_triton(x, fp8, **blocks)
    want_q, want_scale = (quantize_rows_fp8 if fp8 else quantize_rows_int8)(x)
    assert q.dtype == want_q.dtype and q.shape == x.shape and scale.shape == (x.shape[0], 1)
    assert scale.dtype == torch.float32 and torch.equal(scale, want_scale)
    assert torch.equal(_bits(q), _bits(want_q))


def _check_int8_linear(x, weight, bias, **blocks) -> None:
    """int8_linear_triton on the reference quantizer's activations, and quantize_rows_triton
    composed with it, against linear_int8_dynamic_reference on the float x."""
    qweight, w_scale = quantize_weight_int8(weight)
    want = linear_int8_dynamic_reference(x, qweight, w_scale, bias)
    xq, x_scale = quantize_rows_int8(x)
    got = int8_linear_triton(xq, x_scale, qweight, w_scale, bias, x.dtype, **blocks)
    composed = int8_linear_triton(*quantize_rows_triton(x, False), qweight, w_scale, bias, x.dtype, **blocks)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if x.dtype == torch.float32 else 2 ** -8  # GPUs may fuse the epilogue into FMAs
    atol = tol * float(want.float().abs().max())
    for out in (got, composed):
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=atol)
        if INTERPRETED:  # exact int32 sums and the same fp32 operations in the same order
            assert torch.equal(out, want)


def _check_int4_linear(x, weight, group, bias, **blocks) -> None:
    packed, scales = quantize_weight_int4(weight, group)
    want = linear_int4_weight_reference(x, packed, scales, bias)
    got = int4_linear_triton(x, packed, scales, bias, **blocks)
    assert got.dtype == x.dtype and got.shape == want.shape
    # fp32: summation order only; 16-bit: both round the output, the reference maybe twice with bias
    tol = 1e-4 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()))


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (5, 200), (70, 96)])
def test_quantize_rows_matches_the_reference_bitwise(m, k, dtype, fp8):
    torch.manual_seed(m * 1000 + k)
    x = _randn(m, k, dtype=dtype) * 3
    if m > 1:
        x[1] = 0  # all-zero row: scale EPS / QMAX, zeros
    _check_quantize(x, fp8)


@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_quantize_rows_reads_strided_views(fp8):
    torch.manual_seed(7)
    base = _randn(6, 211)
    _check_quantize(base[:, 5:205], fp8)  # a column slice: row stride 211
    _check_quantize(_randn(150, 9).t(), fp8)  # a transpose: row stride 1, column stride 9
    _check_quantize(base[::2, 5:205], fp8, BLOCK_M=1, BLOCK_K=32)  # other block sizes


def test_int8_rounds_ties_to_even():
    # absmax 127 makes the scale exactly 1, so x / scale = x and the .5s are exact ties
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 64.5, -64.5, 0.0])
    torch.manual_seed(11)
    x = torch.cat([torch.tensor([127.0]), ties, (torch.randn(100) * 50).clamp(-126, 126)]).repeat(3, 1)
    x[1] = -x[1]
    x[2, 13:] = x[2, 13:].round() + 0.5  # every random value a tie too
    tie = x.abs() % 1 == 0.5
    assert tie.sum() >= 3 * 11 + 100
    _check_quantize(x.to(DEVICE), False)
    q, _ = quantize_rows_triton(x.to(DEVICE), False)
    assert (q.cpu()[tie] % 2 == 0).all()  # to even, where half away from zero would be odd


def test_fp8_rounds_to_nearest_even_e4m3():
    # absmax 448 makes the scale exactly 1; ties on e4m3's grid, subnormals (step 2**-9) and
    # their ties, the subnormal/normal boundary, a mantissa carry, saturation and signed zeros
    values = [448.0, 100.0, 17.0, 1.0625, 1.9999, 3 * 2 ** -10, 2 ** -10, 5 * 2 ** -10, 0.0155,
              0.015625, 0.0012, 1e-5, -1e-5, -0.0, 0.0, 300.0, 239.9, -100.0, -17.0, 2 ** -7 * 1.0625]
    torch.manual_seed(13)
    x = torch.cat([torch.tensor(values), torch.randn(60) * 100]).repeat(2, 1)
    x[1] = -x[1]
    _check_quantize(x.to(DEVICE), True)


# (M, N, K): single row, ragged everything, on the blocks, K of 1, 1.5, 3+ blocks of 64
LINEAR_SHAPES = [(1, 16, 64), (5, 67, 96), (64, 48, 200), (70, 67, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k", LINEAR_SHAPES)
def test_int8_linear_matches_the_reference(m, n, k, with_bias, dtype):
    torch.manual_seed(m * 10000 + n * 100 + k)
    x, weight = _randn(m, k, dtype=dtype), _randn(n, k)
    _check_int8_linear(x, weight, _randn(n, dtype=dtype) if with_bias else None)


def test_int8_linear_reads_strided_operands():
    torch.manual_seed(17)
    x, weight = _randn(37, 96), _randn(40, 96)
    qweight, w_scale = quantize_weight_int8(weight)
    xq, x_scale = quantize_rows_int8(x)
    want = int8_linear_triton(xq, x_scale, qweight, w_scale, None, torch.float32)
    xq_t = xq.t().contiguous().t()  # same values, column-major
    qweight_view = torch.cat([qweight, qweight], dim=1)[:, :96]  # row stride 192
    got = int8_linear_triton(xq_t, x_scale, qweight_view, w_scale, None, torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,n,k,group", [(1, 16, 64, 32), (5, 67, 96, 32), (64, 48, 160, 32), (70, 67, 192, 64)])
def test_int4_linear_matches_the_reference(m, n, k, group, with_bias, dtype):
    torch.manual_seed(m * 10000 + n * 100 + k)
    x, weight = _randn(m, k, dtype=dtype), _randn(n, k)
    _check_int4_linear(x, weight, group, _randn(n, dtype=dtype) if with_bias else None)


@pytest.mark.parametrize("group,block_k", [(128, 64), (32, 128), (64, 128)],
                         ids=["group-spans-blocks", "block-spans-groups", "block-ends-mid-group"])
def test_int4_linear_groups_and_blocks_need_not_align(group, block_k):
    torch.manual_seed(group + block_k)
    x, weight = _randn(9, 384), _randn(20, 384)
    _check_int4_linear(x, weight, group, _randn(20), BLOCK_K=block_k)


def test_int4_linear_fp16_and_strided_activations():
    torch.manual_seed(19)
    base = _randn(12, 100, dtype=torch.float16)
    _check_int4_linear(base[:, 2:98], _randn(24, 96), 32, _randn(24, dtype=torch.float16))


def test_bad_operands_are_clear_errors():
    with pytest.raises(ValueError, match="2-D float"):
        quantize_rows_triton(torch.zeros(2, 3, 4), False)
    with pytest.raises(ValueError, match="int8"):
        int8_linear_triton(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1),
                           torch.zeros(3, 32, dtype=torch.int8), torch.ones(3), None, torch.float32)
    with pytest.raises(ValueError, match="even group"):
        int4_linear_triton(torch.zeros(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 3), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU run uses the interpreter)")
def test_on_cuda_at_gpu_sizes():
    """The same comparisons compiled for the GPU, at larger shapes and block sizes."""
    torch.manual_seed(23)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = _randn(300, 1024, dtype=dtype, device="cuda") * 2
        x[7] = 0
        for fp8 in (False, True):
            _check_quantize(x, fp8)
            _check_quantize(x[:, 3:1003], fp8, BLOCK_M=1, BLOCK_K=1024)
        weight = _randn(384, 1024, device="cuda")
        bias = _randn(384, dtype=dtype, device="cuda")
        _check_int8_linear(x, weight, bias, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
        _check_int8_linear(x[:77], weight[:232], None)  # the reference's _int_mm wants N % 8 == 0
        for group in (32, 64, 128):
            _check_int4_linear(x, weight, group, bias, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
        _check_int4_linear(x[:5, :992], weight[:100, :992], 32, None)


@pytest.mark.parametrize("name, quantize", [
    ("linear_int8_dynamic", lambda w: quantize_weight_int8(w)),
    ("linear_fp8_dynamic", lambda w: __import__("dacc.kernels.fp8", fromlist=["x"]).quantize_weight_fp8(w)),
    ("linear_int4_weight", lambda w: quantize_weight_int4(w, 32)),
])
def test_the_dacc_operators_take_the_triton_path_and_match_their_reference(monkeypatch, name, quantize):
    """The operator bodies (what an artifact's graph calls) with DACC_KERNELS=triton: leading dims
    flattened and restored, the kernels composed, the same numbers as the reference path."""
    import dacc.kernels.ops  # noqa: F401  registers the operators

    torch.manual_seed(5)
    x, w, b = _randn(2, 5, 64), _randn(24, 64) / 8, _randn(24)
    tensors = quantize(w.cpu())
    tensors = [t.to(DEVICE) for t in tensors]
    op = getattr(torch.ops.dacc, name)
    monkeypatch.setenv("DACC_KERNELS", "reference")
    want = op(x, *tensors, b)
    import dacc.kernels.quant_triton as kernels
    launched = []
    for fn in ("quantize_rows_triton", "int8_linear_triton", "int4_linear_triton"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, real=real, fn=fn, **k: launched.append(fn) or real(*a, **k))
    monkeypatch.setenv("DACC_KERNELS", "triton")
    got = op(x, *tensors, b)
    assert launched  # the Triton path ran, not the reference again
    assert got.shape == (2, 5, 24) and got.dtype == x.dtype
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
