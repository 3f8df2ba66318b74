"""Verified stamps: a file hashed in full once is not hashed again while its identity holds; any
change to it, or DACC_VERIFY=full, brings the full hash back."""
from __future__ import annotations

import shutil
import time

import pytest

import dacc
from dacc.runtime import stamps
from dacc.schema.errors import DaccError


@pytest.fixture
def artifact(compiled, tmp_path, monkeypatch):
    monkeypatch.setenv("DACC_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "a.dacc"
    shutil.copytree(compiled("dit").path, path)
    return path


@pytest.fixture
def hashed(monkeypatch):
    """Names of the files hashed in full, per load; hashes taken as if 10 s after the files' last
    change (a fresh copy would otherwise be too recent to stamp, as it should be)."""
    seen: list[str] = []
    real_hash, real_now = stamps.file_digest, time.time_ns
    monkeypatch.setattr(stamps, "file_digest", lambda p: seen.append(p.name) or real_hash(p))
    monkeypatch.setattr(stamps.time, "time_ns", lambda: real_now() + 10_000_000_000)
    return seen


def test_a_second_load_hashes_nothing_and_a_changed_file_is_caught(artifact, hashed):
    dacc.load(artifact)
    first = sorted(hashed)
    assert "weights.safetensors" in first and "program0.pt2" in first
    hashed.clear()
    dacc.load(artifact)
    assert hashed == []
    time.sleep(0.05)  # past the file system's time tick, as any later edit would be
    weights = artifact / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DaccError, match="weights.safetensors.*modified or corrupted"):
        dacc.load(artifact)
    assert hashed == ["weights.safetensors"]


def test_verify_full_ignores_the_stamps(artifact, hashed, monkeypatch):
    dacc.load(artifact)
    hashed.clear()
    monkeypatch.setenv("DACC_VERIFY", "full")
    dacc.load(artifact)
    assert "weights.safetensors" in hashed


def test_a_file_changed_just_before_its_hash_is_not_stamped(compiled, tmp_path, monkeypatch):
    monkeypatch.setenv("DACC_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "a.dacc"
    shutil.copytree(compiled("dit").path, path)
    seen = []
    real_hash = stamps.file_digest
    monkeypatch.setattr(stamps, "file_digest", lambda p: seen.append(p.name) or real_hash(p))
    dacc.load(path)
    dacc.load(path)  # the copy is seconds old at most: too recent for its times to prove anything
    assert seen.count("weights.safetensors") == 2


