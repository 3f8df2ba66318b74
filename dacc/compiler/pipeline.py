"""The whole compile, in order. Each entry: the pass, and why it runs there."""
from __future__ import annotations

from dacc.compiler.passes import PassEntry
from dacc.passes.annotate_fsdp_units import annotate_fsdp_units
from dacc.passes.annotate_structure import annotate_structure
from dacc.passes.apply_step_mask import apply_step_mask
from dacc.passes.hoist_cache_probe import hoist_cache_probe
from dacc.passes.insert_dbcache_gate import insert_dbcache_gate
from dacc.passes.insert_taylorseer_gate import insert_taylorseer_gate
from dacc.passes.insert_teacache_gate import insert_teacache_gate
from dacc.passes.lower_segments import lower_segments
from dacc.passes.partition_attention import partition_attention
from dacc.passes.partition_patches import partition_patches
from dacc.passes.quantize_linears import quantize_linears
from dacc.passes.remove_assertions import remove_assertions
from dacc.passes.remove_identity_ops import remove_identity_ops
from dacc.passes.segment_blocks import segment_blocks
from dacc.passes.split_cfg import split_cfg

PIPELINE: list[PassEntry] = [
    # analysis
    PassEntry("remove_assertions", remove_assertions,
              "export's dtype/device asserts cost a call per step and pin the traced device"),
    PassEntry("remove_identity_ops", remove_identity_ops,
              "full slices and same-dtype .to() calls cost a dispatch each step and do nothing"),
    PassEntry("annotate_structure", annotate_structure,
              "record every attention site and linear so later passes and the manifest can find them"),
    PassEntry("segment_blocks", segment_blocks,
              "cut the graph at block boundaries so the runtime can choose per step what runs"),
    # cache
    PassEntry("hoist_cache_probe", hoist_cache_probe,
              "teacache: the gate must see block 0's modulated input before deciding whether blocks run"),
    PassEntry("insert_dbcache_gate", insert_dbcache_gate,
              "dbcache: skip middle blocks when the front blocks' residual barely changed"),
    PassEntry("insert_teacache_gate", insert_teacache_gate,
              "teacache: skip all blocks while the accumulated rescaled input change stays small"),
    PassEntry("insert_taylorseer_gate", insert_taylorseer_gate,
              "taylorseer: forecast the blocks' residual between full steps"),
    PassEntry("apply_step_mask", apply_step_mask,
              "scm/schedule/magcache: a static per-step compute mask (given, or chosen from measurements), alone or on top of another gate"),
    # quantize
    PassEntry("quantize_linears", quantize_linears,
              "int8 weights (and activations) make each computed step's matmuls cheaper and the artifact smaller"),
    # partition
    PassEntry("split_cfg", split_cfg,
              "cfg: the two halves of a batched-CFG call run on two ranks"),
    PassEntry("partition_attention", partition_attention,
              "ulysses/ring/both: each rank runs the blocks on its share of the tokens; attention exchanges heads or passes keys around"),
    PassEntry("partition_patches", partition_patches,
              "vae_patch: each rank decodes a band of rows; convolutions borrow their neighbours' edge rows"),
    PassEntry("annotate_fsdp_units", annotate_fsdp_units,
              "fsdp: each rank stores 1/P of every unit's weights and gathers a unit just before it runs"),
    # lower
    PassEntry("lower_segments", lower_segments,
              "generated kernels instead of op-by-op dispatch; identical segments share one package"),
]

# what costing a candidate plan needs (parallel.auto): every rewrite, no kernels built
UNLOWERED: list[PassEntry] = [p for p in PIPELINE if p.name != "lower_segments"]

# what a quantized artifact is verified against: the same rewrite, one process, op by op
QUANTIZED_REFERENCE: list[PassEntry] = PIPELINE[:[p.name for p in PIPELINE].index("quantize_linears") + 1]
