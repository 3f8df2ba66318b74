"""The cache_ratio search's decision rule on scripted measurements, where the right answer is known:
a margin of half the calibration seeds' spread, validation on other seeds (halving until it holds),
and the no-skip plan when nothing holds."""
from __future__ import annotations

from dacc.compiler.calibrate import SEARCH_ITERATIONS, choose_ratio
from dacc.compiler.search_seeds import CALIBRATION_SEEDS, VALIDATION_SEEDS


def _scripted(offsets: dict[int, float], calls: list):
    """PSNR falls linearly with the ratio, each seed shifted by its offset; FLOPs fall with it."""
    def evaluate(ratio, seeds):
        calls.append((ratio, tuple(seeds)))
        return {"cache_ratio": ratio, "psnrs": [45 - 30 * ratio + offsets[s] for s in seeds],
                "flops_speedup": 1 + 3 * ratio}
    return evaluate


def test_the_margin_and_validation_choose_the_known_ratio():
    offsets = dict.fromkeys([*CALIBRATION_SEEDS, *VALIDATION_SEEDS], 0.0)
    offsets[CALIBRATION_SEEDS[1]] = 1.0  # spread 1 dB: clears while 45 - 30 r - 0.5 >= 30, r <= 0.483
    calls = []
    ratio, validated, trials = choose_ratio(_scripted(offsets, calls), 30.0, lambda m: None)
    assert ratio == 30 / 64 and validated["cache_ratio"] == ratio  # the largest k/64 below 0.483
    assert len(trials) == 1 + SEARCH_ITERATIONS and all(s == CALIBRATION_SEEDS for _, s in calls[:-1])
    assert calls[-1] == (ratio, VALIDATION_SEEDS)


def test_a_ratio_that_fails_validation_is_halved_until_it_holds():
    offsets = dict.fromkeys([*CALIBRATION_SEEDS, *VALIDATION_SEEDS], 0.0)
    offsets[VALIDATION_SEEDS[0]] = -2.0  # one bad seed: worst 43 - 30 r >= 29.5 needs r <= 0.45
    calls = []
    ratio, validated, _ = choose_ratio(_scripted(offsets, calls), 30.0, lambda m: None)
    first = 32 / 64  # calibration alone: 45 - 30 r >= 30, r <= 0.5
    assert [c for c in calls if c[1] == VALIDATION_SEEDS] == [(first, VALIDATION_SEEDS), (first / 2, VALIDATION_SEEDS)]
    assert ratio == first / 2 and min(validated["psnrs"]) >= 29.5


def test_an_unreachable_target_gives_the_no_skip_plan():
    offsets = dict.fromkeys([*CALIBRATION_SEEDS, *VALIDATION_SEEDS], 0.0)
    ratio, validated, trials = choose_ratio(_scripted(offsets, []), 60.0, lambda m: None)
    assert (ratio, validated) == (0.0, None) and max(min(t["psnrs"]) for t in trials) < 60
