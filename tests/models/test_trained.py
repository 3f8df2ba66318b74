"""The trained models beside the demo (glyphs: SD3 architecture on rendered symbols; patterns:
PixArt on procedural textures): their data, their training records, and their checked-in weights
generating what was asked for."""
from __future__ import annotations

import json

import pytest
import torch

from dacc.metrics import conditional_accuracy
from dacc.models.flow import generate
from dacc.models.glyphs import GLYPHS
from dacc.models.glyphs.data import load_glyphs, render
from dacc.models.patterns import PATTERNS
from dacc.models.patterns.data import FAMILIES, draw, load_patterns

TRAINED = pytest.mark.parametrize("m", [GLYPHS, PATTERNS], ids=lambda m: m.name)


def test_glyphs_are_drawn_deterministically_and_the_splits_differ():
    a, la, ta, _ = load_glyphs(seed=0, per_class=3, test_per_class=2)
    b, lb, _, _ = load_glyphs(seed=0, per_class=3, test_per_class=2)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (30, 16, 16)
    assert a.min() >= -1 and a.max() <= 1 and (a > 0).float().mean() > 0.05  # ink, on a dark ground
    assert min(float((t - x).abs().max()) for t in ta for x in a) > 0.1  # no test glyph is a training one
    thin, bold = render("A", 14, 0.0, 0.0, 0.0, 0), render("A", 14, 0.0, 0.0, 0.0, 2)
    assert bold.sum() > thin.sum() * 1.2  # the stroke width is drawn


def test_patterns_are_drawn_deterministically_and_each_family_is_its_own():
    a, la, ta, _ = load_patterns(seed=0, per_class=3, test_per_class=2)
    b, _, _, _ = load_patterns(seed=0, per_class=3, test_per_class=2)
    assert torch.equal(a, b) and a.shape == (30, 16, 16) and la.tolist() == [c for c in range(10) for _ in range(3)]
    assert a.min() >= -1 and a.max() <= 1
    assert min(float((t - x).abs().max()) for t in ta for x in a) > 0.1
    # the stripe families are stripes along their own axis: rows constant for horizontal, columns for vertical
    h, v = draw(0, 5.0, 0.3, 0.0, 8, 8), draw(1, 5.0, 0.3, 0.0, 8, 8)
    assert float(h.std(1).max()) < 1e-5 < float(h.std(0).min()) and torch.allclose(v, h.T, atol=1e-5)
    assert len(FAMILIES) == 10


@TRAINED
def test_checked_in_classifier_recognises_the_held_out_split(m):
    _, _, test_x, test_y = m.load_data(0)
    assert conditional_accuracy((test_x + 1) / 2, test_y, m.load_classifier()) >= 0.95


@TRAINED
def test_baseline_samples_are_the_classes_asked_for(m):
    labels = torch.arange(10).repeat(2)
    result = generate(m, m.load_transformer(), m.load_encoder(), labels, steps=30, seed=123)
    assert result.images.shape == (20, 16, 16)
    assert conditional_accuracy(result.images, labels, m.load_classifier()) >= 0.9


@TRAINED
def test_training_record_is_checked_in(m):
    record = json.loads((m.here / "training.json").read_text())
    assert record["seed"] == 0 and record["steps"] == m.train_steps and record["flow_train_seconds"] < 25 * 60
    assert record["classifier_test_accuracy"] >= 0.95
