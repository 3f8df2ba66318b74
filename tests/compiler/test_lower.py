"""lower_segments: AOTInductor packages against the unlowered artifact on fresh inputs and sizes,
one package per distinct segment structure, refusal of untrusted, foreign or tampered packages,
and composition with the cache strategies.

One model (SD3: joint blocks, a `context_pre_only` last block, an epilogue that needs the latent
height and width) is lowered once per test process; every other plan here takes its packages
from that build through the compile cache, which the test also checks.
"""
from __future__ import annotations

from collections import Counter

import json
import platform
import shutil
import warnings

import pytest
import torch

import dacc
from dacc.cli import main
from dacc.compiler.compile import compile_model
from dacc.kernels import int8_onednn
from dacc.models import model_file
from dacc.runtime.lowered import cpu_isa
from dacc.schema.errors import DaccError
from dacc.schema.digest import file_digest
from dacc.schema.manifest import manifest_digest
from tests.conftest import rel_err, shared_trace

FAMILY = "sd3"
PLANS = {"none": "{strategy: none}", "dbcache": "{strategy: dbcache, options: {threshold: 0.3}}",
         "taylorseer": "{strategy: taylorseer, options: {order: 1, interval: 3}}",
         # a fixed rescale and fixed masks: nothing to calibrate (this family has no sample())
         "teacache": "{strategy: teacache, options: {threshold: 0.3, rescale: [1.0, 0.0]}}",
         "schedule": "{strategy: schedule, options: {taylorseer_order: 1, masks: [[false, false, true, false, true, false]]}}",
         "scm": "{strategy: scm, options: {mask: [false, true, true, false, true, false]}}"}
QUANTIZED = {"int8_dynamic": "{mode: int8_dynamic}", "int4_weight": "{mode: int4_weight, group_size: 32}"}


def _inputs(batch: int, height: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, height, width, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                pooled_projections=torch.randn(batch, 16, generator=g),
                timestep=torch.rand(batch, generator=g) * 1000)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{strategy: (lowered artifact, compile log)}, compiled on demand; packages are cached in one
    directory for the module. The unlowered reference is the same artifact loaded with
    lowered="off": the same graphs, run op by op."""
    root = tmp_path_factory.mktemp("lower")
    cache = {}
    patch = pytest.MonkeyPatch()
    patch.setenv("DACC_CACHE_DIR", str(root / "cache"))

    def get(strategy: str):
        if strategy not in cache:
            plan = root / f"{strategy}.yaml"
            section = (f"quantize: {QUANTIZED[strategy]}\n" if strategy in QUANTIZED
                       else f"cache: {PLANS[strategy]}\n")
            plan.write_text(f"num_inference_steps: 6\n{section}lower: {{backend: inductor, device: cpu}}\n")
            out, log = root / f"{strategy}.dacc", []
            # the compile verifies the lowered empty plan against eager and a quantized one against
            # its quantization run op by op; the tests compare the rest
            compile_model(model_file(FAMILY), plan, out, log=log.append,
                          verify=strategy == "none" or strategy in QUANTIZED, traced=shared_trace(model_file(FAMILY)))
            cache[strategy] = (out, log)
        return cache[strategy]
    yield get
    patch.undo()


@pytest.fixture(scope="module")
def loaded(built):
    """The empty plan's artifact, lowered and unlowered."""
    path, _ = built("none")
    return dacc.load(path, allow_native_code=True), dacc.load(path, lowered="off")


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


class CountedRuns:
    """A package's loader that counts its runs."""

    def __init__(self, loader):
        self.loader, self.runs = loader, 0

    def run(self, args):
        self.runs += 1
        return self.loader.run(args)

    def get_call_spec(self):
        return self.loader.get_call_spec()


def _shared_packages(model) -> list:
    """The model's loaded packages, once each (identical blocks share one)."""
    return list({id(seg.package): seg.package for seg in model.programs[0]._lowered}.values())


def test_lowered_segments_match_the_graph_on_fresh_sizes_and_values(loaded):
    lowered, plain = loaded
    assert lowered.programs[0].lowered_segments == len(lowered.manifest.programs[0].segments)
    assert plain.programs[0].lowered_segments == 0
    packages = _shared_packages(lowered)
    originals = [p.loader for p in packages]
    for p in packages:  # counts package calls: the graphs must not be what ran
        p.loader = CountedRuns(p.loader)
    try:
        # sizes the compile never saw, one of them not square: one package serves every token count
        for i, (b, h, w) in enumerate([(3, 12, 20), (2, 8, 24), (4, 16, 16)]):
            x = _inputs(b, h, w, seed=100 + i)
            want = plain(**x).sample
            got = lowered(**x).sample
            assert got.shape == want.shape == (b, 4, h, w)
            assert rel_err(got, want) < 1e-4
        calls = sum(p.loader.runs for p in packages)
    finally:
        for p, loader in zip(packages, originals):
            p.loader = loader
    assert calls == 3 * len(lowered.manifest.programs[0].segments)


def test_a_replayed_step_captures_with_package_instances_of_its_own(built):
    """A CUDA graph capture runs each lowered segment on a fresh instance of its package (a
    captured run would leave the shared instance unusable uncaptured: graph_step.py); on the CPU
    the capture is `eager_capture`. The step matches the shared packages' op-by-op step, and the
    shared instances ran only in the replays, not in the captures."""
    from dacc.runtime.graph_step import eager_capture

    path, _ = built("none")
    plain = dacc.load(path, allow_native_code=True)
    graphs = dacc.load(path, allow_native_code=True, cuda_graphs=True)
    graphs._graph_capture = eager_capture
    shared = _shared_packages(graphs)
    for p in shared:
        p.loader = CountedRuns(p.loader)
    for i, (b, h, w) in enumerate([(2, 8, 12), (2, 8, 12), (3, 12, 20)]):
        x = _inputs(b, h, w, seed=200 + i)
        assert rel_err(graphs(**x).sample, plain(**x).sample) < 1e-5
    step = next(iter(graphs._graph_steps.values()))
    assert all(p is not None and p.package not in shared for p in step.packages)
    pieces_per_call = graphs.stats()["graphs_replayed"] // graphs.stats()["calls"]
    assert pieces_per_call == 1  # the empty plan: one piece, every segment
    # each call's replay ran every shared package once per segment using it; the captures did not
    per_call = Counter(id(s.package) for s in graphs.programs[0]._lowered)
    assert {id(p): p.loader.runs for p in shared} == {id(p): 3 * per_call[id(p)] for p in shared}


def test_identical_blocks_share_one_package_and_the_manifest_says_so(built, capsys):
    path, log = built("none")
    data = _manifest(path)
    segments = {s["name"]: s["lowered"] for s in data["programs"][0]["segments"]}
    low = data["lowering"]
    assert all(call is not None for call in segments.values()), low["unlowered"]
    # blocks 0 and 1 are the same structure; the last block (context_pre_only) and the others are not
    assert segments["transformer_blocks.0"]["package"] == segments["transformer_blocks.1"]["package"]
    assert segments["transformer_blocks.2"]["package"] != segments["transformer_blocks.0"]["package"]
    files = {call["package"] for call in segments.values()}
    assert len(low["packages"]) == len(files) == len(segments) - 1
    assert sum(line.startswith("lowering [") and "built in" in line for line in log) == len(files)
    assert {f for f in data["files"] if f.startswith("lowered-")} == files  # hashed like every file
    assert low["cpu_isa"] == cpu_isa() and low["torch_version"] == torch.__version__
    # the epilogue unpatchifies with the latent height and width: passed as size carriers
    assert segments["epilogue"]["sizes"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(segments)} segment(s) served by {len(files)} package(s)" in out
    assert "program0/transformer_blocks.0, program0/transformer_blocks.1" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("epilogue "))
    assert row.rstrip().endswith(segments["epilogue"]["package"])


@pytest.mark.parametrize("strategy", [p for p in PLANS if p != "none"])
def test_cache_plans_reuse_the_packages_and_match_the_unlowered_plan(built, strategy):
    """Every strategy's gates run between packages. A structure the empty plan built comes from
    the compile cache; teacache's hoisted probe cuts the first block in two: the only new builds."""
    ahead = {s["lowered"]["package"] for s in _manifest(built("none")[0])["programs"][0]["segments"]}
    path, log = built(strategy)
    data = _manifest(path)
    segments = data["programs"][0]["segments"]
    assert all(s["lowered"] for s in segments), data["lowering"]["unlowered"]
    packages = {s["lowered"]["package"] for s in segments}
    assert sum("built in" in line for line in log) == len(packages - ahead) == (2 if strategy == "teacache" else 0)
    assert sum("package from the compile cache" in line for line in log) == len(packages & ahead)
    lowered, plain = dacc.load(path, allow_native_code=True), dacc.load(path, lowered="off")
    x = _inputs(2, 12, 16, seed=7)
    for step, t in enumerate(torch.linspace(600, 550, 6)):  # slowly changing inputs: the gate skips
        x = {**x, "timestep": torch.full((2,), float(t))}
        want, got = plain(**x).sample, lowered(**x).sample
        assert rel_err(got, want) < 1e-4, step
        x = {**x, "hidden_states": x["hidden_states"] - 0.01 * want}
    decisions = plain.stats()["decisions"]["default/program0"]
    assert lowered.stats()["decisions"]["default/program0"] == decisions
    assert set(decisions) != {"computed"}, "the gate never skipped: the test would not exercise the cached path"


@pytest.mark.slow  # its own packages: a quantized block is another structure (about 3 minutes)
@pytest.mark.parametrize("mode", list(QUANTIZED))
def test_quantized_linears_lower_into_the_packages_and_match_the_unlowered_artifact(built, mode):
    """The dacc operators a quantized program calls are compiled around by Inductor (extern calls
    through the dispatcher): every segment is lowered, and matches the same artifact run op by op
    (within 1e-4, the quantized reference's own rounding included) on fresh sizes."""
    path, log = built(mode)
    data = _manifest(path)
    assert all(s["lowered"] is not None for s in data["programs"][0]["segments"]), data["lowering"]["unlowered"]
    assert any(s["quant"] == mode for s in data["programs"][0]["linears"])
    lowered, plain = dacc.load(path, allow_native_code=True), dacc.load(path, lowered="off")
    assert lowered.programs[0].lowered_segments == len(data["programs"][0]["segments"])
    for i, (b, h, w) in enumerate([(2, 12, 20), (3, 8, 8)]):
        x = _inputs(b, h, w, seed=200 + i)
        assert rel_err(lowered(**x).sample, plain(**x).sample) < 1e-4
    if mode == "int8_dynamic" and int8_onednn.available():
        # a package hands the op the runtime's own weight tensors: each is packed once, not per call
        packed = {k: v[2] for k, v in int8_onednn._PACKED.items()}
        lowered(**_inputs(2, 8, 8, seed=300))
        assert int8_onednn._PACKED.keys() == packed.keys() and len(packed) > 0
        assert all(int8_onednn._PACKED[k][2] is v for k, v in packed.items())


def test_packages_are_native_code_loaded_only_when_trusted(built):
    path, _ = built("none")
    with pytest.raises(DaccError, match="native code") as exc:
        dacc.load(path)
    assert "allow_native_code=True" in exc.value.fix and "trusted_keys" in exc.value.fix
    with pytest.warns(UserWarning, match="unlowered"):
        fallback = dacc.load(path, lowered="fallback")
    assert fallback.programs[0].lowered_segments == 0
    assert dacc.load(path, lowered="off").programs[0].lowered_segments == 0
    with pytest.raises(DaccError, match="lowered="):
        dacc.load(path, lowered="sometimes")


def test_signed_lowered_artifacts_load_with_the_signers_key(built, tmp_path):
    path, _ = built("none")
    copy = tmp_path / "signed.dacc"
    shutil.copytree(path, copy)
    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert main(["sign", str(copy), "--key", str(tmp_path / "k")]) == 0
    loaded = dacc.load(copy, trusted_keys=[tmp_path / "k.pub"])
    assert loaded.programs[0].lowered_segments > 0


def _edited(path, tmp_path, edit) -> object:
    copy = tmp_path / "edited.dacc"
    shutil.copytree(path, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data, copy)
    data["files"] = {p.name: file_digest(p) for p in sorted(copy.iterdir()) if p.name != "manifest.json"}
    data["digest"] = manifest_digest(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("field, value, why", [
    ("torch_version", "2.0.0", "built by torch 2.0.0"),
    ("cpu_isa", "amx_tile_from_the_future", "instruction set"),
    ("device", "cuda", "CUDA")])
def test_foreign_packages_are_refused_or_fall_back(built, loaded, tmp_path, field, value, why):
    path, _ = built("none")
    copy = _edited(path, tmp_path, lambda data, root: data["lowering"].__setitem__(field, value))
    with pytest.raises(DaccError, match=why):
        dacc.load(copy, allow_native_code=True)
    if field == "torch_version":  # falling back is the same for every reason: loaded once
        with pytest.warns(UserWarning, match=why):
            fallback = dacc.load(copy, allow_native_code=True, lowered="fallback")
        assert fallback.programs[0].lowered_segments == 0
        x = _inputs(2, 8, 8, seed=3)
        assert rel_err(fallback(**x).sample, loaded[1](**x).sample) < 1e-6


def test_a_tampered_package_is_refused_before_it_is_loaded(built, tmp_path):
    path, _ = built("none")
    copy = tmp_path / "tampered.dacc"
    shutil.copytree(path, copy)
    package = next(copy.glob("lowered-*.pt2"))
    package.write_bytes(package.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(DaccError, match="modified or corrupted"):
        dacc.load(copy, allow_native_code=True)


def test_a_manifest_naming_an_unlisted_package_is_refused(built, tmp_path):
    path, _ = built("none")

    def edit(data, root):
        data["programs"][0]["segments"][0]["lowered"]["package"] = "lowered-elsewhere.pt2"
    with pytest.raises(DaccError, match="does not list"):
        dacc.load(_edited(path, tmp_path, edit), allow_native_code=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packages_match_the_unlowered_artifact_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DACC_CACHE_DIR", str(tmp_path / "cache"))
    plan = tmp_path / "plan.yaml"
    plan.write_text("num_inference_steps: 6\nlower: {backend: inductor, device: cuda}\n")
    # traced here, not shared: the compile's own checks run on the CPU after the runner moved
    compile_model(model_file(FAMILY), plan, tmp_path / "gpu.dacc", log=lambda m: None)
    lowered = dacc.load(tmp_path / "gpu.dacc", allow_native_code=True).to("cuda")
    plain = dacc.load(tmp_path / "gpu.dacc", lowered="off").to("cuda")
    assert lowered.programs[0].lowered_segments > 0
    x = {k: v.cuda() for k, v in _inputs(3, 12, 20, seed=5).items()}
    assert rel_err(lowered(**x).sample, plain(**x).sample) < 1e-4
    # the packages captured in a CUDA graph and replayed (a piece that failed to capture would warn)
    replayed = dacc.load(tmp_path / "gpu.dacc", allow_native_code=True, cuda_graphs=True).to("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (6, 7, 7):
            x = {k: v.cuda() for k, v in _inputs(3, 12, 20, seed=seed).items()}
            assert rel_err(replayed(**x).sample, plain(**x).sample) < 1e-4
    assert not [w for w in caught if "could not be captured" in str(w.message)]
    assert replayed.stats()["graphs_replayed"] == 3 and replayed.stats()["graphs_captured"] == 1


def test_a_cuda_plan_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    plan = tmp_path / "plan.yaml"
    plan.write_text("lower: {backend: inductor, device: cuda}\n")
    with pytest.raises(DaccError, match="no CUDA device"):
        compile_model(model_file(FAMILY), plan, tmp_path / "x.dacc", log=lambda m: None,
                      traced=shared_trace(model_file(FAMILY)))
    assert not (tmp_path / "x.dacc").exists()


def test_a_package_called_with_the_wrong_arguments_is_refused_at_load(built, tmp_path):
    """A manifest pairing a segment with another structure's package: the package would read past
    the arguments it is given, so the load compares its call spec with the segment first."""
    path, _ = built("none")

    def edit(data, root):
        segments = {s["name"]: s for s in data["programs"][0]["segments"]}
        segments["epilogue"]["lowered"]["package"] = segments["prologue"]["lowered"]["package"]
    with pytest.raises(DaccError, match="epilogue: package .* takes 17 tensors and returns 9"):
        dacc.load(_edited(path, tmp_path, edit), allow_native_code=True)


def test_a_size_of_one_is_exported_as_two():
    """Export would fix a dynamic size of 1 (a CFG rank's batch) as a constant: the build traces
    zeros with the symbols behind such sizes doubled, every other size and argument unchanged."""
    import sympy
    from torch.export import Dim
    from torch.utils._sympy.functions import FloorDiv

    from dacc.compiler.lowering import Canonical, build_args

    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    half = FloorDiv(s0 + 1, 2)  # the batch a cfg rank holds
    canon = Canonical(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), [0, 1], ["s1"],
                      [{0: Dim.AUTO, 1: Dim.AUTO}, None, {0: Dim.AUTO}], [{0: half, 1: s1}, {}, {0: s1}], set(), "k", 4)
    x, w, carrier = torch.randn(1, 5, 3), torch.randn(3, 3), torch.empty(5, 0)
    got = build_args(canon, [x, w, carrier], {s0: 2, s1: 5})
    assert got[0].shape == (2, 5, 3) and not got[0].any()
    assert got[1] is w and got[2] is carrier
    wide = torch.randn(2, 5, 3)
    assert all(a is b for a, b in zip(build_args(canon, [wide, w, carrier], {s0: 4, s1: 5}), [wide, w, carrier]))
    # a prologue takes the whole batch (s0 = 2) and halves it inside: the inner size decides
    canon.exprs[0] = {0: s0, 1: s1}
    canon.inner = {half, s1}
    got = build_args(canon, [wide, w, carrier], {s0: 2, s1: 5})
    assert got[0].shape == (4, 5, 3) and got[1] is w and got[2] is carrier


def test_lowering_for_cuda_moves_copies_not_the_traced_weights():
    """The runner a CUDA lowering moves to the device shares its parameters with the exported
    program and the traced model, which the checks after lowering run on the CPU."""
    from dacc.passes.lower_segments import new_parameters_on_conversion

    model = torch.nn.Linear(4, 4)
    ep = torch.export.export(model, (torch.randn(2, 4),))
    with new_parameters_on_conversion():
        moved = ep.module().to(torch.float64)  # dtype stands in for the device: both go through _apply
    assert all(p.dtype == torch.float64 for p in moved.parameters())
    assert model.weight.dtype == torch.float32 and all(t.dtype == torch.float32 for t in ep.state_dict.values())
    ep.module().to(torch.float64)  # the default conversion reaches through to the traced model
    assert model.weight.dtype == torch.float64


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 baselines only")
def test_cpu_packages_use_only_the_recorded_instruction_set(built):
    """A package's C++ is built for the baseline of the vector ISA the manifest records (the
    runtime checks that ISA), not for every extension of the building CPU (-march=native)."""
    import re
    import zipfile

    from dacc.compiler.lowering import host_march

    path, _ = built("none")
    isa = _manifest(path)["lowering"]["cpu_isa"]
    march = host_march("cpu")
    assert march == {"avx512": "x86-64-v4", "avx2": "x86-64-v3"}.get(isa.split()[0] if isa else "", "x86-64-v2")
    producers = set()
    for package in path.glob("lowered-*.pt2"):
        with zipfile.ZipFile(package) as z:
            for name in z.namelist():
                if name.endswith(".so"):  # the compiler's command line, kept in the debug info (-g1)
                    producers.update(re.findall(rb"GNU C\+\+\S* [^\n\x00]*", z.read(name)))
    if not producers:
        pytest.skip("the packages' objects record no compiler command line")
    for producer in producers:
        assert f"-march={march} ".encode() in producer and b"-march=native" not in producer, producer[:200]
        assert b"-mavx512fp16" not in producer and b"-mamx" not in producer.replace(b"-mno-amx", b"")
