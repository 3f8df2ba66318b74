"""Writing an artifact into the temporary directory `output.reserve` made, then into place.

An interrupted or failed compile leaves nothing at the output path. Programs are saved with
`torch.export.save` with their weights stubbed out (one element, zero strides): the real
weights live once in `weights.safetensors`, shared by every program.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from dacc.compiler.ir import ProgramIR
from dacc.compiler.output import commit, discard, write_error
from dacc.schema.errors import DaccError
from dacc.schema.digest import file_digest
from dacc.schema.manifest import INCOMPLETE, MANIFEST, SIGNATURE, WEIGHTS_FILE, Manifest, dump_manifest, fsdp_shard
from dacc.schema.signature import sign_manifest


def _stub(t: torch.Tensor) -> torch.Tensor:
    stub = torch.zeros(1, dtype=t.dtype).as_strided(tuple(t.shape), (0,) * t.dim())
    return torch.nn.Parameter(stub, requires_grad=False) if isinstance(t, torch.nn.Parameter) else stub


def save_program(ir: ProgramIR, path: Path) -> None:
    ep = ir.ep
    stores = (ep.state_dict, ep.constants)
    for store in stores:
        for fqn, t in store.items():
            if not isinstance(t, torch.Tensor):
                raise DaccError(f"model constant '{fqn}' is a {type(t).__name__}, not a tensor", fqn,
                                "keep only tensors as module attributes used in forward")
    saved = [dict(s) for s in stores]
    # guards code is Python source torch would exec at load; dacc checks shapes with the manifest's
    # expression trees, and its reader refuses programs that carry any
    guards_code, ep._guards_code = ep._guards_code, []
    try:
        for store in stores:
            for fqn, t in list(store.items()):
                store[fqn] = _stub(t)
        with warnings.catch_warnings():  # the stubs are meant to share one element
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(ep, str(path))
    finally:
        ep._guards_code = guards_code
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


def write_artifact(tmp: Path, out: Path, manifest: Manifest, irs: list[ProgramIR], texts: dict[str, str],
                   finalize: Callable[[Path], None] | None = None, sign_key: Path | None = None,
                   copies: dict[str, Path] | None = None) -> None:
    """Fill the reserved temp dir `tmp`, let `finalize` verify and calibrate it (it may update
    `manifest`, which is then written again), sign it if asked, then swap it into place at `out`.
    Any failure or interruption removes `tmp`: nothing half-written is left or loadable."""
    try:
        try:
            for spec, ir in zip(manifest.programs, irs):
                save_program(ir, tmp / spec.file)
            weights = collect_weights(irs)
            if manifest.fsdp is not None:  # each fsdp rank reads only its own shards
                sharded = [p.name for unit in manifest.fsdp.units for p in unit.params]
                for rank, name in enumerate(manifest.fsdp.files):
                    save_file({f: fsdp_shard(weights[f], rank, manifest.fsdp.degree) for f in sharded}, str(tmp / name))
                weights = {f: t for f, t in weights.items() if f not in set(sharded)}
            save_file(weights, str(tmp / WEIGHTS_FILE))
            for name, text in texts.items():
                (tmp / name).write_text(text)
            for name, source in (copies or {}).items():  # compiled packages, from the compile cache
                shutil.copyfile(source, tmp / name)
            manifest.files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.name != INCOMPLETE}
            (tmp / MANIFEST).write_text(dump_manifest(manifest))
        except (OSError, RuntimeError) as exc:
            raise write_error(exc, tmp.parent) from None
        if finalize is not None:
            finalize(tmp)
            (tmp / MANIFEST).write_text(dump_manifest(manifest))
        if sign_key is not None:
            (tmp / SIGNATURE).write_bytes(sign_manifest((tmp / MANIFEST).read_bytes(), sign_key))
        commit(tmp, out)
    except BaseException:
        discard(tmp)
        raise


def model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    config = json.loads(json.dumps(dict(config), default=str))
    if isinstance(config.get("_use_default_values"), list):  # diffusers fills it from a set: its order
        config["_use_default_values"] = sorted(config["_use_default_values"])  # changes per process
    return config
