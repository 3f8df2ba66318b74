"""The `dacc` command line."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from dacc.schema.errors import DaccError


def _compile(args: argparse.Namespace) -> int:
    from dacc.compiler.compile import compile_model

    compile_model(args.model, args.plan, args.output, force=args.force, verify=not args.no_verify,
                  sign_key=args.sign_key, log=lambda msg: print(msg, file=sys.stderr))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from dacc.schema.signature import generate_keypair

    private, public = generate_keypair(args.name)
    print(f"wrote {private} (private: keep it secret, sign with --sign-key) and {public} "
          f"(public: give it to users, load with trusted_keys=[{str(public)!r}])")
    return 0


def _sign(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from dacc.runtime.artifact import read_manifest
    from dacc.schema.manifest import MANIFEST, SIGNATURE
    from dacc.schema.signature import sign_manifest

    root = Path(args.artifact)
    read_manifest(root)  # sign only an intact artifact
    signature = sign_manifest((root / MANIFEST).read_bytes(), args.key)
    tmp = root / f".{SIGNATURE}.{os.getpid()}"  # written whole, then renamed: never a torn signature
    try:
        tmp.write_bytes(signature)
        os.replace(tmp, root / SIGNATURE)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"signed {root}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dacc.report import inspect_artifact, write_decision_map

    at = {}
    for item in args.at or []:
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise DaccError(f"--at {item!r} is not NAME=INTEGER", "dacc inspect", "e.g. --at s1=4096")
        at[name] = int(value)
    sys.stdout.write(inspect_artifact(args.artifact, args.trusted_key, memory=args.memory, at=at,
                                      memory_png=args.memory_png, device=args.device))
    if args.decision_map:
        print(write_decision_map(args.artifact, args.decision_map))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import yaml

    from dacc.compiler.cache_knobs import CALIBRATED_MASKS
    from dacc.compiler.compile import compile_model
    from dacc.schema.plan import load_plan

    log = (lambda msg: print(msg, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = compile_model(args.model, args.plan, Path(tmp) / "calibration.dacc", log=log)
    gates = manifest.programs[0].gates
    gate = gates[0] if gates else None
    if gate is None:
        raise DaccError("the plan has no cache strategy to calibrate", args.plan or "<empty plan>",
                        "set cache.strategy (and cache.target_psnr to search its knobs)")
    # the plan's options with the gate's own knobs fixed: a plan that compiles again without
    # calibration and computes the same images
    options: dict = {k: v for k, v in load_plan(args.plan).cache.options.items()
                     if k not in ("scm_policy", "calibration_seeds")}
    if gate.rescale:
        options["rescale"] = gate.rescale
    strategy = gate.strategy
    if strategy in ("dbcache", "teacache"):
        options["threshold"] = gate.threshold
    elif strategy == "taylorseer":
        options["interval"] = gate.interval
    if len(gates) > 1:  # a step x range schedule: one fixed mask per range
        options.update(masks=[g.mask for g in gates])
    elif strategy in CALIBRATED_MASKS:  # as a fixed mask
        strategy, options = "scm", {"mask": gate.mask, **({"taylorseer_order": gate.taylor_order}
                                                          if gate.taylor_order else {})}
    elif gate.mask:
        options["scm_mask"] = gate.mask
    search = gate.calibration.get("search")
    print(yaml.safe_dump({"cache": {"strategy": strategy, "options": options}}, sort_keys=False), end="")
    if search and search["met"]:
        print(f"# validated: PSNR {search['validation_psnr_mean']:.2f} dB (worst seed "
              f"{search['validation_psnr_worst']:.2f}) at cache_ratio {search['cache_ratio']:.3f}, "
              f"{search['flops_speedup']:.2f}x fewer FLOPs")
    elif search:
        print(f"# no setting that skips steps met PSNR {search['target_psnr']} dB: these options compute every step")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dacc.demo import format_table, run_demo

    if args.nproc < 1:
        raise DaccError(f"--nproc {args.nproc}: a demo needs at least one process", "dacc demo", "e.g. --nproc 2")
    result = run_demo(args.out, args.plan, per_class=args.per_class, steps=args.steps, seed=args.seed,
                      log=lambda msg: print(msg, file=sys.stderr), nproc=args.nproc)
    print(format_table(result.rows))
    print(f"wrote {args.out}/grid.png (eager | dacc) and {args.out}/demo.dacc")
    return 0


def _profile_device(args: argparse.Namespace) -> int:
    import torch

    from dacc.cost.devices import save_profile
    from dacc.cost.measure import measure_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    profile = measure_device(args.name, log=lambda msg: print(msg, file=sys.stderr))
    print(f"wrote {save_profile(profile, args.output)} (use it with `dacc inspect --device {args.output}` "
          f"or parallel.auto.device)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dacc", description="Ahead-of-time compiler for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="trace a model file and write an artifact",
                       description="Trace MODEL (a Python file defining build() and example_inputs()), run the "
                                   "compile passes the plan asks for, and write an artifact directory.")
    c.add_argument("model", help="model file: defines build() and example_inputs()")
    c.add_argument("--plan", help="plan.yaml (default: the empty plan)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (e.g. model.dacc)")
    c.add_argument("--force", action="store_true", help="replace an existing artifact at --output")
    c.add_argument("--no-verify", action="store_true", help="skip the check of the written artifact against eager")
    c.add_argument("--sign-key", metavar="KEY", help="sign the artifact with this ed25519 key (from `dacc keygen`)")
    c.set_defaults(func=_compile)
    i = sub.add_parser("inspect", help="show an artifact's plan, programs and segments",
                       description="Print the plan, programs, symbolic shapes and guards, and per-segment FLOPs "
                                   "and parameter bytes (symbolic and at the example shape).")
    i.add_argument("artifact", help="artifact directory written by `dacc compile`")
    i.add_argument("--trusted-key", action="append", metavar="KEY.pub",
                   help="refuse the artifact unless signed by this public key (repeatable)")
    i.add_argument("--decision-map", metavar="PNG",
                   help="draw step x segment: what the target_psnr search measured, else the planned schedule")
    i.add_argument("--memory", action="store_true",
                   help="per-rank memory at each segment: weights, gathered fsdp units, values, intermediates, cache")
    i.add_argument("--at", action="append", metavar="SYMBOL=N",
                   help="evaluate FLOPs, bytes and memory at this size instead of the example's (repeatable)")
    i.add_argument("--memory-png", metavar="PNG", help="draw the memory map (implies --memory)")
    i.add_argument("--device", metavar="NAME|FILE",
                   help="predict each segment's time on this device: a built-in profile (h100-sxm, h200, l20) "
                        "or a file from `dacc profile-device`")
    i.set_defaults(func=_inspect)
    p = sub.add_parser("profile-device", help="measure this machine's device profile for the step-time model",
                       description="Time a matmul, a memory copy, op dispatch, and an all-to-all between two local "
                                   "processes; write the profile that `dacc inspect --device` and "
                                   "parallel.auto.device accept.")
    p.add_argument("-o", "--output", required=True, help="profile YAML to write")
    p.add_argument("--name", default="this-machine", help="the profile's name (default this-machine)")
    p.add_argument("--threads", type=int, help="intra-op threads to measure with (default torch's)")
    p.set_defaults(func=_profile_device)
    g = sub.add_parser("keygen", help="write an ed25519 key pair for signing artifacts",
                       description="Write NAME (private key, PEM, mode 0600) and NAME.pub (public key, hex). "
                                   "Sign with `dacc compile --sign-key NAME` or `dacc sign`; users load with "
                                   "dacc.load(path, trusted_keys=['NAME.pub']).")
    g.add_argument("name", help="path of the private key to write; the public key goes to NAME.pub")
    g.set_defaults(func=_keygen)
    s = sub.add_parser("sign", help="sign an existing artifact",
                       description="Verify ARTIFACT's hashes, then write its manifest.sig with KEY.")
    s.add_argument("artifact", help="artifact directory written by `dacc compile`")
    s.add_argument("--key", required=True, help="ed25519 private key from `dacc keygen`")
    s.set_defaults(func=_sign)
    k = sub.add_parser("calibrate", help="fit a cache strategy's knobs on the model's sample() and print them",
                       description="Run the model file's sample(model, seed) on a few seeds under the plan's cache "
                                   "strategy: fit TeaCache's rescaling polynomial and, with cache.target_psnr, search "
                                   "the fastest setting meeting it. Prints the options to put in the plan.")
    k.add_argument("model", help="model file defining build(), example_inputs() and sample()")
    k.add_argument("--plan", help="plan.yaml with the cache strategy")
    k.set_defaults(func=_calibrate)
    d = sub.add_parser("demo", help="compile the bundled demo model and compare it with eager",
                       description="Compile the bundled trained demo model, generate every digit class with "
                                   "eager and with the artifact from the same seeds, write a side-by-side grid "
                                   "and print time, speedup, PSNR, SSIM and conditional accuracy.")
    d.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    d.add_argument("--plan", help="plan.yaml (default: the recommended plan)")
    d.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    d.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--nproc", type=int, default=1,
                   help="run the artifact on N local processes (gloo): the plan's parallel degrees, or the split "
                        "parallel.auto picks on this machine's measured profile (default 1)")
    d.set_defaults(func=_demo)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds through the compile's cleanup: nothing half-written is left


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return args.func(args)
    except DaccError as exc:
        print(f"dacc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dacc {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
