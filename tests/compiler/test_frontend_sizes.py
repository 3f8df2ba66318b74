"""The frontend on toy models (fast): sizes derived from other sizes, data-dependent sizes and
branches, and passes that must not guard on symbolic sizes."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from dacc.compiler.ir import ProgramIR
from dacc.compiler.trace import export_program
from dacc.passes.remove_identity_ops import remove_identity_ops
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan


class TableModel(torch.nn.Module):
    """Like Stable Audio: a per-token table with one row more than there are tokens."""

    def forward(self, x, table):
        return x + table[1:]


class LengthModel(torch.nn.Module):
    """Like Lumina2: a Python decision on lengths read from a mask."""

    def forward(self, x, mask):
        lengths = mask.sum(1).tolist()
        return x * 2 if len(set(lengths)) > 1 else x


class NonzeroModel(torch.nn.Module):
    """Like Mochi: keeps the tokens a mask selects, so a size depends on tensor values."""

    def forward(self, x, mask):
        kept = x[:, torch.nonzero(mask[0]).flatten()]
        return kept[:, :].contiguous() * 2


def _shapes(traced) -> dict[str, list[str]]:
    ir = ProgramIR(traced)
    nodes = {n.name: n for n in ir.graph.nodes}
    return {spec.path: [str(d) for d in ir.shape(nodes[name])]
            for spec, name in zip(traced.inputs, ir.user_inputs) if spec.kind == "tensor"}


def test_a_derived_size_is_traced_again_as_static_and_the_rest_stays_dynamic():
    traced = export_program(TableModel(), dict(x=torch.randn(3, 5, 4), table=torch.randn(6, 4)), None, "toy")
    shapes = _shapes(traced)
    assert shapes["table"] == ["6", "s1"] and shapes["x"] == ["s0", "5", "s1"]
    assert any("input 'table' dim 0 has size x.shape[1] + 1" in n for n in traced.notes)
    x, table = torch.randn(7, 5, 4), torch.randn(6, 4)  # another batch size: still one program
    assert torch.equal(traced.ep.module()(x=x, table=table), x + table[1:])


def test_a_derived_size_in_user_dynamic_shapes_is_an_error_whose_fix_works():
    inputs = dict(x=torch.randn(3, 5, 4), table=torch.randn(6, 4))
    tokens = Dim("tokens")
    with pytest.raises(DaccError, match=r"input 'table' dim 0 has size x\.shape\[1\] \+ 1.*declare 'table' dim 0 "
                                        r"static \(None\) and use Dim\.AUTO"):
        export_program(TableModel(), inputs, {"x": (Dim.AUTO, tokens, None), "table": (tokens + 1, None)}, "toy")
    fixed = export_program(TableModel(), inputs, {"x": (Dim.AUTO, Dim.AUTO, None), "table": (None, None)}, "toy")
    assert _shapes(fixed)["table"] == ["6", "4"]


def test_a_python_decision_on_tensor_values_names_where_the_value_was_read():
    inputs = dict(x=torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(DaccError, match=r"read from tensor data at .*test_frontend_sizes\.py:\d+: "
                                        r"lengths = mask\.sum\(1\)\.tolist\(\).*no dynamic_shapes\(\) setting helps"):
        export_program(LengthModel(), inputs, None, "toy")


def test_identity_ops_on_data_dependent_sizes_are_removed_without_guards():
    inputs = dict(x=torch.randn(2, 5, 4), mask=torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]))
    ir = ProgramIR(export_program(NonzeroModel(), inputs, None, "toy"))
    env = ir.shape_env()
    guards = len(env.guards)
    slices = sum(n.target is torch.ops.aten.slice.Tensor for n in ir.graph.nodes)
    result = remove_identity_ops(ir, Plan())
    assert result.modified and len(env.guards) == guards  # nothing learned about any size
    assert sum(n.target is torch.ops.aten.slice.Tensor for n in ir.graph.nodes) < slices
    ir.ep.graph_module.recompile()
    assert torch.equal(ir.ep.module()(**inputs), NonzeroModel()(**inputs))
