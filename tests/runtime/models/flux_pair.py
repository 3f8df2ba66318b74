"""The Flux test family with one CFG pair (a batch of 2) in every example: under `cfg: 2` each
rank holds a batch of 1 in every example, the size export would fix as a constant."""
from dacc.models.flux import _inputs, build  # noqa: F401  (build is the model file's entry point)


def example_inputs():
    return _inputs(2, 8, 8, seed=1)


def more_example_inputs():
    return [_inputs(2, 6, 10, seed=2)]
