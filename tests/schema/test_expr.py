"""Expression trees evaluate exactly like the sympy expressions they were written from, and untrusted
trees (from a manifest a user was handed) fail with a DaccError, quickly, whatever they hold."""
from __future__ import annotations

import random
import time

import pytest
import sympy
from torch.utils._sympy.functions import FloorDiv, PythonMod

from dacc.schema.errors import DaccError
from dacc.schema.expr import BOOL, MAX_DEPTH, MAX_NODES, NUMBER, evaluate, to_tree, validate
from tests.schema.manifest_fixture import DIT_SQRT_GUARD, FLUX_BLOCK_FLOPS, FLUX_GUARD, SD3_RANGE_GUARD, SYMBOLS


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


# -- untrusted trees: every failure is a DaccError that says what and where, and nothing hangs --------
HOSTILE_POW = ["pow", 10, ["pow", 10, 12]]  # 10 ** 10**12: hours of big-int multiplication if evaluated


def _refused(fn, *fragments: str, seconds: float = 0.5) -> str:
    start = time.perf_counter()
    with pytest.raises(DaccError) as info:
        fn()
    assert time.perf_counter() - start < seconds
    msg = str(info.value)
    assert "\n" not in msg and "Fix:" in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_the_compilers_trees_pass_validation_and_evaluate():
    env = {"s0": 2, "s1": 8, "s2": 8, "s3": 12, "s4": 4}
    for tree in (FLUX_GUARD, DIT_SQRT_GUARD, SD3_RANGE_GUARD):
        validate(tree, set(SYMBOLS), "guard", BOOL)
        assert evaluate(tree, env, "guard", BOOL) is True
    validate(FLUX_BLOCK_FLOPS, set(SYMBOLS), "flops", NUMBER)
    assert evaluate(FLUX_BLOCK_FLOPS, env, "flops", NUMBER) == 2 * (24576 + 128 * 64 * 2 + 24576 * 16 + 256 * 64)


def test_a_computed_exponent_is_refused_before_anything_runs():
    _refused(lambda: validate(HOSTILE_POW, set(), "programs[0].guards[0]"),
             "programs[0].guards[0]", "exponent of 'pow' must be a literal integer in [0, 64]", "at tree[2]")
    # evaluate is bounded on its own too (a caller that skipped validate cannot hang)
    _refused(lambda: evaluate(HOSTILE_POW, {}), "exponent must be an integer in [0, 64]")
    _refused(lambda: validate(["pow", ["sym", "s0"], 65], {"s0"}, "flops"), "got 65")


def test_division_and_modulo_by_zero_are_dacc_errors():
    _refused(lambda: evaluate(["floordiv", ["sym", "s0"], ["add", ["sym", "s0"], -4]], {"s0": 4}, "FLOPs of x"),
             "cannot evaluate FLOPs of x", "division by zero")
    _refused(lambda: evaluate(["mod", 7, 0], {}), "division by zero")
    _refused(lambda: evaluate(["truediv", 7, 0], {}), "division by zero")


def test_unknown_operator_and_symbol_are_named():
    _refused(lambda: validate(["__import__", "os"], set(), "g"), "unknown operator '__import__'", "known: sym, add")
    _refused(lambda: validate(["add", ["sym", "s9"], 1], {"s0", "s1"}, "g"), "unknown symbol 's9'", "known: s0, s1",
             "at tree[1]")
    _refused(lambda: evaluate(["sym", "s9"], {"s0": 1}), "no value for symbol 's9'")


def test_depth_and_size_are_bounded():
    deep: object = ["sym", "s0"]
    for _ in range(5000):  # far past Python's recursion limit if walked naively
        deep = ["add", deep, 1]
    _refused(lambda: validate(deep, {"s0"}, "g"), f"nested deeper than {MAX_DEPTH}")
    _refused(lambda: evaluate(deep, {"s0": 1}), f"nested deeper than {MAX_DEPTH}")
    wide = ["add", *range(MAX_NODES + 10)]
    _refused(lambda: validate(wide, set(), "g"), f"more than {MAX_NODES} nodes")
    ok = ["add", ["sym", "s0"], 1]
    for _ in range(MAX_DEPTH - 2):
        ok = ["add", ok, 1]
    validate(ok, {"s0"}, "g", NUMBER)


def test_arity_kinds_literals_and_result_kind():
    _refused(lambda: validate(["not"], set(), "g"), "'not' takes 1 argument(s), got 0")
    _refused(lambda: validate(["eq", 1, True], set(), "g"), "'eq' needs number arguments")
    _refused(lambda: validate(["add", 1, "x"], set(), "g"), "expected a number, a bool or [op, ...], got 'x'")
    _refused(lambda: validate(2**63, set(), "g"), "integer out of range")
    _refused(lambda: validate(float("nan"), set(), "g"), "non-finite")
    _refused(lambda: validate(["add", 1, 2], set(), "guard", BOOL), "gives a number, a bool is required")
    _refused(lambda: validate({"op": "add"}, set(), "g"), "expected a number, a bool or [op, ...]")


def test_results_stay_in_bounds():
    _refused(lambda: evaluate(["mul", ["sym", "s0"], ["sym", "s0"], ["sym", "s0"]], {"s0": 2**40}),
             "integer out of range")
    _refused(lambda: evaluate(["pow", ["sym", "s0"], 64], {"s0": 3}), "integer out of range")
    _refused(lambda: evaluate(["floatpow", ["tofloat", -8], 0.5], {}), "undefined or not real")
    _refused(lambda: evaluate(["sym", "s0"], {"s0": True}), "expected a number, got True")
    assert evaluate(["pow", ["sym", "s0"], 2], {"s0": 2**31}) == 2**62
