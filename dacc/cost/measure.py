"""`dacc profile-device`: measure this machine's profile (devices.DeviceProfile) instead of
trusting a datasheet: matmul rate, memory bandwidth, per-op dispatch, and the link between two
local processes (gloo on CPU, NCCL on CUDA). Medians of repeated timings after a warm-up."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dacc.cost.devices import DeviceProfile

MATMUL_SIZE = 1024  # a square matmul about the size of a small model's linears
COPY_BYTES = 64 << 20
LINK_BYTES = 8 << 20


def _median_seconds(fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _link_rank(rank: int, world: int, device: str, out: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    big = torch.zeros(LINK_BYTES // 4, device=device)
    small = torch.zeros(world, device=device)

    def a2a(x: torch.Tensor) -> Callable[[], None]:
        return lambda: dist.all_to_all_single(torch.empty_like(x), x)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    latency = _median_seconds(a2a(small), 50, sync)
    seconds = _median_seconds(a2a(big), 10, sync)
    if rank == 0:  # what leaves a rank in an all-to-all: (P-1)/P of its input
        sent = LINK_BYTES * (world - 1) / world
        Path(out).write_text(json.dumps({"bandwidth": sent / max(seconds - latency, 1e-9), "latency": latency}))


def _link(device: str) -> tuple[float, float]:
    from dacc.runtime.launch import run_local

    if device == "cuda" and torch.cuda.device_count() < 2:
        return 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "link.json")
        run_local(_link_rank, 2, device, out)  # gloo between the processes; NCCL needs a launcher of its own
        found = json.loads(Path(out).read_text())
    return found["bandwidth"], found["latency"]


def measure_device(name: str, log: Callable[[str], None] = print) -> DeviceProfile:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    flops = 2 * MATMUL_SIZE**3 / _median_seconds(lambda: a @ a, 20, sync)
    log(f"matmul {MATMUL_SIZE}^3 {dtype}: {flops / 1e9:.1f} GFLOP/s")
    src = torch.empty(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * COPY_BYTES / _median_seconds(lambda: dst.copy_(src), 10, sync)
    log(f"copy: {bandwidth / 1e9:.1f} GB/s (read + write)")
    x = torch.zeros(8, device=device)
    overhead = _median_seconds(lambda: [x.add_(1) for _ in range(200)], 10, sync) / 200
    log(f"dispatch: {overhead * 1e6:.1f} us per op")
    link, latency = _link(device)
    log(f"link between two local processes: {link / 1e9:.2f} GB/s, {latency * 1e6:.0f} us per collective"
        if link else "link: one device, not measured (set link_bandwidth by hand)")
    memory = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return DeviceProfile(name, flops, bandwidth, float(memory), link or 1e9, latency, overhead,
                         async_dispatch=device == "cuda",
                         source=f"measured by dacc profile-device ({torch.get_num_threads()} threads, {device})")
