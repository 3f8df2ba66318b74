"""What verifying an artifact's files costs at a first load: one sha256 over the whole file (the
digest before schema 3) against the chunked digest the manifest now records
(dacc/schema/digest.py), on one thread and on every core, over a synthetic weight file.
Repeats interleave the three and the file is read once first, so all run from the page cache:
this measures the hashing, the part more cores can take (a cold read runs at the disk's speed).

    python bench/hashing.py [--gib 2] [--repeats 5]

Writes bench/results/hashing.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, interleaved_rounds
from dacc.schema.digest import file_digest


def whole_file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    variants = {"one sha256 over the file": whole_file_sha256,
                "chunked, 1 thread": lambda path: file_digest(path, workers=1),
                f"chunked, {cores} threads": file_digest}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.bin"
        size = int(args.gib * (1 << 30))
        with open(path, "wb") as f:
            for _ in range(size // (64 << 20)):
                f.write(os.urandom(64 << 20))
        whole_file_sha256(path)  # into the page cache
        times = interleaved_rounds(variants, lambda digest: digest(path), args.repeats)
    gib = size / (1 << 30)
    report = {"gib": gib, "cores": cores, "repeats": args.repeats,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "gib_per_s": {k: gib / statistics.median(v) for k, v in times.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hashing.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, s in report["median_s"].items():
        print(f"{name:26s} {s:6.2f} s  {report['gib_per_s'][name]:5.2f} GiB/s  ({gib:.1f} GiB, {cores} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
