"""Signed artifacts: trusted_keys accepts the signer's key and refuses unsigned, foreign and
re-signed-after-editing artifacts before anything else is read."""
from __future__ import annotations

import json
import shutil

import pytest

import dacc
from dacc.cli import main
from dacc.runtime.artifact import read_manifest
from dacc.schema.errors import DaccError
from dacc.schema.digest import file_digest
from dacc.schema.manifest import manifest_digest


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    assert main(["keygen", str(root / "alice")]) == 0
    assert main(["keygen", str(root / "mallory")]) == 0
    return root


@pytest.fixture
def signed(compiled, keys, tmp_path):
    dst = tmp_path / "signed.dacc"
    shutil.copytree(compiled("dit").path, dst)
    assert main(["sign", str(dst), "--key", str(keys / "alice")]) == 0
    return dst


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, capsys):
    assert (keys / "alice").stat().st_mode & 0o777 == 0o600
    assert len((keys / "alice.pub").read_text().strip()) == 64
    assert main(["keygen", str(keys / "alice")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_signers_key_is_accepted_in_every_form(signed, keys):
    public = (keys / "alice.pub").read_text().strip()
    for key in (str(keys / "alice.pub"), public, bytes.fromhex(public)):  # the check load() runs first
        assert read_manifest(signed, [key]).programs
    assert dacc.load(signed, trusted_keys=[keys / "alice.pub"]).manifest.programs


def test_unsigned_and_foreign_artifacts_are_refused(compiled, signed, keys):
    with pytest.raises(DaccError, match="is not signed, and trusted_keys were given"):
        dacc.load(compiled("dit").path, trusted_keys=[keys / "alice.pub"])
    with pytest.raises(DaccError, match="signed by ed25519:[0-9a-f]{16}, which is not a trusted key"):
        dacc.load(signed, trusted_keys=[keys / "mallory.pub"])
    assert dacc.load(signed).manifest.programs  # without trusted_keys the signature is not required


def test_editing_after_signing_is_caught_even_with_hashes_recomputed(signed, keys):
    (signed / "plan.yaml").write_text("num_inference_steps: 3\n")
    data = json.loads((signed / "manifest.json").read_text())
    data["files"]["plan.yaml"] = file_digest(signed / "plan.yaml")
    data["digest"] = manifest_digest(data)
    (signed / "manifest.json").write_text(json.dumps(data))
    assert dacc.load(signed).manifest.programs  # integrity alone is satisfied: anyone can rehash
    with pytest.raises(DaccError, match="signature does not match its manifest"):
        dacc.load(signed, trusted_keys=[keys / "alice.pub"])


def test_a_re_signature_by_another_key_is_refused(signed, keys):
    assert main(["sign", str(signed), "--key", str(keys / "mallory")]) == 0
    with pytest.raises(DaccError, match="not a trusted key"):
        dacc.load(signed, trusted_keys=[keys / "alice.pub"])


def test_compile_signs_with_sign_key(keys, tmp_path):
    from dacc.models import model_file
    out = tmp_path / "out.dacc"
    assert main(["compile", str(model_file("dit")), "-o", str(out), "--sign-key", str(keys / "alice"),
                 "--no-verify"]) == 0  # verification is the same with or without a signature
    assert dacc.load(out, trusted_keys=[keys / "alice.pub"]).manifest.programs


def test_a_bad_trusted_key_is_a_clear_error(signed):
    with pytest.raises(DaccError, match="neither a 64-digit hex key nor a readable .pub file"):
        dacc.load(signed, trusted_keys=["not-a-key"])


def test_inspect_shows_and_verifies_the_signature(signed, compiled, keys, capsys):
    assert main(["inspect", str(signed)]) == 0
    assert "not verified (pass --trusted-key" in capsys.readouterr().out
    assert main(["inspect", str(signed), "--trusted-key", str(keys / "alice.pub")]) == 0
    assert "verified against the trusted key" in capsys.readouterr().out
    assert main(["inspect", str(signed), "--trusted-key", str(keys / "mallory.pub")]) == 2
    assert "not a trusted key" in capsys.readouterr().err
    assert main(["inspect", str(compiled("dit").path)]) == 0
    assert "signature none" in capsys.readouterr().out
