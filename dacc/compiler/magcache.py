"""`strategy: magcache`: MagCache's rule on a magnitude-ratio curve that dacc measures itself.

MagCache observes that the ratio of successive residual magnitudes, |r_i| / |r_(i-1)|, follows
one curve across prompts and seeds for a given model, close to 1 for most of the generation. A
skipped step reuses the last residual; the error that adds is taken to grow with how far the
accumulated product of ratios since the last computed step has drifted from 1:

    accumulated ratio *= ratio_i;  error += |1 - accumulated ratio|;  skip while error <= threshold

(and while the limits allow). The decision depends on the step alone, so it is fixed at compile
time: a static mask, no probe at run time. Other tools ask the user for the curve, per model;
here calibration records it from sample() (the mean over the calibration seeds and contexts of
mean|r_i| / mean|r_(i-1)|), and cache_ratio maps to the threshold through the same error budget
as every strategy (dacc/compiler/ratio_map.py).
"""
from __future__ import annotations

import dataclasses

import torch

from dacc.runtime.cache import Action, Computed, GateState, forced_to_compute, record
from dacc.schema.manifest import CacheGate


def magnitude_ratios(residuals: list[torch.Tensor]) -> list[float]:
    """The curve from recorded generations, each (steps, n): ratio[0] = 1, ratio[i] the mean over
    generations of mean|r_i| / mean|r_(i-1)|."""
    magnitudes = torch.stack([r.abs().mean(1) for r in residuals])  # (generations, steps)
    ratios = (magnitudes[:, 1:] / magnitudes[:, :-1].clamp_min(1e-12)).mean(0)
    return [1.0] + [round(float(x), 6) for x in ratios]


def magcache_mask(gate: CacheGate, ratios: list[float], threshold: float) -> list[bool]:
    """Which steps compute under MagCache's rule at `threshold`, with the gate's warmup, cooldown
    and limits (max_continuous_cached_steps is MagCache's K)."""
    free = dataclasses.replace(gate, mask=[])
    state, mask = GateState(), []
    product, error = 1.0, 0.0
    for i, ratio in enumerate(ratios):
        compute = forced_to_compute(free, state, i, len(ratios))
        if not compute:
            product *= ratio
            error += abs(1.0 - product)
            compute = error > threshold
        if compute:
            product, error = 1.0, 0.0
        mask.append(compute)
        record(free, state, i, Action.COMPUTE if compute else Action.REUSE, Computed(i, [], []) if compute else None)
    return mask
