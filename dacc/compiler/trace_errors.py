"""Why torch.export could not trace a model: one DaccError that names the model line and a fix
that works for that kind of failure.

- A data-dependent size or branch (`.tolist()`, `.item()`, `torch.nonzero` feeding Python
  control flow): no dynamic_shapes() setting helps, so the error says where the value was read
  from the tensor (torch records the allocation stack of every data-dependent symbol) and what to
  change in the model instead.
- Dynamic-shape constraints the user's dynamic_shapes() cannot satisfy: torch's suggested fixes.
- Anything else: the innermost model line, with the generic advice.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

from dacc.schema.errors import DaccError

_TORCH_DIR = str(Path(torch.__file__).parent)
_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def describe_failure(model: torch.nn.Module, exc: BaseException) -> tuple[str, str]:
    """(module path and class, source line) of the innermost model frame in the traceback."""
    names = {id(m): (n or "<root>") for n, m in model.named_modules()}
    module, line = "<root>", "?"
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in names:
            module = f"{names[id(owner)]} ({type(owner).__name__})"
            src = traceback.extract_tb(tb, limit=1)[0]
            line = f"{src.filename}:{src.lineno}: {src.line}"
        tb = tb.tb_next
    return module, line


def _symbols_in(value: Any, depth: int = 0) -> list[Any]:
    if isinstance(value, _SYM_TYPES):
        return [value]
    if depth < 2 and isinstance(value, (list, tuple, set)):
        return [s for v in value for s in _symbols_in(v, depth + 1)]
    if depth < 2 and isinstance(value, dict):
        return [s for v in value.values() for s in _symbols_in(v, depth + 1)]
    return []


def data_dependent_origin(exc: BaseException) -> str | None:
    """`file:line: code` where a data-dependent value seen by the failing frames was read from a
    tensor, from the allocation stack torch keeps per unbacked symbol; None if there is none."""
    tb = exc.__traceback__
    origins: list[str] = []
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            for sym in _symbols_in(value):
                env = sym.node.shape_env
                for u in free_unbacked_symbols(sym):
                    stack = env.var_to_stack.get(u) if env is not None else None
                    frames = [f for f in (stack.summary() if stack is not None else [])
                              if not f.filename.startswith(_TORCH_DIR)]
                    if frames:
                        f = frames[-1]
                        origins.append(f"{f.filename}:{f.lineno}: {(f.line or '').strip()}")
        tb = tb.tb_next
    return origins[0] if origins else None


def _is_data_dependent(exc: BaseException, origin: str | None) -> bool:
    text = str(exc)
    return (isinstance(exc, GuardOnDataDependentSymNode) or origin is not None
            or "data-dependent" in text or "data dependent" in text or "non-nested SymInt" in text)


def _suggested_fixes(text: str) -> str | None:
    if "Suggested fixes" not in text:
        return None
    lines = text.split("Suggested fixes", 1)[1].splitlines()[1:]
    fixes = [ln.strip() for ln in lines if ln.strip()][:6]
    return "; ".join(fixes) if fixes else None


def export_failure(model: torch.nn.Module, exc: BaseException, user_dynamic_shapes: bool) -> DaccError:
    module, line = describe_failure(model, exc)
    name = type(model).__name__
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    what = f"torch.export could not trace {name}: {type(exc).__name__}: {first}"
    where = f"module {module}, at {line}"
    origin = data_dependent_origin(exc)
    if _is_data_dependent(exc, origin):
        source = f" (the value is read from a tensor at {origin})" if origin else ""
        return DaccError(
            f"{what}; the model takes a Python size or branch from tensor values{source}, which a traced "
            "graph cannot express", where,
            "no dynamic_shapes() setting helps: change the model so that this size comes from input shapes or "
            "is passed in as a plain Python int (build() may return a subclass or wrapper whose forward does so), "
            "or keep this model eager")
    fixes = _suggested_fixes(str(exc))
    if user_dynamic_shapes and fixes:
        return DaccError(what, where, f"apply torch's suggested fixes to dynamic_shapes() ({fixes}), or delete "
                                      "dynamic_shapes() to let dacc choose (Dim.AUTO, derived sizes kept static)")
    if user_dynamic_shapes:
        return DaccError(what, where, "make that code traceable, or delete dynamic_shapes() to let dacc choose "
                                      "(Dim.AUTO, derived sizes kept static)")
    return DaccError(what, where, "make that code traceable (no Python control flow on tensor values), or declare "
                                  "static shapes for the inputs it reads with dynamic_shapes()")
