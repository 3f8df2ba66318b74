"""Every family compiles with the empty plan, matches eager at two token counts from one artifact,
and its graph after every pass matches the golden text."""
from __future__ import annotations

import pytest
import torch

import dacc
from dacc.compiler.pipeline import PIPELINE
from dacc.models import FAMILIES
from dacc.schema.errors import DaccError
from tests.conftest import fresh_like, rel_err

PASS_NAMES = ["export"] + [p.name for p in PIPELINE]


def _sample(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_at_two_token_counts(compiled, family):
    c = compiled(family)
    model = dacc.load(c.path)
    examples = [c.file.example_inputs()] + c.file.more_example_inputs()
    token_counts = set()
    for i, example in enumerate(examples):
        inputs = fresh_like(example, seed=100 + i)  # not the values the compiler verified with
        with torch.no_grad():
            ref = c.model(**inputs, return_dict=False)[0]
        got = _sample(model(**inputs))
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5, f"{family} example {i}"
        token_counts.add(tuple(inputs["hidden_states"].shape[1:]))
    assert len(token_counts) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_goldens_for_every_pass(compiled, golden, family):
    """Each pass that rewrites the graph under the empty plan has a golden; the cache passes
    quantize and partition passes must leave it untouched (their goldens, with their plans, are
    in test_cache_passes.py, test_quantize.py and test_parallel.py), and neither the fsdp
    annotation nor lowering ever rewrites it."""
    c = compiled(family)
    previous = None
    for i, name in enumerate(PASS_NAMES):
        text = c.graphs[(0, i, name)]
        if name in ("hoist_cache_probe",) or name.startswith(("insert_", "apply_", "quantize_", "lower_")) \
                or name in ("split_cfg", "partition_attention", "partition_patches", "annotate_fsdp_units"):
            assert text == previous, f"{name} changed the graph under the empty plan"
        else:
            golden(f"{family}/{i:02d}_{name}.txt", text)
        previous = text


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_dynamic_families_serve_an_undeclared_shape_with_one_program(compiled, family):
    c = compiled(family)
    assert len(c.manifest.programs) == 1
    example = c.file.example_inputs()
    if family == "flux":
        from dacc.models.flux import _inputs
        inputs = _inputs(1 + 4, 5, 7, seed=9)
    else:
        inputs = fresh_like(example, seed=3)
        hs = inputs["hidden_states"]
        shape = list(hs.shape)
        shape[-1] += 4
        shape[-2] -= 2
        inputs["hidden_states"] = torch.randn(shape)
    with torch.no_grad():
        ref = c.model(**inputs, return_dict=False)[0]
    assert rel_err(_sample(dacc.load(c.path)(**inputs)), ref) < 1e-5


@pytest.mark.parametrize("family", ["pixart", "dit"])
def test_static_families_get_a_program_per_shape_and_refuse_others(compiled, family):
    c = compiled(family)
    assert len(c.manifest.programs) == 2
    inputs = fresh_like(c.file.example_inputs(), seed=4)
    inputs["hidden_states"] = torch.randn(2, 4, 10, 10)
    with pytest.raises(DaccError, match="no compiled program accepts these inputs.*more_example_inputs"):
        dacc.load(c.path)(**inputs)
