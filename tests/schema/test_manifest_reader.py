"""The manifest reader on hostile data: from_dict raises only ValueError (read_manifest turns it into
a DaccError), expression trees are validated at load, and `dacc inspect` cannot hang on a tree."""
from __future__ import annotations

import json
import time

import pytest

from dacc.report import inspect_artifact
from dacc.runtime.artifact import read_manifest
from dacc.schema.errors import DaccError
from dacc.schema.manifest import Manifest, validate_manifest_trees
from dacc.schema.serial import from_dict
from tests.schema.manifest_fixture import valid_data, valid_manifest, write_artifact

HOSTILE_POW = ["pow", 10, ["pow", 10, 12]]


def _program(data: dict) -> dict:
    return data["programs"][0]


def test_the_fixture_reads_and_inspects(tmp_path):
    root = write_artifact(tmp_path / "a.dacc", valid_data())
    assert read_manifest(root).programs[0].guards == valid_manifest().programs[0].guards
    assert "FLOPs @ example" in inspect_artifact(root)


@pytest.mark.parametrize("edit, fragments", [
    (lambda p: p["guards"].__setitem__(0, HOSTILE_POW), ["programs[0].guards[0]", "exponent of 'pow'"]),
    (lambda p: p["segments"][1].__setitem__("flops_tree", HOSTILE_POW),
     ["programs[0].segments[1].flops_tree", "exponent of 'pow'"]),
    (lambda p: p["guards"].__setitem__(1, ["add", 1, 2]), ["programs[0].guards[1]", "a bool is required"]),
    (lambda p: p["guards"].__setitem__(2, ["open", "/etc/passwd"]), ["unknown operator 'open'"]),
    (lambda p: p["segments"][0].__setitem__("flops_tree", ["sym", "s7"]), ["unknown symbol 's7'"]),
    (lambda p: p["guard_text"].pop(), ["3 guards but 2 guard texts"]),
    (lambda p: p["symbols"][0].__setitem__("dim", 7), ["symbol 's0' reads dimension 7 of 'hidden_states'"]),
    (lambda p: p["symbols"][1].__setitem__("input", "return_dict"), ["not a tensor input"]),
    (lambda p: p["inputs"][0].__setitem__("shape", ["s0", "s9", "64"]), ["dimension 's9', neither a size"]),
    (lambda p: p["inputs"][0].__setitem__("shape", ["s0", "s1", "²"]), ["dimension '²'"]),
])
def test_read_manifest_refuses_bad_trees_and_symbols_quickly(tmp_path, edit, fragments):
    data = valid_data()
    edit(_program(data))
    root = write_artifact(tmp_path / "a.dacc", data)
    for reader in (read_manifest, inspect_artifact):  # `dacc inspect` reads through read_manifest
        start = time.perf_counter()
        with pytest.raises(DaccError) as info:
            reader(root)
        assert time.perf_counter() - start < 1.0
        msg = str(info.value)
        assert "manifest.json" in msg and "recompile" in msg and "\n" not in msg
        for fragment in fragments:
            assert fragment in msg, msg


def test_deeply_nested_json_is_a_dacc_error(tmp_path):
    root = write_artifact(tmp_path / "a.dacc", valid_data())
    (root / "manifest.json").write_text('{"schema_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DaccError, match="not valid JSON"):
        read_manifest(root)


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.__setitem__(1, "x"), "unknown field(s) 1"),  # a non-str key: sorting mixed keys raised TypeError
    (lambda d: d.__setitem__("schema_version", True), "schema_version: expected int, got bool"),
    (lambda d: d["files"].__setitem__(3, "abc"), "files: key 3 is not a string"),
    (lambda d: d.__setitem__("programs", {"a": 1}), "programs: expected a list, got dict"),
    (lambda d: _program(d)["inputs"][0].__setitem__("kind", ["tensor"] * 1000), "is not one of ('tensor', 'constant')"),
    (lambda d: d.__setitem__("x" * 10_000, 1), "unknown field(s) 'xxxx"),
    (lambda d: _program(d).__setitem__("symbols", [1]), "programs[0].symbols[0]: expected a mapping, got int"),
])
def test_from_dict_raises_only_short_value_errors(edit, fragment):
    data = valid_data()
    edit(data)
    with pytest.raises(ValueError) as info:
        from_dict(Manifest, data)
    assert fragment in str(info.value) and len(str(info.value)) < 300


def test_validate_manifest_trees_accepts_the_valid_manifest():
    validate_manifest_trees(valid_manifest(), "m.json")


def test_inspect_cannot_hang_on_a_tree_that_bypassed_load(tmp_path, monkeypatch):
    """Even if validation were skipped, evaluating the hostile tree is bounded."""
    import dacc.schema.manifest as manifest_mod
    data = valid_data()
    _program(data)["segments"][0]["flops_tree"] = HOSTILE_POW
    root = write_artifact(tmp_path / "a.dacc", data)
    monkeypatch.setattr(manifest_mod, "validate_manifest_trees", lambda manifest, where: None)
    start = time.perf_counter()
    with pytest.raises(DaccError, match="cannot evaluate FLOPs of prologue: exponent must be an integer"):
        inspect_artifact(root)
    assert time.perf_counter() - start < 1.0


def test_json_text_round_trip_of_the_fixture():
    data = {**json.loads(json.dumps(valid_data())), "digest": ""}
    assert from_dict(Manifest, data) == valid_manifest()


@pytest.mark.parametrize("raw", [{"role": "linaer"}, {"gate": "skipable"}, {"role": "Linear"}])
def test_a_node_annotation_with_an_unknown_role_is_refused(raw):
    from dacc.schema.manifest import NodeInfo
    from dacc.schema.serial import from_dict

    with pytest.raises(ValueError, match="is not one of"):
        from_dict(NodeInfo, {"segment": "transformer_blocks.0", **raw})
    assert from_dict(NodeInfo, {"role": "linear", "gate": "skippable"}).role == "linear"
