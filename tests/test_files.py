"""Atomic writes (osref/files.py): a write that fails leaves the old file and no temporary."""

from __future__ import annotations

import pandas as pd
import pytest

from osref.files import (
    atomic_directory,
    atomic_target,
    commit_partial,
    partial_path,
    write_frame_atomic,
    write_json_atomic,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_json_atomic(tmp_path / "sub" / "a.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n "v": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


@pytest.mark.parametrize("name", ["t.csv", "t.parquet"])
def test_tables_are_written_atomically(tmp_path, name):
    frame = pd.DataFrame({"a": [1, 2], "b": [0.5, None]})
    path = write_frame_atomic(frame, tmp_path / name)
    back = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
    assert back["a"].tolist() == [1, 2] and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_failed_directory_leaves_nothing_and_a_complete_one_replaces_the_old(tmp_path):
    out = tmp_path / "hf" / "iter_0000010"
    with pytest.raises(ValueError), atomic_directory(out, "an export") as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise ValueError("parity failure")
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    with atomic_directory(out, "an export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_a_resumable_partial_is_committed_over_a_directory_left_by_hand(tmp_path):
    target = tmp_path / "fetched" / "iter_0000010"
    (target / "old").mkdir(parents=True)
    partial = partial_path(target)
    partial.mkdir()
    (partial / "manifest.json").write_text("{}")
    commit_partial(partial, target)
    assert [p.name for p in target.iterdir()] == ["manifest.json"] and not partial.exists()
