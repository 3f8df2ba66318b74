"""The whole compile, in order. Each entry: the pass, and why it runs there."""
from __future__ import annotations

from dacc.compiler.passes import PassEntry
from dacc.passes.annotate_structure import annotate_structure
from dacc.passes.remove_assertions import remove_assertions
from dacc.passes.segment_blocks import segment_blocks

PIPELINE: list[PassEntry] = [
    PassEntry("remove_assertions", remove_assertions,
              "export's dtype/device asserts cost a call per step and pin the traced device"),
    PassEntry("annotate_structure", annotate_structure,
              "record every attention site and linear so later passes and the manifest can find them"),
    PassEntry("segment_blocks", segment_blocks,
              "cut the graph at block boundaries so the runtime can choose per step what runs"),
]
