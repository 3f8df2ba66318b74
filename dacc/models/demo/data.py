"""The training data: scikit-learn's bundled handwritten digits (no download), upsampled."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dacc.models.demo import IMAGE


def load_digits_16(seed: int = 0, test_fraction: float = 0.2):
    """(train_images, train_labels, test_images, test_labels); images in [-1, 1], (N, 16, 16)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # training-only dependency
        raise SystemExit("training needs scikit-learn: pip install -e '.[train]'") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    images = F.interpolate(images[:, None], size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)[:, 0]
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]
