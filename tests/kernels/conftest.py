"""Shared by the kernel tests."""
from __future__ import annotations

import importlib

import pytest


def route_to_triton(monkeypatch, module: str, function: str) -> list[int]:
    """Force the Triton path (`DACC_KERNELS=triton`; Triton's interpreter without CUDA) and count
    the launches of `module.function`, so a test comparing the kernel with its reference cannot
    pass by running the reference twice. Skips when Triton is not installed."""
    pytest.importorskip("triton", reason="the test extra installs triton")
    kernel_module = importlib.import_module(module)
    monkeypatch.setenv("DACC_KERNELS", "triton")
    launches, kernel = [], getattr(kernel_module, function)

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(kernel_module, function, counted)
    return launches
