"""`dacc inspect`: what an artifact holds, readable by a person or diffable by CI."""
from __future__ import annotations

import json
from pathlib import Path

from dacc.cost.devices import load_profile
from dacc.cost.sizes import sizes_at
from dacc.runtime.artifact import read_manifest
from dacc.runtime.cache import planned_actions
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.manifest import PLAN_FILE, SIGNATURE, CacheGate, LoweringSpec, Manifest, ProgramSpec
from dacc.schema.plan import THRESHOLD_STRATEGIES
from dacc.schema.signature import fingerprint

LETTERS = {"computed": "c", "reused": "r", "forecast": "f", "dynamic": "?"}


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _signature_line(root: Path, trusted_keys) -> str:
    if not (root / SIGNATURE).is_file():
        return "signature none (sign with `dacc sign` or `dacc compile --sign-key`)"
    try:
        signer = fingerprint(json.loads((root / SIGNATURE).read_text())["public_key"])
    except (ValueError, KeyError, TypeError):
        return "signature malformed"
    if trusted_keys:  # read_manifest has verified it
        return f"signature {signer}, verified against the trusted key(s)"
    return f"signature {signer}, not verified (pass --trusted-key KEY.pub)"


def _table(rows: list[tuple[str, ...]], indent: str) -> list[str]:
    """Rows of text cells as aligned columns."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _linear_lines(prog: ProgramSpec) -> list[str]:
    done = [s for s in prog.linears if s.quant != "none"]
    if not done:
        return [f"  linears: {len(prog.linears)}"]
    before, after = sum(s.bytes_before for s in done), sum(s.bytes_after for s in done)
    out = [f"  linears: {len(prog.linears)}, {len(done)} quantized ({_human(before, 'B')} -> {_human(after, 'B')}, "
           f"{after / before:.2f}x)"]
    rows = [("linear", "mode", "in x out", "bytes", "weight error")]
    rows += [(s.weight.removesuffix(".weight"), s.quant + (f" smoothed {s.smoothing:g}" if s.smoothing else ""),
              f"{s.in_features} x {s.out_features}",
              f"{_human(s.bytes_before, 'B')} -> {_human(s.bytes_after, 'B')}" if s.quant != "none"
              else "full precision", f"{s.weight_error:.2e}" if s.quant != "none" else "-") for s in prog.linears]
    return out + _table(rows, "    ")


def _quantize_search_lines(q: dict) -> list[str]:
    if not q:
        return []
    head = f"quantize search: target PSNR {q.get('target_psnr')} dB over {q.get('groups')} block groups"
    if not q.get("met"):
        return ["", head + ": not reachable, the artifact is not quantized"]
    kept = q.get("kept") or []
    moves = sorted(set((q.get("promoted") or {}).values()))  # what the kept groups' linears compute in
    return ["", head, f"  kept at higher precision ({', '.join(moves) or 'full'}): {', '.join(kept) if kept else 'none'}",
            f"  validation PSNR (seeds {q.get('validation_seeds')}): mean {q.get('validation_psnr_mean')} dB, "
            f"worst seed {q.get('validation_psnr_worst')} dB; calibration (seeds {q.get('calibration_seeds')}): "
            f"{q.get('calibration_psnr')}"]


def _lowering_lines(low: LoweringSpec | None) -> list[str]:
    if low is None:
        return []
    target = f"cuda sm {low.cuda_arch}" if low.device == "cuda" else f"cpu ({low.cpu_isa or 'no vector ISA'})"
    built = sum(p.build_seconds for p in low.packages)
    served = sum(len(p.segments) for p in low.packages)
    out = ["", f"lowering: {low.backend} for {target}, torch {low.torch_version}: {served} segment(s) served by "
           f"{len(low.packages)} package(s), one build per distinct segment structure ({built:.1f} s of builds; "
           "0 s: from the compile cache)"]
    rows = [("package", "nodes", "build", "segments")]
    rows += [(p.file, str(p.num_nodes), f"{p.build_seconds:.1f} s", ", ".join(p.segments)) for p in low.packages]
    out += _table(rows, "  ")
    out += [f"  unlowered {name}: {why}" for name, why in low.unlowered.items()]
    return out


def _parallel_lines(m: Manifest) -> list[str]:
    p = m.parallel
    if p.world_size == 1:
        return _choice_lines(m)
    out = ["", f"parallel: {p.describe()} = {p.world_size} ranks "
           f"(run under `torchrun --nproc_per_node {p.world_size}`); the FLOPs below are one rank's share"]
    if m.fsdp is not None:
        stored = sum(u.shard_bytes for u in m.fsdp.units)
        out.append(f"fsdp: {len(m.fsdp.units)} units; each rank stores at most {_human(stored, 'B')} of them and gathers "
                   "each unit before the first segment that reads it")
        rows = [("unit", "modules", "segments", "stored per rank")]
        rows += [(u.name, str(len(u.modules)), ", ".join(u.segments), _human(u.shard_bytes, "B")) for u in m.fsdp.units]
        out += _table(rows, "  ")
    out += _choice_lines(m)
    return out


def _choice_lines(m: Manifest) -> list[str]:
    ch = m.parallel_choice
    if ch is None:
        return []
    sizes = ", ".join(f"{k}={v}" for k, v in ch.at.items())
    rows = [("fsdp", "cfg", "ulysses", "ring", "step (predicted)", "peak/rank", "sent/rank", "verdict")]
    for c in sorted(ch.candidates, key=lambda c: (c.verdict == "invalid", c.step_seconds)):
        timed = c.verdict != "invalid"
        rows.append((str(c.fsdp), str(c.cfg), str(c.ulysses), str(c.ring),
                     f"{c.step_seconds * 1e3:.3g} ms" if timed else "-", _human(c.peak_bytes, "B") if timed else "-",
                     _human(c.sent_bytes, "B") if timed else "-", f"{c.verdict}: {c.why}" if c.why else c.verdict))
    return ["", f"parallel.auto: {len(ch.candidates)} split(s) of {ch.world_size} rank(s) predicted on {ch.device} "
            f"at {sizes}:"] + _table(rows, "  ")


def inspect_artifact(path: str | Path, trusted_keys=None, memory: bool = False, at: dict[str, int] | None = None,
                     memory_png: str | Path | None = None, device: str | None = None) -> str:
    """The report, its figures at the example's sizes or at `at` (symbol -> size); with `memory`,
    each program's per-rank memory map, drawn to `memory_png` when given; with `device` (a
    profile name or file), each segment's predicted time on it."""
    profile = load_profile(device) if device else None  # a bad name fails before the report
    root = Path(path)
    m = read_manifest(root, trusted_keys or None)
    out = [f"artifact  {root}", _signature_line(root, trusted_keys),
           f"versions  dacc {m.dacc_version}, torch {m.torch_version}, diffusers {m.diffusers_version}",
           f"model     {m.model_class} (config sha256 {m.config_hash[:12]})",
           f"steps     {m.num_inference_steps} per generation, timestep input: {m.timestep_input}",
           "passes    " + ", ".join(p.name for p in m.passes), "", "plan:"]
    out += ["  " + line for line in (root / PLAN_FILE).read_text().splitlines()]
    out += _quantize_search_lines(m.quantize_search)
    out += _lowering_lines(m.lowering)
    out += _parallel_lines(m)
    for i, prog in enumerate(m.programs):
        env = sizes_at(prog, at, str(root / prog.file))
        out += ["", f"program {i} ({prog.file})"]
        out += [f"  input {s.path}: {s.dtype}[{', '.join(s.shape)}]" if s.kind == "tensor"
                else f"  input {s.path} = {s.value!r} (constant)" for s in prog.inputs]
        out += [f"  symbol {s.name} = {s.input}.size({s.dim}) in [{s.min}, {s.max if s.max is not None else 'inf'}]"
                f", example {env[s.name]}" for s in prog.symbols]
        out += [f"  guard {g}" for g in prog.guard_text]
        lowered = m.lowering is not None  # then a last column: the package running each segment
        parallel = m.parallel.world_size > 1  # then: the bytes each rank sends per call
        rows = [("segment", "kind", "nodes", "streams", "FLOPs (symbolic)", "FLOPs @ example", "params")
                + (("sent @ example",) if parallel else ()) + (("package",) if lowered else ())]
        total_flops = total_bytes = total_sent = 0
        for seg in prog.segments:
            flops = float(evaluate(seg.flops_tree, env, f"FLOPs of {seg.name}", NUMBER))
            total_flops += flops
            total_bytes += seg.param_bytes
            sent = float(evaluate(seg.sent_bytes_tree, env, f"bytes sent by {seg.name}", NUMBER))
            total_sent += sent
            rows.append((seg.name, seg.kind, str(seg.num_nodes), str(len(seg.stream_outputs)), seg.flops,
                         _human(flops, "FLOP"), _human(seg.param_bytes, "B"))
                        + ((_human(sent, "B"),) if parallel else ())
                        + ((seg.lowered.package if seg.lowered else "graph",) if lowered else ()))
        rows.append(("total", "", "", "", "", _human(total_flops, "FLOP"), _human(total_bytes, "B"))
                    + ((_human(total_sent, "B"),) if parallel else ()) + (("",) if lowered else ()))
        out += _table(rows, "  ")
        attn = ", ".join(f"{a.node}@{a.segment}{' (cross)' if a.cross else ''}" for a in prog.attention)
        out.append(f"  attention sites ({len(prog.attention)}): {attn}")
        out += _linear_lines(prog)
        if prog.gates:
            out += _gate_lines(prog, m.num_inference_steps)
        if memory or memory_png:
            out += _memory(m, prog, i, env, memory_png)
        if profile is not None:
            out += _time(m, prog, env, profile)
    return "\n".join(out) + "\n"


def _memory(m: Manifest, prog: ProgramSpec, index: int, env: dict[str, int], png) -> list[str]:
    from dacc.cost.memory_map import PARTS, draw_memory_map, memory_map

    segments = memory_map(m, prog, env)
    rows = [("segment", *PARTS, "total")]
    rows += [(r.segment, *(_human(r.parts[p], "B") for p in PARTS), _human(r.total, "B")) for r in segments]
    peak = max(segments, key=lambda r: r.total)
    sizes = ", ".join(f"{k}={v}" for k, v in env.items())
    out = [f"  memory per rank at {sizes} (peak {_human(peak.total, 'B')} in {peak.segment}):"] + _table(rows, "    ")
    if png and index == 0:
        out.append(f"  drew {draw_memory_map(segments, png, f'memory per rank, {sizes}')}")
    return out


def _time(m: Manifest, prog: ProgramSpec, env: dict[str, int], profile) -> list[str]:
    from dacc.cost.step_time import step_time, total_seconds

    rows = step_time(m, prog, env, profile)

    def ms(x: float) -> str:
        return f"{x * 1e3:.3g}"
    table = [("segment", "matmul ms", "weights ms", "other ops ms", "dispatch ms", "comm ms", "fsdp gather ms",
              "step ms")]
    table += [(r.segment, ms(r.compute), ms(r.weights), ms(r.traffic), ms(r.dispatch), ms(r.comm), ms(r.gather),
               ms(r.total)) for r in rows]
    sizes = ", ".join(f"{k}={v}" for k, v in env.items())
    return [f"  predicted computed step on {profile.name} at {sizes}: {total_seconds(rows) * 1e3:.4g} ms per rank "
            f"({profile.source})"] + _table(table, "    ")


def _gate_lines(prog: ProgramSpec, steps: int) -> list[str]:
    """Each gate's range and knobs; calibration, recorded alike on every gate, once; then the planned
    steps of each gate."""
    names = [s.name for s in prog.segments]
    out = []
    for k, g in enumerate(prog.gates):
        label = f" {k + 1} of {len(prog.gates)}" if len(prog.gates) > 1 else ""
        out += _gate_knob_lines(g, names, label)
    out += _calibration_lines(prog.gates[0], steps)
    for k, g in enumerate(prog.gates):
        label = f" of range {k + 1}" if len(prog.gates) > 1 else ""
        plan = "".join(LETTERS[a] for a in planned_actions(g, steps))
        out.append(f"    planned steps{label} ({LETTERS['computed']} computed, {LETTERS['reused']} reused, "
                   f"{LETTERS['forecast']} forecast, ? decided by the probe): {plan}")
    return out


def _gate_knob_lines(g: CacheGate, names: list[str], label: str) -> list[str]:
    knobs = (f"threshold {g.threshold:g}" if g.strategy in THRESHOLD_STRATEGIES else
             (f"interval {g.interval}" if g.interval > 1 or not g.mask else "refreshes on the mask's steps")
             if g.strategy == "taylorseer" else "")
    out = [f"  cache gate{label}: {g.strategy}, skips {names[g.skip_first]} .. {names[g.skip_last]} "
           f"({g.skip_last - g.skip_first + 1} segments), streams {', '.join(g.stream_out)}",
           f"    probe {g.probe}{' of ' + ', '.join(g.probe_values) if g.probe != 'none' else ''}"
           f"{'; ' + knobs if knobs else ''}; skipped steps {'forecast (order %d)' % g.taylor_order if g.taylor_order else 'reuse'}"
           f"; warmup {g.warmup}, cooldown {g.cooldown}"
           + (f"; at most {g.max_cached_steps} cached" if g.max_cached_steps >= 0 else "")
           + (f", {g.max_continuous_cached_steps} in a row" if g.max_continuous_cached_steps >= 0 else "")]
    if g.rescale:
        out.append("    rescale polynomial " + ", ".join(f"{c:.4g}" for c in g.rescale))
    if g.mask:
        out.append(f"    static mask: computes {sum(g.mask)} of {len(g.mask)} steps")
    return out


def _calibration_lines(g: CacheGate, steps: int) -> list[str]:
    out = []
    fit = g.calibration.get("rescale_fit")
    if fit:
        out.append(f"    rescale fitted (degree {fit['degree']}) on {fit['points']} steps, seeds {fit['seeds']}")
    schedule = g.calibration.get("schedule")
    if schedule:
        out.append(f"    schedule chosen from the measured cost of reusing each step (seeds {schedule['seeds']}): "
                   f"fewest computed steps possible "
                   f"{', '.join(str(min(int(m) for m in r['least_cost'])) for r in schedule['ranges'])}"
                   + (" (per block range)" if len(schedule["ranges"]) > 1 else ""))
    curve = g.calibration.get("magnitude_ratios")
    if curve:
        ratios = curve["ratios"][1:]
        out.append(f"    magnitude ratios measured on seeds {curve['seeds']}: {min(ratios):.3f}..{max(ratios):.3f} "
                   f"(mean {sum(ratios) / len(ratios):.3f})")
    mapped = g.calibration.get("ratio_map")
    if mapped:
        out.append(_ratio_map_line(mapped, g.strategy, steps))
    fit = g.calibration.get("ratio_fit")
    if fit:
        out.append(_ratio_fit_line(fit))
    search = g.calibration.get("search")
    if search:
        out.append(_search_line(search))
    return out


def _ratio_map_line(mapped: dict, strategy: str, steps: int) -> str:
    """What cache_ratio means on this model (dacc/compiler/ratio_map.py)."""
    def knob(p: dict) -> str:
        return f"threshold {p['threshold']:.3g}, " if strategy in THRESHOLD_STRATEGIES else ""
    points = "; ".join(f"{p['cache_ratio']:g} -> {knob(p)}{p['computed_steps']}/{steps} steps computed"
                       for p in mapped["points"])
    return (f"    cache_ratio on this model (replayed on {mapped['recordings']} recorded generation(s), "
            f"{mapped['error_per_ratio'] * mapped.get('gain', 1.0):.4g} error per step at ratio 1): {points}")


def _ratio_fit_line(fit: dict) -> str:
    """How the ratio's budget was set from measured PSNR (dacc/compiler/ratio_fit.py)."""
    runs = ", ".join(f"{b:.3g} -> {p:.2f} dB" for b, p, _ in fit["runs"])
    budget, psnr, speedup = fit["chosen"]
    return (f"    cache_ratio {fit['cache_ratio']:g} asks for about {fit['target_psnr']:.1f} dB; measured on seeds "
            f"{fit['seeds']} (budget -> PSNR: {runs}): chose budget {budget:.3g}, {psnr:.2f} dB, "
            f"{speedup:.2f}x fewer FLOPs")


def _search_line(search: dict) -> str:
    head = f"    target PSNR {search['target_psnr']:g} dB: "
    if not search.get("met"):
        return head + ("no cache_ratio that skips anything met it on the calibration and validation seeds "
                       "(sample()); every step computes")
    return head + (f"chose cache_ratio {search['cache_ratio']:.3f}, {search['flops_speedup']:.2f}x fewer FLOPs; "
                   f"validated on seeds {search['validation_seeds']}: mean {search['validation_psnr_mean']:.2f} dB, "
                   f"worst seed {search['validation_psnr_worst']:.2f} dB (tuned on seeds {search['calibration_seeds']})")


def write_decision_map(path: str | Path, out: str | Path) -> str:
    """The artifact's step x segment map: what the compile-time search measured on sample() when
    there was one, otherwise the planned schedule (probe-decided steps drawn as 'dynamic')."""
    from dacc.runtime.decision_map import draw_decision_map, maps_from_decisions

    m: Manifest = read_manifest(Path(path))
    maps = {}
    for prog in m.programs:  # calibration records one search for the whole artifact, on every gate
        if prog.gates:
            measured = (prog.gates[0].calibration.get("search") or {}).get("decisions") or {}
            maps.update(maps_from_decisions(m.programs, measured, ": measured on sample()"))
    for i, prog in enumerate(m.programs):
        if prog.gates and not any(prog is p for p, _ in maps.values()):
            maps[f"program{i}: planned"] = (prog, [planned_actions(g, m.num_inference_steps) for g in prog.gates])
    if not maps:
        return "no cache gate in this artifact: every step computes every segment; no map written"
    draw_decision_map(maps, out)
    return f"decision map written to {out}"
