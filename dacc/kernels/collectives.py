"""Communication as dacc operators: what the partition passes insert into the graph.

A compiled program is the same on every rank, so the ops name their process group by its role in
the plan ("cfg", "ulysses"), not by torch's run-time group name: `dacc.load()` builds the device
mesh and binds each role to its group (`bind_groups`). Each op also records the group's size it
was compiled for; its fake implementation computes the local shapes from it, symbolic sizes
included, so the partitioned program keeps exact shapes and saves and loads like any other.

The bodies call torch's functional collectives (`torch.ops._c10d_functional.*`), so a
`TorchDispatchMode` sees every transfer, on gloo (CPU) as on NCCL.

- `shard(x, dim, parts, group, world)`: this rank's share of `x` along `dim`. The dim is made of
  `parts` laid end to end (Flux's rotary table: text rows, then image rows); each part is split
  into `world` equal chunks and the rank keeps chunk `rank` of every part. Local, no transfer.
- `gather(x, dim, parts, group, world)`: the inverse; `parts` are the full sizes. One all-gather.
- `all_to_all(x, scatter_dim, gather_dim, group, world)`: Ulysses' exchange. Chunk j of
  `scatter_dim` goes to rank j; what arrives is laid end to end along `gather_dim` in rank order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dacc.schema.errors import DaccError

_GROUPS: dict[str, "dist.ProcessGroup"] = {}


def bind_groups(groups: dict[str, "dist.ProcessGroup"]) -> None:
    """Bind plan roles to process groups: the runtime does it when it builds an artifact's mesh,
    and again whenever another loaded artifact (another mesh) runs in between."""
    global _GROUPS
    _GROUPS = groups


def bound_groups() -> dict[str, "dist.ProcessGroup"]:
    return _GROUPS


def bound_group(role: str) -> "dist.ProcessGroup | None":
    return _GROUPS.get(role)


def process_group(role: str, world: int) -> "dist.ProcessGroup":
    group = _GROUPS.get(role)
    if group is None:
        raise RuntimeError(f"this program splits work over a '{role}' group of {world} ranks, and no such "
                           "group is bound: load the artifact with dacc.load() inside torchrun (or an "
                           f"initialised process group) with the world size its plan names")
    if group.size() != world:
        raise RuntimeError(f"the '{role}' group has {group.size()} ranks; the program was compiled for {world}")
    return group


def transfer_failed(what: str, role: str, exc: RuntimeError) -> DaccError:
    """A failed transfer (a rank that died, or a timeout) as an error naming the op and the group,
    raised on every rank still alive."""
    return DaccError(f"dacc.{what} over the '{role}' group failed: {str(exc).splitlines()[0][:300]}",
                     f"rank {dist.get_rank()}", "another rank has probably died or stalled; its own output "
                     "names the cause (restart all ranks together)")


def _transfer(what: str, role: str, start, *args) -> Tensor:
    """Run one functional collective and wait for it."""
    try:
        return torch.ops._c10d_functional.wait_tensor(start(*args))
    except RuntimeError as exc:
        raise transfer_failed(what, role, exc) from None


def _local_parts(parts: list[int], world: int, what: str) -> list[int]:
    for p in parts:
        if p % world:
            raise RuntimeError(f"{what}: a size of {p} does not split into {world} equal shares")
    return [p // world for p in parts]


@torch.library.custom_op("dacc::shard", mutates_args=())
def shard(x: Tensor, dim: int, parts: list[int], group: str, world: int) -> Tensor:
    if sum(parts) != x.shape[dim]:
        raise RuntimeError(f"dacc.shard: parts {parts} do not add up to dim {dim} of size {x.shape[dim]}")
    rank = dist.get_rank(process_group(group, world)) if world > 1 else 0
    local = _local_parts(parts, world, "dacc.shard")
    pieces = x.split(parts, dim)
    return torch.cat([p.narrow(dim, rank * n, n) for p, n in zip(pieces, local)], dim).contiguous()


@shard.register_fake
def _(x, dim, parts, group, world):
    shape = list(x.shape)
    for p in parts:
        torch._check(p % world == 0, lambda: f"dacc.shard: a part does not split into {world} equal shares")
    shape[dim] = sum(p // world for p in parts)
    return x.new_empty(shape)


@torch.library.custom_op("dacc::gather", mutates_args=())
def gather(x: Tensor, dim: int, parts: list[int], group: str, world: int) -> Tensor:
    local = _local_parts(parts, world, "dacc.gather")
    if sum(local) != x.shape[dim]:
        raise RuntimeError(f"dacc.gather: local parts {local} do not add up to dim {dim} of size {x.shape[dim]}")
    if world == 1:
        return x.clone()
    g = process_group(group, world)
    moved = x.movedim(dim, 0).contiguous()
    every = _transfer("gather", group, torch.ops._c10d_functional.all_gather_into_tensor, moved, world, g.group_name)
    ranks = every.chunk(world, 0)  # rank r's local tensor: its chunk of each part, end to end
    per_rank = [r.split(local, 0) for r in ranks]
    ordered = [per_rank[r][k] for k in range(len(parts)) for r in range(world)]
    return torch.cat(ordered, 0).movedim(0, dim).contiguous()


@gather.register_fake
def _(x, dim, parts, group, world):
    shape = list(x.shape)
    shape[dim] = sum(parts)
    return x.new_empty(shape)


@torch.library.custom_op("dacc::all_to_all", mutates_args=())
def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: str, world: int) -> Tensor:
    if x.shape[scatter_dim] % world:
        raise RuntimeError(f"dacc.all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} does not split "
                           f"into {world} equal shares")
    if world == 1:
        return x.clone()
    g = process_group(group, world)
    moved = x.movedim(scatter_dim, 0).contiguous()
    split = [moved.shape[0] // world] * world
    got = _transfer("all_to_all", group, torch.ops._c10d_functional.all_to_all_single, moved, split, split,
                    g.group_name)
    pieces = [p.movedim(0, scatter_dim) for p in got.chunk(world, 0)]  # from rank 0, 1, ...
    return torch.cat(pieces, gather_dim).contiguous()


@all_to_all.register_fake
def _(x, scatter_dim, gather_dim, group, world):
    torch._check(x.shape[scatter_dim] % world == 0, lambda: "dacc.all_to_all: dim does not split evenly")
    shape = list(x.shape)
    shape[scatter_dim] = x.shape[scatter_dim] // world
    shape[gather_dim] = x.shape[gather_dim] * world
    return x.new_empty(shape)
