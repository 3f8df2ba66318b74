"""quantize.target_psnr: the search on scripted sensitivities (exact expectations by brute force),
and once on the trained demo model, reproduced by the artifact."""
from __future__ import annotations

import statistics

import pytest

from dacc.compiler.quant_search import (CALIBRATION_SEEDS, VALIDATION_SEEDS, exclude_patterns, group_of,
                                        search)

GROUPS = ["context_embedder", "single_transformer_blocks.0", "single_transformer_blocks.1",
          "transformer_blocks.0", "transformer_blocks.1", "x_embedder"]


def _scripted(cost: dict[str, float], seed_offset: dict[int, float], base: float = 50.0):
    """PSNR falls by each quantized group's cost (independent errors), shifted per seed."""
    calls = []

    def measure(kept, seeds):
        calls.append((kept, seeds))
        return [base - sum(c for g, c in cost.items() if g not in kept) + seed_offset.get(s, 0.0) for s in seeds]
    return measure, calls


def _fewest(cost, target, seeds, offsets, margin):
    """Brute force: the smallest number of most-costly groups whose keeping clears the rule."""
    order = sorted(cost, key=lambda g: -cost[g])
    for k in range(len(order) + 1):
        p = [50.0 - sum(cost[g] for g in order[k:]) + offsets.get(s, 0.0) for s in seeds]
        if margin(p) >= target:
            return k
    return None


@pytest.mark.parametrize("target", [30.0, 36.0, 41.0, 44.5])
def test_the_search_keeps_the_most_sensitive_groups_and_no_more(target):
    cost = {"context_embedder": 0.3, "single_transformer_blocks.0": 2.0, "single_transformer_blocks.1": 6.0,
            "transformer_blocks.0": 4.0, "transformer_blocks.1": 1.0, "x_embedder": 0.1}
    offsets = {CALIBRATION_SEEDS[1]: -0.4}  # the seeds disagree a little: a margin of half the spread
    measure, _ = _scripted(cost, offsets)
    result = search(GROUPS, measure, target, log=lambda m: None)
    k = _fewest(cost, target, CALIBRATION_SEEDS, offsets, lambda p: min(p) - (max(p) - min(p)) / 2)
    assert result["met"]
    assert result["kept"] == sorted(cost, key=lambda g: -cost[g])[:k]
    assert result["sensitivity"] == {g: pytest.approx(50 - c) for g, c in cost.items()}
    assert result["validation_psnr_mean"] >= target and result["validation_psnr_worst"] >= target - 0.5


def test_validation_seeds_that_disagree_keep_one_more_group():
    cost = {g: 2.0 + i for i, g in enumerate(GROUPS)}
    offsets = {s: -3.0 for s in VALIDATION_SEEDS}  # calibration is optimistic on these seeds
    measure, calls = _scripted(cost, offsets)
    target = 40.0
    result = search(GROUPS, measure, target, log=lambda m: None)
    k_calibrated = _fewest(cost, target, CALIBRATION_SEEDS, {}, lambda p: min(p))
    k_validated = _fewest(cost, target, VALIDATION_SEEDS, offsets, lambda p: min(p))
    assert k_validated > k_calibrated
    assert len(result["kept"]) == k_validated
    validated = [c for c in calls if c[1] == VALIDATION_SEEDS]
    assert len(validated) == k_validated - k_calibrated + 1  # one more group per failed validation


def test_an_unreachable_target_is_reported_not_met():
    measure, _ = _scripted({g: 1.0 for g in GROUPS}, {})
    result = search(GROUPS, measure, 60.0, log=lambda m: None)
    assert not result["met"] and result["validation_psnr_mean"] is None


def test_groups_and_their_patterns():
    assert group_of("transformer_blocks.3.attn.to_q") == "transformer_blocks.3"
    assert group_of("time_text_embed.timestep_embedder.linear_1") == "time_text_embed.timestep_embedder.linear_1"
    assert group_of("blocks.12") == "blocks.12"
    import fnmatch
    paths = ["transformer_blocks.1.ff.net.2", "transformer_blocks.10.ff.net.2", "proj_out"]
    patterns = exclude_patterns(["transformer_blocks.1", "proj_out"])
    assert [p for p in paths if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)] == \
        ["transformer_blocks.1.ff.net.2", "proj_out"]


SHORT_DEMO = '''"""The demo model file with 5-step sampling (the search's cost, not its logic, scales with steps)."""
from dacc.models.demo.model import build, example_inputs, more_example_inputs, sample as _sample


def sample(model, seed):
    return _sample(model, seed, steps=5)
'''


@pytest.mark.slow  # `make test-all`: end to end, covered piece by piece in `make test`
def test_the_search_on_the_demo_model_is_reproduced_by_the_artifact(tmp_path):
    """int4 everywhere (fragile layers too), rounded to nearest, loses a few dB on the trained demo model: the search
    keeps the blocks it ranks most sensitive, the manifest says which, their linears stay full
    precision in the graph, and the artifact's own samples on the validation seeds give the
    PSNR the manifest records (the search measured an eager emulation of the same rewrite)."""
    import dacc
    from dacc.compiler.compile import compile_model
    from dacc.metrics import psnr_per_image
    from dacc.models.demo import load_transformer

    model_path = tmp_path / "demo10.py"
    model_path.write_text(SHORT_DEMO)
    (tmp_path / "plan.yaml").write_text(
        "num_inference_steps: 5\nquantize: {mode: int4_weight, fragile: same, rounding: nearest, target_psnr: 33}\n")
    notes: list[str] = []
    compile_model(model_path, tmp_path / "plan.yaml", tmp_path / "a.dacc", verify=False, log=notes.append)
    compiled = dacc.load(tmp_path / "a.dacc")
    record = compiled.manifest.quantize_search
    assert record["met"] and record["kept"], record  # something had to be kept, and it was enough
    assert record["kept"] == sorted(record["sensitivity"], key=record["sensitivity"].get)[:len(record["kept"])]
    kept = set(record["kept"])
    for site in compiled.manifest.programs[0].linears:
        full = group_of(site.weight.removesuffix(".weight")) in kept or site.in_features % 64  # int4 groups
        assert (site.quant == "none") == bool(full), site
    from dacc.models.demo.model import sample
    eager = load_transformer()
    got = [float(psnr_per_image(sample(compiled, s, steps=5), sample(eager, s, steps=5)).mean())
           for s in VALIDATION_SEEDS if compiled.reset() is None]
    assert statistics.mean(got) == pytest.approx(record["validation_psnr_mean"], abs=0.01)
    assert min(got) == pytest.approx(record["validation_psnr_worst"], abs=0.01)
    assert statistics.mean(got) >= 33 and any("keeping" in n for n in notes)
