"""Quantized linears: quality on every trained model and speed on a larger Flux config.

    python bench/quant.py [--models demo,glyphs,patterns] [--per-class 2] [--steps 50] [--seeds 100 101]
                          [--rounds 5] [--skip-speed] [--only int4_weight,...]

Quality, per trained model: every quantize mode with the default selection, target_psnr 35,
int8_dynamic with SmoothQuant smoothing, int4_weight with the fragile layers in int4 too, and
with target_psnr 27 (the search promoting sensitive blocks to int8) (and on
the demo its recommended cache plan with int8_dynamic), PSNR/SSIM against the unquantized
model's output and conditional accuracy, on seeds no compile step ever used (GPTQ's input
statistics, smoothing and the target search run on seeds 0-5), and the bytes the artifact stores
for the whole model against fp32. Speed: `bench/flux_large.py` (hidden 1024, 1152 tokens, batch
2) compiled with each mode, calls interleaved round by round against eager (median of `rounds`,
eager measured in every round), and each linear shape timed alone (fp32 `F.linear` vs the dacc
operator) with its matmul FLOPs. Writes bench/results/quant.json and quant.md; a run of some
models (or --skip-speed) keeps the other sections of the previous results.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

import dacc
from common import RESULTS, finite
from dacc.compiler.compile import TracedModel, compile_model, trace_model
from dacc.compiler.model_file import load_model_file
from dacc.demo import DEMO_MODEL
from dacc.kernels.schemes import SCHEMES
from dacc.metrics import conditional_accuracy, psnr, ssim
from dacc.models.flow import TrainedModel, generate
from dacc.models.train import trained_models
from dacc.schema.errors import DaccError
from dacc.schema.manifest import WEIGHTS_FILE

MODES = ("int8_weight", "int8_dynamic", "fp8_dynamic", "int4_weight")
LARGE = Path(__file__).parent / "flux_large.py"
RECOMMENDED = yaml.safe_load((Path(DEMO_MODEL).parent / "plan.yaml").read_text())["cache"]


_TRACES: dict[Path, TracedModel] = {}


def compile_plan(model: Path, out: Path, quantize: dict, cache: dict | None = None, steps: int = 50,
                 log=lambda m: None) -> Path:
    """Compile from one shared trace per model file."""
    plan = out.with_suffix(".yaml")
    plan.write_text(yaml.safe_dump({"num_inference_steps": steps, "quantize": quantize,
                                    "cache": cache or {"strategy": "none"}}))
    if model not in _TRACES:
        _TRACES[model] = trace_model(model, log=lambda m: None)
    compile_model(model, plan, out, force=True, log=log, traced=_TRACES[model])
    return out


def stored_bytes(artifact: Path) -> int:
    """Tensor bytes in the artifact's weights file (every weight of the model, quantized or not)."""
    with safe_open(str(artifact / WEIGHTS_FILE), "pt") as f:
        return sum(t.numel() * t.element_size() for t in (f.get_tensor(k) for k in f.keys()))


def quality(args, tmp: Path, m: TrainedModel) -> dict:
    labels = torch.arange(m.classes).repeat_interleave(args.per_class)
    encoder, classifier, eager = m.load_encoder(), m.load_classifier(), m.load_transformer()
    fp32_bytes = sum(t.numel() * 4 for t in [*eager.parameters(), *eager.buffers()])
    refs = {s: generate(m, eager, encoder, labels, steps=args.steps, seed=s).images for s in args.seeds}
    ref_acc = statistics.mean(conditional_accuracy(refs[s], labels, classifier) for s in args.seeds)
    rows = []
    configs = [(mode, {"mode": mode}, None) for mode in MODES] + [
        ("int8_weight, target_psnr 35", {"mode": "int8_weight", "target_psnr": 35}, None),
        ("int8_dynamic, target_psnr 35", {"mode": "int8_dynamic", "target_psnr": 35}, None),
        ("int8_dynamic, smoothing 0.5", {"mode": "int8_dynamic", "smoothing": 0.5}, None),
        # the memory mode with the embedders and the final projection in int4 too
        ("int4_weight, fragile same", {"mode": "int4_weight", "fragile": "same"}, None),
        # the search promoting the most sensitive blocks to int8 until the int4 bar (27 dB) holds
        # on validation seeds: the fewest bytes that keep it
        ("int4_weight, target_psnr 27", {"mode": "int4_weight", "target_psnr": 27}, None)]
    if m.name == "demo":
        configs += [("int8_dynamic + recommended cache plan", {"mode": "int8_dynamic"}, RECOMMENDED),
                    ("recommended cache plan alone", {"mode": "none"}, RECOMMENDED)]
    if args.only:
        configs = [c for c in configs if any(s in c[0] for s in args.only.split(","))]
    for name, quantize, cache in configs:
        notes: list[str] = []
        try:
            model = dacc.load(compile_plan(m.here / "model.py", tmp / "q.dacc", quantize, cache, args.steps,
                                           notes.append))
        except DaccError as exc:  # e.g. the compile's own check against eager refuses it: a result, reported
            rows.append({"name": name, "quantize": quantize, "cache": cache, "refused": str(exc).splitlines()[0]})
            print(f"{m.name:8s} {name:40s} refused: {rows[-1]['refused']}", file=sys.stderr)
            continue
        per_seed = []
        for s in args.seeds:
            model.reset()
            images = generate(m, model, encoder, labels, steps=args.steps, seed=s).images
            per_seed.append({"seed": s, "psnr": psnr(images, refs[s]), "ssim": ssim(images, refs[s]),
                             "accuracy": conditional_accuracy(images, labels, classifier)})
        sites = model.manifest.programs[0].linears
        row = {"name": name, "quantize": quantize, "cache": cache,
               "psnr_mean": statistics.mean(p["psnr"] for p in per_seed),
               "psnr_worst": min(p["psnr"] for p in per_seed),
               "ssim_mean": statistics.mean(p["ssim"] for p in per_seed),
               "accuracy": statistics.mean(p["accuracy"] for p in per_seed),
               "bytes_ratio": stored_bytes(tmp / "q.dacc") / fp32_bytes,
               "modes": {m: sum(s.quant == m for s in sites) for m in {s.quant for s in sites}},
               "search": model.manifest.quantize_search,
               "per_seed": per_seed}
        rows.append(row)
        print(f"{m.name:8s} {name:40s} PSNR {row['psnr_mean']:6.2f} (worst {row['psnr_worst']:.2f})  "
              f"acc {row['accuracy']:.3f}  bytes {row['bytes_ratio']:.3f}x", file=sys.stderr)
    params = sum(t.numel() for t in eager.parameters())
    return {"model": f"{m.name} ({type(eager).__name__}, {params / 1e6:.1f} M parameters)",
            "samples_per_seed": len(labels), "seeds": args.seeds, "steps": args.steps,
            "reference_accuracy": ref_acc, "rows": rows}


def _call_seconds(model, inputs) -> float:
    if hasattr(model, "reset"):
        model.reset()
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    return time.perf_counter() - start


def speed(args, tmp: Path) -> dict:
    mf = load_model_file(LARGE)
    eager = mf.build()
    inputs = mf.module.bench_inputs(7)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        eager(**inputs)
    models = {"fp32 eager": eager}
    for mode in ("none", *MODES):
        start = time.perf_counter()
        models[mode if mode != "none" else "dacc empty plan"] = dacc.load(
            compile_plan(LARGE, tmp / f"large-{mode}.dacc", {"mode": mode}, steps=10))
        print(f"compiled {mode} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for m in models.values():  # warm-up
        _call_seconds(m, inputs)
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):  # interleaved, rotating order: drift hits every model alike
        names = list(models)
        names = names[r % len(names):] + names[:r % len(names)]
        for name in names:
            times[name].append(_call_seconds(models[name], inputs))
    base = statistics.median(times["fp32 eager"])
    calls = {k: {"median_s": statistics.median(v), "speedup": base / statistics.median(v), "all_s": v}
             for k, v in times.items()}
    for k, v in calls.items():
        print(f"{k:20s} {v['median_s']:.3f} s  {v['speedup']:.2f}x", file=sys.stderr)
    return {"model": "bench/flux_large.py (hidden 1024, 2+4 blocks, 1024+128 tokens, batch 2, 132 M params)",
            "matmul_flops_per_call": counter.get_total_flops(), "rounds": args.rounds, "calls": calls,
            "layers": layer_times(eager, models, inputs)}


def layer_times(eager, models, inputs) -> list[dict]:
    """Each distinct linear shape alone: fp32 F.linear against every mode's operator, interleaved."""
    tokens = inputs["hidden_states"].shape[0] * (inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1])
    shapes = sorted({tuple(m.weight.shape) for m in eager.modules() if isinstance(m, torch.nn.Linear)
                     and m.weight.shape[1] >= 512})
    rows = []
    for out_f, in_f in shapes:
        g = torch.Generator().manual_seed(out_f + in_f)
        x, w, b = torch.randn(tokens, in_f, generator=g), torch.randn(out_f, in_f, generator=g) * in_f ** -0.5, \
            torch.randn(out_f, generator=g)
        fns = {"fp32": lambda: F.linear(x, w, b)}
        for mode in MODES:
            t = list(SCHEMES[mode].quantize(w, 64).values())
            fns[mode] = (lambda op=SCHEMES[mode].op, t=t: op(x, *t, b))
        seconds = {k: [] for k in fns}
        for _ in range(2):
            for f in fns.values():
                f()
        for _ in range(7):
            for k, f in fns.items():
                start = time.perf_counter()
                f()
                seconds[k].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        rows.append({"tokens": tokens, "in": in_f, "out": out_f, "flops": 2 * tokens * in_f * out_f,
                     "seconds": med, "speedup": {k: med["fp32"] / v for k, v in med.items() if k != "fp32"}})
        print(f"linear {in_f}->{out_f}: " + "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), file=sys.stderr)
    return rows


def markdown(report: dict) -> str:
    lines = []
    for q in report["quality"].values():
        lines += _quality_lines(q) + [""]
    s = report.get("speed")
    return "\n".join(lines + (_speed_lines(report, s) if s else [])) + "\n"


def _quality_lines(q: dict) -> list[str]:
    lines = [f"Quality: {q['model']}, {q['steps']} steps, {q['samples_per_seed']} samples on each of seeds "
             f"{q['seeds']} (never used by any compile step); PSNR/SSIM against the unquantized output; "
             f"unquantized accuracy {100 * q['reference_accuracy']:.1f}%.", "",
             "| plan | PSNR dB (mean / worst seed) | SSIM | cond. acc | stored bytes vs fp32 | linears by mode |",
             "|---|---|---|---|---|---|"]
    for r in q["rows"]:
        if "refused" in r:
            lines.append(f"| {r['name']} | refused by the compile: {r['refused']} | | | | |")
            continue
        modes = ", ".join(f"{n} {m}" for m, n in sorted(r["modes"].items()))
        if r["search"]:
            promoted = ", ".join(sorted(set(r["search"].get("promoted", {}).values()))) or "full"
            kept = f"{', '.join(r['search']['kept'])} at higher precision ({promoted})" if r["search"]["kept"] \
                else "nothing at higher precision"
            modes += f"; search kept {kept} (validated {r['search']['validation_psnr_mean']} dB)"
        lines.append(f"| {r['name']} | {r['psnr_mean']:.2f} / {r['psnr_worst']:.2f} | {r['ssim_mean']:.4f} | "
                     f"{100 * r['accuracy']:.1f}% | {r['bytes_ratio']:.3f}x | {modes} |")
    return lines


def _speed_lines(report: dict, s: dict) -> list[str]:
    lines = [f"Speed: {s['model']}, {report['threads']} CPU threads, median of {s['rounds']} interleaved "
              f"calls; {s['matmul_flops_per_call'] / 1e9:.0f} GFLOP (matmul) per call.", "",
              "| run | seconds per call | vs fp32 eager |", "|---|---|---|"]
    for k, v in s["calls"].items():
        lines.append(f"| {k} | {v['median_s']:.3f} | {v['speedup']:.2f}x |")
    lines += ["", "| linear (tokens x in -> out) | fp32 ms | " + " | ".join(MODES) + " |",
              "|---|---|" + "---|" * len(MODES)]
    for r in s["layers"]:
        lines.append(f"| {r['tokens']} x {r['in']} -> {r['out']} | {r['seconds']['fp32'] * 1e3:.1f} | "
                     + " | ".join(f"{r['seconds'][m] * 1e3:.1f} ({r['speedup'][m]:.2f}x)" for m in MODES) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,glyphs,patterns")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--only", help="comma-separated substrings: run only the quality rows whose name contains "
                                  "one, keeping the model's other rows from the previous results")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    previous = RESULTS / "quant.json"
    report = json.loads(previous.read_text()) if previous.exists() else {}
    if "rows" in report.get("quality", {}):  # the one-model layout of earlier runs was the demo's
        report["quality"] = {"demo": report["quality"]}
    report.update({"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    report.setdefault("quality", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.models.split(",") if n]:  # --models '': speed only
            fresh = quality(args, Path(tmp), trained_models()[name])
            earlier = report["quality"].get(name)
            if args.only and earlier:  # a partial run replaces its own rows only
                ran = {r["name"] for r in fresh["rows"]}
                fresh["rows"] = [r for r in earlier["rows"] if r["name"] not in ran] + fresh["rows"]
            report["quality"][name] = fresh
            _write(report)  # after every model: a long run keeps its part
        if not args.skip_speed:
            report["speed"] = speed(args, Path(tmp))
            _write(report)
    print(markdown(report))
    return 0


def _write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant.json").write_text(json.dumps(finite(report), indent=1) + "\n")
    (RESULTS / "quant.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
