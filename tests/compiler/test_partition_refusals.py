"""Sequence parallelism refuses, at compile time, blocks whose results would depend on how the
tokens are split: a reduction over the token dim sees only each rank's share."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.export import Dim

from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR, Traced
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import PIPELINE
from dacc.compiler.trace import export_program
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan


class Block(torch.nn.Module):
    def __init__(self, pool: bool):
        super().__init__()
        self.proj, self.pool = torch.nn.Linear(8, 8), pool

    def forward(self, h):
        q = self.proj(h).unflatten(-1, (2, 4)).transpose(1, 2)
        h = h + F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
        return h - h.mean(1, keepdim=True) if self.pool else h  # a mean over every token


class Toy(torch.nn.Module):
    def __init__(self, pool: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(pool and i == 1) for i in range(3))

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def _traced(pool: bool) -> Traced:
    torch.manual_seed(0)
    return export_program(Toy(pool), {"hidden_states": torch.randn(2, 6, 8)},
                          {"hidden_states": {1: Dim("tokens", min=2, max=64)}}, "toy")


@pytest.mark.parametrize("degrees", ["{ulysses: 2}", "{ring: 2}"])
def test_a_mean_over_tokens_in_a_block_is_refused_naming_the_op(degrees):
    plan = parse_plan(yaml.safe_load(f"parallel: {degrees}"))
    pooled = _traced(True)
    with pytest.raises(DaccError, match=r"reduces over the token dim .* in segment blocks\.1|"
                                        r"in segment blocks\.1 reduces over the token dim") as e:
        run_pipeline(ProgramIR(Traced(copy.deepcopy(pooled.ep), pooled.example, pooled.inputs)), plan, PIPELINE,
                     check_invariants)
    assert "mean" in str(e.value) and "scaled_dot_product_attention" in str(e.value)
    plain = _traced(False)  # the same blocks without the mean are split (no epilogue: gathered at the output)
    ir = ProgramIR(Traced(copy.deepcopy(plain.ep), plain.example, plain.inputs))
    run_pipeline(ir, plan, PIPELINE, check_invariants)
    ops = [str(n.target) for n in ir.graph.nodes if n.op == "call_function"]
    exchange = "dacc.seq_to_heads.default" if "ulysses" in degrees else "dacc.ring_attention.default"
    assert ops.count(exchange) == (9 if "ulysses" in degrees else 3)  # q, k, v at 3 sites / one ring per site
    assert ops.count("dacc.shard.default") == 1 and ops.count("dacc.gather.default") == 1


class GroupedBlock(torch.nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 12)

    def forward(self, h):
        q, kv = self.proj(h).split([8, 4], -1)
        q = q.unflatten(-1, (4, 2)).transpose(1, 2)
        k = v = kv.unflatten(-1, (2, 2)).transpose(1, 2)
        return h + F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).flatten(2)


class Grouped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(GroupedBlock() for _ in range(2))

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def test_grouped_heads_split_when_every_count_divides_and_are_refused_otherwise():
    torch.manual_seed(0)
    traced = export_program(Grouped(), {"hidden_states": torch.randn(2, 6, 8)},
                            {"hidden_states": {1: Dim("tokens", min=2, max=64)}}, "gqa")
    ir = ProgramIR(Traced(copy.deepcopy(traced.ep), traced.example, traced.inputs))
    run_pipeline(ir, parse_plan({"parallel": {"ulysses": 2}}), PIPELINE, check_invariants)  # 4 and 2 heads split
    assert sum(n.target is torch.ops.dacc.seq_to_heads.default for n in ir.graph.nodes) == 6
    ir = ProgramIR(Traced(copy.deepcopy(traced.ep), traced.example, traced.inputs))
    with pytest.raises(DaccError, match=r"head counts \[4, 2, 2\].*grouped heads must each be a multiple of 4"):
        run_pipeline(ir, parse_plan({"parallel": {"ulysses": 4}}), PIPELINE, check_invariants)
