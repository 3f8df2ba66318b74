"""Quality of an accelerated generation against the uncached one from the same seeds.

Images are (B, H, W) or (B, C, H, W) tensors in [0, 1]. PSNR and SSIM are per image, then
averaged; identical images have PSNR = inf.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_bchw(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x[:, None] if x.dim() == 3 else x


def psnr_per_image(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    a, b = _as_bchw(test), _as_bchw(reference)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse), torch.full_like(mse, math.inf))


def psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float(psnr_per_image(test, reference).mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_image(test: torch.Tensor, reference: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, data range 1, 'valid' borders.
    The window is 7 rather than the usual 11 because the demo's images are 16x16."""
    a, b = _as_bchw(test), _as_bchw(reference)
    channels = a.shape[1]
    w = _gaussian_window(window, sigma).expand(channels, 1, window, window)
    mu_a, mu_b = F.conv2d(a, w, groups=channels), F.conv2d(b, w, groups=channels)
    var_a = F.conv2d(a * a, w, groups=channels) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=channels) - mu_b**2
    cov = F.conv2d(a * b, w, groups=channels) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def ssim(test: torch.Tensor, reference: torch.Tensor) -> float:
    return float(ssim_per_image(test, reference).mean())


def conditional_accuracy(images: torch.Tensor, labels: torch.Tensor, classifier: torch.nn.Module | None = None) -> float:
    """Share of images the demo's digit classifier recognises as the class they were asked for."""
    if classifier is None:
        from dacc.models.demo.classifier import load_classifier
        classifier = load_classifier()
    with torch.no_grad():
        predicted = classifier(images.float()).argmax(1)
    return float((predicted == labels).float().mean())
