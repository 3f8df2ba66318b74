"""The patterns model's data: ten families of procedural 16 x 16 patterns, each drawn with a random
period, phase, orientation, centre and contrast, so no two samples are alike and the class is the
family, not one picture.

    0 horizontal stripes  1 vertical stripes  2 diagonal stripes  3 checkerboard  4 rings
    5 dot grid            6 spokes            7 one soft blob     8 grid lines    9 zigzag
"""
from __future__ import annotations

import math

import torch

from dacc.models.flow import splits
from dacc.models.patterns import IMAGE

FAMILIES = ("hstripes", "vstripes", "diagonal", "checker", "rings", "dots", "spokes", "blob", "grid", "zigzag")


def _wave(phase: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * torch.cos(phase)


def draw(family: int, period: float, phase: float, angle: float, cx: float, cy: float) -> torch.Tensor:
    """One pattern, (IMAGE, IMAGE) in [0, 1]. `angle` (radians) tilts the stripe families a little;
    (cx, cy) is the centre of the radial ones, in pixels."""
    y, x = torch.meshgrid(torch.arange(IMAGE, dtype=torch.float32), torch.arange(IMAGE, dtype=torch.float32),
                          indexing="ij")
    k = 2 * math.pi / period
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # a slightly rotated frame
    dx, dy = x - cx, y - cy
    r = torch.sqrt(dx ** 2 + dy ** 2)
    if family == 0:
        out = _wave(k * v + phase)
    elif family == 1:
        out = _wave(k * u + phase)
    elif family == 2:
        out = _wave(k * (u + v) / math.sqrt(2) + phase)
    elif family == 3:
        out = (torch.sign(torch.sin(k * u + phase) * torch.sin(k * v + phase)) + 1) / 2
    elif family == 4:
        out = _wave(k * r + phase)
    elif family == 5:
        out = (_wave(k * u + phase) * _wave(k * v + phase)) ** 3
    elif family == 6:
        out = _wave(torch.atan2(dy, dx) * round(2 * math.pi / k) + phase) * (r > 1.5)
    elif family == 7:
        out = torch.exp(-(r / (period * 0.6)) ** 2)
    elif family == 8:
        out = torch.maximum(_wave(k * u + phase), _wave(k * v + phase)) ** 6
    else:
        tri = torch.abs(torch.remainder(u / period, 2.0) - 1.0)  # a triangle wave across the stripes
        out = _wave(k * (v + 0.6 * period * tri) + phase)
    return out


def _draw(per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []

    def uniform(lo, hi):
        return float(torch.empty(1).uniform_(lo, hi, generator=generator))
    for family in range(len(FAMILIES)):
        for _ in range(per_class):
            img = draw(family, period=uniform(4.0, 7.0), phase=uniform(0, 2 * math.pi), angle=uniform(-0.2, 0.2),
                       cx=uniform(5.0, 10.0), cy=uniform(5.0, 10.0))
            contrast = uniform(0.6, 1.0)
            images.append(0.5 + (img - 0.5) * contrast)
            labels.append(family)
    return torch.stack(images) * 2 - 1, torch.tensor(labels)


def load_patterns(seed: int = 0, per_class: int = 300, test_per_class: int = 60):
    """(train_images, train_labels, test_images, test_labels); images in [-1, 1], (N, 16, 16).
    The two splits are drawn from different generators, so no test pattern is a training one."""
    return splits(_draw, seed, per_class, test_per_class)
