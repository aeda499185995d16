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
