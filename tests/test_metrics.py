from __future__ import annotations

import math

import torch

from dacc.metrics import psnr, psnr_per_image, ssim, ssim_per_image


def _naive_ssim(a, b, window=7, sigma=1.5):
    """Direct per-position loops: an independent reference for the convolution form."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    a, b = a.double(), b.double()
    vals = []
    for i in range(a.shape[0] - window + 1):
        for j in range(a.shape[1] - window + 1):
            pa, pb = a[i:i + window, j:j + window], b[i:i + window, j:j + window]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4)))
    return torch.stack(vals).mean()


def test_psnr_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(4, 16, 16, generator=g)
    noisy = (ref + 0.05 * torch.randn(4, 16, 16, generator=g)).clamp(0, 1)
    mse = ((noisy - ref) ** 2).flatten(1).mean(1).double()
    assert torch.allclose(psnr_per_image(noisy, ref), 10 * torch.log10(1 / mse))
    assert psnr(ref, ref) == math.inf


def test_ssim_against_a_direct_implementation():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(3, 16, 16, generator=g)
    test = (ref + 0.1 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
    got = ssim_per_image(test, ref)
    for i in range(3):
        assert abs(float(got[i]) - float(_naive_ssim(test[i], ref[i]))) < 1e-10
    assert abs(ssim(ref, ref) - 1.0) < 1e-12
    assert ssim(test, ref) < ssim((ref + 0.01 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1), ref)
