"""`dacc.load()`: a drop-in nn.Module that executes a compiled artifact step by step."""
from __future__ import annotations

import contextlib
import importlib
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.utils._pytree as pytree

from dacc.runtime.cache import Action, GateState, StepRecord, decide, record, skipped_residuals
from dacc.runtime.eager_step import EagerStep
from dacc.runtime.graph_step import Capture, GraphStep, cuda_capture
from dacc.kernels.ops import missing_support
from dacc.kernels.schemes import SCHEMES
from dacc.runtime.artifact import load_program, load_weights, read_manifest
from dacc.runtime.inputs import flatten_with_paths
from dacc.kernels.collectives import bind_groups, bound_groups
from dacc.runtime.fsdp import ShardedWeights, meta_weights
from dacc.runtime.lowered import LoweredMode, load_packages
from dacc.runtime.program import ProgramRunner
from dacc.runtime.ranks import bind_mesh
from dacc.runtime.steps import SegmentStats, StepCounter
from dacc.schema.dtypes import dtype_text
from dacc.schema.errors import DaccError
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.manifest import WEIGHTS_FILE, Manifest
from dacc.schema.signature import KeyLike

try:  # a diffusers pipeline reads `transformer.config.<key>`; FrozenDict gives it attribute access
    from diffusers.configuration_utils import FrozenDict as _ConfigDict
except ImportError:  # pragma: no cover - diffusers is a dependency, but stay usable without it
    class _ConfigDict(dict):
        __getattr__ = dict.__getitem__


class CompiledTransformer(torch.nn.Module):
    def __init__(self, manifest: Manifest, runners: list[ProgramRunner], out_specs: list[Any], source: str,
                 groups: dict | None = None, cuda_graphs: bool = False):
        super().__init__()
        self._graph_steps: dict[tuple, GraphStep] = {}  # (context, program, input shapes)
        self._gate_states: dict[tuple[str, int], list[GateState]] = {}  # (context, program): one per gate
        self.cuda_graphs = cuda_graphs
        self._graph_capture: Capture | None = None  # None: CUDA graphs; tests hand in eager_capture
        self._graph_notes: set[str] = set()
        self._groups = groups or {}  # this artifact's process groups by role (dacc/runtime/ranks.py)
        self.manifest = manifest
        self.source = source
        self.programs = torch.nn.ModuleList(runners)
        self._out_specs = out_specs
        self.config = _ConfigDict(manifest.model_config)
        self._input_paths = [i.path for i in manifest.programs[0].inputs]
        self._context = "default"
        self._counters: dict[str, StepCounter] = {}
        self._stats = SegmentStats()
        # set by calibration: (context, step, probe stat, action, outputs, the gated range's residuals
        # when it computed) per call
        self._recorder: list | None = None
        self._flops_fns = [self._compile_flops(r) for r in runners]
        self._output_cls = self._resolve_output_type()

    # -- the drop-in surface ------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to(self, *args: Any, **kwargs: Any):
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._refuse_dtype(dtype)
        return super().to(*args, **kwargs)

    def half(self):
        self._refuse_dtype(torch.float16)
        return super().half()

    def bfloat16(self):
        self._refuse_dtype(torch.bfloat16)
        return super().bfloat16()

    def float(self):
        self._refuse_dtype(torch.float32)
        return super().float()

    def double(self):
        self._refuse_dtype(torch.float64)
        return super().double()

    def _refuse_dtype(self, dtype: torch.dtype | None) -> None:
        """The programs were traced in one dtype (their graphs cast with it): converting the weights
        would make every call fail inside torch, so say so now."""
        if dtype is not None and dtype.is_floating_point and dtype != self.dtype:
            raise DaccError(f"cannot convert a compiled transformer to {dtype}: it was compiled for "
                            f"{self.dtype} and serves only that dtype", self.source,
                            f"build the model in {dtype} in the model file and recompile")

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        params = list(self.parameters())
        if params:
            for runner in self.programs:
                runner.retarget(params[0].device)
            low = self.manifest.lowering
            if low is not None and not all([r.use_packages(params[0].device, low.device) for r in self.programs]):
                warnings.warn(f"{self.source}: its compiled packages were built for {low.device}; on "
                              f"{params[0].device} the segments run unlowered", stacklevel=3)
        for runner in self.programs:
            runner.refresh_weights()
        self._drop_graphs()  # captured graphs read the old tensors' memory
        return result

    def load_state_dict(self, *args: Any, **kwargs: Any):
        result = super().load_state_dict(*args, **kwargs)
        for runner in self.programs:  # assign=True swaps the tensors the segments were handed
            runner.refresh_weights()
        self._drop_graphs()
        return result

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps replay as CUDA graphs where they can (dacc/runtime/graph_step.py)."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        if on != getattr(self, "_cuda_graphs", on):
            self._drop_graphs()  # what one path cached, the other cannot use
        self._cuda_graphs = bool(on)

    def _drop_graphs(self) -> None:
        """Forget captured graphs, and the cache state (held in their buffers, or in tensors
        elsewhere): the next call starts its gates afresh."""
        self._graph_steps.clear()
        self._gate_states.clear()

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """Keep steps and cache state per named context (one per CFG branch)."""
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def reset(self) -> None:
        self._counters.clear()
        self._gate_states.clear()  # captured graphs stay: their buffers are refilled by the next generation
        self._stats = SegmentStats()

    def stats(self, decision_map: str | Path | None = None) -> dict:
        """Counters since load or reset(); `decision_map="map.png"` also draws, for the last
        generation of each context, which segment was computed, reused or forecast at each step."""
        from dacc.runtime.decision_map import decision_key, draw_decision_map, maps_from_decisions  # PIL: on demand

        out = self._stats.as_dict(self._counters)
        out["decisions"] = {decision_key(ctx, i, g, len(states)): list(s.decisions)
                            for (ctx, i), states in self._gate_states.items() for g, s in enumerate(states)}
        if decision_map is not None:
            draw_decision_map(maps_from_decisions(self.manifest.programs, out["decisions"]), decision_map)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise DaccError(f"{len(args)} positional argument(s) given to a compiled transformer",
                            self.source, "call it with keyword arguments, as diffusers pipelines do")
        return_dict = kwargs.pop("return_dict", True)
        if bound_groups() is not self._groups:  # another artifact, on another mesh, ran in between
            bind_groups(self._groups)
        flat = self._flatten(kwargs)
        index, runner = self._select(flat)
        counter = self._counters.setdefault(self._context, StepCounter(self.manifest.num_inference_steps))
        shapes = (index, *(tuple(v.shape) for v in flat if isinstance(v, torch.Tensor)))
        # new sizes mid-generation (another resolution or batch): cached residuals no longer fit, so
        # this call starts a new generation instead of mixing the two
        counter.advance(self._timestep(flat), shapes)
        with torch.no_grad():
            try:
                outs = self._execute(index, runner, flat, counter)
            finally:
                if runner.sharded is not None:
                    runner.sharded.release()
        result = pytree.tree_unflatten(outs, self._out_specs[index])
        if return_dict and self._output_cls is not None:
            fields = self.manifest.output_type.fields
            seq = result if isinstance(result, (tuple, list)) else (result,)
            return self._output_cls(**dict(zip(fields, seq)))
        return result

    # -- execution ------------------------------------------------------------------------------
    def _execute(self, index: int, runner: ProgramRunner, flat: list[Any], counter: StepCounter) -> list[Any]:
        runner.bind_sizes(flat)
        seg_flops = self._flops_fns[index](flat)
        specs, gates = runner.spec.segments, runner.spec.gates
        stats = self._stats
        step = self._executor(index, runner, flat)

        def counted(lo: int, hi: int) -> None:  # segments lo..hi ran
            stats.segments_computed += hi - lo
            stats.flops_computed += sum(seg_flops[lo:hi])

        stats.calls += 1
        stats.flops_total += sum(seg_flops)
        key = (self._context, index)
        if key not in self._gate_states:  # not setdefault: a list of fresh states on every call would be waste
            self._gate_states[key] = [GateState() for _ in gates]
        states = self._gate_states[key]
        recorded, done = [], 0
        for g, (gate, state) in enumerate(zip(gates, states)):
            if counter.fresh:  # a new generation (new sizes start one too: StepCounter.advance)
                state.new_generation()
            probe, stat = step.probe(g, gate, state, done)
            counted(done, gate.skip_first)
            done = gate.skip_last + 1
            action = decide(gate, state, counter.step, self.manifest.num_inference_steps, probe, stat)
            residuals = None
            if action is Action.COMPUTE:
                computed = step.compute(g, gate, state, counter.step)
                counted(gate.skip_first, done)
                if self._recorder is not None:
                    residuals = [o - i for i, o in zip(computed.inputs, computed.outputs)]
                record(gate, state, counter.step, action, computed)
            else:
                if self._recorder is not None:
                    residuals = skipped_residuals(gate, state, counter.step, action)
                step.skip(g, gate, state, counter.step, action)
                record(gate, state, counter.step, action, None)
                stats.segments_reused += done - gate.skip_first
            recorded.append((g, state.last_stat, action.value, residuals, state.prev_probe,
                             sum(seg_flops[gate.skip_first:done])))
        outputs = step.finish(done)
        counted(done, len(specs))
        if self._recorder is not None:
            outputs = [o for o, name in zip(outputs, runner.output_values) if isinstance(name, str)]
            self._recorder += [StepRecord(self._context, counter.step, stat, action, outputs, residuals, probe, g, flops)
                               for g, stat, action, residuals, probe, flops in recorded]
        return outputs

    def _executor(self, index: int, runner: ProgramRunner, flat: list[Any]) -> EagerStep | GraphStep:
        """CUDA graphs where they can serve (see dacc/runtime/graph_step.py), else op by op."""
        capture = self._graph_capture
        if not self.cuda_graphs or self._recorder is not None:
            return EagerStep(runner, flat)
        on_cuda = runner.weights_device().type == "cuda"
        why = ("the weights are not on a CUDA device" if capture is None and not on_cuda
               else "graphs do not hold collectives yet: this artifact has parallel degrees" if self._groups
               else "graphs do not hold collectives yet: this artifact shards its weights" if runner.sharded
               else None)
        if why is not None:
            if why not in self._graph_notes:
                self._graph_notes.add(why)
                warnings.warn(f"{self.source}: cuda_graphs=True: running op by op because {why}", stacklevel=4)
            return EagerStep(runner, flat)
        key = (self._context, index, *(tuple(v.shape) for v in flat if isinstance(v, torch.Tensor)))
        step = self._graph_steps.get(key)
        if step is None:
            pool = torch.cuda.graph_pool_handle() if capture is None else None
            step = self._graph_steps[key] = GraphStep(runner, flat, capture or cuda_capture, pool, self.source)
        return step.bind(flat, self._stats)

    def _flatten(self, kwargs: dict[str, Any]) -> list[Any]:
        given = dict(flatten_with_paths(kwargs))
        flat = []
        for spec in self.manifest.programs[0].inputs:
            if spec.path == "return_dict":  # traced as False; the dataclass is rebuilt in forward()
                flat.append(spec.value)
                continue
            if spec.path not in given:
                if spec.kind == "constant" and spec.value is None:
                    flat.append(None)
                    continue
                raise DaccError(f"missing argument '{spec.path}'", self.source,
                                f"pass {spec.path}= as in the example inputs the artifact was compiled with")
            value = given.pop(spec.path)
            if spec.kind == "constant" and value != spec.value:
                raise DaccError(f"argument '{spec.path}' = {value!r} differs from the compiled value {spec.value!r}",
                                self.source, "pass the compiled value, or recompile with this value in example_inputs()")
            flat.append(value)
        extra = {k: v for k, v in given.items() if v is not None and not _is_empty(v)}
        if extra:
            raise DaccError(f"argument(s) {', '.join(sorted(extra))} were not part of the compiled call", self.source,
                            "add them to example_inputs() in the model file and recompile")
        return flat

    def _select(self, flat: list[Any]) -> tuple[int, ProgramRunner]:
        found = []
        for i, runner in enumerate(self.programs):
            why = runner.mismatch(flat)
            if why is None:
                return i, runner
            found.append((i, runner, *why))
        shapes = ", ".join(f"{p}={tuple(v.shape)} {dtype_text(v.dtype)}" for p, v in zip(self._input_paths, flat)
                           if isinstance(v, torch.Tensor))
        kinds = {kind for _, _, kind, _ in found}
        reasons = "; ".join(f"program {i} ({r.describe()}): {why}" for i, r, _, why in found)
        if kinds == {"dtype"}:
            fix = (f"cast the inputs to the dtype the artifact was compiled for ({self._traced_dtypes()}); "
                   "to run in another dtype, build the model in that dtype in the model file and recompile")
        elif kinds & {"type", "rank"} == kinds:
            fix = "pass the inputs with the structure of example_inputs() in the model file"
        else:
            fix = "add this shape to more_example_inputs() in the model file and recompile"
        raise DaccError(f"no compiled program accepts these inputs ({shapes}); {reasons}", self.source, fix)

    def _traced_dtypes(self) -> str:
        return ", ".join(sorted({i.dtype for i in self.manifest.programs[0].inputs if i.kind == "tensor"}))

    def _timestep(self, flat: list[Any]) -> float | None:
        name = self.manifest.timestep_input
        if name is None or name not in self._input_paths:
            return None
        t = flat[self._input_paths.index(name)]
        if not isinstance(t, torch.Tensor) or not t.numel():
            return None
        first = t.tolist()  # one dispatch (indexing first would cost three)
        while isinstance(first, list):
            first = first[0]
        return float(first)

    def _compile_flops(self, runner: ProgramRunner):
        """Per-segment FLOPs for the current input sizes (evaluated once per shape)."""
        names = [s.name for s in runner.spec.symbols]
        where = [(self._input_paths.index(s.input), s.dim) for s in runner.spec.symbols]
        cache: dict[tuple, list[float]] = {}

        def evaluate_flops(flat: list[Any]) -> list[float]:
            key = tuple(int(flat[i].shape[d]) for i, d in where)
            if key not in cache:
                env = dict(zip(names, key))
                cache[key] = [float(evaluate(s.flops_tree, env, f"FLOPs of {s.name}", NUMBER)) for s in runner.spec.segments]
            return cache[key]
        return evaluate_flops

    def _resolve_output_type(self):
        ot = self.manifest.output_type
        if ot is None:
            return None
        if not ot.module.startswith("diffusers."):
            raise DaccError(f"output type {ot.module}.{ot.qualname} is not a diffusers output", self.source,
                            "recompile the artifact")
        try:
            return getattr(importlib.import_module(ot.module), ot.qualname)
        except (ImportError, AttributeError) as exc:
            raise DaccError(f"cannot import output type {ot.module}.{ot.qualname}: {exc}", self.source,
                            "install the diffusers version recorded in the manifest") from None


def _is_empty(v: Any) -> bool:
    return isinstance(v, (dict, list, tuple)) and not v


def _check_kernels(manifest: Manifest, where: str) -> None:
    """A quantized linear needs torch's integer or float8 matmul: refuse early, by name."""
    for mode in sorted({s.quant for spec in manifest.programs for s in spec.linears if s.quant != "none"}):
        scheme = SCHEMES.get(mode)
        why = f"it uses quantize mode '{mode}', unknown to this dacc" if scheme is None else \
            missing_support(scheme.op_name)
        if why:
            raise DaccError(f"this artifact cannot run here: {why}", where,
                            f"install torch {manifest.torch_version} (the version that compiled it), or "
                            "recompile with another quantize.mode")


def load(path: str | Path, trusted_keys: Iterable[KeyLike] | None = None, *, lowered: LoweredMode = "use",
         allow_native_code: bool = False, cuda_graphs: bool = False,
         _allow_incomplete: bool = False) -> CompiledTransformer:
    """Load an artifact written by `dacc compile`: verifies the signature (with `trusted_keys`) and
    hashes, reads programs by allow-list, never unpickles. Compiled packages (plan `lower`) are
    native code: they load only from a signed artifact verified with `trusted_keys`, or with
    `allow_native_code=True`. `lowered="fallback"` runs the unlowered segments, with a warning,
    where the packages cannot be used (another device, torch or CPU, or no trust); "off" never
    loads them; "use" (the default) refuses such an artifact with the reason. `cuda_graphs=True`
    replays each step's pieces as CUDA graphs once the weights are on a CUDA device, captured per
    input shape and cache context (dacc/runtime/graph_step.py); elsewhere it has no effect."""
    root = Path(path)
    if lowered not in ("use", "fallback", "off"):
        raise DaccError(f"lowered={lowered!r} is not one of 'use', 'fallback', 'off'", str(root),
                        "pass lowered=\"use\", \"fallback\" or \"off\"")
    manifest = read_manifest(root, trusted_keys, allow_incomplete=_allow_incomplete)
    _check_kernels(manifest, str(root))
    mesh, groups = bind_mesh(manifest.parallel, str(root))  # before anything heavy: a wrong world size fails at once
    loaders = load_packages(root, manifest, lowered, trusted_keys is not None or allow_native_code)
    weights = load_weights(root, WEIGHTS_FILE)
    shards = meta_weights(manifest.fsdp) if manifest.fsdp else {}  # placed per rank once the units exist
    shared: dict[str, torch.nn.Parameter] = {}
    runners, out_specs = [], []
    for spec in manifest.programs:
        ep = load_program(root, spec.file, {**weights, **shards}, shared)
        runners.append(ProgramRunner(ep, spec, str(root / spec.file), loaders))
        out_specs.append(ep.call_spec.out_spec)
    if manifest.fsdp is not None:  # one program (the compiler checks)
        fsdp_mesh = mesh["fsdp"]
        name = manifest.fsdp.files[fsdp_mesh.get_local_rank()]
        runners[0].sharded = ShardedWeights(runners[0].weights, manifest.fsdp, fsdp_mesh, weights, root / name,
                                            manifest.files[name], [s.name for s in manifest.programs[0].segments])
    if manifest.lowering is not None:  # weights load on the CPU: CUDA packages wait for .to("cuda")
        for runner in runners:
            runner.use_packages(torch.device("cpu"), manifest.lowering.device)
    return CompiledTransformer(manifest, runners, out_specs, str(root), groups, cuda_graphs)
