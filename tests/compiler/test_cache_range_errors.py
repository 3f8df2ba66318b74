"""A block output read after a gated range that is not a residual stream: the error names the
value and, for the strategy in use, the knobs that can move the range."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR, Traced
from dacc.compiler.passes import run_pipeline
from dacc.compiler.pipeline import PIPELINE
from dacc.compiler.trace import export_program
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, h):
        q = self.proj(h).unflatten(-1, (2, 4)).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
        return h + a, a.mean(1)  # the second value is a summary, not a stream


class SideOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

    def forward(self, hidden_states):
        side = []
        for block in self.blocks:
            hidden_states, summary = block(hidden_states)
            side.append(summary)
        return hidden_states + side[1].unsqueeze(1)  # block 1's summary is read after every block


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    return export_program(SideOutput(), {"hidden_states": torch.randn(2, 5, 8)}, None, "toy")


@pytest.mark.parametrize("strategy, options, knobs", [
    ("dbcache", "{Fn: 1, Bn: 0}", "choose Fn/Bn in cache.options so that blocks.1 falls outside"),
    ("taylorseer", "{order: 1}", "taylorseer forecasts every block at once and has no knob that moves its range"),
])
def test_non_stream_output_names_the_value_and_the_strategys_knobs(traced, strategy, options, knobs):
    plan = parse_plan(yaml.safe_load(f"cache: {{strategy: {strategy}, options: {options}}}"))
    ir = ProgramIR(Traced(copy.deepcopy(traced.ep), traced.example, traced.inputs))  # the passes rewrite it
    with pytest.raises(DaccError, match=rf"{strategy} cannot cache .* of blocks\.1 is read after") as e:
        run_pipeline(ir, plan, PIPELINE, check_invariants)
    assert knobs in str(e.value)
    if strategy == "taylorseer":
        assert "Fn/Bn in cache.options" not in str(e.value)
