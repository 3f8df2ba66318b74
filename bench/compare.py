"""dacc against the libraries users would pick instead, side by side in one run.

    python bench/compare.py            # or: make bench

On the trained demo model, 50 steps, the same seeds, classes and sampler for everyone: eager;
dacc at several plans; diffusers' cache hooks (`transformer.enable_cache(...)`); cache-dit
(`cache_dit.enable_cache`). Peers are optional (`pip install -e '.[bench]'`); a missing peer or a
configuration that fails is reported as skipped, with the reason.

Each configuration runs `repeats` generations on a fresh transformer with the peer freshly
enabled (so no cache state leaks between repeats); the transformer time is the median. Eager runs
first and last; speedups divide by the mean of the two. FLOPs come from FlopCounterMode over the
last generation. Writes bench/results/compare.json, compare.md and compare.png (Pareto plot).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import dacc
from common import RESULTS, compile_trained, generation_flops, write_results
from dacc.metrics import conditional_accuracy, psnr, ssim
from dacc.models.demo import load_encoder, load_transformer
from dacc.models.demo.classifier import load_classifier
from dacc.models.demo.sampler import generate

STEPS = 50


class Clock:
    """The current timestep, for hooks that ask for it (as a pipeline's `_current_timestep`)."""
    t = 1000.0

    def __call__(self, i: int, t: float) -> None:
        Clock.t = t


def dacc_configs(tmp: Path) -> list[tuple[str, Callable]]:
    plans = [
        ("empty plan", {}),
        ("gate that never fires (dbcache r=0)", {"strategy": "dbcache", "cache_ratio": 0.0}),
        ("FBCache (dbcache F1B0) r=0.4", {"strategy": "dbcache", "cache_ratio": 0.4}),
        ("dbcache F1B0 +TaylorSeer o2 r=0.6", {"strategy": "dbcache", "cache_ratio": 0.6,
                                              "options": {"taylorseer_order": 2}}),
        ("TeaCache (calibrated) r=0.33", {"strategy": "teacache", "cache_ratio": 0.33}),
        ("TaylorSeer o2 interval 4", {"strategy": "taylorseer", "options": {"order": 2, "interval": 4}}),
        ("TaylorSeer o2 interval 6", {"strategy": "taylorseer", "options": {"order": 2, "interval": 6}}),
        ("SCM fast", {"strategy": "scm", "options": {"policy": "fast"}}),
        ("target PSNR 30 (taylorseer o2)", {"strategy": "taylorseer", "target_psnr": 30, "options": {"order": 2}}),
    ]
    out = []
    for i, (name, cache) in enumerate(plans):
        def make(cache=cache, i=i):
            path = tmp / f"dacc{i}.dacc"
            if not path.exists():
                compile_trained(cache, path, STEPS)
            return dacc.load(path)
        out.append((name, make))
    return out


def diffusers_configs() -> list[tuple[str, Callable]]:
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    def hooked(config_fn):
        def make():
            t = load_transformer()
            t.enable_cache(config_fn())
            return t
        return make
    configs = [(f"FirstBlockCache threshold {th}", hooked(lambda th=th: FirstBlockCacheConfig(threshold=th)))
               for th in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)]
    configs += [(f"TaylorSeerCache interval {n} order {o}",
                 hooked(lambda n=n, o=o: TaylorSeerCacheConfig(cache_interval=n, max_order=o,
                                                               taylor_factors_dtype=torch.float32)))
                for n, o in ((3, 1), (5, 1), (5, 2), (8, 1), (8, 2), (12, 1))]
    configs += [(f"PyramidAttentionBroadcast spatial skip {r}",
                 hooked(lambda r=r: PyramidAttentionBroadcastConfig(
                     spatial_attention_block_skip_range=r, spatial_attention_timestep_skip_range=(100, 800),
                     current_timestep_callback=lambda: Clock.t)))
                for r in (2, 4)]
    configs.append(("FasterCache (defaults)", hooked(lambda: FasterCacheConfig(
        current_timestep_callback=lambda: Clock.t, tensor_format="BFCHW"))))
    configs.append(("MagCache threshold 0.06", hooked(lambda: MagCacheConfig(num_inference_steps=STEPS))))
    return configs


def cache_dit_configs() -> list[tuple[str, Callable]]:
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    def enabled(**kw):
        calibrator = kw.pop("taylorseer", None)

        def make():
            t = load_transformer()
            cache_dit.enable_cache(t, cache_config=DBCacheConfig(num_inference_steps=STEPS, **kw),
                                   calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=calibrator)
                                   if calibrator else None)
            return t
        return make
    configs = [(f"DBCache F{f}B0 R{r}", enabled(Fn_compute_blocks=f, Bn_compute_blocks=0, residual_diff_threshold=r))
               for f, r in ((1, 0.08), (1, 0.12), (1, 0.24), (2, 0.12))]
    configs += [(f"DBCache F1B0 R{r}", enabled(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=r))
                for r in (0.32, 0.4)]
    configs += [(f"DBCache F1B0 R{r} + TaylorSeer o1", enabled(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                               residual_diff_threshold=r, taylorseer=1))
                for r in (0.12, 0.24, 0.32, 0.4)]
    configs += [(f"DBCache F1B0 R{r} + TaylorSeer o1, warmup 4", enabled(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=r, taylorseer=1, max_warmup_steps=4))
        for r in (0.24, 0.4)]
    configs += [(f"DBCache F1B0 R0.12 + SCM {p}", enabled(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.12,
        steps_computation_mask=cache_dit.steps_mask(mask_policy=p, total_steps=STEPS),
        steps_computation_policy="dynamic")) for p in ("fast", "ultra")]
    return configs


def run(make: Callable, encoder, labels, repeats: int, seed: int):
    times, result, model = [], None, None
    for _ in range(repeats):
        model = make()
        result = generate(model, encoder, labels, steps=STEPS, seed=seed, on_step=Clock())
        times.append(result.transformer_seconds)
    if not hasattr(model, "reset"):  # a peer's cache state is cleared by building it afresh
        model = make()
    return result, statistics.median(times), generation_flops(model, encoder, labels, STEPS, seed, on_step=Clock())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    encoder, classifier = load_encoder(), load_classifier()
    generate(load_transformer(), encoder, labels[:2], steps=2, seed=args.seed)  # warm-up
    ref, eager_first, eager_flops = run(load_transformer, encoder, labels, args.repeats, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        suites = [("dacc", lambda: dacc_configs(Path(tmp))), ("diffusers", diffusers_configs),
                  ("cache-dit", cache_dit_configs)]
        for library, configs in suites:
            try:
                entries = configs()
            except ImportError as exc:
                rows.append({"library": library, "name": "(all)", "skipped": f"not installed: {exc}"})
                print(f"{library}: skipped ({exc})", file=sys.stderr)
                continue
            for name, make in entries:
                start = time.perf_counter()
                try:
                    out, seconds, flops = run(make, encoder, labels, args.repeats, args.seed)
                except Exception as exc:  # a peer that cannot run this model is reported, not fatal
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    rows.append({"library": library, "name": name, "skipped": reason})
                    print(f"{library:9s} {name:42s} skipped: {reason}", file=sys.stderr)
                    traceback.print_exc(limit=2, file=sys.stderr)
                    continue
                row = {"library": library, "name": name, "seconds": seconds, "flops": flops,
                       "psnr": psnr(out.images, ref.images), "ssim": ssim(out.images, ref.images),
                       "accuracy": conditional_accuracy(out.images, labels, classifier),
                       "bench_seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"{library:9s} {name:42s} {seconds:6.2f}s PSNR {row['psnr']:6.2f} acc {row['accuracy']:.3f}",
                      file=sys.stderr)
    _, eager_last, _ = run(load_transformer, encoder, labels, args.repeats, args.seed)
    eager_s = (eager_first + eager_last) / 2
    for r in rows:
        if "seconds" in r:
            r["speedup"] = eager_s / r["seconds"]
            r["flops_speedup"] = eager_flops / r["flops"]
    report = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "samples": len(labels), "steps": STEPS, "repeats": args.repeats,
              "eager": {"seconds_first": eager_first, "seconds_last": eager_last, "flops": eager_flops,
                        "accuracy": conditional_accuracy(ref.images, labels, classifier)},
              "versions": _versions(), "configs": rows, "summary": summarize(rows)}
    write_results("compare", report, markdown(report))
    pareto_plot(report, RESULTS / "compare.png")
    return 0


def summarize(rows: list[dict], target: float = 30.0) -> dict:
    """Per library, the fastest configuration at PSNR >= target."""
    best = {}
    for r in rows:
        if "speedup" in r and r["psnr"] >= target:
            if r["library"] not in best or r["speedup"] > best[r["library"]]["speedup"]:
                best[r["library"]] = {"name": r["name"], "speedup": r["speedup"], "psnr": r["psnr"]}
    return {"target_psnr": target, "best": best}


def _versions() -> dict:
    out = {}
    for name in ("diffusers", "cache_dit"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def markdown(report: dict) -> str:
    e, s = report["eager"], report["summary"]
    lines = [f"Demo model, {report['steps']} steps, {report['samples']} samples with batched CFG, "
             f"{report['threads']} CPU threads, median of {report['repeats']}; eager {e['seconds_first']:.2f} s "
             f"(first) / {e['seconds_last']:.2f} s (last), conditional accuracy {100 * e['accuracy']:.1f}%. "
             f"Versions: {report['versions']}.", "",
             f"Fastest at PSNR >= {s['target_psnr']:.0f} dB: " + "; ".join(
                 f"{lib} {b['speedup']:.2f}x ({b['name']}, {b['psnr']:.1f} dB)" for lib, b in s["best"].items()), "",
             "| library | configuration | speedup (wall) | speedup (FLOPs) | PSNR dB | SSIM | cond. acc |",
             "|---|---|---|---|---|---|---|"]
    ran = [r for r in report["configs"] if "speedup" in r]
    for r in sorted(ran, key=lambda r: -r["speedup"]):
        lines.append(f"| {r['library']} | {r['name']} | {r['speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {100 * r['accuracy']:.1f}% |")
    for r in report["configs"]:
        if "skipped" in r:
            lines.append(f"| {r['library']} | {r['name']} | skipped: {r['skipped']} | | | | |")
    return "\n".join(lines) + "\n"


def pareto_plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for library, marker in (("dacc", "o"), ("diffusers", "s"), ("cache-dit", "^")):
        pts = [(r["psnr"] if r["psnr"] != float("inf") else 60.0, r["speedup"])
               for r in report["configs"] if r["library"] == library and "speedup" in r]
        if pts:
            ax.scatter([p for p, _ in pts], [s for _, s in pts], marker=marker, label=library, s=36)
    ax.axvline(report["summary"]["target_psnr"], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("PSNR against uncached output (dB; identical plotted at 60)")
    ax.set_ylabel("transformer speedup vs eager (wall)")
    ax.set_title("Demo model, 50 steps: speed vs quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
