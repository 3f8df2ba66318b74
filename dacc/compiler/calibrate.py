"""Calibration on the model's own `sample(model, seed)`: fit TeaCache's rescaling polynomial, and
search `cache_ratio` for the fastest setting that meets `cache.target_psnr` on seeds it was not
tuned on (dacc/compiler/search_seeds.py).

Both run the freshly written artifact through the runtime, so what is measured is what ships.
Speed is measured in FLOPs (deterministic); PSNR against the same artifact with the gate off.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.compiler.schedule import Schedules, optimal_schedules, residual_costs
from dacc.compiler.search_seeds import CALIBRATION_SEEDS, VALIDATION_SEEDS, clears, seed_psnr, validates
from dacc.runtime.cache import rel_l1
from dacc.schema.errors import DaccError
from dacc.schema.manifest import CacheGate, Manifest
from dacc.schema.plan import Plan, cache_options

SEARCH_ITERATIONS = 6


def _set_gates(model, make: Callable[[CacheGate], CacheGate]) -> None:
    for runner in model.programs:
        if runner.spec.cache is not None:
            runner.spec.cache = make(runner.spec.cache)


def _never_skip(gate: CacheGate) -> CacheGate:
    return dataclasses.replace(gate, threshold=0.0, interval=1, mask=[])


def run_samples(model, sample: Callable, seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
    model.reset()
    outs = []
    for seed in seeds:
        outs.append(sample(model, seed).detach().float())
    return outs, model.stats()


def _recorded(model, sample: Callable, seeds: list[int]) -> list[tuple]:
    """Every call of uncached generations from `seeds`, as the runtime records them."""
    originals = {id(r): r.spec.cache for r in model.programs}
    _set_gates(model, _never_skip)
    model._recorder = []
    try:
        run_samples(model, sample, seeds)
        return model._recorder
    finally:
        model._recorder = None
        for runner in model.programs:
            runner.spec.cache = originals[id(runner)]


def fit_rescale(model, sample: Callable, seeds: list[int], log) -> tuple[list[float], dict]:
    """TeaCache: (input change, output change) per step -> numpy.polyfit, degree up to 4."""
    records = _recorded(model, sample, seeds)
    xs, ys, previous = [], [], {}
    for context, step, stat, _, outputs, _ in records:
        prev = previous.get(context)
        if stat is not None and prev is not None and step > 0:
            xs.append(stat)
            ys.append(rel_l1(outputs, prev))
        previous[context] = outputs
    if len(xs) < 3:
        raise DaccError(f"calibration saw only {len(xs)} step pairs", "sample()",
                        "make sample() run at least a few denoising steps")
    degree = min(4, len(set(np.round(xs, 12))) - 1)
    coefficients = [float(c) for c in np.polyfit(np.array(xs), np.array(ys), degree)]
    log(f"teacache: fitted a degree-{degree} rescale polynomial on {len(xs)} steps from {len(seeds)} seed(s)")
    return coefficients, {"points": len(xs), "seeds": seeds, "degree": degree}


def measure_schedules(model, plan: Plan, sample: Callable, log) -> tuple[Schedules, dict]:
    """`strategy: schedule`: the gated range's residual at every step of uncached generations from
    the calibration seeds -> the least-cost mask for every count of computed steps."""
    gate = next(r.spec.cache for r in model.programs if r.spec.cache is not None)
    trajectories: dict[tuple, list[torch.Tensor]] = {}
    generation: dict[Any, int] = {}  # per cache context: step 0 starts its next generation
    for context, step, _, _, _, residuals in _recorded(model, sample, list(CALIBRATION_SEEDS)):
        generation[context] = generation.get(context, -1) + (step == 0)
        trajectories.setdefault((context, generation[context]), []).append(torch.cat([r.flatten() for r in residuals]))
    steps = plan.num_inference_steps
    complete = [t for t in trajectories.values() if len(t) == steps]
    if not complete:
        raise DaccError(f"sample() ran no generation of num_inference_steps ({steps}) steps", "sample()",
                        "make sample() run the artifact's number of steps (dacc.models.flow.sample reads it "
                        "from model.manifest.num_inference_steps)")
    cost = residual_costs(complete)
    forced = {*range(gate.warmup), *range(steps - gate.cooldown, steps)}
    schedules = optimal_schedules(cost, forced, gate.max_continuous_cached_steps, gate.max_cached_steps)
    log(f"schedule: measured the cost of reusing each step on {len(complete)} generation(s); "
        f"{schedules.fewest}..{steps} computed steps possible")
    step_costs = [0.0] + [round(float(cost[i - 1, i]), 5) for i in range(1, steps)]
    return schedules, {"seeds": list(CALIBRATION_SEEDS), "step_costs": step_costs,
                       "least_cost": {str(m): round(c, 5) for m, c in sorted(schedules.cost.items())}}


def choose_ratio(evaluate: Callable[[float, tuple[int, ...]], dict], target: float,
                 log) -> tuple[float, dict | None, list[dict]]:
    """(ratio, its validation trial or None, the calibration trials). `evaluate(ratio, seeds)` gives
    a trial: {"cache_ratio", "psnrs" (one per seed), "flops_speedup", ...}. PSNR is taken to fall
    as the ratio grows, which bisection needs; validation halves the ratio until it holds."""
    trials = [evaluate(1.0, CALIBRATION_SEEDS)]
    lo, hi = (1.0, 1.0) if clears(trials[0]["psnrs"], target) else (0.0, 1.0)
    for _ in range(SEARCH_ITERATIONS if lo < hi else 0):
        mid = (lo + hi) / 2
        trials.append(evaluate(mid, CALIBRATION_SEEDS))
        lo, hi = (mid, hi) if clears(trials[-1]["psnrs"], target) else (lo, mid)
    ratio = lo
    while ratio >= 2.0 ** -SEARCH_ITERATIONS:
        check = evaluate(ratio, VALIDATION_SEEDS)
        if check["flops_speedup"] <= 1.0:
            break  # skips nothing any more: the no-skip plan
        if validates(check["psnrs"], target):
            return ratio, check, trials
        log(f"  cache_ratio {ratio:.3f} cleared calibration but not validation "
            f"(mean {statistics.mean(check['psnrs']):.2f} dB, worst {min(check['psnrs']):.2f}); halving it")
        ratio /= 2
    return 0.0, None, trials


def search_ratio(model, plan: Plan, sample: Callable, target: float, log,
                 knobs_for: Callable[[float], dict] | None = None) -> dict[str, Any]:
    """The largest cache_ratio that clears `target` on the calibration seeds with a margin (bisection),
    then holds on the validation seeds (halved until it does); the no-skip knobs if none does.
    Returns the chosen knobs and what was measured."""
    options = cache_options(plan)
    if any(getattr(options, k, None) is not None for k in ("threshold", "interval", "policy")):
        raise DaccError("cache.target_psnr searches cache_ratio, but the options fix the knob it maps to",
                        "plan cache.options", "remove threshold/interval/policy from the options, or drop target_psnr")
    steps, strategy = plan.num_inference_steps, plan.cache.strategy
    knobs_for = knobs_for or (lambda ratio: dynamic_knobs(strategy, ratio, options, steps))
    references: dict[int, torch.Tensor] = {}

    def evaluate(ratio: float, seeds: tuple[int, ...]) -> dict[str, Any]:
        missing = [s for s in seeds if s not in references]
        if missing:
            _set_gates(model, _never_skip)
            references.update(zip(missing, run_samples(model, sample, missing)[0]))
        # the knobs are exactly the fields _never_skip overrode, so they replace those on every call
        knobs = knobs_for(ratio)
        _set_gates(model, lambda gate: dataclasses.replace(gate, **knobs))
        start = time.perf_counter()
        outs, stats = run_samples(model, sample, list(seeds))
        psnrs = [round(seed_psnr(o, references[s]), 3) for o, s in zip(outs, seeds)]
        speedup = stats["flops_total"] / max(stats["flops_computed"], 1.0)
        log(f"  cache_ratio {ratio:.3f} on seeds {list(seeds)}: PSNR {', '.join(f'{p:.2f}' for p in psnrs)} dB, "
            f"{speedup:.2f}x fewer FLOPs ({time.perf_counter() - start:.1f}s)")
        return {"cache_ratio": ratio, "psnrs": psnrs, "flops_speedup": speedup, **knobs,
                "decisions": stats["decisions"]}

    log(f"searching cache_ratio for PSNR >= {target} dB: calibration seeds {list(CALIBRATION_SEEDS)}, "
        f"validation seeds {list(VALIDATION_SEEDS)}")
    ratio, validated, trials = choose_ratio(evaluate, target, log)
    calibrated = {t["cache_ratio"]: t for t in trials}
    record: dict[str, Any] = {"target_psnr": target, "met": validated is not None,
                              "calibration_seeds": list(CALIBRATION_SEEDS), "validation_seeds": list(VALIDATION_SEEDS),
                              "trials": [[t["cache_ratio"], min(t["psnrs"]), round(t["flops_speedup"], 3)]
                                         for t in trials]}
    if validated is None:
        knobs = knobs_for(0.0)
        log(f"warning: no cache_ratio that skips anything reaches PSNR {target} dB on both the calibration and "
            f"the validation seeds; this artifact computes every step (lower cache.target_psnr, or try "
            f"another strategy)")
        record.update({"cache_ratio": 0.0, "flops_speedup": 1.0, "decisions": {}, **knobs})
    else:
        knobs = {k: validated[k] for k in ("threshold", "interval", "mask")}
        v = validated["psnrs"]
        record.update({"cache_ratio": ratio, "flops_speedup": round(validated["flops_speedup"], 3),
                       "calibration_psnr": calibrated.get(ratio, {}).get("psnrs"), "validation_psnr": v,
                       "validation_psnr_mean": round(statistics.mean(v), 3), "validation_psnr_worst": min(v),
                       "decisions": validated["decisions"], **knobs})
        log(f"chose cache_ratio {ratio:.3f}: validation PSNR {record['validation_psnr_mean']:.2f} dB "
            f"(worst seed {min(v):.2f}), {validated['flops_speedup']:.2f}x fewer FLOPs")
    _set_gates(model, lambda gate: dataclasses.replace(gate, **knobs))
    return record


def _needs(manifest: Manifest, plan: Plan) -> tuple[bool, bool]:
    gates = [p.cache for p in manifest.programs if p.cache is not None]
    needs_rescale = any(g.strategy == "teacache" and not g.rescale for g in gates)
    needs_schedule = any(g.strategy == "schedule" and not g.mask for g in gates)
    return needs_rescale or needs_schedule, bool(gates) and plan.cache.target_psnr is not None


def needs_calibration(manifest: Manifest, plan: Plan) -> bool:
    return any(_needs(manifest, plan))


def check_calibration_inputs(manifest: Manifest, plan: Plan, sample: Callable | None) -> None:
    needs_fit, needs_search = _needs(manifest, plan)
    if (needs_fit or needs_search) and sample is None:
        what = {"teacache": "teacache calibration", "schedule": "strategy 'schedule'"}.get(plan.cache.strategy,
                                                                                          "cache.target_psnr")
        fix = {"schedule": "add sample(), or give a fixed step mask with strategy scm and options.mask"}.get(
            plan.cache.strategy, "add sample(), or give cache.options.rescale / drop target_psnr")
        raise DaccError(f"{what} needs the model file to define sample(model, seed)", "model file", fix)


def calibrate(manifest: Manifest, model, plan: Plan, sample: Callable | None, log) -> None:
    """Fill in what the gates of `manifest` (and of the loaded `model`) still need."""
    needs_fit, needs_search = _needs(manifest, plan)
    target = plan.cache.target_psnr
    if not (needs_fit or needs_search):
        return
    check_calibration_inputs(manifest, plan, sample)
    info: dict[str, Any] = {}
    knobs_for = None  # the strategy's own mapping from cache_ratio, unless calibration measures one
    if plan.cache.strategy == "teacache" and needs_fit:
        # seeds 0.. : the search's validation seeds stay unseen unless the plan asks for many
        seeds = list(range(cache_options(plan).calibration_seeds))
        rescale, fit = fit_rescale(model, sample, seeds, log)
        info["rescale_fit"] = fit
        _set_gates(model, lambda gate: dataclasses.replace(gate, rescale=rescale))
    elif plan.cache.strategy == "schedule" and needs_fit:
        schedules, info["schedule"] = measure_schedules(model, plan, sample, log)
        knobs_for = schedules.knobs
        if not needs_search:
            _set_gates(model, lambda gate: dataclasses.replace(gate, **knobs_for(plan.cache.cache_ratio)))
    if needs_search:
        info["search"] = search_ratio(model, plan, sample, target, log, knobs_for)
    for spec, runner in zip(manifest.programs, model.programs):
        if spec.cache is not None:
            spec.cache = dataclasses.replace(runner.spec.cache, calibration=info)
