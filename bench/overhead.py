"""Runtime overhead of dacc when nothing is skipped: eager vs the empty plan vs a cache gate that
never fires (dbcache, cache_ratio 0: its probe runs every step, its threshold is never met) vs a
static schedule that computes every step (scm with an all-true mask: the schedule's runtime path,
no probe).

Calls are interleaved step by step (step i of each model, in an order that rotates every step,
then step i + 1, ...), so drift hits all three alike; each model gets `rounds` generations of
`steps` calls. Reported per workload: the median over steps of the paired ratio (model time /
eager time at the same step), its interquartile range, and the aten ops dispatched per call
(deterministic: what the runtime adds, free of timing noise).

glibc's allocator hands large freed blocks back to the kernel and faults them in again, and how
often depends on when each intermediate is freed, which differs between a module and its graph
by a few percent either way. So the workloads run twice: with glibc's defaults, and again in a
child process with a steady heap (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised, as a
jemalloc or tcmalloc deployment would behave), where only the work itself differs.

    python bench/overhead.py [--rounds 6]

Writes bench/results/overhead.json. Target: a gate that never fires and an all-compute schedule at
most 2% over the empty plan.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dacc
from common import RESULTS, compile_trained
from dacc.models.demo import DEMO, load_transformer
from dacc.models.flow import cfg_inputs

STEADY_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 31), "MALLOC_TRIM_THRESHOLD_": str(2 ** 31)}
WORKLOADS = {"batch 40 (20 samples, CFG)": 2, "batch 2 (1 sample, CFG)": 0}  # name: samples per class (0: one sample)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def measure(models: dict, labels: torch.Tensor, steps: int, rounds: int) -> dict:
    calls = [cfg_inputs(DEMO, labels, float(sigma), seed=0) for sigma in torch.linspace(1.0, 0.02, steps)]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            model(**calls[0], return_dict=False)
        for _ in range(rounds):
            for model in models.values():
                if hasattr(model, "reset"):
                    model.reset()
            for i, kw in enumerate(calls):
                order = list(models.items())
                order = order[i % len(order):] + order[:i % len(order)]  # every model takes every slot
                for name, model in order:
                    start = time.perf_counter()
                    model(**kw, return_dict=False)
                    times[name].append(time.perf_counter() - start)
        dispatches = {}
        for name, model in models.items():  # a whole generation: the gate's first step has nothing to compare
            if hasattr(model, "reset"):
                model.reset()
            with _CountOps() as counter:
                for kw in calls:
                    model(**kw, return_dict=False)
            dispatches[name] = counter.count / len(calls)
    ratios = {name: [t / e for t, e in zip(times[name], times["eager"])] for name in models}
    return {"batch": int(2 * len(labels)), "median_call_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "paired_ratio_to_eager": {k: statistics.median(v) for k, v in ratios.items()},
            "paired_ratio_iqr": {k: _quartiles(v) for k, v in ratios.items()},
            "over_empty_plan": {name: statistics.median([g / e for g, e in zip(times[name], times["empty plan"])])
                                for name in models if name not in ("eager", "empty plan")},
            "aten_ops_per_call": dispatches}


def run_all(steps: int, rounds: int) -> dict:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"eager": load_transformer()}
        for name, cache in (("empty plan", {"strategy": "none"}),
                            ("gate never fires", {"strategy": "dbcache", "cache_ratio": 0.0}),
                            ("schedule, all steps", {"strategy": "scm", "options": {"mask": [True] * steps}})):
            models[name] = dacc.load(compile_trained(cache, Path(tmp) / f"{len(models)}.dacc", steps))
        out = {}
        for workload, per_class in WORKLOADS.items():
            labels = torch.arange(10).repeat_interleave(per_class) if per_class else torch.tensor([3])
            out[workload] = measure(models, labels, steps, rounds)
        never_fired = all(models[n].stats()["segments_reused"] == 0 for n in ("gate never fires", "schedule, all steps"))
    if not never_fired:
        raise SystemExit("a plan meant to skip nothing skipped a segment: the benchmark is not measuring what it says")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--child-json", help=argparse.SUPPRESS)  # internal: the steady-heap run writes here
    args = p.parse_args(argv)
    if args.child_json:
        Path(args.child_json).write_text(json.dumps(run_all(args.steps, args.rounds)))
        return 0
    report = {"rounds": args.rounds, "steps": args.steps, "glibc default heap": run_all(args.steps, args.rounds)}
    with tempfile.TemporaryDirectory() as tmp:
        child = Path(tmp) / "steady.json"
        subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--steps", str(args.steps),
                        "--child-json", str(child)], check=True, env={**os.environ, **STEADY_HEAP})
        report["steady heap"] = json.loads(child.read_text())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    for heap in ("glibc default heap", "steady heap"):
        for workload, r in report[heap].items():
            print(f"{heap}, {workload}:")
            for name, ratio in r["paired_ratio_to_eager"].items():
                lo, hi = r["paired_ratio_iqr"][name]
                print(f"  {name:17s} {r['median_call_ms'][name]:8.2f} ms  {ratio:.3f}x eager (IQR {lo:.3f}-{hi:.3f})"
                      f"  {r['aten_ops_per_call'][name]:.1f} aten ops/call")
            for name, ratio in r["over_empty_plan"].items():
                print(f"  {name} / empty plan {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
