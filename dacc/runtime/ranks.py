"""The runtime's ranks: the device mesh a parallel artifact runs on, and the groups its
communication ops and cache gates use.

`dacc.load()` calls `bind_mesh`: a parallel artifact needs an initialised process group (torchrun
sets one up; `torch.distributed.init_process_group` does it by hand) whose world size is the
product of the plan's degrees. The mesh is `(cfg, ulysses, ring)`; each role is bound to its group for
the dacc operators (dacc/kernels/collectives.py), and under USP the "sequence" group is the
ulysses and ring dims flattened. Cache gates reduce their probe statistic over
every rank of the mesh: each rank holds a share of the batch or of the tokens, the statistic is a
sum over all of them, so every rank takes the single-process decision, and takes it alike.
An artifact without parallel degrees binds nothing: under torchrun its ranks run independently
(data parallel), each gate deciding on its own inputs.
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from dacc.kernels.collectives import bind_groups, bound_group
from dacc.schema.errors import DaccError
from dacc.schema.manifest import ParallelSpec

GATE = "gate"  # the group a cache gate reduces its statistic over
SEQUENCE = "sequence"  # ulysses x ring flattened: the group USP shards the tokens over


def bind_mesh(spec: ParallelSpec, where: str) -> None:
    if spec.world_size == 1:
        bind_groups({})
        return
    degrees = f"cfg {spec.cfg} x ulysses {spec.ulysses} x ring {spec.ring}"
    if not (dist.is_available() and dist.is_initialized()):
        raise DaccError(f"this artifact runs on {spec.world_size} ranks ({degrees}) and no process group is "
                        "initialised", where,
                        f"launch with `torchrun --nproc_per_node {spec.world_size} your_script.py` (dacc.load() "
                        "then finds the group), or call torch.distributed.init_process_group() first")
    world = dist.get_world_size()
    if world != spec.world_size:
        raise DaccError(f"this artifact was compiled for {spec.world_size} ranks ({degrees}), and the process "
                        f"group has {world}", where,
                        f"launch {spec.world_size} processes, or recompile with parallel degrees that multiply to "
                        f"{world}")
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    names = ("cfg", "ulysses", "ring")
    mesh = init_device_mesh(device, (spec.cfg, spec.ulysses, spec.ring), mesh_dim_names=names)
    groups = {**{name: mesh.get_group(name) for name in names}, GATE: dist.group.WORLD}
    if spec.ulysses > 1 and spec.ring > 1:  # USP shards the tokens over both dims at once
        groups[SEQUENCE] = mesh["ulysses", "ring"]._flatten(SEQUENCE).get_group()
    bind_groups(groups)


def gate_group():
    """The group cache gates reduce over; None when the artifact is not parallel."""
    return bound_group(GATE)


def default_timeout() -> datetime.timedelta:
    """How long a collective of a group dacc starts waits for a rank that died before the others
    fail (`DACC_COLLECTIVE_TIMEOUT`, seconds; torchrun's process group sets its own)."""
    return datetime.timedelta(seconds=float(os.environ.get("DACC_COLLECTIVE_TIMEOUT", "60")))
