"""Cache-gate passes: graph text per strategy, exactness at cache_ratio 0, a reference FBCache
written against diffusers' Flux modules, contexts, and the decision map."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml
import torch
from PIL import Image

import dacc
from dacc.compiler.cache_knobs import THRESHOLD_PER_RATIO
from dacc.compiler.compile import compile_model
from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR, Traced
from dacc.compiler.model_file import load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.trace import export_program
from dacc.compiler.pipeline import PIPELINE
from dacc.models import model_file
from dacc.runtime.cache import rel_l1
from dacc.runtime.decision_map import COLORS
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from tests.conftest import rel_err, shared_trace

STRATEGIES = {
    "dbcache": ("insert_dbcache_gate", "{Fn: 1, Bn: 1}"),
    "teacache": ("insert_teacache_gate", "{rescale: [1.0, 0.0]}"),
    "taylorseer": ("insert_taylorseer_gate", "{order: 2}"),
    "scm": ("apply_step_mask", "{}"),
}
STEPS = 8


def _plan_text(strategy: str) -> str:
    return (f"num_inference_steps: {STEPS}\ncache: {{strategy: {strategy}, cache_ratio: 0.0, "
            f"options: {STRATEGIES[strategy][1]}}}\n")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(family, strategy) -> artifact path, compiled at cache_ratio 0."""
    cache = {}

    def get(family: str, strategy: str):
        if (family, strategy) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{strategy}")
            (root / "plan.yaml").write_text(_plan_text(strategy))
            compile_model(model_file(family), root / "plan.yaml", root / "a.dacc", verify=False, log=lambda m: None,
                          traced=shared_trace(model_file(family)))
            cache[family, strategy] = root / "a.dacc"
        return cache[family, strategy]
    return get


@pytest.fixture(scope="module")
def traced():
    """One export per family; each test runs the pipeline on its own copy of the graph."""
    cache = {}

    def get(family: str) -> Traced:
        if family not in cache:
            mf = load_model_file(model_file(family))
            cache[family] = export_program(mf.build(), mf.example_inputs(), None, family)
        t = cache[family]
        return Traced(copy.deepcopy(t.ep), t.example, t.inputs)
    return get


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gate_graph_text(traced, golden, family, strategy):
    graphs = {}
    ir = ProgramIR(traced(family))
    run_pipeline(ir, parse_plan(yaml.safe_load(_plan_text(strategy))), PIPELINE, check_invariants,
                 on_graph=lambda i, name, text: graphs.__setitem__(name, text))
    assert [g.strategy for g in ir.cache_gates] == [strategy]
    names = [p.name for p in PIPELINE]
    pass_name = STRATEGIES[strategy][0]
    golden(f"{family}/cache_{strategy}_{names.index(pass_name) + 1:02d}_{pass_name}.txt", graphs[pass_name])
    assert "gate=skippable" in graphs[pass_name]
    if strategy == "teacache":
        assert "seg=cache_probe" in graphs[pass_name] and "gate=probe" in graphs[pass_name]


def _steps(compiled_file_inputs, n=STEPS, drift=0.03):
    base = compiled_file_inputs
    out = []
    for i, t in enumerate(torch.linspace(1.0, 0.05, n)):
        kw = dict(base)
        kw["timestep"] = t.expand(base["timestep"].shape).contiguous()
        kw["hidden_states"] = base["hidden_states"] * (1 - drift * i)
        out.append(kw)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cache_ratio_zero_reproduces_eager_exactly(artifacts, compiled, strategy):
    c = compiled("flux")
    model = dacc.load(artifacts("flux", strategy))
    for kw in _steps(c.file.example_inputs()):
        with torch.no_grad():
            ref = c.model(**kw, return_dict=False)[0]
        assert torch.equal(model(**kw, return_dict=False)[0], ref)
    assert model.stats()["segments_reused"] == 0


def _reference_fbcache(m, steps, threshold):
    """First Block Cache written directly against diffusers' Flux modules."""
    prev_probe, cached, outs, decisions = None, None, [], ""
    with torch.no_grad():
        for i, kw in enumerate(steps):
            hs = m.x_embedder(kw["hidden_states"])
            temb = m.time_text_embed(kw["timestep"] * 1000, kw["pooled_projections"])
            enc = m.context_embedder(kw["encoder_hidden_states"])
            rot = m.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]], 0))
            enc0, hs0 = enc, hs
            enc, hs = m.transformer_blocks[0](hidden_states=hs, encoder_hidden_states=enc, temb=temb,
                                              image_rotary_emb=rot)
            probe = [enc - enc0, hs - hs0]
            if prev_probe is None or rel_l1(probe, prev_probe) >= threshold:
                hs_in = hs
                for block in list(m.transformer_blocks[1:]) + list(m.single_transformer_blocks):
                    enc, hs = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rot)
                cached, prev_probe, decisions = hs - hs_in, probe, decisions + "c"
            else:
                hs, decisions = hs + cached, decisions + "r"
            outs.append(m.proj_out(m.norm_out(hs, temb)))
    return outs, decisions


def test_dbcache_matches_a_reference_first_block_cache(compiled, tmp_path):
    c = compiled("flux")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"num_inference_steps: {STEPS}\ncache: {{strategy: dbcache, options: {{Fn: 1, threshold: 0.5}}}}\n")
    compile_model(model_file("flux"), plan, tmp_path / "fb.dacc", verify=False, log=lambda m: None,
                  traced=shared_trace(model_file("flux")))
    model = dacc.load(tmp_path / "fb.dacc")
    steps = _steps(c.file.example_inputs(), drift=0.01)
    _, always = _reference_fbcache(c.model, steps, threshold=0.0)
    assert set(always) == {"c"}
    # a threshold between two observed statistics, so both implementations decide alike
    stats = sorted(rel_l1(*pair) for pair in _probe_pairs(c.model, steps))
    threshold = (stats[len(stats) // 2] + stats[len(stats) // 2 + 1]) / 2
    ref_outs, ref_decisions = _reference_fbcache(c.model, steps, threshold)
    assert "r" in ref_decisions and ref_decisions.count("c") >= 2
    gate = model.programs[0].spec.gates[0]
    model.programs[0].spec.gates = [dataclasses.replace(gate, threshold=threshold)]
    outs = [model(**kw, return_dict=False)[0] for kw in steps]
    decisions = "".join(d[0] for d in model.stats()["decisions"]["default/program0"])
    assert decisions == ref_decisions
    for got, want in zip(outs, ref_outs):
        assert rel_err(got, want) < 1e-5


def _probe_pairs(m, steps):
    """Every (later probe, earlier probe) pair: all statistics a gate could compare."""
    probes = []
    with torch.no_grad():
        for kw in steps:
            hs = m.x_embedder(kw["hidden_states"])
            temb = m.time_text_embed(kw["timestep"] * 1000, kw["pooled_projections"])
            enc = m.context_embedder(kw["encoder_hidden_states"])
            rot = m.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]], 0))
            enc1, hs1 = m.transformer_blocks[0](hidden_states=hs, encoder_hidden_states=enc, temb=temb,
                                                image_rotary_emb=rot)
            probes.append([enc1 - enc, hs1 - hs])
    return [(probes[i], probes[j]) for i in range(len(probes)) for j in range(i)]


def test_contexts_keep_separate_cache_state(artifacts, compiled):
    c = compiled("flux")
    path = artifacts("flux", "taylorseer")
    cond, uncond = _steps(c.file.example_inputs()), _steps(c.file.example_inputs(), drift=0.1)

    def gated(model):
        g = model.programs[0].spec.gates[0]
        model.programs[0].spec.gates = [dataclasses.replace(g, interval=3)]
        return model
    alone = gated(dacc.load(path))
    ref = [alone(**kw, return_dict=False)[0] for kw in uncond]
    both = gated(dacc.load(path))
    got = []
    for a, b in zip(cond, uncond):
        with both.cache_context("cond"):
            both(**a)
        with both.cache_context("uncond"):
            got.append(both(**b, return_dict=False)[0])
    assert all(torch.equal(x, y) for x, y in zip(got, ref))
    assert both.stats()["segments_reused"] > 0


def test_decision_map_shows_what_ran(artifacts, compiled, tmp_path):
    c = compiled("flux")
    model = dacc.load(artifacts("flux", "scm"))
    model.programs[0].spec.gates[0] = dataclasses.replace(model.programs[0].spec.gates[0],
                                                       mask=[True, False, False, True, False, False, False, True])
    for kw in _steps(c.file.example_inputs()):
        model(**kw)
    path = tmp_path / "map.png"
    stats = model.stats(decision_map=path)
    assert "".join(d[0] for d in stats["decisions"]["default/program0"]) == "crrcrrrc"
    img = Image.open(path).convert("RGB")
    colors = {img.getpixel((x, y)) for x in range(img.width) for y in range(img.height)}
    assert COLORS["computed"] in colors and COLORS["reused"] in colors


def test_dbcache_without_a_middle_is_refused(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("cache: {strategy: dbcache, options: {Fn: 2, Bn: 2}}\n")
    with pytest.raises(DaccError, match="Fn=2 \\+ Bn=2 leaves no block to cache: the model has 4 blocks"):
        compile_model(model_file("flux"), plan, tmp_path / "x.dacc", log=lambda m: None,
                      traced=shared_trace(model_file("flux")))
    assert not (tmp_path / "x.dacc").exists()


def test_teacache_without_rescale_needs_sample(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("cache: {strategy: teacache, cache_ratio: 0.3}\n")
    with pytest.raises(DaccError, match="teacache calibration needs the model file to define sample"):
        compile_model(model_file("flux"), plan, tmp_path / "x.dacc", log=lambda m: None,
                      traced=shared_trace(model_file("flux")))
    assert list(tmp_path.iterdir()) == [plan]


def test_new_sizes_mid_generation_start_a_new_generation(compiled, tmp_path):
    """A gate that skips every step it may: after two steps at one size, a call at another size
    cannot reuse the old residual; it starts a new generation and computes, matching eager."""
    c = compiled("flux")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"num_inference_steps: {STEPS}\ncache: {{strategy: dbcache, options: {{threshold: 100.0}}}}\n")
    compile_model(model_file("flux"), plan, tmp_path / "a.dacc", verify=False, log=lambda m: None,
                  traced=shared_trace(model_file("flux")))
    model = dacc.load(tmp_path / "a.dacc")
    first, second = _steps(c.file.example_inputs(), n=3)[:2]
    model(**first)
    model(**second)
    assert model.stats()["segments_reused"] > 0  # the second step did skip
    other = c.file.more_example_inputs()[0]  # another batch and token count
    other = {**other, "timestep": torch.full_like(other["timestep"], 0.3)}  # lower t: no new generation by time
    with torch.no_grad():
        ref = c.model(**other, return_dict=False)[0]
    assert rel_err(model(**other, return_dict=False)[0], ref) < 1e-5
    assert model.stats()["generations"] == 2


def test_without_sample_the_ratio_maps_through_the_fixed_defaults_and_says_so(tmp_path):
    said = []
    (tmp_path / "plan.yaml").write_text("num_inference_steps: 6\ncache: {strategy: dbcache, cache_ratio: 0.5}\n")
    manifest = compile_model(model_file("flux"), tmp_path / "plan.yaml", tmp_path / "a.dacc", verify=False,
                             log=said.append, traced=shared_trace(model_file("flux")))
    gate = manifest.programs[0].gates[0]
    assert any("has no sample()" in line and "fixed defaults" in line for line in said)
    assert gate.threshold == THRESHOLD_PER_RATIO["dbcache"] * 0.5 and "ratio_map" not in gate.calibration
