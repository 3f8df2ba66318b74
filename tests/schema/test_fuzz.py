"""Property-based fuzzing of everything dacc reads from a user's files: plan YAML (text and bytes),
plan data, manifest data (through from_dict and tree validation, and through read_manifest on
disk), and expression trees (validate and evaluate).

The property, for every input: a valid result or a one-paragraph DaccError, never another
exception, and never more than a second. Derandomized, so CI runs the same cases every time.
"""
from __future__ import annotations

import copy
import functools
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dacc.runtime.artifact import read_manifest
from dacc.schema.errors import DaccError
from dacc.schema.expr import BOOL, NUMBER, OPS, evaluate, validate
from dacc.schema.manifest import Manifest, validate_manifest_trees
from dacc.schema.plan import CACHE_STRATEGIES, SCM_POLICIES, Plan, load_plan, parse_plan
from dacc.schema.serial import from_dict
from tests.schema.manifest_fixture import SYMBOLS, valid_data, write_artifact

CASE_SECONDS = 1.0


def fuzz(n: int) -> Callable:
    return settings(max_examples=n, deadline=1000, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def outcome(fn: Callable[[], Any]) -> Any:
    """fn's result, or its DaccError (checked to be one short paragraph); anything else propagates."""
    start = time.perf_counter()
    try:
        result = fn()
    except DaccError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 4000, msg[:500]
        result = exc
    assert time.perf_counter() - start < CASE_SECONDS
    event(f"{getattr(fn, '__qualname__', '?').split('.')[0]}: {type(result).__name__}")  # --hypothesis-show-statistics
    return result


# -- values -------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["none", "dbcache", "scm", "fast", "s0", "", "1"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=20)
# Python data may hold what JSON cannot: non-str keys, tuples
py_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none()), inner, max_size=5)),
    max_leaves=20)
# expression trees of any shape: known and unknown operators, any arity, any leaf
names = st.sampled_from([*SYMBOLS, "s9", "", "__class__"])
leaves = st.one_of(st.integers(-2**66, 2**66), st.booleans(), st.floats(), names.map(lambda n: ["sym", n]),
                   st.none(), st.text(max_size=5))
trees = st.recursive(leaves, lambda inner: st.builds(
    lambda op, args: [op, *args], st.sampled_from([*OPS, "sym", "exec", ""]), st.lists(inner, max_size=4)),
    max_leaves=30)


def mutate(data: st.DataObject, tree: Any, values: st.SearchStrategy) -> Any:
    """A copy of `tree` with one node (reached by a random walk) replaced, deleted or extended."""
    tree = copy.deepcopy(tree)
    parent, key, node = None, None, tree
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if parent is None:
        return data.draw(values) if action == "replace" else tree
    if action == "replace":
        parent[key] = data.draw(values)
    elif action == "delete":
        del parent[key]
    elif isinstance(node, dict):
        node[data.draw(st.text(max_size=10))] = data.draw(values)
    elif isinstance(node, list):
        node.append(data.draw(values))
    return tree


# -- plans --------------------------------------------------------------------------------------
@st.composite
def valid_plans(draw) -> dict:
    strategy = draw(st.sampled_from(CACHE_STRATEGIES))
    steps = draw(st.integers(2, 60))
    cache: dict[str, Any] = {"strategy": strategy}
    if strategy != "none":
        cache["cache_ratio"] = draw(st.floats(0, 1))
        cache["warmup"] = draw(st.integers(0, 1))
        options = {"scm": {"policy": draw(st.sampled_from(SCM_POLICIES))}, "taylorseer": {"order": 2},
                   "dbcache": {"Fn": 1, "threshold": 1}, "teacache": {"rescale": [1.0, 0]},
                   "schedule": {"taylorseer_order": 1}, "magcache": {"threshold": 0.1}}[strategy]
        cache["options"] = options
    return {"num_inference_steps": steps, "cache": cache, "quantize": {"mode": "none"}}


YAML_CHARS = "{}[]:,-&*!|>'\"#%@`?<= \n\t\\" + "abcsnx01._~"
HOSTILE_SNIPPETS = ["&a ", "*a", "!!python/object:os.system ", "!!binary ", "<<: ", "? ", "%YAML 1.1\n---\n",
                    "---\n", "\x00", "\ufeff", "\ud800", "0x_", "2001-02-30", ".nan", "1e999", "9" * 5000,
                    "[" * 40, "{a: " * 40, "\n" + " " * 3, "\"\\x", "'"]


@st.composite
def plan_texts(draw) -> str | bytes:
    kind = draw(st.sampled_from(["mutated", "snippet", "chars", "bytes", "deep", "aliases", "dupes"]))
    if kind in ("mutated", "snippet", "dupes"):
        data = mutate(draw(st.data()), draw(valid_plans()), json_values)
        text = yaml.safe_dump(data, default_flow_style=draw(st.sampled_from([None, True, False])))
        if kind == "snippet":
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.sampled_from(HOSTILE_SNIPPETS)) + text[at:]
        elif kind == "dupes":
            lines = text.splitlines(True)
            i = draw(st.integers(0, max(0, len(lines) - 1)))
            text = "".join(lines[:i + 1] + lines[i:])
        return text
    if kind == "chars":
        return draw(st.text(alphabet=YAML_CHARS, max_size=200))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "deep":
        n = draw(st.integers(20, 6000))
        return draw(st.sampled_from(["[" * n + "]" * n, "cache: " + "{a: " * n, "- " * n + "1",
                                     "".join(" " * i + "k:\n" for i in range(min(n, 400)))]))
    width = draw(st.integers(2, 12))  # aliases: a small bomb of random width
    return "a: &a [" + ", ".join(["x"] * width) + "]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([('*a' if i == 0 else f'*b{i - 1}')] * width)}]\n" for i in range(width))


_TMP = Path(tempfile.mkdtemp(prefix="dacc-fuzz-"))


@fuzz(800)
@given(plan_texts())
def test_plan_files(content):
    path = _TMP / "plan.yaml"
    path.write_bytes(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    result = outcome(lambda: load_plan(path))
    assert isinstance(result, (Plan, DaccError))
    if isinstance(result, DaccError):
        assert str(path) in str(result)


@fuzz(300)
@given(st.data())
def test_plan_data(data):
    plan = data.draw(st.one_of(py_values, valid_plans().map(lambda p: mutate(data, p, py_values))))
    assert isinstance(outcome(lambda: parse_plan(plan, "plan.yaml")), (Plan, DaccError))


# -- manifests ----------------------------------------------------------------------------------
VALID = valid_data()


def read_data(data: Any) -> Manifest:
    """read_manifest's path after its JSON, version and digest checks."""
    try:
        manifest = from_dict(Manifest, data)
    except ValueError as exc:
        raise DaccError(f"malformed manifest: {exc}", "manifest.json", "recompile") from None
    validate_manifest_trees(manifest, "manifest.json")
    return manifest


def evaluate_all(manifest: Manifest, env: dict[str, int]) -> None:
    for prog in manifest.programs:  # validated trees evaluate to their kind, or a DaccError
        for tree in prog.guards:
            result = outcome(lambda: evaluate(tree, env, "guard", BOOL))
            assert isinstance(result, (bool, DaccError))
        for seg in prog.segments:
            result = outcome(lambda: evaluate(seg.flops_tree, env, "flops", NUMBER))
            assert isinstance(result, (int, float, DaccError)) and not isinstance(result, bool)


@fuzz(500)
@given(st.data(), st.integers(0, 2**40))
def test_manifest_data(data, size):
    mutated = mutate(data, VALID, data.draw(st.sampled_from([json_values, py_values, trees])))
    result = outcome(lambda: read_data(mutated))
    if isinstance(result, Manifest):
        evaluate_all(result, {s: size for s in SYMBOLS})


@fuzz(150)
@given(st.data())
def test_read_manifest_on_disk(data):
    kind = data.draw(st.sampled_from(["mutated", "deep", "text"]))
    root = _TMP / "artifact.dacc"
    if kind == "mutated":
        write_artifact(root, mutate(data, VALID, json_values))
    else:
        write_artifact(root, VALID)
        n = data.draw(st.integers(1, 200_000))
        text = ('{"schema_version": 1, "x": ' + "[" * n + "]" * n + "}" if kind == "deep"
                else data.draw(st.text(alphabet='{}[]":,0123456789.eE-+ \n\\utrfnal', max_size=200)))
        (root / "manifest.json").write_text(text)
    assert isinstance(outcome(lambda: read_manifest(root)), (Manifest, DaccError))


# -- expression trees ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # one strategy object per (kind, depth): building them is not free
def typed(kind: str, depth: int) -> st.SearchStrategy:
    """Trees with the right arities and kinds, so that many pass validation and reach evaluate."""
    num_leaf = st.one_of(st.integers(-2**40, 2**40), st.sampled_from(SYMBOLS).map(lambda n: ["sym", n]))
    if depth == 0:
        return num_leaf if kind == NUMBER else st.booleans()
    num, boolean = typed(NUMBER, depth - 1), typed(BOOL, depth - 1)
    if kind == NUMBER:
        return st.one_of(num_leaf, st.builds(lambda op, a: [op, *a], st.sampled_from(["add", "mul", "max", "min"]),
                                             st.lists(num, min_size=1, max_size=3)),
                         st.builds(lambda op, a, b: [op, a, b], st.sampled_from(["floordiv", "mod", "truediv"]), num, num),
                         st.builds(lambda a, e: ["pow", a, e], num, st.integers(0, 64)),
                         st.builds(lambda a, e: ["floatpow", a, e], num, st.floats(-64, 64)),
                         st.builds(lambda op, a: [op, a], st.sampled_from(["trunc", "tofloat"]), num))
    return st.one_of(st.booleans(), st.builds(lambda op, a, b: [op, a, b],
                                              st.sampled_from(["eq", "ne", "lt", "le", "gt", "ge"]), num, num),
                     st.builds(lambda op, a: [op, *a], st.sampled_from(["and", "or"]), st.lists(boolean, min_size=1, max_size=3)),
                     st.builds(lambda a: ["not", a], boolean))


@fuzz(400)
@given(trees, st.sampled_from([None, BOOL, NUMBER]), st.integers(-2**70, 2**70))
def test_random_trees(tree, expect, size):
    assert isinstance(outcome(lambda: validate(tree, set(SYMBOLS), "tree", expect)), (type(None), DaccError))
    result = outcome(lambda: evaluate(tree, {s: size for s in SYMBOLS}, "tree", expect))
    assert isinstance(result, (bool, int, float, DaccError))


@fuzz(400)
@given(st.one_of(st.tuples(st.just(BOOL), typed(BOOL, 4)), st.tuples(st.just(NUMBER), typed(NUMBER, 4))),
       st.integers(0, 2**20))
def test_well_formed_trees(kind_tree, size):
    kind, tree = kind_tree
    validate(tree, set(SYMBOLS), "tree", kind)  # what the compiler could write is accepted
    result = outcome(lambda: evaluate(tree, {s: size for s in SYMBOLS}, "tree", kind))
    if not isinstance(result, DaccError):
        assert (kind == BOOL) == isinstance(result, bool)
