"""The invariant checker catches broken segmentations (it runs after every pass)."""
from __future__ import annotations

import pytest
import torch

from dacc.compiler.invariants import InvariantError, check_invariants
from dacc.compiler.ir import ProgramIR
from dacc.compiler.model_file import load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import PIPELINE
from dacc.compiler.trace import export_program
from dacc.models import model_file
from dacc.schema.plan import Plan


@pytest.fixture
def ir():
    mf = load_model_file(model_file("dit"))
    ir = ProgramIR(export_program(mf.build(), mf.example_inputs(), None, "dit"))
    run_pipeline(ir, Plan(), PIPELINE, check_invariants)
    return ir


def _relabel(ir, node, segment):
    info = ir.info(node)
    info.segment = segment
    ir.set_info(node, info)


def test_a_clean_pipeline_is_checked_after_every_pass():
    mf = load_model_file(model_file("dit"))
    ir = ProgramIR(export_program(mf.build(), mf.example_inputs(), None, "dit"))
    checked = []

    def check(ir, after):
        check_invariants(ir, after)  # raises on a broken graph
        checked.append(after)
    run_pipeline(ir, Plan(), PIPELINE, check)
    assert checked == ["export"] + [p.name for p in PIPELINE]
    order = list(dict.fromkeys(ir.info(n).segment for n in ir.compute_nodes()))
    assert order == ["prologue", "transformer_blocks.0", "transformer_blocks.1", "epilogue"]


def test_non_contiguous_segment(ir):
    nodes = [n for n in ir.compute_nodes() if ir.info(n).segment == "transformer_blocks.1"]
    _relabel(ir, nodes[len(nodes) // 2], "transformer_blocks.0")
    with pytest.raises(InvariantError, match="after pass 'test'.*not contiguous"):
        check_invariants(ir, "test")


def test_reading_from_a_later_segment(ir):
    """Moving a value's producer into a later segment than its reader shows as a split segment:
    fx lists nodes after their inputs, so contiguity is what rules such reads out."""
    first = next(n for n in ir.compute_nodes() if ir.info(n).segment == "transformer_blocks.0" and n.users)
    for node in ir.compute_nodes():  # move everything up to and including `first` into block 1's slot
        if ir.info(node).segment == "prologue":
            continue
        _relabel(ir, node, "epilogue" if node is first else ir.info(node).segment)
        if node is first:
            break
    with pytest.raises(InvariantError, match="segment 'epilogue' is not contiguous"):
        check_invariants(ir, "test")


def test_unsegmented_node(ir):
    _relabel(ir, ir.compute_nodes()[5], None)
    with pytest.raises(InvariantError, match="has no segment"):
        check_invariants(ir, "test")


def test_a_cache_gate_naming_a_value_no_longer_in_the_graph():
    """A rewrite after the cache passes (quantize_linears replaces linears, some of them the gate's
    streams) must carry the gate's names over: `ProgramIR.replace_node` does, and the checker
    catches a rewrite that does not."""
    import yaml

    from dacc.schema.plan import parse_plan

    mf = load_model_file(model_file("flux"))
    ir = ProgramIR(export_program(mf.build(), mf.example_inputs(), None, "flux"))
    plan = parse_plan(yaml.safe_load("cache: {strategy: dbcache}\nquantize: {mode: int8_dynamic}"))
    run_pipeline(ir, plan, PIPELINE, check_invariants)
    (gate,) = ir.cache_gates
    names = {n.name for n in ir.graph.nodes}
    assert gate.reads() <= names and set(gate.stream_out) <= names
    # the probe's base is the streams entering block 0: x_embedder's output, rewritten by quantize_linears
    producers = {n.name: n for n in ir.graph.nodes}
    assert producers[gate.probe_base[0]].target == torch.ops.dacc.linear_int8_weight.default
    gate.probe_base[0] = "linear"  # the name it had before the rewrite
    with pytest.raises(InvariantError, match="cache gate reads values no longer in the graph: linear"):
        check_invariants(ir, "test")
