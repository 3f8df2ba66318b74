"""`quantize.target_psnr`: which linears to keep at higher precision so the quantized model's
output stays within the target of the float model's, measured on `sample()`. A kept linear is
promoted: int4 weights to int8 (a quarter of fp32's bytes rather than all of them; int4 is the
memory mode), every other mode to full precision. The promotions become `quantize.overrides`.

Linears are grouped by block (`transformer_blocks.3.*`; a linear outside the blocks is its own
group). The search, on the eager model with the selected linears calling the dacc operator the
compiled graph calls (so the kernel this machine runs is what is measured; tests/compiler/
test_quantize.py checks the graph against the same numbers to 1e-5), runs in three steps with
the discipline of the cache search:
1. sensitivity: each group alone quantized, on the first calibration seed; the lower its PSNR,
   the earlier it is kept;
2. the fewest groups kept (a prefix of that order, by bisection) whose calibration seeds clear the
   target with a margin of half their spread (search_seeds.clears);
3. validation on other seeds (search_seeds.validates), else one more group is kept, until it
   holds; if it holds only with everything kept, the compile says so and the artifact is not
   quantized.
"""
from __future__ import annotations

import copy
import re
import statistics
from typing import Any, Callable

import torch

from dacc.kernels.schemes import SCHEMES
from dacc.compiler.weight_quant import quantize_weight
from dacc.compiler.search_seeds import CALIBRATION_SEEDS, VALIDATION_SEEDS, clears, seed_psnr, validates
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan


Measure = Callable[[frozenset[str], tuple[int, ...]], list[float]]  # (kept groups, seeds) -> PSNR per seed


def group_of(path: str) -> str:
    m = re.match(r"(.+?\.\d+)(\.|$)", path)
    return m.group(1) if m else path


def promoted(mode: str) -> str:
    """What a linear of a kept group computes in: int4 weights take int8's (a quarter of fp32's
    bytes, where full precision would take them all back); every other mode full precision."""
    return "int8_weight" if mode == "int4_weight" else "full"


def search(groups: list[str], measure: Measure, target: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The groups to keep at higher precision (`promoted`), and what was measured on the way."""
    sensitivity = {}
    for g in groups:  # quantize g alone: every other group kept
        sensitivity[g] = measure(frozenset(groups) - {g}, CALIBRATION_SEEDS[:1])[0]
    order = sorted(groups, key=lambda g: sensitivity[g])
    log("quantize search: sensitivity (PSNR with one group quantized) "
        + ", ".join(f"{g} {sensitivity[g]:.1f}" for g in order[:6]) + (" ..." if len(order) > 6 else ""))

    def calibrated(k: int) -> tuple[bool, list[float]]:
        p = measure(frozenset(order[:k]), CALIBRATION_SEEDS)
        return clears(p, target), p

    lo, hi = 0, len(order)  # the answer lies in [lo, hi]; keeping everything always clears the target
    trials = {}
    while lo < hi:
        mid = (lo + hi) // 2
        ok, trials[mid] = calibrated(mid)
        lo, hi = (lo, mid) if ok else (mid + 1, hi)
    k = lo
    validation: list[float] = []
    while k < len(order):
        validation = measure(frozenset(order[:k]), VALIDATION_SEEDS)
        if validates(validation, target):
            break
        log(f"quantize search: {k} group(s) kept clear the target on calibration but validate at "
            f"{statistics.mean(validation):.2f} dB (worst {min(validation):.2f}); keeping one more")
        k += 1
    kept = order[:k]
    met = k < len(order)
    return {"target_psnr": target, "met": met, "kept": kept, "groups": len(order),
            "sensitivity": {g: round(v, 3) for g, v in sensitivity.items()},
            "calibration_seeds": list(CALIBRATION_SEEDS), "validation_seeds": list(VALIDATION_SEEDS),
            "calibration_psnr": [round(v, 3) for v in trials.get(k, [])],
            "validation_psnr_mean": round(statistics.mean(validation), 3) if validation and met else None,
            "validation_psnr_worst": round(min(validation), 3) if validation and met else None}


def eager_measure(model: torch.nn.Module, modes: dict[str, str], group_size: int, sample: Callable,
                  smoothing: dict[str, torch.Tensor] | None = None,
                  hessians: dict[str, torch.Tensor] | None = None) -> Measure:
    """PSNR of `sample()` with the selected linears (path -> mode) computing their dacc operator,
    the kept groups' linears their `promoted` mode, against the float model, per seed."""
    float_out: dict[int, torch.Tensor] = {}
    quantized = copy.deepcopy(model)  # the compiler's own copy: the user's model is never touched
    forwards: dict[str, tuple[Callable, Callable]] = {}  # path: (quantized, kept)

    def operator(module: torch.nn.Module, path: str, mode: str) -> Callable:
        if mode == "full":
            return module.forward
        # as quantize_linears makes them: SmoothQuant folded, GPTQ-rounded where measured
        tensors, inv = quantize_weight(mode, module.weight, group_size, (smoothing or {}).get(path),
                                       (hessians or {}).get(path), module.weight.dtype)
        # the operator itself, so what is measured is the kernel this machine runs (oneDNN's 7-bit
        # activations on CPUs without VNNI included)
        return (lambda x, t=list(tensors.values()), bias=module.bias, op=SCHEMES[mode].op, inv=inv:
                op(x if inv is None else x * inv, *t, bias))

    for path, mode in modes.items():
        module = quantized.get_submodule(path)
        forwards[path] = (operator(module, path, mode), operator(module, path, promoted(mode)))

    def measure(kept: frozenset[str], seeds: tuple[int, ...]) -> list[float]:
        for path in modes:
            quantized.get_submodule(path).forward = forwards[path][group_of(path) in kept]
        out = []
        with torch.no_grad():
            for seed in seeds:
                if seed not in float_out:
                    float_out[seed] = sample(model, seed)
                out.append(seed_psnr(sample(quantized, seed), float_out[seed]))
        return out
    return measure


def choose_exclusions(plan: Plan, model: torch.nn.Module, sample: Callable | None, log: Callable[[str], None],
                      smoothing: dict[str, torch.Tensor] | None = None,
                      hessians: dict[str, torch.Tensor] | None = None) -> tuple[Plan, dict[str, Any]]:
    """The plan with the kept groups' linears promoted in quantize.overrides (path: `promoted`
    mode), and the search's record."""
    q = plan.quantize
    if sample is None:
        raise DaccError("quantize.target_psnr needs the model file to define sample(model, seed)", "model file",
                        "add sample(), or drop quantize.target_psnr and choose quantize.exclude yourself")
    from dacc.passes.quantize_linears import linear_modes

    modes = linear_modes(model, plan)
    groups = sorted({group_of(p) for p in modes})
    log(f"quantize search: PSNR >= {q.target_psnr} dB over {len(groups)} groups of {len(modes)} linears")
    record = search(groups, eager_measure(model, modes, q.group_size, sample, smoothing, hessians), q.target_psnr, log)
    if not record["met"]:
        log(f"warning: no choice of blocks kept at higher precision reaches PSNR {q.target_psnr} dB on the "
            "validation seeds; this artifact is not quantized (lower quantize.target_psnr, or try another mode)")
        return plan.model_copy(update={"quantize": q.model_copy(update={
            "mode": "none", "exclude": [], "fragile": "int8_weight", "overrides": {}})}), record
    kept = {p: promoted(m) for p, m in modes.items() if group_of(p) in record["kept"]}
    record["promoted"] = kept
    log(f"quantize search: keeping {len(record['kept'])} group(s) at higher precision (int4 weights in int8, "
        f"the rest in full; {', '.join(record['kept']) or 'none'}): validation PSNR "
        f"{record['validation_psnr_mean']:.2f} dB, worst seed {record['validation_psnr_worst']:.2f} dB")
    overrides = {**kept, **{pat: m for pat, m in q.overrides.items() if pat not in kept}}  # exact paths first
    return plan.model_copy(update={"quantize": q.model_copy(update={"overrides": overrides})}), record
