"""Parallel plans on local processes (gloo on CPU): one CFG-pair call of the larger Flux config
(bench/flux_large.py: hidden 1024, 1024 image + 128 text tokens, batch 2), single process
against `cfg: 2`, `ulysses: 2` and `ring: 2` on two ranks, the same cores in total (the single process gets
`--world` torch threads, each rank one). Per variant: the median call time over `--calls` after
`--warmup`, the largest relative error against the single-process output, each rank's share of
the matmul FLOPs and the bytes it sends per call (both from the manifest's symbolic counts at
these sizes; the FLOP formula is the one FlopCounterMode uses, tests/compiler/test_structure.py). The
single process is timed again at the end; the ratio uses the mean of both medians.

    python bench/parallel.py [--calls 3] [--warmup 1] [--world 2] [--lower]

With `--lower` every plan is also compiled with `lower: {backend: inductor, device: cpu}` (a
parallel plan's packages are built and checked on its ranks) and run beside its unlowered self;
the single process, lowered, is timed first and last like the unlowered one.

Writes bench/results/parallel.json. On two CPU cores this measures the overhead of the
partition (collectives over loopback TCP, the prologue and epilogue repeated on every rank), not
the speed-up on GPUs, where each rank has a device of its own.

It also checks the step-time model (dacc/cost/step_time.py) on this machine: this machine's
profile is measured first (`dacc profile-device`, with the single process's and a rank's thread
counts) and each variant's predicted call time is written beside the measured one.
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
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import dacc  # noqa: E402
from common import RESULTS  # noqa: E402
from dacc.compiler.compile import compile_model  # noqa: E402
from dacc.runtime.artifact import read_manifest  # noqa: E402
from dacc.runtime.launch import run_local  # noqa: E402
from dacc.schema.serial import to_dict  # noqa: E402
from dacc.cost.measure import measure_device  # noqa: E402
from dacc.cost.step_time import step_time, total_seconds  # noqa: E402
from dacc.schema.expr import NUMBER, evaluate  # noqa: E402

MODEL = Path(__file__).with_name("flux_large.py")
PLANS = {"single": {}, "cfg2": {"parallel": {"cfg": 2}}, "ulysses2": {"parallel": {"ulysses": 2}},
         "ring2": {"parallel": {"ring": 2}}}
LOWER = {"lower": {"backend": "inductor", "device": "cpu"}}


def _inputs() -> dict:
    sys.path.insert(0, str(MODEL.parent))
    import flux_large
    return flux_large.bench_inputs(seed=5)


def _time_calls(model, inputs: dict, calls: int, warmup: int, sync=lambda: None) -> tuple[list[float], torch.Tensor]:
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**inputs).sample
        times = []
        for _ in range(calls):
            sync()
            start = time.perf_counter()
            out = model(**inputs).sample
            sync()
            times.append(time.perf_counter() - start)
    return times, out


def _rank(rank: int, world: int, path: str, inputs: dict, calls: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    model = dacc.load(path, allow_native_code=True)  # packages this benchmark built just now
    times, result = _time_calls(model, inputs, calls, warmup, sync=dist.barrier)
    if rank == 0:
        save_file({"out": result.contiguous()}, out + ".safetensors")
        Path(out + ".json").write_text(json.dumps(times))


def _per_rank(path: Path, inputs: dict, profile) -> dict:
    manifest = read_manifest(path, None)
    program = manifest.programs[0]
    env = {s.name: int(inputs[s.input].shape[s.dim]) for s in program.symbols}
    flops = sum(evaluate(s.flops_tree, env, s.name, NUMBER) for s in program.segments)
    sent = sum(evaluate(s.sent_bytes_tree, env, s.name, NUMBER) for s in program.segments)
    predicted = total_seconds(step_time(manifest, program, env, profile))
    lowered = sum(s.lowered is not None for s in program.segments)
    return {"matmul_flops_per_rank": float(flops), "bytes_sent_per_rank": float(sent), "predicted_s": predicted,
            "segments_lowered": f"{lowered}/{len(program.segments)}"}


def _profiles(world: int) -> dict:
    out = {}
    for threads in sorted({1, world}):
        torch.set_num_threads(threads)
        out[threads] = measure_device(f"this-machine-{threads}t", log=lambda m: None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--lower", action="store_true", help="also every plan lowered (compiled packages)")
    args = ap.parse_args()
    plans = {**PLANS, **({f"{n}_lowered": {**p, **LOWER} for n, p in PLANS.items()} if args.lower else {})}
    singles = [n for n in plans if n.startswith("single")]
    inputs = _inputs()
    profiles = _profiles(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {}
        for name, plan in plans.items():
            (root / f"{name}.yaml").write_text(yaml.safe_dump(plan))
            start = time.perf_counter()
            compile_model(MODEL, root / f"{name}.yaml", root / f"{name}.dacc", verify=False, log=lambda m: None)
            print(f"compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
            paths[name] = root / f"{name}.dacc"
        torch.set_num_threads(args.world)
        single = {n: dacc.load(paths[n], allow_native_code=True) for n in singles}
        before = {n: _time_calls(single[n], inputs, args.calls, args.warmup) for n in singles}
        ref = before["single"][1]
        results = {}
        for name in [n for n in plans if n not in singles]:
            out = str(root / name)
            run_local(_rank, args.world, str(paths[name]), inputs, args.calls, args.warmup, out)
            times = json.loads(Path(out + ".json").read_text())
            got = load_file(out + ".safetensors")["out"]
            err = float((got - ref).abs().max() / ref.abs().max())
            results[name] = {"median_s": statistics.median(times), "times_s": times, "max_rel_error": err,
                             **_per_rank(paths[name], inputs, profiles[1])}
            results[name]["predicted_over_measured"] = results[name]["predicted_s"] / results[name]["median_s"]
            print(f"{name}: {results[name]['median_s']:.3f} s, rel error {err:.2e}", flush=True)
        torch.set_num_threads(args.world)
        after = {n: _time_calls(single[n], inputs, args.calls, args.warmup)[0] for n in reversed(singles)}
        bases = {n: (statistics.median(before[n][0]) + statistics.median(after[n])) / 2 for n in singles}
        base = bases["single"]
        report = {
            "device": "cpu", "world": args.world, "torch_threads_single": args.world, "torch_threads_per_rank": 1,
            "model": "bench/flux_large.py (batch 2, 1024 image + 128 text tokens)",
            "profiles": {t: to_dict(p) for t, p in profiles.items()},
            **{n: {"median_s_first": statistics.median(before[n][0]), "median_s_last": statistics.median(after[n]),
                   "max_rel_error": float((before[n][1] - ref).abs().max() / ref.abs().max()),
                   **(row := _per_rank(paths[n], inputs, profiles[args.world])),
                   "predicted_over_measured": row["predicted_s"] / bases[n], "speedup_vs_single": base / bases[n]}
               for n in singles},
            **{name: {**r, "speedup_vs_single": base / r["median_s"],
                      **({"speedup_vs_unlowered": results[name.removesuffix("_lowered")]["median_s"] / r["median_s"],
                          "speedup_vs_single_lowered": bases["single_lowered"] / r["median_s"]}
                         if name.endswith("_lowered") else {})}
               for name, r in results.items()},
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parallel.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
