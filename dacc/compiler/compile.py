"""`dacc compile`: model file + plan -> artifact. Trace, run the pipeline, write, verify."""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import dacc
from dacc.compiler.choose_parallel import choose_parallel
from dacc.compiler.calibrate import (adopt_calibration, calibrate, check_calibration_inputs, needs_calibration,
                                    plan_needs_calibration)
from dacc.compiler.artifact import model_config, write_artifact
from dacc.compiler.output import check_output_path, deferred_signals, discard, reserve
from dacc.compiler.invariants import check_invariants
from dacc.compiler.ir import ProgramIR, Traced
from dacc.compiler.lowering import lowering_spec
from dacc.compiler.model_file import ModelFile, load_model_file
from dacc.compiler.passes import run_pipeline
from dacc.compiler.quant_search import choose_exclusions
from dacc.compiler.gptq import measure_hessians
from dacc.compiler.smoothing import measure_smoothing
from dacc.compiler.pipeline import PIPELINE, QUANTIZED_REFERENCE, UNLOWERED
from dacc.compiler.printer import print_graph
from dacc.compiler.segments import segment_specs, sites
from dacc.compiler.trace import eager_reference, program_outputs, rel_error, tolerance, trace
from dacc.runtime.launch import run_local
from dacc.schema.errors import DaccError
from dacc.schema.expr import to_tree
from dacc.schema.manifest import (GRAPH_FILE, PLAN_FILE, SCHEMA_VERSION, FsdpSpec, Manifest, OutputType,
                                  ParallelSpec, PassRecord, ProgramSpec, fsdp_file)
from dacc.schema.plan import ParallelPlan, Plan, load_plan

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


def _diffusers_version() -> str | None:
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return None


def _guards(ir: ProgramIR) -> tuple[list, list[str]]:
    trees, texts, exact = [], [], False
    for g in ir.guards() + ir.partition_guards:
        if str(g) in texts:
            continue
        try:
            trees.append(to_tree(g))
            texts.append(str(g))
        except ValueError:
            exact = True  # a condition dacc cannot evaluate: serve the traced sizes only
    if exact:
        for spec in ir.symbol_specs():
            size = int(ir.traced.example_shapes()[spec.input][spec.dim])
            trees.append(["eq", ["sym", spec.name], size])
            texts.append(f"Eq({spec.name}, {size})")
    return trees, texts


def program_spec(ir: ProgramIR, index: int, where: str) -> ProgramSpec:
    placeholders = {n.name: n for n in ir.graph.nodes if n.op == "placeholder"}
    symbols = {s.name for s in ir.symbol_specs()}
    inputs = []
    for spec, name in zip(ir.traced.inputs, ir.user_inputs):
        shape = [str(d) for d in ir.shape(placeholders[name])] if spec.kind == "tensor" else []
        for dim in shape:
            if not (dim.isdigit() or dim in symbols):
                # the frontend retraces such dims as static (dynamic_dims.py); reaching this is a bug
                raise DaccError(f"input '{spec.path}' has size {dim}, derived from other inputs' sizes", where,
                                f"declare that dim of '{spec.path}' static (None) in dynamic_shapes(), and report "
                                "this model")
        inputs.append(type(spec)(**{**spec.__dict__, "shape": shape}))
    guards, guard_text = _guards(ir)
    attention, linears = sites(ir)
    example = ir.traced.example_shapes()
    return ProgramSpec(file=f"program{index}.pt2", inputs=inputs, symbols=ir.symbol_specs(),
                       example_shapes=example, outputs=ir.output_names(), guards=guards, guard_text=guard_text,
                       segments=segment_specs(ir),
                       attention=attention, linears=linears, gates=ir.cache_gates)


@dataclass
class TracedModel:
    """A model file after tracing: what every plan compiled from it starts from."""
    path: Path
    file: ModelFile
    model: torch.nn.Module
    examples: list[dict[str, Any]]
    programs: list[Traced]
    output_type: OutputType | None


def _build(model_path: str | Path) -> tuple[ModelFile, torch.nn.Module]:
    mf = load_model_file(model_path)
    return mf, mf.build()


def trace_model(model_path: str | Path, log: Callable[[str], None] = print,
                built: tuple[ModelFile, torch.nn.Module] | None = None) -> TracedModel:
    mf, model = built or _build(model_path)
    examples = [mf.example_inputs()] + mf.more_example_inputs()
    log(f"tracing {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(examples)} example shape(s))")
    programs, output_type = trace(model, examples, mf.dynamic_shapes(), str(model_path), log)
    return TracedModel(Path(model_path), mf, model, examples, programs, output_type)


def compile_model(model_path: str | Path, plan_path: str | Path | None, out: str | Path, *, force: bool = False,
                  verify: bool = True, log: Callable[[str], None] = print, sign_key: str | Path | None = None,
                  on_graph: Callable[[int, int, str, str], None] | None = None,
                  traced: TracedModel | None = None) -> Manifest:
    """Compile; `on_graph(program, pass_index, pass_name, text)` observes the graph after each pass.
    `traced` (from `trace_model` on the same file) skips tracing: several plans share one trace,
    each on its own copy of the programs, since the passes rewrite them in place."""
    out = Path(out)
    plan = load_plan(plan_path)
    check_output_path(out, force)  # fail before minutes of tracing, not after
    if sign_key is not None and not Path(sign_key).is_file():
        raise DaccError(f"signing key '{sign_key}' does not exist", str(sign_key), "create one with `dacc keygen NAME`")
    built = (traced.file, traced.model) if traced is not None else _build(model_path)
    tmp = None
    try:
        with deferred_signals():  # a Ctrl-C or SIGTERM lands after `tmp` is known, so it is removed
            tmp = reserve(out, force, _state_bytes(built[1]))  # a read-only or full disk fails here
        if traced is None:
            traced = trace_model(model_path, log, built)
            programs = traced.programs
        else:
            programs = [_copy(t) for t in traced.programs]
        return _compile_into(tmp, out, traced, programs, plan, model_path, verify, log, sign_key, on_graph)
    except BaseException:
        if tmp is not None:
            discard(tmp)
        raise


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _compile_into(tmp: Path, out: Path, traced: TracedModel, programs: list[Traced], plan: Plan, model_path,
                  verify: bool, log: Callable[[str], None], sign_key, on_graph) -> Manifest:
    mf, model, examples, output_type = traced.file, traced.model, traced.examples, traced.output_type
    user_plan, quantize_search, parallel_choice = plan, {}, None
    smoothing = measure_smoothing(plan, model, mf.sample, log)
    hessians = measure_hessians(plan, model, mf.sample, log)
    if plan.quantize.mode != "none" and plan.quantize.target_psnr is not None:
        plan, quantize_search = choose_exclusions(plan, model, mf.sample, log, smoothing, hessians)
    if plan.parallel.auto is not None:
        plan, parallel_choice = choose_parallel(
            plan, lambda candidate: partition_manifest(traced, candidate, programs), log, str(model_path))
    # before the passes rewrite the programs in place: the reference quantizes copies of them
    quantized = (quantized_references(programs, plan, smoothing, hessians, model, examples, log)
                 if verify and plan.quantize.mode != "none" else None)
    twin = (_calibrated_twin(traced, programs, plan, smoothing, hessians, log)
            if plan.parallel.world_size > 1 and plan_needs_calibration(plan) else None)
    irs = [_run_passes(ProgramIR(t, smoothing, hessians), plan, PIPELINE, i, log, on_graph)
           for i, t in enumerate(programs)]
    manifest = build_manifest(model, plan, irs, output_type, str(model_path))
    manifest.quantize_search = quantize_search
    manifest.parallel_choice = parallel_choice
    manifest.lowering, packages = lowering_spec(plan.lower.device, [ir.lowering for ir in irs])
    check_calibration_inputs(manifest, plan, mf.sample)  # fail before writing anything
    texts = {PLAN_FILE: user_plan.to_yaml(),
             GRAPH_FILE: "".join(f"# program {i}\n{print_graph(ir)}" for i, ir in enumerate(irs))}

    def finalize(tmp: Path) -> None:
        if verify:
            verify_artifact(tmp, model, examples, log, quantized, world=plan.parallel.world_size)
        if twin is not None:
            adopt_calibration(manifest, twin)
        elif needs_calibration(manifest, plan):
            from dacc.runtime.module import load
            calibrate(manifest, load(tmp, allow_native_code=True, _allow_incomplete=True), plan, mf.sample, log)

    write_artifact(tmp, out, manifest, irs, texts, finalize, Path(sign_key) if sign_key else None, packages)
    log(f"wrote {out}" + (" (signed)" if sign_key else ""))
    return manifest


def _calibrated_twin(traced: TracedModel, programs: list[Traced], plan: Plan, smoothing, hessians,
                     log) -> Manifest | None:
    """For a parallel plan whose gates calibrate: the manifest of its single-process twin (the same
    plan without parallel degrees, written to a scratch directory and calibrated there), whose knobs
    the parallel gates adopt. None when nothing calibrates. The passes run on copies."""
    twin_plan = plan.model_copy(update={"parallel": ParallelPlan()})
    # no lowering: the twin only runs to calibrate, op by op
    irs = _passes_on_copies(programs, twin_plan, UNLOWERED, smoothing, hessians)
    twin = build_manifest(traced.model, twin_plan, irs, traced.output_type, str(traced.path))
    if not needs_calibration(twin, twin_plan):
        return None
    check_calibration_inputs(twin, twin_plan, traced.file.sample)
    log(f"calibrating the cache gates on one process: the plan without its parallel degrees "
        f"({plan.parallel.world_size} ranks), whose gates decide as the ranks' do together")
    from dacc.runtime.module import load

    def calibrate_twin(tmp: Path) -> None:
        calibrate(twin, load(tmp, allow_native_code=True, _allow_incomplete=True), twin_plan, traced.file.sample, log)

    with tempfile.TemporaryDirectory(prefix="dacc-twin-") as scratch:
        out = Path(scratch) / "twin.dacc"
        write_artifact(reserve(out, False, _state_bytes(traced.model)), out, twin, irs, {}, calibrate_twin)
    return twin


def partition_manifest(traced: TracedModel, plan: Plan, programs: list[Traced] | None = None) -> Manifest:
    """The manifest `plan` would compile to, without lowering or writing anything: what
    parallel.auto and the predictions cost. The passes run on copies of the programs."""
    irs = _passes_on_copies(programs or traced.programs, plan, UNLOWERED)
    return build_manifest(traced.model, plan, irs, traced.output_type, str(traced.path))


def _passes_on_copies(programs: list[Traced], plan: Plan, passes, smoothing=None, hessians=None) -> list[ProgramIR]:
    """`passes` run quietly on copies of `programs`, which stay as they are."""
    return [_run_passes(ProgramIR(_copy(t), smoothing, hessians), plan, passes, i, lambda m: None, None)
            for i, t in enumerate(programs)]


def _copy(t: Traced) -> Traced:
    return Traced(copy.deepcopy(t.ep), t.example, t.inputs, t.notes, t.also_serves)


def _run_passes(ir: ProgramIR, plan: Plan, passes, i: int, log, on_graph) -> ProgramIR:
    ir.log = log
    hook = (lambda k, name, text: on_graph(i, k, name, text)) if on_graph else None
    results = run_pipeline(ir, plan, passes, check_invariants, tag=f"program{i}", on_graph=hook)
    for entry, res in zip(passes, results):
        log(f"program {i}: {entry.name}: {'; '.join(res.notes)}")
    return ir


def build_manifest(model: torch.nn.Module, plan: Plan, irs: list[ProgramIR], output_type, where: str) -> Manifest:
    config = model_config(model)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    config_hash = hashlib.sha256(json.dumps({"class": cls, "config": config}, sort_keys=True).encode()).hexdigest()
    paths = [s.path for s in irs[0].traced.inputs if s.kind == "tensor"]
    return Manifest(
        schema_version=SCHEMA_VERSION, dacc_version=dacc.__version__, torch_version=torch.__version__,
        diffusers_version=_diffusers_version(), model_class=cls, model_config=config, config_hash=config_hash,
        passes=[PassRecord(p.name, p.reason) for p in PIPELINE], num_inference_steps=plan.num_inference_steps,
        timestep_input=next((n for n in TIMESTEP_NAMES if n in paths), None), output_type=output_type,
        programs=[program_spec(ir, i, where) for i, ir in enumerate(irs)], files={},
        parallel=parallel_spec(plan),
        fsdp=fsdp_spec(irs, plan.parallel.fsdp, where))


def parallel_spec(plan: Plan) -> ParallelSpec:
    par = plan.parallel
    return ParallelSpec(par.cfg, par.ulysses, par.ring, par.fsdp, par.vae_patch)


def fsdp_spec(irs: list[ProgramIR], degree: int, where: str) -> FsdpSpec | None:
    if degree == 1:
        return None
    if len(irs) > 1:  # the units name program 0's segments; the runtime shards one module tree
        raise DaccError(f"parallel.fsdp {degree}: the model traced into {len(irs)} programs, and fsdp serves one",
                        where, "give example inputs that one program serves (the same input structure), or "
                        "set parallel.fsdp: 1")
    return FsdpSpec(degree, irs[0].fsdp_units, [fsdp_file(r, degree) for r in range(degree)])


# Against the quantized reference: rounding at an activation quantizer may flip one level where the
# float ops before it differ in the last bits (a generated kernel sums in another order); a wrong
# scale, a dropped smoothing factor or a lost linear is orders of magnitude above this.
QUANTIZED_TOL = 1e-2


def quantized_references(programs: list[Traced], plan: Plan, smoothing, hessians, model: torch.nn.Module,
                         examples: list[dict[str, Any]], log) -> list[list[torch.Tensor]]:
    """What a quantized artifact must reproduce: the same quantization on one process, op by op.
    Quantizing changes the output by design, by an amount the plan chose (and `dacc inspect`
    shows); everything after it (segments, gates, ranks, kernels) must not change it further."""
    irs = _passes_on_copies(programs, plan, QUANTIZED_REFERENCE, smoothing, hessians)
    refs = []
    for i, inputs in enumerate(examples):
        got = next((o for o in (program_outputs(ir.traced, model, inputs) for ir in irs) if o is not None), None)
        if got is None:
            raise DaccError(f"no quantized program accepts example {i}", "the model file's examples",
                            "this is a compiler bug; please report it with the model file")
        eager = eager_reference(model, inputs)[0]
        log(f"example {i}: quantization changes the output by {rel_error(got, eager):.3g} of its largest value")
        refs.append(got)
    return refs


def verify_artifact(path: Path, model: torch.nn.Module, examples: list[dict[str, Any]], log,
                    quantized_refs: list[list[torch.Tensor]] | None = None, world: int = 1) -> None:
    """Load what was just written with the runtime and compare it on every example with eager, or
    for a quantized artifact with `quantized_refs` (see quantized_references). A parallel
    artifact runs on `world` local processes."""
    quantized = quantized_refs is not None
    refs = quantized_refs if quantized else [eager_reference(model, inputs)[0] for inputs in examples]
    if world > 1:
        with tempfile.TemporaryDirectory() as tmp:
            run_local(_verify_rank, world, str(path), examples, refs, tmp)
            errors = json.loads((Path(tmp) / "errors.json").read_text())
    else:
        errors = _artifact_errors(path, examples, refs)
    for i, err in enumerate(errors):
        tol = max(tolerance(refs[i]), QUANTIZED_TOL) if quantized else tolerance(refs[i])
        if err > tol:
            against = "the same quantization run op by op" if quantized else "eager"
            raise DaccError(f"compiled artifact differs from {against} on example {i} (relative error {err:.3g}, "
                            f"tolerance {tol:g})", str(path),
                            "this is a compiler bug; please report it with the model file and plan")
        log(f"verified example {i}: relative error {err:.2e}" + (" (quantized)" if quantized else "")
            + (f" on {world} ranks" if world > 1 else ""))


def _artifact_errors(path: Path, examples: list[dict[str, Any]], refs: list) -> list[float]:
    from dacc.runtime.module import load

    compiled = load(path, allow_native_code=True, _allow_incomplete=True)  # packages built just now
    errors = []
    for inputs, ref in zip(examples, refs):
        compiled.reset()  # each example is the first step of a generation: every gate computes
        got = compiled(**inputs)
        errors.append(rel_error(list(got.to_tuple()) if hasattr(got, "to_tuple") else
                                [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)], ref))
    return errors


def _verify_rank(rank: int, world: int, path: str, examples: list, refs: list, out: str) -> None:
    errors = _artifact_errors(Path(path), examples, refs)
    if rank == 0:  # every rank returns the whole output; rank 0 reports
        (Path(out) / "errors.json").write_text(json.dumps(errors))
