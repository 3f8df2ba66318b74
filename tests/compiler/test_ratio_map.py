"""cache_ratio through a model's own recordings (dacc/compiler/ratio_map.py): the replay follows the
runtime's rules (checked against plain re-statements of DBCache's and TeaCache's rules on scripted
trajectories), TaylorSeer's refresh steps crowd where the trajectory bends and beat a uniform
interval with as many refreshes, and the same ratio spends about the same error on a model that
changes slowly and on one that changes fast."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dacc.compiler.calibrate import _needs
from dacc.compiler.magcache import magcache_mask, magnitude_ratios
from dacc.compiler.ratio_map import ERROR_PER_RATIO, RatioMap, Trajectory, refresh_mask, replay
from dacc.schema.manifest import CacheGate
from dacc.schema.plan import parse_plan

STEPS = 20


def _gate(strategy: str, probe: str = "none", **kw) -> CacheGate:
    fields = dict(strategy=strategy, skip_first=1, skip_last=2, stream_in=["a"], stream_out=["b"], probe=probe,
                  probe_values=["p"] if probe != "none" else [], probe_base=["q"] if probe == "residual" else [],
                  threshold=0.0, rescale=[], taylor_order=0, interval=1, mask=[], warmup=0, cooldown=0,
                  max_cached_steps=-1, max_continuous_cached_steps=-1)
    return CacheGate(**{**fields, **kw})


def _walk(speed: float, seed: int, n: int = 64) -> Trajectory:
    """A residual trajectory drifting at `speed` per step, probed by its own first 16 entries."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(n, generator=g, dtype=torch.float64) + 3
    r = start + speed * torch.randn(STEPS, n, generator=g, dtype=torch.float64).cumsum(0)
    return Trajectory(r, [[row[:16].float()] for row in r], [None] + [float((r[i] - r[i - 1]).abs().sum() /
                                                                           r[i - 1].abs().sum()) for i in range(1, STEPS)])


def test_dbcache_replay_is_the_rule_restated():
    t = _walk(0.08, seed=1)
    scale = float(t.residuals.abs().mean())
    for threshold in (0.02, 0.05, 0.1):
        error, skipped = replay(_gate("dbcache", "residual", threshold=threshold), t, scale)
        expect, count, last = 0.0, 0, 0  # skip while the probe moved less than threshold since the last computed step
        for i in range(1, STEPS):
            p, q = t.probes[i][0].double(), t.probes[last][0].double()
            if (p - q).abs().sum() / q.abs().sum() < threshold:
                expect += float((t.residuals[last] - t.residuals[i]).abs().mean()) / scale
                count += 1
            else:
                last = i
        assert skipped == count and error == pytest.approx(expect, rel=1e-6)
    assert replay(_gate("dbcache", "residual", threshold=0.1), t, scale)[1] > 0  # the rule was exercised


def test_teacache_replay_accumulates_the_rescaled_consecutive_change():
    t = _walk(0.05, seed=2)
    scale = float(t.residuals.abs().mean())
    gate = _gate("teacache", "input", threshold=0.06, rescale=[2.0, 0.0])  # rescaled change = 2x
    error, skipped = replay(gate, t, scale)
    expect, count, last, acc = 0.0, 0, 0, 0.0
    for i in range(1, STEPS):
        acc += 2.0 * t.stats[i]
        if acc < 0.06 and i < STEPS - 1:  # TeaCache keeps the last step
            expect += float((t.residuals[last] - t.residuals[i]).abs().mean()) / scale
            count += 1
        else:
            last, acc = i, 0.0
    assert 0 < skipped == count and error == pytest.approx(expect, rel=1e-6)


def _bending(n: int = 32) -> Trajectory:
    """Straight for the first half (an order-1 forecast is exact), then oscillating."""
    i = torch.arange(STEPS, dtype=torch.float64)[:, None]
    direction = torch.linspace(-1, 1, n, dtype=torch.float64)[None]
    bend = torch.where(i >= STEPS // 2, torch.sin(1.3 * (i - STEPS // 2)), torch.zeros(()))
    return Trajectory(2 + 0.1 * i * direction + 0.3 * bend * direction.flip(1), [None] * STEPS, [None] * STEPS)


def test_taylorseer_refreshes_crowd_where_the_trajectory_bends():
    t = _bending()
    scale = float(t.residuals.abs().mean())
    gate = _gate("taylorseer", taylor_order=1)
    mask = refresh_mask(gate, [t], scale, tolerance=0.01)
    half = STEPS // 2
    assert sum(mask[2:half]) == 0 and sum(mask[half:]) >= half // 2, mask  # straight: forecast; bent: refresh
    error, skipped = replay(dataclasses.replace(gate, mask=mask), t, scale)
    assert skipped == STEPS - sum(mask)
    computed = sum(mask)  # a uniform interval with at least as many refreshes does worse
    interval = -(-STEPS // computed)
    uniform = [i % interval == 0 or i == STEPS - 1 for i in range(STEPS)]
    assert sum(uniform) >= computed
    assert error < 0.5 * replay(dataclasses.replace(gate, mask=uniform), t, scale)[0]


def test_magnitude_ratios_and_magcache_rule_restated():
    base = torch.rand(2, 1, 40, dtype=torch.float64) + 0.5
    growth = torch.tensor([1.0, 0.9, 0.95, 1.0, 1.02, 1.0, 0.97, 1.1, 1.0, 0.99], dtype=torch.float64)
    residuals = [b * growth.cumprod(0)[:, None] for b in base]  # |r_i| / |r_(i-1)| = growth[i] exactly
    ratios = magnitude_ratios(residuals)
    assert ratios == pytest.approx([1.0] + growth[1:].tolist(), abs=1e-6)
    gate = _gate("magcache", warmup=2, max_continuous_cached_steps=2)
    for threshold in (0.02, 0.08, 0.3):
        expect, product, error, run = [], 1.0, 0.0, 0
        for i, ratio in enumerate(ratios):
            compute = i < 2 or run >= 2
            if not compute:
                product *= ratio
                error += abs(1 - product)
                compute = error > threshold
            product, error, run = (1.0, 0.0, 0) if compute else (product, error, run + 1)
            expect.append(compute)
        assert magcache_mask(gate, ratios, threshold) == expect
    assert sum(magcache_mask(gate, ratios, 0.3)) < sum(magcache_mask(gate, ratios, 0.02)) < len(ratios)


@pytest.mark.parametrize("strategy,probe,order", [("dbcache", "residual", 0), ("taylorseer", "none", 1),
                                                  ("teacache", "input", 0), ("magcache", "none", 0)])
def test_the_same_ratio_spends_about_the_same_error_on_slow_and_fast_models(strategy, probe, order):
    gate = _gate(strategy, probe, taylor_order=order, warmup=1)

    def ratio_map(walks: list[Trajectory]) -> RatioMap:
        curve = magnitude_ratios([t.residuals for t in walks]) if strategy == "magcache" else None
        return RatioMap(gate, walks, [], magnitudes=curve)
    # walks scaled to the budget, neither so slow that every step can skip nor so fast that none can
    maps = {speed: ratio_map([_walk(speed * ERROR_PER_RATIO, seed) for seed in (3, 4)]) for speed in (1.25, 2.0)}
    for ratio in (0.25, 0.5):
        budget = ratio * ERROR_PER_RATIO
        errors, skipped = zip(*(m.error(m.knobs(ratio)) for m in maps.values()))
        assert all(0.5 * budget <= e <= budget for e in errors), (errors, budget)
        assert skipped[0] > skipped[1]  # the slow model skips more for the same error
    for m in maps.values():
        steps = [m.error(m.knobs(r))[1] for r in (0.0, 0.25, 0.5, 1.0)]
        assert steps[0] == 0 and steps == sorted(steps)


def test_a_ratio_maps_only_where_the_plan_leaves_the_knob_free():
    class Manifest:
        programs = [type("P", (), {"gates": [_gate("dbcache", "residual")]})()]
    free = parse_plan({"cache": {"strategy": "dbcache", "cache_ratio": 0.5}})
    fixed = parse_plan({"cache": {"strategy": "dbcache", "cache_ratio": 0.5, "options": {"threshold": 0.1}}})
    zero = parse_plan({"cache": {"strategy": "dbcache"}})
    assert _needs(Manifest, free).ratio_map and not _needs(Manifest, free).sample
    assert not _needs(Manifest, fixed).ratio_map and not _needs(Manifest, zero).ratio_map

