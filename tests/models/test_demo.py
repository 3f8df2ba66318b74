"""The trained demo model: it trains, it generates recognisable digits, its artifact matches eager."""
from __future__ import annotations

import pytest

import json

import torch
from PIL import Image

import dacc
from dacc.metrics import conditional_accuracy, psnr
from dacc.models.demo import HERE, load_encoder, load_transformer, pack, unpack
from dacc.models.demo.classifier import load_classifier
from dacc.models.demo.sampler import generate


def test_training_lowers_the_loss_at_tiny_scale():
    from dacc.models.demo.train import train
    _, _, losses = train(steps=40, batch=16, log_every=0)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_pack_unpack_round_trip():
    x = torch.randn(3, 16, 16)
    assert torch.equal(unpack(pack(x)), x)


def test_checked_in_classifier_recognises_held_out_digits():
    from dacc.models.demo.data import load_digits_16
    _, _, test_x, test_y = load_digits_16(seed=0)
    assert conditional_accuracy((test_x + 1) / 2, test_y, load_classifier()) >= 0.95


def test_baseline_samples_reach_90_percent_conditional_accuracy():
    labels = torch.arange(10).repeat(3)
    result = generate(load_transformer(), load_encoder(), labels, steps=50, seed=123)
    assert result.images.shape == (30, 16, 16)
    assert conditional_accuracy(result.images, labels) >= 0.9


def test_guidance_matters():
    """Without guidance the classifier agrees less often: the conditioning is learnt, not luck."""
    labels = torch.arange(10).repeat(3)
    guided = generate(load_transformer(), load_encoder(), labels, steps=20, seed=7, guidance=4.0)
    unconditional = generate(load_transformer(), load_encoder(), labels, steps=20, seed=7, guidance=0.0)
    assert conditional_accuracy(guided.images, labels) > conditional_accuracy(unconditional.images, labels) + 0.3


def test_training_record_is_checked_in():
    record = json.loads((HERE / "training.json").read_text())
    assert record["seed"] == 0 and record["flow_train_seconds"] < 30 * 60
    assert record["classifier_test_accuracy"] >= 0.95


@pytest.mark.slow  # `make test-all`: end to end, covered piece by piece in `make test`
def test_demo_writes_grid_and_table(tmp_path):
    from dacc.demo import format_table, run_demo
    result = run_demo(tmp_path, per_class=1, steps=12, progress=False, log=lambda m: None)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 2 * 16 * 6 and grid.height > 10 * 16 * 6
    dacc_row = result.rows[1]
    assert dacc_row["psnr"] == psnr(result.compiled.images, result.eager.images) > 20
    assert dacc_row["accuracy"] >= 0.9
    table = format_table(result.rows)
    assert "speedup" in table and "cond. acc" in table and "dacc" in table
    model = dacc.load(tmp_path / "demo.dacc")
    assert model.manifest.programs[0].cache.strategy == "taylorseer"
