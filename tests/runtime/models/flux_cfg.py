"""The Flux test family with CFG batches (even) in every example, for parallel.cfg."""
from dacc.models.flux import _inputs, build  # noqa: F401  (build is the model file's entry point)


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(4, 6, 10, seed=2)]
