"""Does the same `cache_ratio` mean the same quality on every model? Each trained model, each
strategy, at one ratio: the knob from the fixed defaults (dacc/compiler/cache_knobs.py, tuned on
the demo: what a model without sample() gets) beside the knob the compiler maps from the model's
own recordings (dacc/compiler/ratio_map.py), its budget fitted to the PSNR the ratio asks for on
the calibration seeds (dacc/compiler/ratio_fit.py; the scale's anchor, ratio 0.5 = 30 dB, is the
replay budget's value on glyphs).

    python bench/ratio.py [--ratio 0.5] [--models glyphs,patterns,demo]

PSNR on held-out seeds 6-9 against the uncached output; FLOPs of those generations against the
uncached count. The spread row is the difference between the best and worst model: the smaller,
the more the ratio means one thing. Writes bench/results/ratio.json and ratio.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import dacc
from common import RESULTS, compile_trained, held_out_quality, held_out_references, write_results
from dacc.compiler.cache_knobs import THRESHOLD_PER_RATIO, dynamic_knobs
from dacc.compiler.ratio_fit import FIT_SEEDS, ratio_psnr
from dacc.compiler.search_seeds import HELD_OUT_SEEDS
from dacc.models.train import trained_models
from dacc.schema.plan import cache_options, parse_plan

STEPS = 50
TUNED_ON = "glyphs"  # the model the ratio scale's anchor was chosen on (bench/results/ratio_tuning_glyphs.jsonl)


def fixed_options(strategy: str, ratio: float, options: dict) -> dict | None:
    """The knob the fixed defaults give at `ratio` (None: the strategy has no fixed mapping)."""
    plan = parse_plan({"num_inference_steps": STEPS,
                       "cache": {"strategy": strategy, "cache_ratio": ratio, "options": options}})
    knobs = dynamic_knobs(strategy, ratio, cache_options(plan), STEPS)
    if strategy in THRESHOLD_PER_RATIO:
        return {"threshold": knobs["threshold"]}
    if strategy == "taylorseer":
        return {"interval": knobs["interval"]}
    return None


STRATEGIES = [("dbcache", {}), ("teacache", {}), ("taylorseer", {"order": 2}), ("schedule", {}), ("magcache", {})]


def measure(m, cache: dict, refs: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = dacc.load(compile_trained(cache, Path(tmp) / "a.dacc", STEPS, m))
    psnrs, speedup = held_out_quality(m, model, refs)
    return {"psnr_mean": statistics.mean(psnrs), "psnr_worst": min(psnrs), "flops_speedup": speedup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--models", default="glyphs,patterns,demo")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        m = trained_models()[name]
        refs = held_out_references(m, STEPS)
        for strategy, options in STRATEGIES:
            base = {"strategy": strategy, "cache_ratio": args.ratio, "options": options}
            fixed = fixed_options(strategy, args.ratio, options)
            row = {"model": name, "strategy": strategy,
                   "fixed": measure(m, {**base, "options": {**options, **fixed}}, refs) if fixed else None,
                   "mapped": measure(m, base, refs)}
            rows.append(row)
            print(f"{name:9s} {strategy:10s} fixed {row['fixed']} mapped {row['mapped']}", file=sys.stderr)
    previous = RESULTS / "ratio.json"  # a run of some models keeps the others' rows at the same ratio
    if previous.exists():
        earlier = json.loads(previous.read_text())
        if earlier.get("cache_ratio") == args.ratio and earlier.get("steps") == STEPS:
            ran = {r["model"] for r in rows}
            rows = [r for r in earlier["rows"] if r["model"] not in ran] + rows
    report = {"cache_ratio": args.ratio, "steps": STEPS, "held_out_seeds": list(HELD_OUT_SEEDS),
              "tuned_on": TUNED_ON, "rows": rows}
    write_results("ratio", report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"`cache_ratio: {report['cache_ratio']:g}` at {report['steps']} steps: held-out PSNR (seeds "
             f"{report['held_out_seeds']}, mean) and matmul FLOPs speedup; fixed = the defaults' knob, mapped = "
             f"measured on the model's own recordings and fitted to the asked PSNR "
             f"({ratio_psnr(report['cache_ratio']):.1f} dB) on seeds {list(FIT_SEEDS)} (the scale's anchor was "
             f"chosen on {TUNED_ON}).", "",
             "| strategy | model | fixed: PSNR dB | fixed: FLOPs | mapped: PSNR dB | mapped: FLOPs |", "|---|---|---|---|---|---|"]
    by_strategy: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_strategy.setdefault(r["strategy"], []).append(r)
    for strategy, rows in by_strategy.items():
        for r in rows:
            f, g = r["fixed"], r["mapped"]
            fixed = f"{f['psnr_mean']:.2f} | {f['flops_speedup']:.2f}x" if f else "- | -"
            name = f"{r['model']} (tuning)" if r["model"] == TUNED_ON else r["model"]
            lines.append(f"| {strategy} | {name} | {fixed} | {g['psnr_mean']:.2f} | {g['flops_speedup']:.2f}x |")
        spread = {k: [r[k]["psnr_mean"] for r in rows if r[k]] for k in ("fixed", "mapped")}
        cells = [f"{max(v) - min(v):.2f} dB" if len(v) > 1 else "-" for v in spread.values()]
        lines.append(f"| {strategy} | spread across models | {cells[0]} | | {cells[1]} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
