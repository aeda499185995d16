"""What the local-data fingerprint costs a dry-run: a stat per file, a read only for changed files.

Usage:

    # 200 files of 4 MiB (800 MiB) in a temporary directory on the same filesystem as /tmp
    python scripts/bench_fingerprint.py --files 200 --mib 4

    # on the filesystem your corpus lives on (e.g. scratch)
    python scripts/bench_fingerprint.py --files 1000 --mib 16 --dir /scratch/$USER/fp-bench

Prints the seconds of: the listing (every file hashed once), the check `snakemake -n` runs when
nothing changed (stat only), after touching every file (each read once, content unchanged: no rerun),
again after that (stat only: the cache remembers), and after editing one file in place.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from osref.download import list_dataset
from osref.fingerprint import check_local_sources
from osref.paths import REPO_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--mib", type=int, default=4, help="size of each file")
    parser.add_argument("--dir", default=None, help="where to create the files (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        block = os.urandom(1 << 20)
        for i in range(args.files):
            path = root / "src" / f"dump-{i % 10}" / f"part-{i:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(block * args.mib)
        dataset = {
            "source": "local",
            "paths": [str(root / "src" / "*" / "*.jsonl")],
            "format": "jsonl",
            "shard_groups": 1,
            "sources_token": "new",
        }
        listing, cache = root / "raw" / "listing.json", root / "raw" / "local_hashes.json"

        def timed(label: str, action) -> None:
            started = time.perf_counter()
            result = action()
            hashed = getattr(result, "hashed", args.files)
            print(f"{label:<44} {time.perf_counter() - started:8.3f} s  files read: {hashed}")

        def touch_all() -> None:
            for path in (root / "src").rglob("*.jsonl"):
                st = path.stat()
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

        def check():
            return check_local_sources("bench", dataset, REPO_ROOT, listing, cache)

        print(f"{args.files} files x {args.mib} MiB = {args.files * args.mib} MiB in {root}")
        timed("listing (hashes every file)", lambda: list_dataset("bench", dataset, listing, REPO_ROOT))
        timed("dry-run check, nothing changed", check)
        touch_all()
        timed("dry-run check, every file touched", check)
        timed("dry-run check, again", check)
        edited = next((root / "src").rglob("*.jsonl"))
        with open(edited, "r+b") as fh:
            fh.write(b"edited")
        timed("dry-run check, one file edited in place", check)


if __name__ == "__main__":
    main()
