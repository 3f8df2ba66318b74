"""Steps replayed as CUDA graphs (dacc/runtime/graph_step.py).

On the CPU the graph executor runs with `eager_capture`: each piece is run again into the memory
of its first outputs on every replay, the fixed-address contract a CUDA graph imposes. Against
the op-by-op executor on the same artifact, the same decisions and the same images show that the
static inputs, the skip writing where the computed range wrote, the residual slots, the forecast
weights in device memory and the kept probe are right. With CUDA, the same comparison runs with
real graphs. On the CPU, `cuda_graphs=True` alone never captures (tested)."""
from __future__ import annotations

import warnings

import pytest
import torch
import yaml

import dacc
from dacc.compiler.compile import compile_model
from dacc.demo import DEMO_MODEL
from dacc.models.demo import DEMO, load_encoder
from dacc.models.demo.sampler import generate
from dacc.models.flow import cfg_inputs
from dacc.runtime.graph_step import eager_capture
from tests.conftest import shared_trace

STEPS = 12
# the three kinds of gate: a residual probe with Taylor order 2 (reuse first, then forecasts over
# three slots), TeaCache's input probe compared step to step (one slot), and two static ranges
PLANS = {
    "dbcache": {"strategy": "dbcache", "options": {"threshold": 0.3, "taylorseer_order": 2}},
    "teacache": {"strategy": "teacache", "options": {"threshold": 0.3}},
    "schedule": {"strategy": "schedule", "options": {"ranges": 2, "taylorseer_order": 1, "masks": [
        [c == "1" for c in "110101001011"], [c == "1" for c in "111001010011"]]}},
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for name, cache in PLANS.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"num_inference_steps": STEPS, "cache": cache}))
        compile_model(DEMO_MODEL, root / f"{name}.yaml", root / f"{name}.dacc", log=lambda m: None, verify=False,
                      traced=shared_trace(DEMO_MODEL))
        out[name] = root / f"{name}.dacc"
    return out


@pytest.fixture(scope="module")
def pair(artifacts):
    """plan -> (op by op, replayed) loaded once for the module (a load is most of a test's time),
    reset for each use; a test that changes either puts it back."""
    loaded = {}

    def get(plan):
        if plan not in loaded:
            graphs = dacc.load(artifacts[plan], cuda_graphs=True)
            graphs._graph_capture = eager_capture
            loaded[plan] = dacc.load(artifacts[plan]), graphs
        for model in loaded[plan]:
            model.reset()
        return loaded[plan]
    return get


def _generations(model, device=None):
    """Two generations at batch 4 and one at batch 2 (a new shape: new captures)."""
    encoder = load_encoder()
    return [generate(model, encoder, torch.arange(n), steps=STEPS, seed=seed, device=device).images
            for n, seed in ((4, 3), (4, 5), (2, 7))]


@pytest.mark.parametrize("plan", list(PLANS))
def test_replayed_pieces_match_the_op_by_op_step(pair, plan):
    eager, graphs = pair(plan)
    want, got = _generations(eager), _generations(graphs)
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5), float((g - w).abs().max())
    e, s = eager.stats(), graphs.stats()
    assert s["decisions"] == e["decisions"]
    assert all(any(d != "computed" for d in ds) for ds in e["decisions"].values())  # every skip path replayed
    assert e["graphs_replayed"] == 0 and s["segments_computed"] == e["segments_computed"]
    assert s["graphs_replayed"] == s["calls"] * _pieces_per_step(graphs)
    assert s["graphs_captured"] == 2 * (_pieces_per_step(graphs) + len(graphs.manifest.programs[0].gates))  # 2 shapes


def _pieces_per_step(model) -> int:
    """Graphs replayed per call: per gate, the segments before it with its probe (none where it
    has no probe and follows the last range at once), then its computed or skipped range; a tail."""
    heads, done = 0, 0
    for gate in model.manifest.programs[0].gates:
        heads += gate.probe != "none" or gate.skip_first > done
        done = gate.skip_last + 1
    return heads + len(model.manifest.programs[0].gates) + 1


def test_an_output_held_across_the_next_call_keeps_its_values(pair):
    eager, graphs = pair("dbcache")
    first, second = (cfg_inputs(DEMO, torch.tensor([1, 2]), sigma, seed) for sigma, seed in ((0.9, 0), (0.8, 1)))
    held = graphs(**first, return_dict=False)[0]
    graphs(**second, return_dict=False)
    assert torch.equal(held, eager(**first, return_dict=False)[0])


def test_on_the_cpu_the_graph_path_is_never_taken(pair):
    plain, _ = pair("dbcache")
    want = _generations(plain)
    plain.cuda_graphs = True  # without a capture handed in: only a CUDA device would capture
    try:
        with pytest.warns(UserWarning, match="running op by op because the weights are not on a CUDA device") as seen:
            got = _generations(plain)
        assert sum("cuda_graphs=True" in str(w.message) for w in seen) == 1  # said once, not per call
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert plain.stats()["graphs_captured"] == plain.stats()["graphs_replayed"] == 0
    finally:
        plain.cuda_graphs = False


def test_a_piece_that_cannot_be_captured_runs_op_by_op(pair):
    calls = []

    def refuse_the_second(piece, pool):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return eager_capture(piece, pool)
    eager, graphs = pair("teacache")
    graphs._drop_graphs()
    graphs._graph_capture = refuse_the_second
    try:
        with pytest.warns(UserWarning, match=r"part of the step \(compute\) could not be captured.*not permitted"):
            got = _generations(graphs)
    finally:
        graphs._graph_capture = eager_capture
        graphs._drop_graphs()
    assert len(calls) == 8  # every piece of two shapes was offered to the capture
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-5) for g, w in zip(got, _generations(eager)))


def test_new_weights_reach_a_replayed_step(pair):
    """load_state_dict(assign=True) hands the segments new tensors: graphs captured over the old
    ones are dropped and captured again."""
    eager, graphs = pair("dbcache")
    graphs._drop_graphs()
    _generations(graphs)
    before = graphs.stats()["graphs_captured"]
    assert before > 0
    original = eager.state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in original.items()}
    try:
        for model in (eager, graphs):
            model.load_state_dict(state, assign=True)
            model.reset()
        assert not graphs._graph_steps
        got, want = _generations(graphs), _generations(eager)
        assert graphs.stats()["graphs_captured"] == before  # every piece captured again, over the new tensors
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(got, want))
    finally:
        for model in (eager, graphs):
            model.load_state_dict(original, assign=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("plan", list(PLANS))
def test_cuda_graphs_match_the_op_by_op_step_on_the_gpu(artifacts, plan):
    eager = dacc.load(artifacts[plan]).to("cuda")
    graphs = dacc.load(artifacts[plan], cuda_graphs=True).to("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _generations(graphs, "cuda")
    assert not [w for w in caught if "could not be captured" in str(w.message)]  # no piece fell back
    want = _generations(eager, "cuda")
    for w, g in zip(want, got):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4), float((g - w).abs().max())
    assert graphs.stats()["decisions"] == eager.stats()["decisions"]
    assert graphs.stats()["graphs_replayed"] == graphs.stats()["calls"] * _pieces_per_step(graphs)
