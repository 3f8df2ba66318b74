"""The loaded artifact behaves like the transformer it replaces, and says clearly when it can't."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

import dacc
from dacc.schema.errors import DaccError
from tests.conftest import fresh_like, rel_err


@pytest.fixture(scope="module")
def flux(compiled):
    c = compiled("flux")
    return c, dacc.load(c.path)


def test_return_dict_and_tuple_like_the_original(flux):
    c, model = flux
    inputs = fresh_like(c.file.example_inputs(), seed=11)
    with torch.no_grad():
        ref_obj, ref_tuple = c.model(**inputs), c.model(**inputs, return_dict=False)
    out = model(**inputs)
    assert isinstance(out, Transformer2DModelOutput) and isinstance(ref_obj, Transformer2DModelOutput)
    assert rel_err(out.sample, ref_obj.sample) < 1e-5
    tup = model(**inputs, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(ref_tuple) == 1
    assert rel_err(tup[0], ref_tuple[0]) < 1e-5


def test_pipeline_facing_attributes(flux):
    c, model = flux
    assert model.config.in_channels == c.model.config.in_channels == 16
    assert model.config["num_layers"] == 2
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert isinstance(model, torch.nn.Module)


def test_new_weights_reach_the_segments(compiled):
    """Segments take their weights as arguments; loading new ones, copied or assigned, must reach
    them: the artifact then matches eager with the same new weights."""
    c = compiled("flux")
    inputs = fresh_like(c.file.example_inputs(), seed=12)
    prefix = "programs.0.weights."
    for assign in (False, True):
        model = dacc.load(c.path)
        g = torch.Generator().manual_seed(int(assign))
        state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()
                 if k.startswith(prefix) and v.is_floating_point()}
        model.load_state_dict(state, strict=False, assign=assign)
        eager = copy.deepcopy(c.model)
        eager.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=False)
        with torch.no_grad():
            want, before = eager(**inputs, return_dict=False)[0], c.model(**inputs, return_dict=False)[0]
        got = model(**inputs, return_dict=False)[0]
        assert rel_err(got, want) < 1e-5 and rel_err(got, before) > 1e-2


def test_none_valued_optional_arguments_are_accepted(flux):
    c, model = flux
    inputs = fresh_like(c.file.example_inputs(), seed=12)
    out = model(**inputs, guidance=None, joint_attention_kwargs=None, return_dict=False)[0]
    with torch.no_grad():
        assert rel_err(out, c.model(**inputs, return_dict=False)[0]) < 1e-5


@pytest.mark.parametrize("mutate, message", [
    (lambda kw: kw.pop("timestep"), "missing argument 'timestep'"),
    (lambda kw: kw.__setitem__("guidance", torch.ones(2)), "guidance were not part of the compiled call"),
    (lambda kw: kw.__setitem__("hidden_states", kw["hidden_states"].double()),
     "hidden_states has dtype torch.float64, the artifact was compiled for f32"),
    (lambda kw: kw.__setitem__("img_ids", kw["img_ids"][:-1]), r"shape condition Eq\(s1 \+ s2, s3 \+ s4\) does not hold"),
    (lambda kw: kw.__setitem__("hidden_states", kw["hidden_states"][..., :8]), "hidden_states dim 2 = 8, expected 16"),
])
def test_bad_calls_get_clear_errors(flux, mutate, message):
    c, model = flux
    inputs = fresh_like(c.file.example_inputs(), seed=13)
    mutate(inputs)
    with pytest.raises(DaccError, match=message):
        model(**inputs)


def test_positional_arguments_are_refused(flux):
    c, model = flux
    with pytest.raises(DaccError, match="keyword arguments"):
        model(c.file.example_inputs()["hidden_states"])


def test_pixart_constant_arguments_are_checked(compiled):
    c = compiled("pixart")
    model = dacc.load(c.path)
    inputs = fresh_like(c.file.example_inputs(), seed=14)
    with torch.no_grad():
        ref = c.model(**inputs, return_dict=False)[0]
    assert rel_err(model(**inputs).sample, ref) < 1e-5
    inputs.pop("added_cond_kwargs")  # traced as all-None: leaving it out means the same
    assert rel_err(model(**inputs).sample, ref) < 1e-5
    inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": "wide"}
    with pytest.raises(DaccError, match="added_cond_kwargs.aspect_ratio.*differs from the compiled value None"):
        model(**inputs)


def _generate(model, inputs, steps, context=None):
    for t in torch.linspace(1.0, 0.02, steps):
        kw = dict(inputs, timestep=t.expand(inputs["timestep"].shape).contiguous())
        if context is None:
            model(**kw)
        else:
            with model.cache_context(context):
                model(**kw)


def test_steps_generations_and_stats(compiled):
    c = compiled("flux")
    model = dacc.load(c.path)  # compiled with num_inference_steps = 50
    inputs = fresh_like(c.file.example_inputs(), seed=15)
    _generate(model, inputs, 5)
    _generate(model, inputs, 5)  # the timestep goes back up: a new generation
    s = model.stats()
    assert (s["calls"], s["steps"], s["generations"]) == (10, 10, 2)
    segments = len(c.manifest.programs[0].segments)
    assert s["segments_computed"] == 10 * segments and s["segments_reused"] == 0
    assert s["flops_saved"] == 0 and s["flops_total"] == s["flops_computed"] > 0
    model.reset()
    assert model.stats()["calls"] == 0


def test_cache_contexts_keep_separate_step_counts(compiled):
    c = compiled("flux")
    model = dacc.load(c.path)
    inputs = fresh_like(c.file.example_inputs(), seed=16)
    for t in torch.linspace(1.0, 0.1, 4):
        kw = dict(inputs, timestep=t.expand(2).contiguous())
        with model.cache_context("cond"):
            model(**kw)
        with model.cache_context("uncond"):
            model(**kw)
    s = model.stats()
    assert s["contexts"] == ["cond", "uncond"]
    assert (s["calls"], s["steps"], s["generations"]) == (8, 8, 2)
    assert model._counters["cond"].step == model._counters["uncond"].step == 3


def test_moving_the_artifact_moves_the_graph_constants(compiled):
    """torch.export records the trace device in factory calls (arange(..., device=cpu)); .to()
    must retarget them along with the weights."""
    c = compiled("flux")
    model = dacc.load(c.path)
    traced_devices = [n for r in model.programs for seg in r.segments for n in seg.graph.nodes
                      if n.kwargs.get("device") == torch.device("cpu")]
    assert traced_devices
    model.to("meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    for r in model.programs:
        for seg in r.segments:
            for n in seg.graph.nodes:
                assert torch.device("cpu") not in list(n.kwargs.values()) + list(n.args), n.format_node()
    spec = model.programs[0].spec.segments[0]
    inputs = {k: v.to("meta") for k, v in c.file.example_inputs().items()}
    outs = model.programs[0].run_segment(0, [inputs[name] for name in spec.inputs])
    assert all(o.device.type == "meta" for o in outs if isinstance(o, torch.Tensor))


def test_a_wrong_rank_is_reported_as_one(flux):
    c, model = flux
    inputs = fresh_like(c.file.example_inputs(), seed=14)
    inputs["hidden_states"] = inputs["hidden_states"][0]  # batch dim dropped
    with pytest.raises(DaccError, match=r"hidden_states has 2 dims .* expected 3 \[s0, s1, 16\].*"
                                        r"Fix: pass the inputs with the structure of example_inputs"):
        model(**inputs)


def test_a_wrong_dtype_gets_a_dtype_fix(flux):
    c, model = flux
    inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in fresh_like(c.file.example_inputs(), 15).items()}
    with pytest.raises(DaccError, match=r"compiled for f32.*Fix: cast the inputs to the dtype the artifact was "
                                        r"compiled for \(f32"):
        model(**inputs)


@pytest.mark.parametrize("convert", [lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.float16),
                                     lambda m: m.half(), lambda m: m.double(), lambda m: m.bfloat16()])
def test_converting_the_dtype_is_refused_and_changes_nothing(compiled, convert):
    model = dacc.load(compiled("flux").path)
    with pytest.raises(DaccError, match="compiled for torch.float32 and serves only that dtype"):
        convert(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.to(torch.float32) is model and model.to("cpu") is model  # same dtype or device only: fine
