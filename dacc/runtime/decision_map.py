"""A picture of what the cache gates did: one row per denoising step, one column per segment."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from dacc.schema.manifest import ProgramSpec

COLORS = {"computed": (31, 78, 121), "reused": (220, 220, 220), "forecast": (242, 142, 43),
          "dynamic": (150, 200, 150)}  # dynamic: a planned step the probe decides at run time
CELL, ROW = 14, 8


def segment_status(program: ProgramSpec, gate_actions: list[list[str]]) -> list[list[str]]:
    """Per step, the status of every segment: a gate's segments take that gate's action at the step.
    `gate_actions`: per gate of `program`, its action per step."""
    rows = []
    for step in range(max((len(a) for a in gate_actions), default=0)):
        row = ["computed"] * len(program.segments)
        for gate, actions in zip(program.gates, gate_actions):
            row[gate.skip_first:gate.skip_last + 1] = [actions[step]] * (gate.skip_last + 1 - gate.skip_first)
        rows.append(row)
    return rows


def decision_key(context: str, program: int, gate: int = 0, gates: int = 1) -> str:
    """How stats() names one gate's decisions: by program, and by range when it has several gates."""
    return f"{context}/program{program}" + (f"/range{gate}" if gates > 1 else "")


def maps_from_decisions(programs: list[ProgramSpec], decisions: dict[str, list[str]],
                        note: str = "") -> dict[str, tuple[ProgramSpec, list[list[str]]]]:
    """`decisions` as `stats()` reports them (decision_key -> action per step) -> the `maps` of
    draw_decision_map, one per context and program, titled by it and `note`."""
    maps: dict[str, tuple[ProgramSpec, list[list[str]]]] = {}
    for key, actions in decisions.items():
        title, _, gate = key.partition("/range")
        program = programs[int(title.rsplit("program", 1)[1])]
        maps.setdefault(title + note, (program, [[] for _ in program.gates]))[1][int(gate or 0)] = list(actions)
    return maps


def draw_decision_map(maps: dict[str, tuple[ProgramSpec, list[list[str]]]], path: str | Path) -> None:
    """`maps`: title -> (program, per gate its action per step). Writes one panel per title, side by side."""
    panels, used = [], set()
    for title, (program, actions) in maps.items():
        rows = segment_status(program, actions)
        used.update(status for row in rows for status in row)
        names = [s.name for s in program.segments]
        width = max(len(title) * 6 + 8, 40 + CELL * len(names))
        img = Image.new("RGB", (width, 20 + ROW * max(len(rows), 1) + 12 + 12 * len(names)), "white")
        draw = ImageDraw.Draw(img)
        draw.text((4, 4), title, fill="black")
        for r, row in enumerate(rows):
            if r % 10 == 0:
                draw.text((4, 18 + r * ROW), str(r), fill="black")
            for c, status in enumerate(row):
                x, y = 40 + c * CELL, 20 + r * ROW
                draw.rectangle([x, y, x + CELL - 2, y + ROW - 2], fill=COLORS[status])
        y0 = 24 + ROW * max(len(rows), 1)
        for c, name in enumerate(names):
            draw.text((4, y0 + 12 * c), f"{c}: {name}", fill="black")
        panels.append(img)
    legend_h = 18
    total = Image.new("RGB", (sum(p.width for p in panels) + 10 * len(panels) or 200,
                              max([p.height for p in panels] or [40]) + legend_h), "white")
    x = 0
    for p in panels:
        total.paste(p, (x, legend_h))
        x += p.width + 10
    draw = ImageDraw.Draw(total)
    lx = 4
    for name, color in COLORS.items():
        if name not in used:
            continue
        draw.rectangle([lx, 4, lx + 10, 14], fill=color)
        draw.text((lx + 14, 3), name, fill="black")
        lx += 14 + 7 * len(name) + 12
    total.save(path)
