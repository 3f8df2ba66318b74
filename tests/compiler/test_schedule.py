"""The compile-time schedule optimiser: on scripted per-step costs it returns the optimum an
exhaustive search finds, honours the limits, and cache_ratio walks from no skip to the fewest
computed steps; with block ranges, the choice of one mask per range is the exhaustive optimum
too."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dacc.compiler.schedule import RangeSchedules, mask_cost, optimal_schedules, residual_costs


def _exhaustive(cost, forced, max_run, max_skipped):
    n, best = cost.shape[0], {}
    for inner in itertools.product([True, False], repeat=n - 2):
        mask = [True, *inner, True]
        runs = [len(list(g)) for on, g in itertools.groupby(mask) if not on]
        if any(not mask[f] for f in forced) or (max_run >= 0 and any(r > max_run for r in runs)):
            continue
        if 0 <= max_skipped < mask.count(False):
            continue
        m, c = sum(mask), mask_cost(cost, mask)
        if m not in best or c < best[m] - 1e-12:
            best[m] = c
    return best


@pytest.mark.parametrize("seed,forced,max_run,max_skipped", [(0, set(), -1, -1), (1, {2}, 2, -1), (2, {1, 6}, 3, 4)])
def test_the_optimum_is_the_exhaustive_one(seed, forced, max_run, max_skipped):
    rng = np.random.default_rng(seed)
    cost = np.triu(rng.uniform(0.1, 2.0, (9, 9)).cumsum(1), 1)  # reusing further back costs more, unevenly
    found = optimal_schedules(cost, forced, max_run, max_skipped)
    expected = _exhaustive(cost, forced, max_run, max_skipped)
    assert sorted(found.cost) == sorted(expected)
    for m, c in expected.items():
        assert found.cost[m] == pytest.approx(c) and mask_cost(cost, found.masks[m]) == pytest.approx(c)
        assert sum(found.masks[m]) == m and all(found.masks[m][f] for f in forced)


def test_cheap_steps_are_the_ones_skipped():
    """Steps 3 and 4 barely change: with two steps to skip, those are skipped."""
    change = np.array([5.0, 4, 3, 0.01, 0.01, 3, 4, 5])
    cost = np.zeros((8, 8))
    for j in range(8):
        for i in range(j + 1, 8):
            cost[j, i] = change[j + 1:i + 1].sum()  # the residual drifts by `change` each step
    schedules = optimal_schedules(cost)
    assert schedules.masks[6] == [True, True, True, False, False, True, True, True]
    assert schedules.masks[8] == [True] * 8 and sum(schedules.masks[schedules.fewest]) == schedules.fewest == 2


def test_costs_grow_with_the_distance_reused():
    torch.manual_seed(0)
    walk = torch.randn(12, 50).cumsum(0)  # a residual that drifts from step to step
    cost = residual_costs([list(walk), list(walk * 1.1)])
    assert cost.shape == (12, 12) and np.all(np.diff(cost[0, 1:]) > -0.2) and cost[0, 11] > 3 * cost[0, 1]
    assert np.allclose(np.tril(cost), 0)



@pytest.mark.parametrize("seed,ranges", [(3, 2), (4, 3)])
def test_the_range_choice_is_the_exhaustive_optimum(seed, ranges):
    """A step x range schedule: of every combination of one mask per range within the budget, the
    one of fewest FLOPs (ties: least cost), as an exhaustive search over all masks finds it."""
    rng = np.random.default_rng(seed)
    n = 6
    costs = [np.triu(rng.uniform(0.05, 1.5, (n, n)).cumsum(1), 1) for _ in range(ranges)]
    flops = list(rng.uniform(1.0, 4.0, ranges))
    chooser = RangeSchedules([optimal_schedules(c) for c in costs], flops, costs)
    every = [[True, *inner, True] for inner in itertools.product([True, False], repeat=n - 2)]
    for budget in (0.0, 0.5, 2.0, 6.0, 50.0):
        best = min(((sum(f * sum(m) for f, m in zip(flops, combo)), sum(mask_cost(c, m) for c, m in zip(costs, combo)))
                    for combo in itertools.product(every, repeat=ranges)
                    if sum(mask_cost(c, m) for c, m in zip(costs, combo)) <= budget))
        masks = chooser.choose(budget)
        assert sum(f * sum(m) for f, m in zip(flops, masks)) == pytest.approx(best[0])
        assert chooser.cost(masks) == pytest.approx(best[1]) and chooser.cost(masks) <= budget
    assert chooser.choose(0.0) == [[True] * n] * ranges
    skipped = chooser.choose(50.0)
    assert chooser.skipped(skipped) == pytest.approx(sum(f * m.count(False) for f, m in zip(flops, skipped))
                                                     / (sum(flops) * n))
