"""Short dtype names used in the manifest and the graph text (f32, bf16, i64, ...)."""
from __future__ import annotations

import torch

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.int8: "i8", torch.uint8: "u8",
           torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2"}


def dtype_text(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).replace("torch.", ""))
