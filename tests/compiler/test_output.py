"""The output directory: --force replaces only dacc artifacts, symlinks are followed without
leftovers, interrupted compiles leave nothing loadable, and disk problems fail early and clearly."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple

import pytest

import dacc
import dacc.compiler.artifact as artifact_mod
import dacc.compiler.compile as compile_mod
import dacc.compiler.output as output_mod
from dacc.compiler.compile import compile_model
from dacc.models import model_file
from dacc.schema.errors import DaccError

DIT = model_file("dit")  # the fastest family to compile
from tests.conftest import shared_trace


def _compile(out, share=True, **kw):
    """`share`: from the process's one trace of the model (tests that check a refusal comes before
    the trace pass False, so the trace they forbid would be reached). No verification unless a
    test asks: it is about what is written, not what it computes."""
    kw.setdefault("verify", False)
    return compile_model(DIT, None, out, log=lambda m: None, traced=shared_trace(DIT) if share else None, **kw)


def _no_trace(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("traced although the output could be refused first")
    monkeypatch.setattr(compile_mod, "trace", fail)


def test_force_keeps_a_directory_whose_manifest_is_not_dacc(tmp_path, monkeypatch):
    """A web project also has a manifest.json."""
    _no_trace(monkeypatch)
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text(json.dumps({"name": "my app", "start_url": "/"}))
    (site / "index.html").write_text("<html/>")
    with pytest.raises(DaccError, match="is not a dacc artifact .*schema version.*refusing to replace it"):
        _compile(site, force=True, share=False)
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]


def test_force_keeps_an_artifact_whose_manifest_was_edited(compiled, tmp_path, monkeypatch):
    out = tmp_path / "edited.dacc"
    shutil.copytree(compiled("dit").path, out)
    _no_trace(monkeypatch)
    data = json.loads((out / "manifest.json").read_text())
    data["num_inference_steps"] = 3  # digest no longer matches
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DaccError, match="digest does not match"):
        _compile(out, force=True, share=False)


def test_force_replaces_an_artifact_of_another_schema_version(compiled, tmp_path):
    """An artifact an older dacc wrote (its own digest holds) is still an artifact to --force."""
    from dacc.schema.manifest import SCHEMA_VERSION, manifest_digest

    out = tmp_path / "old.dacc"
    shutil.copytree(compiled("dit").path, out)
    data = json.loads((out / "manifest.json").read_text())
    data["schema_version"] = SCHEMA_VERSION - 1
    data["digest"] = manifest_digest(data)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DaccError, match="schema version"):
        dacc.load(out)
    _compile(out, force=True)
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION
    dacc.load(out)


def test_force_through_a_symlink_replaces_its_target_and_keeps_the_link(compiled, tmp_path):
    real = tmp_path / "v1.dacc"
    shutil.copytree(compiled("dit").path, real)
    link = tmp_path / "latest.dacc"
    link.symlink_to(real)
    (tmp_path / "plan.yaml").write_text("num_inference_steps: 17\n")
    compile_model(DIT, tmp_path / "plan.yaml", link, force=True, log=lambda m: None, traced=shared_trace(DIT),
                  verify=False)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert dacc.load(link).manifest.num_inference_steps == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.dacc", "plan.yaml", "v1.dacc"]


def test_a_dangling_symlink_is_refused(tmp_path, monkeypatch):
    _no_trace(monkeypatch)
    link = tmp_path / "out.dacc"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DaccError, match="symlink to nothing"):
        _compile(link, force=True, share=False)


def test_an_unwritable_directory_fails_before_the_trace(tmp_path, monkeypatch):
    _no_trace(monkeypatch)

    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(output_mod.tempfile, "mkdtemp", refuse)
    with pytest.raises(DaccError, match="cannot write to .*Read-only file system.*Fix: choose an -o path"):
        _compile(tmp_path / "out.dacc", share=False)


def test_a_disk_without_room_fails_before_the_trace(tmp_path, monkeypatch):
    _no_trace(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 1000, 1000))
    with pytest.raises(DaccError, match="not enough free disk space.*MiB needed"):
        _compile(tmp_path / "out.dacc", share=False)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_while_writing_gives_a_clear_error(tmp_path, monkeypatch):
    def full(*a, **k):  # torch's and safetensors' writers report it like this
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1110\nfile write failed")
    monkeypatch.setattr(artifact_mod, "save_file", full)
    with pytest.raises(DaccError, match="the disk is full"):
        _compile(tmp_path / "out.dacc")
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_compile_is_never_loadable(compiled, tmp_path, monkeypatch):
    """While verification runs, the temporary directory is complete but still marked."""
    seen = {}

    def peek(path, *a, **k):
        seen["path"] = path
        with pytest.raises(DaccError, match="unfinished compile"):
            dacc.load(path)
    monkeypatch.setattr(compile_mod, "verify_artifact", peek)
    _compile(tmp_path / "out.dacc", verify=True)
    assert seen["path"].name.startswith(".out.dacc.dacc-tmp-") and not seen["path"].exists()
    assert dacc.load(tmp_path / "out.dacc").manifest.programs


def _start_compile(tmp_path):
    out = tmp_path / "out.dacc"
    proc = subprocess.Popen([sys.executable, "-m", "dacc.cli", "compile", str(DIT), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.dacc.dacc-tmp-*/INCOMPLETE")):  # made and marked
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc, out


def test_sigterm_during_a_compile_leaves_nothing(tmp_path):
    proc, out = _start_compile(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_refused_then_cleaned_by_the_next_compile(tmp_path):
    proc, out = _start_compile(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    (left,) = tmp_path.glob(".out.dacc.dacc-tmp-*")
    with pytest.raises(DaccError, match="unfinished compile"):
        dacc.load(left)
    _compile(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dacc"]


def test_a_directory_killed_before_its_marker_is_cleaned_by_the_next_compile(tmp_path):
    """SIGKILL between making the temporary directory and marking it leaves it empty: the pid in
    its name says whose it was; a live process's empty directory and a stranger's are kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".out.dacc.dacc-tmp-{int(dead.stdout)}-abc"
    live = tmp_path / f".out.dacc.dacc-tmp-{os.getpid()}-def"
    stranger = tmp_path / ".out.dacc.dacc-tmp-notapid"
    for d in (orphan, live, stranger):
        d.mkdir()
    _compile(tmp_path / "out.dacc")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.dacc", live.name, stranger.name])


def test_a_signal_taken_by_another_thread_still_waits_for_the_block_to_end():
    """The kernel may hand SIGTERM to any thread that does not block it (torch has workers), and
    Python then runs the handler in the main thread at once: the block must still finish first."""
    gate = threading.Event()
    worker = threading.Thread(target=gate.wait)
    worker.start()
    steps = []

    def stop(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            with output_mod.deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(20):  # bytecode boundaries and GIL hand-overs where a handler could run
                    time.sleep(0.005)
                    steps.append(0)
                steps.append("stored")
            steps.append("after")  # not reached: the held signal is delivered as the block ends
    finally:
        signal.signal(signal.SIGTERM, previous)
        gate.set()
        worker.join()
    assert steps[-1] == "stored" and len(steps) == 21
    assert signal.getsignal(signal.SIGTERM) is previous
