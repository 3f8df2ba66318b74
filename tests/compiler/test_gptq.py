"""quantize.rounding gptq: the same stored int4 format as rounding to nearest with a lower output
error where inputs correlate, exactly nearest where they do not, the input statistics measured
on a copy over the calibration seeds, the pass storing what gptq_int4 computes, and bad plans."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from dacc.compiler.gptq import BLOCK, gptq_int4, input_hessians, measure_hessians
from dacc.compiler.smoothing import measure_smoothing
from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR
from dacc.compiler.model_file import load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import QUANTIZED_REFERENCE
from dacc.compiler.search_seeds import CALIBRATION_SEEDS
from dacc.compiler.trace import export_program
from dacc.kernels.int4 import QMAX, dequantize_weight_int4, group_scales, quantize_weight_int4, round_int4, unpack_int4
from dacc.models import model_file
from dacc.passes.quantize_linears import select
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from tests.conftest import rel_err


def _correlated(seed: int, k: int, n: int = 48, rows: int = 512):
    """Inputs whose channels mix a few shared directions (as a DiT's hidden states do), a weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 8, generator=g) @ torch.randn(k // 8, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)
    return x, torch.randn(n, k, generator=g) / k ** 0.5


@pytest.mark.parametrize("seed, k, group", [(0, 128, 64), (1, 192, 32), (2, 256, 128)])
def test_gptq_lowers_the_output_error_where_inputs_correlate(seed, k, group):
    x, w = _correlated(seed, k)
    exact = F.linear(x, w)
    near = quantize_weight_int4(w, group)
    tensors = gptq_int4(w, x.T @ x, group)
    assert tensors["int4"].dtype == torch.uint8 and tensors["int4"].shape == near[0].shape
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == near[1].shape
    assert int(unpack_int4(tensors["int4"]).abs().max()) <= QMAX
    err_near = rel_err(F.linear(x, dequantize_weight_int4(*near, torch.float32)), exact)
    err_gptq = rel_err(F.linear(x, dequantize_weight_int4(tensors["int4"], tensors["scales"], torch.float32)), exact)
    assert err_gptq < 0.7 * err_near, (err_gptq, err_near)


def _column_by_column(w: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """GPTQ as defined: each column's error updates every later column at once (no blocks);
    the dequantized weight."""
    w, k = w.clone(), w.shape[1]
    h = h.double() + 0.01 * torch.diagonal(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    out = torch.empty_like(w)
    for j in range(k):
        if j % group == 0:
            scale = group_scales(w[:, j:j + group])
        out[:, j] = round_int4(w[:, j:j + 1], scale)[:, 0] * scale.float()
        w[:, j + 1:] -= ((w[:, j] - out[:, j]) / hinv[j, j])[:, None] * hinv[j, j + 1:][None, :]
    return out


@pytest.mark.parametrize("k, group", [(2 * BLOCK + 64, 32), (3 * BLOCK, 128)])
def test_blocked_sweep_is_the_column_by_column_definition(k, group):
    """The lazy block updates reorder sums only: beyond a rare level flip at a rounding tie, the
    weights are the definition's."""
    x, w = _correlated(6 + k, k, n=40, rows=4 * k)
    tensors = gptq_int4(w, x.T @ x, group)
    got = dequantize_weight_int4(tensors["int4"], tensors["scales"], torch.float32)
    want = _column_by_column(w, x.T @ x, group)
    differ = (got - want).abs() > 1e-3 * want.abs().max()
    assert differ.float().mean() < 0.01 and rel_err(got, want) < 0.02, (differ.float().mean(), rel_err(got, want))


def test_with_uncorrelated_inputs_gptq_is_rounding_to_nearest():
    """A diagonal H spreads no error anywhere: every value and scale is nearest rounding's."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 128, generator=g)
    h = torch.diag(torch.rand(128, generator=g) + 0.5)
    packed, scales = quantize_weight_int4(w, 64)
    tensors = gptq_int4(w, h, 64)
    assert torch.equal(tensors["int4"], packed) and torch.equal(tensors["scales"], scales)


def test_inputs_never_seen_are_zeroed_without_nans():
    x, w = _correlated(5, 128)
    x[:, 7] = 0
    tensors = gptq_int4(w, x.T @ x, 64)
    restored = dequantize_weight_int4(tensors["int4"], tensors["scales"], torch.float32)
    assert torch.isfinite(restored).all() and (restored[:, 7] == 0).all()


def test_input_statistics_are_measured_on_a_copy_over_the_calibration_seeds():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    inputs = {}

    def sample(m, seed):
        inputs[seed] = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(seed))
        return m(inputs[seed])
    h = input_hessians(model, ["0", "2"], sample)
    xs = torch.cat([inputs[s].reshape(-1, 6) for s in CALIBRATION_SEEDS])
    assert sorted(inputs) == sorted(CALIBRATION_SEEDS)
    assert torch.allclose(h["0"], xs.T @ xs, rtol=1e-5, atol=1e-5)
    hidden = model[1](model[0](xs)).detach()
    assert torch.allclose(h["2"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert not model[0]._forward_pre_hooks  # the user's model never carried a hook


def test_the_pass_stores_the_gptq_rounding_of_each_measured_linear():
    mf = load_model_file(model_file("flux"))
    model = mf.build()
    plan = parse_plan(yaml.safe_load("quantize: {mode: int4_weight, rounding: gptq, group_size: 32}"))
    paths = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = [p for p, m in select(paths, plan)[0].items() if m == "int4_weight"]
    g = torch.Generator().manual_seed(6)
    hessians = {}
    for p in chosen:
        a = torch.randn(64, model.get_submodule(p).in_features, generator=g)
        hessians[p] = a.T @ a
    ir = ProgramIR(export_program(model, mf.example_inputs(), None, "flux"), hessians=hessians)
    run_pipeline(ir, plan, QUANTIZED_REFERENCE, check_invariants)
    state = ir.ep.state_dict
    stored = [p for p in chosen if f"{p}.weight.int4" in state]
    assert len(stored) > 10
    for p in stored:
        want = gptq_int4(model.get_submodule(p).weight, hessians[p], 32)
        assert torch.equal(state[f"{p}.weight.int4"], want["int4"])
        assert torch.equal(state[f"{p}.weight.scales"], want["scales"])
    nearest = quantize_weight_int4(model.get_submodule(stored[0]).weight, 32)[0]
    assert not torch.equal(state[f"{stored[0]}.weight.int4"], nearest)


@pytest.mark.parametrize("text, message", [
    ("quantize: {mode: int8_weight, rounding: gptq}", "quantize.rounding chooses the levels of int4_weight only"),
    ("quantize: {mode: int4_weight, rounding: best}", "quantize.rounding"),
])
def test_bad_rounding_plans(text, message):
    with pytest.raises(DaccError, match=message):
        parse_plan(yaml.safe_load(text))


def test_gptq_needs_sample_and_auto_says_it_rounds_to_nearest_without():
    model = load_model_file(model_file("flux")).build()
    with pytest.raises(DaccError, match="add sample\\(\\), or set quantize.rounding: nearest"):
        measure_hessians(parse_plan(yaml.safe_load("quantize: {mode: int4_weight, rounding: gptq}")), model, None,
                         lambda m: None)
    notes = []
    auto = parse_plan(yaml.safe_load("quantize: {mode: int4_weight}"))
    assert measure_hessians(auto, model, None, notes.append) == {}
    assert notes and "to nearest" in notes[0]


def test_overridden_int4_and_int8_dynamic_linears_are_measured_whatever_the_plan_mode():
    """quantize.overrides may give int4 (or int8_dynamic) to linears of a plan in another mode: GPTQ's
    statistics (and SmoothQuant's maxima) cover exactly those linears, not nothing."""
    model = load_model_file(model_file("flux")).build()

    def sample(m, seed):
        return m(**_flux_call(seed)).sample
    plan = parse_plan(yaml.safe_load(
        "quantize: {mode: int8_weight, group_size: 32, smoothing: 0.5,"
        " overrides: {'transformer_blocks.0.ff.*': int4_weight, 'single_transformer_blocks.0.proj_mlp': int8_dynamic}}"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    int4 = sorted(p for p in linears if p.startswith("transformer_blocks.0.ff."))
    assert int4 and sorted(measure_hessians(plan, model, sample, lambda m: None)) == int4
    assert sorted(measure_smoothing(plan, model, sample, lambda m: None)) == ["single_transformer_blocks.0.proj_mlp"]


def _flux_call(seed: int) -> dict:
    from dacc.models.flux import _inputs
    return _inputs(2, 4, 4, seed=700 + seed)
