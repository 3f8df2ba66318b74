"""Why torch.export could not trace a model: one DaccError that names the model line and a fix
that works for that kind of failure.

- A data-dependent size or branch (`.tolist()`, `.item()`, `torch.nonzero` feeding Python
  control flow): no dynamic_shapes() setting helps, so the error says where the value was read
  from a tensor (found by tracing once more under a TorchFunctionMode that watches for such
  reads) and what to change in the model instead.
- Dynamic-shape constraints the user's dynamic_shapes() cannot satisfy: torch's suggested fixes.
- Anything else: the innermost model line, with the generic advice.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols
from torch.overrides import TorchFunctionMode

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


def _unbacked(value: Any) -> bool:
    """Whether `value` (a size, a list of them, a tensor) holds a data-dependent symbol."""
    items = list(value.shape) if isinstance(value, torch.Tensor) else list(value) if isinstance(
        value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, (list, tuple, torch.Tensor)):
            if _unbacked(v):
                return True
        elif isinstance(v, _SYM_TYPES) and free_unbacked_symbols(v):
            return True
    return False


class _ValueReads(TorchFunctionMode):
    """Records the first model line whose torch call returns a data-dependent size or number
    (`.tolist()`, `.item()`, `nonzero`). torch keeps the allocation stack of such symbols only
    while tracing, so the trace is replayed under this mode once it has failed."""

    def __init__(self) -> None:
        super().__init__()
        self.site: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.site is None and _unbacked(out):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
            if frames:
                f = frames[-1]
                self.site = f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
        return out


def data_dependent_origin(export: Callable[[], Any]) -> str | None:
    """`file:line: code` where the model first read a size or number from tensor values, found by
    running `export` (which is expected to fail again) under `_ValueReads`."""
    reads = _ValueReads()
    try:
        with reads:
            export()
    except Exception:  # the failure being explained
        pass
    return reads.site


def _is_data_dependent(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in text or "data dependent" in text
            or "non-nested SymInt" in text or "unbacked" in text)


def _suggested_fixes(text: str) -> str | None:
    if "Suggested fixes" not in text:
        return None
    lines = text.split("Suggested fixes", 1)[1].splitlines()[1:]
    fixes = [ln.strip() for ln in lines if ln.strip()][:6]
    return "; ".join(fixes) if fixes else None


def export_failure(model: torch.nn.Module, exc: BaseException, user_dynamic_shapes: bool,
                   retry: Callable[[], Any]) -> DaccError:
    """The DaccError for `exc`; `retry` runs the failed export again (to locate a data-dependent read)."""
    module, line = describe_failure(model, exc)
    name = type(model).__name__
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    what = f"torch.export could not trace {name}: {type(exc).__name__}: {first}"
    where = f"module {module}, at {line}"
    if _is_data_dependent(exc):
        origin = data_dependent_origin(retry)
        source = f", read from tensor data at {origin}" if origin else ""
        return DaccError(
            f"{what}; the model takes a Python decision (a branch, set, max or size) on a value{source}: "
            "torch.export traces shapes, not tensor values", where,
            "no dynamic_shapes() setting helps: change the model so that this value comes from input shapes or "
            "is passed in as a plain Python int, or keep the data-dependent part a tensor operation (build() may "
            "return a subclass or wrapper whose forward does so); otherwise keep this model eager")
    fixes = _suggested_fixes(str(exc))
    if user_dynamic_shapes and fixes:
        return DaccError(what, where, f"apply torch's suggested fixes to dynamic_shapes() ({fixes}), or delete "
                                      "dynamic_shapes() to let dacc choose (Dim.AUTO, derived sizes kept static)")
    if user_dynamic_shapes:
        return DaccError(what, where, "make that code traceable, or delete dynamic_shapes() to let dacc choose "
                                      "(Dim.AUTO, derived sizes kept static)")
    return DaccError(what, where, "make that code traceable (no Python control flow on tensor values), or declare "
                                  "static shapes for the inputs it reads with dynamic_shapes()")
