"""Kernels: each op has a PyTorch reference and, where it pays, a Triton kernel; `dispatch`
picks one per call (Triton for CUDA tensors when Triton is installed)."""
from dacc.kernels.add_weighted import add_weighted, add_weighted_reference
from dacc.kernels.l1_change import l1_change, l1_change_reference

__all__ = ["add_weighted", "add_weighted_reference", "l1_change", "l1_change_reference"]
