"""Compile each segment into an AOTInductor package (plan `lower`), shared by identical segments.

The graph is not rewritten: the segments stay in the program (the artifact still runs without
the packages, on another machine or when asked to), and each lowered segment's manifest entry
names the package and the arguments it takes. See dacc/compiler/lowering.py; a partitioned
program is lowered on its ranks (dacc/compiler/lowering_ranks.py).
"""
from __future__ import annotations

import contextlib

import torch

from dacc.compiler.ir import ProgramIR
from dacc.compiler.lowering import lower_program
from dacc.compiler.passes import PassResult
from dacc.schema.errors import DaccError
from dacc.schema.plan import Plan


def lower_segments(ir: ProgramIR, plan: Plan) -> PassResult:
    low = plan.lower
    if low.backend == "none":
        return PassResult(False, ["lower.backend is none"])
    if low.device == "cuda" and not torch.cuda.is_available():
        raise DaccError("lower.device is cuda, but this machine has no CUDA device to build and check the kernels on",
                        "plan: lower.device", "compile on a CUDA machine, or set lower.device: cpu")
    # the runtime's view of this program, to cut it as it will
    from dacc.compiler.compile import parallel_spec, program_spec
    from dacc.runtime.program import ProgramRunner

    where = "program being lowered"
    examples = [ir.traced.example, *ir.traced.also_serves]
    if plan.parallel.world_size > 1:
        from dacc.compiler.lowering_ranks import lower_on_ranks

        ir.lowering = lower_on_ranks(ir.ep, program_spec(ir, 0, where), ir.traced.inputs, examples, low.device,
                                     parallel_spec(plan), ir.log)
        return _result(ir)
    runner = ProgramRunner(ir.ep, program_spec(ir, 0, where), where)
    if low.device == "cuda":
        # copies on the device: the runner's parameters are the program's and the traced model's
        # objects, which the checks after lowering still run on the CPU
        with new_parameters_on_conversion():
            runner.to("cuda")
        runner.retarget(torch.device("cuda"))
        runner.refresh_weights()
    ir.lowering = lower_program(runner, ir.traced.inputs, examples, low.device, ir.log)
    return _result(ir)


@contextlib.contextmanager
def new_parameters_on_conversion():
    """`.to()` gives a module new Parameter objects instead of swapping the shared ones' data."""
    overwrite, swap = (torch.__future__.get_overwrite_module_params_on_conversion(),
                       torch.__future__.get_swap_module_params_on_conversion())
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    torch.__future__.set_swap_module_params_on_conversion(False)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.__future__.set_swap_module_params_on_conversion(swap)


def _result(ir: ProgramIR) -> PassResult:
    result = ir.lowering
    notes = [f"{len(result.calls)} segment(s) lowered into {len(result.packages)} package(s)"]
    notes += [f"{name} unlowered: {why}" for name, why in result.unlowered.items()]
    return PassResult(False, notes)
