"""The runtime's ranks: the device mesh a parallel artifact runs on, and the groups its
communication ops and cache gates use.

`dacc.load()` calls `bind_mesh`: a parallel artifact needs an initialised process group (torchrun
sets one up; `torch.distributed.init_process_group` does it by hand) whose world size is the
product of the plan's degrees. The mesh is `(fsdp, cfg, ulysses, ring, vae_patch)`; each role is bound to its
group for the dacc operators (dacc/kernels/collectives.py), and under USP the "sequence" group is
the ulysses and ring dims flattened. The ranks of one fsdp index serve one request together.
Cache gates sum their probe statistic over those ranks (the "gate" group): each holds a share of
the batch or of the tokens, so every rank takes the single-process decision, and takes it alike.
Ranks along the fsdp dim serve different requests, yet must gather the same weights at the same
time: they share one decision, the most cautious (the largest change, `GATE_MAX`).
An artifact without parallel degrees binds nothing: under torchrun its ranks run independently
(data parallel), each gate deciding on its own inputs.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from dacc.kernels.collectives import bind_groups, bound_group
from dacc.schema.errors import DaccError
from dacc.schema.manifest import ParallelSpec

GATE = "gate"  # the group a cache gate sums its statistic over (the ranks serving one request)
GATE_MAX = "fsdp"  # then takes the largest over (ranks serving other requests with shared weights)
SEQUENCE = "sequence"  # ulysses x ring flattened: the group USP shards the tokens over


def bind_mesh(spec: ParallelSpec, where: str) -> tuple[object, dict]:
    """The device mesh (None for a one-rank artifact) and its groups by role, bound for the
    dacc operators (the loaded module binds them again before each call: `bind_groups`)."""
    if spec.world_size == 1:
        bind_groups({})
        return None, {}
    degrees = spec.describe()
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

    # "nccl", or "cpu:gloo,cuda:nccl" from init_process_group() with no backend named
    backend = str(dist.get_backend())
    device = "cuda" if "nccl" in backend or (backend == "undefined" and torch.cuda.is_available()) else "cpu"
    names = ("fsdp", "cfg", "ulysses", "ring", "vae_patch")
    mesh = init_device_mesh(device, (spec.fsdp, spec.cfg, spec.ulysses, spec.ring, spec.vae_patch),
                            mesh_dim_names=names)
    groups = {name: mesh.get_group(name) for name in names}
    if spec.ulysses > 1 and spec.ring > 1:  # USP shards the tokens over both dims at once
        groups[SEQUENCE] = mesh["ulysses", "ring"]._flatten(SEQUENCE).get_group()
    if spec.fsdp == 1:
        groups[GATE] = dist.group.WORLD
    elif spec.world_size > spec.fsdp:
        groups[GATE] = mesh["cfg", "ulysses", "ring", "vae_patch"]._flatten(GATE).get_group()
    timeout = _world_timeout(device)
    if timeout is not None:  # the mesh's own groups would otherwise wait torch's default (30 min on gloo)
        for group in {id(g): g for g in groups.values() if g is not dist.group.WORLD}.values():
            group.set_timeout(timeout)
    bind_groups(groups)
    return mesh, groups


def _world_timeout(device: str) -> datetime.timedelta | None:
    """How long the initialised process group's collectives wait (torchrun's, the user's, or
    `run_local`'s `default_timeout()`): every group of the mesh waits as long."""
    try:
        return dist.group.WORLD._get_backend(torch.device(device)).options._timeout
    except (AttributeError, RuntimeError):  # a backend that keeps no options: torch's default stays
        return None


def gate_group():
    """The group cache gates sum over; None when no two ranks serve one request."""
    return bound_group(GATE)


def fsdp_group():
    """The ranks that share weight shards (and so gate decisions); None without fsdp."""
    group = bound_group(GATE_MAX)
    return group if group is not None and group.size() > 1 else None


def default_timeout() -> datetime.timedelta:
    """How long a collective of a group dacc starts waits for a rank that died before the others
    fail (`DACC_COLLECTIVE_TIMEOUT`, seconds; torchrun's process group sets its own)."""
    return datetime.timedelta(seconds=float(os.environ.get("DACC_COLLECTIVE_TIMEOUT", "60")))
