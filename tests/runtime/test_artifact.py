"""Artifact round-trip, tamper detection, pickle refusal and atomic writes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import dacc
from dacc.compiler.compile import compile_model
from dacc.models import model_file
from dacc.schema.errors import DaccError
from dacc.schema.manifest import SCHEMA_VERSION, manifest_digest
from tests.conftest import fresh_like, rel_err, shared_trace


@pytest.fixture
def artifact(compiled, tmp_path):
    dst = tmp_path / "copy.dacc"
    shutil.copytree(compiled("flux").path, dst)
    return dst


def test_layout_and_round_trip(compiled, artifact):
    names = sorted(p.name for p in artifact.iterdir())
    assert names == ["graph.txt", "manifest.json", "plan.yaml", "program0.pt2", "weights.safetensors"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["torch_version"] == torch.__version__ and manifest["passes"]
    # weights live once, in safetensors: the program archive holds only one-element stubs
    assert (artifact / "program0.pt2").stat().st_size < 2 * (artifact / "weights.safetensors").stat().st_size + 2e6
    c = compiled("flux")
    inputs = fresh_like(c.file.example_inputs(), seed=5)
    with torch.no_grad():
        ref = c.model(**inputs).sample
    assert rel_err(dacc.load(artifact)(**inputs).sample, ref) < 1e-5


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["weights.safetensors", "program0.pt2", "graph.txt", "plan.yaml"])
def test_a_modified_file_is_refused(artifact, victim):
    _flip_byte(artifact / victim, offset=len((artifact / victim).read_bytes()) // 2)
    with pytest.raises(DaccError, match=f"'{victim}' was modified or corrupted.*recompile"):
        dacc.load(artifact)


def test_an_edited_manifest_is_refused(artifact):
    data = json.loads((artifact / "manifest.json").read_text())
    data["num_inference_steps"] = 7
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DaccError, match="manifest was edited"):
        dacc.load(artifact)


def test_missing_and_extra_files_are_refused(artifact):
    (artifact / "notes.txt").write_text("hi")
    with pytest.raises(DaccError, match="does not list: notes.txt"):
        dacc.load(artifact)
    (artifact / "notes.txt").unlink()
    (artifact / "graph.txt").unlink()
    with pytest.raises(DaccError, match="'graph.txt' is missing"):
        dacc.load(artifact)


def test_incompatible_schema_version_is_refused(artifact):
    data = json.loads((artifact / "manifest.json").read_text())
    data["schema_version"] = 999
    data["digest"] = manifest_digest(data)
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DaccError, match=f"schema version 999 is not supported.*reads version {SCHEMA_VERSION}"):
        dacc.load(artifact)


def test_a_hostile_expression_tree_is_refused_at_load(artifact):
    """A guard that would take hours to evaluate (10 ** 10**12), digest recomputed to match."""
    data = json.loads((artifact / "manifest.json").read_text())
    data["programs"][0]["guards"].append(["pow", 10, ["pow", 10, 12]])
    data["programs"][0]["guard_text"].append("10**(10**12)")
    data["digest"] = manifest_digest(data)
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DaccError, match=r"invalid expression tree in programs\[0\]\.guards\[\d+\]: the exponent"):
        dacc.load(artifact)


def test_not_an_artifact(tmp_path):
    with pytest.raises(DaccError, match="not a dacc artifact"):
        dacc.load(tmp_path)


def test_failed_compile_leaves_nothing(tmp_path, monkeypatch):
    """A failure after files were written (here: in verification) removes the temporary directory."""
    import dacc.compiler.compile as compile_mod

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during verification")
    monkeypatch.setattr(compile_mod, "verify_artifact", boom)
    out = tmp_path / "out.dacc"
    with pytest.raises(RuntimeError, match="simulated"):
        compile_model(model_file("dit"), None, out, log=lambda m: None, traced=shared_trace(model_file("dit")))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_force_replaces(compiled, tmp_path):
    out = tmp_path / "out.dacc"
    shutil.copytree(compiled("dit").path, out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(DaccError, match="already exists.*--force"):
        compile_model(model_file("dit"), None, out, log=lambda m: None, traced=shared_trace(model_file("dit")))
    assert (out / "manifest.json").read_text() == before
    (tmp_path / "plan.yaml").write_text("num_inference_steps: 20\n")
    compile_model(model_file("dit"), tmp_path / "plan.yaml", out, force=True, log=lambda m: None,
                  traced=shared_trace(model_file("dit")), verify=False)
    assert dacc.load(out).manifest.num_inference_steps == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dacc", "plan.yaml"]


def test_force_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "important"
    out.mkdir()
    (out / "data.txt").write_text("keep me")
    with pytest.raises(DaccError, match="not a dacc artifact .*; refusing"):
        compile_model(model_file("dit"), None, out, force=True, log=lambda m: None,
                      traced=shared_trace(model_file("dit")))
    assert (out / "data.txt").read_text() == "keep me"


def test_the_model_config_and_its_hash_do_not_depend_on_set_order():
    """diffusers lists the config keys left at their defaults from a set, in an order that changes
    with each process's string hashing; the manifest's config (and its hash) must not."""
    from types import SimpleNamespace

    from dacc.compiler.artifact import model_config

    keys = ["qk_norm", "dual_attention_layers", "pos_embed_max_size"]
    configs = [model_config(SimpleNamespace(config={"num_layers": 2, "_use_default_values": order}))
               for order in (keys, keys[::-1])]
    assert configs[0] == configs[1] and configs[0]["_use_default_values"] == sorted(keys)
