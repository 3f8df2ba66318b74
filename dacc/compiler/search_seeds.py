"""The seeds every compile-time quality search (cache.target_psnr, quantize.target_psnr) runs
`sample(model, seed)` on, and the rule by which it accepts a setting.

- Calibration seeds: the search tunes on these. A setting clears them with a margin of half their
  spread: worst seed - (best - worst) / 2 >= target, so a setting that only just reaches the
  target on a lucky seed is not taken.
- Validation seeds: the setting chosen on calibration must hold here too: mean >= target and no
  seed more than VALIDATION_SLACK below it. Four seeds: four images of every class.
- Held-out seeds: used by neither; benchmarks and tests report a search's promise on these.
"""
from __future__ import annotations

import statistics

import torch

from dacc.metrics import psnr_per_image

CALIBRATION_SEEDS = (0, 1)
VALIDATION_SEEDS = (2, 3, 4, 5)
HELD_OUT_SEEDS = (6, 7, 8, 9)
VALIDATION_SLACK = 0.5  # dB a single validation seed may fall below the target
PSNR_CAP = 100.0  # dB: an identical image counts as 100, so a mean over seeds stays finite


def seed_psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    """One seed's PSNR: per image, capped, averaged over the generation's images."""
    return float(psnr_per_image(test, reference).clamp(max=PSNR_CAP).mean())


def clears(psnrs: list[float], target: float) -> bool:
    return min(psnrs) - (max(psnrs) - min(psnrs)) / 2 >= target


def validates(psnrs: list[float], target: float) -> bool:
    return statistics.mean(psnrs) >= target and min(psnrs) >= target - VALIDATION_SLACK
