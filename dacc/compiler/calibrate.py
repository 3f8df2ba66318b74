"""Calibration on the model's own `sample(model, seed)`: fit TeaCache's rescaling polynomial, and
search `cache_ratio` for the fastest setting that meets `cache.target_psnr`.

Both run the freshly written artifact through the runtime, so what is measured is what ships.
Speed is measured in FLOPs (deterministic); PSNR against the same artifact with the gate off.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch

from dacc.compiler.cache_knobs import dynamic_knobs
from dacc.metrics import psnr
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


def fit_rescale(model, sample: Callable, seeds: list[int], log) -> tuple[list[float], dict]:
    """TeaCache: (input change, output change) per step -> numpy.polyfit, degree up to 4."""
    originals = {id(r): r.spec.cache for r in model.programs}
    _set_gates(model, _never_skip)
    model._recorder = []
    try:
        run_samples(model, sample, seeds)
        records = model._recorder
    finally:
        model._recorder = None
        for runner in model.programs:
            runner.spec.cache = originals[id(runner)]
    xs, ys, previous = [], [], {}
    for context, step, stat, _, outputs in records:
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


def search_ratio(model, plan: Plan, sample: Callable, seeds: list[int], target: float, log) -> dict[str, Any]:
    """Bisection on cache_ratio for the largest ratio whose PSNR against the uncached samples
    meets `target`; returns the chosen knobs and what was measured."""
    options = cache_options(plan)
    if any(getattr(options, k, None) is not None for k in ("threshold", "interval", "policy")):
        raise DaccError("cache.target_psnr searches cache_ratio, but the options fix the knob it maps to",
                        "plan cache.options", "remove threshold/interval/policy from the options, or drop target_psnr")
    steps = plan.num_inference_steps
    _set_gates(model, _never_skip)
    reference, _ = run_samples(model, sample, seeds)

    def evaluate(ratio: float) -> dict[str, Any]:
        # the knobs are exactly the fields _never_skip overrode, so they replace those on every call
        knobs = dynamic_knobs(plan.cache.strategy, ratio, options, steps)
        _set_gates(model, lambda gate: dataclasses.replace(gate, **knobs))
        start = time.perf_counter()
        outs, stats = run_samples(model, sample, seeds)
        quality = min(psnr(o, r) for o, r in zip(outs, reference))
        speedup = stats["flops_total"] / max(stats["flops_computed"], 1.0)
        log(f"  cache_ratio {ratio:.3f}: PSNR {quality:.2f} dB, {speedup:.2f}x fewer FLOPs "
            f"({time.perf_counter() - start:.1f}s)")
        return {"cache_ratio": ratio, "psnr": quality, "flops_speedup": speedup, **knobs,
                "decisions": stats["decisions"]}

    log(f"searching cache_ratio for PSNR >= {target} dB on seeds {seeds}")
    best = {"cache_ratio": 0.0, "psnr": float("inf"), "flops_speedup": 1.0,
            **dynamic_knobs(plan.cache.strategy, 0.0, options, steps), "decisions": {}}
    top = evaluate(1.0)
    if top["psnr"] >= target:
        best = top
    else:
        lo, hi = 0.0, 1.0
        for _ in range(SEARCH_ITERATIONS):
            mid = (lo + hi) / 2
            result = evaluate(mid)
            if result["psnr"] >= target:
                lo, best = mid, result if result["flops_speedup"] >= best["flops_speedup"] else best
            else:
                hi = mid
    knobs = {k: best[k] for k in ("threshold", "interval", "mask")}
    _set_gates(model, lambda gate: dataclasses.replace(gate, **knobs))
    log(f"chose cache_ratio {best['cache_ratio']:.3f}: PSNR {best['psnr']:.2f} dB, "
        f"{best['flops_speedup']:.2f}x fewer FLOPs")
    return {"target_psnr": target, **best}


def _needs(manifest: Manifest, plan: Plan) -> tuple[bool, bool]:
    gates = [p.cache for p in manifest.programs if p.cache is not None]
    needs_rescale = any(g.strategy == "teacache" and not g.rescale for g in gates)
    return needs_rescale, bool(gates) and plan.cache.target_psnr is not None


def needs_calibration(manifest: Manifest, plan: Plan) -> bool:
    return any(_needs(manifest, plan))


def check_calibration_inputs(manifest: Manifest, plan: Plan, sample: Callable | None) -> None:
    needs_rescale, needs_search = _needs(manifest, plan)
    if (needs_rescale or needs_search) and sample is None:
        what = "teacache calibration" if needs_rescale else "cache.target_psnr"
        raise DaccError(f"{what} needs the model file to define sample(model, seed)", "model file",
                        "add sample(), or give cache.options.rescale / drop target_psnr")


def calibrate(manifest: Manifest, model, plan: Plan, sample: Callable | None, log) -> None:
    """Fill in what the gates of `manifest` (and of the loaded `model`) still need."""
    needs_rescale, needs_search = _needs(manifest, plan)
    target = plan.cache.target_psnr
    if not (needs_rescale or needs_search):
        return
    check_calibration_inputs(manifest, plan, sample)
    seeds = list(range(cache_options(plan).calibration_seeds if needs_rescale else 2))
    info: dict[str, Any] = {}
    if needs_rescale:
        rescale, fit = fit_rescale(model, sample, seeds, log)
        info["rescale_fit"] = fit
        _set_gates(model, lambda gate: dataclasses.replace(gate, rescale=rescale))
    if needs_search:
        info["search"] = search_ratio(model, plan, sample, seeds[:2] or [0], target, log)
    for spec, runner in zip(manifest.programs, model.programs):
        if spec.cache is not None:
            spec.cache = dataclasses.replace(runner.spec.cache, calibration=info)
