"""quantize_linears: the rewritten graph's text, the artifact against an eager emulation of the
same quantization on fresh inputs, selection by pattern, and the manifest's bytes and FLOPs."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml

import dacc
from dacc.compiler.compile import compile_model
from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR
from dacc.compiler.model_file import load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import PIPELINE
from dacc.compiler.trace import export_program
from dacc.kernels.int8 import linear_int8_dynamic_reference, linear_int8_weight_reference, quantize_weight_int8
from dacc.models import model_file
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from tests.conftest import fresh_like, rel_err

MODES = ("int8_weight", "int8_dynamic")


def _compile(tmp_path, family, quantize: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"num_inference_steps: 10\nquantize: {quantize}\n")
    out = tmp_path / f"{family}.dacc"
    notes = []
    manifest = compile_model(model_file(family), plan, out, log=notes.append)
    return manifest, out, notes


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    cache = {}

    def get(family, mode):
        if (family, mode) not in cache:
            cache[family, mode] = _compile(tmp_path_factory.mktemp(f"{family}-{mode}"), family, f"{{mode: {mode}}}")
        return cache[family, mode]
    return get


def _emulate(model, manifest, mode):
    """The eager model whose selected nn.Linear modules compute the reference quantized formula
    (the test's own copy, so nothing the user holds is touched): the graph rewrite must pick the
    same linears, weights, biases and shapes."""
    reference = {"int8_weight": linear_int8_weight_reference, "int8_dynamic": linear_int8_dynamic_reference}[mode]
    model = copy.deepcopy(model)
    for site in manifest.programs[0].linears:
        if site.quant == "none":
            continue
        module = model.get_submodule(site.weight.removesuffix(".weight"))
        q, scale = quantize_weight_int8(module.weight)
        module.forward = lambda x, q=q, scale=scale, bias=module.bias: reference(x, q, scale, bias)
    return model


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("mode", MODES)
def test_artifact_matches_the_eager_emulation_on_fresh_inputs(artifacts, family, mode):
    manifest, out, _ = artifacts(family, mode)
    mf = load_model_file(model_file(family))
    model = mf.build()
    reference = _emulate(model, manifest, mode)
    compiled = dacc.load(out)
    for seed, inputs in enumerate([mf.example_inputs(), *mf.more_example_inputs()]):
        inputs = fresh_like(inputs, seed=40 + seed)
        compiled.reset()
        with torch.no_grad():
            want = reference(**inputs, return_dict=False)[0]
            plain = model(**inputs, return_dict=False)[0]
        got = compiled(**inputs, return_dict=False)[0]
        assert rel_err(got, want) < 1e-5
        assert 1e-5 < rel_err(got, plain) < 0.05  # quantized: close to, but not, the float model


def test_selection_fragile_layers_patterns_and_warnings(tmp_path):
    manifest, _, notes = _compile(tmp_path, "flux",
                                  "{mode: int8_weight, exclude: ['single_transformer_blocks.*', 'transfomer_blocks.1.*']}")
    sites = {s.weight.removesuffix(".weight"): s for s in manifest.programs[0].linears}
    quantized = {p for p, s in sites.items() if s.quant == "int8_weight"}
    assert quantized and all(p.startswith("transformer_blocks.") for p in quantized)
    assert not any(".norm1" in p or "embed" in p for p in quantized)  # fragile layers kept
    assert "transformer_blocks.1.attn.to_q" in quantized  # the misspelt pattern excluded nothing...
    warning = next(n for n in notes if "warning" in n)  # ...and says so, naming the nearest paths
    assert "'transfomer_blocks.1.*' matches no linear" in warning and "transformer_blocks.1" in warning
    everything, _, _ = _compile(tmp_path / "all", "flux", "{mode: int8_weight, keep_fragile: false}")
    assert all(s.quant == "int8_weight" for s in everything.programs[0].linears)


def test_manifest_bytes_and_flops_after_the_rewrite(artifacts, compiled):
    manifest, _, _ = artifacts("flux", "int8_dynamic")
    plain = compiled("flux").manifest.programs[0]
    program = manifest.programs[0]
    done = [s for s in program.linears if s.quant != "none"]
    assert done and all(s.bytes_after == s.out_features * (s.in_features + 4) for s in done)
    assert all(s.bytes_before == 4 * s.out_features * s.in_features and 0 < s.weight_error < 0.02 for s in done)
    saved = sum(s.bytes_before - s.bytes_after for s in done)
    assert sum(s.param_bytes for s in plain.segments) - sum(s.param_bytes for s in program.segments) == saved
    assert [s.flops for s in program.segments] == [s.flops for s in plain.segments]  # same matmuls, cheaper ones


def test_rewritten_graph_text(golden):
    mf = load_model_file(model_file("flux"))
    ir = ProgramIR(export_program(mf.build(), mf.example_inputs(), None, "flux"))
    graphs = {}
    run_pipeline(ir, parse_plan(yaml.safe_load("quantize: {mode: int8_dynamic}")), PIPELINE, check_invariants,
                 on_graph=lambda i, name, text: graphs.__setitem__(name, text))
    text = graphs["quantize_linears"]
    golden(f"flux/quantize_int8_dynamic_{len(PIPELINE):02d}_quantize_linears.txt", text)
    assert "dacc.linear_int8_dynamic" in text and "aten.linear" in text  # fragile linears stay float


@pytest.mark.parametrize("text, message", [
    ("quantize: {mode: int4}", "quantize.mode"),
    ("quantize: {mode: int8_weight, keep_fragile: 1}", "keep_fragile"),
])
def test_bad_quantize_plans(text, message):
    with pytest.raises(DaccError, match=message):
        parse_plan(yaml.safe_load(text))


def test_inspect_shows_each_linear(artifacts, capsys):
    from dacc.cli import main
    manifest, out, _ = artifacts("flux", "int8_dynamic")
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    done = [s for s in manifest.programs[0].linears if s.quant != "none"]
    assert f"{len(done)} quantized" in text
    assert any(line.split()[:2] == ["transformer_blocks.0.attn.to_q", "int8_dynamic"] for line in text.splitlines())
    assert any(line.split()[:3] == ["proj_out", "none", "32"] and "full precision" in line for line in text.splitlines())


def test_keep_fragile_without_a_mode_is_a_conflict():
    with pytest.raises(DaccError, match="keep_fragile has no effect with quantize.mode 'none'"):
        parse_plan(yaml.safe_load("quantize: {keep_fragile: false}"))
