"""The ``http`` source and the listing of every release dataset, against a local server (tests/hub_server.py).

Nemotron-CC HQ is not on the hub: Common Crawl publishes it with a gzipped list of its objects next to
the data (``contrib/Nemotron/Nemotron-CC/data-jsonl.paths.gz``, entries relative to
``https://data.commoncrawl.org/``). The listing job fetches that list from the source, keeps the 0.01
"real-synth mix" (quality=high x kind=actual|synthetic) and records the list's sha256. The fetch
verifies what a server says about a file (size, a published digest, a content type or magic bytes that
cannot be the declared format), honours Retry-After within a bound, and never writes outside the
group directory, whatever a list entry says.
"""

from __future__ import annotations

import copy
import email.utils
import gzip
import hashlib
import io
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from hub_server import HubServer, Repo  # tests/ is on sys.path under pytest

from osref import http_source
from osref.download import fetch_group, list_dataset
from osref.grid import load_grid
from osref.workflow import WorkflowIndex

ROOT = Path(__file__).resolve().parent.parent
NEMO = "contrib/Nemotron/Nemotron-CC"
PART = NEMO + "/data-jsonl/quality={q}/kind={kind}/kind2={kind2}/CC-MAIN-2024-10-part-{n:05d}.jsonl.zstd"
# the release's layout: five quality buckets, real (kind2=actual) and synthetic (five kind2 variants)
RELEASE_OBJECTS = [
    PART.format(q=q, kind=kind, kind2=kind2, n=n)
    for q in ("high", "medium-high", "medium", "low")
    for kind, kind2s in (("actual", ("actual",)), ("synthetic", ("diverse_qa_pairs", "distill")))
    for kind2 in kind2s
    for n in range(90)
]  # 270 HQ objects: enough for the release's 256 groups
HQ_OBJECTS = sorted(p for p in RELEASE_OBJECTS if "/quality=high/" in p)


def _jsonl_zst(seed: int, n_docs: int = 5) -> bytes:
    lines = "".join(json.dumps({"text": f"document {seed}.{i} " * 20}) + "\n" for i in range(n_docs))
    return zstandard.ZstdCompressor().compress(lines.encode())


def _gzip_lines(lines: list[str]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as fh:
        fh.write("".join(line + "\n" for line in lines).encode())
    return buffer.getvalue()


@pytest.fixture
def server(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield hub


@pytest.fixture(scope="module")
def release_index() -> WorkflowIndex:
    return WorkflowIndex(load_grid(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())))


def publish_nemotron(hub: HubServer) -> bytes:
    """The release on the local file host: every object, and the gzipped list of them next to the data."""
    for i, path in enumerate(RELEASE_OBJECTS):
        hub.files[path] = _jsonl_zst(i)
    paths_list = _gzip_lines(RELEASE_OBJECTS)
    hub.files[f"{NEMO}/data-jsonl.paths.gz"] = paths_list
    return paths_list


def release_http_block(index: WorkflowIndex, name: str, hub: HubServer) -> dict:
    """What the listing job of ``name`` gets on a cluster, with Common Crawl's host swapped for the local one."""
    block = copy.deepcopy(index.listing_params(name))
    assert block["base_url"] == "https://data.commoncrawl.org/"
    block["base_url"] = f"{hub.cdn_url}/files/"
    return block


# ---- Nemotron-CC HQ: the list comes from the source ---------------------------------------------------


def test_nemotron_listing_fetches_the_release_list_filters_the_real_synth_mix_and_records_its_sha256(
    server, release_index, tmp_path
):
    paths_list = publish_nemotron(server)
    block = release_http_block(release_index, "nemotron-cc-hq", server)
    listing = list_dataset("nemotron-cc-hq", block, tmp_path / "listing.json", ROOT)
    assert sorted(f["path"] for f in listing["files"]) == HQ_OBJECTS  # quality=high, kind=actual + synthetic
    assert listing["list"]["sha256"] == hashlib.sha256(paths_list).hexdigest()
    assert listing["list"]["url"] == f"{server.cdn_url}/files/{NEMO}/data-jsonl.paths.gz"
    assert (listing["list"]["entries"], listing["list"]["selected"]) == (len(RELEASE_OBJECTS), len(HQ_OBJECTS))
    assert sorted(i for g in listing["groups"] for i in g) == list(range(len(HQ_OBJECTS)))
    for group in (0, 1):
        manifest = fetch_group(
            "nemotron-cc-hq",
            tmp_path / "listing.json",
            group,
            tmp_path / f"g{group}",
            tmp_path / f"g{group}" / "manifest.json",
        )
        for record in manifest["files"]:
            assert record["sha256"] == hashlib.sha256(server.files[record["source_path"]]).hexdigest()


def test_a_pinned_list_sha256_refuses_a_different_list(server, release_index, tmp_path):
    publish_nemotron(server)
    block = {**release_http_block(release_index, "nemotron-cc-hq", server), "list_sha256": "0" * 64}
    with pytest.raises(
        IOError,
        match=r"nemotron-cc-hq: .*data-jsonl\.paths\.gz has sha256 [0-9a-f]{64}, "
        r"datasets\.nemotron-cc-hq\.list_sha256 says 0{64}",
    ):
        list_dataset("nemotron-cc-hq", block, tmp_path / "listing.json", ROOT)
    assert not (tmp_path / "listing.json").exists()


def test_a_shipped_or_user_supplied_list_still_works_and_its_sha256_is_recorded(server, tmp_path):
    publish_nemotron(server)
    (tmp_path / "mine.paths.gz").write_bytes(_gzip_lines(HQ_OBJECTS[:3]))
    dataset = {
        "source": "http",
        "urls_file": str(tmp_path / "mine.paths.gz"),
        "base_url": f"{server.cdn_url}/files/",
        "format": "jsonl.zstd",
        "shard_groups": 1,
    }
    listing = list_dataset("mine", dataset, tmp_path / "listing.json", ROOT)
    assert [f["path"] for f in listing["files"]] == HQ_OBJECTS[:3]
    assert listing["list"] == {
        "file": str(tmp_path / "mine.paths.gz"),
        "entries": 3,
        "selected": 3,
        "sha256": hashlib.sha256((tmp_path / "mine.paths.gz").read_bytes()).hexdigest(),
    }


def _fill_hub_repo(hub: HubServer, block: dict) -> int:
    """A repo with the config's id and, per allow pattern, files whose paths match it (``*`` -> a counter)."""
    files = {}
    n_files = block.get("shard_groups", 1)
    for pattern in block["allow_patterns"]:
        pattern = pattern + "part.parquet" if pattern.endswith("/") else pattern
        for i in range(n_files):
            path = re.sub(r"\*", f"{i:05d}", pattern)
            files[path] = f"file {i} of {pattern}".encode()
    revision = block.get("revision", "main")
    commit = "c" * 40
    hub.repos[block["repo_id"]] = Repo(commits={commit: files}, refs={revision: commit, "main": commit})
    return len(files)


def test_every_dataset_of_the_release_grid_lists_through_the_code_a_cluster_runs(server, release_index, tmp_path):
    """The listing job's own parameters for each of the 8 datasets, against the local hub and file host."""
    publish_nemotron(server)
    listed = {}
    for name in release_index.grid.datasets_in_use:
        block = copy.deepcopy(release_index.listing_params(name))
        if block["source"] == "http":
            block = release_http_block(release_index, name, server)
        else:
            assert block["source"] == "hub", name
            _fill_hub_repo(server, block)
        listing = list_dataset(name, json.loads(json.dumps(block)), tmp_path / name / "listing.json", ROOT)
        listed[name] = len(listing["groups"])
        assert listed[name] == block["shard_groups"]
    assert sorted(listed) == sorted(
        ["c4", "pile", "slimpajama", "fineweb-edu-1.4t", "dclm", "nemotron-cc-hq", "hplt-2.0", "commoncorpus"]
    )


# ---- path containment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "../../../../tmp/osref-escape.jsonl.zstd",
        "/tmp/osref-escape.jsonl.zstd",
        "data/../../osref-escape.jsonl.zstd",
        "URL/../../../osref-escape.jsonl.zstd",
    ],
)
def test_a_list_entry_that_would_land_outside_the_group_directory_fails_the_listing_naming_it(server, tmp_path, entry):
    entry = entry.replace("URL", f"{server.cdn_url}/files")
    (tmp_path / "list.txt").write_text(f"ok/part-0.jsonl.zstd\n{entry}\n")
    dataset = {
        "source": "http",
        "urls_file": str(tmp_path / "list.txt"),
        "base_url": f"{server.cdn_url}/files/",
        "format": "jsonl.zstd",
        "shard_groups": 1,
    }
    with pytest.raises(ValueError, match=re.escape(f"toy: listing entry {entry!r}") + ".*outside its group directory"):
        list_dataset("toy", dataset, tmp_path / "listing.json", ROOT)
    assert not (tmp_path / "listing.json").exists()


def test_a_tampered_http_listing_is_refused_at_fetch_and_an_existing_file_there_is_never_read(server, tmp_path):
    server.files["ok/part-0.jsonl.zstd"] = _jsonl_zst(0)
    (tmp_path / "list.txt").write_text("ok/part-0.jsonl.zstd\n")
    dataset = {
        "source": "http",
        "urls_file": str(tmp_path / "list.txt"),
        "base_url": f"{server.cdn_url}/files/",
        "format": "jsonl.zstd",
        "shard_groups": 1,
    }
    list_dataset("toy", dataset, tmp_path / "listing.json", ROOT)
    secret = tmp_path / "home" / ".netrc"
    secret.parent.mkdir()
    secret.write_text("machine example.org login u password p\n")
    listing = json.loads((tmp_path / "listing.json").read_text())
    listing["files"][0]["path"] = "../../home/.netrc"
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    group_dir = tmp_path / "raw" / "group_000"
    with pytest.raises(ValueError, match=r"toy: listing entry '\.\./\.\./home/\.netrc'.*outside"):
        fetch_group("toy", tmp_path / "listing.json", 0, group_dir, group_dir / "manifest.json")
    assert not (group_dir / "manifest.json").exists()
    assert secret.read_text().startswith("machine")


def test_a_hub_tree_entry_outside_the_group_directory_fails_the_listing_naming_it(server, tmp_path):
    commit = "d" * 40
    server.repos["org/evil"] = Repo(
        commits={commit: {"data/ok.parquet": b"x", "../escape.parquet": b"y"}}, refs={"main": commit}
    )
    dataset = {
        "source": "hub",
        "repo_id": "org/evil",
        "revision": "main",
        "allow_patterns": ["*.parquet"],
        "format": "parquet",
        "shard_groups": 1,
    }
    with pytest.raises(ValueError, match=r"evil: listing entry '\.\./escape\.parquet'.*outside"):
        list_dataset("evil", dataset, tmp_path / "listing.json", ROOT)


# ---- what the server says about a file is checked --------------------------------------------------------


def _http_dataset(server: HubServer, tmp_path: Path, files: dict[str, bytes], fmt: str = "jsonl.zstd") -> dict:
    server.files.update(files)
    (tmp_path / "list.txt").write_text("".join(path + "\n" for path in files))
    return {
        "source": "http",
        "urls_file": str(tmp_path / "list.txt"),
        "base_url": f"{server.cdn_url}/files/",
        "format": fmt,
        "shard_groups": 1,
    }


def _fetch(tmp_path: Path, name: str = "toy") -> dict:
    group_dir = tmp_path / "raw" / "group_000"
    return fetch_group(name, tmp_path / "listing.json", 0, group_dir, group_dir / "manifest.json")


def test_a_200_html_login_page_is_refused_naming_the_url(server, tmp_path):
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    dataset = _http_dataset(server, tmp_path, {"a/part-0.jsonl.zstd": page})
    server.file_headers["a/part-0.jsonl.zstd"] = {"Content-Type": "text/html; charset=utf-8"}
    list_dataset("toy", dataset, tmp_path / "listing.json", ROOT)
    url = f"{server.cdn_url}/files/a/part-0.jsonl.zstd"
    with pytest.raises(IOError, match=re.escape(url) + r": content type text/html.*cannot be jsonl\.zstd"):
        _fetch(tmp_path)
    assert (
        not list((tmp_path / "raw").rglob("part-0*"))
        and not (tmp_path / "raw" / "group_000" / "manifest.json").exists()
    )


@pytest.mark.parametrize(
    "fmt, body, seen",
    [
        ("jsonl.zstd", b"<html>not data</html>", "3c68746d"),
        ("parquet", b"PAR1 but cut short", "tail"),
        ("json.gz", _jsonl_zst(1), "28b52ffd"),
        ("jsonl", b"<?xml version='1.0'?><Error/>", "3c3f786d"),
    ],
    ids=["html-as-zstd", "truncated-parquet", "zstd-as-gzip", "xml-as-jsonl"],
)
def test_magic_bytes_that_cannot_be_the_declared_format_are_refused_naming_the_url(server, tmp_path, fmt, body, seen):
    path = f"a/part-0.{fmt}"
    dataset = _http_dataset(server, tmp_path, {path: body}, fmt=fmt)
    list_dataset("toy", dataset, tmp_path / "listing.json", ROOT)
    with pytest.raises(IOError, match=re.escape(f"{server.cdn_url}/files/{path}") + f".*not {re.escape(fmt)}.*{seen}"):
        _fetch(tmp_path)
    assert not list((tmp_path / "raw").rglob("part-0*"))


def test_good_files_of_every_format_pass_the_magic_check(server, tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["a", "b"]}), buffer)
    files = {
        "f/a.parquet": buffer.getvalue(),
        "f/b.jsonl.zstd": _jsonl_zst(2),
        "f/c.jsonl": b'\n{"text": "plain"}\n',
        "f/d.jsonl.gz": gzip.compress(b'{"text": "gz"}\n'),
    }
    for path, data in files.items():
        fmt = path.split(".", 1)[1]
        sub = tmp_path / fmt
        sub.mkdir()
        list_dataset("toy", _http_dataset(server, sub, {path: data}, fmt=fmt), sub / "listing.json", ROOT)
        assert _fetch(sub)["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_published_digest_is_checked_and_wrong_bytes_are_fetched_again(server, tmp_path):
    data = _jsonl_zst(3)
    list_dataset("toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": data}), tmp_path / "listing.json", ROOT)
    server.corrupt["a/p.jsonl.zstd"] = 1  # right length, wrong bytes (and not even zstd any more)
    record = _fetch(tmp_path)["files"][0]
    assert len(server.transfers("a/p.jsonl.zstd")) == 2
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["published_digest"] == f"sha256:{record['sha256']}"
    assert record["url"] == f"{server.cdn_url}/files/a/p.jsonl.zstd"


def test_an_s3_md5_etag_is_checked_too(server, tmp_path):
    data = _jsonl_zst(4)
    list_dataset("toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": data}), tmp_path / "listing.json", ROOT)
    server.file_headers["a/p.jsonl.zstd"] = {
        "Repr-Digest": None,
        "ETag": f'"{hashlib.md5(data).hexdigest()}"',
        "x-amz-request-id": "T3ST",
    }
    server.corrupt["a/p.jsonl.zstd"] = 99
    with pytest.raises(IOError, match=r"toy: a/p\.jsonl\.zstd: .*md5"):
        _fetch(tmp_path)
    server.corrupt.clear()
    assert _fetch(tmp_path)["files"][0]["published_digest"] == f"md5:{hashlib.md5(data).hexdigest()}"


def test_an_existing_file_is_checked_against_the_server_before_it_is_used(server, tmp_path):
    data = _jsonl_zst(5)
    list_dataset("toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": data}), tmp_path / "listing.json", ROOT)
    planted = tmp_path / "raw" / "group_000" / "a" / "p.jsonl.zstd"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"\x28\xb5\x2f\xfd" + b"left by someone else")  # a complete-looking file, wrong bytes
    record = _fetch(tmp_path)["files"][0]
    assert planted.read_bytes() == data and record["sha256"] == hashlib.sha256(data).hexdigest()
    # a rerun over the verified file transfers nothing: one HEAD, no GET
    server.requests.clear()
    _fetch(tmp_path)
    assert [r.method for r in server.requests] == ["HEAD"]


def test_an_existing_file_is_fetched_again_when_head_is_refused(server, tmp_path):
    """A URL signed for GET only answers HEAD with 403/405: the file cannot be checked, so it is not trusted."""
    data = _jsonl_zst(9)
    list_dataset("toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": data}), tmp_path / "listing.json", ROOT)
    planted = tmp_path / "raw" / "group_000" / "a" / "p.jsonl.zstd"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"\x28\xb5\x2f\xfd" + b"x" * (len(data) - 4))  # right size and magic, wrong bytes
    server.throttle["a/p.jsonl.zstd"] = (405, None, 1)  # the HEAD
    assert _fetch(tmp_path)["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert [r.method for r in server.requests if r.path.endswith("a/p.jsonl.zstd")] == ["HEAD", "GET"]


# ---- Retry-After -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured(server, tmp_path, status):
    list_dataset(
        "toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": _jsonl_zst(6)}), tmp_path / "listing.json", ROOT
    )
    server.throttle["a/p.jsonl.zstd"] = (status, "2", 1)
    _fetch(tmp_path)
    first, second = [r.at for r in server.requests if r.path.endswith("a/p.jsonl.zstd")][:2]
    assert second - first >= 1.9


def test_retry_after_as_an_http_date_is_honoured(server, tmp_path):
    list_dataset(
        "toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": _jsonl_zst(7)}), tmp_path / "listing.json", ROOT
    )
    server.throttle["a/p.jsonl.zstd"] = (503, email.utils.formatdate(time.time() + 3, usegmt=True), 1)
    _fetch(tmp_path)
    first, second = [r.at for r in server.requests if r.path.endswith("a/p.jsonl.zstd")][:2]
    assert second - first >= 1.0  # HTTP dates have whole seconds


def test_a_retry_after_beyond_the_bound_fails_at_once_naming_the_url(server, tmp_path):
    list_dataset(
        "toy", _http_dataset(server, tmp_path, {"a/p.jsonl.zstd": _jsonl_zst(8)}), tmp_path / "listing.json", ROOT
    )
    server.throttle["a/p.jsonl.zstd"] = (429, "86400", 99)
    started = time.monotonic()
    with pytest.raises(
        IOError,
        match=re.escape(f"{server.cdn_url}/files/a/p.jsonl.zstd")
        + rf": HTTP 429, Retry-After 86400 s is more than the {http_source.MAX_RETRY_AFTER_S} s",
    ):
        _fetch(tmp_path)
    assert time.monotonic() - started < 5
    assert len([r for r in server.requests if r.path.endswith("a/p.jsonl.zstd")]) == 1


def test_the_list_download_honours_retry_after_too(server, release_index, tmp_path):
    publish_nemotron(server)
    server.throttle[f"{NEMO}/data-jsonl.paths.gz"] = (503, "2", 1)
    block = release_http_block(release_index, "nemotron-cc-hq", server)
    list_dataset("nemotron-cc-hq", block, tmp_path / "listing.json", ROOT)
    first, second = [r.at for r in server.requests if r.path.endswith("data-jsonl.paths.gz")]
    assert second - first >= 1.9


@pytest.mark.parametrize(
    "change, message",
    [
        ("neither", "datasets.nemotron-cc-hq: source 'http' needs exactly one of list_url"),
        ("both", "datasets.nemotron-cc-hq: source 'http' needs exactly one of list_url"),
        (
            "no base_url",
            "datasets.nemotron-cc-hq.base_url: required (an https:// URL) for the relative list_url "
            "'contrib/Nemotron/Nemotron-CC/data-jsonl.paths.gz'",
        ),
    ],
)
def test_an_http_dataset_needs_exactly_one_list_naming_the_dataset(change, message):
    from osref.config import ConfigError, validate

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    block = config["datasets"]["nemotron-cc-hq"]
    if change == "neither":
        del block["list_url"]
    elif change == "both":
        block["urls_file"] = "config/my.paths.gz"
    else:
        del block["base_url"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config)


def test_two_list_entries_on_one_target_fail_the_listing_naming_both(server, tmp_path):
    url = f"{server.cdn_url}/files/a/p.jsonl.zstd"
    (tmp_path / "list.txt").write_text(f"files/a/p.jsonl.zstd\n{url}\n")  # the same file, relative and absolute
    dataset = {
        "source": "http",
        "urls_file": str(tmp_path / "list.txt"),
        "base_url": f"{server.cdn_url}/",
        "format": "jsonl.zstd",
        "shard_groups": 1,
    }
    with pytest.raises(
        ValueError,
        match=re.escape(f"toy: listing entries {url!r} and {url!r} would both be written to 'files/a/p.jsonl.zstd'"),
    ):
        list_dataset("toy", dataset, tmp_path / "listing.json", ROOT)
