"""The families of dacc.models.MORE_FAMILIES: each compiles with the empty plan and matches eager on
fresh random inputs; Chroma, HunyuanDiT and CogView3Plus run dbcache, Chroma taylorseer. A
skipped step is checked against a reference of the cache semantics built on the eager model:
blocks in the gated range act as the identity on their streams (what the model computes between
them still runs) and the last one adds the residual of the last computed step(s)."""
from __future__ import annotations

import pytest
import torch

import dacc
from dacc.compiler.compile import compile_model
from dacc.compiler.trace import export_program
from dacc.models import MORE_FAMILIES, model_file
from dacc.schema.errors import DaccError
from tests.conftest import fresh_like, rel_err, shared_trace

PROGRAMS = {"hunyuan_dit": 1, "stable_audio": 1, "mochi": 1, "chroma": 1, "lumina2": 1, "cogview3plus": 1}
STEPS = 4


@pytest.fixture(scope="module")
def traced():
    """One trace per family, shared by every plan compiled from it."""
    return lambda family: shared_trace(model_file(family))


@pytest.fixture(scope="module")
def artifact(traced, tmp_path_factory):
    """(family, plan text) -> loaded artifact path; no compile-time verification (the tests
    compare with eager on fresh inputs themselves)."""
    cache = {}

    def get(family: str, plan: str | None = None):
        if (family, plan) not in cache:
            root = tmp_path_factory.mktemp(family)
            plan_path = None
            if plan is not None:
                plan_path = root / "plan.yaml"
                plan_path.write_text(f"num_inference_steps: {STEPS}\ncache: {plan}\n")
            compile_model(model_file(family), plan_path, root / "a.dacc", verify=False, log=lambda m: None,
                          traced=traced(family))
            cache[family, plan] = root / "a.dacc"
        return cache[family, plan]
    return get


def _reference_model(t):
    """The eager model to compare with: Lumina2's model file builds a traceable layout of the
    diffusers class, whose eager original is the reference."""
    return getattr(t.file.module, "build_original", lambda: t.model)()


def _fresh(t, example: dict, seed: int) -> dict:
    inputs = fresh_like(example, seed)
    if "caption_mask" in vars(t.file.module):  # Lumina2: right-padded prompts of different lengths
        batch = inputs["encoder_attention_mask"].shape[0]
        inputs["encoder_attention_mask"] = t.file.module.caption_mask([6 - k % 3 for k in range(batch)])
    return inputs


# `make test` keeps Chroma and CogView3Plus (the cache tests below use them too); all run in `make test-all`
SLOW_FAMILIES = ("stable_audio", "mochi", "lumina2", "hunyuan_dit")


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES else f
                                    for f in MORE_FAMILIES])
def test_empty_plan_matches_eager_on_fresh_inputs(traced, artifact, family):
    t = traced(family)
    model, reference = dacc.load(artifact(family)), _reference_model(t)
    assert len(model.manifest.programs) == PROGRAMS[family]
    for i, example in enumerate(t.examples):
        inputs = _fresh(t, example, seed=100 + i)
        with torch.no_grad():
            ref = reference(**inputs, return_dict=False)[0]
        got = model(**inputs, return_dict=False)[0]
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= 1e-5, f"{family} example {i}"


@pytest.mark.slow
def test_derived_input_sizes_are_static_and_the_rest_dynamic(artifact):
    """Stable Audio's rotary table has tokens + 1 rows: that dim (and the token count it fixes) is
    static, the batch stays one symbol shared by every input."""
    shapes = {i.path: i.shape for i in dacc.load(artifact("stable_audio")).manifest.programs[0].inputs}
    assert shapes["rotary_embedding.0"][0] == "17" and shapes["hidden_states"][2] == "16"
    assert shapes["hidden_states"][0] == shapes["encoder_hidden_states"][0] == "s0"


@pytest.mark.slow
def test_lumina2_as_diffusers_writes_it_names_the_data_dependent_line(traced):
    t = traced("lumina2")
    with pytest.raises(DaccError, match=r"transformer_lumina2\.py:\d+: l_effective_cap_len = .*tolist\(\)") as e:
        export_program(t.file.module.build_original(), t.examples[0], None, "lumina2")
    assert "no dynamic_shapes() setting helps" in str(e.value)


# -- cache plans -------------------------------------------------------------------------------

def _streams(args, kwargs) -> list[torch.Tensor]:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return [x for x in (hidden, kwargs.get("encoder_hidden_states")) if isinstance(x, torch.Tensor)]


def _identity(args, kwargs, out):
    """The block's outputs as if it were the identity: each output is the stream input of its shape."""
    outs = out if isinstance(out, tuple) else (out,)
    same = tuple(next(s for s in _streams(args, kwargs) if s.shape == o.shape) for o in outs)
    return same if isinstance(out, tuple) else same[0]


def _run(model, inputs: dict, blocks: list[str], residual=None, identity: bool = True):
    """Eager output and the last gated block's output. With `identity`, the gated blocks act as
    the identity on their streams and the last adds `residual` (when given)."""
    seen = {}

    def hook(name):
        def f(module, args, kwargs, out):
            if identity:
                out = _identity(args, kwargs, out)
                if name == blocks[-1] and residual is not None:
                    out = tuple(o + r for o, r in zip(out, residual)) if isinstance(out, tuple) else out + residual[0]
            if name == blocks[-1]:
                seen["last"] = out if isinstance(out, tuple) else (out,)
            return out
        return f
    handles = [model.get_submodule(b).register_forward_hook(hook(b), with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return out, seen["last"]


def _residual(model, inputs: dict, blocks: list[str]) -> list[torch.Tensor]:
    """Last gated block's output minus its value with every gated block the identity."""
    _, out = _run(model, inputs, blocks, identity=False)
    _, base = _run(model, inputs, blocks)
    return [o - b for o, b in zip(out, base)]


def _gated_blocks(model) -> list[str]:
    spec = model.manifest.programs[0]
    return [s.name for s in spec.segments[spec.gates[0].skip_first:spec.gates[0].skip_last + 1] if s.kind == "block"]


def _steps(example: dict, n: int) -> list[dict]:
    """n denoising steps: falling timesteps (same dtype), drifting latents."""
    out = []
    for i in range(n):
        kw = dict(example)
        t = example["timestep"]
        kw["timestep"] = (t * (1 - 0.1 * i)).to(t.dtype) if t.is_floating_point() else t - 20 * i
        kw["hidden_states"] = example["hidden_states"] * (1 - 0.02 * i)
        out.append(kw)
    return out


DBCACHE_FAMILIES = ["chroma", pytest.param("hunyuan_dit", marks=pytest.mark.slow), "cogview3plus"]


@pytest.mark.parametrize("family", DBCACHE_FAMILIES)
def test_dbcache_that_never_skips_equals_eager(traced, artifact, family):
    t = traced(family)
    model = dacc.load(artifact(family, "{strategy: dbcache, cache_ratio: 0.0}"))
    for kw in _steps(t.examples[0], STEPS):
        with torch.no_grad():
            ref = t.model(**kw, return_dict=False)[0]
        assert rel_err(model(**kw, return_dict=False)[0], ref) <= 1e-6
    assert model.stats()["segments_reused"] == 0


@pytest.mark.parametrize("family", DBCACHE_FAMILIES)
def test_dbcache_skip_adds_the_cached_residual(traced, artifact, family):
    """Step 1 skips (threshold far above any change): its output is step 1's eager computation
    with the gated blocks replaced by step 0's residual, not step 1's eager output."""
    t = traced(family)
    model = dacc.load(artifact(family, "{strategy: dbcache, options: {threshold: 1.0e9}}"))
    blocks = _gated_blocks(model)
    x0, x1 = _steps(t.examples[0], 2)
    model(**x0)
    got = model(**x1, return_dict=False)[0]
    stats = model.stats()
    assert stats["segments_reused"] > 0 and stats["decisions"]["default/program0"] == ["computed", "reused"]
    reference, _ = _run(t.model, x1, blocks, residual=_residual(t.model, x0, blocks))
    with torch.no_grad():
        eager = t.model(**x1, return_dict=False)[0]
    assert rel_err(got, reference) <= 1e-5
    assert rel_err(got, eager) > 1e-4  # the skip really changed something


def test_chroma_taylorseer_reuses_then_forecasts_across_the_text_image_concatenation(traced, artifact):
    """interval 2, order 1: steps 0 and 2 compute; step 1 reuses step 0's residual (one point of
    history); step 3 extrapolates linearly from steps 0 and 2. Every block is gated, including
    the concatenation of text and image between the double and single blocks."""
    t = traced("chroma")
    model = dacc.load(artifact("chroma", "{strategy: taylorseer, options: {order: 1, interval: 2}}"))
    blocks = _gated_blocks(model)
    assert blocks[0] == "transformer_blocks.0" and blocks[-1].startswith("single_transformer_blocks")
    steps = _steps(t.examples[0], 4)
    got = [model(**kw, return_dict=False)[0] for kw in steps]
    assert model.stats()["decisions"]["default/program0"] == ["computed", "reused", "computed", "forecast"]
    r0, r2 = _residual(t.model, steps[0], blocks), _residual(t.model, steps[2], blocks)
    expected = {1: r0, 3: [b + (b - a) / 2 for a, b in zip(r0, r2)]}
    for i, kw in enumerate(steps):
        if i in expected:
            ref, _ = _run(t.model, kw, blocks, residual=expected[i])
        else:
            with torch.no_grad():
                ref = t.model(**kw, return_dict=False)[0]
        assert rel_err(got[i], ref) <= 1e-5, f"step {i}"


def test_a_new_resolution_mid_generation_computes_instead_of_comparing_across_sizes(traced, artifact):
    """The dynamic program serves both example resolutions; a step at the other one cannot reuse
    (or compare with) what was cached at the first, so the gate starts over and computes."""
    t = traced("chroma")
    model = dacc.load(artifact("chroma", "{strategy: dbcache, options: {threshold: 1.0e9}}"))
    first, other = t.examples[0], dict(t.examples[1])
    other["timestep"] = first["timestep"] * 0.9  # the next step of the same generation
    model(**first)
    got = model(**other, return_dict=False)[0]
    with torch.no_grad():
        ref = t.model(**other, return_dict=False)[0]
    assert rel_err(got, ref) <= 1e-6 and model.stats()["segments_reused"] == 0
