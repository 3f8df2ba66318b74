"""The Wan test family (self-attention over video tokens, cross-attention onto the text) with CFG
batches (even) in every example, for parallel.cfg."""
from dacc.models.wan import _inputs, build  # noqa: F401  (build is the model file's entry point)


def example_inputs():
    return _inputs(2, 3, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(4, 2, 12, 16, seed=2)]
