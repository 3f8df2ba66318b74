"""Which implementation runs an op: Triton on CUDA tensors when Triton imports, oneDNN for the
int8 GEMM on x86 CPUs, the PyTorch reference otherwise. `DACC_KERNELS=reference` forces the
reference everywhere; `DACC_KERNELS=triton` forces Triton, which with `TRITON_INTERPRET=1` runs on CPU tensors (how the kernels are tested)."""
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


def use_onednn(tensor: torch.Tensor) -> bool:
    """The int8 GEMM on a CPU tensor goes through oneDNN (`int8_onednn.py`) unless told otherwise."""
    from dacc.kernels import int8_onednn
    return (os.environ.get("DACC_KERNELS", "auto") == "auto" and tensor.device.type == "cpu"
            and tensor.numel() > 0 and int8_onednn.available())


def int8_activation_qmax(tensor: torch.Tensor) -> int:
    """The range `dacc::linear_int8_dynamic` quantizes `tensor`'s rows to on this machine."""
    from dacc.kernels import int8, int8_onednn
    return int8_onednn.activation_qmax() if use_onednn(tensor) else int8.QMAX
