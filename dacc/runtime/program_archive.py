"""Reading a program archive (`program<N>.pt2`) without running anything it says.

`torch.export.load` is not safe for an archive from an untrusted source, whatever its hashes:
it unpickles weight, constant and sample-input entries (falling back to `weights_only=False`),
loads compiled AOTInductor libraries, `exec`s the program's `guards_code` when the module is
built, resolves node targets by `getattr` on the `torch` module (`torch.os.system` is reachable),
and parses symbolic sizes with `sympy.sympify`, which evaluates its text.

So dacc reads the archive itself, by allow-list:
- the zip holds only the entries `torch.export.save` writes for a dacc program, each of a known
  safe kind (short text markers, JSON, raw stub bytes of a few bytes each; the sample-input
  pickle must be empty); anything else refuses the artifact;
- only the program JSON is read; its node targets must be aten/dacc operators or a short list of
  Python operator functions, its symbolic sizes must parse with a closed sympy grammar whose
  powers have small literal exponents, and its `guards_code` is empty (dacc saves none: the
  manifest's expression trees are its shape checks);
- the program is rebuilt by torch's JSON deserializer with the weights handed over as tensors
  from `weights.safetensors`, never as bytes, so no path reaches `torch.load`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from dacc.schema.errors import DaccError
from dacc.schema.manifest import RECOMPILE

MAX_PROGRAM_JSON = 1 << 30  # bytes, decompressed
MAX_STUB_BYTES = 64  # a stubbed weight is one element

# Entry names below the archive's single top folder; `N` stands for digits.
_ENTRIES = {
    "archive_format": 64, "archive_version": 64, "byteorder": 64, ".data/version": 64,
    ".data/serialization_id": 256, "models/model.json": MAX_PROGRAM_JSON,
    "data/weights/model_weights_config.json": 64 << 20, "data/constants/model_constants_config.json": 64 << 20,
    "data/sample_inputs/model.pt": 0,
}
_STUB = re.compile(r"data/(weights/weight|constants/tensor)_\d+")

_OPERATOR_FNS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs",
                 "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_"}
_TORCH_FNS = {"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "_sym_sqrt"}
_MATH_FNS = {"ceil", "floor", "trunc", "sqrt"}
_OP_NAMESPACES = ("aten", "dacc")
# Region markers torch.export keeps around a subgraph (autocast, no_grad inside a model); the
# subgraph is a nested graph of the same JSON, whose nodes are checked like any other.
_HIGHER_ORDER = {"wrap_with_autocast", "wrap_with_set_grad_enabled"}
_DENIED_ATEN = {"from_file"}  # reads a file named in the graph

# The sympy grammar torch writes for symbolic sizes (srepr): calls, keyword flags, symbol names, numbers.
_SYMPY_CALLS = {
    "Add", "Mul", "Pow", "Integer", "Rational", "Float", "Symbol", "Max", "Min", "Mod", "Abs", "Eq", "Ne",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "floor", "ceiling",
    "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity"}
_SYMPY_ATOMS = {"true", "false", "oo", "zoo", "nan", "int_oo", "IntInfinity", "NegativeIntInfinity",
                "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse", "True", "False", "S"}
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>-?\d+(?:\.\d+)?(?:e-?\d+)?)"
                    r"|(?P<str>'[a-z]{1,4}\d{1,9}')|(?P<quoted>'-?\d+(?:\.\d+)?(?:e-?\d+)?')|(?P<punct>[(),=]))")
_POWERS = {"Pow", "PowByNatural", "FloatPow", "LShift"}  # their second argument is an exponent
MAX_EXPR_CHARS = 20_000
MAX_EXPR_DEPTH = 64
MAX_POW_EXPONENT = 64
MAX_DIGITS = 40


def _refuse(what: str, where: str) -> DaccError:
    return DaccError(what, where, f"do not load this artifact, or {RECOMPILE}")


def read_program_json(path: Path) -> dict[str, Any]:
    """The program JSON of an archive whose every entry is of a known safe kind."""
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(f"'{path.name}' is not a program archive ({exc})", where) from None
    with zf:
        infos = zf.infolist()
        tops = {i.filename.split("/", 1)[0] for i in infos}
        if len(tops) != 1:
            raise _refuse(f"'{path.name}' must hold one program folder, found {sorted(tops)[:5]}", where)
        (top,) = tops
        model = None
        for info in infos:
            rest = info.filename[len(top) + 1:]
            limit = _ENTRIES.get(rest, MAX_STUB_BYTES if _STUB.fullmatch(rest) else None)
            if limit is None:
                raise _refuse(f"'{path.name}' holds an entry of unknown kind: {info.filename!r} "
                              "(dacc programs hold only JSON, text markers and raw stub bytes)", where)
            if info.file_size > limit:
                raise _refuse(f"'{path.name}' entry {info.filename!r} is {info.file_size} bytes, "
                              f"more than the {limit} its kind allows", where)
            if rest.endswith("_config.json"):
                _check_payload_config(zf.read(info), info.filename, where)
            if rest == "models/model.json":
                model = info
        if model is None:
            raise _refuse(f"'{path.name}' has no models/model.json", where)
        try:
            return json.loads(zf.read(model))
        except (ValueError, RecursionError) as exc:
            raise _refuse(f"'{path.name}' program JSON is malformed ({type(exc).__name__})", where) from None


def _check_payload_config(raw: bytes, name: str, where: str) -> None:
    try:
        config = json.loads(raw).get("config", {})
        pickled = [k for k, v in config.items() if v.get("use_pickle")]
    except (ValueError, AttributeError, RecursionError):
        raise _refuse(f"{name} is not a valid payload config", where) from None
    if pickled:
        raise _refuse(f"{name} declares pickled tensors ({', '.join(pickled[:3])})", where)


# -- the program JSON ------------------------------------------------------------------------------
def check_program_json(data: Any, where: str) -> dict[str, Any]:
    """Refuse what could run code; returns the JSON unchanged."""
    if not isinstance(data, dict) or not isinstance(data.get("graph_module"), dict):
        raise _refuse("the program JSON is not an exported program", where)
    stack: list[Any] = [data]
    while stack:  # iterative: a deeply nested document cannot exhaust the interpreter's stack
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and isinstance(value, str) and "inputs" in item:
                    check_target(value, where)
                elif key == "expr_str":
                    check_sympy_text(value, where)
                elif key in ("as_custom_obj", "custom_obj", "as_custom_objs"):
                    raise _refuse("the program uses custom (script) objects, which dacc never loads", where)
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    if data.get("guards_code"):  # torch `exec`s these when the module is built; dacc writes none
        raise _refuse("the program carries guards code (Python source torch would execute); dacc programs "
                      "carry none, their shape checks are the manifest's expression trees", where)
    for name in data.get("range_constraints") or {}:  # plain symbol names, looked up, never parsed
        if not (isinstance(name, str) and re.fullmatch(r"[a-z]{1,4}\d{1,9}", name)):
            raise _refuse(f"range constraint {str(name)[:80]!r} is not a symbol name", where)
    return data


def check_target(target: str, where: str) -> None:
    parts = target.split(".")
    ok = (
        (len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES
         and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts[3:])
         and not (parts[2] == "aten" and parts[3] in _DENIED_ATEN))
        or (len(parts) == 4 and parts[:3] == ["torch", "ops", "higher_order"] and parts[3] in _HIGHER_ORDER)
        or (len(parts) == 2 and parts[0] == "_operator" and parts[1] in _OPERATOR_FNS)
        or (len(parts) == 2 and parts[0] == "torch" and parts[1] in _TORCH_FNS)
        or (len(parts) == 2 and parts[0] == "math" and parts[1] in _MATH_FNS))
    if not ok:
        raise _refuse(f"the program calls {target[:120]!r}, which is not an operator dacc loads "
                      f"(aten, dacc, and Python's arithmetic on sizes)", where)


def check_sympy_text(text: Any, where: str) -> None:
    """Accept only the closed grammar of torch's sympy text, so `sympify` evaluates nothing else
    and cannot be asked for a huge power."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise _refuse("a symbolic size in the program is not a short expression", where)
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise _refuse(f"symbolic size {text[:80]!r} has an unexpected character at {pos}", where)
        tokens.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    _Parser(tokens, text, where).expression()


class _Parser:
    """Recursive descent over `Name(arg, ..., key=True)`; depth-bounded by MAX_EXPR_DEPTH."""

    def __init__(self, tokens: list[tuple[str, str]], text: str, where: str):
        self.tokens, self.i, self.text, self.where = tokens, 0, text, where

    def fail(self, why: str) -> DaccError:
        return _refuse(f"symbolic size {self.text[:80]!r} is not allowed: {why}", self.where)

    def next(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise self.fail("it ends early")
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expression(self) -> None:
        self.value(0)
        if self.peek() is not None:
            raise self.fail("text after the expression")

    def value(self, depth: int) -> Any:
        if depth > MAX_EXPR_DEPTH:
            raise self.fail("nested too deeply")
        kind, tok = self.next()
        if kind == "num":
            if len(tok) > MAX_DIGITS:
                raise self.fail("a number is too long")
            return tok
        if kind == "str":
            return tok
        if kind == "quoted":  # Float('0.5', precision=53)
            if len(tok) > MAX_DIGITS:
                raise self.fail("a number is too long")
            return tok.strip("'")
        if kind != "name":
            raise self.fail(f"unexpected {tok!r}")
        if tok in _SYMPY_ATOMS:
            return tok
        if tok not in _SYMPY_CALLS:
            raise self.fail(f"unknown name {tok!r}")
        if self.next() != ("punct", "("):
            raise self.fail(f"{tok} must be called")
        args = []
        while self.peek() != ("punct", ")"):
            if self.peek() and self.peek()[0] == "name" and self.i + 1 < len(self.tokens) \
                    and self.tokens[self.i + 1] == ("punct", "="):
                self.i += 2  # an assumption flag (positive=True) or a Float's precision=53
                flag = self.next()
                if flag not in (("name", "True"), ("name", "False")) \
                        and not (flag[0] == "num" and flag[1].isdigit() and int(flag[1]) <= 1024):
                    raise self.fail("a keyword argument must be True, False or a small integer")
            else:
                args.append(self.value(depth + 1))
            if self.peek() == ("punct", ","):
                self.i += 1
            elif self.peek() != ("punct", ")"):
                raise self.fail("expected ',' or ')'")
        self.i += 1
        if tok in _POWERS and not _small_exponent(args):
            raise self.fail(f"a power's exponent must be an integer literal of at most {MAX_POW_EXPONENT}")
        return (tok, args)


def _small_exponent(args: list[Any]) -> bool:
    if len(args) != 2:
        return False
    exp = args[1]
    if isinstance(exp, tuple) and exp[0] in ("Integer", "Float") and len(exp[1]) == 1 \
            and isinstance(exp[1][0], str):
        exp = exp[1][0]
    try:
        return abs(float(exp)) <= MAX_POW_EXPONENT
    except (TypeError, ValueError):
        return False


# -- rebuilding the program -------------------------------------------------------------------------
def deserialize_program(data: dict[str, Any], weights: dict[str, torch.Tensor], where: str) -> ExportedProgram:
    """Torch's JSON deserializer, handed tensors (never bytes) for every weight and constant."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer

    specs = data["graph_module"].get("signature", {}).get("input_specs", [])
    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for spec in specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _refuse("the program signature is malformed", where)
        ((kind, body),) = spec.items()
        if kind in ("user_input", "constant_input"):  # given at call time: plain values, no payload
            continue
        name = {"parameter": "parameter_name", "buffer": "buffer_name",
                "tensor_constant": "tensor_constant_name"}.get(kind)
        fqn = body.get(name) if name and isinstance(body, dict) else None
        if not isinstance(fqn, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", fqn) \
                or "__" in fqn:
            raise _refuse(f"the program signature has an input of kind {kind!r} dacc does not load", where)
        if fqn not in weights:
            raise DaccError(f"weight '{fqn}' of the program is missing from the weights file", where, RECOMPILE)
        tensor = _as_declared(weights[fqn], _declared_dtype(data, body), fqn, where)
        if kind == "parameter":
            state_dict[fqn] = torch.nn.Parameter(tensor, requires_grad=False)
        elif kind == "buffer" and body.get("persistent", True):
            state_dict[fqn] = tensor
        else:
            constants[fqn] = tensor
    try:
        serialized = _to_schema(schema.ExportedProgram, data)
        ep = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except DaccError:
        raise
    except Exception as exc:  # a malformed program: refuse it in one paragraph
        raise _refuse(f"the program could not be rebuilt ({type(exc).__name__}: {str(exc)[:200]})", where) from None
    check_graph(ep, where)
    return ep


_COMPLEX = {"COMPLEXHALF": torch.complex32, "COMPLEXFLOAT": torch.complex64, "COMPLEXDOUBLE": torch.complex128}


def _declared_dtype(data: dict[str, Any], body: dict[str, Any]) -> int | None:
    """The dtype the graph declares for an input (its placeholder's tensor meta), if readable."""
    arg = body.get("arg")
    name = arg.get("name") if isinstance(arg, dict) else None
    values = data["graph_module"].get("graph", {}).get("tensor_values", {})
    meta = values.get(name) if isinstance(values, dict) and isinstance(name, str) else None
    return meta.get("dtype") if isinstance(meta, dict) else None


def _as_declared(t: torch.Tensor, dtype: int | None, fqn: str, where: str) -> torch.Tensor:
    """safetensors has no complex dtypes: the compiler stores a complex weight as (real, imag)
    pairs, and the graph's declared dtype says to view it back."""
    from torch._export.serde.schema import ScalarType

    name = next((e.name for e in ScalarType if e.value == dtype), None)
    if name not in _COMPLEX:
        return t
    if t.is_complex():
        return t
    if t.dim() == 0 or t.shape[-1] != 2 or not t.is_floating_point():
        raise _refuse(f"weight '{fqn}' is declared complex but stored as {tuple(t.shape)} {t.dtype}", where)
    return torch.view_as_complex(t.contiguous())


def check_graph(ep: ExportedProgram, where: str) -> None:
    """The rebuilt graph calls only what `check_target` allowed (a second line of defence)."""
    import math
    import operator

    python_fns = {getattr(operator, n) for n in _OPERATOR_FNS} | {getattr(math, n) for n in _MATH_FNS} \
        | {getattr(torch, n) for n in _TORCH_FNS if hasattr(torch, n)}
    regions = {getattr(torch.ops.higher_order, n) for n in _HIGHER_ORDER}
    for gm in ep.graph_module.modules():  # the top graph and the subgraphs of region markers
        if not isinstance(gm, torch.fx.GraphModule):
            raise _refuse(f"the program holds a module of type {type(gm).__name__}, which dacc does not load", where)
        for node in gm.graph.nodes:
            t = node.target
            if node.op in ("placeholder", "output") or (
                    node.op == "get_attr" and isinstance(getattr(gm, t, None), torch.fx.GraphModule)) or (
                    node.op == "call_function" and (
                    (isinstance(t, torch._ops.OpOverload) and t.namespace in _OP_NAMESPACES)
                    or t in python_fns or t in regions)):
                continue
            raise _refuse(f"the program has a {node.op} node {node.name} calling {t!r}, which dacc does not load",
                          where)


@functools.lru_cache(maxsize=None)
def _schema_fields(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    from torch._export.serde import schema

    return typing.get_type_hints(cls, globalns=vars(schema)), tuple(f.name for f in dataclasses.fields(cls))


def _to_schema(tp: Any, data: Any) -> Any:
    """Program JSON -> torch's serialization schema dataclasses, as torch's own loader builds them,
    with each class's type hints resolved once (resolving them per node is most of a load)."""
    from torch._export.serde import schema
    from torch._export.serde.union import _Union

    if isinstance(tp, str):
        tp = getattr(schema, tp)
    elif isinstance(tp, typing.ForwardRef):
        tp = getattr(schema, tp.__forward_arg__)
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _to_schema(tp.__origin__, data)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        return None if data is None else _to_schema(next(a for a in typing.get_args(tp) if a is not type(None)), data)
    if isinstance(tp, type) and issubclass(tp, _Union):
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"{tp.__name__} must be a one-key object")
        ((tag, value),) = data.items()
        hints, _ = _schema_fields(tp)
        return tp.create(**{tag: _to_schema(hints[tag], value)})
    if dataclasses.is_dataclass(tp):
        hints, names = _schema_fields(tp)
        return tp(**{n: _to_schema(hints[n], data[n]) for n in names if n in data})
    if isinstance(data, list):
        return [_to_schema(typing.get_args(tp)[0], d) for d in data] if data else data
    if isinstance(data, dict):
        return {k: _to_schema(typing.get_args(tp)[1], v) for k, v in data.items()}
    return float(data) if tp is float else data
