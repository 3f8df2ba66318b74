"""Reading an artifact safely: signature, schema version, manifest digest, plain listed files and their
hashes; programs through the allow-listed reader in program_archive (no pickle, no code)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file
from torch.export import ExportedProgram

from dacc.runtime import stamps
from dacc.runtime.program_archive import check_program_json, deserialize_program, read_program_json
from dacc.schema.errors import DaccError
from dacc.schema.manifest import (INCOMPLETE, MANIFEST, MAX_MANIFEST_BYTES, RECOMPILE, SIGNATURE, Manifest,
                                  parse_manifest)
from dacc.schema.signature import KeyLike, trusted_hex, verify_signature

_MAX_SIG_BYTES = 4096


def read_manifest(path: str | Path, trusted_keys: Iterable[KeyLike] | None = None, *,
                  allow_incomplete: bool = False) -> Manifest:
    """The verified manifest: signature (when keys are given) before anything is parsed, then
    schema, digest and file names, then every file's presence, kind and digest."""
    root = Path(path)
    if (root / INCOMPLETE).exists() and not allow_incomplete:
        raise DaccError(f"'{root}' is an unfinished compile (it still holds {INCOMPLETE})", str(root),
                        "wait for the compile to finish, or compile again: the next compile removes it")
    if not root.is_dir() or not (root / MANIFEST).is_file():
        raise DaccError(f"'{root}' is not a dacc artifact (no {MANIFEST})", str(root),
                        "pass the directory written by `dacc compile`")
    raw = _read_bounded(root / MANIFEST, MAX_MANIFEST_BYTES)
    if trusted_keys is not None:
        sig_path = root / SIGNATURE
        signature = _read_bounded(sig_path, _MAX_SIG_BYTES) if sig_path.is_file() else None
        verify_signature(raw, signature, trusted_hex(trusted_keys), str(root))
    manifest = parse_manifest(raw, str(root / MANIFEST))
    _verify_files(root, manifest, allow_incomplete)
    return manifest


def _read_bounded(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise DaccError(f"{path.name} is larger than {limit} bytes", str(path), RECOMPILE)
    return raw


def _verify_files(root: Path, manifest: Manifest, allow_incomplete: bool) -> None:
    extra = {MANIFEST, SIGNATURE} | ({INCOMPLETE} if allow_incomplete else set())
    present = set()
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name in extra and entry.is_file(follow_symlinks=False):
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                raise DaccError(f"artifact entry '{entry.name}' is a {'symlink' if entry.is_symlink() else 'directory'}; "
                                "an artifact holds only plain files", str(root / entry.name), RECOMPILE)
            present.add(entry.name)
    unknown = sorted(present - set(manifest.files))
    if unknown:
        raise DaccError(f"artifact contains files the manifest does not list: {', '.join(unknown)}", str(root),
                        f"remove them or {RECOMPILE}")
    own_check = set(manifest.fsdp.files) if manifest.fsdp else set()  # each rank hashes its own (fsdp.py)
    for name, digest in sorted(manifest.files.items()):
        if name not in present:
            raise DaccError(f"artifact file '{name}' is missing", str(root / name), RECOMPILE)
        if name not in own_check:
            verify_file(root / name, digest)


def verify_file(path: Path, digest: str) -> None:
    """Refuse an artifact file whose content is not the manifest's (dacc/runtime/stamps.py)."""
    if not stamps.matches(path, digest):
        raise DaccError(f"artifact file '{path.name}' was modified or corrupted (its digest differs from the "
                        "manifest's)", str(path), RECOMPILE)


def load_weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(root / name))


def load_program(root: Path, file: str, weights: dict[str, torch.Tensor],
                 shared: dict[str, torch.nn.Parameter]) -> ExportedProgram:
    """Load one program by dacc's own allow-listed reader (never `torch.export.load`, which can
    unpickle and run code) and bind the artifact's weights; parameters are shared between programs."""
    path = root / file
    data = check_program_json(read_program_json(path), str(path))
    ep = deserialize_program(data, weights, str(path))
    for store in (ep.state_dict, ep.constants):
        for fqn, t in list(store.items()):
            if isinstance(t, torch.nn.Parameter):
                store[fqn] = shared.setdefault(fqn, t)
    return ep
