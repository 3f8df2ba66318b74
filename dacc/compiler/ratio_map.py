"""What `cache_ratio` means for one model, measured rather than assumed.

A fixed map from cache_ratio to a threshold or interval means different things on different
models: a residual-change threshold of 0.1 skips half the steps of one model and none of another.
So the compiler measures the model. From uncached generations on the calibration seeds it records,
at every step, the gated range's residual, the probe's values and the probe's change. Then it
replays the gate's own decision code (dacc/runtime/cache.py) on those recordings for any setting of
its knob, and scores each setting by the error it would add:

    error = (1 / steps) * sum over skipped steps i of mean|stand-in_i - residual_i| / mean|residual|

where the stand-in is what the runtime would use (the last computed residual, or its Taylor
forecast). `cache_ratio` r buys an error budget of r * ERROR_PER_RATIO * gain, and each strategy
gets the most aggressive knob whose replayed error fits the budget. The same ratio thus means about
the same replayed error on every model and for every strategy; the gain, measured on sample()
(dacc/compiler/ratio_fit.py), turns that into about the same PSNR:

- dbcache, teacache: the largest threshold within budget (bisection);
- taylorseer: refresh steps chosen greedily where the forecast error would exceed a tolerance (so
  they crowd where the trajectory bends), the largest tolerance within budget; a static mask, not
  a fixed interval;
- schedule: the mask with the fewest computed steps within budget, or with `ranges`, the masks of
  fewest FLOPs (dacc/compiler/schedule.py);
- magcache: the largest threshold of MagCache's rule within budget (dacc/compiler/magcache.py).

The replay ignores that skipping a step changes what later steps see, and how the model carries a
residual error to its output, so the budget alone is a guide; the gain and `target_psnr`
(dacc/compiler/calibrate.py) measure the real thing.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dacc.compiler.cache_knobs import CALIBRATED_MASKS
from dacc.compiler.magcache import magcache_mask
from dacc.compiler.schedule import RangeSchedules
from dacc.runtime.cache import (Action, Computed, GateState, StepRecord, action_when_skipped, decide, forced_to_compute,
                                record, rel_l1, skipped_residuals)
from dacc.schema.errors import DaccError
from dacc.schema.manifest import CacheGate

# The replayed error per step that cache_ratio 1 allows. Tuned on the glyphs model at 50 steps,
# where an error of 0.075 per step gave 30.2 dB (dbcache), 28.6 (teacache), 31.5 (schedule) and
# 33.7 (taylorseer order 2) on held-out seeds: so ratio 0.5 is about 30 dB there. bench/ratio.py
# reports it on the demo and patterns models.
ERROR_PER_RATIO = 0.15
BISECTION_STEPS = 20
MAPPED = ("dbcache", "teacache", "taylorseer", "schedule", "magcache")


@dataclass
class Trajectory:
    """One uncached generation (one seed, one cache context) as the gate saw it."""
    residuals: torch.Tensor  # (steps, n) float64: the gated range's residual, streams concatenated
    probes: list[list[torch.Tensor] | None]
    stats: list[float | None]


def trajectories(records: list[StepRecord], steps: int, gate: int = 0) -> list[Trajectory]:
    """The complete generations (of `steps` steps) in `records`, one per seed and cache context, as
    gate number `gate` of the program saw them."""
    grouped: dict[tuple, list[StepRecord]] = {}
    generation: dict[Any, int] = {}  # per cache context: step 0 starts its next generation
    for r in (r for r in records if r.gate == gate):
        generation[r.context] = generation.get(r.context, -1) + (r.step == 0)
        grouped.setdefault((r.context, generation[r.context]), []).append(r)
    out = [Trajectory(torch.stack([torch.cat([x.detach().double().flatten() for x in r.residuals]) for r in g]),
                      [r.probe for r in g], [r.stat for r in g]) for g in grouped.values() if len(g) == steps]
    if not out:
        raise DaccError(f"sample() ran no generation of num_inference_steps ({steps}) steps", "sample()",
                        "make sample() run the artifact's number of steps (dacc.models.flow.sample reads it "
                        "from model.manifest.num_inference_steps)")
    return out


def with_knobs(knobs: dict) -> Callable[[CacheGate, int], CacheGate]:
    """knobs -> a function of (gate, its position among the program's gates) giving the gate with
    them set; `masks` (a schedule's: one mask per gate) sets each gate's own mask."""
    masks = knobs.get("masks")
    shared = {k: v for k, v in knobs.items() if k != "masks"}
    return lambda gate, g: dataclasses.replace(gate, **{**shared, **({"mask": masks[g]} if masks else {})})


def range_flops(records: list[StepRecord], gates: int) -> list[float]:
    """Per gate, the mean FLOPs of its range per call."""
    return [statistics.mean(r.flops for r in records if r.gate == g) for g in range(gates)]


def replay(gate: CacheGate, t: Trajectory, scale: float) -> tuple[float, int]:
    """(summed relative error, skipped steps) of `gate` on one recorded generation, decided by the
    runtime's own rules."""
    steps, state, error, skipped = len(t.residuals), GateState(), 0.0, 0
    for i in range(steps):
        probe, stat = None, None
        if gate.probe == "residual":
            probe = t.probes[i]
            stat = rel_l1(probe, state.prev_probe) if state.prev_probe is not None else None
        elif gate.probe == "input":  # TeaCache compares consecutive steps, as recorded
            probe, stat = t.probes[i], t.stats[i]
        action = decide(gate, state, i, steps, probe, stat)
        if action is Action.COMPUTE:
            record(gate, state, i, action, Computed(i, [], [], [t.residuals[i]]))
        else:
            stand_in = skipped_residuals(gate, state, i, action)[0]
            error += float((stand_in - t.residuals[i]).abs().mean()) / scale
            skipped += 1
            record(gate, state, i, action, None)
    return error, skipped


def refresh_mask(gate: CacheGate, ts: list[Trajectory], scale: float, tolerance: float) -> list[bool]:
    """TaylorSeer's refresh steps: walking the steps, skip (forecast) wherever the forecast error,
    averaged over the recordings, stays within `tolerance`; compute where it would not, or where
    the gate's warmup, cooldown and limits say so."""
    steps = len(ts[0].residuals)
    free = dataclasses.replace(gate, mask=[], interval=1)
    states = [GateState() for _ in ts]
    mask = []
    for i in range(steps):
        forced = forced_to_compute(free, states[0], i, steps)
        error = 0.0
        if not forced:
            action = action_when_skipped(free, states[0])
            error = sum(float((skipped_residuals(free, s, i, action)[0] - t.residuals[i]).abs().mean())
                        for s, t in zip(states, ts)) / len(ts) / scale
        compute = forced or error > tolerance
        mask.append(compute)
        for s, t in zip(states, ts):
            record(free, s, i, Action.COMPUTE if compute else action_when_skipped(free, s),
                   Computed(i, [], [], [t.residuals[i]]) if compute else None)
    return mask


class RatioMap:
    """cache_ratio -> a gate's knobs for one model, from its recorded generations."""

    def __init__(self, gate: CacheGate, ts: list[Trajectory], base_mask: list[bool],
                 schedules: RangeSchedules | None = None, magnitudes: list[float] | None = None):
        self.gate, self.ts, self.base_mask, self.schedules = gate, ts, base_mask, schedules
        self.magnitudes = magnitudes
        self.steps = len(ts[0].residuals)
        self.scale = max(float(torch.cat([t.residuals.abs().flatten() for t in ts]).mean()), 1e-12)
        self.gain = 1.0  # budget per ratio over ERROR_PER_RATIO: set from measured PSNR (ratio_fit.py)
        self._memo: dict[float, dict] = {}

    def error(self, knobs: dict) -> tuple[float, float]:
        """(replayed error per step, fraction of steps skipped), averaged over the recordings; for a
        step x range schedule, its measured cost per step and the fraction of the ranges' FLOPs it skips."""
        if len(knobs.get("masks", [])) > 1:
            return self.schedules.cost(knobs["masks"]) / self.steps, self.schedules.skipped(knobs["masks"])
        gate = with_knobs(knobs)(self.gate, 0)
        results = [replay(gate, t, self.scale) for t in self.ts]
        n = len(results) * self.steps
        return sum(e for e, _ in results) / n, sum(s for _, s in results) / n

    def budget(self, ratio: float) -> float:
        return ratio * ERROR_PER_RATIO * self.gain

    def knobs(self, ratio: float) -> dict:
        """The most aggressive knobs whose replayed error fits the ratio's budget."""
        return self.knobs_at(self.budget(ratio))

    def knobs_at(self, budget: float) -> dict:
        """The most aggressive knobs whose replayed error per step fits `budget`."""
        if budget not in self._memo:
            self._memo[budget] = self._knobs(budget) if budget > 0 else self._no_skip()
        return dict(self._memo[budget])

    def _no_skip(self) -> dict:
        if self.gate.strategy in CALIBRATED_MASKS:
            return {"threshold": 0.0, "interval": 1, "mask": [True] * self.steps}  # on every gate
        return {"threshold": 0.0, "interval": 1, "mask": list(self.base_mask)}

    def _knobs(self, budget: float) -> dict:
        strategy = self.gate.strategy
        if strategy == "schedule":
            return {"threshold": 0.0, "interval": 1, "masks": self.schedules.choose(budget * self.steps)}
        if strategy == "magcache":
            def make(threshold: float) -> dict:
                return {"threshold": threshold, "interval": 1,
                        "mask": magcache_mask(self.gate, self.magnitudes, threshold)}
        elif strategy == "taylorseer":
            def make(tolerance: float) -> dict:
                mask = refresh_mask(self.gate, self.ts, self.scale, tolerance)
                if self.base_mask:
                    mask = [a and b for a, b in zip(mask, self.base_mask)]
                return {"threshold": 0.0, "interval": 1, "mask": mask}
        else:
            def make(threshold: float) -> dict:
                return {"threshold": threshold, "interval": 1, "mask": list(self.base_mask)}
        return _largest_within(make, lambda knobs: self.error(knobs)[0] <= budget)

    def describe(self, ratios=(0.25, 0.5, 0.75, 1.0)) -> dict:
        """What the manifest keeps: the budget per ratio and what it maps to on this model."""
        points = []
        for r in ratios:
            knobs = self.knobs(r)
            error, skipped = self.error(knobs)
            points.append({"cache_ratio": r, "threshold": round(knobs["threshold"], 6),
                           "computed_steps": self.steps - round(skipped * self.steps),
                           "error": round(error, 5), "skipped": round(skipped, 3)})
        return {"error_per_ratio": ERROR_PER_RATIO, "gain": round(self.gain, 4), "recordings": len(self.ts),
                "points": points}


def _largest_within(make: Callable[[float], dict], fits: Callable[[dict], bool]) -> dict:
    """make(x) for the largest x >= 0 with fits(make(x)), taking fits to hold below some x: double
    until it fails, then bisect."""
    lo, hi = 0.0, 1e-3
    for _ in range(40):
        if not fits(make(hi)):
            break
        lo, hi = hi, hi * 2
    else:
        return make(lo)  # fits however large: the knob saturates (every skip the limits allow)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(make(mid)) else (lo, mid)
    return make(lo)
