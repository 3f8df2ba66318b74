"""The sweep that chose ratio_map.ERROR_PER_RATIO: on one trained model (glyphs), for one strategy,
the held-out PSNR and FLOPs that each replayed-error budget buys.

    python bench/ratio_tuning.py glyphs dbcache '{}' 0.02,0.04,0.08,0.16,0.32
    python bench/ratio_tuning.py glyphs taylorseer '{"options": {"order": 2}}'

Prints one JSON line per budget; bench/results/ratio_tuning_glyphs.jsonl holds the lines that set
the constant (seeds 6 and 7, which calibration never runs).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

import dacc
from common import compile_trained
from dacc.compiler.calibrate import _recorded, measure_schedules
from dacc.compiler.magcache import magnitude_ratios
from dacc.compiler.ratio_map import RatioMap, trajectories, with_knobs
from dacc.compiler.search_seeds import CALIBRATION_SEEDS, seed_psnr
from dacc.models.flow import sample
from dacc.models.train import trained_models

STEPS = 50
SEEDS = (6, 7)


def main(argv: list[str]) -> int:
    name, strategy = argv[0], argv[1]
    extra = json.loads(argv[2]) if len(argv) > 2 else {}
    budgets = [float(x) for x in argv[3].split(",")] if len(argv) > 3 else [0.02, 0.04, 0.08, 0.16, 0.32]
    torch.set_num_threads(2)
    m = trained_models()[name]
    with tempfile.TemporaryDirectory() as tmp:
        model = dacc.load(compile_trained({"strategy": strategy, "cache_ratio": 0.5, **extra}, Path(tmp) / "a.dacc",
                                          STEPS, m))
    ts = trajectories(_recorded(model, lambda mo, s: sample(m, mo, s), list(CALIBRATION_SEEDS)), STEPS)
    gate = model.programs[0].spec.gates[0]
    schedules = measure_schedules([ts], [1.0], gate, STEPS, lambda msg: None)[0] if strategy == "schedule" else None
    curve = magnitude_ratios([t.residuals for t in ts]) if strategy == "magcache" else None
    ratio_map = RatioMap(gate, ts, [], schedules, curve)
    eager = m.load_transformer()
    refs = {s: sample(m, eager, s, STEPS) for s in SEEDS}
    for budget in budgets:
        knobs = ratio_map._knobs(budget)
        error, skipped = ratio_map.error(knobs)
        model.programs[0].spec.gates = [with_knobs(knobs)(gate, 0)]
        model.reset()
        psnrs = [seed_psnr(sample(m, model, s), refs[s]) for s in SEEDS]
        stats = model.stats()
        print(json.dumps({"model": name, "strategy": strategy, "budget": budget, "error": round(error, 4),
                          "skipped": round(skipped, 3), "psnr": round(sum(psnrs) / len(psnrs), 2),
                          "flops": round(stats["flops_total"] / stats["flops_computed"], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
