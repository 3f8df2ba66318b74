"""Every dacc operator, declared once with `torch.library` and registered on `import dacc`.

How a dacc operator is declared (quantization, parallelism and lowering all add them):
1. `torch.library.custom_op("dacc::name", mutates_args=())` with a typed signature: the schema
   exported programs record, so `torch.export.save` writes `torch.ops.dacc.name.default` and
   dacc's loader (which allows the `aten` and `dacc` namespaces only) can rebuild it.
2. Its default implementation is the PyTorch reference in `dacc/kernels/<topic>.py`; a Triton
   kernel, where it pays, is registered for CUDA tensors beside it and tested against the
   reference (under `TRITON_INTERPRET=1` on CPU).
3. `register_fake`: output shapes and dtypes from input shapes, symbolic sizes included, so the
   compiler can insert the op into an exported graph and Inductor can compile around it.
4. `register_flop_formula`: the matmul FLOPs `torch.utils.flop_counter.FlopCounterMode` reports,
   so benchmarks count a quantized linear like the linear it replaced. The compiler's own
   symbolic count (`dacc/compiler/flops.py`) uses the same formula.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from dacc.kernels.int8 import linear_int8_dynamic_reference, linear_int8_weight_reference


def _linear_fake(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    torch._check(x.shape[-1] == qweight.shape[1], lambda: "in_features differ from the weight's")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("dacc::linear_int8_weight", mutates_args=())
def linear_int8_weight(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = x @ dequant(qweight, scale).T + bias; qweight int8 [out, in], scale fp32 [out]."""
    return linear_int8_weight_reference(x, qweight, scale, bias)


@torch.library.custom_op("dacc::linear_int8_dynamic", mutates_args=())
def linear_int8_dynamic(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """y = (quant_rows(x) @ qweight.T in int32) * x_scale * scale + bias."""
    return linear_int8_dynamic_reference(x, qweight, scale, bias)


QUANTIZED_LINEARS = {"int8_weight": torch.ops.dacc.linear_int8_weight.default,
                     "int8_dynamic": torch.ops.dacc.linear_int8_dynamic.default}

for _op in (linear_int8_weight, linear_int8_dynamic):
    _op.register_fake(_linear_fake)


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


register_flop_formula([torch.ops.dacc.linear_int8_weight, torch.ops.dacc.linear_int8_dynamic])(_linear_flops)
