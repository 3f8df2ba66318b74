"""The chunked file digest: the definition recomputed here, independent of the thread count, and
moved by any flipped, dropped or appended byte (small chunks, so files span many of them)."""
from __future__ import annotations

import hashlib
import os

import pytest

from dacc.schema import digest


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(digest, "CHUNK", 1024)
    monkeypatch.setattr(digest, "READ", 300)  # reads that do not divide a chunk


def _definition(data: bytes) -> str:
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)] or [b""]
    top = hashlib.sha256(digest.DOMAIN + f"{len(data)}\n".encode())
    for c in chunks:
        top.update(hashlib.sha256(c).digest())
    return top.hexdigest()


@pytest.mark.parametrize("size", [0, 5, 1024, 1025, 10 * 1024 + 17])
def test_the_digest_is_its_definition_on_any_thread_count(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    want = _definition(data)
    assert {digest.file_digest(path, workers=w) for w in (1, 3, 8)} == {want}


def test_every_flipped_dropped_or_appended_byte_changes_it(tmp_path):
    data = bytearray(os.urandom(5 * 1024 + 3))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    original = digest.file_digest(path)
    seen = {original}
    for at in (0, 1023, 1024, 3000, len(data) - 1):  # chunk edges, the middle, the last byte
        flipped = bytearray(data)
        flipped[at] ^= 1
        path.write_bytes(flipped)
        seen.add(digest.file_digest(path))
    for changed in (data[:-1], data + b"\0", data[:1024]):
        path.write_bytes(changed)
        seen.add(digest.file_digest(path))
    assert len(seen) == 1 + 5 + 3
