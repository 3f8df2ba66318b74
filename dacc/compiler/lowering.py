"""Lowering segments to AOTInductor packages (C++/OpenMP kernels on CPU, Triton on CUDA).

Each segment is cut exactly as the runtime cuts it (its inputs, then its weights, as arguments),
put in a canonical form, exported with its token and batch sizes dynamic, and compiled by
`torch._inductor.aoti_compile_and_package`. The canonical form:
- sizes a segment receives as integers are read from its tensor arguments' shapes instead
  (a package takes tensors only, and this tells Inductor how the sizes relate);
- nodes are renamed in order, so two segments with the same ops, constants, argument dtypes and
  static sizes print the same code. That text is the package's key: structurally identical
  segments (every single block of a Flux model) share one build and one file.
Packages are cached under $DACC_CACHE_DIR (default ~/.cache/dacc) by key, torch version and
target, so recompiling a model reuses them. Every segment a package serves is checked against
its graph on the boundary values of every example the program serves, cached or not; a segment
whose package fails to build or to match runs as a graph, and the manifest says why.
A partitioned program's segments call dacc's communication operators (dacc/kernels/collectives.py);
Inductor leaves a custom operator as a call back into the dispatcher, so a package exchanges data
over whatever groups the runtime binds, like the graph. Such a program is lowered on its ranks
(dacc/compiler/lowering_ranks.py).
"""
from __future__ import annotations

import hashlib
import operator
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import sympy
import torch
from torch import fx
from torch.fx.experimental import _config as fx_config
from torch.export import Dim
from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

from dacc.compiler.ir import _expr
from dacc.compiler.trace import rel_error
from dacc.runtime.inputs import flatten_with_paths
from dacc.runtime.lowered import LoadedPackage, cpu_isa, cuda_arch
from dacc.runtime.stamps import cache_root
from dacc.schema.dtypes import dtype_text
from dacc.schema.manifest import LoweredCall, LoweringSpec, PackageSpec

RECIPE = 1  # part of every package key: bump when the way packages are built changes
MIN_NODES = 4  # a smaller segment costs more as a package call than as its few dispatches
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # relative max error; half types: 1e-2


@dataclass
class Package:
    file: str
    key: str
    path: Path
    num_nodes: int
    build_seconds: float


@dataclass
class ProgramLowering:
    """What lower_segments decided for one program (ProgramIR.lowering)."""
    device: str
    calls: dict[str, LoweredCall] = field(default_factory=dict)  # segment name -> package call
    packages: dict[str, Package] = field(default_factory=dict)  # file -> package
    unlowered: dict[str, str] = field(default_factory=dict)  # segment name -> why it stays a graph


@dataclass
class Canonical:
    module: fx.GraphModule
    args: list[int]  # positions of the runtime's segment arguments the package takes
    sizes: list[str]  # program symbols passed after them as size carriers
    dynamic: list[dict[int, Any] | None]  # export's dynamic_shapes, per kept argument
    exprs: list[dict[int, Any]]  # each dynamic dim's size over the program's symbols, per kept argument
    inner: set[Any]  # the symbolic sizes of the values computed inside
    key: str
    num_nodes: int


class NotLowerable(Exception):
    """A segment that stays a graph, with the reason recorded in the manifest."""


def cache_dir() -> Path:
    return cache_root() / "packages"


def target_tag(device: str) -> str:
    where = f"cuda{cuda_arch()}" if device == "cuda" else f"cpu-{cpu_isa() or 'scalar'}"
    march = host_march(device)
    return f"torch{torch.__version__}-{where}" + (f"-{march}" if march else "")


# Inductor compiles a package's C++ with -march=native by default: the compiler may then use any
# extension of the building CPU (AVX512-FP16, AMX, ...), while the manifest records, and the
# runtime checks, only Inductor's vector ISA. An x86 baseline per ISA makes the recorded ISA the
# whole requirement; a CUDA package's host code needs no vector extension at all.
_X86_BASELINES = {"avx512": "x86-64-v4", "avx2": "x86-64-v3"}


def host_march(device: str) -> str | None:
    """The -march packages are built with (None: Inductor's choice, which on ARM is already an
    explicit feature list rather than native)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    isa = cpu_isa().split()[0] if device == "cpu" and cpu_isa() else ""
    return _X86_BASELINES.get(isa, "x86-64-v2")


_SIZE_OPS = {sympy.Add: operator.add, sympy.Mul: operator.mul, FloorDiv: operator.floordiv,
             PythonMod: operator.mod, Mod: operator.mod}


class _Sizes:
    """Builds the nodes computing a size the segment received as an integer: from a tensor
    argument's dimension where one equals it (or its symbols), else from a size carrier, a
    zero-element tensor of shape (n, 0) that the runtime passes for program symbol n (the latent
    height an epilogue unpatchifies with is no dimension of its token tensors)."""

    def __init__(self, graph: fx.Graph, tensor_dims: list[tuple[fx.Node, int, Any]], names: dict[Any, str]):
        self.graph, self.tensor_dims, self.names = graph, tensor_dims, names
        self.carriers: dict[Any, fx.Node] = {}

    def _direct(self, expr) -> tuple[fx.Node, int] | None:
        return next(((ph, d) for ph, d, e in self.tensor_dims if e == expr), None)

    def need_carriers(self, expr, name: str) -> None:
        if self._direct(expr) is not None or expr.is_Integer:
            return
        if expr.is_Symbol:
            if expr not in self.names:
                raise NotLowerable(f"size argument {name} = {expr} is not a size of the program's inputs")
            if expr not in self.carriers:
                self.carriers[expr] = self.graph.placeholder(f"c{len(self.carriers)}")
            return
        if type(expr) not in _SIZE_OPS:
            raise NotLowerable(f"size argument {name} = {expr} uses {type(expr).__name__}")
        for a in expr.args:
            self.need_carriers(a, name)

    def build(self, expr):
        found = self._direct(expr)
        if found is not None:
            return self.graph.call_function(torch.ops.aten.sym_size.int, found)
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return self.graph.call_function(torch.ops.aten.sym_size.int, (self.carriers[expr], 0))
        terms = [self.build(a) for a in expr.args]
        value = terms[0]
        for t in terms[1:]:
            value = self.graph.call_function(_SIZE_OPS[type(expr)], (value, t))
        return value


def canonical(gm: fx.GraphModule, values: list[Any], metas: list[Any], n_inputs: int, device: str,
              symbol_names: dict[Any, str]) -> Canonical:
    """`gm` takes (inputs..., weights...) = `values`; `metas` are the traced values (fake tensors,
    SymInts) of the inputs, for their symbolic sizes; `symbol_names` maps the program's size
    symbols to their manifest names."""
    old = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    kept, dynamic, descr, exprs = [], [], [], []
    tensor_dims: list[tuple[fx.Node, int, Any]] = []
    for k, (node, value) in enumerate(zip(old, values)):
        if isinstance(value, torch.Tensor):
            ph = graph.placeholder(f"a{len(kept)}")
            env[node] = ph
            kept.append(k)
            meta = metas[k] if k < n_inputs else None
            sized = {}  # dim -> its size over the program's symbols, for the dims that are dynamic
            if isinstance(meta, torch.Tensor):
                for d, size in enumerate(meta.shape):
                    if isinstance(size, torch.SymInt) and not size.node.expr.is_number:
                        sized[d] = size.node.expr
                        tensor_dims.append((ph, d, size.node.expr))
            dims = {d: Dim.AUTO for d in sized}
            dynamic.append(dims or None)
            exprs.append(sized)
            shape = ["?" if d in dims else str(s) for d, s in enumerate(value.shape)]
            descr.append(f"{dtype_text(value.dtype)}[{','.join(shape)}]")
        elif not isinstance(value, int) or isinstance(value, bool):
            raise NotLowerable(f"argument {node.name} is a {type(value).__name__}, not a tensor or a size")
    sizes = _Sizes(graph, tensor_dims, symbol_names)
    int_args = []
    for k, (node, value) in enumerate(zip(old, values)):
        if node not in env:
            expr = _expr(metas[k]) if k < n_inputs else sympy.Integer(value)
            sizes.need_carriers(expr, node.name)
            int_args.append((node, expr))
    carried = [symbol_names[sym] for sym in sizes.carriers]
    dynamic += [{0: Dim.AUTO}] * len(carried)
    exprs += [{0: sym} for sym in sizes.carriers]
    descr += [f"size {name}" for name in carried]
    for node, expr in int_args:
        env[node] = sizes.build(expr)
    count, inner = 0, set()
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            inner |= {d.node.expr for d in val.shape if isinstance(d, torch.SymInt) and not d.node.expr.is_number}
        if node.op == "placeholder":
            continue
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "output":
            graph.output(args[0])
            continue
        if node.op != "call_function":
            raise NotLowerable(f"node {node.name} is a {node.op}")
        env[node] = graph.create_node("call_function", node.target, args, kwargs, name=f"v{count}")
        count += 1
    module = fx.GraphModule(torch.nn.Module(), graph, class_name="Segment")
    text = f"recipe {RECIPE}|{device}|{target_tag(device)}|{';'.join(descr)}\n{module.code}"
    return Canonical(module, kept, carried, dynamic, exprs, inner, hashlib.sha256(text.encode()).hexdigest(), count)


def build(canon: Canonical, args: list[torch.Tensor], out: Path, device: str) -> None:
    """Export the canonical segment with its dynamic sizes and compile it into `out`."""
    # without duck shaping: two sizes equal in the example (a square latent's height and width)
    # must not become one symbol, only sizes the code relates do
    with torch.no_grad(), fx_config.patch(use_duck_shape=False):
        ep = torch.export.export(canon.module, tuple(args), dynamic_shapes=tuple(canon.dynamic), strict=False)
    for ph, dims in zip([n for n in ep.graph.nodes if n.op == "placeholder"], canon.dynamic):
        val = ph.meta.get("val")
        for d in dims or {}:
            size = val.shape[d]
            if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
                raise NotLowerable(f"export made dimension {d} of {ph.name} static ({int(size)})")
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.pt2")  # torch wants the .pt2 suffix
    try:
        march = host_march(device)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp),
                                                 inductor_configs={"cpp.march": march} if march else None)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def flat_example(inputs, example: dict[str, Any]) -> list[Any]:
    given = dict(flatten_with_paths(example))
    return [given[s.path] if s.kind == "tensor" else s.value for s in inputs]


class Ranks(Protocol):
    """How the ranks of a parallel program's lowering agree (dacc/compiler/lowering_ranks.py): one
    rank builds each package, every rank checks it on its own boundary values (its collectives
    exchange data with the others, so all of them run every check, in the same order)."""
    builds: bool

    def share(self, why: str | None) -> str | None:  # the building rank's outcome, on every rank
        ...

    def worst(self, error: float) -> float:  # the largest error over the ranks
        ...


def symbol_exprs(runner) -> dict[Any, str]:
    """The program's size symbols as they appear in its traced shapes -> their manifest names."""
    nodes = {n.name: n for n in runner.weights.graph.nodes}
    index = {spec.path: k for k, spec in enumerate(runner.spec.inputs)}
    found = {}
    for sym in runner.spec.symbols:
        size = nodes[runner.placeholder_names[index[sym.input]]].meta["val"].shape[sym.dim]
        if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
            found[size.node.expr] = sym.name
    return found


def lower_program(runner, inputs, examples: list[dict[str, Any]], device: str, log: Callable[[str], None],
                  ranks: Ranks | None = None) -> ProgramLowering:
    """Lower every segment of `runner` (a runtime ProgramRunner over the program being compiled);
    `ranks` when the program is partitioned and this is one of its ranks."""
    result = ProgramLowering(device)
    specs = runner.spec.segments
    source = {n.name: n for n in runner.weights.graph.nodes}
    symbol_names = symbol_exprs(runner)
    move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
    recorded: list[list[list[Any]]] = []  # per example, per segment: its arguments
    carriers: list[dict[str, torch.Tensor]] = []  # per example: the size carriers
    with torch.no_grad():
        for example in examples:
            flat = list(map(move, flat_example(inputs, example)))
            carriers.append(runner.size_carriers(flat, torch.device(device)))
            env = dict(zip(runner.placeholder_names, flat))
            per_segment = []
            for i, seg in enumerate(specs):
                args = [env[n] for n in seg.inputs]
                per_segment.append([*args, *runner._weights[i]])
                env.update(zip(seg.outputs, runner.run_segment(i, args)))
            recorded.append(per_segment)

    def package_args(canon: Canonical, example: int, i: int) -> list[torch.Tensor]:
        # fresh carriers: export would take one tensor passed twice (equal sizes) for one size
        return ([recorded[example][i][k].contiguous() for k in canon.args]
                + [torch.empty_like(carriers[example][name]) for name in canon.sizes])

    groups: dict[str, list[tuple[int, Canonical]]] = {}
    for i, seg in enumerate(specs):
        try:
            if seg.num_nodes < MIN_NODES:
                raise NotLowerable(f"{seg.num_nodes} node(s): cheaper as a graph than as a package call")
            metas = [source[n].meta.get("val") for n in seg.inputs]
            canon = canonical(runner.segments[i], recorded[0][i], metas, len(seg.inputs), device, symbol_names)
        except NotLowerable as exc:
            result.unlowered[seg.name] = str(exc)
            continue
        groups.setdefault(canon.key, []).append((i, canon))
    store = cache_dir() / target_tag(device)
    store.mkdir(parents=True, exist_ok=True)
    for n, (key, members) in enumerate(groups.items(), start=1):
        first, canon = members[0]
        names = ", ".join(specs[i].name for i, _ in members)
        path, seconds, why = store / f"{key}.pt2", 0.0, None
        if ranks is None or ranks.builds:
            try:
                if not path.is_file():
                    log(f"lowering [{n}/{len(groups)}] {names} ({canon.num_nodes} nodes) ...")
                    start = time.perf_counter()
                    # the example with the largest dynamic sizes: export would fix a size of 1 (the
                    # batch a CFG rank holds of a batch of 2) as a constant
                    example = max(range(len(recorded)),
                                  key=lambda e: _smallest_dynamic(canon, package_args(canon, e, first)))
                    values = {sym: int(carriers[example][name].shape[0]) for sym, name in symbol_names.items()}
                    build(canon, build_args(canon, package_args(canon, example, first), values), path, device)
                    seconds = time.perf_counter() - start
                    log(f"lowering [{n}/{len(groups)}] built in {seconds:.1f} s")
                else:
                    log(f"lowering [{n}/{len(groups)}] {names}: package from the compile cache")
            except Exception as exc:  # an Inductor failure: the segments still run as graphs
                why = _reason(exc)
        if ranks is not None:
            why = ranks.share(why)
        if why is None:
            why = _check(path, runner, members, recorded, package_args, ranks)
        if why is not None:
            for i, _ in members:
                result.unlowered[specs[i].name] = why
            if ranks is None or ranks.builds:
                path.unlink(missing_ok=True)  # never reuse a package that failed
            log(f"warning: {names} stay unlowered: {why}")
            continue
        file = f"lowered-{key[:16]}.pt2"
        result.packages[file] = Package(file, key, path, canon.num_nodes, round(seconds, 2))
        for i, canon_i in members:
            result.calls[specs[i].name] = LoweredCall(file, canon_i.args, canon_i.sizes)
    return result


def build_args(canon: Canonical, args: list[torch.Tensor], values: dict[Any, int]) -> list[torch.Tensor]:
    """What export traces the package from: `args` when every dynamic size, of an argument or of a
    value computed inside (a CFG prologue's half batch), is at least 2, else zeros of the shapes
    the segment takes with the symbols behind the small sizes doubled (a batch of 1 per rank: 2).
    Export reads shapes, not values, and the package is then checked on the real ones, size 1
    included."""
    sizes = canon.inner | {e for dims in canon.exprs for e in dims.values()}
    for _ in range(4):
        small = {sym for e in sizes if int(e.subs(values)) < 2 for sym in e.free_symbols}
        if not small:
            break
        values = {sym: 2 * max(v, 1) if sym in small else v for sym, v in values.items()}
    else:
        return args  # export will say which size it fixed
    out = []
    for a, dims in zip(args, canon.exprs):
        shape = [int(dims[d].subs(values)) if d in dims else size for d, size in enumerate(a.shape)]
        out.append(a if shape == list(a.shape) else torch.zeros(shape, dtype=a.dtype, device=a.device))
    return out


def _smallest_dynamic(canon: Canonical, args: list[torch.Tensor]) -> int:
    return min((a.shape[d] for a, dims in zip(args, canon.dynamic) for d in dims or {}), default=0)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, NotLowerable) else \
        f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _check(path: Path, runner, members, recorded, package_args, ranks: Ranks | None) -> str | None:
    """Why the package at `path` cannot serve its segments (None when it matches every one on every
    example). Every check runs even after one fails, so that ranks stay in step."""
    worst, tol, why = 0.0, 1.0, None
    try:
        loader = LoadedPackage(path).loader
        with torch.no_grad():
            for i, canon in members:
                for e, per_segment in enumerate(recorded):
                    ref = list(runner.segments[i](*per_segment[i]))
                    got = loader.run(package_args(canon, e, i))
                    dtype = next((r.dtype for r in ref if isinstance(r, torch.Tensor)), torch.float32)
                    tol = min(tol, TOLERANCE.get(dtype, 1e-2))
                    worst = max(worst, rel_error(got, ref))
    except Exception as exc:
        worst, why = float("inf"), _reason(exc)
    if ranks is not None:
        worst = ranks.worst(worst)
    if worst > tol:
        if why is None and worst == float("inf"):
            why = "the package failed on another rank (its error is in that rank's output)"
        return why or f"the package differs from the graph (relative error {worst:.2e} > {tol:g})"
    return None


def lowering_spec(device: str, lowerings: list[ProgramLowering | None]) -> tuple[LoweringSpec | None, dict[str, Path]]:
    """The manifest's lowering table over every program, and the package files to ship."""
    if all(low is None for low in lowerings):
        return None, {}
    packages: dict[str, PackageSpec] = {}
    files: dict[str, Path] = {}
    unlowered: dict[str, str] = {}
    for i, low in enumerate(lowerings):
        if low is None:
            continue
        for file, pkg in low.packages.items():
            packages.setdefault(file, PackageSpec(file, pkg.key, [], pkg.num_nodes, pkg.build_seconds))
            files[file] = pkg.path
        for seg, call in low.calls.items():
            packages[call.package].segments.append(f"program{i}/{seg}")
        unlowered.update({f"program{i}/{seg}": why for seg, why in low.unlowered.items()})
    spec = LoweringSpec(backend="inductor", device=device, torch_version=torch.__version__,  # type: ignore[arg-type]
                        cpu_isa=cpu_isa() if device == "cpu" else "", cuda_arch=cuda_arch() if device == "cuda" else None,
                        packages=list(packages.values()), unlowered=unlowered)
    return spec, files
