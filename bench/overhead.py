"""Runtime overhead of dacc when nothing is skipped: eager vs the empty plan vs a cache gate that
never fires. The three are interleaved call by call (step i of each, in an order that rotates
every step, then step i + 1, ...), so machine drift and cache effects hit all three alike; each gets `rounds`
generations of `steps` calls and the median call time is compared.

    python bench/overhead.py [--rounds 4]

Writes bench/results/overhead.json (target: empty plan no slower than eager; a gate that never
fires at most 2% over eager).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tempfile
from pathlib import Path

import torch

import dacc
from common import RESULTS, compile_demo
from dacc.models.demo import load_transformer
from dacc.models.demo.model import _call



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"eager": load_transformer()}
        for name, cache in (("empty plan", {"strategy": "none"}),
                            ("gate never fires", {"strategy": "dbcache", "cache_ratio": 0.0})):
            models[name] = dacc.load(compile_demo(cache, Path(tmp) / f"{len(models)}.dacc", args.steps))
        times = {name: [] for name in models}
        calls = [_call(labels, float(sigma), seed=0) for sigma in torch.linspace(1.0, 0.02, args.steps)]
        with torch.no_grad():
            for model in models.values():  # warm-up
                model(**calls[0], return_dict=False)
            for _ in range(args.rounds):
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
        skipped = models["gate never fires"].stats()["segments_reused"]
    medians = {k: statistics.median(v) for k, v in times.items()}
    report = {"rounds": args.rounds, "steps": args.steps, "batch": 2 * len(labels), "median_call_seconds": medians,
              "ratio_to_eager": {k: v / medians["eager"] for k, v in medians.items()}, "all_seconds": times,
              "segments_skipped_by_the_gate": skipped}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    for k, v in report["ratio_to_eager"].items():
        print(f"{k:18s} {1e3 * medians[k]:.2f} ms per call  {v:.3f}x eager time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
