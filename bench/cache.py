"""Cache strategies on a trained model: speed against eager and quality against the uncached
output, every strategy at several settings, in one run.

    python bench/cache.py [--model demo|glyphs|patterns] [--per-class 2] [--steps 50] [--repeats 3]

Writes bench/results/cache.json and cache.md (the demo), cache_<model>.json and .md (the others).
The cache constants were chosen on the demo: the other models' figures are the unseen ones.

Quality (PSNR, SSIM against the uncached output; conditional accuracy) is measured on the held-out
seeds (dacc/compiler/search_seeds.py), one image of every class per seed: no calibration or
target_psnr search ever ran on them. Transformer wall time is the median of `repeats` generations
of `per-class` images of every class after a warm-up; eager is measured first and again last, and
speedups use the mean of the two. FLOPs (deterministic) are reported beside wall time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dacc
from common import compile_trained, generation_flops, write_results
from dacc.compiler.search_seeds import HELD_OUT_SEEDS, seed_psnr
from dacc.metrics import conditional_accuracy, ssim
from dacc.models.flow import generate
from dacc.models.train import trained_models


CONFIGS: list[tuple[str, dict | None]] = [
    ("dacc empty plan", {}),
    ("gate that never fires (dbcache r=0)", {"strategy": "dbcache", "cache_ratio": 0.0}),
    ("FBCache (dbcache F1B0) r=0.2", {"strategy": "dbcache", "cache_ratio": 0.2}),
    ("FBCache (dbcache F1B0) r=0.4", {"strategy": "dbcache", "cache_ratio": 0.4}),
    ("FBCache (dbcache F1B0) r=0.6", {"strategy": "dbcache", "cache_ratio": 0.6}),
    ("dbcache F1B0 +TaylorSeer o1 r=0.4", {"strategy": "dbcache", "cache_ratio": 0.4, "options": {"taylorseer_order": 1}}),
    ("dbcache F1B0 +TaylorSeer o1 r=0.6", {"strategy": "dbcache", "cache_ratio": 0.6, "options": {"taylorseer_order": 1}}),
    ("dbcache F1B0 +TaylorSeer o2 r=0.6", {"strategy": "dbcache", "cache_ratio": 0.6, "options": {"taylorseer_order": 2}}),
    ("dbcache F2B1 r=0.4", {"strategy": "dbcache", "cache_ratio": 0.4, "options": {"Fn": 2, "Bn": 1}}),
    ("TeaCache (calibrated) r=0.33", {"strategy": "teacache", "cache_ratio": 0.33}),
    ("TeaCache (calibrated) r=0.66", {"strategy": "teacache", "cache_ratio": 0.66}),
    ("TeaCache (calibrated) r=1.0", {"strategy": "teacache", "cache_ratio": 1.0}),
    ("target PSNR 30 (teacache)", {"strategy": "teacache", "target_psnr": 30}),
    ("TaylorSeer o1 interval 3", {"strategy": "taylorseer", "options": {"order": 1, "interval": 3}}),
    ("TaylorSeer o2 interval 4", {"strategy": "taylorseer", "options": {"order": 2, "interval": 4}}),
    ("TaylorSeer o2 interval 6 (demo's recommended plan)", {"strategy": "taylorseer",
                                                            "options": {"order": 2, "interval": 6}}),
    ("SCM slow", {"strategy": "scm", "options": {"policy": "slow"}}),
    ("SCM fast", {"strategy": "scm", "options": {"policy": "fast"}}),
    ("SCM fast +TaylorSeer o1", {"strategy": "scm", "options": {"policy": "fast", "taylorseer_order": 1}}),
    ("SCM ultra +TaylorSeer o2", {"strategy": "scm", "options": {"policy": "ultra", "taylorseer_order": 2}}),
    ("target PSNR 30 (dbcache +TaylorSeer o2)", {"strategy": "dbcache", "target_psnr": 30,
                                                  "options": {"taylorseer_order": 2}}),
    ("target PSNR 30 (taylorseer o2)", {"strategy": "taylorseer", "target_psnr": 30, "options": {"order": 2}}),
    ("schedule (calibrated mask) r=0.5", {"strategy": "schedule", "cache_ratio": 0.5}),
    ("schedule (calibrated mask) r=0.7", {"strategy": "schedule", "cache_ratio": 0.7}),
    ("schedule +TaylorSeer o1 r=0.7", {"strategy": "schedule", "cache_ratio": 0.7, "options": {"taylorseer_order": 1}}),
    ("target PSNR 30 (schedule)", {"strategy": "schedule", "target_psnr": 30}),
]


def timed_generation(trained, model, encoder, labels, steps, seed, repeats):
    times, result = [], None
    for _ in range(repeats):
        if hasattr(model, "reset"):
            model.reset()
        result = generate(trained, model, encoder, labels, steps=steps, seed=seed)
        times.append(result.transformer_seconds)
    return result, statistics.median(times)


def _held_out_labels(m) -> torch.Tensor:
    return torch.arange(m.classes).repeat(len(HELD_OUT_SEEDS))


def held_out(m, model, encoder, steps) -> list[torch.Tensor]:
    """One image of every class from each held-out seed (as the model's sample() draws them)."""
    out = []
    for s in HELD_OUT_SEEDS:
        if hasattr(model, "reset"):
            model.reset()
        out.append(generate(m, model, encoder, torch.arange(m.classes), steps=steps, seed=s).images)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(trained_models()), default="demo")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", help="substring: run only configs whose name contains it")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    m = trained_models()[args.model]
    labels = torch.arange(m.classes).repeat_interleave(args.per_class)
    seed = HELD_OUT_SEEDS[0]
    encoder, classifier, eager = m.load_encoder(), m.load_classifier(), m.load_transformer()
    generate(m, eager, encoder, labels[:2], steps=2, seed=seed)  # warm-up
    _, eager_first = timed_generation(m, eager, encoder, labels, args.steps, seed, args.repeats)
    eager_flops = generation_flops(eager, encoder, labels, args.steps, seed, trained=m)
    refs = held_out(m, eager, encoder, args.steps)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in CONFIGS:
            if args.only and args.only not in name:
                continue
            start = time.perf_counter()
            model = dacc.load(compile_trained(cache, Path(tmp) / "a.dacc", args.steps, m))
            compile_s = time.perf_counter() - start
            generate(m, model, encoder, labels[:2], steps=2, seed=seed)
            _, seconds = timed_generation(m, model, encoder, labels, args.steps, seed, args.repeats)
            stats = model.stats()
            flops = generation_flops(model, encoder, labels, args.steps, seed, trained=m)
            outs = held_out(m, model, encoder, args.steps)
            per_seed = [seed_psnr(o, r) for o, r in zip(outs, refs)]
            gates = model.manifest.programs[0].gates
            gate = gates[0] if gates else None  # the empty plan has none
            rows.append({"name": name, "cache": cache, "seconds": seconds, "flops": flops,
                         "psnr": statistics.mean(per_seed), "psnr_worst_seed": min(per_seed),
                         "ssim": ssim(torch.cat(outs), torch.cat(refs)),
                         "accuracy": conditional_accuracy(torch.cat(outs), _held_out_labels(m), classifier),
                         "reused_fraction": stats["segments_reused"] / max(1, stats["segments_reused"]
                                                                           + stats["segments_computed"]),
                         "compile_seconds": compile_s,
                         "chosen": (gate.calibration.get("search") or {}) if gate else {}})
            for key in ("decisions",):
                rows[-1]["chosen"].pop(key, None)
            print(f"{name:42s} {seconds:6.2f}s  PSNR {rows[-1]['psnr']:6.2f}  acc {rows[-1]['accuracy']:.3f}",
                  file=sys.stderr)
    _, eager_last = timed_generation(m, eager, encoder, labels, args.steps, seed, args.repeats)
    eager_s = (eager_first + eager_last) / 2
    eager_acc = conditional_accuracy(torch.cat(refs), _held_out_labels(m), classifier)
    for r in rows:
        r["speedup"] = eager_s / r["seconds"]
        r["flops_speedup"] = eager_flops / r["flops"]
    report = {"model": m.name, "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "samples": len(labels), "steps": args.steps, "repeats": args.repeats,
              "quality_seeds": list(HELD_OUT_SEEDS),
              "eager": {"seconds_first": eager_first, "seconds_last": eager_last, "flops": eager_flops,
                        "accuracy": eager_acc},
              "configs": rows}
    write_results("cache" if m.name == "demo" else f"cache_{m.name}", report, markdown(report))
    return 0


def markdown(report: dict) -> str:
    e = report["eager"]
    lines = [f"{report.get('model', 'demo').capitalize()} model, {report['steps']} steps; wall time: {report['samples']} "
             f"samples (batched CFG), {report['threads']} CPU threads, median of {report['repeats']}; eager "
             f"{e['seconds_first']:.2f} s first / {e['seconds_last']:.2f} s last. Quality on held-out seeds "
             f"{report['quality_seeds']} (one image per class each; mean and worst seed); eager conditional accuracy "
             f"{100 * e['accuracy']:.1f}%.", "",
             "| plan | speedup (wall) | speedup (FLOPs) | PSNR dB (worst seed) | SSIM | cond. acc | chosen |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(report["configs"], key=lambda r: -r["speedup"]):
        lines.append(f"| {r['name']} | {r['speedup']:.2f}x | {r['flops_speedup']:.2f}x | {r['psnr']:.2f} "
                     f"({r['psnr_worst_seed']:.2f}) | {r['ssim']:.4f} | {100 * r['accuracy']:.1f}% | "
                     f"{_chosen(r['chosen'])} |")
    return "\n".join(lines) + "\n"


def _chosen(search: dict) -> str:
    if not search:
        return ""
    if not search.get("met"):
        return "target not met: computes every step"
    return (f"ratio {search['cache_ratio']:.3f}; validated {search['validation_psnr_mean']:.2f} dB "
            f"(worst {search['validation_psnr_worst']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
