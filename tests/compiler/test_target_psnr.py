"""cache.target_psnr keeps its promise on a trained model its constants were not tuned on (the
glyphs model; the constants come from the demo): what the search validated holds on the held-out
seeds it never ran, the artifact reproduces the validated figure, `dacc inspect` shows it, and a
target no setting meets compiles the no-skip plan and says so. And `strategy: schedule`: the mask
calibration chose is what the runtime follows, and all it does.

Twenty steps keep the searches short (a minute each, so they run in `make test-all`); the 50-step
figures on all three trained models are bench/cache.py's."""
from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch
import yaml

import dacc
from dacc.cli import main
from dacc.compiler.compile import compile_model
from dacc.compiler.ratio_fit import FIT_SEEDS, FitRun, choose
from dacc.compiler.ratio_map import ERROR_PER_RATIO
from dacc.compiler.search_seeds import HELD_OUT_SEEDS, VALIDATION_SEEDS, seed_psnr
from dacc.models.glyphs import GLYPHS
from dacc.models.glyphs.model import sample
from dacc.runtime.cache import planned_actions
from dacc.schema.errors import DaccError
from tests.conftest import shared_trace

MODEL = GLYPHS.here / "model.py"
STEPS = 20
TARGET = 30.0


def _compile(root, cache: str, log=lambda m: None, steps=STEPS):
    (root / "plan.yaml").write_text(f"num_inference_steps: {steps}\ncache: {cache}\n")
    compile_model(MODEL, root / "plan.yaml", root / "a.dacc", verify=False, log=log, traced=shared_trace(MODEL))
    return root / "a.dacc"


@pytest.fixture(scope="module")
def eager():
    return GLYPHS.load_transformer()


def _promise_holds(artifact, eager):
    model = dacc.load(artifact)
    search = model.manifest.programs[0].gates[0].calibration["search"]
    assert search["met"] and search["flops_speedup"] > 1.2, search
    assert search["validation_seeds"] == list(VALIDATION_SEEDS) and len(search["validation_psnr"]) == 4
    assert search["validation_psnr_mean"] >= TARGET and search["validation_psnr_worst"] >= TARGET - 0.5
    # the artifact reproduces what the search validated (its reference was the artifact, gate shut)
    first = seed_psnr(sample(model, VALIDATION_SEEDS[0]), sample(eager, VALIDATION_SEEDS[0], steps=STEPS))
    assert abs(first - search["validation_psnr"][0]) < 0.05
    held_out = [seed_psnr(sample(model, s), sample(eager, s, steps=STEPS)) for s in HELD_OUT_SEEDS]
    assert statistics.mean(held_out) >= TARGET - 0.5, held_out
    return model


@pytest.mark.slow  # `make test-all`: a search and eight generations, about a minute each
@pytest.mark.parametrize("cache", ["{strategy: dbcache, target_psnr: 30}",
                                   "{strategy: teacache, target_psnr: 30}",
                                   "{strategy: taylorseer, target_psnr: 30, options: {order: 2}}",
                                   "{strategy: schedule, target_psnr: 30}"],
                         ids=["dbcache", "teacache", "taylorseer", "schedule"])
def test_the_target_holds_on_held_out_seeds(tmp_path, eager, cache, capsys):
    artifact = _compile(tmp_path, cache)
    _promise_holds(artifact, eager)
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert f"target PSNR {TARGET:g} dB: chose cache_ratio" in text and "validated on seeds [2, 3, 4, 5]" in text


def test_an_unmet_target_compiles_the_no_skip_plan_and_says_so(tmp_path, capsys):
    said = []
    artifact = _compile(tmp_path, "{strategy: dbcache, target_psnr: 99}", log=said.append, steps=3)
    assert any("no cache_ratio that skips anything reaches PSNR 99" in line for line in said)
    model = dacc.load(artifact)
    gate = model.manifest.programs[0].gates[0]
    assert gate.calibration["search"]["met"] is False and gate.threshold == 0.0
    sample(model, HELD_OUT_SEEDS[0])
    assert model.stats()["segments_reused"] == 0
    assert main(["inspect", str(artifact)]) == 0
    assert "no cache_ratio that skips anything met it" in capsys.readouterr().out


SCHEDULE_STEPS = 8


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """The glyphs model with a schedule at cache_ratio 0.5, calibrated on its sample()."""
    return _compile(tmp_path_factory.mktemp("schedule"), "{strategy: schedule, cache_ratio: 0.5}", steps=SCHEDULE_STEPS)


def test_the_schedule_ships_as_a_static_mask_the_runtime_follows(scheduled, tmp_path):
    model = dacc.load(scheduled)
    gate = model.manifest.programs[0].gates[0]
    record = gate.calibration["schedule"]
    # the fewest computed steps whose measured cost per step fits ratio 0.5's error budget
    (only,) = record["ranges"]
    budget = gate.calibration["ratio_fit"]["chosen"][0]  # ratio 0.5's budget on this model, fitted on sample()
    assert budget == pytest.approx(0.5 * ERROR_PER_RATIO * gate.calibration["ratio_map"]["gain"], rel=1e-3)
    fits = [int(m) for m, c in only["least_cost"].items() if c / SCHEDULE_STEPS <= budget + 1e-5]
    assert gate.probe == "none" and gate.strategy == "schedule"
    assert sum(gate.mask) == min(fits) < SCHEDULE_STEPS
    assert len(only["step_costs"]) == SCHEDULE_STEPS and all(c > 0 for c in only["step_costs"][1:])
    images = sample(model, 7)
    (decisions,) = model.stats()["decisions"].values()
    assert decisions == planned_actions(gate, SCHEDULE_STEPS) and decisions.count("reused") == gate.mask.count(False)
    # the same mask given by hand (strategy scm) computes the same images: nothing else is at play
    mask = "[" + ", ".join(str(m).lower() for m in gate.mask) + "]"
    by_hand = _compile(tmp_path, f"{{strategy: scm, options: {{mask: {mask}}}}}", steps=SCHEDULE_STEPS)
    assert torch.equal(sample(dacc.load(by_hand), 7), images)


def test_the_ratio_fit_records_what_the_artifact_computes_on_the_fit_seeds(scheduled, eager):
    """cache_ratio 0.5 asks for about 30 dB: the fit's chosen run is the shipped artifact, measured
    against the uncached model on the fit seeds, and the run its rule prefers."""
    model = dacc.load(scheduled)
    fit = model.manifest.programs[0].gates[0].calibration["ratio_fit"]
    budget, psnr, speedup = fit["chosen"]
    assert fit["target_psnr"] == 30.0 and fit["seeds"] == list(FIT_SEEDS) and [budget, psnr, speedup] in fit["runs"]
    measured = [seed_psnr(sample(model, s), sample(eager, s, steps=SCHEDULE_STEPS)) for s in FIT_SEEDS]
    stats = model.stats()
    assert statistics.mean(measured) == pytest.approx(psnr, abs=0.05)
    assert stats["flops_total"] / stats["flops_computed"] == pytest.approx(speedup, rel=1e-3) and speedup > 1
    assert choose([FitRun(*run) for run in fit["runs"]], 30.0).row() == fit["chosen"]


def test_a_step_by_range_schedule_gives_each_block_range_its_own_mask(tmp_path, capsys):
    """`ranges: 2`: two gates over consecutive halves of the blocks, each following its own
    calibrated mask; with one mask for both, it computes what the one-range schedule computes."""
    artifact = _compile(tmp_path, "{strategy: schedule, cache_ratio: 0.5, options: {ranges: 2}}", steps=SCHEDULE_STEPS)
    model = dacc.load(artifact)
    program = model.manifest.programs[0]
    first, second = program.gates
    blocks = [i for i, s in enumerate(program.segments) if s.kind == "block"]
    covered = [i for g in program.gates for i in range(g.skip_first, g.skip_last + 1) if i in blocks]
    assert covered == blocks and first.skip_last < second.skip_first and len(covered) == 6
    measured = first.calibration["schedule"]["ranges"]
    assert len(measured) == 2 and all(r["flops"] > 0 for r in measured)
    assert not (all(first.mask) and all(second.mask)) and first.mask[0] and second.mask[-1]
    images = sample(model, 7)
    decisions = model.stats()["decisions"]
    assert {key.rsplit("/", 1)[1] for key in decisions} == {"range0", "range1"}  # per CFG context, per range
    for key, actions in decisions.items():
        gate = program.gates[int(key[-1])]
        assert actions == planned_actions(gate, SCHEDULE_STEPS) and [a == "computed" for a in actions] == gate.mask
    # the masks given in the plan (what `dacc calibrate` prints) compile, uncalibrated, to the same images
    (tmp_path / "fixed").mkdir()
    given = yaml.safe_dump([first.mask, second.mask], default_flow_style=True).strip()
    fixed = dacc.load(_compile(tmp_path / "fixed", f"{{strategy: schedule, options: {{ranges: 2, masks: {given}}}}}",
                               steps=SCHEDULE_STEPS))
    assert fixed.manifest.programs[0].gates[1].calibration == {} and torch.equal(sample(fixed, 7), images)
    # one mask for both ranges: the residuals of the halves add up to the whole range's
    mask = first.mask if not all(first.mask) else second.mask
    runner = model.programs[0]
    runner.spec.gates = [dataclasses.replace(g, mask=mask) for g in runner.spec.gates]
    model.reset()
    halves = sample(model, 7)
    text = "[" + ", ".join(str(m).lower() for m in mask) + "]"
    (tmp_path / "scm").mkdir()
    whole = sample(dacc.load(_compile(tmp_path / "scm", f"{{strategy: scm, options: {{mask: {text}}}}}",
                                      steps=SCHEDULE_STEPS)), 7)
    assert torch.allclose(halves, whole, atol=1e-4)
    if first.mask != second.mask:  # and the calibrated masks, where they differ, compute something else
        assert not torch.allclose(halves, images, atol=1e-3)
    assert main(["inspect", str(artifact)]) == 0
    shown = capsys.readouterr().out
    assert "cache gate 2 of 2: schedule" in shown and "planned steps of range 2" in shown


def test_more_ranges_than_blocks_is_refused(tmp_path):
    with pytest.raises(DaccError, match="cannot split 6 blocks into 7 ranges") as info:
        _compile(tmp_path, "{strategy: schedule, cache_ratio: 0.5, options: {ranges: 7}}", steps=3)
    assert "set ranges to at most 6" in str(info.value)


@pytest.mark.slow  # `make test-all`: a full trace and three 8-step calibrations, 45 s on two cores
def test_dacc_calibrate_prints_options_that_reproduce_the_calibrated_artifact(tmp_path, capsys):
    """TaylorSeer at cache_ratio 0.5 refreshes on calibrated steps; `dacc calibrate` prints them as
    fixed options, which compile (no calibration) to an artifact computing the same images."""
    plan = "{strategy: taylorseer, cache_ratio: 0.5, options: {order: 1}}"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    calibrated = dacc.load(_compile(tmp_path / "a", plan, steps=SCHEDULE_STEPS))
    (tmp_path / "plan.yaml").write_text(f"num_inference_steps: {SCHEDULE_STEPS}\ncache: {plan}\n")
    assert main(["calibrate", str(MODEL), "--plan", str(tmp_path / "plan.yaml")]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["cache"]
    gate = calibrated.manifest.programs[0].gates[0]
    assert printed["options"] == {"order": 1, "interval": 1, "scm_mask": gate.mask} and not all(gate.mask)
    assert "ratio_map" in gate.calibration and gate.interval == 1
    fixed = dacc.load(_compile(tmp_path / "b", yaml.safe_dump(printed, default_flow_style=True).strip(),
                               steps=SCHEDULE_STEPS))
    assert "ratio_map" not in fixed.manifest.programs[0].gates[0].calibration  # nothing left to calibrate
    assert torch.equal(sample(fixed, 11), sample(calibrated, 11))
    (decisions,) = calibrated.stats()["decisions"].values()
    assert [d == "computed" for d in decisions] == gate.mask


@pytest.mark.slow  # `make test-all`: an 8-step calibration of the glyphs model, 20 s on two cores
def test_magcache_measures_its_own_curve_and_ships_a_static_mask(tmp_path, capsys):
    model = dacc.load(_compile(tmp_path, "{strategy: magcache, cache_ratio: 0.5}", steps=SCHEDULE_STEPS))
    gate = model.manifest.programs[0].gates[0]
    curve = gate.calibration["magnitude_ratios"]["ratios"]
    assert len(curve) == SCHEDULE_STEPS and curve[0] == 1.0 and all(0.2 < r < 5 for r in curve)
    assert gate.probe == "none" and not all(gate.mask) and gate.threshold > 0
    sample(model, 12)
    (decisions,) = model.stats()["decisions"].values()
    assert decisions == planned_actions(gate, SCHEDULE_STEPS) and [d == "computed" for d in decisions] == gate.mask
    assert main(["inspect", str(tmp_path / "a.dacc")]) == 0
    text = capsys.readouterr().out
    assert "magnitude ratios measured on seeds [0, 1]" in text and "cache_ratio on this model" in text
