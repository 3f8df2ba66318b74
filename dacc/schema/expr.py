"""Symbolic integer expressions as JSON trees: written from sympy by the compiler, evaluated by the
runtime with plain Python (no sympy, no eval of text from the artifact).

A tree is an int, a float, a bool, `["sym", name]`, or `[op, *children]` with op one of `OPS`.

Trees come from a file a user may have been handed, so they are untrusted: `validate` checks the
shape of a tree once at load (closed operator set, arities, known symbols, types, size), and
`evaluate` itself is bounded (depth, node count, integer size, exponents), so no tree can hang
the runtime, exhaust the stack, or raise anything but a `DaccError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

from dacc.schema.errors import DaccError
from dacc.schema.errors import short_repr as _short

Tree = Any
Kind = Literal["number", "bool"]
NUMBER: Kind = "number"
BOOL: Kind = "bool"

# Limits, with a wide margin over what the compiler writes (measured on every family: depth 10,
# 73 nodes, literals up to 30720, exponents 2 and 0.5) yet small enough that evaluation is cheap.
MAX_DEPTH = 64
MAX_NODES = 4096
INT_BOUND = 2**63  # |int| must stay below: a shape product or a FLOP count fits in int64
MAX_EXPONENT = 64  # 63-bit base ** 64 is ~4000 bits: still one cheap multiplication chain

_RECOMPILE = "recompile the artifact with `dacc compile model.py --plan plan.yaml -o OUT --force`"


class _Bad(Exception):
    """Internal: why a tree is invalid or cannot be evaluated; turned into a DaccError with context."""


def _num(x: Any) -> Any:
    """x, if it is a number within the bounds (bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _Bad(f"expected a number, got {_short(x)}")
    if isinstance(x, int) and not -INT_BOUND < x < INT_BOUND:
        raise _Bad(f"integer out of range (|x| must stay below 2**63): {_short(x)}")
    if isinstance(x, float) and not math.isfinite(x):
        raise _Bad(f"non-finite number {x}")
    return x


def _nonzero(b: Any) -> Any:
    if b == 0:
        raise _Bad("division by zero")
    return b


def _mul(*a: Any) -> Any:
    out: Any = 1
    for x in a:  # bound every partial product, not just the result
        out = _num(out * x)
    return out


def _pow(a: Any, b: Any) -> Any:
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_EXPONENT:
        raise _Bad(f"exponent must be an integer in [0, {MAX_EXPONENT}], got {_short(b)}")
    return a**b


def _floatpow(a: Any, b: Any) -> float:
    if abs(b) > MAX_EXPONENT:
        raise _Bad(f"exponent must be within [-{MAX_EXPONENT}, {MAX_EXPONENT}], got {_short(b)}")
    try:
        return math.pow(float(a), float(b))
    except ValueError:  # a negative base with a fractional exponent, or 0 ** -1
        raise _Bad(f"{a} ** {b} is undefined or not real") from None


@dataclass(frozen=True)
class Op:
    min_args: int
    max_args: int | None  # None: variadic
    args: Kind | Literal["same"]  # "same": all children of one kind (eq/ne compare numbers or bools)
    result: Kind
    fn: Callable[..., Any]


OPS: dict[str, Op] = {
    "add": Op(1, None, NUMBER, NUMBER, lambda *a: sum(a)),
    "mul": Op(1, None, NUMBER, NUMBER, _mul),
    "pow": Op(2, 2, NUMBER, NUMBER, _pow),
    "floordiv": Op(2, 2, NUMBER, NUMBER, lambda a, b: a // _nonzero(b)),
    "mod": Op(2, 2, NUMBER, NUMBER, lambda a, b: a % _nonzero(b)),
    "max": Op(1, None, NUMBER, NUMBER, lambda *a: max(a)),  # max(a) not max(*a): one argument is valid
    "min": Op(1, None, NUMBER, NUMBER, lambda *a: min(a)),
    "eq": Op(2, 2, "same", BOOL, lambda a, b: a == b),
    "ne": Op(2, 2, "same", BOOL, lambda a, b: a != b),
    "lt": Op(2, 2, NUMBER, BOOL, lambda a, b: a < b),
    "le": Op(2, 2, NUMBER, BOOL, lambda a, b: a <= b),
    "gt": Op(2, 2, NUMBER, BOOL, lambda a, b: a > b),
    "ge": Op(2, 2, NUMBER, BOOL, lambda a, b: a >= b),
    "and": Op(1, None, BOOL, BOOL, lambda *a: all(a)),
    "or": Op(1, None, BOOL, BOOL, lambda *a: any(a)),
    "not": Op(1, 1, BOOL, BOOL, lambda a: not a),
    "trunc": Op(1, 1, NUMBER, NUMBER, math.trunc),
    "tofloat": Op(1, 1, NUMBER, NUMBER, float),
    "floatpow": Op(2, 2, NUMBER, NUMBER, _floatpow),
    "truediv": Op(2, 2, NUMBER, NUMBER, lambda a, b: a / _nonzero(b)),
}


def _kind_of(value: Any) -> Kind:
    return BOOL if isinstance(value, bool) else NUMBER


class _Walk:
    """One bounded traversal: `env` None validates statically, a dict evaluates."""

    def __init__(self, env: dict[str, int] | None, symbols: set[str] | None):
        self.env, self.symbols, self.nodes = env, symbols, 0

    def visit(self, tree: Tree, depth: int, path: str) -> Any:
        """The value (evaluating) or the kind (validating) of `tree`."""
        try:
            return self._visit(tree, depth, path)
        except _Bad as exc:
            if len(exc.args) == 1:  # raised by a helper that does not know where it is
                raise _Bad(exc.args[0], path) from None
            raise

    def _visit(self, tree: Tree, depth: int, path: str) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Bad(f"more than {MAX_NODES} nodes", path)
        if depth > MAX_DEPTH:
            raise _Bad(f"nested deeper than {MAX_DEPTH}", path)
        if isinstance(tree, bool):
            return tree if self.env is not None else BOOL
        if isinstance(tree, (int, float)):
            value = _num(tree)
            return value if self.env is not None else NUMBER
        if not isinstance(tree, (list, tuple)) or not tree or not isinstance(tree[0], str):
            raise _Bad(f"expected a number, a bool or [op, ...], got {_short(tree)}", path)
        if len(tree) > MAX_NODES:  # before slicing a hostile million-element list
            raise _Bad(f"more than {MAX_NODES} nodes", path)
        op, args = tree[0], tree[1:]
        if op == "sym":
            return self._symbol(args, path)
        spec = OPS.get(op)
        if spec is None:
            raise _Bad(f"unknown operator {_short(op)}; known: sym, {', '.join(OPS)}", path)
        if len(args) < spec.min_args or (spec.max_args is not None and len(args) > spec.max_args):
            want = spec.min_args if spec.max_args == spec.min_args else f"at least {spec.min_args}"
            raise _Bad(f"'{op}' takes {want} argument(s), got {len(args)}", path)
        if self.env is None and op in ("pow", "floatpow"):
            self._literal_exponent(op, args[1], f"{path}[2]")
        values = [self.visit(a, depth + 1, f"{path}[{i + 1}]") for i, a in enumerate(args)]
        kinds = values if self.env is None else [_kind_of(v) for v in values]
        want_kind = kinds[0] if spec.args == "same" else spec.args
        for i, k in enumerate(kinds):
            if k != want_kind:
                raise _Bad(f"'{op}' needs {want_kind} arguments, argument {i + 1} is a {k}", path)
        if self.env is None:
            return spec.result
        try:
            result = spec.fn(*values)
        except (ArithmeticError, ValueError) as exc:  # float overflow and friends: a backstop
            raise _Bad(f"'{op}' failed: {exc}", path) from None
        return result if isinstance(result, bool) else _num(result)

    def _symbol(self, args: Any, path: str) -> Any:
        if len(args) != 1 or not isinstance(args[0], str):
            raise _Bad(f"a symbol is ['sym', name], got {_short(['sym', *args])}", path)
        name = args[0]
        if self.env is None:
            if name not in self.symbols:
                raise _Bad(f"unknown symbol {_short(name)}; known: {', '.join(sorted(self.symbols)) or '(none)'}",
                           path)
            return NUMBER
        if name not in self.env:
            raise _Bad(f"no value for symbol {_short(name)}", path)
        return _num(self.env[name])

    @staticmethod
    def _literal_exponent(op: str, e: Any, path: str) -> None:
        """Exponents are literals in what the compiler writes (s**2, x**0.5); a computed exponent
        is how `10 ** 10 ** 12` would hang, so it is refused before anything runs."""
        ok = (isinstance(e, int) and not isinstance(e, bool) and 0 <= e <= MAX_EXPONENT) if op == "pow" else (
            isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and abs(e) <= MAX_EXPONENT)
        if not ok:
            kind = "a literal integer in [0," if op == "pow" else f"a literal number in [-{MAX_EXPONENT},"
            raise _Bad(f"the exponent of '{op}' must be {kind} {MAX_EXPONENT}], got {_short(e)}", path)


def _error(exc: _Bad, what: str, where: str | None, fix: str) -> DaccError:
    path = exc.args[1] if len(exc.args) > 1 else "tree"
    return DaccError(f"{what}: {exc.args[0]} (at {path})", where, fix)


def validate(tree: Tree, symbols: set[str], what: str, expect: Kind | None = None,
             where: str | None = None) -> None:
    """Refuse a tree that is not one dacc's compiler could have written: unknown operators or
    symbols, wrong arities or argument types, computed exponents, out-of-range literals, more
    than MAX_DEPTH levels or MAX_NODES nodes, or a result that is not of kind `expect`."""
    walk = _Walk(None, symbols)
    try:
        kind = walk.visit(tree, 1, "tree")
        if expect is not None and kind != expect:
            raise _Bad(f"the expression gives a {kind}, a {expect} is required", "tree")
    except _Bad as exc:
        raise _error(exc, f"invalid expression tree in {what}", where, _RECOMPILE) from None
    except RecursionError:  # unreachable with MAX_DEPTH, kept so no tree can escape as a raw error
        raise DaccError(f"invalid expression tree in {what}: nested too deeply", where, _RECOMPILE) from None


def evaluate(tree: Tree, env: dict[str, int], what: str = "expression", expect: Kind | None = None,
             where: str | None = None) -> Any:
    """The value of `tree` with symbols bound by `env`; a bool when `expect` is BOOL, an int or a
    float when it is NUMBER. Division by zero, results beyond the bounds, a missing symbol or any
    malformed node raise DaccError (the tree need not have been validated: the walk is bounded)."""
    walk = _Walk(env, None)
    try:
        value = walk.visit(tree, 1, "tree")
        if expect is not None and _kind_of(value) != expect:
            raise _Bad(f"the expression gives a {_kind_of(value)}, a {expect} is required", "tree")
        return value
    except _Bad as exc:
        raise _error(exc, f"cannot evaluate {what}", where,
                     "pass input sizes the artifact accepts (`dacc inspect` lists its symbols and "
                     "conditions); if the tree itself is malformed, " + _RECOMPILE) from None


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
