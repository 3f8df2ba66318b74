"""The `dacc` command line."""
from __future__ import annotations

import argparse
import sys

from dacc.schema.errors import DaccError


def _compile(args: argparse.Namespace) -> int:
    from dacc.compiler.compile import compile_model

    compile_model(args.model, args.plan, args.output, force=args.force, verify=not args.no_verify,
                  log=lambda msg: print(msg, file=sys.stderr))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dacc.report import inspect_artifact

    sys.stdout.write(inspect_artifact(args.artifact))
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
    c.set_defaults(func=_compile)
    i = sub.add_parser("inspect", help="show an artifact's plan, programs and segments",
                       description="Print the plan, programs, symbolic shapes and guards, and per-segment FLOPs "
                                   "and parameter bytes (symbolic and at the example shape).")
    i.add_argument("artifact", help="artifact directory written by `dacc compile`")
    i.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DaccError as exc:
        print(f"dacc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dacc {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
