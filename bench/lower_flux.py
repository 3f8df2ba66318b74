"""Lowering on a FLUX.1-shaped transformer (bench/flux_shaped.py: hidden 3072, 6 double + 12
single blocks, bf16, 3.8 B random parameters) at 1024 x 1024 (4096 image + 512 text tokens),
batch 1, whole 28-step generations, on a GPU.

Variants: eager; eager under `torch.compile` (its first call, the JIT, timed apart); dacc's
empty plan lowered, with and without CUDA graphs; TaylorSeer (order 1, interval 4) unlowered,
lowered, and lowered with graphs. Generations interleave in a rotating order; medians over
rounds, ratios from the same run. Also: compile time per artifact (one package build per
distinct segment structure), load-to-first-step for the lowered empty plan in a fresh process.

    python bench/lower_flux.py [--rounds 3] [--steps 28] [--side 64] [--text 512]

Writes bench/results/lower_flux.json. Target: lowered empty plan >= 1.0x eager + torch.compile.
With DACC_FLUX_SHAPE=small (and --device cpu --side 8 --text 16) the script runs on a CPU, to
check the script, not to measure.
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
import flux_shaped
from common import RESULTS, interleaved_rounds
from dacc.compiler.compile import compile_model

MODEL = Path(__file__).with_name("flux_shaped.py")
PLANS = {"empty": {"strategy": "none"},
         "taylorseer": {"strategy": "taylorseer", "options": {"order": 1, "interval": 4}}}


def _compile(root: Path, name: str, steps: int, device: str) -> tuple[Path, dict]:
    plan = root / f"{name}.yaml"
    plan.write_text(yaml.safe_dump({"num_inference_steps": steps, "cache": PLANS[name],
                                    "lower": {"backend": "inductor", "device": device}}))
    start = time.perf_counter()
    manifest = compile_model(MODEL, plan, root / f"{name}.dacc", force=True, log=lambda m: print(f"  {m}", flush=True))
    low = manifest.lowering
    return root / f"{name}.dacc", {"compile_s": round(time.perf_counter() - start, 1), "packages": len(low.packages),
                                   "segments_lowered": sum(len(p.segments) for p in low.packages),
                                   "build_s": round(sum(p.build_seconds for p in low.packages), 1),
                                   "unlowered": low.unlowered}


def _generate(model, call: dict, steps: int, device: str) -> torch.Tensor:
    """An Euler walk of `steps` calls, as a Flux pipeline drives its transformer."""
    if hasattr(model, "reset"):
        model.reset()
    x = call["hidden_states"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((1,), float(sigmas[i]), dtype=x.dtype, device=device)
            v = model(**{**call, "hidden_states": x, "timestep": t}, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    if device == "cuda":
        torch.cuda.synchronize()
    return x


def _first_step(path: Path, device: str, call: dict) -> dict:
    code = f"""
import time, json, torch, dacc, sys
sys.path.insert(0, {str(MODEL.parent)!r})
import flux_shaped
call = {{k: v.to({device!r}) for k, v in flux_shaped.inputs({call['side']}, {call['side']}, {call['text']}, 3).items()}}
t0 = time.perf_counter()
m = dacc.load({str(path)!r}, allow_native_code=True).to({device!r})
t1 = time.perf_counter()
with torch.no_grad():
    m(**call)
torch.cuda.synchronize() if {device!r} == "cuda" else None
print(json.dumps({{"load_s": round(t1 - t0, 3), "first_step_s": round(time.perf_counter() - t1, 3)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--side", type=int, default=64, help="image tokens per side (64: 4096 tokens, 1024 x 1024)")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "lower_flux.json")
    args = ap.parse_args()
    device = args.device
    root = Path(tempfile.mkdtemp(prefix="dacc-bench-flux-"))
    paths, compiles = {}, {}
    for name in PLANS:
        print(f"compiling {name} (lowered for {device})", flush=True)
        paths[name], compiles[name] = _compile(root, name, args.steps, device)
        print(f"compiled {name}: {compiles[name]}", flush=True)
    call = {k: v.to(device) for k, v in flux_shaped.inputs(args.side, args.side, args.text, seed=3).items()}

    eager = flux_shaped.build().to(device)
    models = {"eager": eager}
    compiled_eager = torch.compile(eager)
    start = time.perf_counter()
    _generate(compiled_eager, call, 1, device)
    jit_s = time.perf_counter() - start
    models["eager torch.compile"] = compiled_eager
    graphs = [False, True] if device == "cuda" else [False]
    for g in graphs:
        models["empty lowered" + " graphs" * g] = dacc.load(paths["empty"], allow_native_code=True,
                                                           cuda_graphs=g).to(device)
    models["taylorseer"] = dacc.load(paths["taylorseer"], lowered="off").to(device)
    for g in graphs:
        models["taylorseer lowered" + " graphs" * g] = dacc.load(paths["taylorseer"], allow_native_code=True,
                                                                cuda_graphs=g).to(device)
    reference = _generate(eager, call, args.steps, device)
    errors = {}
    for name, model in models.items():  # warm-up, and each variant's distance from eager
        out = _generate(model, call, args.steps, device)
        errors[name] = float(f"{float((out.float() - reference.float()).norm() / reference.float().norm()):.3g}")
    times = interleaved_rounds(models, lambda model: _generate(model, call, args.steps, device), args.rounds)
    median = {n: statistics.median(t) for n, t in times.items()}
    ratios = {f"{n} vs eager": round(median["eager"] / v, 3) for n, v in median.items() if n != "eager"}
    ratios["empty lowered vs eager torch.compile"] = round(median["eager torch.compile"] / median["empty lowered"], 3)
    result = {
        "model": "bench/flux_shaped.py" + (" (DACC_FLUX_SHAPE=small)" if flux_shaped.SMALL else ""),
        "parameters": sum(p.numel() for p in eager.parameters()), "dtype": str(flux_shaped.DTYPE),
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "steps": args.steps, "image_tokens": args.side ** 2, "text_tokens": args.text,
        "rounds": args.rounds, "seconds_per_generation": {n: round(v, 4) for n, v in median.items()},
        "all_seconds": {n: [round(x, 4) for x in v] for n, v in times.items()}, "ratios": ratios,
        "relative_error_vs_eager": errors, "torch_compile_first_call_s": round(jit_s, 2), "compile": compiles,
        "load_to_first_step": _first_step(paths["empty"], device, {"side": args.side, "text": args.text}),
        "targets": {"lowered empty >= 1.0x eager + torch.compile": ratios["empty lowered vs eager torch.compile"] >= 1.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("ratios", "relative_error_vs_eager", "load_to_first_step", "targets")},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
