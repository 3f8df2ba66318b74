"""Calibration on the model's own `sample(model, seed)`: fit TeaCache's rescaling polynomial, and
search `cache_ratio` for the fastest setting that meets `cache.target_psnr` on seeds it was not
tuned on (dacc/compiler/search_seeds.py).

Both run the freshly written artifact through the runtime, so what is measured is what ships.
Speed is measured in FLOPs (deterministic); PSNR against the same artifact with the gate off.
A parallel artifact cannot run in the compiling process (it holds one rank): its single-process
twin, the same plan without parallel degrees, is calibrated instead and its knobs adopted
(adopt_calibration), since a parallel gate decides as the twin's does.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from dacc.compiler.cache_knobs import CALIBRATED_MASKS, dynamic_knobs
from dacc.compiler.magcache import magcache_mask, magnitude_ratios
from dacc.compiler.ratio_fit import FIT_SEEDS, fit_budget, ratio_psnr
from dacc.compiler.ratio_map import (ERROR_PER_RATIO, MAPPED, RatioMap, Trajectory, range_flops, trajectories,
                                     with_knobs)
from dacc.compiler.schedule import RangeSchedules, optimal_schedules, residual_costs, residual_scale
from dacc.compiler.search_seeds import CALIBRATION_SEEDS, VALIDATION_SEEDS, clears, seed_psnr, validates
from dacc.runtime.cache import StepRecord, rel_l1
from dacc.schema.errors import DaccError
from dacc.schema.manifest import CacheGate, Manifest
from dacc.schema.plan import THRESHOLD_STRATEGIES, Plan, cache_options

SEARCH_ITERATIONS = 6


def _set_gates(model, make: Callable[[CacheGate, int], CacheGate]) -> None:
    """Each gate of each program becomes make(gate, its position among the program's gates)."""
    for runner in model.programs:
        runner.spec.gates = [make(gate, g) for g, gate in enumerate(runner.spec.gates)]


def _never_skip(gate: CacheGate, g: int) -> CacheGate:
    return dataclasses.replace(gate, threshold=0.0, interval=1, mask=[])


def run_samples(model, sample: Callable, seeds: list[int]) -> tuple[list[torch.Tensor], dict]:
    model.reset()
    outs = []
    for seed in seeds:
        outs.append(sample(model, seed).detach().float())
    return outs, model.stats()


def _recorded(model, sample: Callable, seeds: list[int]) -> tuple[list[StepRecord], dict[int, torch.Tensor]]:
    """Every call of uncached generations from `seeds`, as the runtime records them, and each seed's
    uncached output."""
    originals = {id(r): r.spec.gates for r in model.programs}
    _set_gates(model, _never_skip)
    model._recorder = []
    try:
        outs = run_samples(model, sample, seeds)[0]
        return model._recorder, dict(zip(seeds, outs))
    finally:
        model._recorder = None
        for runner in model.programs:
            runner.spec.gates = originals[id(runner)]


def add_references(model, sample: Callable, seeds, references: dict[int, torch.Tensor]) -> None:
    """Put the uncached output of every seed of `seeds` that `references` lacks into it."""
    missing = [s for s in seeds if s not in references]
    if missing:
        _set_gates(model, _never_skip)
        references.update(zip(missing, run_samples(model, sample, missing)[0]))


def measure_knobs(model, sample: Callable, knobs: dict, seeds: list[int] | tuple[int, ...],
                  references: dict[int, torch.Tensor]) -> tuple[list[float], float, dict]:
    """(PSNR per seed against its uncached output, FLOPs speedup, decisions) of the artifact with
    `knobs` on every gate; the knobs are exactly the fields _never_skip overrides, so they replace
    whatever the gates held."""
    _set_gates(model, with_knobs(knobs))
    outs, stats = run_samples(model, sample, list(seeds))
    psnrs = [round(seed_psnr(o, references[s]), 3) for o, s in zip(outs, seeds)]
    return psnrs, stats["flops_total"] / max(stats["flops_computed"], 1.0), stats["decisions"]


def fit_rescale(records: list[StepRecord], seeds: list[int], log) -> tuple[list[float], dict]:
    """TeaCache: (input change, output change) per step -> numpy.polyfit, degree up to 4."""
    xs, ys, previous = [], [], {}
    for r in records:
        prev = previous.get(r.context)
        if r.stat is not None and prev is not None and r.step > 0:
            xs.append(r.stat)
            ys.append(rel_l1(r.outputs, prev))
        previous[r.context] = r.outputs
    if len(xs) < 3:
        raise DaccError(f"calibration saw only {len(xs)} step pairs", "sample()",
                        "make sample() run at least a few denoising steps")
    degree = min(4, len(set(np.round(xs, 12))) - 1)
    coefficients = [float(c) for c in np.polyfit(np.array(xs), np.array(ys), degree)]
    log(f"teacache: fitted a degree-{degree} rescale polynomial on {len(xs)} steps from {len(seeds)} seed(s)")
    return coefficients, {"points": len(xs), "seeds": seeds, "degree": degree}


def measure_schedules(per_range: list[list[Trajectory]], flops: list[float], gate: CacheGate, steps: int,
                      log) -> tuple[RangeSchedules, dict]:
    """`strategy: schedule`: per block range (one gate each, with its recorded generations and its
    FLOPs per step), the cost of reusing each step's residual at every later step -> the least-cost
    mask of each range for every count of computed steps."""
    residuals = [[list(t.residuals) for t in ts] for ts in per_range]
    scale = sum(residual_scale(r) for r in residuals)  # one scale: a range's cost is its share of the error
    costs = [residual_costs(r, scale) for r in residuals]
    forced = {*range(gate.warmup), *range(steps - gate.cooldown, steps)}
    ranges = [optimal_schedules(c, forced, gate.max_continuous_cached_steps, gate.max_cached_steps) for c in costs]
    where = f" in each of {len(ranges)} block ranges" if len(ranges) > 1 else ""
    log(f"schedule: measured the cost of reusing each step{where} on {len(per_range[0])} generation(s); "
        f"{', '.join(str(s.fewest) for s in ranges)}..{steps} computed steps possible")
    info = [{"flops": f, "step_costs": [0.0] + [round(float(c[i - 1, i]), 5) for i in range(1, steps)],
             "least_cost": {str(m): round(v, 5) for m, v in sorted(s.cost.items())}}
            for s, f, c in zip(ranges, flops, costs)]
    return RangeSchedules(ranges, flops, costs), {"seeds": list(CALIBRATION_SEEDS), "ranges": info}


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
                 knobs_for: Callable[[float], dict] | None = None,
                 references: dict[int, torch.Tensor] | None = None) -> dict[str, Any]:
    """The largest cache_ratio that clears `target` on the calibration seeds with a margin (bisection),
    then holds on the validation seeds (halved until it does); the no-skip knobs if none does.
    Returns the chosen knobs and what was measured."""
    options = cache_options(plan)
    if any(getattr(options, k, None) is not None for k in ("threshold", "interval", "policy", "masks")):
        raise DaccError("cache.target_psnr searches cache_ratio, but the options fix the knob it maps to",
                        "plan cache.options", "remove threshold/interval/policy/masks from the options, or drop "
                        "target_psnr")
    steps, strategy = plan.num_inference_steps, plan.cache.strategy
    knobs_for = knobs_for or (lambda ratio: dynamic_knobs(strategy, ratio, options, steps))
    references = dict(references or {})  # uncached outputs per seed, run when first needed

    def evaluate(ratio: float, seeds: tuple[int, ...]) -> dict[str, Any]:
        add_references(model, sample, seeds, references)
        knobs = knobs_for(ratio)
        start = time.perf_counter()
        psnrs, speedup, decisions = measure_knobs(model, sample, knobs, seeds, references)
        log(f"  cache_ratio {ratio:.3f} on seeds {list(seeds)}: PSNR {', '.join(f'{p:.2f}' for p in psnrs)} dB, "
            f"{speedup:.2f}x fewer FLOPs ({time.perf_counter() - start:.1f}s)")
        return {"cache_ratio": ratio, "psnrs": psnrs, "flops_speedup": speedup, **knobs, "decisions": decisions}

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
        knobs = {k: validated[k] for k in ("threshold", "interval", "mask", "masks") if k in validated}
        v = validated["psnrs"]
        record.update({"cache_ratio": ratio, "flops_speedup": round(validated["flops_speedup"], 3),
                       "calibration_psnr": calibrated.get(ratio, {}).get("psnrs"), "validation_psnr": v,
                       "validation_psnr_mean": round(statistics.mean(v), 3), "validation_psnr_worst": min(v),
                       "decisions": validated["decisions"], **knobs})
        log(f"chose cache_ratio {ratio:.3f}: validation PSNR {record['validation_psnr_mean']:.2f} dB "
            f"(worst seed {min(v):.2f}), {validated['flops_speedup']:.2f}x fewer FLOPs")
    _set_gates(model, with_knobs(knobs))
    return record


@dataclass(frozen=True)
class Needs:
    """What calibration has to do for a manifest's gates."""
    rescale: bool  # fit TeaCache's rescaling polynomial
    mask: bool  # measure what `strategy: schedule` or `magcache` chooses its mask from
    ratio_map: bool  # map cache_ratio through this model's recordings (dacc/compiler/ratio_map.py)
    search: bool  # search cache_ratio for cache.target_psnr

    @property
    def any(self) -> bool:
        return self.rescale or self.mask or self.ratio_map or self.search

    @property
    def sample(self) -> bool:
        """Whether it cannot go without sample(): a ratio map alone falls back to fixed constants."""
        return self.rescale or self.mask or self.search


def _needs(manifest: Manifest, plan: Plan) -> Needs:
    return _needs_of([g for p in manifest.programs for g in p.gates], plan)


def plan_needs_calibration(plan: Plan) -> bool:
    """`needs_calibration` from the plan alone, before any pass has run: the cache passes give
    every gate the plan's strategy, its `rescale` and its fixed `masks`, so one gate standing in
    for them needs what they will. A parallel plan builds its single-process twin only then."""
    if plan.cache.strategy == "none":
        return False
    options = cache_options(plan)
    gate = SimpleNamespace(strategy=plan.cache.strategy, rescale=getattr(options, "rescale", None) or [],
                           mask=getattr(options, "masks", None) is not None)
    return _needs_of([gate], plan).any


def _needs_of(gates: list, plan: Plan) -> Needs:
    options, strategy = cache_options(plan), plan.cache.strategy
    fixed = any(getattr(options, k, None) is not None for k in ("threshold", "interval", "masks"))
    masked = strategy in CALIBRATED_MASKS
    skips = plan.cache.cache_ratio > 0 or plan.cache.target_psnr is not None
    return Needs(rescale=any(g.strategy == "teacache" and not g.rescale for g in gates),
                 mask=any(g.strategy in CALIBRATED_MASKS and not g.mask for g in gates),
                 ratio_map=bool(gates) and strategy in MAPPED and not fixed and (skips or masked),
                 search=bool(gates) and plan.cache.target_psnr is not None)


def needs_calibration(manifest: Manifest, plan: Plan) -> bool:
    return _needs(manifest, plan).any


def check_calibration_inputs(manifest: Manifest, plan: Plan, sample: Callable | None) -> None:
    if _needs(manifest, plan).sample and sample is None:
        strategy = plan.cache.strategy
        what = ("teacache calibration" if strategy == "teacache" else f"strategy '{strategy}'"
                if strategy in CALIBRATED_MASKS else "cache.target_psnr")
        fix = ("add sample(), or give a fixed step mask with strategy scm and options.mask"
               if strategy in CALIBRATED_MASKS else "add sample(), or give cache.options.rescale / drop target_psnr")
        raise DaccError(f"{what} needs the model file to define sample(model, seed)", "model file", fix)


def calibrate(manifest: Manifest, model, plan: Plan, sample: Callable | None, log) -> None:
    """Fill in what the gates of `manifest` (and of the loaded `model`) still need."""
    needs = _needs(manifest, plan)
    if not needs.any:
        return
    if sample is None and not needs.sample:
        log(f"note: the model file has no sample(), so cache_ratio {plan.cache.cache_ratio:g} maps through fixed "
            "defaults rather than this model's own measurements (dacc/compiler/ratio_map.py); define "
            "sample(model, seed) to calibrate it")
        return
    check_calibration_inputs(manifest, plan, sample)
    info: dict[str, Any] = {}
    steps, options = plan.num_inference_steps, cache_options(plan)
    records, references = (_recorded(model, sample, list(CALIBRATION_SEEDS)) if needs.ratio_map or needs.mask
                           else ([], {}))
    if needs.rescale:
        # seeds 0.. : the search's validation seeds stay unseen unless the plan asks for many
        seeds = list(range(options.calibration_seeds))
        fit_records = records if records and seeds == list(CALIBRATION_SEEDS) else _recorded(model, sample, seeds)[0]
        rescale, info["rescale_fit"] = fit_rescale(fit_records, seeds, log)
        _set_gates(model, lambda gate, g: dataclasses.replace(gate, rescale=rescale))
    knobs_for = None  # the plan's own knobs, unless calibration maps cache_ratio for this model
    if records:
        ts = trajectories(records, steps)
        gates = next(r.spec.gates for r in model.programs if r.spec.gates)
        gate = gates[0]
        schedules = magnitudes = None
        if plan.cache.strategy == "schedule":
            per_range = [ts] + [trajectories(records, steps, g) for g in range(1, len(gates))]
            schedules, info["schedule"] = measure_schedules(per_range, range_flops(records, len(gates)), gate, steps,
                                                            log)
        if plan.cache.strategy == "magcache":
            magnitudes = magnitude_ratios([t.residuals for t in ts])
            info["magnitude_ratios"] = {"seeds": list(CALIBRATION_SEEDS), "ratios": magnitudes}
            log(f"magcache: measured the residual magnitude ratio of every step on {len(ts)} generation(s): "
                f"{min(magnitudes[1:]):.3f}..{max(magnitudes[1:]):.3f}")
        base = [] if plan.cache.strategy in CALIBRATED_MASKS else dynamic_knobs(plan.cache.strategy, 0.0, options,
                                                                               steps)["mask"]
        if needs.ratio_map:
            ratio_map = RatioMap(gate, ts, base, schedules, magnitudes)
            knobs_for = ratio_map.knobs
            ratio = plan.cache.cache_ratio
            if not needs.search and ratio > 0:
                info["ratio_fit"] = _fit_gain(ratio_map, ratio, model, sample, references, log)
            info["ratio_map"] = ratio_map.describe()
            if not needs.search:
                knobs = knobs_for(ratio)
                _set_gates(model, with_knobs(knobs))
                error, skipped = ratio_map.error(knobs)
                log(f"cache_ratio {ratio:g} on this model: {_knob_text(plan.cache.strategy, knobs)}, "
                    f"replayed on {len(ts)} recorded generation(s): {skipped:.0%} of the gated FLOPs "
                    f"skipped, error {error:.4f} per step (budget {ratio_map.budget(ratio):.4f})")
        else:  # magcache with a fixed threshold: only its mask to fill in
            _set_gates(model, lambda g, _: dataclasses.replace(g, mask=magcache_mask(g, magnitudes, options.threshold)))
    if needs.search:
        info["search"] = search_ratio(model, plan, sample, plan.cache.target_psnr, log, knobs_for, references)
    for spec, runner in zip(manifest.programs, model.programs):
        spec.gates = [dataclasses.replace(gate, calibration=info) for gate in runner.spec.gates]


def _fit_gain(ratio_map: RatioMap, ratio: float, model, sample: Callable, references: dict[int, torch.Tensor],
              log) -> dict[str, Any]:
    """Set the ratio map's gain so that `ratio` gives about ratio_psnr(ratio) on the fit seeds
    (dacc/compiler/ratio_fit.py); what was measured, for the manifest."""
    target = ratio_psnr(ratio)
    log(f"cache_ratio {ratio:g} asks for about {target:.1f} dB: measuring this model's output error on "
        f"seeds {list(FIT_SEEDS)}")
    references = dict(references)
    add_references(model, sample, FIT_SEEDS, references)

    def measure(knobs: dict) -> tuple[float, float]:
        psnrs, speedup, _ = measure_knobs(model, sample, knobs, FIT_SEEDS, references)
        return statistics.mean(psnrs), speedup

    chosen, runs = fit_budget(ratio_map.knobs_at, measure, ratio_map.budget(ratio), target, log)
    ratio_map.gain = chosen.budget / (ratio * ERROR_PER_RATIO)
    log(f"  chose budget {chosen.budget:.4g} (gain {ratio_map.gain:.3g}): {chosen.psnr:.2f} dB, "
        f"{chosen.flops_speedup:.2f}x fewer FLOPs")
    return {"cache_ratio": ratio, "target_psnr": round(target, 3), "seeds": list(FIT_SEEDS),
            "runs": [r.row() for r in runs], "chosen": chosen.row()}


# What calibration sets on a gate; everything else is the passes' and the same in the twin
CALIBRATED_FIELDS = ("threshold", "rescale", "interval", "mask", "calibration")


def adopt_calibration(manifest: Manifest, twin: Manifest) -> None:
    """The gates of a parallel `manifest` take the knobs calibrated on its single-process `twin`.
    A parallel gate sums its statistic over every rank serving the request (or takes the most
    cautious decision of the fsdp ranks; dacc/runtime/ranks.py), so it decides as the twin's
    gate does on the same request, and a static mask is identical on every rank."""
    for spec, one in zip(manifest.programs, twin.programs, strict=True):
        if [g.strategy for g in spec.gates] != [g.strategy for g in one.gates]:  # in count too
            ranges = [[(g.skip_first, g.skip_last) for g in s.gates] for s in (spec, one)]
            raise DaccError(f"the parallel program's cache gates {ranges[0]} do not match its single-process twin's "
                            f"{ranges[1]}", spec.file, "this is a compiler bug; please report it with the plan")
        spec.gates = [dataclasses.replace(g, **{f: getattr(t, f) for f in CALIBRATED_FIELDS})
                      for g, t in zip(spec.gates, one.gates)]


def _knob_text(strategy: str, knobs: dict) -> str:
    masks = knobs.get("masks") or ([knobs["mask"]] if knobs.get("mask") else [])
    shown = ("mask " if len(masks) == 1 else "masks ") + ", ".join(_letters(m) for m in masks) if masks else ""
    if strategy in THRESHOLD_STRATEGIES:
        return f"threshold {knobs['threshold']:.4g}" + (", " + shown if shown else "")
    return shown or "no mask"


def _letters(mask: list[bool]) -> str:
    return "".join("C" if on else "-" for on in mask)

