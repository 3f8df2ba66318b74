"""`dacc inspect`: what an artifact holds, readable by a person or diffable by CI."""
from __future__ import annotations

from pathlib import Path

from dacc.runtime.artifact import read_manifest
from dacc.schema.expr import evaluate
from dacc.schema.manifest import PLAN_FILE, ProgramSpec


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def example_symbols(program: ProgramSpec) -> dict[str, int]:
    return {s.name: program.example_shapes[s.input][s.dim] for s in program.symbols}


def inspect_artifact(path: str | Path) -> str:
    root = Path(path)
    m = read_manifest(root)
    out = [f"artifact  {root}",
           f"versions  dacc {m.dacc_version}, torch {m.torch_version}, diffusers {m.diffusers_version}",
           f"model     {m.model_class} (config sha256 {m.config_hash[:12]})",
           f"steps     {m.num_inference_steps} per generation, timestep input: {m.timestep_input}",
           "passes    " + ", ".join(p.name for p in m.passes), "", "plan:"]
    out += ["  " + line for line in (root / PLAN_FILE).read_text().splitlines()]
    for i, prog in enumerate(m.programs):
        env = example_symbols(prog)
        out += ["", f"program {i} ({prog.file})"]
        out += [f"  input {s.path}: {s.dtype}[{', '.join(s.shape)}]" if s.kind == "tensor"
                else f"  input {s.path} = {s.value!r} (constant)" for s in prog.inputs]
        out += [f"  symbol {s.name} = {s.input}.size({s.dim}) in [{s.min}, {s.max if s.max is not None else 'inf'}]"
                f", example {env[s.name]}" for s in prog.symbols]
        out += [f"  guard {g}" for g in prog.guard_text]
        rows = [("segment", "kind", "nodes", "streams", "FLOPs (symbolic)", "FLOPs @ example", "params")]
        total_flops = total_bytes = 0
        for seg in prog.segments:
            flops = float(evaluate(seg.flops_tree, env))
            total_flops += flops
            total_bytes += seg.param_bytes
            rows.append((seg.name, seg.kind, str(seg.num_nodes), str(len(seg.stream_outputs)), seg.flops,
                         _human(flops, "FLOP"), _human(seg.param_bytes, "B")))
        rows.append(("total", "", "", "", "", _human(total_flops, "FLOP"), _human(total_bytes, "B")))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        for r in rows:
            out.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        attn = ", ".join(f"{a.node}@{a.segment}{' (cross)' if a.cross else ''}" for a in prog.attention)
        out.append(f"  attention sites ({len(prog.attention)}): {attn}")
        out.append(f"  linears: {len(prog.linears)}")
    return "\n".join(out) + "\n"
