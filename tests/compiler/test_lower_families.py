"""Every family in dacc/models/, lowered, against its unlowered artifact on fresh inputs at every
example shape (`make test-all`: about 20 minutes of package builds on two cores; the lowering
behaviour itself is tested on SD3 in test_lower.py within `make test`)."""
from __future__ import annotations

import pytest
import torch

import dacc
from dacc.compiler.compile import compile_model
from dacc.models import FAMILIES, MORE_FAMILIES, model_file
from tests.conftest import fresh_like, rel_err, shared_trace


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, *MORE_FAMILIES])
def test_lowered_family_matches_its_unlowered_artifact(family, tmp_path, monkeypatch):
    monkeypatch.setenv("DACC_CACHE_DIR", str(tmp_path / "cache"))
    plan = tmp_path / "plan.yaml"
    plan.write_text("num_inference_steps: 4\nlower: {backend: inductor, device: cpu}\n")
    traced = shared_trace(model_file(family))
    manifest = compile_model(model_file(family), plan, tmp_path / "a.dacc", log=lambda m: None, traced=traced)
    lowered = dacc.load(tmp_path / "a.dacc", allow_native_code=True)
    plain = dacc.load(tmp_path / "a.dacc", lowered="off")
    served = sum(len(p.segments) for p in manifest.lowering.packages)
    assert served == sum(r.lowered_segments for r in lowered.programs) > 0, manifest.lowering.unlowered
    for i, example in enumerate(traced.examples):
        x = fresh_like(example, seed=50 + i)
        want = [t for t in torch.utils._pytree.tree_leaves(plain(**x, return_dict=False)) if isinstance(t, torch.Tensor)]
        got = [t for t in torch.utils._pytree.tree_leaves(lowered(**x, return_dict=False)) if isinstance(t, torch.Tensor)]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-4, (family, i)
