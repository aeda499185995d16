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
- ``local``: glob patterns; files are hard-linked (or copied across filesystems) into the tree.
- ``http``: a list of URLs, or of paths relative to ``base_url`` (Nemotron-CC lives in Common Crawl's
  bucket, not on the hub). Each file is written to ``<path>.partial`` and renamed when complete; a
  broken transfer, in-process or in a later run, resumes from the partial file with a Range request.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from osref.files import write_json_atomic

CHUNK = 1 << 20
HTTP_ATTEMPTS = 5  # per file, for the http source; each attempt resumes where the last one stopped
RETRYABLE_HTTP_STATUS = {408, 416, 429, 500, 502, 503, 504}  # 416: the partial file was dropped, start over


def sha256_file(path: str | Path) -> str:
    return file_digests(path)[0]


def file_digests(path: str | Path, git_blob: bool = False) -> tuple[str, str | None]:
    """sha256 and, when asked, git's blob id (``sha1(b"blob <size>\\0" + content)``), in one read."""
    digest = hashlib.sha256()
    blob = None
    if git_blob:
        blob = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))  # noqa: S324 (git's object id, not security)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
            if blob is not None:
                blob.update(block)
    return digest.hexdigest(), blob.hexdigest() if blob is not None else None


# ---- listing ---------------------------------------------------------------------------------------

def _hub_endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now; huggingface_hub itself reads it only once, at import."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def _list_hub(dataset: dict) -> tuple[list[dict], str]:
    from huggingface_hub import HfApi  # noqa: PLC0415
    from huggingface_hub.hf_api import RepoFile  # noqa: PLC0415
    from huggingface_hub.utils import filter_repo_objects  # noqa: PLC0415

    api = HfApi(endpoint=_hub_endpoint())
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
        {"path": entry.path, "size": entry.size, "sha256": entry.lfs.sha256 if entry.lfs else None,
         **({} if entry.lfs else {"git_sha1": entry.blob_id})}
        for entry in selected
    ]
    return files, commit


def _list_local(dataset: dict, repo_root: Path) -> list[dict]:
    files = []
    for pattern in dataset["paths"]:
        full = pattern if os.path.isabs(pattern) else str(repo_root / pattern)
        for path in sorted(glob.glob(full, recursive=True)):
            if os.path.isfile(path):
                files.append({"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": None})
    return files


def _list_http(dataset: dict, repo_root: Path) -> list[dict]:
    urls_file = Path(dataset["urls_file"])
    urls_file = urls_file if urls_file.is_absolute() else repo_root / urls_file
    opener = gzip.open if urls_file.suffix == ".gz" else open
    with opener(urls_file, "rt") as fh:
        entries = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    base = dataset.get("base_url", "")
    return [{"path": e, "url": e if "://" in e else base + e, "size": None, "sha256": None} for e in entries]


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
    return [order[a:b] for a, b in zip(cuts, cuts[1:])]


def list_dataset(name: str, dataset: dict, out_path: str | Path, repo_root: str | Path) -> dict:
    repo_root = Path(repo_root)
    revision = None
    if dataset["source"] == "hub":
        files, revision = _list_hub(dataset)
    elif dataset["source"] == "local":
        files = _list_local(dataset, repo_root)
    else:
        files = _list_http(dataset, repo_root)
    if not files:
        where = dataset.get("paths") or dataset.get("allow_patterns") or dataset.get("urls_file")
        raise FileNotFoundError(f"datasets.{name}: no files match {where}")
    listing = {
        "dataset": name,
        "source": dataset["source"],
        "repo_id": dataset.get("repo_id"),
        "revision": revision,
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


def _fetch_hub(listing: dict, entry: dict, out_dir: Path, progress: _JobProgress) -> Path:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    return Path(
        hf_hub_download(
            listing["repo_id"],
            entry["path"],
            repo_type=listing.get("repo_type", "dataset"),  # "model": a released checkpoint (osref.released_hub)
            revision=listing["revision"],
            local_dir=out_dir,
            endpoint=_hub_endpoint(),
            tqdm_class=progress.as_tqdm_class(),
        )
    )


def _fetch_local(entry: dict, out_dir: Path) -> Path:
    target = out_dir / Path(entry["path"]).name
    if target.exists() and target.stat().st_size == entry["size"]:
        return target
    tmp = target.with_name(target.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(entry["path"], tmp)
    except OSError:
        shutil.copyfile(entry["path"], tmp)
    os.replace(tmp, target)
    return target


def _http_target(entry: dict, out_dir: Path) -> Path:
    relative = urlsplit(entry["path"]).path.lstrip("/") if "://" in entry["path"] else entry["path"]
    return out_dir / relative


def _http_transfer(url: str, partial: Path, progress: _JobProgress) -> None:
    """Append the rest of ``url`` to ``partial`` (a Range request when it has bytes); raise if cut short."""
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)  # noqa: S310 (https URLs from config)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the partial file is not a prefix of this object: start over
            partial.unlink()
        raise
    with response:
        if offset and response.status != 206:  # server ignored the Range: the body is the whole object
            offset = 0
        progress.advance(offset)
        content_range = response.headers.get("Content-Range")
        content_length = response.headers.get("Content-Length")
        total = int(content_range.rsplit("/", 1)[1]) if content_range else (
            offset + int(content_length) if content_length else None
        )
        with open(partial, "ab" if offset else "wb") as fh:
            for block in iter(lambda: response.read(CHUNK), b""):
                fh.write(block)
                progress.advance(len(block))
    if total is not None and partial.stat().st_size != total:
        raise http.client.IncompleteRead(b"", total - partial.stat().st_size)


def _fetch_http(entry: dict, out_dir: Path, progress: _JobProgress) -> Path:
    target = _http_target(entry, out_dir)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        progress.file_discarded()  # recount from what is on disk
        try:
            _http_transfer(entry["url"], partial, progress)
            break
        except (OSError, http.client.HTTPException) as error:
            refused = isinstance(error, urllib.error.HTTPError) and error.code not in RETRYABLE_HTTP_STATUS
            if attempt == HTTP_ATTEMPTS or refused:
                raise
            print(f"{entry['url']}: {error!r}; resuming (attempt {attempt + 1}/{HTTP_ATTEMPTS})", file=sys.stderr)
            time.sleep(2 ** attempt - 2)  # 0, 2, 6, 14 s: retry a dropped connection at once, back off after
    os.replace(partial, target)
    return target


def fetch_group(name: str, listing_path: str | Path, group: int, out_dir: str | Path, manifest_path: str | Path) -> dict:
    """Fetch (or materialise) every file of one group; finished files are skipped on rerun."""
    from tqdm import tqdm  # noqa: PLC0415

    listing = json.loads(Path(listing_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if listing["source"] == "hub":
        _remove_stale_hub_partials(out_dir)
    entries = [listing["files"][i] for i in listing["groups"][group]]
    records = []
    total = sum(e["size"] or 0 for e in entries) or None
    refresh_seconds = 2.0 if sys.stderr.isatty() else 30.0  # Snakemake logs: a line every 30 s, not a flood
    bar_options = {"unit": "B", "unit_scale": True, "desc": f"{name} group {group}", "mininterval": refresh_seconds}
    with tqdm(total=total, **bar_options) as bar:
        progress = _JobProgress(bar)
        for entry in entries:
            for attempt in range(2):
                if listing["source"] == "hub":
                    path = _fetch_hub(listing, entry, out_dir, progress)
                elif listing["source"] == "local":
                    path = _fetch_local(entry, out_dir)
                else:
                    path = _fetch_http(entry, out_dir, progress)
                expected, expected_git = entry.get("sha256"), entry.get("git_sha1")
                digest, git_sha1 = file_digests(path, git_blob=expected_git is not None)
                size = path.stat().st_size
                if ((expected is None or digest == expected) and (expected_git is None or git_sha1 == expected_git)
                        and (entry["size"] is None or size == entry["size"])):
                    break
                path.unlink()  # never use a file whose hash or size is wrong
                progress.file_discarded()
                if attempt == 1:
                    got_git = f", git blob sha1 {git_sha1}" if expected_git else ""
                    want_git = f", git blob sha1 {expected_git}" if expected_git else ""
                    raise IOError(
                        f"{name}: {entry['path']}: sha256 {digest}{got_git} / {size} B after a re-fetch, "
                        f"expected sha256 {expected}{want_git} / {entry['size']} B"
                    )
            record = {"path": str(path), "source_path": entry["path"], "size": size, "sha256": digest}
            if git_sha1 is not None:
                record["git_sha1"] = git_sha1
            records.append(record)
            progress.file_done(size)
    manifest = {"dataset": name, "group": group, "revision": listing.get("revision"), "files": records}
    write_json_atomic(manifest_path, manifest)
    return manifest
