"""A step as CUDA graphs (`dacc.load(..., cuda_graphs=True)`, weights on a CUDA device).

Where a step is launch-bound (small models, small batches), what costs is the host issuing
kernels one by one. Here each piece of the step is captured once per cache context and input
shape and then replayed, one graph launch per piece:
- before each gate: the segments up to its gated range, and the probe's change statistics;
- the gated range computed, which also stores its residual (the older residuals shift one slot);
- the gated range skipped: each stream's input plus the weighted stored residuals, one fused
  pass per stream (dacc/kernels/add_weighted.py), weights read from a device tensor;
- after the last gate: the remaining segments.
The gate's decision picks which of the two gated pieces replays. Between pieces the host reads
the probe statistic where a gate decides by it: the one sync such a gate needs in any case.

Replays read and write fixed addresses, so the executor keeps them fixed: the call's tensors are
copied into static inputs, the outputs are copied out (a pipeline may hold one call's output
across the next call), a skip writes into the tensors the computed range returned when captured,
so the pieces after a gate read the same memory whichever path ran, and the probe value a gate
keeps is copied into the buffer the next step's probe reads.

The runtime takes this path only for weights on a CUDA device, outside calibration, and without
parallel degrees (collectives inside captured graphs are not supported yet); on the CPU there is
no launch to save and the path is never taken. A piece that cannot be captured (an op that
synchronises with the host) runs op by op from then on, copying into its fixed outputs, with a
warning.
"""
from __future__ import annotations

import warnings
from collections import ChainMap
from typing import Any, Callable

import torch

from dacc.kernels import add_weighted
from dacc.runtime.cache import Action, Computed, GateState, change_ratio, probe_change, skip_weights
from dacc.runtime.program import ProgramRunner
from dacc.runtime.steps import SegmentStats
from dacc.schema.manifest import CacheGate

Piece = Callable[[], list[torch.Tensor]]  # a piece of the step: reads fixed tensors, returns its outputs
Replay = Callable[[], None]
Capture = Callable[[Piece, Any], tuple[Replay, list[torch.Tensor]]]  # (piece, memory pool) -> (replay, outputs)


def cuda_capture(piece: Piece, pool: Any) -> tuple[Replay, list[torch.Tensor]]:
    """The piece as a CUDA graph. It runs once uncaptured on a side stream first, so lazy work
    (Triton builds, cuBLAS workspaces, buffers a piece allocates on first use) is done outside
    the capture. The capture records without running: the caller replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        piece()
    torch.cuda.synchronize()  # a package's completion event must be done before the capture queries it
    graph = torch.cuda.CUDAGraph()
    # relaxed: a package's runtime queries its own completion events between runs, which the
    # default mode forbids during any capture; work that truly syncs with the host still fails
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="relaxed"):
        outputs = piece()
    return graph.replay, outputs


def eager_capture(piece: Piece, pool: Any = None) -> tuple[Replay, list[torch.Tensor]]:
    """A piece replayed op by op into its first outputs' memory: the same fixed-address contract
    as a graph, for a piece a graph cannot hold."""
    outputs = piece()

    def replay() -> None:
        for out, new in zip(outputs, piece()):
            if new is not out:
                out.copy_(new)
    return replay, outputs


class GateBuffers:
    """What one gate keeps in fixed memory: the probe value the next probe compares with, the
    newest `slots` residuals per stream (slot 0 newest), and the weights a skip applies."""

    def __init__(self, slots: int):
        self.slots = slots
        self.prev: torch.Tensor | None = None
        self.residuals: list[list[torch.Tensor]] | None = None  # [slot][stream]
        self.weights: torch.Tensor | None = None
        self.probe: list[torch.Tensor] | None = None  # this step's probe value, as the gate sees it


class GraphStep:
    """One program's step at one input shape in one cache context, as replayed pieces."""

    def __init__(self, runner: ProgramRunner, flat: list[Any], capture: Capture, pool: Any, source: str):
        self.runner, self.capture, self.pool, self.source = runner, capture, pool, source
        self.inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in flat]
        self.env: dict[str, Any] = dict(zip(runner.placeholder_names, self.inputs))
        self.buffers = [GateBuffers(max(g.taylor_order, 0) + 1) for g in runner.spec.gates]
        self.pieces: dict[tuple, Replay] = {}
        self.stats = SegmentStats()
        # captures run the packages on instances of their own (lowered.LoadedPackage.fresh); a piece
        # run op by op (eager_capture's replays, a fallback) uses the runner's
        self.packages = runner.fresh_packages() if runner.lowered_segments else None
        self._capturing = False

    def bind(self, flat: list[Any], stats: SegmentStats) -> GraphStep:
        """This call's inputs, copied into the static ones; `stats` counts captures and replays."""
        self.stats = stats
        for static, given in zip(self.inputs, flat):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        return self

    # -- the executor's pieces (the interface of dacc/runtime/eager_step.py) --------------------
    def probe(self, g: int, gate: CacheGate, state: GateState,
              lo: int) -> tuple[list[torch.Tensor] | None, float | None]:
        if gate.probe == "none":
            if lo < gate.skip_first:  # adjacent ranges leave nothing before the next: no (empty) graph
                self._replay(("head", g), lambda: self._segments(lo, gate.skip_first))
            return None, None
        self._replay(("head", g), lambda: self._head(g, gate, lo))
        buf = self.buffers[g]
        buf.probe = [self.env[f"#probe{g}"]]
        # the probe compared with zeros on a generation's first step: nothing to compare with
        return buf.probe, (change_ratio(self.env[f"#stats{g}"]) if state.prev_probe is not None else None)

    def compute(self, g: int, gate: CacheGate, state: GateState, step: int) -> Computed:
        self._keep_probe(g, state)
        if ("compute", g) not in self.pieces and state.history:
            raise RuntimeError("internal: a gated range captured after its first computed step would shift "
                               "stored residuals twice")
        self._replay(("compute", g), lambda: self._compute(g, gate))
        return Computed(step, [], [])  # its residual is in the gate's slot 0

    def skip(self, g: int, gate: CacheGate, state: GateState, step: int, action: Action) -> None:
        self._keep_probe(g, state)
        buf = self.buffers[g]
        if buf.residuals is None:
            raise RuntimeError("internal: a skip before the gated range was ever computed at this shape")
        points, weights = skip_weights(gate, state, step, action)
        by_slot = [0.0] * buf.slots  # the newest point is slot 0
        for k, w in enumerate(weights):
            by_slot[len(points) - 1 - k] = w
        host = torch.tensor(by_slot, dtype=torch.float32)
        buf.weights.copy_(host.pin_memory() if buf.weights.is_cuda else host, non_blocking=True)
        self._replay(("skip", g), lambda: self._skip(g, gate))

    def finish(self, lo: int) -> list[Any]:
        if lo < len(self.runner.spec.segments):
            self._replay(("tail",), lambda: self._segments(lo, len(self.runner.spec.segments)))
        outputs = [self.env[n] if isinstance(n, str) else n for n in self.runner.output_values]
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]

    # -- pieces ------------------------------------------------------------------------------
    def _replay(self, key: tuple, make: Callable[[], tuple[list[str], Piece]]) -> None:
        replay = self.pieces.get(key)
        if replay is None:
            names, piece = make()
            self._capturing = True
            try:
                replay, outputs = self.capture(piece, self.pool)
            except Exception as exc:  # whatever the capture refused: this piece runs op by op
                self._capturing = False
                warnings.warn(f"{self.source}: part of the step ({key[0]}) could not be captured as a CUDA graph "
                              f"({str(exc).splitlines()[0][:200]}); it runs op by op", stacklevel=4)
                replay, outputs = eager_capture(piece)
            self._capturing = False
            self.env.update(zip(names, outputs))
            self.pieces[key] = replay
            self.stats.graphs_captured += 1
        replay()
        self.stats.graphs_replayed += 1

    def _segments(self, lo: int, hi: int, after: Callable[[ChainMap], list[torch.Tensor]] | None = None,
                  extra: list[str] = ()) -> tuple[list[str], Piece]:
        runner, env = self.runner, self.env
        specs = runner.spec.segments
        names = [o for i in range(lo, hi) for o in specs[i].outputs]

        def piece() -> list[torch.Tensor]:
            local = ChainMap({}, env)
            packages = self.packages if self._capturing else None
            for i in range(lo, hi):
                outs = runner.run_segment(i, [local[n] for n in specs[i].inputs], packages)
                local.maps[0].update(zip(specs[i].outputs, outs))
            return [local[n] for n in names] + (after(local) if after is not None else [])
        return names + list(extra), piece

    def _head(self, g: int, gate: CacheGate, lo: int) -> tuple[list[str], Piece]:
        buf = self.buffers[g]

        def statistics(local: ChainMap) -> list[torch.Tensor]:
            if buf.prev is None:  # allocated by the first (uncaptured) run: the capture reads it
                buf.prev = torch.zeros_like(probe_change(gate, local, None)[0])
            return list(probe_change(gate, local, buf.prev))
        return self._segments(lo, gate.skip_first, statistics, [f"#probe{g}", f"#stats{g}"])

    def _compute(self, g: int, gate: CacheGate) -> tuple[list[str], Piece]:
        buf, env = self.buffers[g], self.env

        def store(local: ChainMap) -> list[torch.Tensor]:
            if buf.residuals is None:
                buf.residuals = [[torch.zeros_like(local[o]) for o in gate.stream_out] for _ in range(buf.slots)]
                buf.weights = torch.zeros(buf.slots, dtype=torch.float32, device=local[gate.stream_out[0]].device)
            for s, (i, o) in enumerate(zip(gate.stream_in, gate.stream_out)):
                for k in range(buf.slots - 1, 0, -1):
                    buf.residuals[k][s].copy_(buf.residuals[k - 1][s])
                torch.sub(local[o], env[i], out=buf.residuals[0][s])
            return []
        return self._segments(gate.skip_first, gate.skip_last + 1, store)

    def _skip(self, g: int, gate: CacheGate) -> tuple[list[str], Piece]:
        buf, env = self.buffers[g], self.env

        def piece() -> list[torch.Tensor]:
            for s, (i, o) in enumerate(zip(gate.stream_in, gate.stream_out)):
                add_weighted(env[i], [buf.residuals[k][s] for k in range(buf.slots)], buf.weights, out=env[o])
            return []
        return [], piece

    def _keep_probe(self, g: int, state: GateState) -> None:
        """The gate kept this step's probe (decide() made it the one to compare with): copy it
        where the next probe reads, before the next head replay overwrites it."""
        buf = self.buffers[g]
        if buf.probe is not None and state.prev_probe is buf.probe:
            buf.prev.copy_(buf.probe[0])
            state.prev_probe = [buf.prev]
