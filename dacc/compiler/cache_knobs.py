"""From the plan's cache section to a gate's knobs: the unified `cache_ratio` (0 = quality first,
1 = speed first) mapped onto each strategy's own threshold, interval or step mask.

cache_ratio 0 never skips a step, whatever the strategy; explicit options override the ratio.
"""
from __future__ import annotations

from typing import Any

from dacc.schema.errors import DaccError

# Compute/cache bins for 28 steps (compute, cache, compute, ..., compute); first and last compute.
SCM_BINS = {
    "slow": ([8, 3, 3, 2, 1, 1], [1, 2, 2, 2, 3]),
    "medium": ([6, 2, 2, 2, 2, 1], [1, 3, 3, 3, 3]),
    "fast": ([6, 1, 1, 1, 1, 1], [1, 3, 4, 5, 4]),
    "ultra": ([4, 1, 1, 1, 1], [2, 5, 6, 7]),
}
SCM_POLICIES_BY_RATIO = ("slow", "medium", "fast", "ultra")
THRESHOLD_PER_RATIO = {
    "dbcache": 0.4,  # ratio 0.2 -> 0.08 (DBCache default), 0.6 -> 0.24
    "teacache": 0.3,  # accumulated rescaled output change: ratio 1 -> 30%
}
TAYLORSEER_MAX_INTERVAL = 8  # at REFERENCE_STEPS steps
REFERENCE_STEPS = 50
CALIBRATED_MASKS = ("schedule", "magcache")  # strategies whose step mask calibration chooses


def scm_mask(policy: str, steps: int) -> list[bool]:
    """The policy's 28-step compute/cache bins with their boundaries scaled to `steps` (bins that
    shrink to nothing vanish); first and last steps compute."""
    compute, cache = SCM_BINS[policy]
    bins = []
    for i, c in enumerate(compute):
        bins.append((True, c))
        if i < len(cache):
            bins.append((False, cache[i]))
    total = sum(n for _, n in bins)
    mask, start = [True] * steps, 0
    for is_compute, n in bins:
        lo, hi = (int(x * steps / total + 0.5) for x in (start, start + n))
        mask[lo:hi] = [is_compute] * (hi - lo)
        start += n
    mask[0] = mask[-1] = True
    return mask


def policy_for_ratio(ratio: float) -> str | None:
    if ratio <= 0:
        return None
    return SCM_POLICIES_BY_RATIO[min(3, int(ratio * 4 - 1e-9))]


def dynamic_knobs(strategy: str, ratio: float, options: Any, steps: int) -> dict[str, Any]:
    """threshold / interval / mask for `strategy` at `ratio`, unless the options fix them."""
    knobs: dict[str, Any] = {"threshold": 0.0, "interval": 1, "mask": []}
    if strategy in THRESHOLD_PER_RATIO:
        knobs["threshold"] = options.threshold if options.threshold is not None else THRESHOLD_PER_RATIO[strategy] * ratio
    elif strategy == "taylorseer":
        # scaled with the step count: fewer, larger steps leave less to forecast between
        span = (TAYLORSEER_MAX_INTERVAL - 1) * min(1.0, steps / REFERENCE_STEPS)
        knobs["interval"] = options.interval or 1 + round(ratio * span)
    elif strategy == "scm":
        policy = options.policy or policy_for_ratio(ratio)
        knobs["mask"] = _mask(options.mask, policy, steps)
    if strategy != "scm":
        knobs["mask"] = _mask(getattr(options, "scm_mask", None), getattr(options, "scm_policy", None), steps)
    return knobs


def fixed_mask(explicit: list[bool], steps: int) -> list[bool]:
    """A step mask the plan gives, with its first and last steps computing (as every mask's do)."""
    if len(explicit) != steps:
        raise DaccError(f"the step mask has {len(explicit)} entries for {steps} steps", "plan cache.options",
                        "give one true/false per step, or use a policy")
    mask = list(explicit)
    mask[0] = mask[-1] = True
    return mask


def _mask(explicit: list[bool] | None, policy: str | None, steps: int) -> list[bool]:
    if explicit is not None:
        return fixed_mask(explicit, steps)
    return scm_mask(policy, steps) if policy else []
