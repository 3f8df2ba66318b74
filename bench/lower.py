"""Lowering: AOTInductor packages against the unlowered segments, end to end.

On the demo model (CPU, or CUDA when available and --device cuda): whole generations of eager,
the unlowered and lowered empty plan, and the unlowered and lowered recommended cache plan
(dacc/models/demo/plan.yaml), generations interleaved in a rotating order so drift hits every
variant alike; the median over rounds is reported with each ratio, measured in the same run.
Also: compile time (one build per distinct segment structure, from the manifest), the time from
`dacc.load` to the first finished step, and matmul FLOPs per generation (FlopCounterMode).

On CUDA the demo model is launch-bound (8 blocks, batch 40), and the run adds: eager under
`torch.compile` (default and mode="reduce-overhead", its CUDA graphs), the lowered plans with
`cuda_graphs=True` (dacc/runtime/graph_step.py), a lowered gate that never fires (dbcache at
cache_ratio 0: its probe every step, no skip) with graphs, and `torch.compile`'s own first call
in a fresh process beside dacc's load-to-first-step.

    python bench/lower.py [--rounds 5] [--steps 50] [--samples 2] [--device cpu|cuda] [--out FILE]

Writes bench/results/lower.json (lower_cuda.json on CUDA). Targets, CPU: lowered empty plan >= 1.1x
the unlowered one; lowered cache plan >= the unlowered cache plan. CUDA: lowered empty plan with
graphs >= 0.9x torch.compile reduce-overhead, the cache plan with graphs faster still, the
never-firing gate <= 2% over the lowered empty plan (both with graphs), load to first step <= 10%
of torch.compile's first call.
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
from common import RESULTS, generation_flops, interleaved_rounds
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


_FIRST_STEP = """
import time, torch, json, dacc
from dacc.models.demo import DEMO, load_transformer
from dacc.models.flow import cfg_inputs
device, path, how = {device!r}, {path!r}, {how!r}
t0 = time.perf_counter()
if how == "torch.compile":
    m = torch.compile(load_transformer().to(device), mode="reduce-overhead")
else:
    m = dacc.load(path, allow_native_code=True, cuda_graphs=how == "graphs").to(device)
t1 = time.perf_counter()
kw = {{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cfg_inputs(DEMO, torch.arange(10), 0.5, 0).items()}}
times = []
with torch.no_grad():
    for _ in range(3):
        m(**kw)
        torch.cuda.synchronize() if device == "cuda" else None
        times.append(time.perf_counter())
print(json.dumps({{"load_s": t1 - t0, "first_step_s": times[0] - t1, "second_step_s": times[1] - times[0],
                  "third_step_s": times[2] - times[1]}}))
"""


def _first_step(path: Path | None, device: str, how: str = "plain") -> dict:
    """In a fresh process: seconds from `dacc.load` (or building the eager model under
    torch.compile, `how="torch.compile"`) to the end of the first step, and of the next two."""
    code = _FIRST_STEP.format(device=device, path=str(path), how=how)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return {k: round(v, 4) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


# (name, cache section, lowered, CUDA graphs); a name's FLOPs are its unlowered, graph-free base's
VARIANTS = [("empty", {"strategy": "none"}, False, False), ("empty lowered", {"strategy": "none"}, True, False),
            ("cache", RECOMMENDED, False, False), ("cache lowered", RECOMMENDED, True, False)]
CUDA_VARIANTS = [("empty lowered graphs", {"strategy": "none"}, True, True),
                 ("cache lowered graphs", RECOMMENDED, True, True),
                 ("never lowered graphs", {"strategy": "dbcache", "cache_ratio": 0.0}, True, True)]


def _base(name: str) -> str:
    return name.removesuffix(" graphs").removesuffix(" lowered")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=2, help="images per class (batch = 2 x 10 x samples)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="where to write the JSON (default: bench/results/lower[_cuda].json)")
    args = ap.parse_args()
    device = args.device
    root = Path(tempfile.mkdtemp(prefix="dacc-bench-lower-"))
    variants = VARIANTS + (CUDA_VARIANTS if device == "cuda" else [])
    compiled, info = {}, {}
    for name, cache, lowered, _ in variants:
        stem = f"{_base(name)}{'_lowered' if lowered else ''}"
        if stem not in {p.stem for p in compiled.values()}:
            path, seconds, lowering = _compile(root, stem, cache, args.steps, device if lowered else None)
            info[name] = {"compile_s": round(seconds, 1), **lowering}
            print(f"compiled {name}: {seconds:.1f} s {lowering}", flush=True)
        compiled[name] = root / f"{stem}.dacc"
    models = {"eager": load_transformer().to(device)}
    if device == "cuda":  # the baselines a GPU user has today
        models["eager torch.compile"] = torch.compile(load_transformer().to(device))
        models["eager reduce-overhead"] = torch.compile(load_transformer().to(device), mode="reduce-overhead")
    for name, _, _, graphs in variants:
        models[name] = dacc.load(compiled[name], allow_native_code=True, cuda_graphs=graphs).to(device)
    encoder = load_encoder()
    labels = torch.arange(10).repeat(args.samples)
    on = None if device == "cpu" else device

    def run(model) -> None:
        if hasattr(model, "reset"):
            model.reset()
        with torch.no_grad():
            generate(model, encoder, labels, steps=args.steps, seed=0, device=on)
        if device == "cuda":
            torch.cuda.synchronize()

    for model in models.values():  # warm-up (torch.compile's JIT, graph captures)
        run(model)
    times = interleaved_rounds(models, run, args.rounds)
    median = {name: statistics.median(t) for name, t in times.items()}
    # FlopCounterMode sees aten calls only: a package or a graph replay is opaque to it (it would
    # count 0). A lowered or replayed variant runs its base's graph, so it gets that one's count.
    bases = {n: m for n, m in models.items() if n in ("eager", "empty", "cache")}
    flops = {n: generation_flops(m.cpu() if device == "cuda" else m, encoder, labels, args.steps, seed=0)
             for n, m in bases.items()}
    flops.update({n: flops.get(_base(n), flops["eager"]) for n in models if n not in flops})

    def ratio(a: str, b: str) -> float:
        return round(median[a] / median[b], 3)
    ratios = {"lowered empty vs unlowered empty": ratio("empty", "empty lowered"),
              "lowered empty vs eager": ratio("eager", "empty lowered"),
              "unlowered empty vs eager": ratio("eager", "empty"),
              "lowered cache vs unlowered cache": ratio("cache", "cache lowered"),
              "lowered cache vs eager": ratio("eager", "cache lowered")}
    targets = {"lowered empty >= 1.1x unlowered empty": median["empty"] / median["empty lowered"] >= 1.1,
               "lowered cache >= unlowered cache": median["cache"] / median["cache lowered"] >= 1.0}
    first = {n: _first_step(compiled[n], device) for n in ("empty", "empty lowered")}
    if device == "cuda":
        ratios.update({
            "eager torch.compile vs eager": ratio("eager", "eager torch.compile"),
            "eager reduce-overhead vs eager": ratio("eager", "eager reduce-overhead"),
            "lowered empty graphs vs reduce-overhead": ratio("eager reduce-overhead", "empty lowered graphs"),
            "lowered cache graphs vs reduce-overhead": ratio("eager reduce-overhead", "cache lowered graphs"),
            "never-firing gate graphs over lowered empty graphs": ratio("never lowered graphs", "empty lowered graphs")})
        first["empty lowered graphs"] = _first_step(compiled["empty lowered graphs"], device, "graphs")
        first["torch.compile reduce-overhead"] = _first_step(None, device, "torch.compile")
        to_first = {n: first[n]["load_s"] + first[n]["first_step_s"] for n in first}
        targets.update({
            "lowered empty graphs >= 0.9x reduce-overhead": ratios["lowered empty graphs vs reduce-overhead"] >= 0.9,
            "cache graphs faster than empty graphs": median["cache lowered graphs"] < median["empty lowered graphs"],
            "never-firing gate <= 2% over empty (graphs)":
                ratios["never-firing gate graphs over lowered empty graphs"] <= 1.02,
            "load to first step <= 10% of torch.compile's first call":
                to_first["empty lowered graphs"] <= 0.1 * to_first["torch.compile reduce-overhead"]})
    result = {
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
        "batch": 2 * len(labels), "rounds": args.rounds,
        "seconds_per_generation": {n: round(v, 4) for n, v in median.items()},
        "all_seconds": {n: [round(x, 4) for x in v] for n, v in times.items()},
        "matmul_flops_per_generation": flops,
        "flops_note": "lowered and replayed variants: the count of the same graph unlowered (packages and graph "
                      "replays are opaque to FlopCounterMode); torch.compile variants: eager's",
        "ratios": ratios, "compile": info, "load_to_first_step": first, "targets": targets,
    }
    out = args.out or RESULTS / ("lower.json" if device == "cpu" else f"lower_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratios"], indent=1))
    print(json.dumps(result["load_to_first_step"], indent=1))
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
