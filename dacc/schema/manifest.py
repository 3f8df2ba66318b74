"""The artifact manifest: the contract between the compiler (writer) and the runtime (reader).

Everything the runtime needs to execute an artifact is described here as typed, JSON-serializable
dataclasses. Symbolic quantities (shapes, FLOPs) are sympy expressions written as text over
canonical symbol names `s0, s1, ...` that `SymbolSpec` ties to input dimensions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from dacc.schema.serial import to_dict

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN_FILE = "plan.yaml"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILE = "graph.txt"

SegmentKind = Literal["prologue", "probe", "block", "transition", "epilogue"]


@dataclass
class NodeInfo:
    """dacc's annotation of one graph node, stored as a dict in `node.meta["custom"]["dacc"]`."""
    segment: str | None = None
    role: str | None = None  # "attention" | "linear" | None
    gate: str | None = None  # "probe" (computes a cache probe) | "skippable" (in a cache gate's range)
    detail: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class CacheGate:
    """A cache gate over a contiguous range of block segments, decided once per denoising step.

    On a step the gate skips, the range is not run: each stream leaving it is set to the stream
    entering it plus the range's residual from the last computed step (or a Taylor forecast of it).
    """
    strategy: str  # dbcache | teacache | taylorseer | scm
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
    mask: list[bool]  # static per-step compute mask (scm); [] = none
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
    cache: CacheGate | None = None


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
    files: dict[str, str]  # file name -> sha256, every file of the artifact but the manifest
    digest: str = ""  # sha256 of this manifest's canonical JSON with digest=""


def _canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True, indent=1)


def manifest_digest(data: dict) -> str:
    return hashlib.sha256(_canonical({**data, "digest": ""}).encode()).hexdigest()


def dump_manifest(manifest: Manifest) -> str:
    data = to_dict(manifest)
    data["digest"] = manifest_digest(data)
    return _canonical(data)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
