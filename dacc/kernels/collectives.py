"""Communication as dacc operators: what the partition passes insert into the graph.

A compiled program is the same on every rank, so the ops name their process group by its role in
the plan ("cfg", "ulysses"), not by torch's run-time group name: `dacc.load()` builds the device
mesh and binds each role to its group (`bind_groups`). Each op also records the group's size it
was compiled for; its fake implementation computes the local shapes from it, symbolic sizes
included, so the partitioned program keeps exact shapes and saves and loads like any other.

The bodies call torch's functional collectives (`torch.ops._c10d_functional.*`), so a
`TorchDispatchMode` sees every transfer, on gloo (CPU) as on NCCL.

Token counts need not divide the group: every part of a sharded dim is padded at its end to a
multiple of `world` rows (zeros), so each rank holds `ceil(part / world)` rows of each part, a size
the same on every rank and an expression of the full one. The pad rows are computed like any other
and never reach a real row: attention leaves them out of its keys (the exchanges below drop them,
ring attention skips them), every other op in a block is row-wise, and the exit gather drops them.

- `shard(x, dim, parts, group, world)`: this rank's share of `x` along `dim`. The dim is made of
  `parts` laid end to end (Flux's rotary table: text rows, then image rows); each part is padded
  and split into `world` chunks, and the rank keeps chunk `rank` of every part. Local, no transfer.
- `gather(x, dim, parts, group, world)`: the inverse; `parts` are the full sizes. One all-gather.
- `seq_to_heads(x, head_dim, token_dim, parts, group, world)`: Ulysses' exchange in. Heads are
  padded to a multiple of `world` with zero heads and split; each rank receives every rank's
  tokens for its heads. With `parts` (the full token counts) the tokens come out in their
  original order, pad rows dropped; with `parts=[]` (USP: the group holds only some of the token
  chunks) they stay as they arrive, rank after rank, pads included, for ring attention to skip.
- `heads_to_seq(x, head_dim, token_dim, parts, heads, group, world)`: the way back, to `heads`
  heads (the zero heads dropped) and this rank's padded token chunks.
- `zero_padding(x, dim, parts, group, world)`: `x` with this rank's pad rows zeroed, so a cache
  probe's statistics over the shard are those of its real rows.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import Tensor

from dacc.schema.errors import DaccError

_GROUPS: dict[str, "dist.ProcessGroup"] = {}
_FAILED = threading.local()


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
    raised on every rank still alive. Kept for `take_transfer_failure` too: a compiled package that
    called the op hands its caller a RuntimeError wrapping the text."""
    error = DaccError(f"dacc.{what} over the '{role}' group failed: {str(exc).splitlines()[0][:300]}",
                      f"rank {dist.get_rank()}", "another rank has probably died or stalled; its own output "
                      "names the cause (restart all ranks together)")
    _FAILED.error = error
    return error


def take_transfer_failure() -> DaccError | None:
    """The last transfer failure on this thread, once (the runtime re-raises it in place of the
    RuntimeError a package turned it into)."""
    error = getattr(_FAILED, "error", None)
    _FAILED.error = None
    return error


def _transfer(what: str, role: str, start, *args) -> Tensor:
    """Run one functional collective and wait for it."""
    try:
        return torch.ops._c10d_functional.wait_tensor(start(*args))
    except RuntimeError as exc:
        raise transfer_failed(what, role, exc) from None


def chunk(part, world: int):
    """Rows of a part of `part` rows that each of `world` ranks holds (the last ones padded)."""
    return (part + world - 1) // world


def valid_rows(part: int, world: int, index: int) -> int:
    """Real (unpadded) rows in chunk `index` of a part split over `world` ranks."""
    c = chunk(part, world)
    return max(0, min(c, part - index * c))


def _padded(x: Tensor, dim: int, rows: int) -> Tensor:
    """`x` with zero rows appended along `dim` up to `rows`."""
    missing = rows - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim)


def _rank_major(x: Tensor, dim: int, parts: list[int], world: int) -> Tensor:
    """Full (unpadded) parts along `dim` -> every rank's padded chunks, rank after rank."""
    pieces = [_padded(p, dim, chunk(n, world) * world).chunk(world, dim) for p, n in zip(x.split(parts, dim), parts)]
    return torch.cat([pieces[k][r] for r in range(world) for k in range(len(parts))], dim)


def _original_order(x: Tensor, dim: int, parts: list[int], world: int) -> Tensor:
    """The inverse of `_rank_major`: the parts in their order, pad rows dropped."""
    local = [chunk(n, world) for n in parts]
    per_rank = [r.split(local, dim) for r in x.chunk(world, dim)]
    return torch.cat([torch.cat([per_rank[r][k] for r in range(world)], dim).narrow(dim, 0, n)
                      for k, n in enumerate(parts)], dim)


def _exchange(x: Tensor, scatter_dim: int, gather_dim: int, group: str, world: int, what: str) -> Tensor:
    """Chunk j of `scatter_dim` goes to rank j; what arrives is laid end to end along `gather_dim`
    in rank order. One all-to-all."""
    g = process_group(group, world)
    moved = x.movedim(scatter_dim, 0).contiguous()
    split = [moved.shape[0] // world] * world
    got = _transfer(what, group, torch.ops._c10d_functional.all_to_all_single, moved, split, split, g.group_name)
    return torch.cat([p.movedim(0, scatter_dim) for p in got.chunk(world, 0)], gather_dim)


def _my_rank(group: str, world: int) -> int:
    return dist.get_rank(process_group(group, world)) if world > 1 else 0


@torch.library.custom_op("dacc::shard", mutates_args=())
def shard(x: Tensor, dim: int, parts: list[int], group: str, world: int) -> Tensor:
    if sum(parts) != x.shape[dim]:
        raise RuntimeError(f"dacc.shard: parts {parts} do not add up to dim {dim} of size {x.shape[dim]}")
    rank = _my_rank(group, world)
    pieces = []
    for p, n in zip(x.split(parts, dim), parts):
        c = chunk(n, world)
        pieces.append(_padded(p.narrow(dim, min(rank * c, n), valid_rows(n, world, rank)), dim, c))
    return torch.cat(pieces, dim).contiguous()


@shard.register_fake
def _(x, dim, parts, group, world):
    shape = list(x.shape)
    shape[dim] = sum(chunk(p, world) for p in parts)
    return x.new_empty(shape)


@torch.library.custom_op("dacc::gather", mutates_args=())
def gather(x: Tensor, dim: int, parts: list[int], group: str, world: int) -> Tensor:
    local = sum(chunk(p, world) for p in parts)
    if local != x.shape[dim]:
        raise RuntimeError(f"dacc.gather: dim {dim} has {x.shape[dim]} rows; parts {parts} over {world} ranks "
                           f"leave {local} on each")
    if world == 1:
        return x.clone()
    g = process_group(group, world)
    moved = x.movedim(dim, 0).contiguous()
    every = _transfer("gather", group, torch.ops._c10d_functional.all_gather_into_tensor, moved, world, g.group_name)
    return _original_order(every, 0, parts, world).movedim(0, dim).contiguous()


@gather.register_fake
def _(x, dim, parts, group, world):
    shape = list(x.shape)
    shape[dim] = sum(parts)
    return x.new_empty(shape)


@torch.library.custom_op("dacc::seq_to_heads", mutates_args=())
def seq_to_heads(x: Tensor, head_dim: int, token_dim: int, parts: list[int], group: str, world: int) -> Tensor:
    local = sum(chunk(p, world) for p in parts)
    if parts and local != x.shape[token_dim]:
        raise RuntimeError(f"dacc.seq_to_heads: {x.shape[token_dim]} tokens on this rank; parts {parts} over "
                           f"{world} ranks leave {local}")
    x = _padded(x, head_dim, chunk(x.shape[head_dim], world) * world)
    got = _exchange(x, head_dim, token_dim, group, world, "seq_to_heads") if world > 1 else x
    return (_original_order(got, token_dim, parts, world) if parts else got).contiguous()


@seq_to_heads.register_fake
def _(x, head_dim, token_dim, parts, group, world):
    shape = list(x.shape)
    shape[head_dim] = chunk(x.shape[head_dim], world)
    shape[token_dim] = sum(parts) if parts else x.shape[token_dim] * world
    return x.new_empty(shape)


@torch.library.custom_op("dacc::heads_to_seq", mutates_args=())
def heads_to_seq(x: Tensor, head_dim: int, token_dim: int, parts: list[int], heads: int, group: str,
                 world: int) -> Tensor:
    if x.shape[head_dim] != chunk(heads, world):
        raise RuntimeError(f"dacc.heads_to_seq: {x.shape[head_dim]} heads on this rank; {heads} over {world} "
                           f"ranks leave {chunk(heads, world)}")
    x = _rank_major(x, token_dim, parts, world) if parts else x
    got = _exchange(x, token_dim, head_dim, group, world, "heads_to_seq") if world > 1 else x
    return got.narrow(head_dim, 0, heads).contiguous()


@heads_to_seq.register_fake
def _(x, head_dim, token_dim, parts, heads, group, world):
    shape = list(x.shape)
    shape[head_dim] = heads
    shape[token_dim] = sum(chunk(p, world) for p in parts) if parts else x.shape[token_dim] // world
    return x.new_empty(shape)


@torch.library.custom_op("dacc::zero_padding", mutates_args=())
def zero_padding(x: Tensor, dim: int, parts: list[int], group: str, world: int) -> Tensor:
    rank = _my_rank(group, world)
    pieces = []
    for p, n in zip(x.split([chunk(n, world) for n in parts], dim), parts):
        real = valid_rows(n, world, rank)
        pieces.append(_padded(p.narrow(dim, 0, real), dim, p.shape[dim]))
    return torch.cat(pieces, dim).contiguous()


@zero_padding.register_fake
def _(x, dim, parts, group, world):
    return torch.empty_like(x)
