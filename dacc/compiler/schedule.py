"""`strategy: schedule`: the step mask chosen at compile time from measured costs.

From uncached calibration generations the compiler records, for each denoising step, the residual
of the gated block range. Reusing step j's residual at a later step i costs about
    cost[j, i] = mean |residual_i - residual_j|    (over the calibration seeds and CFG contexts)
in the output of step i, relative to the mean residual magnitude of the whole generation. A
schedule computes a set of steps and reuses, on every other step, the last computed residual; its
cost is the sum over the skipped steps. `optimal_schedules` finds, for every number of computed
steps, the schedule of least cost (dynamic programming over the last computed step: exact), and
cache_ratio picks the fewest computed steps whose cost per step fits its error budget, the same
budget every strategy gets (dacc/compiler/ratio_map.py). With `target_psnr` the ratio is searched
like every strategy's (dacc/compiler/calibrate.py).

With `ranges: k` the blocks are split into k ranges, each its own gate with its own mask (a step x
range schedule). Each range's costs are measured from its own residuals, relative to the same scale
(the ranges' residual magnitudes summed, so the budget means what it means with one range), the
least-cost mask of each range is found for every count of computed steps as above, and
`RangeSchedules.choose` picks the counts (one per range) of fewest FLOPs whose summed cost fits
the budget: an exact search over the ranges' Pareto fronts of (FLOPs, cost).

The schedule ships as the gates' static masks: no probe at run time, the same on every rank, and
`dacc inspect` prints them exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def residual_scale(trajectories: list[list[torch.Tensor]]) -> float:
    """The mean residual magnitude over every step of every trajectory."""
    return sum(float(r.abs().mean()) for t in trajectories for r in t) / sum(len(t) for t in trajectories)


def residual_costs(trajectories: list[list[torch.Tensor]], scale: float | None = None) -> np.ndarray:
    """cost[j, i] (j < i) from per-step residuals: one trajectory per (seed, context), each a
    list over steps of the gated range's residual (its streams flattened and concatenated),
    relative to `scale` (default: this range's own residual_scale)."""
    steps = len(trajectories[0])
    cost = np.zeros((steps, steps))
    scale = residual_scale(trajectories) if scale is None else scale
    for t in trajectories:
        stacked = torch.stack([r.double() for r in t])  # (steps, n)
        for j in range(steps - 1):
            cost[j, j + 1:] += (stacked[j + 1:] - stacked[j]).abs().mean(1).numpy()
    return cost / len(trajectories) / max(scale, 1e-12)


@dataclass(frozen=True)
class Schedules:
    """The least-cost schedule for each count of computed steps the limits allow."""
    cost: dict[int, float]  # computed steps -> least total cost
    masks: dict[int, list[bool]]

    @property
    def fewest(self) -> int:
        return min(self.masks)


def optimal_schedules(cost: np.ndarray, forced: set[int] = frozenset(), max_run: int = -1,
                      max_skipped: int = -1) -> Schedules:
    """For every count m of computed steps, the mask of least total cost: the first and last steps
    and the `forced` ones compute, at most `max_run` steps in a row are skipped (-1: no limit).

    best[m][k]: least cost of steps 0..k with m computed steps, the last of them k; a skipped
    step i between computed j and k costs cost[j, i]. `max_skipped` (-1: no limit) caps the
    skipped steps of the whole generation."""
    n = cost.shape[0]
    limit = n if max_run < 0 else max_run
    gap = np.zeros((n, n))  # gap[j, k]: the steps strictly between j and k reuse j's residual
    for j in range(n):
        gap[j, j + 1:] = np.concatenate([[0.0], np.cumsum(cost[j, j + 1:n - 1])])[:n - j - 1]
    required = sorted({0, n - 1, *forced})
    best = [dict() for _ in range(n + 1)]  # best[m][k] = (cost, previous computed step)
    best[1][0] = (0.0, -1)
    for m in range(2, n + 1):
        for k in range(1, n):
            options = []
            for j, (c, _) in best[m - 1].items():
                if j < k and k - j - 1 <= limit and not any(j < r < k for r in required):
                    options.append((c + gap[j, k], j))
            if options:
                best[m][k] = min(options)
    costs, masks = {}, {}
    for m in range(1, n + 1):
        if n - 1 not in best[m] or 0 <= max_skipped < n - m:
            continue
        mask, k, left = [False] * n, n - 1, m
        while k >= 0:
            mask[k] = True
            k = best[left][k][1]
            left -= 1
        costs[m], masks[m] = best[m][n - 1][0], mask
    return Schedules(costs, masks)


def mask_cost(cost: np.ndarray, mask: list[bool]) -> float:
    """The total cost of one mask (what optimal_schedules minimises)."""
    total, last = 0.0, 0
    for i, on in enumerate(mask):
        if on:
            last = i
        else:
            total += cost[last, i]
    return total if mask and mask[0] else math.inf


@dataclass(frozen=True)
class RangeSchedules:
    """Per block range: its least-cost schedules, its FLOPs per computed step, its cost matrix."""
    ranges: list[Schedules]
    flops: list[float]
    costs: list[np.ndarray]

    @property
    def steps(self) -> int:
        return self.costs[0].shape[0]

    def choose(self, budget: float) -> list[list[bool]]:
        """One mask per range: of the least total FLOPs whose summed cost is within `budget` (every
        step computed where even that does not fit)."""
        front = [(0.0, 0.0, ())]  # (flops, cost, computed steps per range so far), Pareto-optimal
        for sched, flops in zip(self.ranges, self.flops):
            grown = sorted((f + m * flops, c + sched.cost[m], chosen + (m,))
                           for f, c, chosen in front for m in sched.masks)
            front = []
            for point in grown:  # by FLOPs, then cost: keep a point only if it costs less than all cheaper ones
                if point[1] <= budget and (not front or point[1] < front[-1][1]):
                    front.append(point)
            if not front:
                return [[True] * self.steps for _ in self.ranges]
        return [sched.masks[m] for sched, m in zip(self.ranges, front[0][2])]

    def cost(self, masks: list[list[bool]]) -> float:
        """The summed cost of one mask per range (what `choose` keeps within its budget)."""
        return sum(mask_cost(cost, mask) for cost, mask in zip(self.costs, masks))

    def skipped(self, masks: list[list[bool]]) -> float:
        """The fraction of the ranges' FLOPs that `masks` skip."""
        total = sum(self.flops) * len(masks[0])
        return sum(f * mask.count(False) for f, mask in zip(self.flops, masks)) / max(total, 1e-30)
