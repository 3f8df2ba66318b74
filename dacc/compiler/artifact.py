"""Writing an artifact: a directory written under a temporary name and renamed into place.

An interrupted or failed compile leaves nothing at the output path. Programs are saved with
`torch.export.save` with their weights stubbed out (one element, zero strides): the real
weights live once in `weights.safetensors`, shared by every program.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from dacc.compiler.ir import ProgramIR
from dacc.schema.errors import DaccError
from dacc.schema.manifest import MANIFEST, WEIGHTS_FILE, Manifest, dump_manifest, file_sha256


def check_output_path(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise DaccError(f"output path '{out}' already exists", str(out), "choose another -o path or pass --force")
    if out.exists() and not (out / MANIFEST).is_file():
        raise DaccError(f"output path '{out}' exists and is not a dacc artifact; refusing to replace it",
                        str(out), "remove it yourself or choose another -o path")
    if not out.parent.exists():
        raise DaccError(f"parent directory '{out.parent}' does not exist", str(out), "create it first")


def _stub(t: torch.Tensor) -> torch.Tensor:
    stub = torch.zeros(1, dtype=t.dtype).as_strided(tuple(t.shape), (0,) * t.dim())
    return torch.nn.Parameter(stub, requires_grad=False) if isinstance(t, torch.nn.Parameter) else stub


def save_program(ir: ProgramIR, path: Path) -> None:
    ep = ir.ep
    stores = (ep.state_dict, ep.constants)
    saved = [dict(s) for s in stores]
    for store in stores:
        for fqn, t in list(store.items()):
            if not isinstance(t, torch.Tensor):
                raise DaccError(f"model constant '{fqn}' is a {type(t).__name__}, not a tensor", fqn,
                                "keep only tensors as module attributes used in forward")
            store[fqn] = _stub(t)
    try:
        with warnings.catch_warnings():  # the stubs are meant to share one element
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(ep, str(path))
    finally:
        for store, original in zip(stores, saved):
            store.clear()
            store.update(original)


def collect_weights(irs: list[ProgramIR]) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for ir in irs:
        for fqn, t in {**ir.ep.state_dict, **ir.ep.constants}.items():
            if fqn in weights:
                continue
            t = t.detach().cpu().contiguous()
            if t.is_complex():  # safetensors has no complex dtypes: stored as (real, imag) pairs,
                t = torch.view_as_real(t).clone()  # the program's stub keeps the complex dtype
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:  # tied weights: safetensors stores each storage once
                t = t.clone()
            seen_storage.add(t.untyped_storage().data_ptr())
            weights[fqn] = t
    return weights


def write_artifact(out: Path, force: bool, manifest: Manifest, irs: list[ProgramIR],
                   texts: dict[str, str], finalize: Callable[[Path], None] | None = None) -> None:
    """Write everything to a sibling temp dir, let `finalize` verify and calibrate it (it may update
    `manifest`, which is then written again), then move it to `out` in one rename."""
    check_output_path(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for spec, ir in zip(manifest.programs, irs):
            save_program(ir, tmp / spec.file)
        save_file(collect_weights(irs), str(tmp / WEIGHTS_FILE))
        for name, text in texts.items():
            (tmp / name).write_text(text)
        manifest.files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(dump_manifest(manifest))
        if finalize is not None:
            finalize(tmp)
            (tmp / MANIFEST).write_text(dump_manifest(manifest))
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return json.loads(json.dumps(dict(config), default=str))
