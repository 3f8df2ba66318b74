"""The output directory's life cycle: reserve it before tracing, fill it, swap it into place.

- A compile writes into a sibling `.<name>.dacc-tmp-<pid>-<random>` holding an `INCOMPLETE`
  marker until the last moment: the runtime refuses to load a directory with that marker, so a
  half-written or unverified artifact is never loadable, even while the compile still runs.
- The temporary directory is made before tracing, so a read-only or missing output directory,
  or a disk without room for the weights, fails in a second rather than after the trace.
- A compile killed outright (SIGKILL, power loss) leaves its temporary directory behind; the
  next compile to the same output removes those whose process is gone.
- `--force` replaces only a directory whose manifest is a valid dacc manifest (schema and
  digest); through a symlink it replaces the artifact the link points to and keeps the link.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from dacc.schema.errors import DaccError
from dacc.schema.manifest import (INCOMPLETE, MANIFEST, MAX_MANIFEST_BYTES, SCHEMA_VERSION, manifest_digest,
                                  parse_manifest_file)

_FREE_MARGIN = 1.10  # weights plus stubs, graphs and manifest; an under-estimate fails at write time, clearly


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.dacc-tmp-"


def resolve_output(out: Path) -> Path:
    """The directory to write: a symlink's target (the link itself is kept)."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def check_output_path(out: Path, force: bool) -> Path:
    """Refuse outputs dacc must not touch; returns the resolved path to write."""
    if out.is_symlink() and not out.exists():
        raise DaccError(f"output path '{out}' is a symlink to nothing ({os.readlink(out)})", str(out),
                        "remove the link or point it at an existing artifact")
    target = resolve_output(out)
    if target.exists() or target.is_symlink():
        if not force:
            raise DaccError(f"output path '{out}' already exists", str(out), "choose another -o path or pass --force")
        why = _not_an_artifact(target)
        if why:
            raise DaccError(f"output path '{out}' exists and is not a dacc artifact ({why}); refusing to replace it",
                            str(out), "remove it yourself or choose another -o path")
    if not target.parent.is_dir():
        raise DaccError(f"parent directory '{target.parent}' does not exist", str(out), "create it first")
    return target


def _not_an_artifact(path: Path) -> str | None:
    if not path.is_dir() or path.is_symlink():
        return "not a directory"
    try:
        parse_manifest_file(path / MANIFEST)
    except DaccError as exc:
        return None if _other_version(path / MANIFEST) else exc.what
    return None


def _other_version(manifest: Path) -> bool:
    """An artifact another dacc version wrote: another schema version, and its own digest holds
    (an edited manifest does not pass), so `--force` may replace it as it would a current one."""
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(data, dict) and isinstance(data.get("schema_version"), int)
            and data["schema_version"] != SCHEMA_VERSION and data.get("digest") == manifest_digest(data))


def remove_stale(target: Path) -> list[Path]:
    """Temporary directories of earlier compiles to `target` whose process is gone."""
    removed = []
    for tmp in target.parent.glob(_tmp_prefix(target) + "*"):
        marker = tmp / INCOMPLETE
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        pid = _owner(tmp, marker, target)
        if pid is None:
            continue  # not ours
        if not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _owner(tmp: Path, marker: Path, target: Path) -> int | None:
    """The compile process that made `tmp`: the marker's pid, or (for a directory killed before its
    marker held a pid, so holding nothing else) the pid its name was given."""
    written = marker.read_text().strip() if marker.is_file() else ""
    if written:
        return int(written) if written.isdigit() else None
    # killed between making the directory and marking it, or between creating the marker and
    # writing its pid: the directory holds nothing else yet
    pid = tmp.name[len(_tmp_prefix(target)):].split("-", 1)[0]
    return int(pid) if pid.isdigit() and not any(p.name != INCOMPLETE for p in tmp.iterdir()) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends: a signal arriving while the temporary
    directory is made is delivered once its path is stored where the clean-up can see it.

    Python runs signal handlers in the main thread whichever thread the kernel picked, so masking
    the signals in this thread is not enough (torch's worker threads would still take them): the
    handlers themselves are swapped for a recorder, and what it recorded is raised again after."""
    held = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives Python-level signals
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)  # now handled as if it came just after the block


def reserve(out: Path, force: bool, need_bytes: int) -> Path:
    """Check the output, clean stale temporaries, and make the marked temporary directory."""
    target = check_output_path(out, force)
    remove_stale(target)
    free = shutil.disk_usage(target.parent).free
    if free < need_bytes * _FREE_MARGIN:
        raise DaccError(f"not enough free disk space for the artifact: about {need_bytes * _FREE_MARGIN / 2**20:.1f} MiB "
                        f"needed, {free / 2**20:.1f} MiB free", str(target.parent),
                        "free some space or write the artifact to another disk with -o")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target) + f"{os.getpid()}-", dir=target.parent))
        (tmp / INCOMPLETE).write_text(str(os.getpid()))
    except OSError as exc:
        raise write_error(exc, target.parent) from None
    return tmp


def write_error(exc: BaseException, where: Path) -> DaccError:
    """A write failure as one paragraph (torch's own writer reports a full disk with a C++ trace)."""
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text:
        return DaccError("the disk is full: the artifact could not be written", str(where),
                         "free some space or write the artifact to another disk with -o")
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (errno.EACCES, errno.EROFS, errno.EPERM):
        return DaccError(f"cannot write to '{where}' ({os.strerror(exc.errno)})", str(where),
                         "choose an -o path in a directory you can write to")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return DaccError(f"writing the artifact failed: {first[:300]}", str(where), "check the disk and try again")


def commit(tmp: Path, out: Path) -> None:
    """Make `tmp` the artifact at `out` (or at the artifact `out` links to), in one rename."""
    target = resolve_output(out)
    for path in [tmp, *tmp.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (tmp / INCOMPLETE).unlink()
    if target.exists():
        trash = target.with_name(f"{_tmp_prefix(target)}old-{os.getpid()}")
        os.rename(target, trash)
        (trash / INCOMPLETE).write_text(str(os.getpid()))  # if killed here, the next compile removes it
        os.rename(tmp, target)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, target)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
