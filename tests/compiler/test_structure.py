"""Structure recovered from the traced graph: blocks, residual streams, attention sites, FLOPs."""
from __future__ import annotations

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode

from dacc.models import FAMILIES
from dacc.cost.sizes import example_symbols
from dacc.schema.expr import evaluate


def _blocks(program):
    return [s for s in program.segments if s.kind == "block"]


def test_flux_two_block_lists_two_streams(compiled):
    p = compiled("flux").manifest.programs[0]
    assert [s.name for s in p.segments] == ["prologue", "transformer_blocks.0", "transformer_blocks.1",
                                            "single_transformer_blocks.0", "single_transformer_blocks.1", "epilogue"]
    blocks = _blocks(p)
    assert [b.block_index for b in blocks] == [0, 1, 2, 3]
    assert {b.block_list for b in blocks} == {"transformer_blocks", "single_transformer_blocks"}
    for prev, nxt in zip(blocks[:3], blocks[1:4]):
        assert len(prev.stream_outputs) == 2
        assert set(nxt.stream_inputs) <= set(prev.stream_outputs)  # streams chain block to block
        assert set(prev.stream_outputs) <= set(nxt.inputs)
    # the last block only hands the image stream to the epilogue
    assert len(blocks[-1].stream_outputs) == 1
    assert len(p.attention) == 4 and not any(a.cross for a in p.attention)
    assert all(a.heads == 2 and a.head_dim == 16 and a.q_len == "s1 + s2" for a in p.attention)
    assert len(p.linears) == 48


def test_sd3_last_block_keeps_only_the_image_stream(compiled):
    blocks = _blocks(compiled("sd3").manifest.programs[0])
    assert [len(b.stream_outputs) for b in blocks] == [2, 2, 1]


@pytest.mark.parametrize("family", ["pixart", "wan"])
def test_cross_attention_is_told_apart_from_self_attention(compiled, family):
    p = compiled(family).manifest.programs[0]
    per_block = {}
    for a in p.attention:
        per_block.setdefault(a.segment, []).append(a.cross)
    assert all(sorted(v) == [False, True] for v in per_block.values()) and len(per_block) == 2
    cross = next(a for a in p.attention if a.cross)
    assert cross.kv_len != cross.q_len


@pytest.mark.parametrize("family", FAMILIES)
def test_segment_flops_match_the_flop_counter(compiled, family):
    """Symbolic FLOPs at the example shape = torch's FlopCounterMode on eager (which does not count
    attention on CPU, so attention FLOPs are added from the recorded attention sites)."""
    c = compiled(family)
    program = c.manifest.programs[0]
    env = example_symbols(program)
    total = sum(evaluate(s.flops_tree, env) for s in program.segments)
    batch = c.file.example_inputs()["hidden_states"].shape[0]
    subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in env.items()}
    attention = sum(4 * batch * a.heads * a.head_dim * int(sympy.sympify(a.q_len, locals={k: s for k, s in zip(env, subs)}).subs(subs))
                    * int(sympy.sympify(a.kv_len, locals={k: s for k, s in zip(env, subs)}).subs(subs))
                    for a in program.attention)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        c.model(**c.file.example_inputs())
    assert total - attention == counter.get_total_flops()
    assert attention > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_parameter_is_counted_once(compiled, family):
    c = compiled(family)
    program = c.manifest.programs[0]
    total = sum(p.numel() * p.element_size() for p in c.model.parameters())
    assert sum(s.param_bytes for s in program.segments) >= total  # every parameter is read by some segment
    for seg in _blocks(program):  # a block reads exactly its own module's weights, each counted once
        own = c.model.get_submodule(seg.name)
        assert seg.param_bytes == sum(t.numel() * t.element_size() for t in [*own.parameters(), *own.buffers()])
    assert all(s.param_bytes > 0 for s in _blocks(program))
