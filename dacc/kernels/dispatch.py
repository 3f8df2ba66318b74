"""Which implementation runs an op: Triton on CUDA tensors when Triton imports, the PyTorch
reference otherwise. `DACC_KERNELS=reference` forces the reference everywhere; `DACC_KERNELS=triton`
forces Triton, which with `TRITON_INTERPRET=1` runs on CPU tensors (how the kernels are tested)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

_CHOICES = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    choice = os.environ.get("DACC_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"DACC_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return tensor.is_cuda and triton_available()
