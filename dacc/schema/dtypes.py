"""Short dtype names used in the manifest and the graph text (f32, bf16, i64, ...)."""
from __future__ import annotations

import torch

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.int8: "i8", torch.uint8: "u8",
           torch.float8_e4m3fn: "f8e4m3", torch.float8_e5m2: "f8e5m2"}


def dtype_text(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(text: str) -> torch.dtype:
    """The inverse of dtype_text (manifest fields naming a dtype)."""
    for dtype, name in _DTYPES.items():
        if name == text:
            return dtype
    found = getattr(torch, text, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown dtype {text!r}")
    return found
