"""The glyphs model (SD3 architecture, symbols rendered with Pillow): its data, its training, and
its checked-in weights generating recognisable glyphs."""
from __future__ import annotations

import json

import torch

from dacc.metrics import conditional_accuracy
from dacc.models.flow import generate
from dacc.models.glyphs import GLYPHS
from dacc.models.glyphs.data import load_glyphs, render


def test_glyphs_are_drawn_deterministically_and_the_splits_differ():
    a, la, ta, _ = load_glyphs(seed=0, per_class=3, test_per_class=2)
    b, lb, _, _ = load_glyphs(seed=0, per_class=3, test_per_class=2)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (30, 16, 16)
    assert a.min() >= -1 and a.max() <= 1 and (a > 0).float().mean() > 0.05  # ink, on a dark ground
    assert min(float((t - x).abs().max()) for t in ta for x in a) > 0.1  # no test glyph is a training one
    thin, bold = render("A", 14, 0.0, 0.0, 0.0, 0), render("A", 14, 0.0, 0.0, 0.0, 2)
    assert bold.sum() > thin.sum() * 1.2  # the stroke width is drawn


def test_checked_in_classifier_recognises_held_out_glyphs():
    _, _, test_x, test_y = load_glyphs(seed=0)
    assert conditional_accuracy((test_x + 1) / 2, test_y, GLYPHS.load_classifier()) >= 0.95


def test_baseline_samples_are_the_glyphs_asked_for():
    labels = torch.arange(10).repeat(2)
    model, encoder = GLYPHS.load_transformer(), GLYPHS.load_encoder()
    result = generate(GLYPHS, model, encoder, labels, steps=30, seed=123)
    assert result.images.shape == (20, 16, 16)
    assert conditional_accuracy(result.images, labels, GLYPHS.load_classifier()) >= 0.9


def test_training_record_is_checked_in():
    record = json.loads((GLYPHS.here / "training.json").read_text())
    assert record["seed"] == 0 and record["flow_train_seconds"] < 25 * 60
    assert record["classifier_test_accuracy"] >= 0.95
