"""Lowering a partitioned program (plan `parallel`) on its ranks.

Its segments exchange data between ranks, so their boundary values exist only on a running
world: the compiler starts `world_size` local processes (gloo), binds the plan's groups as
`dacc.load()` does, and runs `lower_program` on each. Rank 0 builds each package (every rank
runs the same program, so one package serves all of them) while the others wait; then every rank
checks it against the graph on its own values, and the worst error over the ranks decides.
Rank 0 writes the outcome for the compiler as JSON.
"""
from __future__ import annotations

import datetime
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from dacc.compiler.lowering import Package, ProgramLowering, lower_program
from dacc.runtime.launch import run_local
from dacc.schema.manifest import LoweredCall, ParallelSpec, ProgramSpec

PROGRAM, RESULT, LOG = "program.pt2", "lowering.json", "log.txt"
BUILD_WAIT = datetime.timedelta(hours=2)  # the other ranks wait while rank 0 builds a package


class _WorldRanks:
    def __init__(self) -> None:
        self.builds = dist.get_rank() == 0

    def share(self, why: str | None) -> str | None:
        box = [why]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def worst(self, error: float) -> float:
        t = torch.tensor([error], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())


def lower_on_ranks(ep: torch.export.ExportedProgram, spec: ProgramSpec, inputs, examples: list[dict[str, Any]],
                   device: str, parallel: ParallelSpec, log: Callable[[str], None]) -> ProgramLowering:
    log(f"lowering on {parallel.world_size} local processes ({parallel.describe()}): the segments exchange "
        "data between ranks")
    with tempfile.TemporaryDirectory(prefix="dacc-lower-") as tmp:
        torch.export.save(ep, str(Path(tmp) / PROGRAM))
        try:
            run_local(_lower_rank, parallel.world_size, tmp, spec, inputs, examples, device, parallel,
                      timeout=BUILD_WAIT)
        finally:
            for line in _read_lines(Path(tmp) / LOG):
                log(line)
        return _from_json(json.loads((Path(tmp) / RESULT).read_text()))


def _lower_rank(rank: int, world: int, tmp: str, spec: ProgramSpec, inputs, examples, device: str,
                parallel: ParallelSpec) -> None:
    from dacc.runtime.program import ProgramRunner
    from dacc.runtime.ranks import bind_mesh

    where = "program being lowered"
    bind_mesh(parallel, where)
    runner = ProgramRunner(torch.export.load(str(Path(tmp) / PROGRAM)), spec, where)
    lines: list[str] = []
    result = lower_program(runner, inputs, examples, device, lines.append, _WorldRanks())
    if rank == 0:
        (Path(tmp) / LOG).write_text("".join(f"{line}\n" for line in lines))
        (Path(tmp) / RESULT).write_text(json.dumps(_to_json(result)))


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def _to_json(low: ProgramLowering) -> dict:
    return {"device": low.device, "calls": {k: asdict(v) for k, v in low.calls.items()},
            "packages": {k: {**asdict(v), "path": str(v.path)} for k, v in low.packages.items()},
            "unlowered": low.unlowered}


def _from_json(data: dict) -> ProgramLowering:
    return ProgramLowering(data["device"], {k: LoweredCall(**v) for k, v in data["calls"].items()},
                           {k: Package(**{**v, "path": Path(v["path"])}) for k, v in data["packages"].items()},
                           data["unlowered"])
