"""Predicted FLUX.1-dev step time and memory per GPU (dacc's cost model, not a run), beside
published measurements.

The model is FLUX.1-dev's widths with one block of each kind (bench/flux_dev_shape.py), traced
and partitioned by the same passes `dacc compile` runs; each block's segment stands for the 19
double and 38 single blocks FLUX.1-dev has. For every world size and device, parallel.auto's
search (dacc/compiler/choose_parallel.py) predicts every split of the ranks at 1024x1024
(4096 image + 512 text tokens, batch 1: FLUX.1-dev is guidance-distilled, no CFG batch).

One figure was used to fit the model: xDiT's single-H100 time (6.71 s for 28 steps) sets the
matmul efficiency (--calibrate prints the value it implies; dacc/cost/devices.py holds it). The
others are out-of-sample. Published times are whole generations (text encoders and VAE
included, eager unless marked); predictions are the transformer's steps only.

    python bench/predict_flux_dev.py [--calibrate]

Writes bench/results/predict_flux_dev.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS  # noqa: E402
from dacc.compiler.choose_parallel import choose_parallel, measure  # noqa: E402
from dacc.compiler.compile import partition_manifest, trace_model  # noqa: E402
from dacc.cost.devices import BUILTIN, MATMUL_EFFICIENCY  # noqa: E402
from dacc.schema.plan import parse_plan  # noqa: E402
from dacc.schema.serial import to_dict  # noqa: E402

MODEL = Path(__file__).with_name("flux_dev_shape.py")
STEPS = 28
SIZES = {("hidden_states", 1): 4096, ("encoder_hidden_states", 1): 512, ("img_ids", 0): 4096, ("txt_ids", 0): 512}
# (device, degrees, seconds per generation, what, source): all FLUX.1-dev 1024x1024
PUBLISHED = [
    ("h100-sxm", {}, 6.71 / 28, "28 steps, eager: 6.71 s (used to fit MATMUL_EFFICIENCY)", "xDiT"),
    ("h100-sxm", {"ulysses": 4}, 4.24 / 28, "28 steps, eager: 4.24 s", "xDiT"),
    ("h100-sxm", {"ulysses": 4}, 1.63 / 28, "28 steps, torch.compile: 1.63 s (1 GPU compiled: 4.30 s)", "xDiT"),
    ("h100-sxm", {}, 9.30 / 50, "50 steps: 9.30 s", "cache-dit"),
    ("h100-sxm", {"ulysses": 2}, 6.04 / 50, "50 steps: 6.04 s", "cache-dit"),
    ("l20", {}, 24.85 / 28, "28 steps: 24.85 s", "cache-dit"),
    ("l20", {"ulysses": 4}, 0.281, "281 ms/step", "diffusers context parallel"),
    ("l20", {"ring": 4}, 0.351, "351 ms/step", "diffusers context parallel"),
    ("l20", {"ulysses": 2, "ring": 2}, 0.324, "324 ms/step", "diffusers context parallel"),
]

# (device, GPUs, published speed-up over the same setup on one GPU, what, source): how far each
# tool's published multi-GPU runs scale, beside the scaling dacc predicts for its chosen split
SCALING = [
    ("h100-sxm", 2, 9.30 / 6.04, "FLUX.1-dev, Ulysses-2, 50 steps", "cache-dit"),
    ("h100-sxm", 4, 6.71 / 4.24, "FLUX.1-dev, Ulysses-4, eager", "xDiT"),
    ("h100-sxm", 4, 4.30 / 1.63, "FLUX.1-dev, Ulysses-4, torch.compile", "xDiT"),
    ("l20", 4, 6.75 / 3.48, "FLUX.1-dev, FBCache + fp8 + compile on 1 and 4 GPUs (3.48x and 6.75x over eager)",
     "ParaAttention"),
    ("h100-sxm", 8, 1904 / 337.6, "HunyuanVideo 720p, USP (another model: for scale only)", "xDiT"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrate", action="store_true", help="print the matmul efficiency xDiT's 1-GPU time implies")
    ap.add_argument("--worlds", default="1,2,4,8")
    args = ap.parse_args()
    start = time.perf_counter()
    traced = trace_model(MODEL, log=lambda m: None)
    manifests: dict[tuple, object] = {}

    def partition(plan):
        key = (plan.parallel.fsdp, plan.parallel.cfg, plan.parallel.ulysses, plan.parallel.ring)
        if key not in manifests:
            manifests[key] = partition_manifest(traced, plan)
        return manifests[key]

    prog = partition(parse_plan({})).programs[0]
    at = {s.name: SIZES[(s.input, s.dim)] for s in prog.symbols}
    runs = {s.name: {"transformer_blocks": 19, "single_transformer_blocks": 38}[s.block_list]
            for s in prog.segments if s.kind == "block"}
    if args.calibrate:  # the efficiency at which one H100's predicted step is xDiT's, by bisection
        h100, target, lo, hi = BUILTIN["h100-sxm"], 6.71 / 28, 0.05, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            rate = h100.matmul_flops / MATMUL_EFFICIENCY * mid
            seconds, _, _ = measure(partition(parse_plan({})), at, replace(h100, matmul_flops=rate), runs)
            lo, hi = (mid, hi) if seconds > target else (lo, mid)
        print(f"xDiT's {target * 1e3:.1f} ms/step on one H100 implies MATMUL_EFFICIENCY {lo:.3f} "
              f"(dacc/cost/devices.py has {MATMUL_EFFICIENCY})")
    report: dict = {"model": "FLUX.1-dev widths (bench/flux_dev_shape.py), 19 double + 38 single blocks, bf16",
                    "sizes": at, "matmul_efficiency": MATMUL_EFFICIENCY, "devices": {}, "published": []}
    for device in ("h100-sxm", "l20"):
        report["devices"][device] = {"profile": to_dict(BUILTIN[device]), "worlds": {}}
        for world in map(int, args.worlds.split(",")):
            plan = parse_plan({"num_inference_steps": STEPS,
                               "parallel": {"auto": {"world_size": world, "device": device, "at": at}}})
            chosen, choice = choose_parallel(plan, partition, lambda m: None, str(MODEL), runs)
            report["devices"][device]["worlds"][world] = to_dict(choice)
            best = next(c for c in choice.candidates if c.verdict == "chosen")
            print(f"{device} x{world}: fsdp {best.fsdp} cfg {best.cfg} ulysses {best.ulysses} ring {best.ring}: "
                  f"{best.step_seconds * 1e3:.1f} ms/step, {best.peak_bytes / 2**30:.1f} GiB/rank", flush=True)
    for device, degrees, seconds, what, source in PUBLISHED:
        plan = parse_plan({"parallel": degrees})
        predicted, peak, sent = measure(partition(plan), at, BUILTIN[device], runs)
        report["published"].append({"device": device, "parallel": degrees, "published_s_per_step": seconds,
                                    "what": what, "source": source, "predicted_s_per_step": predicted,
                                    "predicted_peak_bytes": peak, "predicted_over_published": predicted / seconds})
    report["scaling"] = []
    for device, world, published, what, source in SCALING:
        worlds = report["devices"][device]["worlds"]
        if 1 in worlds and world in worlds:
            one, many = (next(c for c in worlds[w]["candidates"] if c["verdict"] == "chosen") for w in (1, world))
            report["scaling"].append({"device": device, "gpus": world, "published_speedup": published, "what": what,
                                      "source": source, "predicted_speedup": one["step_seconds"] / many["step_seconds"]})
    report["seconds"] = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_flux_dev.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "predict_flux_dev.md").write_text(_markdown(report))
    print(_markdown(report))


def _markdown(report: dict) -> str:
    lines = ["| device | GPUs | chosen split | predicted step | predicted peak per GPU |", "|---|---|---|---|---|"]
    for device, d in report["devices"].items():
        for world, choice in d["worlds"].items():
            c = next(c for c in choice["candidates"] if c["verdict"] == "chosen")
            split = " × ".join(f"{k} {c[k]}" for k in ("fsdp", "cfg", "ulysses", "ring") if c[k] > 1) or "one GPU"
            lines.append(f"| {device} | {world} | {split} | {c['step_seconds'] * 1e3:.0f} ms | "
                         f"{c['peak_bytes'] / 2**30:.1f} GiB |")
    lines += ["", "| device | split | published (source) | published per step | dacc predicts | ratio |",
              "|---|---|---|---|---|---|"]
    for p in report["published"]:
        split = " × ".join(f"{k} {v}" for k, v in p["parallel"].items()) or "one GPU"
        lines.append(f"| {p['device']} | {split} | {p['what']} ({p['source']}) | {p['published_s_per_step'] * 1e3:.0f} ms "
                     f"| {p['predicted_s_per_step'] * 1e3:.0f} ms | {p['predicted_over_published']:.2f} |")
    lines += ["", "| device | GPUs | published run (source) | published speed-up over 1 GPU | dacc predicts |",
              "|---|---|---|---|---|"]
    for p in report.get("scaling", []):
        lines.append(f"| {p['device']} | {p['gpus']} | {p['what']} ({p['source']}) | {p['published_speedup']:.2f}× "
                     f"| {p['predicted_speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
