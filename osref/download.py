"""Dataset download: list a source once, split it into static groups, fetch one group per job.

The DAG must be plannable offline from config alone, so the number of groups per dataset is a
config value (``shard_groups``: the whole listing's group count) and the listing (which needs the
network for hub/http sources) is a job of its own. Group membership is a deterministic chunking of
the whole sorted file list by bytes, written once into ``listing.json``, so reruns see the same
groups; which of them are fetched (the first n the runs need) is decided by the plan
(``osref.grid.run_group_count``), never here.

Three source kinds behave identically downstream: each group ends as a directory of files plus a
``manifest.json`` with every file's size and sha256. A file whose size or sha256 differs from the
listing is deleted and fetched once more; if it is still wrong the job fails naming the file, and no
manifest is written. One tqdm bar per job shows the group's bytes, rate and ETA.

- ``hub``: ``huggingface_hub``. Listing: ``HfApi.dataset_info(revision=...)`` resolves the configured
  branch/tag to a commit sha (stored as the listing's ``revision``, so every fetch is pinned to it),
  then ``list_repo_tree(recursive=True)`` at that sha, filtered with ``allow_patterns`` /
  ``ignore_patterns`` exactly like ``snapshot_download`` (fnmatch: ``*`` also matches ``/``; a pattern
  ending in ``/`` selects a folder); LFS files carry their sha256, other files git's blob sha1 (the
  tree's ``oid``), and a fetched file must match whichever it has. Fetch: ``hf_hub_download(local_dir=)``
  per file, which lands at ``<group dir>/<repo path>`` (sub-folders kept) and keeps its bookkeeping in
  ``<group dir>/.cache/huggingface/``: a file whose metadata matches the commit is returned without a
  request. huggingface_hub retries a broken transfer in-process with a Range request, but a killed job
  loses its partial ``*.incomplete`` file; the next run starts that file over (and removes strays).
  ``HF_ENDPOINT`` is read when a job runs, ``HF_TOKEN`` by huggingface_hub itself; this module never
  writes the token anywhere.
- ``local``: glob patterns. The listing names each file by its path relative to the files' common
  directory (so ``dump-1/train-0.parquet`` and ``dump-2/train-0.parquet`` stay two files) and records its
  sha256 (from a size + mtime cache, :mod:`osref.fingerprint`); the fetch copies each file into the group
  directory (a copy-on-write clone where the filesystem has one, else a plain copy: never a hard link,
  so an in-place edit of the source cannot change the "downloaded" copy) and checks it against that hash.
- ``http``: a list of URLs, or of paths relative to ``base_url`` (Nemotron-CC lives in Common Crawl's
  bucket, not on the hub): either the source's own list, fetched by the listing job (``list_url``,
  gzipped or plain) or a file (``urls_file``), filtered with ``allow_patterns``/``ignore_patterns`` like
  a hub tree; the listing records the list's sha256 (and refuses one that differs from ``list_sha256``).
  Each file is written to ``<path>.partial`` and renamed when complete; a broken transfer, in-process
  or in a later run, resumes from the partial file with a Range request. Size, a published digest,
  content type and magic bytes are checked, Retry-After is honoured (:mod:`osref.http_source`).

Every target, whatever the source, must resolve inside its group directory: a list entry, tree path or
listing entry that is absolute or climbs out with ``..`` fails the listing (and, for a hand-edited
listing, the fetch) naming the entry, before anything is read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import urlsplit

from osref import http_source
from osref.files import atomic_target, write_json_atomic
from osref.fingerprint import HashCache, local_files
from osref.paths import local_hash_cache

CHUNK = 1 << 20


class UnsafePath(ValueError):
    """A listing entry that would be written outside its group directory."""


def sha256_file(path: str | Path) -> str:
    return file_digests(path)[0]


def file_digests(path: str | Path, git_blob: bool = False, md5: bool = False) -> tuple[str, str | None, str | None]:
    """sha256 and, when asked, git's blob id (``sha1(b"blob <size>\\0" + content)``) and md5, in one read."""
    digest = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % os.path.getsize(path)) if git_blob else None  # git's object id
    md5_digest = hashlib.md5() if md5 else None  # what S3 publishes, not security
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            if blob is not None:
                blob.update(block)
            if md5_digest is not None:
                md5_digest.update(block)
    return (
        digest.hexdigest(),
        blob.hexdigest() if blob is not None else None,
        md5_digest.hexdigest() if md5_digest is not None else None,
    )


# ---- path containment -----------------------------------------------------------------------------


def _unsafe_reason(relative: str) -> str | None:
    """Why ``relative`` cannot name a file inside a directory, or None (the rule huggingface_hub applies to
    repo paths, for every source)."""
    if not relative or relative.endswith("/"):
        return "not a file name"
    if relative.startswith(("/", "\\")) or any(PureWindowsPath(part).drive for part in relative.split("/")):
        return "an absolute path"
    if ".." in relative.replace("\\", "/").split("/"):
        return "a '..' segment"
    if "\0" in relative:
        return "a NUL byte"
    return None


def checked_relative(name: str, entry: str, relative: str) -> str:
    """``relative`` if it stays inside a group directory; else fail naming the listing entry."""
    reason = _unsafe_reason(relative)
    if reason is not None:
        raise UnsafePath(
            f"{name}: listing entry {entry!r} would be written outside its group directory "
            f"({reason}); refused, nothing was fetched"
        )
    return str(PurePosixPath(relative))


def group_target(name: str, out_dir: Path, relative: str) -> Path:
    """``out_dir / relative``, refused (naming the entry) unless it resolves inside ``out_dir``."""
    target = out_dir / checked_relative(name, relative, relative)
    base = out_dir.resolve()
    resolved = target.resolve()
    if resolved == base or not resolved.is_relative_to(base):  # e.g. through a symlinked folder
        raise UnsafePath(
            f"{name}: listing entry {relative!r} would be written outside its group directory "
            f"(it resolves to {resolved}); refused, nothing was fetched"
        )
    return target


# ---- listing ---------------------------------------------------------------------------------------


def hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now; huggingface_hub itself reads it only once, at import."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def _list_hub(name: str, dataset: dict) -> tuple[list[dict], str | None]:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=hub_endpoint())
    commit = api.dataset_info(dataset["repo_id"], revision=dataset["revision"]).sha
    tree = api.list_repo_tree(dataset["repo_id"], revision=commit, repo_type="dataset", recursive=True)
    selected = filter_repo_objects(
        (entry for entry in tree if isinstance(entry, RepoFile)),
        allow_patterns=dataset.get("allow_patterns"),
        ignore_patterns=dataset.get("ignore_patterns"),
        key=lambda entry: entry.path,
    )
    # LFS files: the content's sha256. Other files: the tree's oid is git's blob sha1 of the content
    # (for an LFS file it is the pointer's, so it is recorded only for non-LFS files).
    files = [
        {
            "path": checked_relative(name, entry.path, entry.path),
            "size": entry.size,
            "sha256": entry.lfs.sha256 if entry.lfs else None,
            **({} if entry.lfs else {"git_sha1": entry.blob_id}),
        }
        for entry in selected
    ]
    return files, commit


def _list_local(dataset: dict, repo_root: Path, cache_path: str | Path) -> list[dict]:
    cache = HashCache.load(cache_path)
    files = []
    for path, relative in local_files(dataset, repo_root):
        known = cache.lookup(path)
        files.append(
            {
                "path": relative,
                "local_path": str(path),
                "size": known["size"],
                "mtime_ns": known["mtime_ns"],
                "sha256": known["sha256"],
            }
        )
    cache.save()
    return files


def _list_http(name: str, dataset: dict, repo_root: Path) -> tuple[list[dict], dict]:
    """Entries of the source's list (``list_url``, fetched now) or of a given list (``urls_file``), filtered."""
    from huggingface_hub.utils import filter_repo_objects

    base = dataset.get("base_url", "")
    if dataset.get("list_url"):
        url = dataset["list_url"] if "://" in dataset["list_url"] else base + dataset["list_url"]
        raw, origin = http_source.get_bytes(url), {"url": url}
        where = url
    else:
        urls_file = Path(dataset["urls_file"])
        urls_file = urls_file if urls_file.is_absolute() else repo_root / urls_file
        raw, origin = urls_file.read_bytes(), {"file": str(urls_file)}
        where = str(urls_file)
    digest = hashlib.sha256(raw).hexdigest()
    pinned = dataset.get("list_sha256")
    if pinned and digest != pinned:
        raise OSError(
            f"{name}: {where} has sha256 {digest}, datasets.{name}.list_sha256 says {pinned}; "
            "the source published a different list (update the pin deliberately, or list from a copy)"
        )
    entries = http_source.read_list(raw, where)
    selected = list(
        filter_repo_objects(
            entries, allow_patterns=dataset.get("allow_patterns"), ignore_patterns=dataset.get("ignore_patterns")
        )
    )
    files = []
    for entry in selected:
        relative = urlsplit(entry).path.lstrip("/") if "://" in entry else entry
        files.append(
            {
                "path": checked_relative(name, entry, relative),
                "url": entry if "://" in entry else base + entry,
                "size": None,
                "sha256": None,
            }
        )
    return files, {**origin, "sha256": digest, "entries": len(entries), "selected": len(selected)}


def assign_groups(files: list[dict], n_groups: int, key: str = "shard_groups") -> list[list[int]]:
    """Contiguous chunks of the path-sorted list with about equal bytes, at least one file each.

    Unknown sizes count as one byte. Returns indices into ``files``. The whole listing is always
    chunked, whatever share of it the runs use, so a group's membership never depends on a budget.
    """
    order = sorted(range(len(files)), key=lambda i: files[i]["path"])
    if len(order) < n_groups:
        raise ValueError(f"{key}: {len(order)} files cannot fill {n_groups} shard groups; lower it")
    cumulative = [0]
    for i in order:
        cumulative.append(cumulative[-1] + (files[i]["size"] or 1))
    cuts = [0]
    for k in range(1, n_groups):
        target = k * cumulative[-1] / n_groups
        candidates = range(cuts[-1] + 1, len(order) - (n_groups - k) + 1)
        cuts.append(min(candidates, key=lambda c: abs(cumulative[c] - target)))
    cuts.append(len(order))
    return [order[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def list_dataset(name: str, dataset: dict, out_path: str | Path, repo_root: str | Path) -> dict:
    """List a dataset's files and cut them into its static groups; writes ``out_path`` (atomically).

    ``dataset`` is the listing part of its config block (``osref.workflow.LISTING_KEYS``); for a local
    dataset its ``sources_token`` (:mod:`osref.fingerprint`) is recorded as given.
    """
    repo_root = Path(repo_root)
    revision, file_list = None, None
    if dataset["source"] == "hub":
        files, revision = _list_hub(name, dataset)
    elif dataset["source"] == "local":
        files = _list_local(dataset, repo_root, local_hash_cache(out_path))
    else:
        files, file_list = _list_http(name, dataset, repo_root)
    if not files:
        where = (
            dataset.get("paths") or dataset.get("allow_patterns") or dataset.get("urls_file") or dataset.get("list_url")
        )
        raise FileNotFoundError(f"datasets.{name}: no files match {where}")
    seen: dict[str, dict] = {}
    for entry in files:  # two entries on one target would overwrite each other and be tokenized twice
        if (first := seen.setdefault(entry["path"], entry)) is not entry:
            raise ValueError(
                f"{name}: listing entries {first.get('url', first['path'])!r} and "
                f"{entry.get('url', entry['path'])!r} would both be written to {entry['path']!r}"
            )
    listing = {
        "dataset": name,
        "source": dataset["source"],
        "format": dataset.get("format"),
        "repo_id": dataset.get("repo_id"),
        "revision": revision,
        **({"list": file_list} if file_list is not None else {}),
        **({"sources_token": dataset.get("sources_token") or "new"} if dataset["source"] == "local" else {}),
        "files": files,
        "groups": assign_groups(files, dataset["shard_groups"], f"datasets.{name}.shard_groups"),
    }
    write_json_atomic(out_path, listing)
    return listing


# ---- fetching one group ----------------------------------------------------------------------------


class _JobProgress:
    """The job's byte counter: bytes of the file in flight are taken back if that file is discarded."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.in_flight = 0

    def advance(self, n_bytes: int) -> None:
        self.bar.update(n_bytes)
        self.in_flight += n_bytes

    def file_done(self, size: int) -> None:
        self.bar.update(size - self.in_flight)
        self.in_flight = 0

    def file_discarded(self) -> None:
        self.bar.update(-self.in_flight)
        self.in_flight = 0

    def as_tqdm_class(self) -> type:
        """A stand-in for huggingface_hub's per-file bar that feeds this job's bar instead."""
        progress = self

        class ForwardingBar:
            def __init__(self, **_bar_options) -> None:
                pass

            def update(self, n_bytes: int = 1) -> None:
                progress.advance(n_bytes)

            def close(self) -> None:
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc_info) -> None:
                pass

        return ForwardingBar


def _remove_stale_hub_partials(out_dir: Path) -> None:
    """``*.incomplete`` files of a killed job can never be resumed by huggingface_hub; free the space."""
    for stale in (out_dir / ".cache" / "huggingface" / "download").rglob("*.incomplete"):
        stale.unlink(missing_ok=True)


def _fetch_hub(name: str, listing: dict, entry: dict, out_dir: Path, progress: _JobProgress) -> Path:
    from huggingface_hub import hf_hub_download

    group_target(name, out_dir, entry["path"])  # huggingface_hub checks too; fail with our message first
    return Path(
        hf_hub_download(
            listing["repo_id"],
            entry["path"],
            repo_type=listing.get("repo_type", "dataset"),  # "model": a released checkpoint (osref.released_hub)
            revision=listing["revision"],
            local_dir=out_dir,
            endpoint=hub_endpoint(),
            tqdm_class=progress.as_tqdm_class(),
        )
    )


_FICLONE = 0x40049409  # Linux ioctl: share the source's extents (btrfs, XFS, bcachefs); copy-on-write after


def _clone_or_copy(source: str | Path, target: Path) -> None:
    """A copy of ``source`` that later edits of the source cannot reach: a copy-on-write clone where the
    filesystem supports one (instant, no extra space until either side changes), a plain copy otherwise."""
    if sys.platform.startswith("linux"):
        import fcntl

        with open(source, "rb") as src, open(target, "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
                return
            except OSError:
                pass  # no reflinks here (ext4, NFS, Lustre, across filesystems): copy below
    shutil.copyfile(source, target)


def _fetch_local(name: str, entry: dict, out_dir: Path) -> Path:
    target = group_target(name, out_dir, entry["path"])
    if target.exists() and target.stat().st_size == entry["size"]:
        return target  # its sha256 is checked by the caller; a wrong copy is deleted and made again
    with atomic_target(target) as tmp:
        _clone_or_copy(entry["local_path"], tmp)
    return target


def _fetch_http(
    name: str, listing: dict, entry: dict, out_dir: Path, progress: _JobProgress
) -> tuple[Path, http_source.Remote]:
    target = group_target(name, out_dir, entry["path"])
    return target, http_source.fetch(entry["url"], target, listing.get("format"), progress)


def fetch_group(
    name: str, listing_path: str | Path, group: int, out_dir: str | Path, manifest_path: str | Path
) -> dict:
    """Fetch (or materialise) every file of one group; finished files are skipped on rerun."""
    from tqdm import tqdm

    listing = json.loads(Path(listing_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [listing["files"][i] for i in listing["groups"][group]]
    for entry in entries:  # every target is checked before anything is fetched
        group_target(name, out_dir, entry["path"])
    if listing["source"] == "hub":
        _remove_stale_hub_partials(out_dir)
    records = []
    total = sum(e["size"] or 0 for e in entries) or None
    refresh_seconds = 2.0 if sys.stderr.isatty() else 30.0  # Snakemake logs: a line every 30 s, not a flood
    bar_options = {"unit": "B", "unit_scale": True, "desc": f"{name} group {group}", "mininterval": refresh_seconds}
    with tqdm(total=total, **bar_options) as bar:
        progress = _JobProgress(bar)
        for entry in entries:
            for attempt in range(2):
                remote = None
                if listing["source"] == "hub":
                    path = _fetch_hub(name, listing, entry, out_dir, progress)
                elif listing["source"] == "local":
                    path = _fetch_local(name, entry, out_dir)
                else:
                    path, remote = _fetch_http(name, listing, entry, out_dir, progress)
                expected, expected_git = entry.get("sha256"), entry.get("git_sha1")
                published = remote.digest if remote is not None else None
                digest, git_sha1, md5 = file_digests(
                    path, git_blob=expected_git is not None, md5=published is not None and published[0] == "md5"
                )
                size = path.stat().st_size
                got_published = {"sha256": digest, "md5": md5}[published[0]] if published else None
                if (
                    (expected is None or digest == expected)
                    and (expected_git is None or git_sha1 == expected_git)
                    and (entry["size"] is None or size == entry["size"])
                    and (published is None or got_published == published[1])
                    and (remote is None or remote.size is None or size == remote.size)
                ):
                    break
                path.unlink()  # never use a file whose hash or size is wrong
                progress.file_discarded()
                if attempt == 1:
                    got_git = f", git blob sha1 {git_sha1}" if expected_git else ""
                    want_git = f", git blob sha1 {expected_git}" if expected_git else ""
                    got_pub = f", {published[0]} {got_published}" if published else ""
                    want_pub = f", published {published[0]} {published[1]}" if published else ""
                    want_size = entry["size"] if entry["size"] is not None else (remote.size if remote else None)
                    raise OSError(
                        f"{name}: {entry['path']}: sha256 {digest}{got_git}{got_pub} / {size} B after a re-fetch, "
                        f"expected sha256 {expected}{want_git}{want_pub} / {want_size} B"
                    )
            record = {"path": str(path), "source_path": entry["path"], "size": size, "sha256": digest}
            if git_sha1 is not None:
                record["git_sha1"] = git_sha1
            if remote is not None:
                record["url"] = entry["url"]
                if published is not None:
                    record["published_digest"] = f"{published[0]}:{published[1]}"
            records.append(record)
            progress.file_done(size)
    manifest = {"dataset": name, "group": group, "revision": listing.get("revision"), "files": records}
    write_json_atomic(manifest_path, manifest)
    return manifest
