"""Reading an artifact safely: schema version, manifest digest, file hashes, no pickles."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.export import ExportedProgram

from dacc.schema.errors import DaccError
from dacc.schema.manifest import MANIFEST, SCHEMA_VERSION, Manifest, file_sha256, manifest_digest
from dacc.schema.serial import from_dict

_RECOMPILE = "recompile it with `dacc compile model.py --plan plan.yaml -o OUT --force`"


def read_manifest(path: str | Path) -> Manifest:
    root = Path(path)
    if not root.is_dir() or not (root / MANIFEST).is_file():
        raise DaccError(f"'{root}' is not a dacc artifact (no {MANIFEST})", str(root),
                        "pass the directory written by `dacc compile`")
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DaccError(f"{MANIFEST} is not valid JSON ({exc})", str(root / MANIFEST), _RECOMPILE) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise DaccError(f"artifact schema version {version!r} is not supported by this dacc "
                        f"(it reads version {SCHEMA_VERSION})", str(root / MANIFEST), _RECOMPILE)
    if data.get("digest") != manifest_digest(data):
        raise DaccError("the manifest was edited after compilation (its digest does not match)",
                        str(root / MANIFEST), _RECOMPILE)
    try:
        manifest = from_dict(Manifest, data)
    except ValueError as exc:
        raise DaccError(f"malformed manifest: {exc}", str(root / MANIFEST), _RECOMPILE) from None
    _verify_files(root, manifest)
    return manifest


def _verify_files(root: Path, manifest: Manifest) -> None:
    present = {p.name for p in root.iterdir()} - {MANIFEST}
    unknown = sorted(present - set(manifest.files))
    if unknown:
        raise DaccError(f"artifact contains files the manifest does not list: {', '.join(unknown)}", str(root),
                        f"remove them or {_RECOMPILE}")
    for name, digest in sorted(manifest.files.items()):
        if name not in present:
            raise DaccError(f"artifact file '{name}' is missing", str(root / name), _RECOMPILE)
        if file_sha256(root / name) != digest:
            raise DaccError(f"artifact file '{name}' was modified or corrupted (sha256 mismatch)",
                            str(root / name), _RECOMPILE)


def _refuse_pickles(pt2: Path) -> None:
    """torch.export archives may carry pickled payloads; dacc writes none and loads none."""
    with zipfile.ZipFile(pt2) as zf:
        for name in zf.namelist():
            if name.endswith(("_config.json",)) and "/data/" in name:
                config = json.loads(zf.read(name)).get("config", {})
                if any(entry.get("use_pickle") for entry in config.values()):
                    raise DaccError(f"'{pt2.name}' contains pickled tensors ({name})", str(pt2), _RECOMPILE)
            elif "/sample_inputs/" in name and zf.getinfo(name).file_size > 0:
                raise DaccError(f"'{pt2.name}' contains pickled sample inputs", str(pt2), _RECOMPILE)
            elif "custom_obj" in name or "opaque_obj" in name:
                raise DaccError(f"'{pt2.name}' contains custom objects", str(pt2), _RECOMPILE)


def load_weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name))


def load_program(root: Path, file: str, weights: dict[str, torch.Tensor],
                 shared: dict[str, torch.nn.Parameter]) -> ExportedProgram:
    """Load one program and bind the artifact's weights; parameters are shared between programs."""
    path = root / file
    _refuse_pickles(path)
    ep = torch.export.load(str(path))
    for store in (ep.state_dict, ep.constants):
        for fqn, stub in list(store.items()):
            if fqn not in weights:
                raise DaccError(f"weight '{fqn}' of {file} is missing from the weights file", str(root), _RECOMPILE)
            if stub.is_complex() and not weights[fqn].is_complex():  # stored as (real, imag) pairs
                weights[fqn] = torch.view_as_complex(weights[fqn])
            if isinstance(stub, torch.nn.Parameter):
                if fqn not in shared:
                    shared[fqn] = torch.nn.Parameter(weights[fqn], requires_grad=False)
                store[fqn] = shared[fqn]
            else:
                store[fqn] = weights[fqn]
    return ep
