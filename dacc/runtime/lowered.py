"""Compiled packages at run time: which machine they were built for, whether this one can run
them, and the call that replaces a segment's op-by-op graph.

A package is native code (a shared library AOTInductor built). Loading one runs it, so the
loader accepts packages only from an artifact whose signature verified against `trusted_keys`,
or when the caller says it trusts the artifact's origin (`allow_native_code=True`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from dacc.kernels.collectives import take_transfer_failure
from dacc.schema.errors import DaccError
from dacc.schema.manifest import LoweringSpec, Manifest

LoweredMode = Literal["use", "fallback", "off"]


def cpu_isa() -> str:
    """Inductor's vector ISA on this machine ("avx512", "avx2", "neon", ...; "" when none)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return str(isa) if isa else ""


def supported_isas() -> set[str]:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return {str(isa) for isa in valid_vec_isa_list()}


def cuda_arch() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def target_mismatch(low: LoweringSpec) -> str | None:
    """Why this process cannot run packages built for `low`; None when it can."""
    if low.torch_version != torch.__version__:
        return f"they were built by torch {low.torch_version} and this is torch {torch.__version__}"
    if low.device == "cuda":
        here = cuda_arch()
        if here is None:
            return "they were built for CUDA and no CUDA device is available"
        if here != low.cuda_arch:
            return f"they were built for CUDA compute capability {low.cuda_arch} and this GPU is {here}"
        return None
    if low.cpu_isa and low.cpu_isa not in supported_isas():
        return (f"they were built for the {low.cpu_isa} instruction set, which this CPU lacks "
                f"(it has {', '.join(sorted(supported_isas())) or 'no vector ISA'})")
    return None


class LoadedPackage:
    """One compiled package file and a loaded instance of it."""

    def __init__(self, path: Path):
        from torch._C._aoti import AOTIModelPackageLoader

        self.path = path
        self.loader = AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def fresh(self) -> LoadedPackage:
        """Another instance of the same code. A CUDA graph capture needs one of its own: the
        package's runtime waits on an event before each run, and once a capture has recorded
        that event no uncaptured run may wait on it (dacc/runtime/graph_step.py)."""
        return LoadedPackage(self.path)


class LoweredSegment:
    """A package standing in for one segment: takes the segment's arguments at `args`, each made
    contiguous (a package is compiled for contiguous inputs and does not check strides), then
    the size carriers of the program symbols `sizes`."""

    def __init__(self, package: LoadedPackage, args: list[int], sizes: list[str]):
        self.package = package
        self.args = args
        self.sizes = sizes

    def fresh(self) -> LoweredSegment:
        return LoweredSegment(self.package.fresh(), self.args, self.sizes)

    def __call__(self, full: list[Any], carriers: dict[str, torch.Tensor]) -> list[Any]:
        picked = []
        for k in self.args:
            t = full[k]
            picked.append(t if t.is_contiguous() else t.contiguous())
        for name in self.sizes:
            picked.append(carriers[name])
        take_transfer_failure()  # none left from an earlier call may stand in for this one's error
        try:
            return self.package.loader.run(picked)
        except RuntimeError:
            failure = take_transfer_failure()  # a dacc collective inside failed: its own error, not the wrapper
            if failure is not None:
                raise failure from None
            raise


def package_arity(loader: Any) -> tuple[int, int]:
    """(tensors a package takes, tensors it returns), from its call spec: a package called with
    the wrong number of tensors would read past its arguments, so the runtime checks first."""
    import torch.utils._pytree as pytree

    in_spec, out_spec = (pytree.treespec_loads(s) for s in loader.get_call_spec())
    return in_spec.num_leaves, out_spec.num_leaves


def load_packages(root: Path, manifest: Manifest, mode: LoweredMode, trusted: bool) -> dict[str, LoadedPackage]:
    """{package file: its loaded package} for the artifact's packages, or {} when they are not to be used
    (mode "off", or "fallback" on a machine or trust level that cannot run them)."""
    low = manifest.lowering
    if low is None or mode == "off" or not low.packages:
        return {}
    fix = ("pass lowered=\"fallback\" to run the unlowered segments instead, or lowered=\"off\" to never load "
           "packages")
    why = target_mismatch(low)
    if why is None and not trusted:
        why = (f"this artifact carries {len(low.packages)} compiled package(s) of native code, and loading "
               "them runs that code")
        fix = ("sign the artifact (`dacc sign`) and pass trusted_keys=, or pass allow_native_code=True if you "
               "trust where it came from; or lowered=\"off\" to run the unlowered segments")
    if why is not None:
        if mode == "fallback":
            warnings.warn(f"{root}: not using the compiled packages: {why}; running the unlowered segments",
                          stacklevel=3)
            return {}
        raise DaccError(f"cannot use this artifact's compiled packages: {why}", str(root), fix)
    loaders = {}
    for spec in low.packages:
        try:
            loaders[spec.file] = LoadedPackage(root / spec.file)
        except RuntimeError as exc:
            raise DaccError(f"compiled package {spec.file} does not load: {str(exc).splitlines()[0][:300]}",
                            str(root / spec.file), fix) from None
    return loaders
