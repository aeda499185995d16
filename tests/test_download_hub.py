"""Download stage against a local mock hub: real huggingface_hub code, real HTTP, injected faults.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_DISABLE_XET`` when it is imported, so
hub fetches run ``scripts/download.py`` in a subprocess with the environment set, exactly as the
Snakemake rule does (``> log 2>&1``). Listings that are only a test's setup run in-process:
osref.download passes ``HF_ENDPOINT`` to huggingface_hub explicitly, so no library state needs
patching. The ``http`` source uses only the standard library and runs in-process.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hub_server import HubServer, Repo, git_blob_sha1  # tests/ is on sys.path under pytest
from huggingface_hub.errors import HfHubHTTPError

from osref.download import fetch_group, list_dataset, sha256_file
from osref.paths import REPO_ROOT

REPO_ID = "toy-org/toy-web"
TOKEN = "hf_TESTtokenNEVERwrittenANYWHERE0123"
V1 = "a" * 40  # the commit tag v1.0.0 points to
MAIN = "b" * 40  # a later commit that adds a dump, like fineweb-edu after v1.0.0


def _texts(seed: int, n_docs: int) -> list[str]:
    rng = random.Random(seed)
    words = ["data", "model", "token", "shard", "hub", "commit", "parquet", "range", "byte", "retry", "group"]
    return [" ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(60)) for _ in range(n_docs)]


def _parquet(seed: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": _texts(seed, 150)}), buffer, compression="zstd")
    return buffer.getvalue()


def _big_parquet(seed: int, n_bytes: int) -> bytes:
    """Incompressible text: huggingface_hub writes in 10 MiB chunks, so only a cut after the first chunk
    leaves bytes on disk to resume from."""
    rng = random.Random(seed)
    texts = [rng.randbytes(4096).hex() for _ in range(n_bytes // 8192 + 1)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer, compression="none")
    return buffer.getvalue()


def _jsonl_zst(seed: int) -> bytes:
    lines = "".join(json.dumps({"text": text}) + "\n" for text in _texts(seed, 150))
    return zstandard.ZstdCompressor().compress(lines.encode())


@functools.cache  # the blobs are the same for every test; building the 12 MB one takes a while
def _toy_commits() -> dict[str, dict[str, bytes]]:
    v1 = {
        ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n*.zst filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"# toy web corpus\n",
        "data/CC-MAIN-2024-10/train-00000-of-00002.parquet": _parquet(1),
        "data/CC-MAIN-2024-10/train-00001-of-00002.parquet": _big_parquet(2, 12 << 20),
        "train/chunk1/example_train_0.jsonl.zst": _jsonl_zst(3),
        "train/chunk2/example_train_1.jsonl.zst": _jsonl_zst(4),
        # not in LFS: the tree gives only git's blob sha1 for it
        "notes/part-0.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in _texts(6, 40)).encode(),
    }
    main = {**v1, "data/CC-MAIN-2024-18/train-00000-of-00001.parquet": _parquet(5)}
    return {V1: v1, MAIN: main}


def _toy_repo() -> Repo:
    return Repo(commits={sha: dict(tree) for sha, tree in _toy_commits().items()}, refs={"main": MAIN, "v1.0.0": V1})


DATASET = {
    "source": "hub",
    "repo_id": REPO_ID,
    "revision": "v1.0.0",
    "allow_patterns": ["data/*.parquet", "train/chunk1/"],
    "format": "parquet",
    "shard_groups": 2,
}
SELECTED = [
    "data/CC-MAIN-2024-10/train-00000-of-00002.parquet",
    "data/CC-MAIN-2024-10/train-00001-of-00002.parquet",
    "train/chunk1/example_train_0.jsonl.zst",
]
CUT_FILE = SELECTED[1]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running mock hub and the environment a download job gets (no real token, no offline mode)."""
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    server = HubServer(repos={REPO_ID: _toy_repo()}, page_size=3)
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
        yield server


def download_cli(*args: str, log: Path) -> subprocess.CompletedProcess:
    """``scripts/download.py`` as the Snakemake rule runs it: stdout and stderr into one log file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.run(
            [sys.executable, "scripts/download.py", *args],
            cwd=REPO_ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )


def fetch_cli(tmp_path: Path, group: int, log_name: str = "fetch") -> subprocess.CompletedProcess:
    group_dir = tmp_path / "raw" / f"group_{group:03d}"
    return download_cli(
        "fetch",
        "--name",
        "toy",
        "--listing",
        str(tmp_path / "raw" / "listing.json"),
        "--group",
        str(group),
        "--out-dir",
        str(group_dir),
        "--manifest",
        str(group_dir / "manifest.json"),
        log=tmp_path / "logs" / f"{log_name}_{group}.log",
    )


def list_in_process(tmp_path: Path, shard_groups: int = 1) -> dict:
    return list_dataset("toy", {**DATASET, "shard_groups": shard_groups}, tmp_path / "raw" / "listing.json", REPO_ROOT)


def blob(hub: HubServer, path: str) -> bytes:
    return hub.repos[REPO_ID].commits[V1][path]


def group_of(listing: dict, path: str) -> int:
    index = [f["path"] for f in listing["files"]].index(path)
    return next(g for g, members in enumerate(listing["groups"]) if index in members)


def test_listing_pins_the_commit_filters_like_snapshot_download_and_pages_the_tree(hub, tmp_path):
    done = download_cli(
        "list",
        "--name",
        "toy",
        "--dataset-json",
        json.dumps(DATASET),
        "--out",
        str(tmp_path / "raw" / "listing.json"),
        log=tmp_path / "logs" / "list.log",
    )
    assert done.returncode == 0, (tmp_path / "logs" / "list.log").read_text()
    listing = json.loads((tmp_path / "raw" / "listing.json").read_text())
    assert listing["revision"] == V1  # the tag resolved to its commit; main's extra dump is absent
    assert [f["path"] for f in listing["files"]] == SELECTED  # `*` crossed `/`; `train/chunk1/` = the folder
    for record in listing["files"]:
        assert record["sha256"] == hashlib.sha256(blob(hub, record["path"])).hexdigest()
        assert record["size"] == len(blob(hub, record["path"]))
    assert sorted(i for g in listing["groups"] for i in g) == [0, 1, 2] and len(listing["groups"]) == 2
    tree_pages = [r.path for r in hub.requests if "/tree/" in r.path]
    assert f"/tree/{V1}" in tree_pages[0] and len(tree_pages) >= 3 and "cursor=" in tree_pages[-1]


def test_fetch_lands_files_with_verified_hashes_and_a_rerun_transfers_nothing(hub, tmp_path):
    listing = list_in_process(tmp_path, shard_groups=2)
    for group in (0, 1):
        assert fetch_cli(tmp_path, group).returncode == 0, (tmp_path / "logs" / f"fetch_{group}.log").read_text()
    records = {}
    for group in (0, 1):
        manifest = json.loads((tmp_path / "raw" / f"group_{group:03d}" / "manifest.json").read_text())
        assert manifest["revision"] == V1 and manifest["group"] == group
        for record in manifest["files"]:
            assert Path(record["path"]) == (tmp_path / "raw" / f"group_{group:03d}").resolve() / record["source_path"]
            records[record["source_path"]] = record
    assert sorted(records) == SELECTED
    for path, record in records.items():
        assert record["sha256"] == hashlib.sha256(blob(hub, path)).hexdigest() == sha256_file(record["path"])
        assert record["size"] == len(blob(hub, path))
        assert [r.origin for r in hub.transfers(path)] == ["cdn"]  # LFS bytes come from the CDN origin
    assert "group 0" in (tmp_path / "logs" / "fetch_0.log").read_text()  # the job's own progress bar
    group_dir = Path(records[SELECTED[0]]["path"]).parents[2]
    bookkeeping = group_dir / ".cache" / "huggingface" / "download" / (SELECTED[0] + ".metadata")
    assert bookkeeping.read_text().splitlines()[:2] == [V1, records[SELECTED[0]]["sha256"]]  # commit, etag

    # Snakemake reruns a group whose manifest is missing: complete files cost no request at all
    group = group_of(listing, SELECTED[0])
    manifest_path = tmp_path / "raw" / f"group_{group:03d}" / "manifest.json"
    before = manifest_path.read_text()
    manifest_path.unlink()
    requests_before = len(hub.requests)
    assert fetch_cli(tmp_path, group, "rerun").returncode == 0
    assert hub.requests[requests_before:] == []
    assert manifest_path.read_text() == before


def test_a_transfer_cut_mid_file_resumes_in_process_with_a_range_request(hub, tmp_path):
    listing = list_in_process(tmp_path)
    cut_at = 11 << 20
    hub.cut_after[CUT_FILE] = (cut_at, 1)
    hub.cut_after[SELECTED[2]] = (5000, 1)  # cut before huggingface_hub wrote anything: restarts at 0
    assert fetch_cli(tmp_path, 0).returncode == 0, (tmp_path / "logs" / "fetch_0.log").read_text()
    first, resumed = [r.headers.get("range") for r in hub.transfers(CUT_FILE)]
    assert first is None and 0 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= cut_at
    assert [r.headers.get("range") for r in hub.transfers(SELECTED[2])] == [None, None]
    for record, listed in zip(_manifest(tmp_path, 0)["files"], listing["files"], strict=False):
        assert record["sha256"] == hashlib.sha256(blob(hub, record["source_path"])).hexdigest() == listed["sha256"]


def test_a_job_killed_mid_file_records_nothing_and_the_rerun_starts_that_file_over(hub, tmp_path):
    list_in_process(tmp_path)
    hub.stall_after[CUT_FILE] = (11 << 20, 1)  # hangs after the first 10 MiB chunk is on disk
    group_dir = tmp_path / "raw" / "group_000"
    job = subprocess.Popen(
        [
            sys.executable,
            "scripts/download.py",
            "fetch",
            "--name",
            "toy",
            "--listing",
            str(tmp_path / "raw" / "listing.json"),
            "--group",
            "0",
            "--out-dir",
            str(group_dir),
            "--manifest",
            str(group_dir / "manifest.json"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        partial = _wait_for_partial(group_dir)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    assert not (group_dir / "manifest.json").exists() and not (group_dir / CUT_FILE).exists()
    assert partial.exists()  # what a killed huggingface_hub download leaves behind

    assert fetch_cli(tmp_path, 0, "rerun").returncode == 0, (tmp_path / "logs" / "rerun_0.log").read_text()
    assert not list(group_dir.rglob("*.incomplete"))
    assert [r.headers.get("range") for r in hub.transfers(CUT_FILE)] == [None, None]  # no resume across restarts
    assert {r["source_path"]: r["sha256"] for r in _manifest(tmp_path, 0)["files"]}[CUT_FILE] == hashlib.sha256(
        blob(hub, CUT_FILE)
    ).hexdigest()


def test_wrong_bytes_are_deleted_and_fetched_again(hub, tmp_path):
    list_in_process(tmp_path)
    hub.corrupt[CUT_FILE] = 1
    assert fetch_cli(tmp_path, 0).returncode == 0, (tmp_path / "logs" / "fetch_0.log").read_text()
    assert len(hub.transfers(CUT_FILE)) == 2
    record = next(r for r in _manifest(tmp_path, 0)["files"] if r["source_path"] == CUT_FILE)
    assert record["sha256"] == hashlib.sha256(blob(hub, CUT_FILE)).hexdigest()


def test_bytes_that_stay_wrong_fail_the_job_naming_the_file_and_write_no_manifest(hub, tmp_path):
    list_in_process(tmp_path)
    hub.corrupt[CUT_FILE] = 99
    assert fetch_cli(tmp_path, 0).returncode != 0
    log = (tmp_path / "logs" / "fetch_0.log").read_text()
    assert f"toy: {CUT_FILE}: sha256" in log and "after a re-fetch" in log
    assert not (tmp_path / "raw" / "group_000" / "manifest.json").exists()
    assert not (tmp_path / "raw" / "group_000" / CUT_FILE).exists()


def test_hf_token_is_sent_to_the_hub_only_and_written_nowhere(hub, tmp_path, monkeypatch):
    hub.required_token = TOKEN
    with pytest.raises(HfHubHTTPError, match="401"):  # without the token the hub refuses, and says so
        list_in_process(tmp_path)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.requests.clear()
    done = download_cli(
        "list",
        "--name",
        "toy",
        "--dataset-json",
        json.dumps({**DATASET, "shard_groups": 1}),
        "--out",
        str(tmp_path / "raw" / "listing.json"),
        log=tmp_path / "logs" / "list.log",
    )
    assert done.returncode == 0, (tmp_path / "logs" / "list.log").read_text()
    assert fetch_cli(tmp_path, 0).returncode == 0, (tmp_path / "logs" / "fetch_0.log").read_text()
    hub_requests = [r for r in hub.requests if r.origin == "hub"]
    cdn_requests = [r for r in hub.requests if r.origin == "cdn"]
    assert hub_requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub_requests)
    assert cdn_requests and not any("authorization" in r.headers for r in cdn_requests)  # signed-URL host
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token leaked into {path}"


# ---- the http source kind (Nemotron-CC: a paths list + base_url) -------------------------------------

NEMOTRON = "contrib/Nemotron/Nemotron-CC/data-jsonl/quality=high/kind={kind}/kind2=x/part-{n}.jsonl.zstd"


def test_http_source_resumes_partial_files_with_range_requests(hub, tmp_path):
    paths = [NEMOTRON.format(kind=kind, n=n) for kind in ("actual", "synthetic") for n in (0, 1)]
    hub.files.update({path: _jsonl_zst(10 + i) for i, path in enumerate(paths)})
    with gzip.open(tmp_path / "data-jsonl.paths.gz", "wt") as fh:
        fh.write("".join(path + "\n" for path in paths))
    dataset = {
        "source": "http",
        "urls_file": str(tmp_path / "data-jsonl.paths.gz"),
        "base_url": f"{hub.cdn_url}/files/",
        "format": "jsonl.zstd",
        "shard_groups": 1,
    }
    list_dataset("nemotron", dataset, tmp_path / "listing.json", REPO_ROOT)
    group_dir = tmp_path / "group_000"
    # a previous job died 3000 bytes into paths[0]; one left a bogus partial longer than paths[1]
    (group_dir / paths[0]).parent.mkdir(parents=True)
    (group_dir / (paths[0] + ".partial")).write_bytes(hub.files[paths[0]][:3000])
    (group_dir / (paths[1] + ".partial")).write_bytes(b"x" * (len(hub.files[paths[1]]) + 10))
    hub.cut_after[paths[2]] = (4000, 1)  # and this one breaks during this job

    manifest = fetch_group("nemotron", tmp_path / "listing.json", 0, group_dir, group_dir / "manifest.json")

    ranges = {path: [r.headers.get("range") for r in hub.transfers(path)] for path in paths}
    assert ranges[paths[0]] == ["bytes=3000-"]
    assert ranges[paths[1]] == [f"bytes={len(hub.files[paths[1]]) + 10}-", None]  # 416 → started over
    assert ranges[paths[2]] == [None, "bytes=4000-"]
    assert ranges[paths[3]] == [None]
    assert [r["source_path"] for r in manifest["files"]] == sorted(paths)
    for record in manifest["files"]:
        assert record["sha256"] == hashlib.sha256(hub.files[record["source_path"]]).hexdigest()
        assert Path(record["path"]) == group_dir / record["source_path"]  # http: sub-folders kept
    assert not list(group_dir.rglob("*.partial"))


def _manifest(tmp_path: Path, group: int) -> dict:
    return json.loads((tmp_path / "raw" / f"group_{group:03d}" / "manifest.json").read_text())


def _wait_for_partial(group_dir: Path, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in group_dir.rglob("*.incomplete"):
            if path.stat().st_size > 0:
                return path
        time.sleep(0.05)
    raise AssertionError(f"no partial download under {group_dir}")


# ---- files outside LFS: verified by git's blob sha1 ---------------------------------------------------

PLAIN_FILE = "notes/part-0.jsonl"
PLAIN_DATASET = {
    **DATASET,
    "allow_patterns": ["notes/*", "data/CC-MAIN-2024-10/train-00000-of-00002.parquet"],
    "format": "jsonl",
    "shard_groups": 1,
}


def test_a_file_outside_lfs_is_listed_and_checked_by_its_git_blob_sha1(hub, tmp_path):
    listing = list_dataset("toy", PLAIN_DATASET, tmp_path / "raw" / "listing.json", REPO_ROOT)
    records = {f["path"]: f for f in listing["files"]}
    data = blob(hub, PLAIN_FILE)
    assert records[PLAIN_FILE]["sha256"] is None  # the hub gives no sha256 for it
    assert (
        records[PLAIN_FILE]["git_sha1"]
        == git_blob_sha1(data)
        == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    )
    lfs = records["data/CC-MAIN-2024-10/train-00000-of-00002.parquet"]
    assert "git_sha1" not in lfs and lfs["sha256"]  # an LFS file's oid is its pointer's, not its content's

    hub.corrupt[PLAIN_FILE] = 1  # the first transfer delivers wrong bytes with a correct size
    assert fetch_cli(tmp_path, 0).returncode == 0, (tmp_path / "logs" / "fetch_0.log").read_text()
    assert len(hub.transfers(PLAIN_FILE)) == 2
    record = next(r for r in _manifest(tmp_path, 0)["files"] if r["source_path"] == PLAIN_FILE)
    assert record["git_sha1"] == git_blob_sha1(data) and Path(record["path"]).read_bytes() == data


def test_a_file_outside_lfs_that_stays_wrong_fails_naming_it(hub, tmp_path):
    list_dataset("toy", PLAIN_DATASET, tmp_path / "raw" / "listing.json", REPO_ROOT)
    hub.corrupt[PLAIN_FILE] = 99
    assert fetch_cli(tmp_path, 0).returncode != 0
    log = (tmp_path / "logs" / "fetch_0.log").read_text()
    assert (
        f"toy: {PLAIN_FILE}: sha256" in log
        and f"expected sha256 None, git blob sha1 {git_blob_sha1(blob(hub, PLAIN_FILE))}" in log
    )
    assert not (tmp_path / "raw" / "group_000" / "manifest.json").exists()
    assert not (tmp_path / "raw" / "group_000" / PLAIN_FILE).exists()
