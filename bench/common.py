"""Shared by the benchmarks."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from torch.utils.flop_counter import FlopCounterMode

from dacc.compiler.compile import compile_model
from dacc.compiler.search_seeds import HELD_OUT_SEEDS, seed_psnr
from dacc.models import flow
from dacc.models.demo import DEMO

RESULTS = Path(__file__).parent / "results"


def finite(value):
    """JSON has no Infinity: identical outputs (PSNR = inf) are written as null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return None
    return value


def write_results(stem: str, report: dict, markdown: str) -> None:
    """bench/results/<stem>.json (infinities as null) and <stem>.md, and the table on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(finite(report), indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    print(markdown)


def interleaved_rounds(models: dict, run, rounds: int) -> dict[str, list[float]]:
    """Seconds of `run(model)` per model and round, the order rotating each round so that drift
    within the run hits every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        order = list(models.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, model in order:
            start = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    return times


def compile_trained(cache: dict | None, path: Path, steps: int, trained: flow.TrainedModel = DEMO) -> Path:
    """Compile a trained model (the demo's by default) with `cache` as the plan's cache section
    (None: the empty plan)."""
    plan = path.with_suffix(".yaml")
    plan.write_text(yaml.safe_dump({"num_inference_steps": steps, "cache": cache or {"strategy": "none"}}))
    compile_model(trained.here / "model.py", plan, path, force=True, log=lambda m: None)
    return path


def held_out_references(m: flow.TrainedModel, steps: int) -> dict:
    """The uncached model's generation from each held-out seed (what quality is measured against)."""
    eager = m.load_transformer()
    return {s: flow.sample(m, eager, s, steps) for s in HELD_OUT_SEEDS}


def held_out_quality(m: flow.TrainedModel, model, references: dict) -> tuple[list[float], float]:
    """(PSNR per held-out seed against `references`, matmul FLOPs speedup over those generations)
    of a loaded artifact, from a fresh cache state."""
    model.reset()
    psnrs = [seed_psnr(flow.sample(m, model, s), ref) for s, ref in references.items()]
    stats = model.stats()
    return psnrs, stats["flops_total"] / max(stats["flops_computed"], 1.0)


def generation_flops(model, encoder, labels, steps: int, seed: int, on_step=None,
                     trained: flow.TrainedModel = DEMO) -> float:
    """Matmul FLOPs of one generation (deterministic), from a fresh cache state."""
    if hasattr(model, "reset"):
        model.reset()
    with FlopCounterMode(display=False) as counter:
        flow.generate(trained, model, encoder, labels, steps=steps, seed=seed, on_step=on_step)
    return float(counter.get_total_flops())
