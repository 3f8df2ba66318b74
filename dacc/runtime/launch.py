"""Run a function on N local processes joined by a gloo process group: what `torchrun
--nproc_per_node N` does, for the compiler's verification of a parallel artifact, `dacc demo
--nproc N` and the tests. `fn(rank, world, *args)` must be importable (a module-level function).
A rank that raises makes `run_local` raise, naming the rank; the others are stopped.
"""
from __future__ import annotations

import datetime
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from dacc.runtime.ranks import default_timeout
from dacc.schema.errors import DaccError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, args: tuple, timeout: datetime.timedelta | None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout or default_timeout())
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world: int, *args: Any, timeout: datetime.timedelta | None = None) -> None:
    """`timeout`: how long a collective waits (default: `default_timeout()`); a rank that exits
    stops the others at once whatever it is."""
    try:
        mp.spawn(_entry, args=(fn, world, _free_port(), args, timeout), nprocs=world, join=True)
    except mp.ProcessRaisedException as exc:
        text = str(exc).strip().splitlines()
        raise DaccError(f"a rank failed: {text[-1] if text else exc}", "run_local",
                        "see the traceback above it") from None
    except mp.ProcessExitedException as exc:
        raise DaccError(f"a rank exited: {exc}", "run_local", "see the output of the ranks above") from None
