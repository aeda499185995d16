"""Tokenization: byte-identity with Megatron's format (any worker count, any accepted backend), readers for every
input format, bad input, the backend sample check, the per-dataset manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from osref.tokenize import (
    BackendMismatch,
    BackendUnavailable,
    EncodedBatch,
    HFEncoder,
    InputError,
    MegatronWriter,
    dataset_manifest,
    iter_documents,
    load_tokenizer,
    tokenize_files,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst"
TOKENIZER_SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "assets" / "gpt-neox-20b", TOKENIZER_SHA256)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    out = []
    for text in iter_documents(CORPUS, "jsonl.zst"):
        out.append(text)
        if len(out) == 60:
            break
    return out


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_writer(token_lists: list[list[int]], prefix: Path) -> None:
    """An independent, straightforward writer of Megatron's document-level format (the oracle)."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 2)]).astype(np.int64)
    with open(f"{prefix}.bin", "wb") as fh:
        for toks in token_lists:
            fh.write(np.array(toks, dtype=np.uint16).tobytes())
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([8]))
        fh.write(len(lengths).to_bytes(8, "little") + (len(lengths) + 1).to_bytes(8, "little"))
        fh.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def write_jsonl(path: Path, texts: list[str], compress: str | None = None, field: str = "text") -> Path:
    payload = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if compress == "gz":
        payload = gzip.compress(payload)
    elif compress == "zst":
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    return path


def test_tokenizer_self_check(tokenizer):
    assert tokenizer.encode("Hello world", add_special_tokens=False).ids == [12092, 1533]
    assert tokenizer.get_vocab_size() == 50277
    assert tokenizer.token_to_id("<|endoftext|>") == 0


def test_tokenizer_hash_is_checked(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(tmp_path, TOKENIZER_SHA256)


def test_demo_corpus_matches_golden_megatron_output(tokenizer, tmp_path):
    stats = tokenize_files([CORPUS], tmp_path / "demo", tokenizer, fmt="jsonl.zst", progress=False)
    assert (stats["documents"], stats["tokens"]) == (2866, 2950737)
    assert sha256(tmp_path / "demo.bin") == "9e0c2c1ede310368e764eeef709c0c74b4ba0eb4db77130955af8f0d729fcd46"
    assert sha256(tmp_path / "demo.idx") == "93f8041f19912e93432fec5e89d96ba9e6a7ce239d39b0795f2a62b3f7d350fb"


def test_group_equals_reference_writer_over_files_in_order(tokenizer, docs, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", docs[:25])
    b = write_jsonl(tmp_path / "b.jsonl.zstd", docs[25:], compress="zst")  # DCLM's suffix
    tokenize_files([a, b], tmp_path / "ours", tokenizer, fmt="jsonl.zstd", batch_size=7, progress=False)
    expected = [enc.ids + [0] for enc in tokenizer.encode_batch(docs, add_special_tokens=False)]
    reference_writer(expected, tmp_path / "ref")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()


def test_megatron_reads_it_back(tokenizer, docs, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenize_files([write_jsonl(tmp_path / "x.jsonl", docs)], tmp_path / "x", tokenizer, fmt="jsonl", progress=False)
    dataset = IndexedDataset(str(tmp_path / "x"))
    assert len(dataset) == len(docs)
    first = tokenizer.encode(docs[0], add_special_tokens=False).ids + [0]
    assert dataset[0].tolist() == first and dataset[0].dtype == np.uint16


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json.gz", "jsonl.zst", "parquet"])
def test_every_format_gives_the_same_documents(fmt, docs, tmp_path):
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": docs, "other": list(range(len(docs)))}), path, row_group_size=16)
    else:
        write_jsonl(path, docs, compress={"jsonl": None, "jsonl.gz": "gz", "json.gz": "gz", "jsonl.zst": "zst"}[fmt])
    assert list(iter_documents(path, fmt)) == docs


def test_configurable_text_field(docs, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", docs[:3], field="content")
    assert list(iter_documents(path, "jsonl", "content")) == docs[:3]


def megatron_preprocess(tokenizer, texts: list[str], prefix: Path) -> None:
    """What Megatron-LM's ``tools/preprocess_data.py --append-eod`` does per JSON line (its ``Encoder.encode``
    and ``process_json_file``), with megatron-core's own ``IndexedDatasetBuilder``: a document whose ids are
    empty gets no EOD and no sequence, but still an entry in the document index."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        lengths = [len(ids) + 1] if ids else []
        builder.add_document(ids + [0] if ids else [], lengths)
    builder.finalize(f"{prefix}.idx")


def test_empty_documents_are_indexed_exactly_as_megatron_does(tokenizer, docs, tmp_path):
    """Empty documents first, in a row, between others and last: .bin and .idx byte-identical to Megatron's."""
    texts = ["", docs[0], "", "", docs[1], docs[2], "", docs[3], ""]
    path = write_jsonl(tmp_path / "e.jsonl", texts)
    stats = tokenize_files([path], tmp_path / "ours", tokenizer, fmt="jsonl", batch_size=2, progress=False)
    megatron_preprocess(tokenizer, texts, tmp_path / "megatron")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"megatron.{ext}").read_bytes(), ext
    assert (stats["documents"], stats["empty_documents"]) == (4, 5)  # sequences, and empty entries of the index

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == 4 and dataset.document_indices.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 4, 4]


def test_large_document(tokenizer, tmp_path):
    big = "word " * 400_000  # 2 MB in one document
    stats = tokenize_files(
        [write_jsonl(tmp_path / "b.jsonl", [big])], tmp_path / "b", tokenizer, fmt="jsonl", progress=False
    )
    assert stats["documents"] == 1 and stats["tokens"] > 400_000


def test_max_documents(tokenizer, docs, tmp_path):
    stats = tokenize_files(
        [write_jsonl(tmp_path / "m.jsonl", docs)],
        tmp_path / "m",
        tokenizer,
        fmt="jsonl",
        max_documents=5,
        progress=False,
    )
    assert stats["documents"] == 5


# ---- bad input: a clear error naming the file, and no output pair left behind --------------------------


def assert_fails_cleanly(tokenizer, files, fmt, tmp_path, match):
    with pytest.raises(InputError, match=match):
        tokenize_files(files, tmp_path / "out" / "g", tokenizer, fmt=fmt, progress=False)
    assert list((tmp_path / "out").glob("*")) == []


def test_missing_text_field(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", ["a", "b"], field="body")
    assert_fails_cleanly(tokenizer, [path], "jsonl", tmp_path, r"f\.jsonl: line 1: no text field 'text'")


def test_non_utf8(tokenizer, tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe bad"}\n')
    assert_fails_cleanly(tokenizer, [path], "jsonl", tmp_path, r"n\.jsonl: line 2: not UTF-8")


def test_corrupt_zstd(tokenizer, docs, tmp_path):
    path = write_jsonl(tmp_path / "z.jsonl.zst", docs, compress="zst")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    assert_fails_cleanly(tokenizer, [path], "jsonl.zst", tmp_path, r"z\.jsonl\.zst: corrupt")


def test_truncated_parquet(tokenizer, docs, tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": docs}), path)
    path.write_bytes(path.read_bytes()[:-100])
    assert_fails_cleanly(tokenizer, [path], "parquet", tmp_path, r"t\.parquet")


def test_parquet_without_text_column(tokenizer, tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    assert_fails_cleanly(tokenizer, [path], "parquet", tmp_path, r"p\.parquet: no text column 'text'")


# ---- bad rows: fail naming file and line, or skip and count them (the pipeline's default) ----------------


def _jsonl_bytes(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _parquet_column(path: Path, values, type_=None) -> Path:
    pq.write_table(pa.table({"text": pa.array(values, type=type_)}), path)
    return path


BAD_ROWS = {
    # name: (file maker, format, what the message says)
    "json surrogate escape": (
        lambda d: _jsonl_bytes(d / "s.jsonl", b'{"text": "ok"}', b'{"text": "a\\ud800b"}'),
        "jsonl",
        r"s\.jsonl: line 2: .*lone surrogate U\+D800",
    ),
    "cesu-8 surrogate bytes": (
        lambda d: _jsonl_bytes(d / "c.jsonl", b'{"text": "ok"}', b'{"text": "a\xed\xa0\x80b"}'),
        "jsonl",
        r"c\.jsonl: line 2: .*lone surrogate U\+D800",
    ),
    "null text": (
        lambda d: _jsonl_bytes(d / "n.jsonl", b'{"text": "ok"}', b'{"text": null}'),
        "jsonl",
        r"n\.jsonl: line 2: field 'text' is NoneType, not a string",
    ),
    "list text": (
        lambda d: _jsonl_bytes(d / "l.jsonl", b'{"text": "ok"}', b'{"text": ["a", "b"]}'),
        "jsonl",
        r"l\.jsonl: line 2: field 'text' is list, not a string",
    ),
    "parquet invalid utf-8": (
        lambda d: _parquet_column(
            d / "u.parquet", pa.array([b"ok", b"a\xed\xa0\x80b"], pa.binary()).cast(pa.string(), safe=False)
        ),
        "parquet",
        r"u\.parquet: row 2: not UTF-8",
    ),
}


@pytest.mark.parametrize("workers", [1, 2])  # 2: the row is parsed in a worker, the job reports it
@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_fails_naming_file_and_line_when_asked_to(tokenizer, tmp_path, kind, workers):
    make, fmt, match = BAD_ROWS[kind]
    path = make(tmp_path)
    with pytest.raises(InputError, match=match):
        tokenize_files(
            [path], tmp_path / "out" / "g", tokenizer, fmt=fmt, bad_documents="fail", workers=workers, progress=False
        )
    assert list((tmp_path / "out").glob("*")) == []


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", BAD_ROWS)
def test_a_bad_row_is_skipped_and_counted_naming_file_and_line(tokenizer, tmp_path, kind, workers):
    make, fmt, match = BAD_ROWS[kind]
    path = make(tmp_path)
    stats = tokenize_files(
        [path],
        tmp_path / "g",
        tokenizer,
        fmt=fmt,
        bad_documents="skip",
        max_bad_fraction=0.5,
        workers=workers,
        progress=False,
    )
    assert (stats["documents"], stats["bad_documents"]) == (1, 1)
    assert re.search(match, stats["bad_examples"][0])
    expected = tokenizer.encode("ok", add_special_tokens=False).ids + [0]
    assert np.fromfile(tmp_path / "g.bin", dtype=np.uint16).tolist() == expected


def test_too_many_bad_rows_fail_the_group_even_when_skipping(tokenizer, docs, tmp_path):
    """One bad row in a big group is noise; a wrong text field or a broken file is not."""
    lines = [json.dumps({"text": t}).encode() for t in docs[:9]] + [b'{"text": 5}']
    path = _jsonl_bytes(tmp_path / "b.jsonl", *lines)
    stats = tokenize_files(
        [path], tmp_path / "ok", tokenizer, fmt="jsonl", bad_documents="skip", max_bad_fraction=0.1, progress=False
    )
    assert stats["bad_documents"] == 1
    with pytest.raises(
        InputError,
        match=r"1 of 10 rows \(10\.0 %\) were bad, more than max_bad_fraction 0\.05.*"
        r"b\.jsonl: line 10: field 'text' is int",
    ):
        tokenize_files(
            [path],
            tmp_path / "out" / "g",
            tokenizer,
            fmt="jsonl",
            bad_documents="skip",
            max_bad_fraction=0.05,
            progress=False,
        )
    assert list((tmp_path / "out").glob("*")) == []


def _mixed_lines(docs: list[str]) -> list[bytes]:
    """60 rows: documents, with bad rows at lines 7, 33 and 52 and empty documents at lines 20 and 41."""
    lines = [json.dumps({"text": text}).encode() for text in docs[:55]] + [json.dumps({"text": ""}).encode()] * 2
    lines.insert(6, b'{"text": null}')
    lines.insert(19, b'{"text": ""}')
    lines.insert(32, b"not json")
    lines.insert(40, b'{"text": ""}')
    lines.insert(51, b'{"text": "a\\ud800b"}')
    return lines[:60]


def test_bad_rows_found_in_workers_are_reported_in_file_order(tokenizer, docs, tmp_path):
    """Chunks of ~8 kB (a few rows) go to two workers; the job numbers the lines and names the bad rows in file
    order."""
    path = _jsonl_bytes(tmp_path / "m.jsonl", *_mixed_lines(docs))
    one = tokenize_files(
        [path], tmp_path / "one", tokenizer, fmt="jsonl", bad_documents="skip", max_bad_fraction=0.1, progress=False
    )
    two = tokenize_files(
        [path],
        tmp_path / "two",
        tokenizer,
        fmt="jsonl",
        bad_documents="skip",
        max_bad_fraction=0.1,
        workers=2,
        chunk_bytes=8000,
        progress=False,
    )
    assert [re.sub(r" \(.*", "", m).split(": ", 1)[1] for m in two["bad_examples"]] == [
        "line 7: field 'text' is NoneType, not a string",
        "line 33: not valid JSON",
        "line 52: field 'text' has a lone surrogate U+D800 at character 1",
    ]
    for key in ("documents", "tokens", "text_bytes", "empty_documents", "bad_documents", "bad_examples"):
        assert two[key] == one[key], key
    for ext in ("bin", "idx"):
        assert sha256(tmp_path / f"two.{ext}") == sha256(tmp_path / f"one.{ext}")
    with pytest.raises(InputError, match=r"m\.jsonl: line 7: field 'text' is NoneType"):
        tokenize_files(
            [path],
            tmp_path / "out" / "g",
            tokenizer,
            fmt="jsonl",
            bad_documents="fail",
            workers=2,
            chunk_bytes=8000,
            progress=False,
        )
    assert list((tmp_path / "out").glob("*")) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_max_documents_cuts_inside_a_chunk_the_same_with_workers(tokenizer, docs, tmp_path, workers):
    """The 30th document (line 31) ends the shard: the rest of its ~20 kB chunk is dropped and the bad row at line
    33 is not counted (rows after the last document taken are not read)."""
    path = _jsonl_bytes(tmp_path / "m.jsonl", *_mixed_lines(docs))
    stats = tokenize_files(
        [path],
        tmp_path / "g",
        tokenizer,
        fmt="jsonl",
        bad_documents="skip",
        max_bad_fraction=0.1,
        max_documents=30,
        chunk_bytes=20_000,
        workers=workers,
        progress=False,
    )
    taken = [json.loads(line)["text"] for line in _mixed_lines(docs)[:31] if line.startswith(b'{"text": "')]
    assert len(taken) == 30 and (stats["documents"], stats["empty_documents"], stats["bad_documents"]) == (29, 1, 1)
    expected = [enc.ids + [0] for enc in tokenizer.encode_batch([t for t in taken if t], add_special_tokens=False)]
    assert np.fromfile(tmp_path / "g.bin", dtype=np.uint16).tolist() == [t for ids in expected for t in ids]
    assert stats["text_bytes"] == sum(len(t.encode()) for t in taken)


def test_lines_that_orjson_refuses_follow_the_standard_librarys_rules(tmp_path):
    """The fast parser (orjson) is stricter than json; what counts as a document, and every message, stay json's."""
    path = _jsonl_bytes(
        tmp_path / "o.jsonl",
        b'{"text": "nan elsewhere", "score": NaN}',  # json: a document; orjson: refused
        b'\xef\xbb\xbf{"text": "after a BOM"}',  # json reads the BOM (bytes input); orjson refuses it
        b'{"text": "big number", "n": 123456789012345678901234567890}',
        b'{"text": 123456789012345678901234567890}',  # orjson: a float; json: an int (the message says int)
        b'{"text": "first", "text": "second"}',
        b'{"text": "\\ud83d\\ude00 pair"}',  # a valid surrogate pair: one character
        b"   ",  # blank: not a row
        b'{"text": "x"} {"text": "y"}',
    )
    bad: list[str] = []
    texts = list(iter_documents(path, "jsonl", on_bad=bad.append))
    assert texts == ["nan elsewhere", "after a BOM", "big number", "second", "\U0001f600 pair"]
    assert [m.split(": ", 1)[1] for m in bad] == [
        "line 4: field 'text' is int, not a string",
        "line 8: not valid JSON (Extra data)",
    ]


def test_the_jobs_process_parses_only_the_sample(tokenizer, docs, tmp_path, monkeypatch):
    """The job's process reads and writes; rows are parsed where they are encoded. It parses a chunk itself
    only to place a non-HF backend's HF sample (here 12 documents): the chunks up to the 12th document."""
    import osref.tokenize as tokenize_module

    parsed_here: list[int] = []  # documents per chunk parsed in this process
    real_parse = tokenize_module.parse_chunk

    def counting_parse(chunk, text_field="text"):
        parsed = real_parse(chunk, text_field)
        if os.getpid() == job_pid:
            parsed_here.append(len(parsed.texts))
        return parsed

    job_pid = os.getpid()
    monkeypatch.setattr(tokenize_module, "parse_chunk", counting_parse)
    path = write_jsonl(tmp_path / "p.jsonl", docs)
    tokenize_files([path], tmp_path / "hf", tokenizer, fmt="jsonl", workers=2, chunk_bytes=8000, progress=False)
    assert parsed_here == []
    stats = tokenize_files(
        [path],
        tmp_path / "giga",
        tokenizer,
        fmt="jsonl",
        workers=2,
        chunk_bytes=8000,
        backend="gigatoken",
        verify_documents=12,
        progress=False,
    )
    assert len(parsed_here) > 1 and sum(parsed_here[:-1]) < 12 <= sum(parsed_here) < len(docs)
    assert stats["verified_documents"] == 12
    assert sha256(tmp_path / "giga.bin") == sha256(tmp_path / "hf.bin")


@pytest.mark.parametrize(
    "values, type_name",
    [([1, 2], "int64"), ([["a"], ["b"]], "list<element: string>"), ([{"a": "x"}], "struct<a: string>")],
)
def test_a_parquet_text_column_that_is_not_text_fails_naming_file_and_type(tokenizer, tmp_path, values, type_name):
    """A column type is the file's schema, not one bad row: it fails whatever the policy."""
    path = _parquet_column(tmp_path / "t.parquet", values)
    with pytest.raises(InputError, match=re.escape(f"t.parquet: column 'text' is {type_name}, not a string column")):
        tokenize_files([path], tmp_path / "out" / "g", tokenizer, fmt="parquet", bad_documents="skip", progress=False)
    assert list((tmp_path / "out").glob("*")) == []


def test_empty_file_is_counted_and_an_all_empty_group_fails(tokenizer, docs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    full = write_jsonl(tmp_path / "full.jsonl", docs[:2])
    stats = tokenize_files([empty, full], tmp_path / "ok", tokenizer, fmt="jsonl", progress=False)
    assert stats["empty_files"] == [str(empty)] and stats["documents"] == 2
    assert_fails_cleanly(tokenizer, [empty], "jsonl", tmp_path, "no documents in")


def test_writer_abort_leaves_nothing(tmp_path):
    writer = MegatronWriter(tmp_path / "w")
    writer.add_batch([[1, 2, 0]])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_input_with_workers_fails_cleanly(tokenizer, docs, tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl.zst", docs, compress="zst")  # batches are in the workers by the error
    path = write_jsonl(tmp_path / "z.jsonl.zst", docs, compress="zst")
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"z\.jsonl\.zst: corrupt"):
        tokenize_files(
            [good, path], tmp_path / "out" / "g", tokenizer, fmt="jsonl.zst", workers=2, batch_size=10, progress=False
        )
    assert list((tmp_path / "out").glob("*")) == []


# ---- parallel workers and backends: the same bytes or no shard ---------------------------------------


@pytest.mark.parametrize("start_method", [None, "spawn"])  # None: fork on Linux, after this process encoded
def test_two_workers_write_the_same_bytes_as_one(tokenizer, tmp_path, start_method):
    one = tokenize_files([CORPUS], tmp_path / "one", tokenizer, fmt="jsonl.zst", max_documents=300, progress=False)
    two = tokenize_files(
        [CORPUS],
        tmp_path / "two",
        tokenizer,
        fmt="jsonl.zst",
        max_documents=300,
        batch_size=23,
        chunk_bytes=50_000,
        workers=2,
        progress=False,
        start_method=start_method,
    )
    assert (two["documents"], two["tokens"], two["text_bytes"]) == (one["documents"], one["tokens"], one["text_bytes"])
    assert two["workers"] == 2 and one["documents"] == 300
    for ext in ("bin", "idx"):
        assert sha256(tmp_path / f"two.{ext}") == sha256(tmp_path / f"one.{ext}")


def test_lines_longer_than_a_chunk_reach_the_workers_whole(tokenizer, docs, tmp_path):
    """8 kB chunks: lines of 30 and 14 kB outgrow the reader's buffer and the workers' 16 kB shared slots (their
    chunks go through the pipe, the others through the slots); all arrive whole and in order: one process's bytes."""
    texts = docs[:3] + ["long " * 6_000] + docs[3:6] + ["longer " * 2_000] + docs[6:12]
    path = write_jsonl(tmp_path / "l.jsonl.zst", texts, compress="zst")
    one = tokenize_files([path], tmp_path / "one", tokenizer, fmt="jsonl.zst", progress=False)
    two = tokenize_files(
        [path], tmp_path / "two", tokenizer, fmt="jsonl.zst", workers=2, chunk_bytes=8000, progress=False
    )
    assert two["documents"] == one["documents"] == len(texts) and two["text_bytes"] == one["text_bytes"]
    for ext in ("bin", "idx"):
        assert sha256(tmp_path / f"two.{ext}") == sha256(tmp_path / f"one.{ext}")


def test_one_process_with_an_encode_thread_writes_the_same_bytes(tokenizer, tmp_path):
    one = tokenize_files([CORPUS], tmp_path / "one", tokenizer, fmt="jsonl.zst", max_documents=300, progress=False)
    threads = tokenize_files(
        [CORPUS],
        tmp_path / "threads",
        tokenizer,
        fmt="jsonl.zst",
        max_documents=300,
        batch_size=23,
        chunk_bytes=50_000,
        workers=2,
        parallelism="threads",
        progress=False,
    )
    assert threads["tokens"] == one["tokens"]
    for ext in ("bin", "idx"):
        assert sha256(tmp_path / f"threads.{ext}") == sha256(tmp_path / f"one.{ext}")
    with pytest.raises(ValueError, match="parallelism must be"):
        tokenize_files([CORPUS], tmp_path / "x", tokenizer, fmt="jsonl.zst", parallelism="fibres", progress=False)


class OneTokenOffEncoder(HFEncoder):
    """A backend that disagrees with HF tokenizers on the fourth document it sees."""

    name = "one-off"
    is_reference = False

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.seen = 0

    def encode(self, texts, eod_id, dtype=np.uint16):
        batch = super().encode(texts, eod_id, dtype)
        if self.seen <= 3 < self.seen + len(texts):
            start = int(batch.lengths[: 3 - self.seen].sum())
            tokens = batch.tokens.copy()
            tokens[start + 1] += 1
            batch = EncodedBatch(tokens, batch.lengths, batch.text_bytes)
        self.seen += len(texts)
        return batch


def test_sample_check_refuses_a_shard_that_differs_from_hf(tokenizer, docs, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    with pytest.raises(
        BackendMismatch, match=r"'one-off' differs from HF tokenizers on non-empty document 3 .* token 1"
    ):
        tokenize_files(
            [path],
            tmp_path / "out" / "g",
            tokenizer,
            fmt="jsonl",
            batch_size=2,
            backend=OneTokenOffEncoder(tokenizer),
            verify_documents=10,
            progress=False,
        )
    assert list((tmp_path / "out").glob("*")) == []


def test_sample_check_looks_only_at_the_first_documents(tokenizer, docs, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    stats = tokenize_files(
        [path],
        tmp_path / "g",
        tokenizer,
        fmt="jsonl",
        batch_size=2,
        backend=OneTokenOffEncoder(tokenizer),
        verify_documents=3,
        progress=False,
    )
    assert stats["verified_documents"] == 3 and stats["backend"] == "one-off"


def test_gigatoken_shard_is_accepted_and_identical(tokenizer, tmp_path):
    import gigatoken  # noqa: F401  (pinned in the lock since issue 15: missing is a failure, not a skip)

    hf = tokenize_files([CORPUS], tmp_path / "hf", tokenizer, fmt="jsonl.zst", max_documents=200, progress=False)
    giga = tokenize_files(
        [CORPUS],
        tmp_path / "giga",
        tokenizer,
        fmt="jsonl.zst",
        max_documents=200,
        batch_size=64,
        backend="gigatoken",
        verify_documents=100,
        progress=False,
    )
    assert giga["verified_documents"] == 100 and giga["backend"] == "gigatoken"
    assert giga["text_bytes"] == hf["text_bytes"]
    for ext in ("bin", "idx"):
        assert sha256(tmp_path / f"giga.{ext}") == sha256(tmp_path / f"hf.{ext}")


def test_gigatoken_with_workers_writes_the_golden_megatron_output(tokenizer, tmp_path):
    """The whole demo corpus through two forked gigatoken workers (warmed up before the fork): the golden hashes."""
    stats = tokenize_files(
        [CORPUS],
        tmp_path / "demo",
        tokenizer,
        fmt="jsonl.zst",
        backend="gigatoken",
        workers=2,
        verify_documents=100,
        progress=False,
    )
    assert (stats["documents"], stats["tokens"], stats["verified_documents"]) == (2866, 2950737, 100)
    assert sha256(tmp_path / "demo.bin") == "9e0c2c1ede310368e764eeef709c0c74b4ba0eb4db77130955af8f0d729fcd46"
    assert sha256(tmp_path / "demo.idx") == "93f8041f19912e93432fec5e89d96ba9e6a7ce239d39b0795f2a62b3f7d350fb"


# gigatoken 0.10.0 and HF tokenizers 0.23.3 put U+135E and U+1ACA in different canonical (NFC) orders
COMBINING_MARKS = "a\u135e\u1aca"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_gigatoken_mismatch_in_the_sample_refuses_the_shard(tokenizer, docs, tmp_path, workers):
    hf_ids = tokenizer.encode(COMBINING_MARKS, add_special_tokens=False).ids
    import gigatoken

    assert gigatoken.Tokenizer.from_json(tokenizer.to_str()).encode(COMBINING_MARKS).tolist() != hf_ids
    path = write_jsonl(tmp_path / "u.jsonl", docs[:5] + ["", COMBINING_MARKS] + docs[5:20])
    with pytest.raises(
        BackendMismatch,
        match=r"'gigatoken' differs from HF tokenizers on non-empty document 5 of the "
        r"shard \(0-based\), token 2: HF gives \[224, 241, 157, 106, 221\], gigatoken "
        r"gives \[106, 221, 157, 224, 241\]",
    ):
        tokenize_files(
            [path],
            tmp_path / "out" / "g",
            tokenizer,
            fmt="jsonl",
            backend="gigatoken",
            workers=workers,
            batch_size=3,
            verify_documents=10,
            progress=False,
        )
    assert list((tmp_path / "out").glob("*")) == []


def test_unavailable_backends_fail_clearly(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(BackendUnavailable, match="unknown tokenizer backend 'nope'"):
        tokenize_files([CORPUS], tmp_path / "n", tokenizer, fmt="jsonl.zst", backend="nope", progress=False)
    monkeypatch.setitem(__import__("sys").modules, "gigatoken", None)  # as if not installed
    with pytest.raises(BackendUnavailable, match="pip install gigatoken"):
        tokenize_files([CORPUS], tmp_path / "g", tokenizer, fmt="jsonl.zst", backend="gigatoken", progress=False)
    assert list(tmp_path.glob("*")) == []


# ---- per-dataset manifest ------------------------------------------------------------------------------


def test_dataset_manifest_sums_the_groups(tokenizer, docs, tmp_path):
    stats_paths = []
    for group, texts in enumerate([docs[:20], docs[20:] + ["", ""]]):
        stats = tokenize_files(
            [write_jsonl(tmp_path / f"{group}.jsonl", texts)],
            tmp_path / f"group_{group:03d}",
            tokenizer,
            fmt="jsonl",
            progress=False,
        )
        stats.update({"dataset": "demo", "group": group})
        stats_paths.append(tmp_path / f"group_{group:03d}.stats.json")
        stats_paths[-1].write_text(json.dumps(stats))
    manifest = dataset_manifest(stats_paths, tmp_path / "manifest.json")
    expected_tokens = sum(len(enc.ids) + 1 for enc in tokenizer.encode_batch(docs, add_special_tokens=False))
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "demo" and manifest["groups"] == 2
    assert (manifest["documents"], manifest["tokens"], manifest["empty_documents"]) == (len(docs), expected_tokens, 2)
    assert manifest["text_bytes"] == sum(len(t.encode()) for t in docs)
    assert [g["documents"] for g in manifest["per_group"]] == [20, len(docs) - 20]


def test_dataset_manifest_refuses_mixed_datasets(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"dataset": name, "documents": 1, "tokens": 2, "text_bytes": 3, "empty_documents": 0})
        )
    with pytest.raises(ValueError, match="several datasets"):
        dataset_manifest([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "m.json")


def test_disk_full_during_tokenize_names_the_file_and_leaves_no_partial_shard(tmp_path):
    """ENOSPC for real: the output directory is a 64 KiB tmpfs, the shard needs ~10x that. The job
    must fail with an error naming the shard file, and leave no .bin/.idx (nor temporary file) in the
    directory: nothing there relies on Snakemake deleting a failed job's outputs (a node crash would
    not). Needs root (mount); skipped otherwise. An unwritable directory is no substitute when the
    tests run as root (CI does): chmod does not stop root."""
    import os
    import shutil
    import subprocess
    import sys

    root_dir = Path(__file__).resolve().parents[1]
    out_dir = tmp_path / "full"
    out_dir.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full test needs root to mount a small tmpfs (not root here)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "osref-enospc", str(out_dir)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"disk-full test: cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        manifest = tmp_path / "manifest.json"
        manifest.write_text(
            json.dumps(
                {
                    "dataset": "pydocs",
                    "group": 0,
                    "files": [{"path": str(root_dir / "assets/demo-corpus/pydocs311_rst_corpus.jsonl.zst")}],
                }
            )
        )
        prefix = out_dir / "group_000"
        proc = subprocess.run(
            [
                sys.executable,
                str(root_dir / "scripts/tokenize_group.py"),
                "--manifest",
                str(manifest),
                "--format",
                "jsonl.zst",
                "--tokenizer",
                str(root_dir / "assets/gpt-neox-20b"),
                "--max-documents",
                "300",
                "--out-prefix",
                str(prefix),
                "--stats",
                str(out_dir / "group_000.stats.json"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0, proc.stderr[-2000:]
        last_line = proc.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"tokenize: [Errno 28] cannot write {prefix}.bin"), proc.stderr[-2000:]
        assert "No space left on device" in last_line and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert sorted(p.name for p in out_dir.iterdir()) == []
    finally:
        subprocess.run(["umount", str(out_dir)], check=True)


def test_a_downloaded_copy_whose_size_changed_is_refused_by_the_tokenize_job(docs, tmp_path):
    """The job checks each input against its download manifest (a stat) before reading it."""
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "part-0.jsonl", docs[:5])
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"dataset": "toy", "group": 0, "files": [{"path": str(data), "size": data.stat().st_size - 7}]})
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "tokenize_group.py"),
            "--manifest",
            str(manifest),
            "--format",
            "jsonl",
            "--tokenizer",
            str(ROOT / "assets" / "gpt-neox-20b"),
            "--out-prefix",
            str(tmp_path / "out" / "g"),
            "--stats",
            str(tmp_path / "out" / "g.stats.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"tokenize: {data} has {data.stat().st_size} bytes, its download manifest {manifest} says" in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
