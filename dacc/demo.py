"""`make demo`: compile a bundled model, inspect the artifact, and check it against eager."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import dacc
from dacc.compiler.compile import compile_model
from dacc.compiler.model_file import load_model_file
from dacc.models import model_file
from dacc.report import inspect_artifact


def main(family: str = "flux", out_dir: str = "demo_out") -> int:
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    artifact = out / f"{family}.dacc"
    compile_model(model_file(family), None, artifact, force=True, log=lambda m: print(m, file=sys.stderr))
    print(inspect_artifact(artifact))
    mf = load_model_file(model_file(family))
    eager, compiled = mf.build(), dacc.load(artifact)
    for inputs in [mf.example_inputs()] + mf.more_example_inputs():
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = eager(**inputs, return_dict=False)[0]
            t1 = time.perf_counter()
            got = compiled(**inputs, return_dict=False)[0]
            t2 = time.perf_counter()
        err = float((got - ref).abs().max() / ref.abs().max())
        print(f"shape {tuple(inputs['hidden_states'].shape)}: relative error {err:.2e}, "
              f"eager {1e3 * (t1 - t0):.1f} ms, compiled {1e3 * (t2 - t1):.1f} ms (first call)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
