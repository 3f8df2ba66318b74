"""How each quantization mode stores a linear's weight: the tensors that replace it (their name
suffixes in the artifact), the dacc operator that consumes them, and the dequantized weight the
compiler measures the error with. The compiler's `quantize_linears` pass reads this table; the
operators themselves are declared in `dacc/kernels/ops.py`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dacc.kernels import fp8, int4, int8

Tensors = dict[str, torch.Tensor]  # suffix -> tensor, in the operator's argument order


@dataclass(frozen=True)
class Scheme:
    mode: str
    op_name: str  # torch.ops.dacc.<op_name>(x, *tensors, bias)
    quantize: Callable[[torch.Tensor, int], Tensors]  # (float weight, int4 group size)
    dequantize: Callable[[Tensors], torch.Tensor]  # fp32 weight, for the measured error
    reference: Callable[..., torch.Tensor]  # (x, *tensors, bias) -> y: the PyTorch formula of the op
    unsupported: Callable[[torch.Tensor, int], str | None] = lambda w, g: None  # why a weight cannot use it

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.dacc, self.op_name).default


def _int8(w: torch.Tensor, group: int) -> Tensors:
    q, s = int8.quantize_weight_int8(w)
    return {"int8": q, "scale": s}


def _fp8(w: torch.Tensor, group: int) -> Tensors:
    q, s = fp8.quantize_weight_fp8(w)
    return {"fp8": q, "scale": s}


def _int4(w: torch.Tensor, group: int) -> Tensors:
    q, s = int4.quantize_weight_int4(w, group)
    return {"int4": q, "scales": s}


def _int4_unsupported(w: torch.Tensor, group: int) -> str | None:
    k = w.shape[1]
    return None if int4.int4_group(k, group) else f"in_features {k} is not a multiple of group_size {group}"


SCHEMES = {s.mode: s for s in (
    Scheme("int8_weight", "linear_int8_weight", _int8,
           lambda t: int8.dequantize_weight_int8(t["int8"], t["scale"], torch.float32),
           int8.linear_int8_weight_reference),
    Scheme("int8_dynamic", "linear_int8_dynamic", _int8,
           lambda t: int8.dequantize_weight_int8(t["int8"], t["scale"], torch.float32),
           int8.linear_int8_dynamic_reference),
    Scheme("fp8_dynamic", "linear_fp8_dynamic", _fp8,
           lambda t: t["fp8"].float() * t["scale"][:, None], fp8.linear_fp8_dynamic_reference),
    Scheme("int4_weight", "linear_int4_weight", _int4,
           lambda t: int4.dequantize_weight_int4(t["int4"], t["scales"], torch.float32),
           int4.linear_int4_weight_reference, _int4_unsupported),
)}


def stored_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
