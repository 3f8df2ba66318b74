"""One linear's stored tensors, as both the quantize pass and the quantize search make them: the
SmoothQuant fold where factors were measured, then GPTQ rounding where inputs were measured, else
the mode's own rounding to nearest."""
from __future__ import annotations

import torch

from dacc.compiler.gptq import GPTQ_MODES, gptq_int4
from dacc.compiler.smoothing import fold
from dacc.kernels.schemes import SCHEMES, Tensors
from dacc.schema.plan import SMOOTHABLE_MODES


def quantize_weight(mode: str, weight: torch.Tensor, group: int, smooth: torch.Tensor | None,
                    hessian: torch.Tensor | None, act_dtype: torch.dtype
                    ) -> tuple[Tensors, torch.Tensor | None]:
    """(the mode's tensors, 1 / s for the activations or None)."""
    smooth = smooth if mode in SMOOTHABLE_MODES else None
    scaled, inv = (weight, None) if smooth is None else fold(weight, smooth, act_dtype)
    if hessian is not None and mode in GPTQ_MODES:
        return gptq_int4(scaled, hessian, group), inv
    return SCHEMES[mode].quantize(scaled, group), inv
