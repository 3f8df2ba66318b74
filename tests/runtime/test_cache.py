"""Cache gates at run time: the decisions on scripted inputs, the Taylor forecaster, rank agreement."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dacc.runtime.cache import (Action, Computed, GateState, decide, forecast_weights, measure, planned_actions, record,
                                rel_l1, skipped_outputs, skipped_residuals)
from dacc.kernels.collectives import bind_groups
from dacc.runtime.ranks import GATE
from dacc.schema.manifest import CacheGate


def gate(strategy="dbcache", **kw) -> CacheGate:
    base = CacheGate(strategy=strategy, skip_first=1, skip_last=2, stream_in=["a"], stream_out=["b"], probe="residual",
                     probe_values=["p"], probe_base=["q"], threshold=0.1, rescale=[], taylor_order=0, interval=1,
                     mask=[], warmup=0, cooldown=0, max_cached_steps=-1, max_continuous_cached_steps=-1)
    return dataclasses.replace(base, **kw)


def run(g: CacheGate, probes: list[float | None], steps: int | None = None) -> str:
    """Feed probe tensors whose rel-L1 change is scripted; return the decisions as c/r/f letters."""
    state, out = GateState(), []
    steps = steps or len(probes)
    for step, value in enumerate(probes):
        probe = [torch.full((4,), float(value))] if value is not None else None
        stat = rel_l1(probe, state.prev_probe) if probe is not None and state.prev_probe is not None else None
        action = decide(g, state, step, steps, probe, stat)
        z = [torch.zeros(1)]
        record(g, state, step, action, Computed(step, z, z) if action is Action.COMPUTE else None)
        out.append(action.value[0])
    return "".join(out)


def test_dbcache_compares_with_the_last_computed_step():
    # values 1.0, 1.05 (5% change: skip), 1.08 (8% vs the computed 1.0: skip), 1.12 (12%: compute), 1.13 (skip)
    assert run(gate(threshold=0.1), [1.0, 1.05, 1.08, 1.12, 1.13]) == "crrcr"


def test_warmup_cooldown_and_limits_force_compute():
    flat = [1.0] * 8
    assert run(gate(threshold=0.1), flat) == "crrrrrrr"
    assert run(gate(threshold=0.1, warmup=2, cooldown=2), flat) == "ccrrrrcc"
    assert run(gate(threshold=0.1, max_cached_steps=3), flat) == "crrrcccc"
    assert run(gate(threshold=0.1, max_continuous_cached_steps=2), flat) == "crrcrrcr"


def test_zero_threshold_never_skips():
    assert run(gate(threshold=0.0), [1.0] * 6) == "cccccc"


def test_teacache_accumulates_rescaled_change_and_resets():
    # consecutive 10% changes, rescaled by 2x -> 0.2 per step; threshold 0.5: skip, skip, compute(0.6)
    values = [1.0 * 1.1 ** i for i in range(8)]
    g = gate("teacache", probe="input", threshold=0.5, rescale=[2.0, 0.0])
    assert run(g, values) == "crrcrrcc"  # the last step always computes
    assert run(dataclasses.replace(g, rescale=[], threshold=0.45), values) == "crrrrcrc"


def test_taylorseer_interval_and_forecast_after_two_points():
    g = gate("taylorseer", probe="none", taylor_order=1, interval=3)
    assert run(g, [None] * 9) == "crrcffcff"


def test_static_mask_skips_and_dynamic_gate_runs_elsewhere():
    mask = [True, False, False, True, True, False, True]
    assert run(gate("scm", probe="none", mask=mask), [None] * 7) == "crrccrc"
    # combined with dbcache: masked steps skip, unmasked steps ask the probe (here: big changes)
    assert run(gate(mask=mask, threshold=0.1), [1, 2, 4, 8, 16, 32, 64]) == "crrccrc"


def test_measure_probes_residual_against_the_remembered_one():
    """The residual probe's statistic is rel-L1 of (value - base) against the remembered residual."""
    g = gate()
    a, b, prev = torch.randn(3, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    state = GateState()
    values, stat = measure(g, state, {"p": a, "q": b})
    assert stat is None and torch.equal(values[0], a - b)
    state.prev_probe = [prev]
    values, stat = measure(g, state, {"p": a, "q": b})
    expected = float(((a - b) - prev).abs().sum() / prev.abs().sum())
    assert abs(stat - expected) < 1e-6 * expected
    _, stat = measure(gate("teacache", probe="input"), state, {"p": a})
    assert abs(stat - float((a - prev).abs().sum() / prev.abs().sum())) < 1e-6 * expected


@pytest.mark.parametrize("probe", ["residual", "input"])
def test_two_probed_streams_change_as_one_value(probe):
    """A joint block's two streams (of different token counts) are one probe value: the statistic
    over both equals the sums of each stream's |change| over the sums of each stream's |previous|."""
    g = gate(probe=probe, probe_values=["p", "t"], probe_base=["q", "u"] if probe == "residual" else [])
    env = {k: torch.randn(2, n, 16) for k, n in (("p", 8), ("q", 8), ("t", 3), ("u", 3))}
    streams = [env["p"] - env["q"], env["t"] - env["u"]] if probe == "residual" else [env["p"], env["t"]]
    state = GateState()
    (first,), stat = measure(g, state, env)
    assert stat is None and torch.equal(first, torch.cat([s.flatten() for s in streams]))
    previous = [torch.randn_like(s) for s in streams]
    state.prev_probe = [torch.cat([p.flatten() for p in previous])]
    _, stat = measure(g, state, env)
    expected = sum(float((s - p).abs().sum()) for s, p in zip(streams, previous)) / sum(
        float(p.abs().sum()) for p in previous)
    assert stat == pytest.approx(expected, rel=1e-5)


def test_residuals_are_formed_only_when_a_step_skips():
    inputs, outputs = [torch.randn(4)], [torch.randn(4)]
    c = Computed(0, inputs, outputs)
    assert c._residuals is None
    assert torch.equal(c.residuals()[0], outputs[0] - inputs[0])
    assert c.residuals() is c.residuals()
    assert c.inputs == [] and c.outputs == []  # released once the residual exists


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_is_exact_for_polynomials_up_to_its_order(order):
    torch.manual_seed(0)
    coeffs = [torch.randn(3, 5, dtype=torch.float64) for _ in range(order + 1)]

    def traj(s):
        return sum(c * s ** i for i, c in enumerate(coeffs))
    g = gate("taylorseer", taylor_order=order)
    state = GateState()
    for s in [0, 3, 4, 7][: order + 2]:  # one more computed step than the forecast uses
        state.history = (state.history + [Computed(s, [torch.zeros(3, 5, dtype=torch.float64)], [traj(s)])])[-(order + 1):]
    x = torch.randn(3, 5, dtype=torch.float64)
    for target in (8, 9, 12):
        residual = skipped_residuals(g, state, target, Action.FORECAST)[0]
        assert torch.allclose(residual, traj(target), atol=1e-9, rtol=1e-9)
        # the fused skip: the input plus the same forecast, in one pass
        assert torch.allclose(skipped_outputs(g, state, target, Action.FORECAST, [x])[0], x + traj(target),
                              atol=1e-9, rtol=1e-9)
    assert torch.equal(skipped_outputs(g, state, 8, Action.REUSE, [x])[0], x + traj(state.history[-1].step))
    if order == 1:  # a quadratic is not recovered by a first-order forecast
        weights = forecast_weights([4, 7], 10)
        quad = [traj(s) + s * s * coeffs[0] for s in (4, 7)]
        assert not torch.allclose(weights[0] * quad[0] + weights[1] * quad[1], traj(10) + 100 * coeffs[0])


def _ranks_worker(rank: int, world: int, init: str, results):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        prev = [torch.randn(100, generator=g) + 3]
        cur = [prev[0] + (0.05 if rank == 0 else 0.3) * torch.randn(100, generator=g)]
        alone = rel_l1(cur, prev)  # no parallel artifact bound a mesh: ranks are independent (data parallel)
        bind_groups({GATE: dist.group.WORLD})
        try:
            results[rank] = (rel_l1(cur, prev), float((prev[0] - cur[0]).abs().sum()), float(prev[0].abs().sum()),
                             alone)
        finally:
            bind_groups({})
    finally:
        dist.destroy_process_group()


def test_probe_statistic_is_reduced_across_ranks(tmp_path):
    """Ranks see different shards; the statistic (and so the decision) is the global one on all."""
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_ranks_worker, args=(world, f"file://{tmp_path}/store", results), nprocs=world)
    stats = [results[r][0] for r in range(world)]
    expected = sum(results[r][1] for r in range(world)) / sum(results[r][2] for r in range(world))
    assert stats[0] == stats[1]
    assert abs(stats[0] - expected) < 1e-6 * expected  # statistics are summed in fp32
    for r in range(world):
        own = results[r][1] / results[r][2]
        assert abs(results[r][3] - own) < 1e-6 * own and abs(own - expected) > 0.01 * expected


def test_planned_actions_are_exact_for_step_driven_gates():
    """taylorseer and scm decide from the step alone: the plan equals what running decides."""
    for g in (gate("taylorseer", probe="none", taylor_order=1, interval=3),
              gate("scm", probe="none", mask=[True, False, False, True, True, False, True]),
              gate("taylorseer", probe="none", taylor_order=2, interval=4, warmup=2, cooldown=1)):
        letters = "".join(a[0] for a in planned_actions(g, 9))
        assert letters == run(g, [None] * 9)


def test_planned_actions_mark_probe_decided_steps_dynamic():
    g = gate(threshold=0.1, warmup=2, cooldown=1, mask=[True, True, True, False, True, True, True, True])
    assert planned_actions(g, 8) == ["computed", "computed", "dynamic", "reused"] + ["dynamic"] * 3 + ["computed"]
    t = gate("teacache", probe="input", threshold=0.5)
    assert planned_actions(t, 5) == ["computed", "dynamic", "dynamic", "dynamic", "computed"]
