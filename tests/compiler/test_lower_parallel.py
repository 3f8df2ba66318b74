"""Lowering a parallel plan: its segments call dacc's communication operators, and the packages
built from them exchange the same data over the groups the runtime binds. A cached Ulysses plan
(dbcache, ulysses 2) lowered for the CPU runs a denoising loop on two gloo ranks; every rank
returns what the single-process, unlowered artifact returns, takes the same gate decisions, and
sends exactly what the same artifact's graphs send (seen at the dispatcher, where a package
calls the operators back). The other modes (cfg, ring, fsdp) are in `make test-all`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import dacc
from dacc.compiler.compile import compile_model
from dacc.runtime.artifact import read_manifest
from dacc.runtime.launch import run_local
from tests.conftest import rel_err, shared_trace
from tests.runtime.test_parallel import (DBCACHE, DIE, FLUX, Transfers, _generation, _inputs, _odd_tokens,
                                        die_or_call_on, rank_results)

LOWER = {"lower": {"backend": "inductor", "device": "cpu"}}
PAIR = FLUX.with_name("flux_pair.py")  # every example one CFG pair: a batch of 1 on each cfg rank


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """name -> artifact, compiled on first use; one package cache for the module."""
    root = tmp_path_factory.mktemp("lower_parallel")
    patch = pytest.MonkeyPatch()
    patch.setenv("DACC_CACHE_DIR", str(root / "cache"))
    done: dict[str, tuple[Path, list[str]]] = {}

    def get(name: str, plan: dict) -> tuple[Path, list[str]]:
        if name not in done:
            (root / f"{name}.yaml").write_text(yaml.safe_dump(plan))
            log: list[str] = []
            model = PAIR if name.startswith("pair") else FLUX
            compile_model(model, root / f"{name}.yaml", root / f"{name}.dacc", log=log.append, verify=False,
                          traced=shared_trace(model))
            done[name] = (root / f"{name}.dacc", log)
        return done[name]
    yield get
    patch.undo()


def _rank(rank: int, world: int, jobs: dict, out: str) -> None:
    """Each job: (artifact, lowered mode, calls); saves the outputs, transfers and decisions. Last,
    the DIE job: rank 1 leaves without a word, rank 0 calls on and records what it is told."""
    dying = jobs.pop(DIE, None)
    for name, (path, mode, calls) in jobs.items():
        model = dacc.load(path, lowered=mode, allow_native_code=True)
        spy, outs = Transfers(), []
        with spy:
            outs = [model(**call).sample for call in calls]
        save_file({f"out{i}": o.contiguous() for i, o in enumerate(outs)}, f"{out}/{name}.{rank}.safetensors")
        Path(f"{out}/{name}.{rank}.json").write_text(json.dumps({
            "calls": spy.calls, "decisions": model.stats()["decisions"],
            "lowered": model.programs[0].lowered_segments}))
    if dying is not None:
        model = dacc.load(dying[0], allow_native_code=True)
        model(**dying[1])
        die_or_call_on(model, dying[1], rank, out)


def _on_ranks(jobs: dict, world: int, out: Path) -> dict:
    run_local(_rank, world, jobs, str(out))
    return rank_results(jobs, world, out)


def _single(path: Path, calls: list[dict]) -> tuple[list[torch.Tensor], list]:
    model = dacc.load(path)
    return [model(**call).sample for call in calls], model.stats()["decisions"]


def _check(results: dict, name: str, world: int, ref: tuple, unlowered: str, segments: int, sent: str) -> None:
    outs, decisions = ref
    for rank in range(world):
        got, plain = results[name, rank], results[unlowered, rank]
        assert got["lowered"] == segments and plain["lowered"] == 0
        assert got["decisions"] == decisions
        for a, b in zip(got["outs"], outs, strict=True):
            assert rel_err(a, b) <= 1e-5, (name, rank, rel_err(a, b))
        # the packages call the operators back: the same exchanges, each a real transfer
        assert got["calls"] == plain["calls"]
        assert got["calls"].get(sent, 0) > 0, got["calls"]


def test_a_lowered_cached_ulysses_plan_matches_one_process_on_two_ranks(compiled, tmp_path):
    single, _ = compiled("flux_db", DBCACHE)
    path, log = compiled("flux_db_u2_lowered", {**DBCACHE, "parallel": {"ulysses": 2}, **LOWER})
    manifest = read_manifest(path, None)
    segments = len(manifest.programs[0].segments)
    assert not manifest.lowering.unlowered
    assert sum(len(p.segments) for p in manifest.lowering.packages) == segments
    assert any("lowering on 2 local processes" in line for line in log)
    flux = _inputs(FLUX, 31, first=True)
    odd = _odd_tokens(flux, 63)  # 63 image tokens: 32 + 31 over the ranks, one pad row, a size no build saw
    calls = {"even": _generation(flux), "odd": _generation(odd)}
    jobs = {f"{kind}{'' if mode == 'use' else '_off'}": (str(path), mode, c)
            for kind, c in calls.items() for mode in ("use", "off")}
    jobs[DIE] = (str(path), flux)
    results = _on_ranks(jobs, 2, tmp_path)
    # a rank that dies mid-generation: the other gets dacc's own error from inside the package, at once
    died = results[DIE]
    assert died["error"].startswith("DaccError: ") and "over the 'ulysses' group failed" in died["error"], died
    assert died["seconds"] < 30
    for kind, c in calls.items():
        _check(results, kind, 2, _single(single, c), f"{kind}_off", segments,
               "_c10d_functional.all_to_all_single.default")
    # the gate both computed and skipped, so both paths ran through the packages
    taken = {d for ds in results["even", 0]["decisions"].values() for d in ds}
    assert {"computed", "reused"} <= taken, taken


SENT = {"cfg": "_c10d_functional.all_gather_into_tensor.default", "ring": "c10d.send.default",
        "fsdp": "c10d._allgather_base_.default"}


@pytest.mark.slow  # 3 compiles on two ranks and a two-rank run: about 5 minutes on two cores
def test_lowered_cfg_ring_and_fsdp_plans_match_one_process(compiled, tmp_path):
    """cfg on a model whose every example is one CFG pair: each rank's batch is 1 in every
    example, and the packages still take any batch (built from a batch of 2, checked on 1)."""
    flux = _inputs(FLUX, 41, first=True)
    jobs, segments, refs = {}, {}, {}
    for mode in ("cfg", "ring", "fsdp"):
        prefix = "pair" if mode == "cfg" else "flux"
        path, _ = compiled(f"{prefix}_{mode}2_lowered", {"parallel": {mode: 2}, **LOWER})
        manifest = read_manifest(path, None)
        assert not manifest.lowering.unlowered, manifest.lowering.unlowered
        segments[mode] = len(manifest.programs[0].segments)
        jobs[mode], jobs[f"{mode}_off"] = (str(path), "use", [flux]), (str(path), "off", [flux])
        refs[mode] = _single(compiled(f"{prefix}", {})[0], [flux])
    results = _on_ranks(jobs, 2, tmp_path)
    for mode, sent in SENT.items():
        _check(results, mode, 2, refs[mode], f"{mode}_off", segments[mode], sent)
