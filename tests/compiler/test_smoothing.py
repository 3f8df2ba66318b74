"""quantize.smoothing (SmoothQuant): the factors' formula, that they pay where activations have
outlier channels, the rewritten graph's text, the rewrite against an eager emulation on fresh
inputs, the measured factors reproduced end to end, and bad plans."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

import dacc
from dacc.compiler.compile import compile_model
from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR
from dacc.compiler.model_file import load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import PIPELINE
from dacc.compiler.search_seeds import CALIBRATION_SEEDS
from dacc.compiler.smoothing import activation_absmax, measure_smoothing, smoothing_factors
from dacc.compiler.trace import export_program
from dacc.kernels.schemes import SCHEMES
from dacc.models import model_file
from dacc.passes.quantize_linears import select
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from tests.conftest import fresh_like, rel_err

SHORT_DEMO = '''from dacc.models.demo.model import build, example_inputs, more_example_inputs, sample as _sample


def sample(model, seed):
    return _sample(model, seed, steps=3)
'''


def _outlier_linear(seed: int, k: int = 96, n: int = 40, rows: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 40  # a few channels far above the rest, as after DiT norms
    return x, torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)


def _smoothed(mode: str, x, w, b, s):
    tensors = list(SCHEMES[mode].quantize(w.float() * s[None, :], 64).values())
    return SCHEMES[mode].op(x * (1 / s), *tensors, b)


def test_factors_are_the_formula_and_leave_the_linear_unchanged():
    x, w, b = _outlier_linear(0)
    x[:, 5] = 0  # a channel never seen non-zero stays unscaled
    amax = x.abs().amax(0)
    s = smoothing_factors(amax, w, 0.5)
    expected = amax.sqrt() / w.abs().amax(0).sqrt()
    assert s[5] == 1 and torch.allclose(s[amax > 0], expected[amax > 0])
    assert torch.allclose(F.linear(x / s, w * s, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [1, 2])
def test_smoothing_pays_where_activations_have_outlier_channels(seed):
    """int8's one scale per token: outlier channels starve the rest, smoothing gives it back.
    (fp8 keeps relative precision per value: measured no gain, so the plan refuses it there.)"""
    x, w, b = _outlier_linear(seed)
    mode = "int8_dynamic"
    exact = F.linear(x, w, b)
    plain = rel_err(_smoothed(mode, x, w, b, torch.ones(x.shape[1])), exact)
    smooth = rel_err(_smoothed(mode, x, w, b, smoothing_factors(x.abs().amax(0), w, 0.5)), exact)
    assert smooth < 0.6 * plain, (smooth, plain)


def _emulate(model, factors, mode="int8_dynamic"):
    """The eager model whose smoothed linears compute op(x / s, quantize(W * s)) (the test's copy)."""
    model = copy.deepcopy(model)
    for path, s in factors.items():
        module = model.get_submodule(path)
        tensors = list(SCHEMES[mode].quantize(module.weight.float() * s[None, :], 64).values())
        module.forward = lambda x, t=tensors, bias=module.bias, s=s: SCHEMES[mode].op(x * (1 / s), *t, bias)
    return model


def test_rewritten_graph_text_and_numerics(golden):
    mf = load_model_file(model_file("flux"))
    model = mf.build()
    paths = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n]
    g = torch.Generator().manual_seed(3)
    factors = {p: torch.rand(model.get_submodule(p).in_features, generator=g) * 4 + 0.25 for p in paths}
    plan = parse_plan(yaml.safe_load("quantize: {mode: int8_dynamic, fragile: full, smoothing: 0.5}"))
    chosen, _ = select(paths, plan)  # the fragile ones (adaptive-norm modulation) stay full precision
    factors = {p: s for p, s in factors.items() if p in chosen}
    ir = ProgramIR(export_program(model, mf.example_inputs(), None, "flux"), factors)
    graphs = {}
    run_pipeline(ir, plan, PIPELINE, check_invariants,
                 on_graph=lambda i, name, text: graphs.__setitem__(name, text))
    index = next(i for i, p in enumerate(PIPELINE, start=1) if p.name == "quantize_linears")
    text = graphs["quantize_linears"]
    golden(f"flux/quantize_int8_dynamic_smoothed_{index:02d}_quantize_linears.txt", text)
    assert text.count(".smooth_inv)") == len(factors) > 20  # one multiply per smoothed linear, none elsewhere
    inputs = fresh_like(mf.example_inputs(), seed=7)
    with torch.no_grad():
        want = _emulate(model, factors)(**inputs, return_dict=False)[0]
        got = ir.ep.module()(**inputs, return_dict=False)[0]
        plain = model(**inputs, return_dict=False)[0]
    assert rel_err(got, want) < 1e-5
    assert 1e-5 < rel_err(got, plain) < 0.05


def test_activation_maxima_are_measured_on_a_copy_over_the_calibration_seeds():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    inputs = {}

    def sample(m, seed):
        inputs[seed] = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
        return m(inputs[seed])
    seen = activation_absmax(model, ["0", "2"], sample)
    xs = torch.cat([inputs[s] for s in CALIBRATION_SEEDS])
    assert sorted(inputs) == sorted(CALIBRATION_SEEDS)
    assert torch.equal(seen["0"], xs.abs().amax(0))
    assert torch.allclose(seen["2"], model[1](model[0](xs)).abs().amax(0))
    assert not model[0]._forward_pre_hooks  # the user's model never carried a hook


@pytest.mark.slow  # `make test-all`: the pieces run in `make test` (measurement above, rewrite by graph text)
def test_measured_factors_reach_the_artifact(tmp_path):
    """End to end on the trained demo: the compile measures the factors on sample()'s calibration
    seeds, the manifest marks each smoothed linear, and the artifact equals the eager emulation
    with the factors measured again here (same seeds, same numbers)."""
    path = tmp_path / "demo3.py"
    path.write_text(SHORT_DEMO)
    plan_text = "num_inference_steps: 3\nquantize: {mode: int8_dynamic, fragile: full, smoothing: 0.5}\n"
    (tmp_path / "plan.yaml").write_text(plan_text)
    notes: list[str] = []
    compile_model(path, tmp_path / "plan.yaml", tmp_path / "a.dacc", verify=False, log=notes.append)
    mf = load_model_file(path)
    model = mf.build()
    factors = measure_smoothing(parse_plan(yaml.safe_load(plan_text)), model, mf.sample, lambda m: None)
    compiled = dacc.load(tmp_path / "a.dacc")
    smoothed = {s.weight.removesuffix(".weight") for s in compiled.manifest.programs[0].linears if s.smoothing}
    assert smoothed == set(factors) and smoothed and any("quantize smoothing" in n for n in notes)
    inputs = fresh_like(mf.example_inputs(), seed=11)
    with torch.no_grad():
        want = _emulate(model, factors)(**inputs, return_dict=False)[0]
    assert rel_err(compiled(**inputs, return_dict=False)[0], want) < 1e-5


@pytest.mark.parametrize("text, message", [
    ("quantize: {mode: int8_weight, smoothing: 0.5}", "quantize.smoothing moves activation outliers"),
    ("quantize: {mode: fp8_dynamic, smoothing: 0.5}", "not 'fp8_dynamic'"),
    ("quantize: {mode: int8_dynamic, smoothing: 1.5}", "quantize.smoothing"),
    ("quantize: {smoothing: 0.5}", "quantize.smoothing has no effect with quantize.mode 'none'"),
])
def test_bad_smoothing_plans(text, message):
    with pytest.raises(DaccError, match=message):
        parse_plan(yaml.safe_load(text))


def test_smoothing_needs_sample():
    plan = parse_plan(yaml.safe_load("quantize: {mode: int8_dynamic, smoothing: 0.5}"))
    with pytest.raises(DaccError, match="sample"):
        measure_smoothing(plan, load_model_file(model_file("flux")).build(), None, lambda m: None)
