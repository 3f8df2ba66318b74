"""Cache gates at run time: per step, decide whether a block range runs, and if not, what its
residual is (the last computed one, or a Taylor forecast from the last computed steps).

Decisions are a pure function of the gate, the step and the probe statistic; the statistic is
summed over every rank before comparing, so under sequence parallelism all ranks decide alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.distributed as dist

from dacc.schema.manifest import CacheGate


class Action(str, Enum):
    COMPUTE = "computed"
    REUSE = "reused"
    FORECAST = "forecast"


@dataclass
class GateState:
    """What one gate remembers within one cache context."""
    prev_probe: torch.Tensor | None = None
    accumulated: float = 0.0
    history: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)  # (step, residuals), newest last
    cached_steps: int = 0
    continuous: int = 0
    last_stat: float | None = None
    decisions: list[str] = field(default_factory=list)  # this generation, one per step

    def new_generation(self) -> None:
        self.__init__()


def rel_l1(current: list[torch.Tensor], previous: list[torch.Tensor]) -> float:
    """mean|prev - cur| / mean|prev| over all tensors, summed across ranks before dividing."""
    num = sum((p.float() - c.float()).abs().sum() for p, c in zip(previous, current))
    den = sum(p.float().abs().sum() for p in previous)
    stats = torch.stack([torch.as_tensor(num, dtype=torch.float64), torch.as_tensor(den, dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    return float(stats[0] / stats[1].clamp_min(1e-12))


def polyval(coefficients: list[float], x: float) -> float:
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


def forecast(history: list[tuple[int, list[torch.Tensor]]], order: int, step: int) -> list[torch.Tensor]:
    """Newton interpolation through the newest `order + 1` computed residuals, evaluated at `step`:
    exact for trajectories that are polynomials of degree <= order in the step index."""
    points = history[-(order + 1):]
    steps = [s for s, _ in points]
    # divided-difference table, built from the newest point backwards
    table = [r for _, r in reversed(points)]
    xs = list(reversed(steps))
    coeffs = [table[0]]
    level = table
    for k in range(1, len(points)):
        level = [[(a - b) / (xs[i] - xs[i + k]) for a, b in zip(level[i], level[i + 1])] for i in range(len(level) - 1)]
        coeffs.append(level[0])
    out = [t.clone() for t in coeffs[0]]
    basis = 1.0
    for k in range(1, len(coeffs)):
        basis *= step - xs[k - 1]
        out = [o + basis * c for o, c in zip(out, coeffs[k])]
    return out


def decide(gate: CacheGate, state: GateState, step: int, num_steps: int, probe: list[torch.Tensor] | None) -> Action:
    """The gate's decision for `step`; updates the probe memory (not the residual history)."""
    stat = None
    if probe is not None:
        ref = state.prev_probe
        stat = rel_l1(probe, ref) if ref is not None else None
        state.last_stat = stat
    skip_action = Action.FORECAST if gate.taylor_order > 0 and len(state.history) > 1 else Action.REUSE

    forced = (step < gate.warmup or step >= num_steps - gate.cooldown or not state.history
              or (gate.strategy == "teacache" and step == num_steps - 1)  # TeaCache keeps the last step
              or (0 <= gate.max_cached_steps <= state.cached_steps)
              or (0 <= gate.max_continuous_cached_steps <= state.continuous))
    if gate.mask and step < len(gate.mask) and not gate.mask[step] and not forced:
        return skip_action  # a statically masked step
    if forced:
        action = Action.COMPUTE
    elif gate.strategy == "dbcache":
        action = skip_action if stat is not None and stat < gate.threshold else Action.COMPUTE
    elif gate.strategy == "teacache":
        state.accumulated += polyval(gate.rescale, stat) if gate.rescale else stat
        action = skip_action if state.accumulated < gate.threshold else Action.COMPUTE
    elif gate.strategy == "taylorseer":
        last = state.history[-1][0]
        action = skip_action if step - last < gate.interval else Action.COMPUTE
    else:  # scm alone: unmasked steps compute
        action = Action.COMPUTE
    if gate.strategy == "teacache":
        state.prev_probe = probe  # TeaCache compares consecutive steps
        if action is Action.COMPUTE:
            state.accumulated = 0.0
    elif action is Action.COMPUTE and probe is not None:
        state.prev_probe = probe  # residual probes compare with the last computed step
    return action


def record(gate: CacheGate, state: GateState, step: int, action: Action,
           residuals: list[torch.Tensor] | None) -> None:
    state.decisions.append(action.value)
    if action is Action.COMPUTE:
        state.continuous = 0
        keep = max(gate.taylor_order, 0) + 1
        state.history = (state.history + [(step, residuals)])[-keep:]
    else:
        state.cached_steps += 1
        state.continuous += 1


def skipped_residuals(gate: CacheGate, state: GateState, step: int, action: Action) -> list[torch.Tensor]:
    if action is Action.FORECAST:
        return forecast(state.history, min(gate.taylor_order, len(state.history) - 1), step)
    return state.history[-1][1]
