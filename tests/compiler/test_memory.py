"""The memory model (dacc/compiler/memory.py, dacc/memory_map.py) against what a run holds."""
from __future__ import annotations

import pytest
import torch

import dacc
from dacc.memory_map import memory_map
from dacc.schema.errors import DaccError
from dacc.schema.expr import NUMBER, evaluate
from dacc.report import inspect_artifact
from tests.conftest import fresh_like


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_the_values_each_segment_hands_on_match_a_run_at_fresh_sizes(compiled, family):
    c = compiled(family)
    model = dacc.load(c.path)
    runner = model.programs[0]
    handed: dict[str, int] = {}
    run = runner.run_segment

    def spy(i, inputs):
        outs = run(i, inputs)
        handed[runner.spec.segments[i].name] = sum(o.numel() * o.element_size() for o in outs
                                                   if isinstance(o, torch.Tensor))
        return outs
    runner.run_segment = spy
    inputs = fresh_like(c.file.more_example_inputs()[0], seed=5)  # sizes the compile never used
    model(**inputs)
    env = {s.name: int(inputs[s.input].shape[s.dim]) for s in runner.spec.symbols}
    assert env != {s.name: runner.spec.example_shapes[s.input][s.dim] for s in runner.spec.symbols}
    for seg in runner.spec.segments:
        assert evaluate(seg.value_bytes_tree, env, seg.name, NUMBER) == handed[seg.name], seg.name
        transient = evaluate(seg.transient_bytes_tree, env, seg.name, NUMBER)
        assert transient > 0  # every segment allocates something while it runs
    # the map accumulates the values of the call, segment by segment
    rows = memory_map(model.manifest, runner.spec, env)
    assert rows[-1].parts["values"] == sum(handed.values())
    held = [*model.parameters(), *model.buffers()]  # weights and tables such as rotary frequencies
    assert rows[0].parts["weights"] == sum(t.numel() * t.element_size() for t in held)


def test_inspect_memory_draws_the_map_and_refuses_unknown_sizes(compiled, tmp_path):
    c = compiled("flux")
    png = tmp_path / "memory.png"
    manifest = dacc.load(c.path).manifest
    tied = {"s1": 256, "s3": 256 + manifest.programs[0].example_shapes["encoder_hidden_states"][1] -
            manifest.programs[0].example_shapes["txt_ids"][0]}
    text = inspect_artifact(c.path, memory=True, at=tied, memory_png=png)
    assert "memory per rank at" in text and "s1=256" in text and png.stat().st_size > 1000
    with pytest.raises(DaccError, match="shape condition"):  # image ids no longer as many as the tokens
        inspect_artifact(c.path, memory=True, at={"s1": 256})
    with pytest.raises(DaccError, match="not symbols of program 0"):
        inspect_artifact(c.path, memory=True, at={"tokens": 256})
