"""Data fingerprints: a local dataset edited in place is noticed, a touched one is not re-tokenized.

Size + mtime is the cheap first check; a file whose size or mtime changed is read for its sha256, and
only a change of content (or of the set of files) reruns the listing and everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml
from conftest import snakemake_cmd

from osref.download import list_dataset
from osref.fingerprint import check_local_sources

ROOT = Path(__file__).resolve().parent.parent


def _corpus(path: Path, words: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{word} " * 30}) + "\n" for word in words))
    return path


def _bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def _edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite bytes inside the file (same inode, same size), then move its mtime on."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    with open(path, "r+b") as fh:
        fh.seek(data.index(old))
        fh.write(new)
    _bump_mtime(path)


def _listed(tmp_path: Path, dataset: dict, token: str) -> None:
    list_dataset("mine", {**dataset, "sources_token": token}, tmp_path / "raw" / "listing.json", ROOT)


def _check(tmp_path: Path, dataset: dict):
    return check_local_sources(
        "mine", dataset, ROOT, tmp_path / "raw" / "listing.json", tmp_path / "raw" / "local_hashes.json"
    )


def test_the_cheap_check_reads_nothing_until_size_or_mtime_change_then_only_content_counts(tmp_path):
    a = _corpus(tmp_path / "src" / "a.jsonl", ["alpha", "beta"])
    _corpus(tmp_path / "src" / "b.jsonl", ["gamma"])
    dataset = {"source": "local", "paths": [str(tmp_path / "src" / "*.jsonl")], "format": "jsonl", "shard_groups": 1}

    first = _check(tmp_path, dataset)  # nothing listed yet: the listing job runs anyway, nothing is read
    assert (first.token, first.changes, first.hashed) == ("new", [], 0)
    _listed(tmp_path, dataset, first.token)
    unchanged = _check(tmp_path, dataset)
    assert (unchanged.token, unchanged.changes, unchanged.hashed) == ("new", [], 0)  # the listing's hashes serve

    _bump_mtime(a)  # touched, same bytes: read once, same content, same token
    touched = _check(tmp_path, dataset)
    assert (touched.token, touched.changes, touched.hashed) == ("new", [], 1)
    assert _check(tmp_path, dataset).hashed == 0  # and remembered

    _edit_in_place(a, b"beta", b"BETA")
    edited = _check(tmp_path, dataset)
    assert edited.token != "new" and edited.hashed == 1
    assert edited.changes == ["a.jsonl: content changed (same size, new mtime)"]

    _corpus(tmp_path / "src" / "c.jsonl", ["delta"])
    (tmp_path / "src" / "b.jsonl").unlink()
    moved = _check(tmp_path, dataset)
    assert moved.changes == ["a.jsonl: content changed (same size, new mtime)", "b.jsonl: removed", "c.jsonl: new"]
    assert moved.token not in ("new", edited.token)

    _listed(tmp_path, dataset, moved.token)  # the listing job reran with the new token
    settled = _check(tmp_path, dataset)
    assert (settled.token, settled.changes) == (moved.token, [])


# ---- the whole thing under Snakemake -------------------------------------------------------------------


def snakemake(work: Path, config: Path, *args: str) -> str:
    proc = subprocess.run(
        snakemake_cmd(work, config, "tokenize", *args, cores="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def test_a_corpus_edited_in_place_is_re_tokenized_and_a_touched_one_is_not(tmp_path):
    corpus = _corpus(tmp_path / "corpus" / "mine.jsonl", [f"word{i:03d}" for i in range(40)])
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"]["pydocs"].update(
        {"paths": [str(corpus)], "format": "jsonl", "approx_bytes": corpus.stat().st_size, "tokens_per_byte": 0.2}
    )
    config_path = tmp_path / "mine.yaml"
    config_path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    tokenized = work / "results" / "demo" / "data" / "tokenized" / "pydocs" / "group_000.bin"

    snakemake(work, config_path)
    before = hashlib.sha256(tokenized.read_bytes()).hexdigest()
    assert "Nothing to be done" in snakemake(work, config_path, "-n")

    _bump_mtime(corpus)  # `touch`, a copy without -p: same content, nothing to redo
    assert "Nothing to be done" in snakemake(work, config_path, "-n")

    _edit_in_place(corpus, b"word007", b"WORD007")
    dry = snakemake(work, config_path, "-n")
    assert "datasets.pydocs: the local files changed since they were listed: mine.jsonl: content changed" in dry
    for rule in ("list_dataset", "download_group", "tokenize_group", "tokenized_dataset_manifest"):
        assert f"rule {rule}:" in dry, rule
    snakemake(work, config_path)
    assert hashlib.sha256(tokenized.read_bytes()).hexdigest() != before
    copy = work / "results" / "demo" / "data" / "raw" / "pydocs" / "group_000" / "mine.jsonl"
    assert copy.read_bytes() == corpus.read_bytes()
    assert "Nothing to be done" in snakemake(work, config_path, "-n")
