"""Fingerprints of a local dataset: which files it is, what they contain, and whether that changed.

A hub dataset is pinned by its commit and an http one by its list's sha256, but a ``source: local``
dataset is whatever its glob patterns find today, and users edit corpora in place. Snakemake only
looks at modification times of declared inputs, and a touched file must not cost a re-tokenization,
so the decision is made here, by content:

- **cheap first check**: each file's size and mtime (``stat``, no reads) against a cache of earlier
  hashes (``local_hashes.json`` next to the listing, seeded from the listing itself);
- **sha256 when they differ**: only files whose size or mtime changed are read; the cache remembers
  the new (size, mtime) → sha256, so a touched file is read once;
- **the decision**: the listing job records the token it ran with (``sources_token``). When today's
  files have the content the listing recorded, the token stays the recorded one; when content or the
  set of files differs, the token becomes a digest of the new content. The workflow passes the token
  as a parameter of ``list_dataset``, so Snakemake's ``params`` rerun trigger (set in both profiles)
  reruns the listing and, through it, download, tokenization and everything downstream — and
  :func:`check_local_sources` says which files changed and how.

Before the first listing nothing is read (the listing job runs anyway, token ``"new"``): a dry-run of
a big local corpus stays a ``stat`` per file. A change that keeps both size and mtime (a tool that
restores mtimes) is not seen, as with make or rsync's quick check.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osref.files import write_json_atomic

CHUNK = 1 << 20
MAX_CHANGES_SHOWN = 10


def local_files(dataset: dict[str, Any], repo_root: str | Path) -> list[tuple[Path, str]]:
    """The files of a local dataset as (absolute path, path relative to their common directory).

    Relative paths keep sub-folders (``CC-MAIN-2024-10/train-00000.parquet`` and
    ``CC-MAIN-2024-18/train-00000.parquet`` stay two files), are unique, and are sorted; they name the
    files in the listing and inside each group directory.
    """
    found: set[str] = set()
    for pattern in dataset["paths"]:
        full = pattern if os.path.isabs(pattern) else str(Path(repo_root) / pattern)
        found.update(os.path.abspath(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    if not found:
        return []
    base = os.path.commonpath([os.path.dirname(p) for p in found])
    return sorted(((Path(p), Path(os.path.relpath(p, base)).as_posix()) for p in found), key=lambda f: f[1])


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class HashCache:
    """sha256 of local files keyed by absolute path, valid while size and mtime_ns stay the same."""

    path: Path | None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    hashed: int = 0  # files read in this process
    dirty: bool = False

    @classmethod
    def load(cls, path: str | Path | None, listing: dict | None = None) -> HashCache:
        cache = cls(Path(path) if path else None)
        for entry in (listing or {}).get("files", []):
            if entry.get("local_path") and entry.get("sha256") and "mtime_ns" in entry:
                cache.entries[entry["local_path"]] = {k: entry[k] for k in ("size", "mtime_ns", "sha256")}
        if cache.path is not None and cache.path.exists():
            try:
                cache.entries.update(json.loads(cache.path.read_text())["files"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache only costs re-reading
        return cache

    def lookup(self, path: Path) -> dict[str, Any]:
        """{size, mtime_ns, sha256} of ``path`` now, reading it only if size or mtime changed."""
        st = path.stat()
        known = self.entries.get(str(path))
        if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
            return known
        record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(path)}
        self.entries[str(path)] = record
        self.hashed += 1
        self.dirty = True
        return record

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            write_json_atomic(self.path, {"files": self.entries})
            self.dirty = False
        except OSError:
            pass  # read-only data directory: the next check reads the changed files again


def content_token(files: dict[str, str]) -> str:
    """A digest of (relative path, sha256) pairs: equal exactly when the dataset's content is equal."""
    payload = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class SourceCheck:
    token: str  # the value of list_dataset's `sources_token` parameter
    changes: list[str]  # human-readable, one per changed / new / removed file
    hashed: int  # files read for their sha256 by this check


def check_local_sources(
    name: str, dataset: dict[str, Any], repo_root: str | Path, listing_path: str | Path, cache_path: str | Path
) -> SourceCheck:
    """Compare a local dataset's files now with its listing; see the module docstring."""
    listing_path = Path(listing_path)
    try:
        listing = json.loads(listing_path.read_text())
    except (OSError, ValueError):
        return SourceCheck("new", [], 0)  # not listed yet: the listing job runs anyway
    cache = HashCache.load(cache_path, listing)
    now = {relative: cache.lookup(path) for path, relative in local_files(dataset, repo_root)}
    cache.save()
    listed = {entry["path"]: entry for entry in listing.get("files", [])}
    changes = []
    for relative in sorted(set(now) | set(listed)):
        if relative not in listed:
            changes.append(f"{relative}: new")
        elif relative not in now:
            changes.append(f"{relative}: removed")
        elif now[relative]["sha256"] != listed[relative].get("sha256"):
            old, new = listed[relative].get("size"), now[relative]["size"]
            how = "same size, new mtime" if old == new else f"{old} -> {new} bytes"
            changes.append(f"{relative}: content changed ({how})")
    if not changes:
        return SourceCheck(listing.get("sources_token") or "new", [], cache.hashed)
    return SourceCheck(content_token({r: e["sha256"] for r, e in now.items()}), changes, cache.hashed)


def describe_changes(name: str, check: SourceCheck) -> str:
    """The message the workflow prints when a local dataset changed."""
    shown = check.changes[:MAX_CHANGES_SHOWN]
    more = f"; and {len(check.changes) - len(shown)} more" if len(check.changes) > len(shown) else ""
    return (
        f"datasets.{name}: the local files changed since they were listed: {'; '.join(shown)}{more}. "
        "Its listing, downloads and tokenization are redone, and every job after them "
        "(training jobs resume from a run's latest checkpoint: delete that run's checkpoints "
        "directory to train on the new data from the start)."
    )
