"""Frontend: trace the user's transformer with torch.export and check it against eager.

One dynamic program is exported from `example_inputs()`. Every shape in
`more_example_inputs()` is then run through the programs traced so far; a shape that none of
them accepts (a guard fails) or reproduces (numerics differ) gets a program of its own, so an
artifact never serves a shape it was not checked on.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import os
from typing import Any

import torch

from dacc.compiler.dynamic_dims import auto_dynamic, derived_input_dims
from dacc.compiler.ir import Traced
from dacc.compiler.trace_errors import export_failure
from dacc.schema.dtypes import dtype_text
from dacc.schema.errors import DaccError
from dacc.schema.manifest import InputSpec, OutputType
from dacc.runtime.inputs import flatten_with_paths

FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2
MAX_STATIC_RETRIES = 4  # each retry fixes every derived dim found; relations rarely chain deeper


def takes_return_dict(model: torch.nn.Module) -> bool:
    return "return_dict" in inspect.signature(model.forward).parameters


def _call_kwargs(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(inputs)
    if takes_return_dict(model):
        kwargs["return_dict"] = False  # the graph returns a tuple; the runtime rebuilds the dataclass
    return kwargs


def input_specs(kwargs: dict[str, Any], where: str) -> list[InputSpec]:
    specs = []
    for path, leaf in flatten_with_paths(kwargs):
        if isinstance(leaf, torch.Tensor):
            specs.append(InputSpec(path, "tensor", dtype=dtype_text(leaf.dtype),
                                   shape=[str(d) for d in leaf.shape]))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            specs.append(InputSpec(path, "constant", value=leaf))
        else:
            raise DaccError(f"input '{path}' is a {type(leaf).__name__}; only tensors and plain constants "
                            "(None, bool, int, float, str) can be part of a compiled call", where,
                            "pass tensors, or fold the object into the model in build()")
    return specs


@contextlib.contextmanager
def _quiet_torch():
    """torch logs warnings and whole graph listings while a trace fails; the DaccError says what
    matters. DACC_DEBUG=1 keeps torch's own output."""
    if os.environ.get("DACC_DEBUG"):
        yield
        return
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)


def _export(model: torch.nn.Module, kwargs: dict[str, Any], dyn: Any, user_dynamic_shapes: bool):
    if "return_dict" in kwargs and isinstance(dyn, dict):
        dyn = {**dyn, "return_dict": None}
    def export():
        with torch.no_grad(), _quiet_torch():
            return torch.export.export(model, (), kwargs, dynamic_shapes=dyn, strict=False)
    try:
        return export()
    except Exception as exc:  # any tracing failure becomes one readable paragraph
        raise export_failure(model, exc, user_dynamic_shapes, retry=export) from exc


def export_program(model: torch.nn.Module, inputs: dict[str, Any], dynamic_shapes: Any, where: str) -> Traced:
    """Export one program. Under the default spec, input dims whose size torch.export derives from
    other sizes are made static and the model traced again (see dynamic_dims.py)."""
    kwargs = _call_kwargs(model, inputs)
    if dynamic_shapes is not None:
        ep = _export(model, kwargs, dynamic_shapes, True)
        derived = derived_input_dims(ep, kwargs)
        if derived:
            d = derived[0]
            raise DaccError(f"{d.describe()}: a size derived from other inputs' sizes, which the runtime cannot "
                            "check", f"{where}: dynamic_shapes()",
                            f"declare '{d.path}' dim {d.dim} static (None) and use Dim.AUTO rather than a named Dim "
                            "for the sizes it depends on, or delete dynamic_shapes() to let dacc choose")
        notes = []
    else:
        static: dict[str, set[int]] = {}
        notes = []
        for _ in range(MAX_STATIC_RETRIES + 1):
            ep = _export(model, kwargs, auto_dynamic(kwargs, static), False)
            derived = derived_input_dims(ep, kwargs)
            if not derived:
                break
            for d in derived:
                static.setdefault(d.path, set()).add(d.dim)
                notes.append(f"{d.describe()}: traced again with that dim static")
        else:
            raise DaccError(f"{derived[0].describe()}: still derived from other sizes after making "
                            f"{sum(map(len, static.values()))} dims static", where,
                            "declare static shapes for these inputs with dynamic_shapes()")
    ep._example_inputs = None  # never serialized: torch.export would pickle them
    return Traced(ep, inputs, input_specs(kwargs, where), notes)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def rel_error(got: list[Any], ref: list[Any]) -> float:
    """The largest max|a - b| / max|b| over the tensors of `ref` (other values, a segment's sizes,
    and empty tensors are skipped); inf when the lists, or a pair's shapes, differ."""
    if len(got) != len(ref):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, ref):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        if not b.numel():
            continue
        scale = b.abs().max().clamp_min(1e-12)
        err = float(((a.float() - b.float()).abs().max() / scale))
        if not math.isfinite(err):  # a NaN would lose every comparison with the tolerance and pass
            return float("inf")
        worst = max(worst, err)
    return worst


def tolerance(ref: list[torch.Tensor]) -> float:
    return FP32_TOL if all(t.dtype in (torch.float32, torch.float64) for t in ref) else LOW_PRECISION_TOL


def eager_reference(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], OutputType | None]:
    with torch.no_grad():
        out = model(**inputs)
    otype = None
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        cls = type(out)
        otype = OutputType(cls.__module__, cls.__qualname__, list(out.keys()))
    return flat_outputs(out), otype


def program_outputs(traced: Traced, model: torch.nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor] | None:
    """A traced (or rewritten) program's outputs on `inputs`, op by op; None when its guards reject the shapes."""
    try:
        with torch.no_grad():
            return flat_outputs(traced.ep.module()(**_call_kwargs(model, inputs)))
    except Exception:  # a failed guard, or a program that cannot run this shape at all
        return None


def program_error(traced: Traced, model: torch.nn.Module, inputs: dict[str, Any],
                  ref: list[torch.Tensor]) -> float | None:
    """Relative error of a traced program on `inputs`; None when its guards reject the shapes."""
    got = program_outputs(traced, model, inputs)
    return None if got is None else rel_error(got, ref)


def trace(model: torch.nn.Module, examples: list[dict[str, Any]], dynamic_shapes: Any,
          where: str, log=print) -> tuple[list[Traced], OutputType | None]:
    """Export programs until every example shape is served by one that matches eager."""
    programs: list[Traced] = []
    output_type = None
    for i, inputs in enumerate(examples):
        ref, otype = eager_reference(model, inputs)
        output_type = output_type or otype
        tol = tolerance(ref)
        errors = [program_error(p, model, inputs, ref) for p in programs]
        serving = next((p for p, e in zip(programs, errors) if e is not None and e <= tol), None)
        if serving is not None:
            serving.also_serves.append(inputs)
            continue
        program = export_program(model, inputs, dynamic_shapes, where)
        for note in program.notes:
            log(f"example {i}: {note}")
        err = program_error(program, model, inputs, ref)
        if err is None or err > tol:
            raise DaccError(f"the exported program for example {i} does not reproduce eager "
                            f"(relative error {err if err is not None else 'guard failure'}, tolerance {tol:g})",
                            where, "report this model; meanwhile declare static shapes with dynamic_shapes()")
        if programs:
            log(f"example {i}: shapes not covered by earlier program(s); traced a program of its own")
        programs.append(program)
    return programs, output_type
