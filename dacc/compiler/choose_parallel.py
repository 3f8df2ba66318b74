"""Plan `parallel.auto`: choose the degrees from the cost model instead of asking for them.

Every split of the world size into fsdp x cfg x ulysses x ring (cfg at most 2) is partitioned
by the same passes a given plan would run, and its manifest's expressions are evaluated at the
requested sizes on the device profile: predicted step time (dacc/cost/step_time.py) and peak
memory per rank (dacc/cost/memory_map.py). A split the passes refuse (a block reducing over tokens,
no batched CFG) is invalid, with the passes' own reason; one whose peak exceeds the device's
memory does not fit. The fastest that fits is chosen (per call, or per call served under the
throughput objective, where the fsdp ranks' own calls count); ties go to the fewer bytes sent.
All candidates and their verdicts go into the manifest, for `dacc inspect` to show.
"""
from __future__ import annotations

from typing import Callable

from dacc.cost.devices import DeviceProfile, load_profile
from dacc.cost.memory_map import memory_map
from dacc.cost.sizes import sizes_at
from dacc.cost.step_time import step_time, total_seconds
from dacc.schema.errors import DaccError
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.manifest import Manifest, ParallelCandidate, ParallelChoice, ParallelSpec
from dacc.schema.plan import Plan, parse_plan

def splits(world: int) -> list[dict[str, int]]:
    """Every (fsdp, cfg, ulysses, ring) whose product is `world`, cfg in {1, 2}."""
    out = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for cfg in (1, 2):
        for fsdp in divisors:
            for ulysses in divisors:
                rest, r = divmod(world, cfg * fsdp * ulysses)
                if r == 0 and rest >= 1:
                    out.append({"fsdp": fsdp, "cfg": cfg, "ulysses": ulysses, "ring": rest})
    return out


def _with_degrees(plan: Plan, degrees: dict[str, int]) -> Plan:
    data = plan.model_dump(mode="json")
    data["parallel"] = dict(degrees)
    return parse_plan(data, "parallel.auto")


def measure(m: Manifest, env: dict[str, int], device: DeviceProfile,
            runs: dict[str, float] | None = None) -> tuple[float, float, float]:
    """(predicted step seconds, peak bytes, bytes sent) of one rank, program 0."""
    prog = m.programs[0]
    seconds = total_seconds(step_time(m, prog, env, device, runs))
    peak = max(r.total for r in memory_map(m, prog, env, runs))
    sent = sum(float(evaluate(s.sent_bytes_tree, env, s.name, NUMBER)) * (runs or {}).get(s.name, 1)
               for s in prog.segments)
    return seconds, peak, sent


def choose_parallel(plan: Plan, partition: Callable[[Plan], Manifest], log: Callable[[str], None],
                    where: str, runs: dict[str, float] | None = None) -> tuple[Plan, ParallelChoice]:
    """`partition(plan)`: the manifest the compile would build for that plan, without lowering
    it or writing anything; `runs` as in step_time. Returns the plan with the chosen degrees,
    and the record."""
    auto = plan.parallel.auto
    device = load_profile(auto.device)
    candidates, plans = [], []
    options = splits(auto.world_size)
    env = None
    for k, degrees in enumerate(options, 1):
        label = ParallelSpec(**degrees).describe()
        try:
            cand = _with_degrees(plan, degrees)
            m = partition(cand)
        except DaccError as exc:  # the passes refuse this split
            candidates.append(ParallelCandidate(**degrees, verdict="invalid", why=exc.what.splitlines()[0]))
            plans.append(None)
            log(f"parallel.auto [{k}/{len(options)}] {label}: invalid ({exc.what.splitlines()[0]})")
            continue
        if env is None:  # the same sizes for every split; wrong ones are the plan's error, not a split's
            env = sizes_at(m.programs[0], auto.at, where, "parallel.auto.at")
        seconds, peak, sent = measure(m, env, device, runs)
        fits = peak <= device.memory_bytes
        candidates.append(ParallelCandidate(**degrees, verdict="slower" if fits else "over memory",
                                            why="" if fits else f"needs {peak / 2**30:.1f} GiB of "
                                            f"{device.memory_bytes / 2**30:.0f} GiB",
                                            step_seconds=seconds, peak_bytes=peak, sent_bytes=sent))
        plans.append(cand)
        log(f"parallel.auto [{k}/{len(options)}] {label}: {seconds * 1e3:.3g} ms/step, peak "
            f"{peak / 2**20:.4g} MiB, sends {sent / 2**20:.3g} MiB")
    fitting = [i for i, c in enumerate(candidates) if c.verdict == "slower"]
    if not fitting:
        raise DaccError(_nothing_fits(candidates, auto.world_size, device), where,
                        "raise parallel.auto.world_size, quantize the weights (quantize.mode), or give the "
                        "degrees yourself")
    def cost(c: ParallelCandidate) -> float:
        return c.step_seconds / (c.fsdp if auto.objective == "throughput" else 1)
    best = min(fitting, key=lambda i: (cost(candidates[i]), candidates[i].sent_bytes))
    for i in fitting:
        c = candidates[i]
        c.why = (f"fastest that fits on {device.name} ({auto.objective})" if i == best else
                 f"{cost(c) / cost(candidates[best]):.2f}x the chosen {auto.objective} cost")
    candidates[best].verdict = "chosen"
    chosen = candidates[best]
    log(f"parallel.auto chose {_degrees(chosen)}: {chosen.step_seconds * 1e3:.3g} ms/step predicted on {device.name}")
    return plans[best], ParallelChoice(auto.world_size, device.name, dict(env or {}), candidates)


def _nothing_fits(candidates: list[ParallelCandidate], world: int, device: DeviceProfile) -> str:
    sized = [c for c in candidates if c.verdict == "over memory"]
    if not sized:
        return (f"parallel.auto: no split of {world} ranks is valid for this model: "
                + "; ".join(f"{_degrees(c)}: {c.why}" for c in candidates[:4]))
    least = min(sized, key=lambda c: c.peak_bytes)
    return (f"parallel.auto: no split of {world} ranks fits {device.name}'s {device.memory_bytes / 2**30:.0f} GiB; "
            f"the smallest, {_degrees(least)}, needs {least.peak_bytes / 2**30:.1f} GiB per rank")


def _degrees(c: ParallelCandidate) -> str:
    return ParallelSpec(c.cfg, c.ulysses, c.ring, c.fsdp).describe()
