"""Plan `parallel.auto` (dacc/compiler/choose_parallel.py): every split is partitioned for real
and weighed by the cost model; the verdicts follow from what each split does."""
from __future__ import annotations

from pathlib import Path

import pytest

from dacc.compiler.choose_parallel import choose_parallel
from dacc.compiler.compile import compile_model, partition_manifest
from dacc.cost.devices import DeviceProfile, save_profile
from dacc.report import inspect_artifact
from dacc.schema.errors import DaccError
from dacc.schema.plan import parse_plan
from tests.conftest import shared_trace

FLUX_CFG = Path(__file__).parents[1] / "runtime" / "models" / "flux_cfg.py"  # 2 heads, CFG batches
# a free link and no dispatch cost: only compute and memory traffic separate the splits
FREE_LINK = DeviceProfile("free-link", matmul_flops=1e9, memory_bandwidth=1e12, memory_bytes=1e12,
                          link_bandwidth=1e15, link_latency=0.0, op_overhead=0.0, async_dispatch=False, source="test")


@pytest.fixture(scope="module")
def partition():
    traced, manifests = shared_trace(FLUX_CFG), {}

    def run(plan):
        p = plan.parallel
        key = (p.fsdp, p.cfg, p.ulysses, p.ring)
        if key not in manifests:
            manifests[key] = partition_manifest(traced, plan)
        return manifests[key]
    return run


def _auto(world: int, device: str, **more) -> object:
    return parse_plan({"num_inference_steps": 4, "parallel": {"auto": {"world_size": world, "device": device, **more}}})


def _profile(tmp_path: Path, **changes) -> str:
    return str(save_profile(DeviceProfile(**{**FREE_LINK.__dict__, **changes}), tmp_path / "device.yaml"))


def test_splitting_the_work_beats_fsdp_until_memory_is_short(partition, tmp_path):
    plan, choice = choose_parallel(_auto(2, _profile(tmp_path)), partition, lambda m: None, "test")
    by = {(c.fsdp, c.cfg, c.ulysses, c.ring): c for c in choice.candidates}
    assert set(by) == {(2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2)}
    fsdp = by[2, 1, 1, 1]
    # fsdp ranks each run the whole call: with a free link, every split of the work is faster
    assert all(c.step_seconds < fsdp.step_seconds for k, c in by.items() if k != (2, 1, 1, 1))
    chosen = [c for c in choice.candidates if c.verdict == "chosen"]
    assert len(chosen) == 1 and chosen[0].step_seconds == min(c.step_seconds for c in choice.candidates)
    assert (plan.parallel.cfg, plan.parallel.ulysses, plan.parallel.ring) == (chosen[0].cfg, chosen[0].ulysses,
                                                                             chosen[0].ring)
    # fsdp stores half the weights; below what the others need, only it fits
    assert fsdp.peak_bytes < min(c.peak_bytes for c in by.values() if c is not fsdp)
    tight = (fsdp.peak_bytes + min(c.peak_bytes for c in by.values() if c is not fsdp)) / 2
    plan, choice = choose_parallel(_auto(2, _profile(tmp_path, memory_bytes=tight)), partition, lambda m: None, "test")
    assert plan.parallel.fsdp == 2
    assert sorted(c.verdict for c in choice.candidates) == ["chosen", "over memory", "over memory", "over memory"]
    # the throughput objective counts the calls fsdp ranks serve at once
    # (where reading the weights dominates, and splitting the tokens does not shorten it)
    slow_memory = _profile(tmp_path, memory_bandwidth=1e5)
    _, choice = choose_parallel(_auto(2, slow_memory, objective="throughput"), partition, lambda m: None, "t")
    assert next(c for c in choice.candidates if c.verdict == "chosen").fsdp == 2


def test_a_split_the_passes_refuse_is_listed_with_their_reason(partition, tmp_path):
    _, choice = choose_parallel(_auto(3, _profile(tmp_path)), partition, lambda m: None, "test")
    invalid = [c for c in choice.candidates if c.verdict == "invalid"]
    # the example's 64 image tokens do not split in 3: ring 3 and ulysses 3 are refused, fsdp 3 is not
    assert [(c.ring, c.ulysses, c.step_seconds) for c in invalid] == [(3, 1, 0.0), (1, 3, 0.0)]
    assert all("not a multiple of 3" in c.why for c in invalid)
    assert next(c for c in choice.candidates if c.verdict == "chosen").fsdp == 3
    with pytest.raises(DaccError, match="no split of 3 ranks fits free-link's"):
        choose_parallel(_auto(3, _profile(tmp_path, memory_bytes=1.0)), partition, lambda m: None, "test")
    with pytest.raises(DaccError, match="parallel.auto.at names tokens"):
        choose_parallel(_auto(3, _profile(tmp_path), at={"tokens": 8}), partition, lambda m: None, "test")


def test_compile_records_the_choice_and_inspect_explains_it(tmp_path):
    # one rank: the wiring from plan to manifest to report (the choice itself is tested above)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"num_inference_steps: 4\nparallel:\n  auto: {{world_size: 1, device: {_profile(tmp_path)}}}\n")
    m = compile_model(FLUX_CFG, plan, tmp_path / "a.dacc", verify=False, log=lambda s: None,
                      traced=shared_trace(FLUX_CFG))
    chosen = next(c for c in m.parallel_choice.candidates if c.verdict == "chosen")
    assert (m.parallel.fsdp, m.parallel.cfg, m.parallel.ulysses, m.parallel.ring) == (
        chosen.fsdp, chosen.cfg, chosen.ulysses, chosen.ring) == (1, 1, 1, 1)
    text = inspect_artifact(tmp_path / "a.dacc", device=str(tmp_path / "device.yaml"))
    assert "parallel.auto: 1 split(s) of 1 rank(s) predicted on free-link" in text
    assert "chosen: fastest that fits on free-link (latency)" in text and "predicted computed step on free-link" in text
    with pytest.raises(DaccError, match="neither a built-in profile nor a file"):
        inspect_artifact(tmp_path / "a.dacc", device="h900")
    with pytest.raises(DaccError, match="parallel.auto both set the degrees"):
        parse_plan({"parallel": {"ulysses": 2, "auto": {"world_size": 2}}})
