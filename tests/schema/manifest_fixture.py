"""A valid manifest built from the dataclasses alone (no torch compile), with trees copied from
what the compiler writes for the families (flux, sd3, dit), and an artifact directory holding it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dacc.schema.manifest import (MANIFEST, PLAN_FILE, SCHEMA_VERSION, WEIGHTS_FILE, CacheGate, InputSpec, Manifest,
                                  OutputType, PassRecord, ProgramSpec, SegmentSpec, SymbolSpec, dump_manifest,
                                  manifest_digest)
from dacc.schema.digest import file_digest

# Real trees, copied from the manifests the compiler writes for these families.
FLUX_GUARD = ["eq", ["add", ["sym", "s1"], ["sym", "s2"]], ["add", ["sym", "s3"], ["sym", "s4"]]]
DIT_SQRT_GUARD = ["eq", ["trunc", ["floatpow", ["tofloat", ["mul", ["floordiv", ["sym", "s1"], 2],
                                                                 ["floordiv", ["sym", "s2"], 2]]], 0.5]], 4]
SD3_RANGE_GUARD = ["and", ["ge", ["add", 16, ["floordiv", ["sym", "s1"], 2],
                                  ["floordiv", ["mul", -1, ["floordiv", ["sym", "s1"], 2]], 2]], 0],
                   ["le", ["add", 16, ["floordiv", ["sym", "s1"], 2],
                           ["floordiv", ["mul", -1, ["floordiv", ["sym", "s1"], 2]], 2]], 32]]
FLUX_BLOCK_FLOPS = ["add", ["mul", 24576, ["sym", "s0"]], ["mul", 128, ["sym", "s0"], ["pow", ["sym", "s1"], 2]],
                    ["mul", 128, ["sym", "s0"], ["pow", ["sym", "s2"], 2]], ["mul", 24576, ["sym", "s0"], ["sym", "s1"]],
                    ["mul", 24576, ["sym", "s0"], ["sym", "s2"]], ["mul", 256, ["sym", "s0"], ["sym", "s1"], ["sym", "s2"]]]
SYMBOLS = ["s0", "s1", "s2", "s3", "s4"]


def _segment(name: str, kind: Any, index: int | None, flops: Any) -> SegmentSpec:
    return SegmentSpec(name=name, kind=kind, block_list="blocks" if index is not None else None, block_index=index,
                       inputs=["x"], outputs=[f"{name}_out"], stream_inputs=[], stream_outputs=[], num_nodes=3,
                       flops="(symbolic)", flops_tree=flops, param_bytes=1024)


def valid_manifest() -> Manifest:
    inputs = [InputSpec("hidden_states", "tensor", dtype="float32", shape=["s0", "s1", "64"]),
              InputSpec("encoder_hidden_states", "tensor", dtype="float32", shape=["s0", "s2", "32"]),
              InputSpec("img_ids", "tensor", dtype="float32", shape=["s3", "3"]),
              InputSpec("txt_ids", "tensor", dtype="float32", shape=["s4", "3"]),
              InputSpec("return_dict", "constant", value=False)]
    symbols = [SymbolSpec("s0", "hidden_states", 0, 1, None), SymbolSpec("s1", "hidden_states", 1, 2, 4096),
               SymbolSpec("s2", "encoder_hidden_states", 1, 2, 512), SymbolSpec("s3", "img_ids", 0, 2, 4096),
               SymbolSpec("s4", "txt_ids", 0, 2, 512)]
    segments = [_segment("prologue", "prologue", None, ["mul", 2048, ["sym", "s0"], ["sym", "s1"]]),
                _segment("blocks.0", "block", 0, FLUX_BLOCK_FLOPS), _segment("blocks.1", "block", 1, FLUX_BLOCK_FLOPS),
                _segment("epilogue", "epilogue", None, 0)]
    gate = CacheGate(strategy="dbcache", skip_first=2, skip_last=2, stream_in=["x"], stream_out=["y"],
                     probe="residual", probe_values=["a"], probe_base=["b"], threshold=0.08, rescale=[],
                     taylor_order=0, interval=1, mask=[], warmup=0, cooldown=0, max_cached_steps=-1,
                     max_continuous_cached_steps=-1)
    program = ProgramSpec(file="program0.pt2", inputs=inputs, symbols=symbols,
                          example_shapes={"hidden_states": [2, 16, 64], "encoder_hidden_states": [2, 8, 32],
                                          "img_ids": [16, 3], "txt_ids": [8, 3]},
                          outputs=["out"], guards=[FLUX_GUARD, DIT_SQRT_GUARD, SD3_RANGE_GUARD],
                          guard_text=["Eq(s1 + s2, s3 + s4)", "Eq(TruncToInt(...), 4)", "(...) & (...)"],
                          segments=segments, attention=[], linears=[], gates=[gate])
    return Manifest(schema_version=SCHEMA_VERSION, dacc_version="0.1.0", torch_version="2.x", diffusers_version=None,
                    model_class="Toy", model_config={"layers": 2}, config_hash="0" * 64,
                    passes=[PassRecord("segment_blocks", "cut")], num_inference_steps=8, timestep_input="timestep",
                    output_type=OutputType("diffusers.models", "Transformer2DModelOutput", ["sample"]),
                    programs=[program], files={})


def valid_data() -> dict:
    return json.loads(dump_manifest(valid_manifest()))


_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def write_artifact(root: Path, data: Any) -> Path:
    """A directory `read_manifest` accepts up to the content of `data` (digest and file list made
    to match, so what is tested is the reader's handling of the data itself)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / PLAN_FILE).write_text("cache: {strategy: dbcache}\n")
    names = [PLAN_FILE, WEIGHTS_FILE]
    if isinstance(data, dict):  # (fuzzed data may not even be a mapping: then it is written as is)
        programs = data.get("programs")  # placeholders for the files it names, so the listing is whole
        names += [p["file"] for p in programs if isinstance(p, dict) and isinstance(p.get("file"), str)
                  and _PLAIN.fullmatch(p["file"])] if isinstance(programs, list) else []
        for name in names[1:]:
            (root / name).write_bytes(b"")
        data = {**data, "files": {n: file_digest(root / n) for n in names}}
        data["digest"] = manifest_digest(data)
    (root / MANIFEST).write_text(json.dumps(data))
    return root

