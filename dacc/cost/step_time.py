"""Predicted time of one computed step on a device: the manifest's per-segment expressions
(FLOPs, bytes sent, collective messages, weight and traffic bytes, op count) evaluated at given
sizes and divided by a device profile's rates (devices.py).

Per segment, on one rank:
- device time, as op-by-op execution spends it: the matmuls and attention take the larger of
  their FLOPs over the matmul rate and their weights over the memory bandwidth; every other op
  (elementwise, norms, rotary, copies) takes the bytes it writes and reads over the bandwidth;
- dispatch: ops x per-op overhead; overlapped with device time on a GPU (the larger of the two),
  added to it on a CPU;
- communication: the graph's collectives (bytes / link rate + messages x latency), not
  overlapped: the segment waits for each exchange;
- an fsdp unit's gather is started while the previous segment runs (the runtime prefetches it),
  so it costs only what it takes beyond that segment; the first one is not hidden.
A step where the cache gate skips blocks costs the segments that still run; this is the full step.
"""
from __future__ import annotations

from dataclasses import dataclass

from dacc.cost.devices import DeviceProfile
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.manifest import Manifest, ProgramSpec, unit_gather_bytes


@dataclass
class SegmentTime:
    segment: str
    compute: float  # FLOPs / matmul rate
    weights: float  # weight bytes / memory bandwidth
    traffic: float  # bytes the ops without FLOPs move / memory bandwidth
    dispatch: float
    comm: float
    gather: float  # the fsdp gathers issued for this segment
    total: float  # what the step spends on this segment, once
    runs: float = 1  # how many times the step runs it (a stand-in for several identical blocks)


def step_time(m: Manifest, prog: ProgramSpec, env: dict[str, int], device: DeviceProfile,
              runs: dict[str, float] | None = None) -> list[SegmentTime]:
    """One row per segment; `runs` says how many times a segment stands for (default 1): a model
    traced with two blocks of a list predicts one with nineteen (bench/predict_flux_dev.py)."""
    gathers = unit_gather_bytes(m.fsdp.units, m.fsdp.degree) if m.fsdp is not None else {}
    rows: list[SegmentTime] = []
    for seg in prog.segments:
        def ev(tree, what: str) -> float:
            return float(evaluate(tree, env, f"{what} of {seg.name}", NUMBER))
        flops, sent = ev(seg.flops_tree, "FLOPs"), ev(seg.sent_bytes_tree, "bytes sent")
        gathered = gathers.get(seg.name, 0.0)
        compute = flops / device.matmul_flops
        weights = seg.param_bytes / device.memory_bandwidth
        traffic = ev(seg.traffic_bytes_tree, "traffic") / device.memory_bandwidth
        dispatch = seg.num_nodes * device.op_overhead
        comm = (sent - gathered) / device.link_bandwidth + seg.messages * device.link_latency
        gather = gathered / device.link_bandwidth + (device.link_latency if gathered else 0.0)
        busy = max(compute, weights) + traffic
        busy = max(busy, dispatch) if device.async_dispatch else busy + dispatch
        rows.append(SegmentTime(seg.name, compute, weights, traffic, dispatch, comm, gather, busy + comm,
                                (runs or {}).get(seg.name, 1)))
    # each gather overlaps the segment before it (the prefetch); only the first waits in full
    for prev, row in zip(rows, rows[1:]):
        prev.total = max(prev.total, row.gather)
    if rows:
        rows[0].total += rows[0].gather
    return rows


def total_seconds(rows: list[SegmentTime]) -> float:
    return sum(r.total * r.runs for r in rows)
