"""One compiled program at run time: its segments as small GraphModules, its input checks.

Segments are cut mechanically from the graph by the `segment` annotation the compiler left on
every node; the boundary values found here must equal the manifest's, or the artifact is refused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram

from dacc.schema.dtypes import dtype_text
from dacc.schema.errors import DaccError
from dacc.schema.expr import BOOL, evaluate
from dacc.runtime.lowered import LoadedPackage, LoweredSegment, package_arity
from dacc.schema.manifest import RECOMPILE, ProgramSpec, SegmentSpec, node_segment


def _cut(gm: fx.GraphModule, spec: SegmentSpec, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list[str]]:
    """The segment as a GraphModule taking its inputs, then its weights, as arguments: weights
    read as attributes cost several nn.Module.__getattr__ calls each, on every call."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in spec.inputs:
        env[by_name[name]] = graph.placeholder(name)
    weights: list[str] = []
    for node in nodes:
        for inp in node.all_input_nodes:
            if inp not in env and inp.op == "get_attr":
                weights.append(inp.target)
                env[inp] = graph.placeholder(f"w_{inp.name}")
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[by_name[o]] for o in spec.outputs))
    return fx.GraphModule(torch.nn.Module(), graph, class_name=f"Segment_{spec.name.replace('.', '_')}"), weights


def _fetch(root: torch.nn.Module, target: str) -> torch.Tensor:
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _boundaries(nodes: list[fx.Node], gate_reads: set[str]) -> tuple[list[str], list[str]]:
    inside = set(nodes)
    inputs: list[str] = []
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp not in inside and inp.op != "get_attr" and inp.name not in inputs:
                inputs.append(inp.name)
    outputs = [n.name for n in nodes if any(u not in inside for u in n.users) or n.name in gate_reads]
    return inputs, outputs


class ProgramRunner(torch.nn.Module):
    def __init__(self, ep: ExportedProgram, spec: ProgramSpec, where: str, loaders: dict[str, LoadedPackage] | None = None):
        super().__init__()
        self.spec = spec
        gm = ep.module()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(spec.inputs):
            raise DaccError(f"program has {len(placeholders)} inputs, manifest lists {len(spec.inputs)}", where)
        self.placeholder_names = [n.name for n in placeholders]
        members: dict[str, list[fx.Node]] = {s.name: [] for s in spec.segments}
        for node in gm.graph.nodes:
            if node.op == "call_function":
                label = node_segment(node.meta)
                if label not in members:
                    raise DaccError(f"graph node {node.name} has segment {label!r} unknown to the manifest", where)
                members[label].append(node)
        segments, self._weight_targets = [], []
        gate_reads = set().union(*(g.reads() for g in spec.gates))
        for seg in spec.segments:
            found = _boundaries(members[seg.name], gate_reads)
            if found != (seg.inputs, seg.outputs):
                raise DaccError(f"segment {seg.name}: graph boundaries {found} differ from the manifest", where)
            module, targets = _cut(gm, seg, members[seg.name])
            segments.append(module)
            self._weight_targets.append(targets)
        self.segments = torch.nn.ModuleList(segments)
        self.weights = gm  # owns the parameters and buffers (moved by .to()); segments get theirs as arguments
        self.refresh_weights()
        self._packages = self._attach(loaders or {}, where)
        self._lowered = list(self._packages)  # emptied while the weights are on another device
        out = next(n for n in gm.graph.nodes if n.op == "output")
        self.output_values = [a.name if isinstance(a, fx.Node) else a for a in out.args[0]]
        self._input_index = {i.path: k for k, i in enumerate(spec.inputs)}
        self._symbol_at = {s.name: (self._input_index[s.input], s.dim) for s in spec.symbols}
        self._carriers: dict[str, torch.Tensor] = {}
        self._carrier_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._accepted: set[tuple] = set()
        self.sharded = None  # ShardedWeights under parallel.fsdp (dacc/runtime/fsdp.py), set by load()

    def refresh_weights(self) -> None:
        """Re-read each segment's weight tensors (after .to() and friends replaced them)."""
        self._weights = [[_fetch(self.weights, t) for t in targets] for targets in self._weight_targets]

    def _attach(self, loaders: dict[str, LoadedPackage], where: str) -> list[LoweredSegment | None]:
        found: list[LoweredSegment | None] = []
        for seg, targets in zip(self.spec.segments, self._weight_targets):
            call = seg.lowered
            if call is None or call.package not in loaders:
                found.append(None)
                continue
            count = len(seg.inputs) + len(targets)
            if len(set(call.args)) != len(call.args) or any(not 0 <= k < count for k in call.args):
                raise DaccError(f"segment {seg.name}: package arguments {call.args[:20]} do not index its "
                                f"{count} arguments", where, RECOMPILE)
            unknown = [n for n in call.sizes if n not in {s.name for s in self.spec.symbols}]
            if unknown:
                raise DaccError(f"segment {seg.name}: package sizes {unknown[:5]} are not program symbols", where,
                                RECOMPILE)
            takes, gives = package_arity(loaders[call.package].loader)
            if (takes, gives) != (len(call.args) + len(call.sizes), len(seg.outputs)):
                raise DaccError(f"segment {seg.name}: package {call.package} takes {takes} tensors and returns {gives}; "
                                f"the segment passes {len(call.args) + len(call.sizes)} and reads {len(seg.outputs)}",
                                where, RECOMPILE)
            found.append(LoweredSegment(loaders[call.package], call.args, call.sizes))
        self._needs_sizes = any(f is not None and f.sizes for f in found)
        return found

    def size_carriers(self, flat: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Each program symbol's value n as a zero-element (n, 0) tensor: a package reads sizes
        that are no dimension of its tensor arguments from these."""
        out = {}
        for name, (i, d) in self._symbol_at.items():
            key = (int(flat[i].shape[d]), device)
            if key not in self._carrier_cache:
                self._carrier_cache[key] = torch.empty((key[0], 0), dtype=torch.float32, device=device)
            out[name] = self._carrier_cache[key]
        return out

    def bind_sizes(self, flat: list[Any]) -> None:
        """Called once per call, before its segments run."""
        if self._needs_sizes:
            self._carriers = self.size_carriers(flat, self.weights_device())

    def weights_device(self) -> torch.device:
        return next((t.device for ws in self._weights for t in ws if isinstance(t, torch.Tensor)), torch.device("cpu"))

    @property
    def lowered_segments(self) -> int:
        return sum(p is not None for p in self._lowered)

    def run_segment(self, i: int, inputs: list[Any], packages: list[LoweredSegment | None] | None = None) -> tuple | list:
        """Segment i on `inputs`: its package where one is in use (from `packages`, instances of
        the caller's own, when given), else its graph."""
        if self.sharded is not None:  # gather the segment's unit; its parameters are whole until freed
            self.sharded.enter(self.spec.segments[i].name)
            return self.segments[i].forward(*inputs, *(_fetch(self.weights, t) for t in self._weight_targets[i]))
        package = (self._lowered if packages is None else packages)[i]
        if package is not None:
            return package([*inputs, *self._weights[i]], self._carriers)
        return self.segments[i].forward(*inputs, *self._weights[i])

    def fresh_packages(self) -> list[LoweredSegment | None]:
        """A new instance of each package in use, one per segment (dacc/runtime/graph_step.py)."""
        return [p.fresh() if p is not None else None for p in self._lowered]

    def use_packages(self, device: torch.device, package_device: str) -> bool:
        """Packages run only on the device they were built for: elsewhere (after `.to()`) the
        segments run as graphs until the weights come back. Returns whether packages are in use."""
        here = device.type == package_device
        self._lowered = list(self._packages) if here else [None] * len(self._packages)
        return here or not any(self._packages)

    def retarget(self, device: torch.device) -> None:
        """Point the graph's tensor factories (arange, to, ...) at `device`: torch.export records
        the device the model was traced on, and `artifact.to("cuda")` must move them too."""
        def swap(a: Any) -> Any:
            return device if isinstance(a, torch.device) and a != device else a
        for seg in self.segments:
            changed = False
            for node in seg.graph.nodes:
                args, kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
                if args != node.args or kwargs != node.kwargs:
                    node.args, node.kwargs, changed = args, kwargs, True
            if changed:
                seg.recompile()

    # -- input checks -----------------------------------------------------------------------
    def mismatch(self, flat: list[Any]) -> tuple[str, str] | None:
        """Why this program cannot run `flat` as (kind, reason), kind one of "type", "dtype",
        "rank", "shape"; None when it can. Kinds and ranks are checked before sizes, so a wrong
        rank is reported as one, not as a size out of range."""
        key = tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in flat)
        if key in self._accepted:
            return None
        for spec, v in zip(self.spec.inputs, flat):
            if spec.kind != "tensor":
                continue
            if not isinstance(v, torch.Tensor):
                return "type", f"{spec.path} must be a tensor, got {type(v).__name__}"
            if dtype_text(v.dtype) != spec.dtype:
                return "dtype", f"{spec.path} has dtype {v.dtype}, the artifact was compiled for {spec.dtype}"
            if v.dim() != len(spec.shape):
                return "rank", (f"{spec.path} has {v.dim()} dims {tuple(v.shape)}, expected {len(spec.shape)} "
                                f"[{', '.join(spec.shape)}]")
        values: dict[str, int] = {}
        for sym in self.spec.symbols:
            idx = self._input_index[sym.input]
            size = int(flat[idx].shape[sym.dim])
            if size < sym.min or (sym.max is not None and size > sym.max):
                bound = f"at least {sym.min}" if sym.max is None else f"in [{sym.min}, {sym.max}]"
                return "shape", f"{sym.input} dim {sym.dim} is {size}; this program needs it {bound}"
            values[sym.name] = size
        for spec, v in zip(self.spec.inputs, flat):
            if spec.kind != "tensor":
                continue
            for d, (size, dim) in enumerate(zip(v.shape, spec.shape)):
                want = int(dim) if dim.isdigit() else values[dim]
                if int(size) != want:
                    return "shape", f"{spec.path} dim {d} = {int(size)}, expected {dim} = {want}"
        for tree, text in zip(self.spec.guards, self.spec.guard_text):
            try:
                holds = evaluate(tree, values, f"shape condition {text}", BOOL)
            except DaccError as exc:  # e.g. a division by a size that is 0 here: not this program's shapes
                return "shape", exc.what
            if not holds:
                return "shape", f"shape condition {text} does not hold"
        self._accepted.add(key)
        return None

    def describe(self) -> str:
        return ", ".join(f"{i.path}=[{', '.join(i.shape)}]" for i in self.spec.inputs if i.kind == "tensor")
