"""cache_ratio's measured gain (dacc/compiler/ratio_fit.py): on scripted models whose PSNR falls with
the replay budget at different gains and slopes, the fit lands within its tolerance of the PSNR the
ratio asks for in a few runs; a discrete knob that stops moving ends it; the choice prefers speed
among the runs that reach the target."""
from __future__ import annotations

import math

import pytest

from dacc.compiler.ratio_fit import FIT_RUNS, FIT_TOLERANCE, FitRun, choose, fit_budget, ratio_psnr


def test_the_ratio_scale_halves_the_error_per_halving():
    assert ratio_psnr(0.5) == 30.0
    assert ratio_psnr(0.25) == pytest.approx(30.0 + 20 * math.log10(2))
    assert ratio_psnr(1.0) < ratio_psnr(0.75) < ratio_psnr(0.5)


@pytest.mark.parametrize("gain,slope", [(1.0, -20.0), (0.2, -20.0), (6.0, -20.0), (3.0, -35.0), (0.5, -12.0)])
def test_the_fit_finds_the_budget_of_the_asked_psnr_whatever_the_model_gain(gain, slope):
    """PSNR = 30 + slope * log10(budget / (0.075 * gain)): the model reaches 30 dB at 0.075 * gain."""
    calls = []

    def measure(knobs):
        calls.append(knobs["budget"])
        return 30.0 + slope * math.log10(knobs["budget"] / (0.075 * gain)), knobs["budget"] * 40

    chosen, runs = fit_budget(lambda b: {"budget": b}, measure, 0.075, 30.0, lambda m: None)
    assert len(runs) == len(calls) <= FIT_RUNS
    assert abs(chosen.psnr - 30.0) <= FIT_TOLERANCE, runs
    if gain == 1.0:
        assert len(runs) == 1  # the replay's own budget was right: one run
    assert chosen.budget == pytest.approx(0.075 * gain * 10 ** ((chosen.psnr - 30.0) / -slope), rel=1e-6)


def test_a_knob_that_stops_moving_ends_the_fit():
    """A mask takes 5 values: budgets that map to a measured mask are not measured again."""
    levels = [0.05, 0.1, 0.2, 0.4, 0.8]

    def knobs_at(b):
        return {"computed": sum(b < level for level in levels)}

    measured = []

    def measure(knobs):
        measured.append(knobs["computed"])
        return {5: 45.0, 4: 40.0, 3: 34.0, 2: 25.0, 1: 20.0, 0: 15.0}[knobs["computed"]], 10.0 / (1 + knobs["computed"])

    chosen, runs = fit_budget(knobs_at, measure, 0.15, 30.0, lambda m: None)
    assert len(measured) == len(set(measured)) == len(runs)
    assert chosen.psnr == 34.0  # 30 +- 1 is out of reach: the fastest above it, not the 25 dB below
    assert [r.psnr >= 29.0 for r in runs].count(True) >= 1


def test_the_choice_is_the_fastest_that_reaches_the_target_else_the_best_below():
    runs = [FitRun(0.1, 33.0, 2.0), FitRun(0.2, 29.4, 3.0), FitRun(0.3, 26.0, 4.0)]
    assert choose(runs, 30.0).budget == 0.2  # 29.4 is within the tolerance and faster than 33.0
    assert choose(runs, 31.0).budget == 0.1
    assert choose(runs[1:], 35.0).budget == 0.2  # nothing reaches 35: the closest from below
