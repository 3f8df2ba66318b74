"""quantize.target_psnr: the search on scripted sensitivities (exact expectations by brute force),
and once on the trained demo model, reproduced by the artifact."""
from __future__ import annotations

import statistics

import pytest
import torch

from dacc.compiler.quant_search import (CALIBRATION_SEEDS, VALIDATION_SEEDS, choose_exclusions, eager_measure,
                                        group_of, promoted, search)
from dacc.passes.quantize_linears import linear_modes, select
from dacc.schema.plan import parse_plan

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


def test_groups():
    assert group_of("transformer_blocks.3.attn.to_q") == "transformer_blocks.3"
    assert group_of("time_text_embed.timestep_embedder.linear_1") == "time_text_embed.timestep_embedder.linear_1"
    assert group_of("blocks.12") == "blocks.12"


def test_overrides_come_before_fragile_and_mode_and_the_first_match_wins():
    paths = ["context_embedder", "proj_out", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.norm1.linear",
             "transformer_blocks.1.attn.to_q", "transformer_blocks.1.ff.net.2", "x_embedder"]
    plan = parse_plan({"quantize": {"mode": "int4_weight", "exclude": ["x_embedder"], "overrides": {
        "transformer_blocks.1.attn.*": "full", "transformer_blocks.1.*": "int8_dynamic",
        "proj_out": "int4_weight", "x_embedder": "int8_weight", "typo.*": "full"}}})
    modes, warnings = select(paths, plan)
    assert modes == {"context_embedder": "int8_weight",  # fragile, no override: quantize.fragile's default
                     "proj_out": "int4_weight",  # fragile, overridden
                     "transformer_blocks.0.attn.to_q": "int4_weight",  # the mode
                     "transformer_blocks.0.norm1.linear": "int4_weight",  # modulation: fragile only where activations are quantized
                     "transformer_blocks.1.ff.net.2": "int8_dynamic"}  # the second pattern; the first keeps to_q
    assert len(warnings) == 1 and "quantize.overrides pattern 'typo.*' matches no linear" in warnings[0]


def _tiny_flux():
    """The Flux test family (random weights) with a two-call sample()."""
    from dacc.models.flux import _inputs, build

    torch.manual_seed(0)
    model = build().eval()

    def sample(m, seed):
        call = _inputs(2, 4, 4, seed=500 + seed)
        out = m(**call).sample
        return m(**{**call, "hidden_states": call["hidden_states"] - 0.5 * out}).sample
    return model, sample


def test_the_search_promotes_int4_blocks_to_int8_and_the_plan_computes_what_it_measured():
    """int4 everywhere misses a target int8 meets: the kept blocks' int4 linears become int8 (not
    full precision: a quarter of the bytes), their fragile int8 ones full, and the plan the search
    returns selects exactly that, measuring the PSNR it recorded."""
    model, sample = _tiny_flux()
    plan = parse_plan({"quantize": {"mode": "int4_weight", "fragile": "same", "group_size": 32, "rounding": "nearest",
                                    "target_psnr": 45, "overrides": {"proj_out": "int8_weight"}}})
    before = linear_modes(model, plan)
    every_int4 = eager_measure(model, before, 32, sample)(frozenset(), VALIDATION_SEEDS)
    assert max(every_int4) < 45  # something has to be kept
    chosen, record = choose_exclusions(plan, model, sample, log=lambda m: None)
    assert record["met"] and record["kept"]
    after = linear_modes(model, chosen)
    for path, mode in before.items():
        want = promoted(mode) if group_of(path) in record["kept"] else mode
        assert after.get(path, "full") == want, path
    assert any(m == "int8_weight" for p, m in after.items() if before[p] == "int4_weight")
    assert chosen.quantize.overrides["proj_out"] == "int8_weight" or group_of("proj_out") in record["kept"]
    again = eager_measure(model, after, 32, sample)(frozenset(), VALIDATION_SEEDS)
    assert statistics.mean(again) == pytest.approx(record["validation_psnr_mean"], abs=1e-3)


SHORT_DEMO = '''"""The demo model file with 5-step sampling (the search's cost, not its logic, scales with steps)."""
from dacc.models.demo.model import build, example_inputs, more_example_inputs, sample as _sample


def sample(model, seed):
    return _sample(model, seed, steps=5)
'''


@pytest.mark.slow  # `make test-all`: end to end, covered piece by piece in `make test`
def test_the_search_on_the_demo_model_is_reproduced_by_the_artifact(tmp_path):
    """int4 everywhere (fragile layers too), rounded to nearest, loses a few dB on the trained demo model: the search
    keeps the blocks it ranks most sensitive, the manifest says which, their linears compute in
    int8 in the graph, and the artifact's own samples on the validation seeds give the
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
        int4 = site.in_features % 64 == 0  # int4 groups of 64; other linears stay full precision
        promote = group_of(site.weight.removesuffix(".weight")) in kept
        assert site.quant == ("none" if not int4 else "int8_weight" if promote else "int4_weight"), site
    from dacc.models.demo.model import sample
    eager = load_transformer()
    got = [float(psnr_per_image(sample(compiled, s, steps=5), sample(eager, s, steps=5)).mean())
           for s in VALIDATION_SEEDS if compiled.reset() is None]
    assert statistics.mean(got) == pytest.approx(record["validation_psnr_mean"], abs=0.01)
    assert min(got) == pytest.approx(record["validation_psnr_worst"], abs=0.01)
    assert statistics.mean(got) >= 33 and any("keeping" in n for n in notes)
