"""Parallel artifacts on real torch.distributed (gloo, CPU processes): every rank returns what the
single-process artifact returns, the transfers the graph names really run (seen at the
dispatcher, bytes included), and a wrong launch or a dead rank is a clear error, never a hang.
At the end, parallel.auto, whose candidates are these artifacts' partitions."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import dacc
from dacc.compiler.choose_parallel import choose_parallel
from dacc.compiler.compile import compile_model, partition_manifest
from dacc.cost.devices import DeviceProfile, save_profile
from dacc.cost.memory_map import memory_map
from dacc.kernels.collectives import bound_groups
from dacc.compiler.model_file import load_model_file
from dacc.models import model_file
from dacc.runtime.artifact import read_manifest
from dacc.runtime.cache import planned_actions
from dacc.runtime.launch import run_local
from dacc.runtime.ranks import default_timeout
from dacc.schema.errors import DaccError
from dacc.report import inspect_artifact
from dacc.schema.expr import NUMBER, evaluate
from dacc.schema.plan import parse_plan
from tests.conftest import fresh_like, rel_err, shared_trace

FLUX = Path(__file__).with_name("models") / "flux_cfg.py"
WAN = Path(__file__).with_name("models") / "wan_cfg.py"  # self-attention over video tokens, cross-attention to text
STEPS = 6
DBCACHE = {"num_inference_steps": STEPS, "cache": {"strategy": "dbcache", "options": {"threshold": 0.2}}}
# a static step x range schedule (two block ranges, each its own mask, Taylor forecasts on skipped steps)
MASKS = [[True, True, False, True, False, True], [True, False, True, False, False, True]]
SCHEDULE = {"num_inference_steps": STEPS, "cache": {"strategy": "schedule", "options": {
    "ranges": 2, "masks": MASKS, "taylorseer_order": 1}}}
# calibrated at compile time (flux_cfg.py's sample()): a parallel plan calibrates its single-process twin
CALIBRATED = {"num_inference_steps": STEPS, "cache": {"strategy": "schedule", "cache_ratio": 0.5, "options": {
    "ranges": 2, "taylorseer_order": 1}}}
TEACACHE = {"num_inference_steps": STEPS, "cache": {"strategy": "teacache", "cache_ratio": 0.5}}
ARTIFACTS = {  # name: (model file, plan)
    "flux": (FLUX, {}),
    "flux_u2": (FLUX, {"parallel": {"ulysses": 2}}),
    "flux_c2": (FLUX, {"parallel": {"cfg": 2}}),
    "flux_c2u2": (FLUX, {"parallel": {"cfg": 2, "ulysses": 2}}),
    "flux_r2": (FLUX, {"parallel": {"ring": 2}}),
    "flux_u2r2": (FLUX, {"parallel": {"ulysses": 2, "ring": 2}}),
    "flux_u4": (FLUX, {"parallel": {"ulysses": 4}}),  # 2 heads: padded to 4
    "flux_f2u2": (FLUX, {"parallel": {"fsdp": 2, "ulysses": 2}}),
    "flux_f2": (FLUX, {"parallel": {"fsdp": 2}}),
    "flux_db": (FLUX, DBCACHE),
    "flux_db_f2": (FLUX, {**DBCACHE, "parallel": {"fsdp": 2}}),
    "flux_db_c2": (FLUX, {**DBCACHE, "parallel": {"cfg": 2}}),
    "flux_db_r2": (FLUX, {**DBCACHE, "parallel": {"ring": 2}}),
    "flux_db_u2r2": (FLUX, {**DBCACHE, "parallel": {"ulysses": 2, "ring": 2}}),
    "flux_db_u2": (FLUX, {**DBCACHE, "parallel": {"ulysses": 2}}),
    "flux_sch": (FLUX, SCHEDULE),
    "flux_sch_u2": (FLUX, {**SCHEDULE, "parallel": {"ulysses": 2}}),
    "flux_cal": (FLUX, CALIBRATED),
    "flux_cal_u2": (FLUX, {**CALIBRATED, "parallel": {"ulysses": 2}}),
    "flux_tc": (FLUX, TEACACHE),
    "flux_tc_c2": (FLUX, {**TEACACHE, "parallel": {"cfg": 2}}),
    "sd3": (model_file("sd3"), {}),
    "sd3_u2": (model_file("sd3"), {"parallel": {"ulysses": 2}}),
    "wan": (WAN, {}),
    "wan_u2": (WAN, {"parallel": {"ulysses": 2}}),
    "wan_r2": (WAN, {"parallel": {"ring": 2}}),
    "wan_c2": (WAN, {"parallel": {"cfg": 2}}),
    "wan_f2": (WAN, {"parallel": {"fsdp": 2}}),
    "wan_db": (WAN, DBCACHE),
    "wan_db_c2": (WAN, {**DBCACHE, "parallel": {"cfg": 2}}),
    "vae": (model_file("vae"), {}),
    "vae_p2": (model_file("vae"), {"parallel": {"vae_patch": 2}}),
}
DIE = "rank 1 dies"
STALL = "rank 1 stalls"
STALL_TIMEOUT = 3.0  # seconds: the world group's timeout during the STALL job
TRANSFERS = ("_c10d_functional.all_to_all_single.default", "_c10d_functional.all_gather_into_tensor.default",
             "c10d.allreduce_.default", "c10d.send.default", "c10d.recv_.default", "c10d._allgather_base_.default",
             "_c10d_functional.all_reduce.default")


class Artifacts:
    """Compiled on first use, once per module; the graph text after each pass is kept."""

    def __init__(self, root: Path):
        self.root = root
        self.graphs: dict[str, dict[str, str]] = {}

    def __call__(self, *names: str) -> Path:
        for name in names:
            if name in self.graphs:
                continue
            path, plan = ARTIFACTS[name]
            (self.root / f"{name}.yaml").write_text(yaml.safe_dump(plan))
            graphs = self.graphs.setdefault(name, {})
            compile_model(path, self.root / f"{name}.yaml", self.root / f"{name}.dacc", log=lambda m: None,
                          verify=False, traced=shared_trace(path),
                          on_graph=lambda p, i, pass_name, text: graphs.__setitem__(f"{i:02d}_{pass_name}", text))
        return self.root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("parallel"))


@pytest.fixture(scope="module")
def root(artifacts) -> Path:
    return artifacts("flux", "flux_u2", "flux_c2", "flux_r2", "flux_db", "flux_db_u2", "flux_f2", "flux_db_f2",
                     "flux_db_c2", "flux_db_r2", "flux_sch", "flux_sch_u2", "flux_cal", "flux_cal_u2", "vae", "vae_p2")


class Transfers(TorchDispatchMode):
    """Counts the collectives (and the bytes handed to them) inside dacc's operators."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("dacc.") or name in TRANSFERS:
            self.calls[name] = self.calls.get(name, 0) + 1
            given = args[1] if name == "c10d._allgather_base_.default" else args[0]  # (output, input)
            handed = given if isinstance(given, (list, tuple)) else [given]  # send takes a list
            self.bytes[name] = self.bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in handed
                                                             if isinstance(t, torch.Tensor))
        if func.namespace == "dacc":  # run the body with this mode on, so its collectives are seen too
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        return func(*args, **kwargs)


def _generation(inputs: dict, steps: int = STEPS, pace: float = 0.01) -> list[dict]:
    """A denoising loop's calls: the latent drifts a little each step, timesteps fall slowly
    (slowly enough that the gate skips some steps and computes others)."""
    calls, g = [], torch.Generator().manual_seed(7)
    drift = torch.randn(inputs["hidden_states"].shape, generator=g)
    for k in range(steps):
        call = dict(inputs)
        call["hidden_states"] = inputs["hidden_states"] + pace * k * drift
        call["timestep"] = torch.full_like(inputs["timestep"], 0.9 - 0.01 * k)
        calls.append(call)
    return calls


_LOADED: dict[Path, torch.nn.Module] = {}


def _load(path: Path) -> torch.nn.Module:
    """One load per artifact and process (a load costs more than the runs here)."""
    if path not in _LOADED:
        _LOADED[path] = dacc.load(path)
    _LOADED[path].reset()
    return _LOADED[path]


def _run(root: Path, name: str, calls: list[dict]) -> tuple[list[torch.Tensor], Transfers, dict]:
    model = _load(root / f"{name}.dacc")
    spy = Transfers()
    outs = []
    with spy:
        for call in calls:
            out = model(**call)
            outs.append(out.sample if hasattr(out, "sample") else out)  # a VAE decoder returns the image
    return outs, spy, model.stats()


def _rank_job(rank: int, world: int, root: str, jobs: dict, out: str) -> None:
    dying, stalling = jobs.pop(DIE, None), jobs.pop(STALL, None)
    for name, (artifact, calls) in jobs.items():
        calls = calls[rank] if isinstance(calls, dict) else calls  # {rank: calls}: each rank its own request
        try:
            outs, spy, stats = _run(Path(root), artifact, calls)
            params = list(_load(Path(root) / f"{artifact}.dacc").parameters())
            result = {"calls": spy.calls, "bytes": spy.bytes, "decisions": stats["decisions"],
                      "stored": sum(_local(p).numel() * p.element_size() for p in params),
                      "sharded": sum(type(p).__name__ == "DTensor" for p in params), "params": len(params),
                      "timeouts": sorted({str(_timeout(g)) for g in bound_groups().values()})}
            save_file({f"out{i}": o.contiguous() for i, o in enumerate(outs)}, f"{out}/{name}.{rank}.safetensors")
        except DaccError as exc:
            result = {"error": str(exc)}
        Path(f"{out}/{name}.{rank}.json").write_text(json.dumps(result))
    if stalling is not None:  # rank 1 stays alive and silent past the timeout, then goes on
        stall_or_call_on(_load(Path(root) / stalling[0]), stalling[1], rank, out)
    if dying is not None:  # last: rank 1 leaves without a word, as a killed process does
        model = _load(Path(root) / dying[0])
        die_or_call_on(model, dying[1][0], rank, out)


def die_or_call_on(model, call: dict, rank: int, out: str) -> None:
    """Rank 1 leaves without a word, as a killed process does; rank 0 calls `model` on and writes
    what it was told and how long that took to `{DIE}.0.json`."""
    if rank == 1:
        os._exit(0)
    _told(model, call, f"{out}/{DIE}.0.json")


def stall_or_call_on(model, calls: list[dict], rank: int, out: str) -> None:
    """Both ranks make all but the last of `calls`; then every group waits STALL_TIMEOUT, and
    rank 1 sleeps through three of them while rank 0 makes the last call and writes what it was
    told and how long that took."""
    for call in calls[:-1]:
        model(**call)
    for g in {id(g): g for g in [dist.group.WORLD, *bound_groups().values()]}.values():
        g.set_timeout(datetime.timedelta(seconds=STALL_TIMEOUT))
    if rank == 1:
        time.sleep(3 * STALL_TIMEOUT)
        return
    _told(model, calls[-1], f"{out}/{STALL}.0.json")


def _told(model, call: dict, path: str) -> None:
    """Call `model` and write to `path` what the caller was told (the error, if any) and how long
    that took."""
    start = time.monotonic()
    try:
        model(**call)
        result = {"error": None}
    except Exception as exc:  # noqa: BLE001 (what the user would see, whatever it is)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.monotonic() - start
    Path(path).write_text(json.dumps(result))


def _timeout(group) -> datetime.timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _spawn(root: Path, world: int, jobs: dict, out: Path) -> dict:
    run_local(_rank_job, world, str(root), jobs, str(out))
    return rank_results(jobs, world, out)


def rank_results(jobs: dict, world: int, out: Path) -> dict:
    """What each rank of each job wrote under `out`: {(job, rank): its JSON, with "outs" (its
    tensors) unless it reported an error}, and the dead-rank job's {DIE: rank 0's JSON}."""
    results = {}
    for special in (DIE, STALL):
        if special in jobs:
            results[special] = json.loads((out / f"{special}.0.json").read_text())
    for name in [j for j in jobs if j not in (DIE, STALL)]:
        for rank in range(world):
            got = json.loads((out / f"{name}.{rank}.json").read_text())
            if "error" not in got:
                tensors = load_file(out / f"{name}.{rank}.safetensors")
                got["outs"] = [tensors[f"out{i}"] for i in range(len(tensors))]
            results[name, rank] = got
    return results


def _inputs(path: Path, seed: int, first: bool = False) -> dict:
    """Fresh values in the shapes of an example (the first: a batch of 2, one CFG pair)."""
    from dacc.compiler.model_file import load_model_file

    mf = load_model_file(path)
    return fresh_like(mf.example_inputs() if first else mf.more_example_inputs()[0], seed)


@pytest.fixture(scope="module")
def two_ranks(root, tmp_path_factory):
    flux = _inputs(FLUX, 11, first=True)  # a CFG pair: each cfg rank holds a batch of 1
    odd = _odd_tokens(flux, 63)  # the compile saw 64 and 60: 63 image tokens split 32 + 31 (one pad row)
    jobs = {"flux_u2": ("flux_u2", [flux]), "flux_c2": ("flux_c2", [flux]), "flux_r2": ("flux_r2", [flux]),
            "flux_db_u2": ("flux_db_u2", _generation(flux)), "flux_u2_odd": ("flux_u2", [odd]),
            "flux_r2_odd": ("flux_r2", [odd]), "flux_db_u2_odd": ("flux_db_u2", _generation(odd)),
            "flux_sch_u2": ("flux_sch_u2", _generation(flux)), "flux_cal_u2": ("flux_cal_u2", _generation(flux)),
            "flux_db_c2": ("flux_db_c2", _generation(flux)), "flux_db_r2": ("flux_db_r2", _generation(flux)),
            # the second call's gate reduces its probe statistic: rank 0 waits there for rank 1
            STALL: ("flux_db_c2.dacc", _generation(flux)[:2]), DIE: ("flux_u2.dacc", [flux])}
    refs = {"flux_u2": ("flux", [flux]), "flux_c2": ("flux", [flux]), "flux_r2": ("flux", [flux]),
            "flux_db_u2": ("flux_db", _generation(flux)), "flux_u2_odd": ("flux", [odd]),
            "flux_r2_odd": ("flux", [odd]), "flux_db_u2_odd": ("flux_db", _generation(odd)),
            "flux_sch_u2": ("flux_sch", _generation(flux)), "flux_cal_u2": ("flux_cal", _generation(flux)),
            "flux_db_c2": ("flux_db", _generation(flux)), "flux_db_r2": ("flux_db", _generation(flux))}
    # fsdp ranks serve different requests: rank 1's latent changes faster, so its gate computes more
    other = _inputs(FLUX, 21, first=True)
    requests = {0: [flux], 1: [other]}
    generations = {0: _generation(flux), 1: _generation(other, pace=0.05)}
    jobs.update({"flux_f2": ("flux_f2", requests), "flux_db_f2": ("flux_db_f2", generations)})
    # rank 1's shard file corrupted in a copy: a load (no call) that only rank 1 can notice
    bad = root / "flux_f2_bad.dacc"
    if not bad.exists():
        shutil.copytree(root / "flux_f2.dacc", bad)
        shard = bad / read_manifest(bad, None).fsdp.files[1]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    jobs["flux_f2_bad"] = ("flux_f2_bad", [])
    for rank in range(2):
        refs.update({f"flux_f2.{rank}": ("flux", requests[rank]), f"flux_db_f2.{rank}": ("flux_db", generations[rank])})
    # a VAE latent of a size the compile never saw: bands of 5 latent rows, 20 image rows
    latents = {"latents": torch.randn(2, 4, 10, 6, generator=torch.Generator().manual_seed(13))}
    jobs["vae_p2"], refs["vae_p2"] = ("vae_p2", [latents]), ("vae", [latents])
    results = _spawn(root, 2, jobs, tmp_path_factory.mktemp("ranks2"))
    single = {name: _run(root, ref, calls) for name, (ref, calls) in refs.items()}
    return results, single, {"flux": flux, "odd": odd, "vae": latents}


def _odd_tokens(inputs: dict, tokens: int, seed: int = 17) -> dict:
    """The inputs with `tokens` image tokens (a row of the latent grid, fresh values)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.zeros(tokens), torch.arange(tokens).float() // 9, torch.arange(tokens).float() % 9], -1)
    batch, _, channels = inputs["hidden_states"].shape
    return {**inputs, "hidden_states": torch.randn(batch, tokens, channels, generator=g), "img_ids": ids}


def _sites(root: Path, name: str) -> int:
    return sum(not s.cross for s in read_manifest(root / f"{name}.dacc", None).programs[0].attention)


def _same_outputs(results: dict, name: str, world: int, ref_outs: list, ref_stats: dict) -> None:
    for rank in range(world):
        got = results[name, rank]
        assert "error" not in got, got.get("error")
        assert len(got["outs"]) == len(ref_outs)
        for a, b in zip(got["outs"], ref_outs):
            assert a.shape == b.shape and rel_err(a, b) <= 1e-5, (name, rank, rel_err(a, b))
        assert got["decisions"] == ref_stats["decisions"]


def _exchanges_at_every_site(root: Path, name: str, calls: dict) -> None:
    sites = _sites(root, name)
    assert sites > 0
    # q, k, v in and the output back: four all-to-alls per site, each a real transfer
    assert calls["dacc.seq_to_heads.default"] == 3 * sites and calls["dacc.heads_to_seq.default"] == sites
    assert calls["_c10d_functional.all_to_all_single.default"] == 4 * sites
    assert calls["_c10d_functional.all_gather_into_tensor.default"] == 1  # the epilogue's gather
    assert "c10d.allreduce_.default" not in calls  # no cache gate, nothing reduced


@pytest.mark.parametrize("name", ["flux_u2", "flux_c2", "flux_r2", "flux_db_u2", "flux_u2_odd", "flux_r2_odd",
                                  "flux_db_u2_odd", "flux_sch_u2", "flux_cal_u2", "flux_db_c2", "flux_db_r2"])
def test_every_rank_returns_the_single_process_output(two_ranks, name):
    results, single, _ = two_ranks
    _same_outputs(results, name, 2, single[name][0], single[name][2])


def test_partition_passes_golden(artifacts, golden):
    """The graph text after each partition pass (the rest of the graph: tests/golden/flux/)."""
    artifacts("flux_u2", "flux_c2")
    golden("flux/parallel_cfg2_11_split_cfg.txt", artifacts.graphs["flux_c2"]["11_split_cfg"])
    golden("flux/parallel_ulysses2_12_partition_attention.txt",
           artifacts.graphs["flux_u2"]["12_partition_attention"])
    artifacts("flux_r2", "flux_u2r2")
    golden("flux/parallel_ring2_12_partition_attention.txt", artifacts.graphs["flux_r2"]["12_partition_attention"])
    golden("flux/parallel_usp_u2r2_12_partition_attention.txt",
           artifacts.graphs["flux_u2r2"]["12_partition_attention"])
    assert artifacts.graphs["flux_c2"]["12_partition_attention"] == artifacts.graphs["flux_c2"]["11_split_cfg"]
    # the VAE decoder before and after its rows are split into bands
    artifacts("vae_p2")
    golden("vae/12_before_partition_patches.txt", artifacts.graphs["vae_p2"]["12_partition_attention"])
    golden("vae/parallel_vae_patch2_13_partition_patches.txt", artifacts.graphs["vae_p2"]["13_partition_patches"])


def test_ulysses_exchanges_heads_at_every_joint_attention(root, two_ranks):
    results, _, inputs = two_ranks
    _exchanges_at_every_site(root, "flux_u2", results["flux_u2", 0]["calls"])
    # bytes: each exchange hands over one rank's [B, H, S/2, D] fp32 tensor
    flux = inputs["flux"]
    tokens = flux["hidden_states"].shape[1] + flux["encoder_hidden_states"].shape[1]
    batch, heads, head_dim = flux["hidden_states"].shape[0], 2, 16
    sent = results["flux_u2", 0]["bytes"]["_c10d_functional.all_to_all_single.default"]
    assert sent == 4 * _sites(root, "flux_u2") * batch * heads * (tokens // 2) * head_dim * 4


def _predicted_sent(root: Path, name: str, inputs: dict) -> tuple[float, int]:
    """The manifest's bytes-sent expressions and collective messages, summed over the segments,
    at these input sizes."""
    program = read_manifest(root / f"{name}.dacc", None).programs[0]
    env = {s.name: int(inputs[s.input].shape[s.dim]) for s in program.symbols}
    return (sum(evaluate(seg.sent_bytes_tree, env, seg.name, NUMBER) for seg in program.segments),
            sum(seg.messages for seg in program.segments))


@pytest.mark.parametrize("name, world", [("flux_u2", 2), ("flux_c2", 2), ("flux_r2", 2), ("flux_u2_odd", 2),
                                         ("flux_r2_odd", 2)])
def test_the_bytes_each_rank_sends_match_the_compiled_prediction(root, two_ranks, name, world):
    """What left each rank, from the collectives observed in the run: an all-to-all keeps 1/P of
    what it is handed, an all-gather hands its input to each of the P-1 others (pad rows too)."""
    results, _, inputs = two_ranks
    artifact, odd = name.removesuffix("_odd"), name.endswith("_odd")
    bytes_predicted, messages_predicted = _predicted_sent(root, artifact, inputs["odd" if odd else "flux"])
    for rank in range(world):
        handed, calls = results[name, rank]["bytes"], results[name, rank]["calls"]
        sent = (handed.get("_c10d_functional.all_to_all_single.default", 0) * (world - 1) / world
                + handed.get("_c10d_functional.all_gather_into_tensor.default", 0) * (world - 1)
                + handed.get("c10d.send.default", 0))
        assert sent > 0 and sent == bytes_predicted
        # each message pays the link's latency in the step-time model
        messages = sum(calls.get(k, 0) for k in ("_c10d_functional.all_to_all_single.default",
                                                 "_c10d_functional.all_gather_into_tensor.default", "c10d.send.default"))
        assert messages == messages_predicted


def test_vae_bands_stitch_into_the_single_process_image(root, two_ranks):
    """vae_patch 2: every rank returns the whole image, equal to the single-process decode (no
    seams), while decoding the two bands on their own (no halos, per-band GroupNorm) is far off;
    the exchanges are the graph's, and the bytes the manifest's."""
    results, single, inputs = two_ranks
    ref = single["vae_p2"][0][0]
    for rank in range(2):
        got = results["vae_p2", rank]
        assert "error" not in got, got.get("error")
        assert rel_err(got["outs"][0], ref) <= 1e-5, (rank, rel_err(got["outs"][0], ref))
    eager = load_model_file(model_file("vae")).build()
    latents = inputs["vae"]["latents"]
    with torch.no_grad():
        bands = torch.cat([eager(latents[:, :, :5]), eager(latents[:, :, 5:])], 2)
    assert rel_err(bands, ref) > 1e-2  # what the halos and the shared statistics are for
    graph = (root / "vae_p2.dacc" / "graph.txt").read_text()
    halos, norms, gathers = (graph.count(f"= dacc.{op}(") for op in ("halo", "group_norm", "gather"))
    calls = results["vae_p2", 0]["calls"]
    assert halos > 10 and norms > 10 and gathers == 3  # keys, values, the image
    assert calls["dacc.halo.default"] == halos and calls["dacc.group_norm.default"] == norms
    assert calls["_c10d_functional.all_gather_into_tensor.default"] == halos + gathers
    assert calls["_c10d_functional.all_reduce.default"] == 2 * norms  # the mean, then the variance
    handed = results["vae_p2", 0]["bytes"]
    sent = (handed["_c10d_functional.all_gather_into_tensor.default"]
            + handed["_c10d_functional.all_reduce.default"])  # two ranks: (P-1) = 1, 2(P-1)/P = 1
    assert (sent, sum(calls.get(k, 0) for k in ("_c10d_functional.all_gather_into_tensor.default",
                                                 "_c10d_functional.all_reduce.default"))) == \
        _predicted_sent(root, "vae_p2", inputs["vae"])


def test_ring_passes_keys_and_values_around_at_every_site(root, two_ranks):
    results, _, _ = two_ranks
    calls = results["flux_r2", 0]["calls"]
    sites = _sites(root, "flux_r2")
    assert calls["dacc.ring_attention.default"] == sites
    assert calls["c10d.send.default"] == calls["c10d.recv_.default"] == sites  # P-1 = 1 hop per site
    assert "_c10d_functional.all_to_all_single.default" not in calls  # no head exchange
    assert calls["_c10d_functional.all_gather_into_tensor.default"] == 1


def test_cfg_sends_only_the_output_gather(two_ranks):
    results, _, inputs = two_ranks
    calls, sent = results["flux_c2", 1]["calls"], results["flux_c2", 1]["bytes"]
    assert calls.get("_c10d_functional.all_to_all_single.default", 0) == 0
    assert calls["_c10d_functional.all_gather_into_tensor.default"] == 1
    half = inputs["flux"]["hidden_states"].shape[0] // 2
    tokens = inputs["flux"]["hidden_states"].shape[1]
    assert sent["_c10d_functional.all_gather_into_tensor.default"] == half * tokens * 16 * 4  # [B/2, tokens, C] out


def test_cached_ulysses_skips_like_one_process_and_reduces_each_gated_step(root, two_ranks):
    results, single, _ = two_ranks
    decisions = next(iter(single["flux_db_u2"][2]["decisions"].values()))
    assert "reused" in decisions and "computed" in decisions  # the gate really skipped, and really ran
    calls = results["flux_db_u2", 0]["calls"]
    assert calls["c10d.allreduce_.default"] == STEPS - 1  # one probe statistic per step after the first
    computed = decisions.count("computed")
    sites = _sites(root, "flux_db_u2")
    # the front block (Fn=1) runs every step; the gated blocks only on computed steps
    front = sum(1 for s in read_manifest(root / "flux_db_u2.dacc", None).programs[0].attention
                if s.segment == "transformer_blocks.0")
    exchanges = calls["dacc.seq_to_heads.default"] + calls["dacc.heads_to_seq.default"]
    assert exchanges == 4 * (STEPS * front + computed * (sites - front))


def test_a_static_schedule_runs_its_masks_on_every_rank_with_no_probe(root, two_ranks):
    """A step x range schedule under ulysses: each range follows its own compiled mask (forecasting
    on the skipped steps), the ranks agree without exchanging a probe, and only the computed steps
    of a range pay its blocks' attention exchanges."""
    results, single, _ = two_ranks
    assert results["flux_sch_u2", 0]["decisions"] == results["flux_sch_u2", 1]["decisions"]
    decisions = single["flux_sch_u2"][2]["decisions"]
    ranges = {key.rsplit("/", 1)[1]: actions for key, actions in decisions.items()}
    assert sorted(ranges) == ["range0", "range1"]
    program = read_manifest(root / "flux_sch_u2.dacc", None).programs[0]
    for g, (mask, gate) in enumerate(zip(MASKS, program.gates)):
        actions = ranges[f"range{g}"]
        assert [a == "computed" for a in actions] == mask == gate.mask
        assert actions == planned_actions(gate, STEPS)
    # order 1 forecasts once two computed steps are known (before that a skipped step reuses)
    assert ranges["range0"][4] == ranges["range1"][3] == "forecast" and ranges["range1"][1] == "reused"
    calls = results["flux_sch_u2", 0]["calls"]
    assert "c10d.allreduce_.default" not in calls  # a static schedule needs no agreement at run time
    ranges = [{seg.name for seg in program.segments[g.skip_first:g.skip_last + 1]} for g in program.gates]
    sites_per_range = [sum(not s.cross and s.segment in names for s in program.attention) for names in ranges]
    assert all(sites_per_range)
    computed = [sum(mask) for mask in MASKS]
    assert calls["dacc.seq_to_heads.default"] == 3 * sum(c * n for c, n in zip(computed, sites_per_range))


@pytest.mark.parametrize("one, parallel", [("flux_cal", "flux_cal_u2"), ("flux_tc", "flux_tc_c2")])
def test_a_parallel_plan_ships_the_knobs_its_single_process_twin_calibrates(artifacts, one, parallel):
    """What calibration chooses by running the artifact (a schedule's masks, TeaCache's polynomial
    and mapped threshold) is chosen on one process for a parallel plan, and its gates get exactly
    the single-process compile's knobs; flux_cal_u2's ranks then run them (the test above)."""
    artifacts(one, parallel)
    gates = [read_manifest(artifacts.root / f"{name}.dacc", None).programs[0].gates for name in (one, parallel)]
    assert len(gates[0]) == len(gates[1]) >= 1
    for a, b in zip(*gates):
        assert "ratio_map" in a.calibration and a.calibration == b.calibration
        assert (a.mask, a.threshold, a.rescale) == (b.mask, b.threshold, b.rescale)
    if one == "flux_cal":
        assert all(len(g.mask) == STEPS and not all(g.mask) for g in gates[1])  # each range skips some steps
    else:
        assert gates[1][0].rescale and gates[1][0].threshold > 0  # fitted, then mapped from cache_ratio


def test_uneven_tokens_are_padded_and_the_pads_never_count(root, two_ranks):
    """63 tokens over 2 ranks: each holds 32 rows; the exchanges and the probe leave the pad out."""
    results, single, inputs = two_ranks
    decisions = next(iter(single["flux_db_u2_odd"][2]["decisions"].values()))
    assert "reused" in decisions and "computed" in decisions  # the same skips as one process (checked above)
    tokens = inputs["odd"]["hidden_states"].shape[1] + inputs["odd"]["encoder_hidden_states"].shape[1]
    assert tokens % 2
    for rank in range(2):
        calls = results["flux_u2_odd", rank]["calls"]
        _exchanges_at_every_site(root, "flux_u2", calls)
        # each exchange hands over [B, H, rows per rank, D]: the 63 image tokens as 32 padded rows
        sent = results["flux_u2_odd", rank]["bytes"]["_c10d_functional.all_to_all_single.default"]
        assert sent == 4 * _sites(root, "flux_u2") * 2 * 2 * (4 + 32) * 16 * 4


@pytest.mark.slow  # 40 s: four processes on two cores
def test_four_ranks_cfg_times_ulysses_usp_fsdp_and_a_wrong_world_size(artifacts, tmp_path):
    root = artifacts("flux", "flux_u2", "flux_c2u2", "flux_u2r2", "flux_f2u2", "flux_u4", "flux_db", "flux_db_u2r2")
    flux, other = _inputs(FLUX, 13), _inputs(FLUX, 14)
    odd = _odd_tokens(flux, 61)  # 61 image tokens: 16 rows per rank, 3 of them pads on the last
    jobs = {"flux_c2u2": ("flux_c2u2", [flux]), "flux_u2r2": ("flux_u2r2", [flux]), "flux_u2": ("flux_u2", [flux]),
            "flux_db_u2r2": ("flux_db_u2r2", _generation(flux)),
            "flux_u2r2_odd": ("flux_u2r2", [odd]), "flux_u4_odd": ("flux_u4", [odd]),
            # the mesh is (fsdp, cfg, ulysses, ring): ranks 0-1 serve one request, ranks 2-3 another
            "flux_f2u2": ("flux_f2u2", {0: [flux], 1: [flux], 2: [other], 3: [other]})}
    results = _spawn(root, 4, jobs, tmp_path)
    (ref,), _, _ = _run(root, "flux", [flux])
    (ref_other,), _, _ = _run(root, "flux", [other])
    (ref_odd,), _, _ = _run(root, "flux", [odd])
    cached, _, cached_stats = _run(root, "flux_db", _generation(flux))
    assert "reused" in next(iter(cached_stats["decisions"].values()))
    _same_outputs(results, "flux_db_u2r2", 4, cached, cached_stats)  # a cache gate over USP's four ranks
    sites = _sites(root, "flux_u2r2")
    for rank in range(4):
        # the mesh's subgroups (cfg and ulysses pairs here) wait as long as the world group, not torch's 30 min
        assert results["flux_c2u2", rank]["timeouts"] == [str(default_timeout())]
        for name in ("flux_u2r2_odd", "flux_u4_odd"):  # uneven tokens under USP; 2 heads over 4 ranks
            got = results[name, rank]
            assert "error" not in got, got.get("error")
            assert rel_err(got["outs"][0], ref_odd) <= 1e-5, (name, rank)
        for name in ("flux_c2u2", "flux_u2r2"):
            got = results[name, rank]
            assert "error" not in got, got.get("error")
            assert rel_err(got["outs"][0], ref) <= 1e-5, (name, rank)
        c2u2 = results["flux_c2u2", rank]["calls"]
        # each cfg half's tokens over its ulysses pair, then the halves over the cfg pair
        assert c2u2["_c10d_functional.all_gather_into_tensor.default"] == 2
        assert c2u2["_c10d_functional.all_to_all_single.default"] == 4 * _sites(root, "flux_c2u2")
        # USP: heads exchanged over the ulysses pair, keys passed once around the ring pair, per site
        usp = results["flux_u2r2", rank]["calls"]
        assert usp["_c10d_functional.all_to_all_single.default"] == 4 * sites
        assert usp["dacc.ring_attention.default"] == usp["c10d.send.default"] == sites
        assert usp["_c10d_functional.all_gather_into_tensor.default"] == 1  # tokens over all four
        handed = results["flux_u2r2", rank]["bytes"]
        sent = (handed["_c10d_functional.all_to_all_single.default"] / 2
                + handed["_c10d_functional.all_gather_into_tensor.default"] * 3 + handed["c10d.send.default"])
        assert sent == _predicted_sent(root, "flux_u2r2", flux)[0]
        wrong = results["flux_u2", rank].get("error", "")
        assert "compiled for 2 ranks" in wrong and "has 4" in wrong
        hybrid = results["flux_f2u2", rank]
        assert "error" not in hybrid, hybrid.get("error")
        assert rel_err(hybrid["outs"][0], ref if rank < 2 else ref_other) <= 1e-5, rank
        assert hybrid["sharded"] == hybrid["params"] and hybrid["calls"]["c10d._allgather_base_.default"] == 6
        assert hybrid["calls"]["_c10d_functional.all_to_all_single.default"] == 4 * sites


@pytest.mark.slow  # 25 s: a second family's trace and two-rank run
def test_sd3_joint_attention_under_ulysses(artifacts, tmp_path):
    root = artifacts("sd3", "sd3_u2")
    sd3 = _inputs(model_file("sd3"), 12)
    results = _spawn(root, 2, {"sd3_u2": ("sd3_u2", [sd3])}, tmp_path)
    outs, _, stats = _run(root, "sd3", [sd3])
    _same_outputs(results, "sd3_u2", 2, outs, stats)
    _exchanges_at_every_site(root, "sd3_u2", results["sd3_u2", 0]["calls"])


@pytest.mark.slow  # 35 s: a third family's trace, three compiles and a two-rank run
def test_sequence_parallel_on_a_cross_attention_family(artifacts, tmp_path):
    """Wan: ulysses and ring equal one process, at the example's size and at 45 video tokens
    (uneven over 2 ranks); only self-attention is exchanged, cross-attention reads the whole text
    from its local queries. cfg, fsdp and a cache gate over cfg ranks equal one process too."""
    root = artifacts("wan", "wan_u2", "wan_r2", "wan_c2", "wan_f2", "wan_db", "wan_db_c2")
    wan = _inputs(WAN, 15, first=True)  # and 45 video tokens: 3 frames of 3 x 5 patches, uneven over 2
    wan_odd = {**wan, "hidden_states": torch.randn(2, 4, 3, 6, 10, generator=torch.Generator().manual_seed(16))}
    jobs, refs = {}, {}
    for name in ("wan_u2", "wan_r2"):
        jobs[name], refs[name] = (name, [wan]), ("wan", [wan])
        jobs[f"{name}_odd"], refs[f"{name}_odd"] = (name, [wan_odd]), ("wan", [wan_odd])
    jobs["wan_c2"], refs["wan_c2"] = ("wan_c2", [wan]), ("wan", [wan])
    jobs["wan_f2"], refs["wan_f2"] = ("wan_f2", [wan]), ("wan", [wan])  # both ranks serve the same request here
    jobs["wan_db_c2"], refs["wan_db_c2"] = ("wan_db_c2", _generation(wan)), ("wan_db", _generation(wan))
    results = _spawn(root, 2, jobs, tmp_path)
    single = {name: _run(root, ref, calls) for name, (ref, calls) in refs.items()}
    program = read_manifest(root / "wan_u2.dacc", None).programs[0]
    self_sites = sum(not s.cross for s in program.attention)
    assert self_sites and len(program.attention) == 2 * self_sites  # one self and one cross site per block
    assert {"computed", "reused"} <= set(next(iter(single["wan_db_c2"][2]["decisions"].values())))
    for name in ("wan_u2", "wan_r2", "wan_u2_odd", "wan_r2_odd", "wan_c2", "wan_f2", "wan_db_c2"):
        _same_outputs(results, name, 2, single[name][0], single[name][2])
    whole = sum(p.numel() * p.element_size() for p in _load(root / "wan.dacc").parameters())
    assert all(abs(results["wan_f2", r]["stored"] - whole / 2) <= 0.02 * whole for r in range(2))
    for rank in range(2):
        calls = results["wan_u2_odd", rank]["calls"]
        assert calls["dacc.seq_to_heads.default"] == 3 * self_sites and calls["dacc.heads_to_seq.default"] == self_sites
        assert results["wan_r2", rank]["calls"]["dacc.ring_attention.default"] == self_sites


def test_loading_without_a_process_group_says_how_to_launch(root):
    with pytest.raises(DaccError, match="torchrun --nproc_per_node 2"):
        dacc.load(root / "flux_u2.dacc")


def test_loading_on_the_wrong_world_size_is_refused(root, tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(DaccError, match="compiled for 2 ranks .*has 1"):
            dacc.load(root / "flux_u2.dacc")
    finally:
        dist.destroy_process_group()


def test_a_dead_rank_fails_the_others_with_a_clear_error(two_ranks):
    died = two_ranks[0][DIE]
    assert died["error"] is not None and "DaccError" in died["error"], died
    assert "dacc.seq_to_heads over the 'ulysses' group failed" in died["error"]
    assert died["seconds"] < 30  # gloo sees the closed peer; DACC_COLLECTIVE_TIMEOUT bounds any wait


def test_a_stalled_rank_fails_the_others_within_the_timeout(two_ranks):
    """Rank 1 alive but silent at the second step's gate: rank 0's reduce of the probe statistic
    gives up after the group's timeout, with dacc's error rather than torch's."""
    stalled = two_ranks[0][STALL]
    assert stalled["error"] is not None and "DaccError" in stalled["error"], stalled
    assert "dacc.cache gate all_reduce over the 'gate' group failed" in stalled["error"]
    assert STALL_TIMEOUT <= stalled["seconds"] < 3 * STALL_TIMEOUT


def test_fsdp_ranks_serve_their_own_requests_storing_half_the_weights(root, two_ranks):
    results, single, inputs = two_ranks
    fsdp = read_manifest(root / "flux_f2.dacc", None).fsdp
    whole = sum(p.numel() * p.element_size() for p in _load(root / "flux.dacc").parameters())
    for rank in range(2):
        got = results["flux_f2", rank]
        assert "error" not in got, got.get("error")
        (out,), (ref,) = got["outs"], single[f"flux_f2.{rank}"][0]
        assert rel_err(out, ref) <= 1e-5, (rank, rel_err(out, ref))
        assert got["sharded"] == got["params"] > 0  # every parameter is an FSDP2 DTensor
        assert abs(got["stored"] - whole / 2) <= 0.02 * whole  # about 1/P of the bytes on each rank
        # one gather per unit and call (prologue, each block, epilogue), each handing over one shard
        assert got["calls"]["c10d._allgather_base_.default"] == len(fsdp.units) == 6
        sent = got["bytes"]["c10d._allgather_base_.default"]
        assert sent == sum(u.shard_bytes for u in fsdp.units)
        assert sent == _predicted_sent(root, "flux_f2", inputs["flux"])[0]
    assert rel_err(results["flux_f2", 0]["outs"][0], results["flux_f2", 1]["outs"][0]) > 1e-2  # two requests
    # the memory map's stored weights: rank 0 holds the largest shard of every weight
    manifest = read_manifest(root / "flux_f2.dacc", None)
    env = {s.name: int(inputs["flux"][s.input].shape[s.dim]) for s in manifest.programs[0].symbols}
    assert memory_map(manifest, manifest.programs[0], env)[0].parts["weights"] == results["flux_f2", 0]["stored"]


def test_each_fsdp_rank_reads_and_checks_only_its_own_shard_file(root, two_ranks):
    results = two_ranks[0]
    shard = read_manifest(root / "flux_f2_bad.dacc", None).fsdp.files[1]
    assert "error" not in results["flux_f2_bad", 0], results["flux_f2_bad", 0].get("error")
    assert results["flux_f2_bad", 0]["sharded"] > 0  # rank 0 loaded its shards and never opened rank 1's
    error = results["flux_f2_bad", 1].get("error", "")
    assert f"artifact file '{shard}' was modified or corrupted" in error


def test_fsdp_ranks_share_the_most_cautious_gate_decision(two_ranks):
    """Ranks with shared weights must gather the same units at the same steps: they take one
    decision, computing whenever either rank's own gate would."""
    results, single, _ = two_ranks
    mine = [next(iter(single[f"flux_db_f2.{r}"][2]["decisions"].values())) for r in range(2)]
    shared = [next(iter(results["flux_db_f2", r]["decisions"].values())) for r in range(2)]
    assert shared[0] == shared[1]
    assert mine[0] != mine[1] and "reused" in shared[0]  # the requests differ, and the gate still skips
    assert shared[0] == mine[1]  # rank 1's latent changes faster: its decisions are the cautious ones
    for a, b in zip(results["flux_db_f2", 1]["outs"], single["flux_db_f2.1"][0]):
        assert rel_err(a, b) <= 1e-5


# -- parallel.auto (dacc/compiler/choose_parallel.py): every split partitioned for real and weighed
# by the cost model; the world-2 splits are the artifacts compiled above
# a free link and no dispatch cost: only compute and memory traffic separate the splits
FREE_LINK = DeviceProfile("free-link", matmul_flops=1e9, memory_bandwidth=1e12, memory_bytes=1e12,
                          link_bandwidth=1e15, link_latency=0.0, op_overhead=0.0, async_dispatch=False, source="test")


@pytest.fixture(scope="module")
def partition(root):
    """A split's manifest: the artifact compiled above for it when there is one (the same passes,
    unlowered), else the passes run on a copy of the shared trace."""
    compiled = {(1, 1, 2, 1): "flux_u2", (1, 2, 1, 1): "flux_c2", (1, 1, 1, 2): "flux_r2", (2, 1, 1, 1): "flux_f2"}
    manifests = {}

    def run(plan):
        p = plan.parallel
        key = (p.fsdp, p.cfg, p.ulysses, p.ring)
        if key not in manifests:
            manifests[key] = (read_manifest(root / f"{compiled[key]}.dacc", None) if key in compiled
                              else partition_manifest(shared_trace(FLUX), plan))
        return manifests[key]
    return run


def _auto(world: int, device: str, **more) -> object:
    return parse_plan({"num_inference_steps": 4, "parallel": {"auto": {"world_size": world, "device": device, **more}}})


def _profile(tmp_path: Path, **changes) -> str:
    return str(save_profile(DeviceProfile(**{**FREE_LINK.__dict__, **changes}), tmp_path / "device.yaml"))


def test_auto_splitting_the_work_beats_fsdp_until_memory_is_short(partition, tmp_path):
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


@pytest.mark.slow  # `make test-all`: a second trace and three partitions
def test_auto_lists_a_split_the_passes_refuse_with_their_reason(tmp_path):
    """The plain Flux file serves a batch of 3 (no CFG pair): cfg 2 is refused by split_cfg."""
    plain = shared_trace(model_file("flux"))
    partitions = {}

    def partition(plan):
        key = (plan.parallel.fsdp, plan.parallel.cfg, plan.parallel.ulysses, plan.parallel.ring)
        if key not in partitions:
            partitions[key] = partition_manifest(plain, plan)
        return partitions[key]
    _, choice = choose_parallel(_auto(2, _profile(tmp_path)), partition, lambda m: None, "test")
    invalid = [c for c in choice.candidates if c.verdict == "invalid"]
    assert [(c.cfg, c.step_seconds) for c in invalid] == [(2, 0.0)]
    assert "hidden_states.shape[0] = 3, not a multiple of 2" in invalid[0].why
    assert next(c for c in choice.candidates if c.verdict == "chosen").cfg == 1
    with pytest.raises(DaccError, match="no split of 2 ranks fits free-link's"):
        choose_parallel(_auto(2, _profile(tmp_path, memory_bytes=1.0)), partition, lambda m: None, "test")
    with pytest.raises(DaccError, match="parallel.auto.at names tokens"):
        choose_parallel(_auto(2, _profile(tmp_path), at={"tokens": 8}), partition, lambda m: None, "test")


def test_auto_compile_records_the_choice_and_inspect_explains_it(tmp_path):
    # one rank: the wiring from plan to manifest to report (the choice itself is tested above)
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"num_inference_steps: 4\nparallel:\n  auto: {{world_size: 1, device: {_profile(tmp_path)}}}\n")
    m = compile_model(FLUX, plan, tmp_path / "a.dacc", verify=False, log=lambda s: None,
                      traced=shared_trace(FLUX))
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
