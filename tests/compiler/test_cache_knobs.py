from __future__ import annotations

import pytest

from dacc.compiler.cache_knobs import SCM_BINS, dynamic_knobs, policy_for_ratio, scm_mask
from dacc.schema.plan import cache_options, parse_plan


@pytest.mark.parametrize("policy", SCM_BINS)
@pytest.mark.parametrize("steps", [10, 28, 50, 100])
def test_scm_masks(policy, steps):
    mask = scm_mask(policy, steps)
    assert len(mask) == steps and mask[0] and mask[-1]
    compute, cache = SCM_BINS[policy]
    share = sum(compute) / (sum(compute) + sum(cache))
    assert abs(sum(mask) / steps - share) <= 2 / steps + 0.05
    if steps == 28:  # the published 28-step pattern, exactly
        expected = []
        for i, c in enumerate(compute):
            expected += [True] * c + ([False] * cache[i] if i < len(cache) else [])
        assert mask == expected


def test_faster_policies_compute_fewer_steps():
    counts = [sum(scm_mask(p, 50)) for p in ("slow", "medium", "fast", "ultra")]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


@pytest.mark.parametrize("strategy", ["dbcache", "teacache", "taylorseer", "scm"])
def test_ratio_zero_never_skips_and_ratio_maps_monotonically(strategy):
    def knobs(ratio):
        plan = parse_plan({"cache": {"strategy": strategy, "cache_ratio": ratio}})
        return dynamic_knobs(strategy, ratio, cache_options(plan), 50)
    zero = knobs(0.0)
    assert zero["threshold"] == 0.0 and zero["interval"] == 1 and zero["mask"] == []
    if strategy in ("dbcache", "teacache"):
        assert knobs(0.2)["threshold"] < knobs(0.6)["threshold"]
    if strategy == "taylorseer":
        assert knobs(0.2)["interval"] < knobs(0.9)["interval"]
    if strategy == "scm":
        assert sum(knobs(0.2)["mask"]) > sum(knobs(0.9)["mask"])
    assert policy_for_ratio(0.0) is None and policy_for_ratio(1.0) == "ultra"


def test_explicit_options_override_the_ratio():
    plan = parse_plan({"cache": {"strategy": "dbcache", "cache_ratio": 0.9, "options": {"threshold": 0.05}}})
    assert dynamic_knobs("dbcache", 0.9, cache_options(plan), 50)["threshold"] == 0.05
