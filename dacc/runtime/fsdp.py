"""Sharded weights at run time (plan `parallel.fsdp: P`): each unit the compiler annotated
(dacc/passes/annotate_fsdp_units.py) becomes a `fully_shard` unit of torch's FSDP2 over the fsdp
dim of the mesh, so the module's parameters are DTensors holding 1/P of the bytes. A rank reads
only its own shard file. Segments take their weights as arguments, so the runtime gathers a
unit itself (`unshard()`) before the first segment that reads it, starts gathering the next
segment's unit while one runs, and frees a unit (`reshard()`) once no later segment of the call
reads it. Every rank of the fsdp dim takes the same gate decisions (dacc/runtime/cache.py), so
all of them gather the same units in the same order.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.fsdp import fully_shard

from dacc.kernels.collectives import transfer_failed
from dacc.runtime.artifact import verify_file
from dacc.schema.dtypes import dtype_text, parse_dtype
from dacc.schema.errors import DaccError
from dacc.schema.manifest import RECOMPILE, FsdpSpec, FsdpUnit


def meta_weights(spec: FsdpSpec) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for the sharded weights: the program is rebuilt around them, and
    each rank's shards are placed once FSDP2 has laid the units out."""
    return {p.name: torch.empty(p.shape, dtype=parse_dtype(p.dtype), device="meta")
            for unit in spec.units for p in unit.params}


class ShardedWeights:
    def __init__(self, root: torch.nn.Module, spec: FsdpSpec, mesh, whole: dict[str, torch.Tensor], shard_file: Path,
                 digest: str, segment_names: list[str]):
        for unit in _inner_first(spec.units):
            modules = [root.get_submodule(m) for m in unit.modules]
            _buffers_to_params(root, unit)
            fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, reshard_after_forward=True)
        device = torch.device(mesh.device_type)
        root.to_empty(device=device)  # FSDP2 lays out each rank's shard storage here
        _restore(root, whole, device)  # what to_empty wiped that is not sharded
        _place_shards(root, spec, shard_file, digest)
        self.handles = [root.get_submodule(unit.modules[0]) for unit in spec.units]  # one per unit
        self.names = segment_names
        self.order = {name: i for i, name in enumerate(segment_names)}
        self.needed = {name: [u for u, unit in enumerate(spec.units) if name in unit.segments] for name in self.order}
        self.last_use = [max(self.order[s] for s in unit.segments) for unit in spec.units]
        self.gathered: dict[int, object] = {}  # unit -> its pending gather (None once complete)

    def enter(self, segment: str) -> None:
        """Make the units `segment` reads whole; free those no later segment reads; start
        gathering the next segment's while this one runs."""
        here = self.order[segment]
        try:
            for u in [u for u in self.gathered if self.last_use[u] < here]:
                self._free(u)
            for u in self.needed[segment]:
                self._gather(u)
                self._wait(u)
            for u in self.needed[self.names[here + 1]] if here + 1 < len(self.names) else []:
                self._gather(u, async_op=True)
        except RuntimeError as exc:  # a rank that died or stalled mid-gather: dacc's error, on every rank
            raise transfer_failed(f"fsdp all_gather before {segment}", "fsdp", exc) from None

    def release(self) -> None:
        """After a call: every unit back to its shard."""
        for u in list(self.gathered):
            self._free(u)

    def _gather(self, u: int, async_op: bool = False) -> None:
        if u not in self.gathered:
            self.gathered[u] = self.handles[u].unshard(async_op=async_op)

    def _wait(self, u: int) -> None:
        handle = self.gathered.get(u)
        if handle is not None:
            handle.wait()
            self.gathered[u] = None

    def _free(self, u: int) -> None:
        self._wait(u)
        self.handles[u].reshard()
        del self.gathered[u]


def _inner_first(units: list[FsdpUnit]) -> list[FsdpUnit]:
    """FSDP2 shards a module's subtree minus what sub-units already hold, so a unit whose module
    lies inside another unit's module is sharded first."""
    def inside(a: str, b: str) -> bool:
        return a != b and (b == "" or a.startswith(b + "."))

    return sorted(units, key=lambda u: -sum(inside(m, other) for m in u.modules
                                            for v in units if v is not u for other in v.modules))


def _owner(root: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    path, _, name = fqn.rpartition(".")
    return root.get_submodule(path), name


def _buffers_to_params(root: torch.nn.Module, unit: FsdpUnit) -> None:
    """Persistent buffers in a unit (a quantized linear's int8 weight and scales) become
    parameters without gradients, which FSDP2 shards like any other."""
    for p in unit.params:
        module, name = _owner(root, p.name)
        if name in module._buffers:
            module.register_parameter(name, torch.nn.Parameter(module._buffers.pop(name), requires_grad=False))


def _restore(root: torch.nn.Module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    for fqn, t in whole.items():
        module, name = _owner(root, fqn)
        t = t.to(device)
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        elif name in module._buffers:
            module._buffers[name] = t


def _place_shards(root: torch.nn.Module, spec: FsdpSpec, path: Path, digest: str) -> None:
    """This rank's chunk of every sharded weight, from its own shard file (hashed before use,
    like every file the runtime reads)."""
    verify_file(path, digest)
    with safe_open(str(path), framework="pt", device="cpu") as shards, torch.no_grad():
        for unit in spec.units:
            for p in unit.params:
                local, mine = shards.get_tensor(p.name), root.get_parameter(p.name).to_local()
                if tuple(local.shape) != tuple(mine.shape) or dtype_text(local.dtype) != p.dtype:
                    raise DaccError(f"the shard of '{p.name}' is {tuple(local.shape)} {dtype_text(local.dtype)}; "
                                    f"FSDP2 holds {tuple(mine.shape)} {p.dtype} on this rank", str(path), RECOMPILE)
                mine.copy_(local)
