"""dacc's sequence-parallel operators on real gloo processes, at sizes no group divides: sharding,
the Ulysses exchanges and ring attention give attention over exactly the real tokens, and the
gather returns the single-process tensor."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dacc  # noqa: F401  (registers the operators)
from dacc.kernels.collectives import bind_groups
from dacc.runtime.launch import run_local
from tests.conftest import rel_err

PARTS = [5, 7]  # text then image tokens: neither splits over 2 ranks
HEADS = 3  # nor does the head count


def _full(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, HEADS, sum(PARTS), 8, generator=g) for _ in range(3)]


def _rank(rank: int, world: int, out: str) -> None:
    group = dist.new_group(list(range(world)))
    bind_groups({"ulysses": group, "ring": group})
    ops = torch.ops.dacc
    q, k, v = _full(5)
    local = [ops.shard(t, 2, PARTS, "ulysses", world) for t in (q, k, v)]
    heads = [ops.seq_to_heads(t, 1, 2, PARTS, "ulysses", world) for t in local]
    ulysses = ops.heads_to_seq(F.scaled_dot_product_attention(*heads), 1, 2, PARTS, HEADS, "ulysses", world)
    ring = ops.ring_attention(*local, 8 ** -0.5, "ring", world, PARTS, 1)
    probe = ops.zero_padding(local[0] + 1, 2, PARTS, "ulysses", world)  # pad rows of the shard become 1 here
    result = {"heads_shape": list(heads[0].shape), "local_shape": list(local[0].shape),
              "probe_sum": float(probe.abs().sum())}
    torch.save({"ulysses": ops.gather(ulysses, 2, PARTS, "ulysses", world),
                "ring": ops.gather(ring, 2, PARTS, "ring", world)}, f"{out}/{rank}.pt")
    Path(f"{out}/{rank}.json").write_text(json.dumps(result))


def test_uneven_tokens_and_heads_attend_over_exactly_the_real_tokens(tmp_path):
    world = 2
    run_local(_rank, world, str(tmp_path))
    q, k, v = _full(5)
    want = F.scaled_dot_product_attention(q, k, v)
    probes = 0.0
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        meta = json.loads((tmp_path / f"{rank}.json").read_text())
        assert meta["local_shape"] == [2, HEADS, 3 + 4, 8]  # ceil(5/2) + ceil(7/2) rows on every rank
        assert meta["heads_shape"] == [2, 2, sum(PARTS), 8]  # two of four (padded) heads, every real token
        for name in ("ulysses", "ring"):
            assert got[name].shape == want.shape and rel_err(got[name], want) <= 1e-5, (name, rank)
        probes += meta["probe_sum"]
    assert abs(probes - float((q + 1).abs().sum())) <= 1e-3 * probes  # only the real rows count
