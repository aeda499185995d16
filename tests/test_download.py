"""Download stage on local sources: listing, static grouping, materialisation, hash checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from osref.download import assign_groups, fetch_group, list_dataset, sha256_file


def make_files(root: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def test_groups_are_contiguous_byte_balanced_and_deterministic():
    files = [{"path": f"f{i:02d}", "size": s} for i, s in enumerate([10, 10, 10, 10, 40, 10, 10])]
    groups = assign_groups(list(reversed(files)), 3)
    names = [[list(reversed(files))[i]["path"] for i in g] for g in groups]
    assert names == [["f00", "f01", "f02"], ["f03", "f04"], ["f05", "f06"]]
    assert assign_groups(files, 3) == assign_groups(files, 3)


def test_every_group_gets_a_file_even_when_one_file_dominates():
    files = [{"path": "a", "size": 1000}, {"path": "b", "size": 1}, {"path": "c", "size": 1}]
    groups = assign_groups(files, 3)
    assert sorted(len(g) for g in groups) == [1, 1, 1]


def test_more_groups_than_files_is_an_error():
    with pytest.raises(ValueError, match="cannot fill 3 shard groups"):
        assign_groups([{"path": "a", "size": 1}], 3)


def test_local_source_is_materialised_like_a_download(tmp_path):
    make_files(tmp_path / "src", {"b.jsonl": 300, "a.jsonl": 100, "c.jsonl": 200, "skip.txt": 5})
    dataset = {"source": "local", "paths": [str(tmp_path / "src" / "*.jsonl")], "format": "jsonl", "shard_groups": 2}
    listing = list_dataset("toy", dataset, tmp_path / "listing.json", tmp_path)
    assert [Path(f["path"]).name for f in listing["files"]] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert json.loads((tmp_path / "listing.json").read_text()) == listing
    manifests = [
        fetch_group("toy", tmp_path / "listing.json", g, tmp_path / f"g{g}", tmp_path / f"g{g}" / "manifest.json")
        for g in range(2)
    ]
    fetched = [f for m in manifests for f in m["files"]]
    assert sorted(Path(f["path"]).name for f in fetched) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    for record in fetched:
        assert sha256_file(record["path"]) == record["sha256"]
        assert Path(record["path"]).stat().st_size == record["size"]
    # rerun: finished files are kept, the manifest is identical
    again = fetch_group("toy", tmp_path / "listing.json", 0, tmp_path / "g0", tmp_path / "g0" / "manifest.json")
    assert again == manifests[0]


def test_a_file_with_a_wrong_hash_is_refetched_never_used(tmp_path):
    make_files(tmp_path / "src", {"a.jsonl": 100})
    dataset = {"source": "local", "paths": [str(tmp_path / "src" / "*.jsonl")], "format": "jsonl", "shard_groups": 1}
    list_dataset("toy", dataset, tmp_path / "listing.json", tmp_path)
    listing = json.loads((tmp_path / "listing.json").read_text())
    listing["files"][0]["sha256"] = "0" * 64
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    with pytest.raises(IOError, match="sha256"):
        fetch_group("toy", tmp_path / "listing.json", 0, tmp_path / "g", tmp_path / "g" / "manifest.json")
    assert not (tmp_path / "g" / "manifest.json").exists()
    assert not (tmp_path / "g" / "a.jsonl").exists()


def test_no_matching_files_names_the_dataset(tmp_path):
    dataset = {"source": "local", "paths": [str(tmp_path / "nothing*.jsonl")], "format": "jsonl", "shard_groups": 1}
    with pytest.raises(FileNotFoundError, match="datasets.toy: no files match"):
        list_dataset("toy", dataset, tmp_path / "listing.json", tmp_path)


# ---- local sources: relative paths kept, hashed like downloads, copies independent of the source -----


def _list_and_fetch(tmp_path: Path, patterns: list[str], shard_groups: int = 1) -> tuple[dict, list[dict]]:
    dataset = {"source": "local", "paths": patterns, "format": "jsonl", "shard_groups": shard_groups}
    listing = list_dataset("toy", dataset, tmp_path / "listing.json", tmp_path)
    manifests = [
        fetch_group("toy", tmp_path / "listing.json", g, tmp_path / f"g{g}", tmp_path / f"g{g}" / "manifest.json")
        for g in range(shard_groups)
    ]
    return listing, manifests


def test_local_files_with_equal_basenames_are_all_kept_with_their_own_bytes(tmp_path):
    # the usual dump layout: one train-00000 per dump directory
    make_files(tmp_path / "src", {"CC-MAIN-2024-10/train-00000.jsonl": 120, "CC-MAIN-2024-18/train-00000.jsonl": 80})
    listing, [manifest] = _list_and_fetch(tmp_path, [str(tmp_path / "src" / "*" / "train-00000.jsonl")])
    assert [f["path"] for f in listing["files"]] == [
        "CC-MAIN-2024-10/train-00000.jsonl",
        "CC-MAIN-2024-18/train-00000.jsonl",
    ]
    assert len(manifest["files"]) == 2
    for record in manifest["files"]:
        source = tmp_path / "src" / record["source_path"]
        assert Path(record["path"]) == tmp_path / "g0" / record["source_path"]
        assert Path(record["path"]).read_bytes() == source.read_bytes()
        assert record["sha256"] == sha256_file(source)


def test_local_listing_records_each_file_sha256_like_a_download(tmp_path):
    make_files(tmp_path / "src", {"a.jsonl": 100, "b.jsonl": 50})
    listing, _ = _list_and_fetch(tmp_path, [str(tmp_path / "src" / "*.jsonl")])
    for entry in listing["files"]:
        assert entry["sha256"] == sha256_file(tmp_path / "src" / entry["path"])


def test_an_in_place_edit_of_the_source_does_not_reach_the_downloaded_copy(tmp_path):
    make_files(tmp_path / "src", {"a.jsonl": 100})
    source = tmp_path / "src" / "a.jsonl"
    original = source.read_bytes()
    _, [manifest] = _list_and_fetch(tmp_path, [str(source)])
    copy = Path(manifest["files"][0]["path"])
    with open(source, "r+b") as fh:  # same inode, same size: what `sed -i`-less editors and appenders do
        fh.write(b"X" * 10)
    assert copy.read_bytes() == original  # a hard link would have changed with the source
    assert sha256_file(copy) == manifest["files"][0]["sha256"]


def test_a_listing_entry_outside_the_group_directory_is_refused_naming_it(tmp_path):
    make_files(tmp_path / "src", {"a.jsonl": 10})
    list_dataset(
        "toy",
        {"source": "local", "paths": [str(tmp_path / "src" / "a.jsonl")], "format": "jsonl", "shard_groups": 1},
        tmp_path / "listing.json",
        tmp_path,
    )
    listing = json.loads((tmp_path / "listing.json").read_text())
    listing["files"][0]["path"] = "../../outside.jsonl"  # a tampered or hand-written listing
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"toy: listing entry '\.\./\.\./outside\.jsonl'.*outside"):
        fetch_group("toy", tmp_path / "listing.json", 0, tmp_path / "g" / "g0", tmp_path / "g" / "g0" / "manifest.json")
    assert not (tmp_path / "outside.jsonl").exists() and not (tmp_path / "g" / "g0" / "manifest.json").exists()
