"""Counting denoising steps the way a pipeline produces them.

A generation is `num_inference_steps` calls. A call whose timestep is higher than the previous
one starts a new generation (samplers walk the timesteps downwards); a call with the same
timestep as the previous one is another call of the same step (e.g. a second CFG branch in one
context). A call with other input sizes than the generation's starts a new one: what was cached
for the old sizes cannot serve the new. Each `cache_context(name)` keeps its own count.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCounter:
    num_inference_steps: int
    step: int = -1  # index of the current step within the generation
    generation: int = 0
    last_t: float | None = None
    calls: int = 0
    total_steps: int = 0
    fresh: bool = False  # this call started a new generation
    shapes: tuple | None = None  # the program and input sizes of the current generation

    def advance(self, t: float | None, shapes: tuple | None = None) -> int:
        self.calls += 1
        self.fresh = False
        reshaped = shapes != self.shapes
        self.shapes = shapes
        if not reshaped and t is not None and self.last_t is not None and t == self.last_t and self.step >= 0:
            return self.step
        new_generation = reshaped or self.step < 0 or self.step + 1 >= self.num_inference_steps or (
            t is not None and self.last_t is not None and t > self.last_t)
        if new_generation:
            self.generation += self.step >= 0
            self.step = 0
            self.fresh = True
        else:
            self.step += 1
        self.total_steps += 1
        self.last_t = t
        return self.step


@dataclass
class SegmentStats:
    calls: int = 0
    segments_computed: int = 0
    segments_reused: int = 0
    flops_total: float = 0.0  # what eager would have spent
    flops_computed: float = 0.0
    graphs_captured: int = 0  # pieces of a step captured as CUDA graphs (dacc/runtime/graph_step.py)
    graphs_replayed: int = 0

    def as_dict(self, counters: dict[str, StepCounter]) -> dict:
        return {
            "calls": self.calls,
            "steps": sum(c.total_steps for c in counters.values()),
            "generations": sum(c.generation + (c.step >= 0) for c in counters.values()),
            "contexts": sorted(counters),
            "segments_computed": self.segments_computed,
            "segments_reused": self.segments_reused,
            "flops_total": self.flops_total,
            "flops_computed": self.flops_computed,
            "flops_saved": self.flops_total - self.flops_computed,
            "graphs_captured": self.graphs_captured,
            "graphs_replayed": self.graphs_replayed,
        }
