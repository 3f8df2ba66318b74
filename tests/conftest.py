"""Shared fixtures: one compile per family per session, golden-file comparison."""
from __future__ import annotations

import atexit
import difflib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter; chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
# compiled packages and verified stamps go to a cache of the test run's own, never the user's
os.environ["DACC_CACHE_DIR"] = tempfile.mkdtemp(prefix="dacc-test-cache-")
atexit.register(shutil.rmtree, os.environ["DACC_CACHE_DIR"], True)
# the tests' packages are built with the wrapper (not the kernels) at -O0: the same generated code,
# a fifth less build time; users' builds keep torch's default
os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: workers share the cores
    torch.set_num_threads(1)

from dacc.compiler.compile import TracedModel, compile_model, trace_model
from dacc.compiler.model_file import load_model_file
from dacc.models import model_file

GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", help="rewrite tests/golden/ from the current output")


@pytest.fixture
def golden(request):
    update = request.config.getoption("--update-goldens")

    def check(relpath: str, text: str) -> None:
        path = GOLDEN / relpath
        if update or not path.exists():
            if not update:
                pytest.fail(f"golden file {path} is missing; run pytest --update-goldens")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        expected = path.read_text()
        if text != expected:
            diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                                 f"golden/{relpath}", "actual", n=2))
            pytest.fail(f"graph differs from golden {relpath} (pytest --update-goldens to accept):\n{diff[:6000]}")
    return check


_TRACES: dict[str, TracedModel] = {}


def shared_trace(path) -> TracedModel:
    """One trace of a model file per test process (`torch.export` is most of a compile's time);
    `compile_model(..., traced=shared_trace(path))` runs the passes on a copy of it."""
    key = str(path)
    if key not in _TRACES:
        _TRACES[key] = trace_model(path, log=lambda m: None)
    return _TRACES[key]


class Compiled:
    def __init__(self, family: str, path: Path):
        self.family = family
        self.path = path
        self.graphs: dict[tuple[int, int, str], str] = {}
        self.file = load_model_file(model_file(family))
        self.model = self.file.build()
        # the family tests compare with eager themselves, on fresh inputs: the compile's own
        # verification (exercised by tests/compiler/test_output.py and the CLI) would repeat it
        self.manifest = compile_model(model_file(family), None, path, log=lambda m: None, verify=False,
                                      on_graph=lambda p, i, name, text: self.graphs.__setitem__((p, i, name), text),
                                      traced=shared_trace(model_file(family)))


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    cache: dict[str, Compiled] = {}

    def get(family: str) -> Compiled:
        if family not in cache:
            cache[family] = Compiled(family, tmp_path_factory.mktemp(family) / f"{family}.dacc")
        return cache[family]
    return get


def fresh_like(inputs: dict, seed: int) -> dict:
    """Same structure and shapes, new random values (ints stay within the example's range)."""
    g = torch.Generator().manual_seed(seed)

    def new(v):
        if isinstance(v, dict):
            return {k: new(x) for k, x in v.items()}
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return torch.randn(v.shape, generator=g, dtype=v.dtype) * v.std().clamp_min(1e-3) + v.mean()
        hi = int(v.max()) + 1
        return torch.randint(0, max(hi, 2), v.shape, generator=g, dtype=v.dtype)
    return {k: new(v) for k, v in inputs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# The longest files start first: each file runs on one worker (--dist loadfile), and a long file
# handed out last would run alone at the end and set the suite's wall time.
FIRST = ("tests/runtime/test_parallel.py", "tests/compiler/test_lower.py")


def pytest_collection_modifyitems(config, items):
    order = {path: i for i, path in enumerate(FIRST)}
    items.sort(key=lambda item: order.get(item.nodeid.split("::")[0], len(FIRST)))  # stable for the rest
