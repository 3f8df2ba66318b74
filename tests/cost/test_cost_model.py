"""The cost model (dacc/compiler/memory.py, dacc/cost/) against what a run holds and counts."""
from __future__ import annotations

import operator
from dataclasses import replace

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

import dacc
from dacc.compiler.memory import VIEWS
from dacc.cost.devices import DeviceProfile
from dacc.cost.memory_map import COLORS, memory_map
from dacc.cost.sizes import sizes_at
from dacc.cost.step_time import step_time, total_seconds
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
    assert "memory per rank at" in text and "s1=256" in text
    # the picture is the map: one bar per segment, as long as its total against the peak's
    from PIL import Image

    rows = memory_map(manifest, manifest.programs[0], sizes_at(manifest.programs[0], tied, "test"))
    image = Image.open(png).convert("RGB")
    assert image.height == 40 + len(rows) * 18 + 50
    colors = {tuple(c) for c in COLORS.values()}
    peak = max(r.total for r in rows)
    for k, r in enumerate(rows):
        middle = 40 + k * 18 + 7
        drawn = sum(image.getpixel((x, middle)) in colors for x in range(230, 230 + 560 + 1))
        assert abs(drawn - 560 * r.total / peak) <= 3, (r.segment, drawn, 560 * r.total / peak)
    with pytest.raises(DaccError, match="shape condition"):  # image ids no longer as many as the tokens
        inspect_artifact(c.path, memory=True, at={"s1": 256})
    with pytest.raises(DaccError, match="not symbols of the program"):
        inspect_artifact(c.path, memory=True, at={"tokens": 256})


aten = torch.ops.aten
FLOP_OPS = {aten.linear.default, aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default,
            aten.scaled_dot_product_attention.default}
# round rates, so each term is a count divided by a power of ten
ROUND = DeviceProfile("round", matmul_flops=1e9, memory_bandwidth=1e8, memory_bytes=1e12, link_bandwidth=1e7,
                      link_latency=1e-3, op_overhead=1e-5, async_dispatch=False, source="test")


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class Traffic(torch.fx.Interpreter):
    """Bytes written and read by the ops that count no FLOPs, at the sizes of this run."""
    moved = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target not in FLOP_OPS | VIEWS and n.target is not operator.getitem:
            self.moved += _nbytes(out) + sum(_nbytes(self.env[i]) for i in n.all_input_nodes)
        return out


def _attention_flops(prog, segment: str, env: dict, batch: int) -> int:
    """FlopCounterMode does not count attention on CPU: add 4·B·H·D·q·kv per site, from its shapes."""
    symbols = {k: sympy.Symbol(k, integer=True, positive=True) for k in env}
    subs = {symbols[k]: v for k, v in env.items()}

    def size(text: str) -> int:
        return int(sympy.sympify(text, locals=symbols).subs(subs))
    return sum(4 * batch * a.heads * a.head_dim * size(a.q_len) * size(a.kv_len)
               for a in prog.attention if a.segment == segment)


def test_the_predicted_step_divides_what_each_segment_counts_by_the_device_rates(compiled):
    """At sizes the compile never saw: each segment's compute term is the matmul FLOPs
    FlopCounterMode counts in it (plus attention) over the rate, its memory term the weights and
    values it moves; on a CPU the terms add up, on a GPU dispatch hides under device time."""
    c = compiled("flux")
    model = dacc.load(c.path)
    runner = model.programs[0]
    counted: dict[str, int] = {}
    moved: dict[str, int] = {}
    run = runner.run_segment

    def spy(i, inputs):
        with FlopCounterMode(display=False) as counter:
            outs = run(i, inputs)
        counted[runner.spec.segments[i].name] = counter.get_total_flops()
        traffic = Traffic(runner.segments[i])
        traffic.run(*inputs, *runner._weights[i])
        moved[runner.spec.segments[i].name] = traffic.moved
        return outs
    runner.run_segment = spy
    inputs = fresh_like(c.file.more_example_inputs()[0], seed=9)
    with torch.no_grad():
        model(**inputs)
    env = {s.name: int(inputs[s.input].shape[s.dim]) for s in runner.spec.symbols}
    batch = inputs["hidden_states"].shape[0]
    rows = step_time(model.manifest, runner.spec, env, ROUND)
    gpu = step_time(model.manifest, runner.spec, env, replace(ROUND, async_dispatch=True))
    for row, fast, seg in zip(rows, gpu, runner.spec.segments):
        flops = counted[seg.name] + _attention_flops(runner.spec, seg.name, env, batch)
        assert row.compute == pytest.approx(flops / 1e9, rel=1e-12), seg.name
        assert row.weights == pytest.approx(seg.param_bytes / 1e8, rel=1e-12)
        assert row.traffic == pytest.approx(moved[seg.name] / 1e8, rel=1e-12) and row.traffic > 0, seg.name
        assert row.comm == row.gather == 0  # one process: nothing crosses a link
        device = max(row.compute, row.weights) + row.traffic
        assert row.total == pytest.approx(device + seg.num_nodes * 1e-5)
        assert fast.total == pytest.approx(max(device, seg.num_nodes * 1e-5))
    assert total_seconds(rows) > total_seconds(gpu) > 0
