"""Kernels (Triton with PyTorch references and dispatch). The runtime executes aten ops directly
until a pass rewrites a node to one of these."""
