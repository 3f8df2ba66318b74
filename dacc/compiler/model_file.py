"""Loading the user's model file: `build()`, `example_inputs()` and the optional hooks.

Contract of a model file:
- `build() -> torch.nn.Module`: the transformer.
- `example_inputs() -> dict`: keyword arguments of one forward call.
- optional `dynamic_shapes()`: a torch.export `dynamic_shapes` spec for those kwargs; by default
  every dim of every tensor input is `Dim.AUTO`, so batch and token dims stay dynamic wherever
  the model allows it.
- optional `more_example_inputs() -> list[dict]`: other shapes the artifact must serve. Each one is
  checked against eager at compile time; a shape the dynamic program does not cover gets a
  program of its own.
- optional `sample(model, seed) -> Tensor`: one full generation calling `model` (for calibration).
"""
from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from dacc.schema.errors import DaccError


@dataclass
class ModelFile:
    path: Path
    module: ModuleType

    @property
    def sample(self) -> Callable | None:
        return getattr(self.module, "sample", None)

    def build(self) -> torch.nn.Module:
        model = _call(self, "build")
        if not isinstance(model, torch.nn.Module):
            raise DaccError(f"build() returned {type(model).__name__}, not a torch.nn.Module", str(self.path),
                            "make build() return the transformer module")
        return model.eval()

    def example_inputs(self) -> dict[str, Any]:
        inputs = _call(self, "example_inputs")
        _check_inputs(inputs, self.path, "example_inputs()")
        return inputs

    def more_example_inputs(self) -> list[dict[str, Any]]:
        if not hasattr(self.module, "more_example_inputs"):
            return []
        more = _call(self, "more_example_inputs")
        if not isinstance(more, (list, tuple)):
            raise DaccError("more_example_inputs() must return a list of dicts", str(self.path))
        for i, inputs in enumerate(more):
            _check_inputs(inputs, self.path, f"more_example_inputs()[{i}]")
        return list(more)

    def dynamic_shapes(self) -> Any | None:
        return _call(self, "dynamic_shapes") if hasattr(self.module, "dynamic_shapes") else None


def _check_inputs(inputs: Any, path: Path, what: str) -> None:
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        raise DaccError(f"{what} must return a dict of keyword arguments, got {type(inputs).__name__}", str(path),
                        "return e.g. {'hidden_states': torch.randn(...), 'timestep': ...}")
    if not any(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise DaccError(f"{what} has no tensor argument", str(path), "pass at least the hidden_states tensor")


def _call(mf: ModelFile, name: str) -> Any:
    fn = getattr(mf.module, name, None)
    if not callable(fn):
        raise DaccError(f"model file does not define {name}()", str(mf.path),
                        f"add `def {name}():` to the file (see README.md 'Model files')")
    try:
        return fn()
    except DaccError:
        raise
    except Exception as exc:
        frame = _last_frame_in(exc, mf.path)
        raise DaccError(f"{name}() raised {type(exc).__name__}: {exc}", frame or str(mf.path),
                        f"fix {name}() so that it runs on its own") from exc


def _last_frame_in(exc: BaseException, path: Path) -> str | None:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


def load_model_file(path: str | Path) -> ModelFile:
    path = Path(path)
    if not path.is_file():
        raise DaccError(f"model file '{path}' does not exist", str(path),
                        "pass the path of a Python file that defines build() and example_inputs()")
    name = f"dacc_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DaccError(f"'{path}' cannot be imported as Python", str(path), "give the file a .py suffix")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise DaccError(f"model file has a syntax error: {exc.msg}", f"{path}:{exc.lineno}",
                        "fix the syntax error") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise DaccError(f"importing the model file raised {type(exc).__name__}: {exc}",
                        _last_frame_in(exc, path) or str(path), "make the file importable on its own") from exc
    mf = ModelFile(path, module)
    for required in ("build", "example_inputs"):
        if not callable(getattr(module, required, None)):
            raise DaccError(f"model file does not define {required}()", str(path),
                            f"add `def {required}():` (see README.md 'Model files')")
    return mf
