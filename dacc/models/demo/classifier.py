"""A small CNN that recognises the digits; it measures the conditional accuracy of samples."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dacc.models.demo import CLASSIFIER_WEIGHTS, IMAGE


class DigitClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32 * (IMAGE // 4) ** 2, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 16, 16) in [0, 1] -> logits (B, 10)."""
        x = images[:, None] * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def load_classifier() -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(CLASSIFIER_WEIGHTS).items()})
    return model.eval()


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(images, shifts=(dy, dx), dims=(1, 2))


def train_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitClassifier, float]:
    """Train on the demo's training split; returns (model, accuracy on the held-out split)."""
    from dacc.models.demo.data import load_digits_16

    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_16(seed)
    train_x, test_x = (train_x + 1) / 2, (test_x + 1) / 2
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(_shift(train_x[idx], gen)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return model, accuracy
