"""Cache gates at run time: per step, decide whether a block range runs, and if not, what its
residual is (the last computed one, or a Taylor forecast from the last computed steps).

Decisions are a pure function of the gate, the step and the probe statistic; the statistic is
summed over every rank of a parallel artifact's mesh before comparing (dacc/runtime/ranks.py), so
all ranks take the single-process decision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from dacc.kernels import add_weighted, l1_change
from dacc.kernels.collectives import transfer_failed
from dacc.runtime.ranks import fsdp_group, gate_group
from dacc.schema.manifest import CacheGate


class Action(str, Enum):
    COMPUTE = "computed"
    REUSE = "reused"
    FORECAST = "forecast"


@dataclass
class Computed:
    """One computed step of the gated range: its stream values before and after. The residual
    (after - before) is only formed when a later step skips, so a gate that never fires never
    pays for it."""
    step: int
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    _residuals: list[torch.Tensor] | None = None

    def residuals(self) -> list[torch.Tensor]:
        if self._residuals is None:
            self._residuals = [o - i for i, o in zip(self.inputs, self.outputs)]
            self.inputs = self.outputs = []  # the residual is all a skip needs: hold one tensor per stream, not two
        return self._residuals


class StepRecord(NamedTuple):
    """One gate on one call as compile-time calibration records it (DaccModule._recorder)."""
    context: Any  # the cache context (a pipeline's "cond"/"uncond", or None)
    step: int
    stat: float | None  # the probe's measured change (None on a generation's first step)
    action: str
    outputs: list[torch.Tensor]  # the program's tensor outputs
    residuals: list[torch.Tensor] | None  # the gated range's residual per stream
    probe: list[torch.Tensor] | None  # the probe values the gate remembers after this step
    gate: int = 0  # which of the program's gates (ProgramSpec.gates) this is about
    flops: float = 0.0  # the FLOPs of the gate's range on this call, computed or not


@dataclass
class GateState:
    """What one gate remembers within one cache context."""
    prev_probe: list[torch.Tensor] | None = None
    accumulated: float = 0.0
    history: list[Computed] = field(default_factory=list)  # newest last
    cached_steps: int = 0
    continuous: int = 0
    last_stat: float | None = None
    decisions: list[str] = field(default_factory=list)  # this generation, one per step

    def new_generation(self) -> None:
        self.__init__()


def _ratio(stats: list[torch.Tensor]) -> float:
    """Σ|cur - prev| / Σ|prev| from per-tensor [num, den] pairs, summed across ranks first;
    the one host sync of a gated step."""
    total = stats[0]
    for s in stats[1:]:
        total = total + s
    group = gate_group()
    if group is not None:
        _reduce(total, dist.ReduceOp.SUM, group, "gate")  # in place: every stats tensor is fresh from l1_change
    num, den = total.tolist()
    ratio = num / max(den, 1e-12)
    shared = fsdp_group()
    if shared is not None:  # ranks with shared weight shards take one decision: the most cautious
        most = torch.tensor([ratio], dtype=torch.float64, device=total.device)
        _reduce(most, dist.ReduceOp.MAX, shared, "fsdp")
        ratio = float(most.item())
    return ratio


def _reduce(x: torch.Tensor, op, group, role: str) -> None:
    try:
        dist.all_reduce(x, op=op, group=group)
    except RuntimeError as exc:  # a rank that died or stalled: dacc's error, on every rank
        raise transfer_failed("cache gate all_reduce", role, exc) from None


def rel_l1(current: list[torch.Tensor], previous: list[torch.Tensor]) -> float:
    """mean|prev - cur| / mean|prev| over all tensors, summed across ranks before dividing."""
    return _ratio([l1_change(c, p)[1] for c, p in zip(current, previous)])


def measure(gate: CacheGate, state: GateState, env: dict) -> tuple[list[torch.Tensor] | None, float | None]:
    """The gate's probe value for this step and its change against the remembered one (None on
    the first step)."""
    if gate.probe == "none":
        return None, None
    value, stats = probe_change(gate, env, state.prev_probe[0] if state.prev_probe is not None else None)
    return [value], (change_ratio(stats) if stats is not None else None)


def probe_change(gate: CacheGate, env: dict,
                 previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the probe value, its change statistics against `previous`): device tensors, no host read.
    Several probed tensors (a joint block's two streams) are flattened into one value first: one
    fused statistics pass and no per-stream sums to add, the fewest dispatches on the one path a
    never-firing gate runs every step."""
    residual = gate.probe == "residual"
    if len(gate.probe_values) == 1:  # the value and its statistics in one pass (Triton on CUDA)
        return l1_change(env[gate.probe_values[0]], previous, env[gate.probe_base[0]] if residual else None)
    parts = ([env[v] - env[b] for v, b in zip(gate.probe_values, gate.probe_base)] if residual
             else [env[v] for v in gate.probe_values])
    return l1_change(torch.cat([x.reshape(-1) for x in parts]), previous)


def change_ratio(stats: torch.Tensor) -> float:
    """The probe's relative change from its statistics (one host read; summed over the ranks that
    serve one request)."""
    return _ratio([stats])


def polyval(coefficients: list[float], x: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


def forecast_weights(steps: list[int], step: int) -> list[float]:
    """The weights that interpolate values known at `steps` to `step` (Lagrange's basis): a
    forecast through these points is Σ w_k value_k, exact for trajectories that are polynomials of
    degree < len(steps) in the step index. Host floats: a forecast is then one fused pass."""
    weights = []
    for k, xk in enumerate(steps):
        w = 1.0
        for j, xj in enumerate(steps):
            if j != k:
                w *= (step - xj) / (xk - xj)
        weights.append(w)
    return weights


def skip_weights(gate: CacheGate, state: GateState, step: int, action: Action) -> tuple[list[Computed], list[float]]:
    """The computed steps a skipped step draws on, oldest first, and their weights (a reuse: the
    last computed step, weight 1; a forecast: the newest order + 1, interpolated to this step)."""
    if action is Action.FORECAST:
        points = state.history[-(min(gate.taylor_order, len(state.history) - 1) + 1):]
        return points, forecast_weights([c.step for c in points], step)
    return state.history[-1:], [1.0]


def skip_terms(gate: CacheGate, state: GateState, step: int,
               action: Action) -> tuple[list[list[torch.Tensor]], list[float]]:
    """What a skipped step adds to each stream's input: per stream, the cached residuals, and
    their weights (`skip_weights`)."""
    points, weights = skip_weights(gate, state, step, action)
    per_point = [c.residuals() for c in points]
    return [list(stream) for stream in zip(*per_point)], weights


def skipped_outputs(gate: CacheGate, state: GateState, step: int, action: Action,
                    inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each stream's output on a skipped step: its input plus the weighted residuals, one fused
    pass per stream (dacc/kernels/add_weighted.py)."""
    terms, weights = skip_terms(gate, state, step, action)
    return [add_weighted(x, t, weights) for x, t in zip(inputs, terms)]


def action_when_skipped(gate: CacheGate, state: GateState) -> Action:
    return Action.FORECAST if gate.taylor_order > 0 and len(state.history) > 1 else Action.REUSE


def forced_to_compute(gate: CacheGate, state: GateState, step: int, num_steps: int) -> bool:
    """Whether the step computes whatever the mask and the probe say: warmup, cooldown, limits."""
    return (step < gate.warmup or step >= num_steps - gate.cooldown or not state.history
            or (gate.strategy == "teacache" and step == num_steps - 1)  # TeaCache keeps the last step
            or (0 <= gate.max_cached_steps <= state.cached_steps)
            or (0 <= gate.max_continuous_cached_steps <= state.continuous))


def _static_action(gate: CacheGate, state: GateState, step: int, num_steps: int) -> Action | None:
    """COMPUTE when the step must compute whatever the probe says, the skip action when the static
    mask skips it, None when the gate's own rule decides."""
    if forced_to_compute(gate, state, step, num_steps):
        return Action.COMPUTE
    if gate.mask and step < len(gate.mask) and not gate.mask[step]:
        return action_when_skipped(gate, state)
    return None


PROBE_DRIVEN = ("dbcache", "teacache")
DYNAMIC = "dynamic"  # a planned step that the probe decides at run time


def planned_actions(gate: CacheGate, num_steps: int) -> list[str]:
    """Each step's action as far as it is known before running: exact for taylorseer, scm and schedule,
    which depend on the step alone; for dbcache and teacache the steps the probe decides are
    DYNAMIC (and planned as computed for what follows)."""
    state = GateState()
    for step in range(num_steps):
        action = _static_action(gate, state, step, num_steps)
        probed = action is None and gate.strategy in PROBE_DRIVEN
        if action is None:
            action = Action.COMPUTE if probed else decide(gate, state, step, num_steps, None, None)
        record(gate, state, step, action, Computed(step, [], []) if action is Action.COMPUTE else None)
        if probed:
            state.decisions[-1] = DYNAMIC
    return state.decisions


def decide(gate: CacheGate, state: GateState, step: int, num_steps: int,
           probe: list[torch.Tensor] | None, stat: float | None) -> Action:
    """The gate's decision for `step` from the probe and its measured change (see `measure`);
    updates the probe memory (not the residual history)."""
    if probe is not None:
        state.last_stat = stat
    static = _static_action(gate, state, step, num_steps)
    if static is not None and static is not Action.COMPUTE:
        return static  # a statically masked step
    skip_action = action_when_skipped(gate, state)
    if static is Action.COMPUTE:
        action = static
    elif gate.strategy == "dbcache":
        action = skip_action if stat is not None and stat < gate.threshold else Action.COMPUTE
    elif gate.strategy == "teacache":
        state.accumulated += polyval(gate.rescale, stat) if gate.rescale else stat
        action = skip_action if state.accumulated < gate.threshold else Action.COMPUTE
    elif gate.strategy == "taylorseer":
        last = state.history[-1].step
        action = skip_action if step - last < gate.interval else Action.COMPUTE
    else:  # scm or schedule alone: unmasked steps compute
        action = Action.COMPUTE
    if gate.strategy == "teacache":
        state.prev_probe = probe  # TeaCache compares consecutive steps
        if action is Action.COMPUTE:
            state.accumulated = 0.0
    elif action is Action.COMPUTE and probe is not None:
        state.prev_probe = probe  # residual probes compare with the last computed step
    return action


def record(gate: CacheGate, state: GateState, step: int, action: Action, computed: Computed | None) -> None:
    state.decisions.append(action.value)
    if action is Action.COMPUTE:
        state.continuous = 0
        keep = max(gate.taylor_order, 0) + 1
        state.history = (state.history + [computed])[-keep:]
    else:
        state.cached_steps += 1
        state.continuous += 1


def skipped_residuals(gate: CacheGate, state: GateState, step: int, action: Action) -> list[torch.Tensor]:
    """The residual a skipped step stands in for each stream (what calibration compares)."""
    terms, weights = skip_terms(gate, state, step, action)
    return [add_weighted(torch.zeros_like(t[0]), t, weights) if weights != [1.0] else t[0] for t in terms]
