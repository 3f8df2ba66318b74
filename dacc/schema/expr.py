"""Symbolic integer expressions as JSON trees: written from sympy by the compiler, evaluated by the
runtime with plain Python (no sympy, no eval of text from the artifact).

A tree is an int, `["sym", name]`, or `[op, *children]` with op one of the keys of `_OPS`.
"""
from __future__ import annotations

import math
import operator
from functools import reduce
from typing import Any

Tree = Any

_OPS = {
    "add": lambda *a: sum(a),
    "mul": lambda *a: reduce(operator.mul, a, 1),
    "pow": operator.pow,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "max": max,
    "min": min,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "and": lambda *a: all(a),
    "or": lambda *a: any(a),
    "not": operator.not_,
    "trunc": math.trunc,
    "tofloat": float,
    "floatpow": lambda a, b: float(a) ** b,
    "truediv": operator.truediv,
}


def evaluate(tree: Tree, env: dict[str, int]) -> Any:
    if isinstance(tree, (int, float, bool)):
        return tree
    op, *args = tree
    if op == "sym":
        return env[args[0]]
    return _OPS[op](*(evaluate(a, env) for a in args))


def to_tree(expr: Any) -> Tree:
    """sympy (including torch's FloorDiv/Mod/Max) -> tree. Raises ValueError on anything else."""
    import sympy
    from torch.utils._sympy import functions as tfn

    if isinstance(expr, (bool, int)):
        return expr
    if expr is sympy.true:
        return True
    if expr is sympy.false:
        return False
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Rational):
        return ["floordiv", int(expr.p), int(expr.q)] if expr.q != 1 else int(expr.p)
    if isinstance(expr, sympy.Float):
        return float(expr)
    if isinstance(expr, sympy.Symbol):
        return ["sym", expr.name]
    table = [(sympy.Add, "add"), (sympy.Mul, "mul"), (sympy.Pow, "pow"), (tfn.FloorDiv, "floordiv"),
             (tfn.PythonMod, "mod"), (tfn.Mod, "mod"), (sympy.Mod, "mod"), (sympy.Max, "max"), (sympy.Min, "min"),
             (tfn.Max, "max"), (tfn.Min, "min"),  # torch keeps its own Min/Max, not sympy's
             (sympy.Eq, "eq"), (sympy.Ne, "ne"), (sympy.StrictLessThan, "lt"), (sympy.LessThan, "le"),
             (sympy.StrictGreaterThan, "gt"), (sympy.GreaterThan, "ge"), (sympy.And, "and"), (sympy.Or, "or"),
             (sympy.Not, "not"), (tfn.TruncToInt, "trunc"), (tfn.ToFloat, "tofloat"), (tfn.FloatPow, "floatpow"),
             (tfn.FloatTrueDiv, "truediv"), (tfn.IntTrueDiv, "truediv")]
    for cls, name in table:
        if isinstance(expr, cls):
            return [name, *(to_tree(a) for a in expr.args)]
    raise ValueError(f"cannot represent {expr!r} ({type(expr).__name__})")
