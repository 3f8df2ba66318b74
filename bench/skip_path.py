"""What a skipped step costs: the demo model under one static step mask (four computed steps,
then one computed step in four), with skipped steps reusing the last residual or forecasting it
(Taylor order 1 and 2). Reported per variant: the median wall time of a computed and of a skipped
call, aten ops dispatched per skipped call (deterministic: the skip path's launches), and matmul
FLOPs per generation (FlopCounterMode; the same for every variant: the skip path has no matmul).

Calls are interleaved step by step, the order rotating every step; `rounds` generations each.

    python bench/skip_path.py [--rounds 5]

Writes bench/results/skip_path.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import dacc
from common import RESULTS, compile_trained
from dacc.models.demo import DEMO
from dacc.models.flow import cfg_inputs
from overhead import _CountOps

VARIANTS = {"reuse": 0, "forecast, order 1": 1, "forecast, order 2": 2}  # name: taylorseer_order


def _mask(steps: int) -> list[bool]:
    return [i < 4 or i % 4 == 0 or i == steps - 1 for i in range(steps)]


def run(steps: int, rounds: int) -> dict:
    torch.set_num_threads(2)
    mask = _mask(steps)
    calls = [cfg_inputs(DEMO, torch.arange(10).repeat_interleave(2), float(s), seed=0)
             for s in torch.linspace(1.0, 0.02, steps)]
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: dacc.load(compile_trained({"strategy": "scm", "options": {"mask": mask, "taylorseer_order": k}},
                                                  Path(tmp) / f"{k}.dacc", steps))
                  for name, k in VARIANTS.items()}
    times = {name: {"computed": [], "skipped": []} for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up: one generation
            model.reset()
            for kw in calls:
                model(**kw, return_dict=False)
        for _ in range(rounds):
            for model in models.values():
                model.reset()
            for i, kw in enumerate(calls):
                order = list(models.items())
                for name, model in order[i % len(order):] + order[:i % len(order)]:
                    start = time.perf_counter()
                    model(**kw, return_dict=False)
                    times[name]["computed" if mask[i] else "skipped"].append(time.perf_counter() - start)
        out = {}
        for name, model in models.items():
            model.reset()
            ops, flops = [], FlopCounterMode(display=False)
            with flops:
                for i, kw in enumerate(calls):
                    with _CountOps() as counter:
                        model(**kw, return_dict=False)
                    if not mask[i]:
                        ops.append(counter.count)
            decisions = {d for ds in model.stats()["decisions"].values() for d in ds}
            want = {"computed", "reused" if VARIANTS[name] == 0 else "forecast"}
            if decisions != want:
                raise SystemExit(f"{name}: decisions {sorted(decisions)}, expected {sorted(want)}")
            out[name] = {"computed_call_ms": 1e3 * statistics.median(times[name]["computed"]),
                         "skipped_call_ms": 1e3 * statistics.median(times[name]["skipped"]),
                         "aten_ops_per_skipped_call": statistics.median(ops),
                         "matmul_gflops_per_generation": flops.get_total_flops() / 1e9}
    return {"steps": steps, "rounds": rounds, "batch": 40, "computed_steps": sum(mask), "variants": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=str(RESULTS / "skip_path.json"))
    args = p.parse_args(argv)
    report = run(args.steps, args.rounds)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for name, r in report["variants"].items():
        print(f"{name:18s} computed {r['computed_call_ms']:7.2f} ms  skipped {r['skipped_call_ms']:6.2f} ms  "
              f"{r['aten_ops_per_skipped_call']:.0f} aten ops/skipped call  {r['matmul_gflops_per_generation']:.1f} GFLOP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
