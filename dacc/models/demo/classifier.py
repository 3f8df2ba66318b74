"""The digit classifier that measures the conditional accuracy of the demo's samples
(dacc/models/flow.py's small CNN, trained on the demo's training split)."""
from __future__ import annotations

from dacc.models import flow
from dacc.models.demo import DEMO
from dacc.models.flow import Classifier


def load_classifier() -> Classifier:
    return DEMO.load_classifier()


def train_classifier(seed: int = 0, epochs: int = 30) -> tuple[Classifier, float]:
    """Train on the demo's training split; returns (model, accuracy on the held-out split)."""
    return flow.train_classifier(DEMO, seed, epochs)
