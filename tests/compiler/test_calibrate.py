"""Calibration on the trained demo model's own sample(): the target_psnr search records a result
that a rerun of the artifact reproduces, and the fitted TeaCache polynomial predicts the output
change of a seed it never saw better than the identity does."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

import dacc
from dacc.cli import main
from dacc.compiler.compile import compile_model
from dacc.demo import DEMO_MODEL
from dacc.metrics import psnr
from dacc.models.demo import load_transformer
from dacc.models.demo.model import sample
from dacc.runtime.cache import polyval, rel_l1
from dacc.runtime.decision_map import COLORS
from tests.conftest import shared_trace


def _compile_demo(root, cache: str):
    (root / "plan.yaml").write_text(f"num_inference_steps: 50\ncache: {cache}\n")
    compile_model(DEMO_MODEL, root / "plan.yaml", root / "a.dacc", verify=False, log=lambda m: None,
                  traced=shared_trace(DEMO_MODEL))
    return root / "a.dacc"


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    return _compile_demo(tmp_path_factory.mktemp("search"), "{strategy: taylorseer, target_psnr: 30, options: {order: 2}}")


@pytest.mark.slow  # `make test-all`: 50-step generations of the demo model, 45 s on CI's two cores
def test_target_psnr_search_is_reproduced_by_the_artifact(searched):
    model = dacc.load(searched)
    gate = model.manifest.programs[0].gates[0]
    search = gate.calibration["search"]
    assert search["met"] and search["flops_speedup"] > 2 and gate.mask == search["mask"] and not all(gate.mask)
    eager = load_transformer()
    measured = [psnr(sample(model, seed), sample(eager, seed)) for seed in search["validation_seeds"]]
    assert measured == pytest.approx(search["validation_psnr"], abs=1e-2)


@pytest.mark.slow  # `make test-all`: shares the search above
def test_inspect_shows_the_gate_and_draws_what_the_search_measured(searched, tmp_path, capsys):
    png = tmp_path / "map.png"
    assert main(["inspect", str(searched), "--decision-map", str(png)]) == 0
    text = capsys.readouterr().out
    assert "cache gate: taylorseer" in text and "target PSNR 30 dB: chose cache_ratio" in text
    planned = text.split("decided by the probe): ")[1].split()[0]
    assert len(planned) == 50 and planned[0] == "c" and "f" in planned and "?" not in planned
    colors = set(Image.open(png).convert("RGB").getdata())
    assert COLORS["computed"] in colors and COLORS["forecast"] in colors


@pytest.mark.slow  # `make test-all`: end to end, covered piece by piece in `make test`
def test_teacache_rescale_predicts_output_change_on_an_unseen_seed(tmp_path, capsys):
    artifact = _compile_demo(tmp_path, "{strategy: teacache, cache_ratio: 0.3, options: {calibration_seeds: 1}}")
    model = dacc.load(artifact)
    gate = model.programs[0].spec.gates[0]
    assert gate.calibration["rescale_fit"]["seeds"] == [0] and len(gate.rescale) >= 2
    model.programs[0].spec.gates = [dataclasses.replace(gate, threshold=0.0)]  # every step computes
    model._recorder = []
    sample(model, seed=5)
    xs, ys, prev = [], [], None
    for r in model._recorder:
        if r.stat is not None and prev is not None:
            xs.append(r.stat)
            ys.append(rel_l1(r.outputs, prev))
        prev = r.outputs
    xs, ys = np.array(xs), np.array(ys)
    fitted = np.abs([polyval(gate.rescale, x) for x in xs] - ys).mean()
    assert len(xs) == 49 and fitted < 0.5 * np.abs(xs - ys).mean()
    assert main(["inspect", str(artifact)]) == 0
    assert "rescale fitted" in capsys.readouterr().out


PLANS_AND_NEEDS = [  # cache section -> whether its compile calibrates (what the manifest's gates say)
    ({"strategy": "none"}, False),
    ({"strategy": "dbcache", "options": {"threshold": 0.2}}, False),
    ({"strategy": "dbcache", "cache_ratio": 0.5}, True),
    ({"strategy": "dbcache", "target_psnr": 30.0}, True),
    ({"strategy": "teacache", "options": {"threshold": 0.3}}, True),  # its rescale is fitted
    ({"strategy": "teacache", "options": {"threshold": 0.3, "rescale": [1.0, 0.0]}}, False),
    ({"strategy": "taylorseer", "options": {"interval": 3}}, False),
    ({"strategy": "taylorseer", "cache_ratio": 0.5}, True),
    ({"strategy": "scm", "options": {"policy": "medium"}}, False),
    ({"strategy": "schedule", "options": {"masks": [[True, False, True, True]]}}, False),
    ({"strategy": "schedule", "cache_ratio": 0.5}, True),
    ({"strategy": "magcache", "options": {"threshold": 0.1}}, True),  # its mask is measured
]


@pytest.mark.parametrize("cache, expected", PLANS_AND_NEEDS)
def test_the_plan_alone_says_whether_the_compile_calibrates(cache, expected):
    """A parallel plan builds its single-process twin only when this says so: it must agree with
    the manifest the passes produce."""
    from dacc.compiler.calibrate import needs_calibration, plan_needs_calibration
    from dacc.compiler.compile import partition_manifest
    from dacc.models import model_file
    from dacc.schema.plan import parse_plan

    plan = parse_plan({"num_inference_steps": 4, "cache": cache}, "plan")
    manifest = partition_manifest(shared_trace(model_file("flux")), plan)
    assert needs_calibration(manifest, plan) == expected
    assert plan_needs_calibration(plan) == expected
