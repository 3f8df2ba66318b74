"""A hostile artifact never runs code: each attack is built here, with the manifest's hashes and
digest recomputed (anyone can), and loading must refuse it without the payload ever running.

The payloads would create a marker file; every test checks that the file never appears."""
from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

import dacc
from dacc.schema.errors import DaccError
from dacc.schema.digest import file_digest
from dacc.schema.manifest import manifest_digest


class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def artifact(compiled, tmp_path):
    dst = tmp_path / "copy.dacc"
    shutil.copytree(compiled("flux").path, dst)
    return dst


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the artifact ran code"


def _rehash(artifact: Path, edit=None) -> None:
    """Recompute every hash and the digest, as an attacker would; `edit(data)` changes the manifest."""
    data = json.loads((artifact / "manifest.json").read_text())
    if edit:
        edit(data)
    data["files"] = {p.name: file_digest(p) for p in sorted(artifact.iterdir()) if p.name != "manifest.json"}
    data["digest"] = manifest_digest(data)
    (artifact / "manifest.json").write_text(json.dumps(data))


def _rewrite_archive(artifact: Path, change) -> None:
    """Copy program0.pt2 entry by entry through `change(name, data) -> [(name, data), ...]`."""
    pt2 = artifact / "program0.pt2"
    out = artifact / "rewritten"
    with zipfile.ZipFile(pt2) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            for name, data in change(item.filename, src.read(item.filename)):
                dst.writestr(name, data)
    out.replace(pt2)
    _rehash(artifact)


def _program_json(change):
    def edit(name, data):
        if name.endswith("models/model.json"):
            doc = json.loads(data)
            change(doc)
            data = json.dumps(doc).encode()
        return [(name, data)]
    return edit


def _refused(artifact, pattern):
    with pytest.raises(DaccError, match=pattern):
        dacc.load(artifact)


def test_the_untouched_copy_loads(artifact):
    assert dacc.load(artifact).manifest.programs  # the attacks below differ from it only by the payload


@pytest.mark.parametrize("entry", ["data/weights/model.pt", "data/constants/model.pt", "extra/payload.pkl"])
def test_a_legacy_pickle_entry_is_refused(artifact, marker, entry):
    def add(name, data):
        out = [(name, data)]
        if name.endswith("archive_format"):
            out.append((name.split("/")[0] + "/" + entry, pickle.dumps({"w": _Payload(marker)})))
        return out
    _rewrite_archive(artifact, add)
    _refused(artifact, "entry of unknown kind")


def test_pickled_sample_inputs_are_refused(artifact, marker):
    _rewrite_archive(artifact, lambda n, d: [(n, pickle.dumps(_Payload(marker)) if n.endswith("sample_inputs/model.pt")
                                              else d)])
    _refused(artifact, "more than the 0 its kind allows")


def test_a_pickle_declared_in_the_weights_config_is_refused(artifact, marker):
    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            data = json.dumps(config).encode()
        return [(name, data)]
    _rewrite_archive(artifact, edit)
    _refused(artifact, "declares pickled tensors")


def test_the_old_archive_format_is_refused(artifact, marker):
    pt2 = artifact / "program0.pt2"
    with zipfile.ZipFile(pt2, "w") as zf:
        zf.writestr("serialized_exported_program.json", b"{}")
        zf.writestr("serialized_state_dict.pt", pickle.dumps(_Payload(marker)))
        zf.writestr("serialized_constants.pt", pickle.dumps(_Payload(marker)))
    _rehash(artifact)
    _refused(artifact, "must hold one program folder|entry of unknown kind")


def test_a_compiled_library_entry_is_refused(artifact, marker):
    _rewrite_archive(artifact, lambda n, d: [(n, d)] + ([(n.split("/")[0] + "/data/aotinductor/model/x.so", b"\x7fELF")]
                                                        if n.endswith("archive_format") else []))
    _refused(artifact, "entry of unknown kind")


def test_guards_code_is_refused(artifact, marker):
    """torch would exec these lines when the program's module is built."""
    _rewrite_archive(artifact, _program_json(
        lambda doc: doc.__setitem__("guards_code", [f"open({str(marker)!r}, 'w').write('pwned') or True"])))
    _refused(artifact, "carries guards code")


def test_a_node_calling_python_is_refused(artifact, marker):
    """torch resolves node targets by getattr on the torch module: torch.os.system is reachable."""
    def change(doc):
        node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.add.Tensor")
        node["target"] = "torch.os.system"
    _rewrite_archive(artifact, _program_json(change))
    _refused(artifact, "calls 'torch.os.system', which is not an operator dacc loads")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch MARKER')",
    "Symbol('s0').__class__",
    "Pow(Integer(10), Pow(Integer(10), Integer(12)))",  # a power that would never finish
    "Integer(" + "9" * 200 + ")",
])
def test_symbolic_text_outside_the_grammar_is_refused(artifact, marker, expr):
    """torch parses symbolic sizes with sympify, which evaluates its text."""
    def change(doc):
        stack = [doc]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if "expr_str" in item:
                    item["expr_str"] = expr.replace("MARKER", str(marker))
                    return
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        raise AssertionError("no symbolic size in the program")
    _rewrite_archive(artifact, _program_json(change))
    _refused(artifact, "symbolic size .* (has an unexpected character|is not allowed)")


@pytest.mark.parametrize("name", ["../../elsewhere/x.pt2", "/etc/passwd", "sub/program0.pt2", ".."])
def test_program_paths_cannot_leave_the_artifact(artifact, tmp_path, name):
    def edit(data):
        data["programs"][0]["file"] = name
    _rehash(artifact, edit)
    _refused(artifact, "does not list with a hash")
    # listing the outside file as well does not help: names in `files` are plain names
    data = json.loads((artifact / "manifest.json").read_text())
    data["files"][name] = "0" * 64
    data["digest"] = manifest_digest(data)
    (artifact / "manifest.json").write_text(json.dumps(data))
    _refused(artifact, "not plain names inside the artifact")


def test_a_symlink_inside_the_artifact_is_refused(artifact, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (artifact / "graph.txt").unlink()
    (artifact / "graph.txt").symlink_to(outside)
    _rehash(artifact)
    _refused(artifact, "'graph.txt' is a symlink")


def test_the_attacks_are_real_under_torch_export_load(artifact, compiled, tmp_path):
    """The same crafted archives run their payload when read the way dacc no longer reads them."""
    import io

    import torch

    marker = tmp_path / "RAN"
    inputs = {**compiled("flux").file.example_inputs(), "return_dict": False}
    samples = io.BytesIO()
    torch.save(((), inputs), samples)  # plain tensors: torch reads them with weights_only=True

    def guards_and_samples(name, data):
        if name.endswith("sample_inputs/model.pt"):
            data = samples.getvalue()
        return _program_json(lambda doc: doc.__setitem__(
            "guards_code", [f"open({str(marker)!r}, 'w').write('x') > 0"]))(name, data)
    _rewrite_archive(artifact, guards_and_samples)
    module = torch.export.load(artifact / "program0.pt2").module()  # builds the guards function
    try:
        module(**inputs)
    except Exception:
        pass  # the stubbed weights may fail the call; the guards ran first
    assert marker.exists()
    marker.unlink()
    _rewrite_archive(artifact, lambda n, d: [(n, pickle.dumps(_Payload(marker)) if n.endswith("sample_inputs/model.pt")
                                              else d)])
    try:
        torch.export.load(artifact / "program0.pt2")
    except Exception:
        pass  # the payload runs while unpickling; what torch does with its result does not matter
    assert marker.exists()
    with pytest.raises(DaccError):
        dacc.load(artifact)


def _region(inner_target: str) -> dict:
    """A program JSON with an autocast region whose subgraph calls `inner_target`."""
    inner = {"target": inner_target, "inputs": [], "outputs": []}
    region = {"target": "torch.ops.higher_order.wrap_with_autocast",
              "inputs": [{"name": "body", "arg": {"as_graph": {"name": "body", "graph": {"nodes": [inner]}}}}]}
    return {"graph_module": {"graph": {"nodes": [region]}}}


def test_a_subgraph_inside_an_autocast_region_is_checked_like_the_graph():
    from dacc.runtime.program_archive import check_program_json

    check_program_json(_region("torch.ops.aten.mm.default"), "p")  # Mochi's autocast regions load
    with pytest.raises(DaccError, match="calls 'torch.os.system'"):
        check_program_json(_region("torch.os.system"), "p")
    doc = _region("torch.ops.aten.mm.default")
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.higher_order.invoke_subgraph_that_runs"
    with pytest.raises(DaccError, match="not an operator dacc loads"):
        check_program_json(doc, "p")


@pytest.mark.parametrize("expr, ok", [
    ("FloatPow(Integer(3), Float('0.5', precision=53))", True),  # Mochi's RoPE scale
    ("FloatPow(Integer(3), Float('1e300', precision=53))", False),
    ("Float('0.5', precision=__import__)", False),
    ("Float('0.5', precision=99999)", False),
])
def test_float_literals_are_read_with_bounded_exponents(expr, ok):
    from dacc.runtime.program_archive import check_sympy_text

    if ok:
        check_sympy_text(expr, "p")
    else:
        with pytest.raises(DaccError, match="is not allowed|unexpected"):
            check_sympy_text(expr, "p")
