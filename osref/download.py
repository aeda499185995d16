"""Dataset download: list a source once, split it into static groups, fetch one group per job.

The DAG must be plannable offline from config alone, so the number of groups per dataset is a
config value and the listing (which needs the network for hub/http sources) is a job of its own.
Group membership is a deterministic chunking of the sorted file list by bytes, written once into
``listing.json``, so reruns see the same groups.

Three source kinds behave identically downstream: each group ends as a directory of files plus a
``manifest.json`` with every file's size and sha256.

- ``hub``: ``huggingface_hub`` (``HfApi.list_repo_tree`` at the pinned revision, then
  ``hf_hub_download`` per file into the group directory). ``HF_ENDPOINT`` and ``HF_TOKEN`` are read
  by huggingface_hub itself; the token is never written anywhere by this module.
- ``local``: glob patterns; files are hard-linked (or copied across filesystems) into the tree.
- ``http``: a list of URLs (Nemotron-CC lives in Common Crawl's bucket, not on the hub).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---- listing ---------------------------------------------------------------------------------------

def _list_hub(dataset: dict) -> tuple[list[dict], str]:
    from huggingface_hub import HfApi  # noqa: PLC0415

    api = HfApi()
    info = api.dataset_info(dataset["repo_id"], revision=dataset["revision"])
    files = []
    for entry in api.list_repo_tree(dataset["repo_id"], revision=info.sha, repo_type="dataset", recursive=True):
        if not hasattr(entry, "size") or entry.__class__.__name__ != "RepoFile":
            continue
        if any(fnmatch.fnmatchcase(entry.path, pattern) for pattern in dataset.get("allow_patterns", ["*"])):
            lfs = getattr(entry, "lfs", None)
            files.append({"path": entry.path, "size": entry.size, "sha256": lfs.sha256 if lfs else None})
    return files, info.sha


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


def assign_groups(files: list[dict], n_groups: int) -> list[list[int]]:
    """Contiguous chunks of the path-sorted list with about equal bytes, at least one file each.

    Unknown sizes count as one byte. Returns indices into ``files``.
    """
    order = sorted(range(len(files)), key=lambda i: files[i]["path"])
    if len(order) < n_groups:
        raise ValueError(f"{len(order)} files cannot fill {n_groups} shard groups; lower shard_groups")
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
        "groups": assign_groups(files, dataset["shard_groups"]),
    }
    write_json_atomic(out_path, listing)
    return listing


# ---- fetching one group ----------------------------------------------------------------------------

def _fetch_hub(listing: dict, entry: dict, out_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download  # noqa: PLC0415

    return Path(
        hf_hub_download(
            listing["repo_id"], entry["path"], repo_type="dataset", revision=listing["revision"], local_dir=out_dir
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


def _fetch_http(entry: dict, out_dir: Path) -> Path:
    target = out_dir / entry["path"]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    offset = tmp.stat().st_size if tmp.exists() else 0
    request = urllib.request.Request(entry["url"], headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (https URLs from config)
        mode = "ab" if offset and response.status == 206 else "wb"
        with open(tmp, mode) as fh:
            shutil.copyfileobj(response, fh, CHUNK)
    os.replace(tmp, target)
    return target


def fetch_group(name: str, listing_path: str | Path, group: int, out_dir: str | Path, manifest_path: str | Path) -> dict:
    """Fetch (or materialise) every file of one group; finished files are skipped on rerun."""
    from tqdm import tqdm  # noqa: PLC0415

    listing = json.loads(Path(listing_path).read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [listing["files"][i] for i in listing["groups"][group]]
    records = []
    total = sum(e["size"] or 0 for e in entries) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name} group {group}", mininterval=2.0) as bar:
        for entry in entries:
            for attempt in range(2):
                if listing["source"] == "hub":
                    path = _fetch_hub(listing, entry, out_dir)
                elif listing["source"] == "local":
                    path = _fetch_local(entry, out_dir)
                else:
                    path = _fetch_http(entry, out_dir)
                digest = sha256_file(path)
                size = path.stat().st_size
                expected = entry.get("sha256")
                if (expected is None or digest == expected) and (entry["size"] is None or size == entry["size"]):
                    break
                path.unlink()  # never use a file whose hash or size is wrong
                if attempt == 1:
                    raise IOError(f"{name}: {entry['path']}: sha256 {digest} / {size} B, expected {expected} / {entry['size']} B")
            records.append({"path": str(path), "source_path": entry["path"], "size": size, "sha256": digest})
            bar.update(size)
    manifest = {"dataset": name, "group": group, "revision": listing.get("revision"), "files": records}
    write_json_atomic(manifest_path, manifest)
    return manifest
