"""One call's segments op by op (or package by package): the step executor the runtime uses
unless CUDA graphs replay the step (dacc/runtime/graph_step.py).

An executor runs the pieces of a step that `CompiledTransformer._execute` walks through: the
segments up to a gate and its probe (`probe`), the gated range computed (`compute`) or skipped
(`skip`), and the segments after the last gate (`finish`). The walk itself (decisions, counters,
calibration records) is the module's; both executors give it the same values.
"""
from __future__ import annotations

from typing import Any

import torch

from dacc.runtime.cache import Action, Computed, GateState, measure, skipped_outputs
from dacc.runtime.program import ProgramRunner
from dacc.schema.manifest import CacheGate


class EagerStep:
    def __init__(self, runner: ProgramRunner, flat: list[Any]):
        self.runner = runner
        self.env: dict[str, Any] = dict(zip(runner.placeholder_names, flat))

    def run(self, lo: int, hi: int) -> None:
        specs, env = self.runner.spec.segments, self.env
        for i in range(lo, hi):
            outs = self.runner.run_segment(i, [env[name] for name in specs[i].inputs])
            env.update(zip(specs[i].outputs, outs))

    def probe(self, g: int, gate: CacheGate, state: GateState,
              lo: int) -> tuple[list[torch.Tensor] | None, float | None]:
        """Runs segments lo .. the gated range; the gate's probe value and measured change."""
        self.run(lo, gate.skip_first)
        return measure(gate, state, self.env)

    def compute(self, g: int, gate: CacheGate, state: GateState, step: int) -> Computed:
        inputs = [self.env[i] for i in gate.stream_in]
        self.run(gate.skip_first, gate.skip_last + 1)
        return Computed(step, inputs, [self.env[o] for o in gate.stream_out])

    def skip(self, g: int, gate: CacheGate, state: GateState, step: int, action: Action) -> None:
        outs = skipped_outputs(gate, state, step, action, [self.env[i] for i in gate.stream_in])
        self.env.update(zip(gate.stream_out, outs))

    def finish(self, lo: int) -> list[Any]:
        self.run(lo, len(self.runner.spec.segments))
        return [self.env[name] if isinstance(name, str) else name for name in self.runner.output_values]
