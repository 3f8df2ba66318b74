"""`dacc inspect --memory`: what one rank holds at each segment of a call, from the manifest's
expressions (dacc/compiler/memory.py), evaluated at the example's sizes or at sizes given with
`--at s1=4096`; dacc/report.py prints it as a table, `draw_memory_map` as a PNG (one stacked
bar per segment).

At segment i a rank holds:
- its stored weights (the whole model, or under fsdp its shards plus the unsharded rest);
- the FSDP units gathered whole at that moment (the segment's own, ones a later segment still
  reads, and the next segment's, already being gathered);
- the values of the call so far (the runtime keeps every segment's outputs until the call
  returns), and the segment's own intermediates at their peak;
- the cache gate's buffers: the residual of every stream leaving the gated range (times
  `order + 1` for a Taylor forecast), an estimate from the range's last segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dacc.schema.dtypes import parse_dtype
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.manifest import Manifest, ProgramSpec

PARTS = ("weights", "gathered", "values", "transient", "cache")
COLORS = {"weights": (31, 78, 121), "gathered": (96, 150, 200), "values": (242, 142, 43), "transient": (220, 80, 60),
          "cache": (120, 180, 120)}


@dataclass
class SegmentMemory:
    segment: str
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def memory_map(m: Manifest, prog: ProgramSpec, env: dict[str, int],
               runs: dict[str, float] | None = None) -> list[SegmentMemory]:
    """`runs`: how many identical segments a segment stands for (step_time.step_time's)."""
    segs = prog.segments
    times = {s.name: (runs or {}).get(s.name, 1) for s in segs}
    stored, unit_whole = float(sum(s.param_bytes * times[s.name] for s in segs)), []
    if m.fsdp is not None:
        unit_whole = [sum(math.prod(p.shape) * parse_dtype(p.dtype).itemsize for p in u.params) for u in m.fsdp.units]
        stored -= sum((full - u.shard_bytes) * times[u.segments[0]] for u, full in zip(m.fsdp.units, unit_whole))
    cache = _cache_bytes(prog, env)
    out, held = [], 0.0
    order = {s.name: i for i, s in enumerate(segs)}
    for i, seg in enumerate(segs):
        gathered = 0.0
        if m.fsdp is not None:
            nxt = segs[i + 1].name if i + 1 < len(segs) else None
            for unit, full in zip(m.fsdp.units, unit_whole):
                span = [order[s] for s in unit.segments]
                if min(span) <= i <= max(span) or nxt in unit.segments:
                    gathered += full - unit.shard_bytes
        transient = _eval(seg.transient_bytes_tree, env, seg.name)
        held += _eval(seg.value_bytes_tree, env, seg.name) * times[seg.name]
        out.append(SegmentMemory(seg.name, {"weights": stored, "gathered": gathered, "values": held,
                                            "transient": transient, "cache": cache}))
    return out


def draw_memory_map(rows: list[SegmentMemory], path: str | Path, title: str) -> Path:
    """One horizontal stacked bar per segment, in call order; the peak is labelled."""
    from PIL import Image, ImageDraw

    bar, gap, left, width, top = 14, 4, 230, 560, 40
    height = top + len(rows) * (bar + gap) + 50
    img = Image.new("RGB", (left + width + 120, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    peak = max(r.total for r in rows) or 1.0
    for k, r in enumerate(rows):
        y = top + k * (bar + gap)
        draw.text((10, y), r.segment[:34], fill="black")
        x = float(left)
        for part in PARTS:
            w = width * r.parts[part] / peak
            if w > 0:
                draw.rectangle([x, y, x + w, y + bar], fill=COLORS[part])
            x += w
        draw.text((x + 6, y), f"{r.total / 2**20:.1f} MiB", fill="black")
    y = height - 30
    for j, part in enumerate(PARTS):
        draw.rectangle([left + j * 110, y, left + j * 110 + 12, y + 12], fill=COLORS[part])
        draw.text((left + j * 110 + 16, y), part, fill="black")
    img.save(path)
    return Path(path)


def _cache_bytes(prog: ProgramSpec, env: dict[str, int]) -> float:
    total = 0.0
    for gate in prog.gates:
        last = prog.segments[gate.skip_last]
        copies = gate.taylor_order + 1  # the runtime keeps that many computed residuals, whatever the strategy
        total += copies * _eval(last.value_bytes_tree, env, last.name)
    return total


def _eval(tree, env: dict[str, int], name: str) -> float:
    return float(evaluate(tree, env, f"memory of {name}", NUMBER))

