"""dacc against the libraries users would pick instead, side by side, on every trained model.

    python bench/compare.py [--models demo,glyphs,patterns] [--only NAME]     # or: make bench

Per model, 50 steps, the same seeds, classes and sampler for everyone: eager; dacc at several plans;
diffusers' cache hooks (`transformer.enable_cache(...)`); cache-dit (`cache_dit.enable_cache`).
Peers are optional (`pip install -e '.[bench]'`); a missing peer or a configuration that fails is
reported as skipped, with the reason. The dacc plans are the same on every model (a user's first
try: a cache_ratio, or a target_psnr); the peers sweep their knobs, so each gets its best setting.

Each configuration runs `repeats` generations on a fresh transformer with the peer freshly
enabled (so no cache state leaks between repeats); the transformer time is the median. Eager runs
first and last; speedups divide by the mean of the two. FLOPs come from FlopCounterMode over the
last generation. Each model's configurations run in one process, one after another; ratios are
within a model. Writes bench/results/compare.json, compare.md (a table per model and a summary)
and compare.png (Pareto plot per model); a run of some models keeps the others' earlier sections.
"""
from __future__ import annotations

import argparse
import json
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
from common import RESULTS, compile_trained, finite, generation_flops, write_results
from dacc.compiler.search_seeds import HELD_OUT_SEEDS
from dacc.metrics import conditional_accuracy, psnr, ssim
from dacc.models.flow import TrainedModel, generate
from dacc.models.train import trained_models

STEPS = 50


class Clock:
    """The current timestep, for hooks that ask for it (as a pipeline's `_current_timestep`)."""
    t = 1000.0

    def __call__(self, i: int, t: float) -> None:
        Clock.t = t


def dacc_configs(m: TrainedModel, tmp: Path) -> list[tuple[str, Callable]]:
    plans = [
        ("empty plan", {}),
        ("gate that never fires (dbcache r=0)", {"strategy": "dbcache", "cache_ratio": 0.0}),
        ("dbcache F1B0 r=0.5", {"strategy": "dbcache", "cache_ratio": 0.5}),
        ("TeaCache (calibrated) r=0.5", {"strategy": "teacache", "cache_ratio": 0.5}),
        ("TaylorSeer o2 r=0.5", {"strategy": "taylorseer", "cache_ratio": 0.5, "options": {"order": 2}}),
        ("schedule r=0.5", {"strategy": "schedule", "cache_ratio": 0.5}),
        ("MagCache (calibrated) r=0.5", {"strategy": "magcache", "cache_ratio": 0.5}),
        ("target PSNR 30: dbcache +TaylorSeer o1", {"strategy": "dbcache", "target_psnr": 30,
                                                   "options": {"taylorseer_order": 1}}),
        ("target PSNR 30: taylorseer o2", {"strategy": "taylorseer", "target_psnr": 30, "options": {"order": 2}}),
        ("target PSNR 30: schedule +TaylorSeer o1", {"strategy": "schedule", "target_psnr": 30,
                                                    "options": {"taylorseer_order": 1}}),
    ]
    out = []
    for i, (name, cache) in enumerate(plans):
        def make(cache=cache, i=i):
            path = tmp / f"{m.name}{i}.dacc"
            if not path.exists():
                compile_trained(cache, path, STEPS, m)
            return dacc.load(path)
        out.append((name, make))
    return out


class DiffusersCached(torch.nn.Module):
    """A transformer whose class lacks diffusers' CacheMixin (SD3, PixArt in this diffusers) with a
    cache hook applied the way `enable_cache` applies it (the same public `apply_*` function), and
    the cache context a pipeline opens around each call (CacheMixin's own `cache_context`)."""

    def __init__(self, transformer: torch.nn.Module, config):
        super().__init__()
        import diffusers.hooks as hooks
        apply = {hooks.FasterCacheConfig: hooks.apply_faster_cache, hooks.FirstBlockCacheConfig:
                 hooks.apply_first_block_cache, hooks.MagCacheConfig: hooks.apply_mag_cache,
                 hooks.PyramidAttentionBroadcastConfig: hooks.apply_pyramid_attention_broadcast,
                 hooks.TaylorSeerCacheConfig: hooks.apply_taylorseer_cache}[type(config)]
        apply(transformer, config)
        self.inner = transformer

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def cache_context(self, name: str):
        from diffusers.models.cache_utils import CacheMixin
        return CacheMixin.cache_context(self.inner, name)


def diffusers_configs(m: TrainedModel) -> list[tuple[str, Callable]]:
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    def hooked(config_fn):
        def make():
            t = m.load_transformer()
            if not hasattr(t, "enable_cache"):
                return DiffusersCached(t, config_fn())
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


def cache_dit_configs(m: TrainedModel) -> list[tuple[str, Callable]]:
    import cache_dit
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    def enabled(**kw):
        calibrator = kw.pop("taylorseer", None)

        def make():
            t = m.load_transformer()
            cache_dit.enable_cache(_cache_dit_target(t), cache_config=DBCacheConfig(num_inference_steps=STEPS, **kw),
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


def _cache_dit_target(t: torch.nn.Module):
    """cache-dit finds its adapter by the pipeline's name; SD3's ("StableDiffusion3") does not
    match its transformer's class name, so give the same BlockAdapter that adapter builds."""
    if type(t).__name__ != "SD3Transformer2DModel":
        return t
    from cache_dit import BlockAdapter, ForwardPattern
    return BlockAdapter(transformer=t, blocks=t.transformer_blocks, forward_pattern=ForwardPattern.Pattern_1,
                        check_forward_pattern=True)


def run(m: TrainedModel, make: Callable, encoder, labels, repeats: int, seed: int):
    times, result, model = [], None, None
    for _ in range(repeats):
        model = make()
        result = generate(m, model, encoder, labels, steps=STEPS, seed=seed, on_step=Clock())
        times.append(result.transformer_seconds)
    if not hasattr(model, "reset"):  # a peer's cache state is cleared by building it afresh
        model = make()
    flops = generation_flops(model, encoder, labels, STEPS, seed, on_step=Clock(), trained=m)
    return result, statistics.median(times), flops


def compare_model(m: TrainedModel, per_class: int, repeats: int, seed: int, only: str | None = None) -> dict:
    """Every configuration on one model (or those whose name contains `only`), eager first and last."""
    labels = torch.arange(m.classes).repeat_interleave(per_class)
    encoder, classifier = m.load_encoder(), m.load_classifier()
    generate(m, m.load_transformer(), encoder, labels[:2], steps=2, seed=seed)  # warm-up
    ref, eager_first, eager_flops = run(m, m.load_transformer, encoder, labels, repeats, seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        suites = [("dacc", lambda: dacc_configs(m, Path(tmp))), ("diffusers", lambda: diffusers_configs(m)),
                  ("cache-dit", lambda: cache_dit_configs(m))]
        for library, configs in suites:
            try:
                entries = configs()
            except ImportError as exc:
                rows.append({"library": library, "name": "(all)", "skipped": f"not installed: {exc}"})
                print(f"{library}: skipped ({exc})", file=sys.stderr)
                continue
            for name, make in entries:
                if only and only not in name:
                    continue
                start = time.perf_counter()
                try:
                    out, seconds, flops = run(m, make, encoder, labels, repeats, seed)
                except Exception as exc:  # a peer that cannot run this model is reported, not fatal
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    rows.append({"library": library, "name": name, "skipped": reason})
                    print(f"{m.name:8s} {library:9s} {name:42s} skipped: {reason}", file=sys.stderr)
                    traceback.print_exc(limit=2, file=sys.stderr)
                    continue
                row = {"library": library, "name": name, "seconds": seconds, "flops": flops,
                       "psnr": psnr(out.images, ref.images), "ssim": ssim(out.images, ref.images),
                       "accuracy": conditional_accuracy(out.images, labels, classifier),
                       "bench_seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"{m.name:8s} {library:9s} {name:42s} {seconds:6.2f}s PSNR {row['psnr']:6.2f} "
                      f"acc {row['accuracy']:.3f}", file=sys.stderr)
    _, eager_last, _ = run(m, m.load_transformer, encoder, labels, repeats, seed)
    eager_s = (eager_first + eager_last) / 2
    for r in rows:
        if "seconds" in r:
            r["speedup"] = eager_s / r["seconds"]
            r["flops_speedup"] = eager_flops / r["flops"]
            r["eager_seconds"] = eager_s  # the baseline of this row's run (rows of an --only run have their own)
    return {"samples": len(labels), "steps": STEPS, "repeats": repeats,
            "eager": {"seconds_first": eager_first, "seconds_last": eager_last, "flops": eager_flops,
                      "accuracy": conditional_accuracy(ref.images, labels, classifier)},
            "configs": rows, "summary": summarize(rows)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,glyphs,patterns")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    # a seed no calibration or validation used: quality is judged where the compile never looked
    p.add_argument("--seed", type=int, default=HELD_OUT_SEEDS[0])
    p.add_argument("--only", help="substring: rerun only the configurations whose name contains it (eager "
                                  "first and last as always); the model's other rows are kept from the last run")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    previous = RESULTS / "compare.json"
    report = json.loads(previous.read_text()) if previous.exists() else {}
    if "models" not in report:  # results from before the per-model layout are not comparable: start afresh
        report = {"models": {}}
    report.update({"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "versions": _versions()})
    for name in args.models.split(","):
        fresh = {**compare_model(trained_models()[name], args.per_class, args.repeats, args.seed, args.only),
                 "versions": _versions()}
        earlier = report["models"].get(name)
        report["models"][name] = merge_rerun(earlier, fresh, args.only) if args.only and earlier else fresh
        write_results("compare", finite(report), markdown(report))  # after every model: a long run keeps its part
        pareto_plot(report, RESULTS / "compare.png")
    return 0


def merge_rerun(earlier: dict, fresh: dict, only: str) -> dict:
    """A model's section after rerunning the configurations matching `only`: the new rows replace
    their namesakes, the section's eager stays the full run's, and the rerun's eager is recorded."""
    names = {c["name"] for c in fresh["configs"]}
    rows = [c for c in earlier["configs"] if c["name"] not in names] + fresh["configs"]
    return {**earlier, "configs": rows, "summary": summarize(rows),
            "rerun": {**earlier.get("rerun", {}), only: fresh["eager"]}}


LIBRARIES = ("dacc", "diffusers", "cache-dit")


def summarize(rows: list[dict], target: float = 30.0) -> dict:
    """Per library, the fastest configuration (wall) at PSNR >= target."""
    best = {}
    for r in rows:
        psnr = r.get("psnr")
        if "speedup" in r and (psnr is None or psnr >= target):  # None: identical (inf, as JSON keeps it)
            if r["library"] not in best or r["speedup"] > best[r["library"]]["speedup"]:
                best[r["library"]] = {"name": r["name"], "speedup": r["speedup"],
                                      "psnr": psnr if psnr is not None else float("inf"),
                                      "flops_speedup": r["flops_speedup"]}
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
    lines = [f"Per trained model: 50 steps, batched CFG, {report['threads']} CPU threads; speedups against eager "
             "measured in the same run (mean of eager first and last); PSNR against eager from the same noise. "
             f"Versions: {report['versions']}.", "", "## Summary: fastest at PSNR >= 30 dB", "",
             "| model | " + " | ".join(LIBRARIES) + " |", "|---|" + "---|" * len(LIBRARIES)]
    for name, r in report["models"].items():
        best = r["summary"]["best"]
        cells = [f"{best[lib]['speedup']:.2f}x wall, {best[lib]['flops_speedup']:.2f}x FLOPs ({best[lib]['name']}, "
                 f"{best[lib]['psnr']:.1f} dB)" if lib in best else "none at >= 30 dB" for lib in LIBRARIES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in report["models"].items():
        e = r["eager"]
        lines += ["", f"## {name}", "",
                  f"{r['samples']} samples, median of {r['repeats']}; eager {e['seconds_first']:.2f} s (first) / "
                  f"{e['seconds_last']:.2f} s (last), conditional accuracy {100 * e['accuracy']:.1f}%."
                  + "".join(f" Rows matching '{k}' were rerun later against their own eager ({v['seconds_first']:.2f} s"
                            f" / {v['seconds_last']:.2f} s)." for k, v in r.get("rerun", {}).items()), "",
                  "| library | configuration | speedup (wall) | speedup (FLOPs) | PSNR dB | SSIM | cond. acc |",
                  "|---|---|---|---|---|---|---|"]
        ran = [c for c in r["configs"] if "speedup" in c]
        for c in sorted(ran, key=lambda c: -c["speedup"]):
            value = c["psnr"] if c["psnr"] is not None else float("inf")
            lines.append(f"| {c['library']} | {c['name']} | {c['speedup']:.2f}x | {c['flops_speedup']:.2f}x | "
                         f"{value:.2f} | {c['ssim']:.4f} | {100 * c['accuracy']:.1f}% |")
        for c in r["configs"]:
            if "skipped" in c:
                lines.append(f"| {c['library']} | {c['name']} | skipped: {c['skipped']} | | | | |")
    return "\n".join(lines) + "\n"


def pareto_plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = report["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], models.items()):
        for library, marker in zip(LIBRARIES, "os^"):
            pts = [(c["psnr"] if c["psnr"] not in (None, float("inf")) else 60.0, c["speedup"])
                   for c in r["configs"] if c["library"] == library and "speedup" in c]
            if pts:
                ax.scatter([p for p, _ in pts], [s for _, s in pts], marker=marker, label=library, s=36)
        ax.axvline(r["summary"]["target_psnr"], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("PSNR against uncached output (dB; identical plotted at 60)")
        ax.set_ylabel("transformer speedup vs eager (wall)")
        ax.set_title(f"{name}, {r['steps']} steps: speed vs quality")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
