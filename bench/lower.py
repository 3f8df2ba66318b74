"""Lowering: AOTInductor packages against the unlowered segments, end to end.

On the demo model (CPU, or CUDA when available and --device cuda): whole generations of eager,
the unlowered and lowered empty plan, and the unlowered and lowered recommended cache plan
(dacc/models/demo/plan.yaml), generations interleaved in a rotating order so drift hits every
variant alike; the median over rounds is reported with each ratio, measured in the same run.
Also: compile time (one build per distinct segment structure, from the manifest), the time from
`dacc.load` to the first finished step, and matmul FLOPs per generation (FlopCounterMode).

    python bench/lower.py [--rounds 5] [--steps 50] [--samples 2] [--device cpu|cuda]

Writes bench/results/lower.json. Targets (CPU): lowered empty plan >= 1.1x the unlowered one;
lowered cache plan >= the unlowered cache plan.
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
import yaml

import dacc
from common import RESULTS, generation_flops
from dacc.compiler.compile import compile_model
from dacc.demo import DEMO_MODEL
from dacc.models.demo import load_encoder, load_transformer
from dacc.models.demo.sampler import generate

RECOMMENDED = yaml.safe_load((Path(DEMO_MODEL).parent / "plan.yaml").read_text())["cache"]


def _compile(root: Path, name: str, cache: dict, steps: int, device: str | None) -> tuple[Path, float, dict]:
    plan = root / f"{name}.yaml"
    data = {"num_inference_steps": steps, "cache": cache}
    if device:
        data["lower"] = {"backend": "inductor", "device": device}
    plan.write_text(yaml.safe_dump(data))
    start = time.perf_counter()
    manifest = compile_model(DEMO_MODEL, plan, root / f"{name}.dacc", force=True, log=lambda m: None)
    seconds = time.perf_counter() - start
    low = manifest.lowering
    info = {} if low is None else {
        "packages": len(low.packages), "segments_lowered": sum(len(p.segments) for p in low.packages),
        "build_seconds": round(sum(p.build_seconds for p in low.packages), 1), "unlowered": low.unlowered}
    return root / f"{name}.dacc", seconds, info


def _first_step(path: Path, device: str) -> dict:
    """In a fresh process: seconds from `dacc.load` to the end of the first step, and of a second."""
    code = f"""
import time, torch, json, dacc
from dacc.models.demo import DEMO
from dacc.models.flow import cfg_inputs
t0 = time.perf_counter()
m = dacc.load({str(path)!r}, allow_native_code=True).to({device!r})
t1 = time.perf_counter()
kw = {{k: v.to({device!r}) if isinstance(v, torch.Tensor) else v for k, v in cfg_inputs(DEMO, torch.arange(10), 0.5, 0).items()}}
with torch.no_grad():
    m(**kw)
    torch.cuda.synchronize() if {device!r} == "cuda" else None
    t2 = time.perf_counter()
    m(**kw)
    torch.cuda.synchronize() if {device!r} == "cuda" else None
    t3 = time.perf_counter()
print(json.dumps({{"load_s": t1 - t0, "first_step_s": t2 - t1, "second_step_s": t3 - t2}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return {k: round(v, 4) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=2, help="images per class (batch = 2 x 10 x samples)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = args.device
    root = Path(tempfile.mkdtemp(prefix="dacc-bench-lower-"))
    compiled, info = {}, {}
    for name, cache, lowered in [("empty", {"strategy": "none"}, False), ("empty lowered", {"strategy": "none"}, True),
                                 ("cache", RECOMMENDED, False), ("cache lowered", RECOMMENDED, True)]:
        path, seconds, lowering = _compile(root, name.replace(" ", "_"), cache, args.steps, device if lowered else None)
        compiled[name] = path
        info[name] = {"compile_s": round(seconds, 1), **lowering}
        print(f"compiled {name}: {seconds:.1f} s {lowering}", flush=True)
    models = {"eager": load_transformer().to(device)}
    for name, path in compiled.items():
        models[name] = dacc.load(path, allow_native_code=True).to(device)
    encoder = load_encoder().to(device)
    labels = torch.arange(10, device=device).repeat(args.samples)

    def run(model) -> None:
        if hasattr(model, "reset"):
            model.reset()
        with torch.no_grad():
            generate(model, encoder, labels, steps=args.steps, seed=0)
        if device == "cuda":
            torch.cuda.synchronize()

    for model in models.values():  # warm-up
        run(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, model in order:
            start = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    # FlopCounterMode sees aten calls only: a package is opaque to it (it would count 0). A lowered
    # variant runs the same graph as its unlowered one, so it is reported with that one's count.
    flops = {name: generation_flops(model, encoder, labels, args.steps, seed=0)
             for name, model in models.items() if not name.endswith("lowered")}
    flops.update({name: flops[name.removesuffix(" lowered")] for name in models if name.endswith("lowered")})
    result = {
        "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
        "batch": 2 * len(labels), "rounds": args.rounds,
        "seconds_per_generation": {n: round(v, 4) for n, v in median.items()},
        "all_seconds": {n: [round(x, 4) for x in v] for n, v in times.items()},
        "matmul_flops_per_generation": flops,
        "flops_note": "lowered variants: the count of the same graph unlowered (packages are opaque to FlopCounterMode)",
        "ratios": {"lowered empty vs unlowered empty": round(median["empty"] / median["empty lowered"], 3),
                   "lowered empty vs eager": round(median["eager"] / median["empty lowered"], 3),
                   "unlowered empty vs eager": round(median["eager"] / median["empty"], 3),
                   "lowered cache vs unlowered cache": round(median["cache"] / median["cache lowered"], 3),
                   "lowered cache vs eager": round(median["eager"] / median["cache lowered"], 3)},
        "compile": info,
        "load_to_first_step": {n: _first_step(compiled[n], device) for n in ("empty", "empty lowered")},
        "targets": {"lowered empty >= 1.1x unlowered empty": median["empty"] / median["empty lowered"] >= 1.1,
                    "lowered cache >= unlowered cache": median["cache"] / median["cache lowered"] >= 1.0},
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("lower.json" if device == "cpu" else f"lower_{device}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratios"], indent=1))
    print(json.dumps(result["load_to_first_step"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
