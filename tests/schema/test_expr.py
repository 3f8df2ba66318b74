"""Expression trees evaluate exactly like the sympy expressions they were written from."""
from __future__ import annotations

import random

import sympy
from torch.utils._sympy.functions import FloorDiv, PythonMod

from dacc.schema.expr import evaluate, to_tree


def test_trees_agree_with_sympy_on_random_values():
    a, b, c = sympy.symbols("s0 s1 s2", integer=True, positive=True)
    exprs = [128 * a * b**2 + 256 * a * b * c + 24576 * a, FloorDiv(b, 2) * FloorDiv(c, 2),
             sympy.Eq(b + c, a + 3), sympy.Ne(PythonMod(b, 2), 0), sympy.And(b <= 32, c > 1),
             sympy.Max(1, FloorDiv(a, 4)) * 2, sympy.Or(sympy.Eq(a, 2), sympy.Not(sympy.Eq(b, c)))]
    rng = random.Random(0)
    for expr in exprs:
        tree = to_tree(expr)
        for _ in range(20):
            env = {"s0": rng.randint(1, 64), "s1": rng.randint(1, 64), "s2": rng.randint(1, 64)}
            want = expr.subs({a: env["s0"], b: env["s1"], c: env["s2"]})
            assert evaluate(tree, env) == (bool(want) if want in (sympy.true, sympy.false) else int(want)), expr
