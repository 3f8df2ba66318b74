"""The artifact manifest: the contract between the compiler (writer) and the runtime (reader).

Everything the runtime needs to execute an artifact is described here as typed, JSON-serializable
dataclasses. Symbolic quantities (shapes, FLOPs) are sympy expressions written as text over
canonical symbol names `s0, s1, ...` that `SymbolSpec` ties to input dimensions.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dacc.schema.errors import DaccError, short_repr
from dacc.schema.expr import BOOL, NUMBER, validate
from dacc.schema.serial import from_dict, to_dict

# 2: ProgramSpec.gates (a list of gates over disjoint ranges) replaced .cache; 3: files hold
# chunked digests (dacc/schema/digest.py), no longer one sha256 per file
SCHEMA_VERSION = 3
MANIFEST = "manifest.json"
PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILE = "graph.txt"
SIGNATURE = "manifest.sig"  # optional ed25519 signature of manifest.json's bytes; not listed in `files`
INCOMPLETE = "INCOMPLETE"  # present while a compile is writing: such a directory never loads
RECOMPILE = "recompile it with `dacc compile model.py --plan plan.yaml -o OUT --force`"
MAX_MANIFEST_BYTES = 256 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

SegmentKind = Literal["prologue", "probe", "block", "transition", "epilogue"]


NodeRole = Literal["attention", "linear"]  # what a node is to the passes that look for it
GateRole = Literal["probe", "skippable"]  # computes a cache probe | lies in a cache gate's range


@dataclass
class NodeInfo:
    """dacc's annotation of one graph node, stored as a dict in `node.meta["custom"]["dacc"]`."""
    segment: str | None = None
    role: NodeRole | None = None
    gate: GateRole | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):  # the annotation travels as a plain dict: a misspelt role fails here, loudly
        if self.role not in (None, *get_args(NodeRole)) or self.gate not in (None, *get_args(GateRole)):
            raise ValueError(f"NodeInfo: role {self.role!r} / gate {self.gate!r} is not one of "
                             f"{get_args(NodeRole)} / {get_args(GateRole)}")


def node_segment(meta: dict[str, Any]) -> str | None:
    """The `segment` of a node's dacc annotation, read from `node.meta` without building a NodeInfo
    (both the compiler's segment walks and the runtime's cut read it for every node)."""
    return ((meta.get("custom") or {}).get("dacc") or {}).get("segment")


@dataclass
class InputSpec:
    """One leaf of the flattened forward kwargs."""
    path: str  # "hidden_states", "added_cond_kwargs.resolution"
    kind: Literal["tensor", "constant"]
    value: Any = None  # the traced value of a constant leaf (JSON scalar)
    dtype: str | None = None
    shape: list[str] = field(default_factory=list)  # symbolic, e.g. ["s0", "s1", "64"]


@dataclass
class SymbolSpec:
    name: str  # canonical name, "s0"
    input: str  # input path that defines it
    dim: int
    min: int
    max: int | None


@dataclass
class SegmentSpec:
    name: str
    kind: SegmentKind
    block_list: str | None
    block_index: int | None  # order among all blocks of the model (0-based), None for non-blocks
    inputs: list[str]  # value names read from the environment, in call order
    outputs: list[str]  # value names written back
    stream_inputs: list[str]  # residual streams entering the block (paired with stream_outputs)
    stream_outputs: list[str]
    num_nodes: int
    flops: str  # matmul + attention FLOPs of one call, sympy text
    flops_tree: Any  # the same as an expression tree (dacc.schema.expr) for the runtime
    param_bytes: int
    lowered: LoweredCall | None = None  # the compiled package that runs this segment (lower_segments)
    sent_bytes: str = "0"  # bytes this rank sends per call under a parallel plan, sympy text
    sent_bytes_tree: Any = 0  # the same as an expression tree
    messages: int = 0  # collective calls per call (ring hops count one each); each pays the link latency
    # memory one rank needs (dacc/compiler/memory.py): bytes of the values the segment hands on,
    # and of the intermediates alive at once inside it; sympy text and expression tree
    value_bytes: str = "0"
    value_bytes_tree: Any = 0
    transient_bytes: str = "0"
    transient_bytes_tree: Any = 0
    # bytes written and read by its ops that count no FLOPs (elementwise, norms): their time
    traffic_bytes: str = "0"
    traffic_bytes_tree: Any = 0


@dataclass
class LoweredCall:
    """A segment served by a compiled package: the runtime calls the package with the segment's
    arguments (its `inputs`, then its weights) at positions `args`, then one zero-element tensor
    of shape (n, 0) per symbol in `sizes`; the sizes the segment received as integers are read
    inside the package from its tensors' shapes."""
    package: str  # file name of the package in the artifact
    args: list[int]
    sizes: list[str] = field(default_factory=list)  # program symbols passed as (n, 0) size carriers


@dataclass
class PackageSpec:
    file: str
    key: str  # sha256 of the segment's canonical graph text and argument types
    segments: list[str]  # "program/segment" names it serves
    num_nodes: int
    build_seconds: float  # 0.0 when taken from the compile cache


@dataclass
class LoweringSpec:
    """What the packages were built for; a runtime that differs refuses them (or falls back to the
    unlowered segments when asked to)."""
    backend: Literal["inductor"]
    device: Literal["cpu", "cuda"]
    torch_version: str
    cpu_isa: str  # Inductor's vector ISA on the building machine ("avx512", "avx2", "neon", "" = none)
    cuda_arch: str | None  # compute capability, "9.0"; None for cpu
    packages: list[PackageSpec]
    unlowered: dict[str, str] = field(default_factory=dict)  # "program/segment": why it runs as a graph


@dataclass
class ParallelSpec:
    """The degrees the programs were partitioned for; they multiply to the world size the
    artifact runs on, and the runtime builds its device mesh from them (fsdp outer, then cfg,
    ulysses, ring)."""
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    fsdp: int = 1
    vae_patch: int = 1  # a VAE decoder's row bands (alone: the others split a transformer)

    @property
    def world_size(self) -> int:
        return self.fsdp * self.cfg * self.ulysses * self.ring * self.vae_patch

    def describe(self) -> str:
        """The degrees as text: a VAE decoder's bands, else the transformer's four degrees."""
        if self.vae_patch > 1:
            return f"vae_patch {self.vae_patch}"
        return f"fsdp {self.fsdp} x cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring}"


@dataclass
class ParallelCandidate:
    """One split of the world size that plan `parallel.auto` weighed (dacc/compiler/choose_parallel.py)."""
    cfg: int
    ulysses: int
    ring: int
    fsdp: int
    verdict: Literal["chosen", "slower", "over memory", "invalid"]
    why: str  # the reason for the verdict, one line
    step_seconds: float = 0.0  # predicted computed step, one rank (0 when invalid)
    peak_bytes: float = 0.0  # predicted peak memory of one rank
    sent_bytes: float = 0.0  # bytes one rank sends per step


@dataclass
class ParallelChoice:
    world_size: int
    device: str  # the profile's name
    at: dict[str, int]  # the sizes the predictions are for
    candidates: list[ParallelCandidate]


@dataclass
class FsdpParam:
    name: str  # fully qualified name, as in the program's signature
    shape: list[int]  # the whole tensor's; rank r stores chunk r of dim 0 (torch.chunk, as FSDP2 does)
    dtype: str


@dataclass
class FsdpUnit:
    """One `fully_shard` unit: the modules owning the parameters of the segments in `segments`,
    gathered before the first of them runs and freed after the last."""
    name: str
    modules: list[str]  # module paths in the program's module tree ("" is the root)
    params: list[FsdpParam]
    segments: list[str]  # the segments of program 0 that read these parameters, in order
    shard_bytes: int  # bytes one rank stores (the largest shard); each gather sends these to P-1 ranks


def fsdp_file(rank: int, degree: int) -> str:
    return f"weights.fsdp{rank}of{degree}.safetensors"


def unit_gather_bytes(units: list[FsdpUnit], degree: int) -> dict[str, int]:
    """Segment -> bytes a rank sends gathering the units that segment is the first to read: its
    shard to each of the other degree-1 ranks."""
    out: dict[str, int] = {}
    for unit in units:
        out[unit.segments[0]] = out.get(unit.segments[0], 0) + unit.shard_bytes * (degree - 1)
    return out


def fsdp_shard(t, rank: int, degree: int):
    """Rank `rank`'s share of `t`: chunk `rank` of dim 0 as torch.chunk cuts it (FSDP2's layout),
    empty (0 rows) past the last chunk."""
    import torch

    chunks = torch.chunk(t, degree, 0)
    return chunks[rank].contiguous() if rank < len(chunks) else t.new_empty((0, *t.shape[1:]))


@dataclass
class FsdpSpec:
    """Plan `parallel.fsdp: P`: parameters sharded over the fsdp dim of the mesh; rank r of that
    dim reads only `files[r]` (its shards) and the weights file (buffers and constants)."""
    degree: int
    units: list[FsdpUnit]
    files: list[str]


@dataclass
class AttentionSite:
    node: str
    segment: str
    heads: int
    head_dim: int
    q_len: str
    kv_len: str
    cross: bool


@dataclass
class LinearSite:
    node: str
    segment: str
    weight: str
    in_features: int
    out_features: int
    bias: bool
    quant: str = "none"  # the quantize mode applied to it (quantize_linears)
    bytes_before: int = 0  # weight bytes before and after quantization (0: not quantized)
    bytes_after: int = 0
    weight_error: float = 0.0  # ||W - dequant(Q)|| / ||W||
    smoothing: float = 0.0  # the SmoothQuant strength folded into it (quantize.smoothing; 0: none)


@dataclass
class CacheGate:
    """A cache gate over a contiguous range of block segments, decided once per denoising step.

    On a step the gate skips, the range is not run: each stream leaving it is set to the stream
    entering it plus the range's residual from the last computed step (or a Taylor forecast of it).
    """
    strategy: str  # dbcache | teacache | taylorseer | scm | schedule | magcache
    skip_first: int  # index (in ProgramSpec.segments) of the first skippable segment
    skip_last: int  # index of the last skippable segment (inclusive)
    stream_in: list[str]  # values entering the range, paired with
    stream_out: list[str]  # the values leaving it
    probe: str  # none | residual (rel-L1 of probe_values - probe_base) | input (rel-L1 of probe_values)
    probe_values: list[str]
    probe_base: list[str]
    threshold: float  # dbcache: rel-L1 below which to skip; teacache: accumulated rescaled change
    rescale: list[float]  # teacache polynomial (numpy.polyfit order, highest degree first); [] = identity
    taylor_order: int  # 0 reuses the cached residual; 1 or 2 forecasts it from the last computed steps
    interval: int  # taylorseer: compute every `interval` steps (1 = always)
    mask: list[bool]  # static per-step compute mask (scm, schedule, magcache, a calibrated taylorseer); [] = none
    warmup: int
    cooldown: int
    max_cached_steps: int  # per generation; -1 = unlimited
    max_continuous_cached_steps: int  # -1 = unlimited
    calibration: dict[str, Any] = field(default_factory=dict)  # how the knobs were chosen, measured results

    def reads(self) -> set[str]:
        """Values the gate reads between segments. Each is an output of the segment computing it
        even where no later node uses it (a `cache_base` copy exists only for the gate)."""
        return set(self.stream_in) | set(self.probe_values) | set(self.probe_base)


@dataclass
class ProgramSpec:
    file: str  # the torch.export archive (weights stubbed; real weights in WEIGHTS_FILE)
    inputs: list[InputSpec]
    symbols: list[SymbolSpec]
    example_shapes: dict[str, list[int]]  # the shapes it was traced with
    outputs: list[str]  # value names forming the flat output
    guards: list[Any]  # shape conditions the program was traced under, as expression trees
    guard_text: list[str]  # the same, readable
    segments: list[SegmentSpec]
    attention: list[AttentionSite]
    linears: list[LinearSite]
    gates: list[CacheGate] = field(default_factory=list)  # over disjoint block ranges, in segment order


@dataclass
class OutputType:
    """How to rebuild the model's `return_dict=True` output (a diffusers output dataclass)."""
    module: str
    qualname: str
    fields: list[str]


@dataclass
class PassRecord:
    name: str
    reason: str


@dataclass
class Manifest:
    schema_version: int
    dacc_version: str
    torch_version: str
    diffusers_version: str | None
    model_class: str
    model_config: dict[str, Any]
    config_hash: str
    passes: list[PassRecord]
    num_inference_steps: int
    timestep_input: str | None
    output_type: OutputType | None
    programs: list[ProgramSpec]
    files: dict[str, str]  # file name -> digest (dacc/schema/digest.py), every file of the artifact but the manifest
    # quantize.target_psnr: the groups kept at higher precision, each linear's promotion, the PSNR measured
    # (quant_search.py)
    quantize_search: dict[str, Any] = field(default_factory=dict)
    lowering: LoweringSpec | None = None  # compiled packages (plan `lower`); None: segments run as graphs
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    fsdp: FsdpSpec | None = None  # parameter shards (plan `parallel.fsdp`)
    parallel_choice: ParallelChoice | None = None  # plan `parallel.auto`: the candidates and the one chosen
    digest: str = ""  # sha256 of this manifest's canonical JSON with digest=""


def _canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True, indent=1)


def manifest_digest(data: dict) -> str:
    return hashlib.sha256(_canonical({**data, "digest": ""}).encode()).hexdigest()


def dump_manifest(manifest: Manifest) -> str:
    data = to_dict(manifest)
    data["digest"] = manifest_digest(data)
    return _canonical(data)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Schema version, digest, typed fields, and file names that cannot leave the artifact."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DaccError(f"{MANIFEST} is not valid JSON ({type(exc).__name__})", where, RECOMPILE) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise DaccError(f"artifact schema version {repr(version)[:40]} is not supported by this dacc "
                        f"(it reads version {SCHEMA_VERSION})", where, RECOMPILE)
    try:
        same = data.get("digest") == manifest_digest(data)
    except (TypeError, ValueError, RecursionError):
        same = False
    if not same:
        raise DaccError("the manifest was edited after compilation (its digest does not match)", where, RECOMPILE)
    try:
        manifest = from_dict(Manifest, data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise DaccError(f"malformed manifest: {str(exc)[:300]}", where, RECOMPILE) from None
    bad = [n for n in manifest.files if not _FILE_NAME.fullmatch(n) or n in (MANIFEST, SIGNATURE, INCOMPLETE)]
    if bad:
        raise DaccError(f"the manifest lists file names that are not plain names inside the artifact: "
                        f"{', '.join(repr(b[:60]) for b in bad[:3])}", where, RECOMPILE)
    unlisted = [p.file for p in manifest.programs if p.file not in manifest.files]
    unlisted += [WEIGHTS_FILE] if WEIGHTS_FILE not in manifest.files else []
    unlisted += [f for f in package_files(manifest) if f not in manifest.files]
    unlisted += [f for f in (manifest.fsdp.files if manifest.fsdp else []) if f not in manifest.files]
    if unlisted:
        raise DaccError(f"the manifest names files it does not list with a hash: "
                        f"{', '.join(repr(u[:60]) for u in unlisted[:3])}", where, RECOMPILE)
    _check_lowered(manifest, where)
    validate_manifest_trees(manifest, where)  # untrusted expression trees: checked once, here
    return manifest


def _check_lowered(manifest: Manifest, where: str) -> None:
    low = manifest.lowering
    known = {p.file for p in low.packages} if low is not None else set()
    for prog in manifest.programs:
        for seg in prog.segments:
            if seg.lowered is not None and seg.lowered.package not in known:
                raise DaccError(f"segment {short_repr(seg.name)} names package {short_repr(seg.lowered.package)}, "
                                "which the manifest's lowering table does not list", where, RECOMPILE)


def package_files(manifest: Manifest) -> list[str]:
    """Every package file the manifest names, from its package table and its segments."""
    low = manifest.lowering
    named = [p.file for p in low.packages] if low is not None else []
    named += [s.lowered.package for p in manifest.programs for s in p.segments if s.lowered is not None]
    return sorted(set(named))


def parse_manifest_file(path) -> Manifest:
    try:
        raw = open(path, "rb").read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise DaccError(f"cannot read {MANIFEST} ({exc.strerror})", str(path), RECOMPILE) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise DaccError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB", str(path), RECOMPILE)
    return parse_manifest(raw, str(path))


def validate_manifest_trees(manifest: Manifest, where: str) -> None:
    """Refuse, at load, a manifest whose expressions the runtime could not evaluate safely: every
    guard must be a bool tree and every segment's FLOPs a number tree over the program's own
    symbols, and every symbol must name a dimension the runtime can read it from. After this,
    evaluating them (ProgramRunner.mismatch, FLOPs counting, `dacc inspect`) is bounded and
    fails, if at all, only with a DaccError about the input sizes."""
    fix = RECOMPILE
    for i, prog in enumerate(manifest.programs):
        _check_symbols(prog, f"programs[{i}]", where, fix)
        names = {s.name for s in prog.symbols}
        if len(prog.guards) != len(prog.guard_text):  # the runtime zips them: a guard without text would go unchecked
            raise DaccError(f"programs[{i}] has {len(prog.guards)} guards but {len(prog.guard_text)} guard texts",
                            where, fix)
        for j, tree in enumerate(prog.guards):
            validate(tree, names, f"programs[{i}].guards[{j}]", BOOL, where)
        for k, seg in enumerate(prog.segments):
            validate(seg.flops_tree, names, f"programs[{i}].segments[{k}].flops_tree", NUMBER, where)
        _check_gate_ranges(prog, f"programs[{i}]", where, fix)


def _check_symbols(prog: ProgramSpec, what: str, where: str, fix: str) -> None:
    """Symbols are bound from input dimensions (runtime) and example shapes (`dacc inspect`)."""
    tensors = {i.path: i for i in prog.inputs if i.kind == "tensor"}
    names = [s.name for s in prog.symbols]
    if len(set(names)) != len(names):
        raise DaccError(f"{what} declares a symbol twice: {short_repr(names)}", where, fix)
    for s in prog.symbols:
        spec, example = tensors.get(s.input), prog.example_shapes.get(s.input)
        if spec is None or example is None or not 0 <= s.dim < min(len(spec.shape), len(example)):
            raise DaccError(f"{what}: symbol {short_repr(s.name)} reads dimension {s.dim} of "
                            f"{short_repr(s.input)}, which is not a tensor input of that rank", where, fix)
    for spec in tensors.values():
        for dim in spec.shape:
            if not (dim.isascii() and dim.isdigit() and len(dim) < 19) and dim not in names:
                raise DaccError(f"{what}: input {short_repr(spec.path)} has dimension {short_repr(dim)}, "
                                "neither a size nor a declared symbol", where, fix)


def _check_gate_ranges(prog: ProgramSpec, at: str, where: str, fix: str) -> None:
    """The runtime runs the segments between gates and each gate's range in order: the ranges must lie
    inside the program and follow one another without overlapping."""
    end = -1
    for g, gate in enumerate(prog.gates):
        if not (end < gate.skip_first <= gate.skip_last < len(prog.segments)):
            raise DaccError(f"{at}.gates[{g}] covers segments {gate.skip_first}..{gate.skip_last}, which is not a "
                            f"range after the previous gate's (ending at {end}) within the program's "
                            f"{len(prog.segments)} segments", where, fix)
        end = gate.skip_last
