"""`quantize.smoothing`: SmoothQuant-style migration of activation outliers into the weights.

int8_dynamic quantizes each token's activations with one integer scale, so a few input channels far
larger than the rest (DiTs have them after their norms) leave the others a handful of levels.
Dividing input channel j by s_j and multiplying the weight's column j by s_j leaves the linear
unchanged in exact arithmetic and evens the activations out:

    s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)

(alpha = `quantize.smoothing`: 0 is off, 0.5 splits the difficulty evenly). max|x_j| is measured
on `sample()` over the calibration seeds, never on the seeds quality is judged on. The weight is
quantized after scaling; 1/s_j is a buffer the graph multiplies the activations by just before
the quantized operator (`quantize_linears`), which Inductor fuses into whatever produced them
when the artifact is lowered. Where the preceding op is an adaptive norm modulated per sample,
no static fold into it exists, which is why the multiply stays in the graph.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from dacc.compiler.search_seeds import CALIBRATION_SEEDS
from dacc.schema.errors import DaccError
from dacc.schema.plan import SMOOTHABLE_MODES, Plan

_FLOOR = 1e-5  # a channel never seen non-zero (or an all-zero weight column) is left unscaled


def smoothing_factors(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s per input channel (fp32): see the module docstring."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = x_absmax.float().clamp_min(_FLOOR) ** alpha / w_absmax.clamp_min(_FLOOR) ** (1 - alpha)
    dead = (x_absmax <= _FLOOR) | (w_absmax <= _FLOOR)
    return torch.where(dead, torch.ones_like(s), s)


def fold(weight: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fp32 weight to quantize, W * s per input column; 1 / s in the activations' `dtype`, what
    the input is multiplied by): the fold both the rewrite and the quantize search apply."""
    return weight.detach().float() * s[None, :], (1 / s).to(dtype)


def fold_inputs(model: torch.nn.Module, paths: list[str], sample: Callable, seeds: tuple[int, ...],
                summarize: Callable[[torch.Tensor], torch.Tensor],
                combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """{path: the `combine` over calls of `summarize(x)`}, x being the [tokens, in_features] fp32
    input of each listed linear in `sample()` on the seeds, measured on the compiler's own copy of
    the model (hooks never touch the user's)."""
    probe = copy.deepcopy(model)
    seen: dict[str, torch.Tensor] = {}

    def record(path: str):
        def hook(module, args):
            a = summarize(args[0].detach().float().reshape(-1, args[0].shape[-1]))
            seen[path] = combine(seen[path], a) if path in seen else a
        return hook
    handles = [probe.get_submodule(p).register_forward_pre_hook(record(p)) for p in paths]
    try:
        with torch.no_grad():
            for seed in seeds:
                sample(probe, seed)
    finally:
        for h in handles:
            h.remove()
    return seen


def activation_absmax(model: torch.nn.Module, paths: list[str], sample: Callable,
                      seeds: tuple[int, ...] = CALIBRATION_SEEDS) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each listed linear sees over `sample()` on the seeds."""
    return fold_inputs(model, paths, sample, seeds, lambda x: x.abs().amax(dim=0), torch.maximum)


def measure_smoothing(plan: Plan, model: torch.nn.Module, sample: Callable | None,
                      log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """{module path: s} for every linear the plan quantizes with int8_dynamic (none when
    quantize.smoothing is 0)."""
    from dacc.passes.quantize_linears import linear_modes

    q = plan.quantize
    if q.smoothing == 0:
        return {}
    dynamic = [p for p, m in linear_modes(model, plan).items() if m in SMOOTHABLE_MODES]  # overrides included
    if not dynamic:
        return {}
    if sample is None:
        raise DaccError("quantize.smoothing measures activations on sample(model, seed), which the model file "
                        "does not define", "model file", "add sample(), or remove quantize.smoothing")
    seen = activation_absmax(model, dynamic, sample)
    factors = {p: smoothing_factors(seen[p], model.get_submodule(p).weight, q.smoothing) for p in dynamic if p in seen}
    spread = [float(a.max() / a.median().clamp_min(_FLOOR)) for a in seen.values()] or [0.0]
    log(f"quantize smoothing (alpha {q.smoothing}): {len(factors)} linears on calibration seeds "
        f"{list(CALIBRATION_SEEDS)}; largest channel / median channel of their inputs up to {max(spread):.1f}x"
        + (f"; {len(dynamic) - len(factors)} never ran in sample() and stay unsmoothed"
           if len(factors) < len(dynamic) else ""))
    return factors
