"""Verified stamps: hash an artifact's file in full once, not at every load.

A stamp records that the file with this identity (device, inode, size, modification and change
times in nanoseconds) had this digest when it was hashed at time V. Any write to the file, a
rename over it, or a chmod moves its change time, which only the kernel sets, so a file whose
identity still matches its stamp has not changed since, and the load skips re-hashing it (a 24 GB
weight file would otherwise cost a minute at each load). File times advance in coarse ticks, so a
change right after the hash could keep the old times: a stamp counts only when the file's change
time is more than RACY_NS before V (the rule git applies to its index); a newer file is hashed
again at the next load, and stamped then.

Stamps live in the user's cache directory ($DACC_CACHE_DIR, default ~/.cache/dacc);
DACC_VERIFY=full ignores them. Out of scope, as for every file of the user's own: someone who can
write the user's cache directory or set the system clock.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dacc.schema.digest import file_digest

RACY_NS = 2_000_000_000


def cache_root() -> Path:
    return Path(os.environ.get("DACC_CACHE_DIR") or Path.home() / ".cache" / "dacc")


def _identity(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _stamp_path(st: os.stat_result) -> Path:
    return cache_root() / "verified" / f"{st.st_dev}-{st.st_ino}.json"


def _record(st: os.stat_result, digest: str, verified_ns: int) -> None:
    """Best effort: a read-only or missing cache directory only means the next load hashes."""
    try:
        stamp = _stamp_path(st)
        stamp.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**_identity(st), "digest": digest, "verified_ns": verified_ns}))
        os.replace(tmp, stamp)
    except OSError:
        pass


def matches(path: Path, digest: str) -> bool:
    """Whether `path` has digest `digest` (dacc/schema/digest.py): from its stamp when its identity is unchanged, else by
    hashing it in full (and stamping it when it matches)."""
    st = os.stat(path)
    if os.environ.get("DACC_VERIFY") != "full":
        try:
            stamp = json.loads(_stamp_path(st).read_text())
            if ({k: stamp.get(k) for k in ("size", "mtime_ns", "ctime_ns", "digest")} == {**_identity(st), "digest": digest}
                    and isinstance(stamp.get("verified_ns"), int) and st.st_ctime_ns < stamp["verified_ns"] - RACY_NS):
                return True
        except (OSError, ValueError, AttributeError):
            pass
    started = time.time_ns()
    if file_digest(path) != digest:
        return False
    if os.stat(path).st_ctime_ns == st.st_ctime_ns:  # unchanged while it was hashed
        _record(st, digest, started)
    return True
