"""Tokenization into Megatron ``.bin/.idx`` pairs (GPT-NeoX-20B, EOD appended, uint16).

The output is byte-identical to Megatron-LM ``tools/preprocess_data.py --append-eod`` over the
same files in the same order (document level, one sequence per document), which is what
megatron-core's ``IndexedDataset`` reads. Tokenization needs no Megatron: the format is small
and written here directly, streaming, so memory is bounded by the batches in flight plus four
bytes per document for the index.

Readers stream parquet, jsonl, jsonl.gz / json.gz and jsonl.zst / jsonl.zstd (DCLM's suffix)
without an Arrow cache copy. Outputs are written under temporary names and renamed only when
complete, ``.bin`` first and ``.idx`` last, so a pair whose ``.idx`` exists is whole.

Bad rows — a line that is not JSON or not UTF-8, a lone UTF-16 surrogate (a ``"\\ud800"`` escape or
CESU-8 bytes, which Python's JSON decoder lets through and no tokenizer accepts), a text field that is
missing or not a string, a parquet value that is not valid UTF-8 — are reported to the reader's
``on_bad`` callback with file and line (row); :func:`tokenize_files` either fails the group on the
first one (``bad_documents="fail"``, what Megatron's preprocess_data does, with a traceback) or skips
and counts them (``"skip"``, the pipeline's default, with the first few messages kept in the stats)
and still fails when more than ``max_bad_fraction`` of the rows are bad. A parquet text column whose
type is not a string type is the file's schema, not a row: it always fails, naming file, column and
type.

Empty documents are indexed exactly as Megatron's ``preprocess_data.py`` indexes them: no tokens, no
EOD, no sequence, but an entry in the ``.idx`` document index (``document_indices`` repeats the
sequence count). With GPT-NeoX-20B only the empty string has no tokens. megatron-core's
``GPTDataset`` samples by sequence, so the extra entries change nothing in training.

Parallelism within a job: ``tokenize_files(..., workers=N)`` reads in the job's process and hands
batches of documents to N single-threaded worker processes; results are written in submission
order, so the bytes do not depend on N, and at most ``2 N`` batches are in flight.

Backends: ``"hf"`` (HF ``tokenizers``, the reference) or ``"gigatoken"`` (about 18x faster per
core). gigatoken agrees with HF on real text but not on every Unicode string: a differential fuzz
found one mismatch in 60,000 adversarial documents, the NFC canonical order of two rare combining
marks (U+1ACA, U+135E), because gigatoken's Unicode data version differs from the one HF
``tokenizers`` normalizes with. So a gigatoken shard is accepted only if its first
``verify_documents`` non-empty documents tokenize exactly as with HF; otherwise it is refused
(:class:`BackendMismatch`) and nothing is written. A mismatch later in the shard is not caught.

:func:`dataset_manifest` sums the per-group stats of a dataset into one manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class InputError(ValueError):
    """Bad input data; the message names the file (and line/row where known)."""


class OutputError(OSError):
    """An output could not be written (disk full, quota, I/O error); the message names the file.
    The writer has removed its temporary files by then: no partial shard is left behind."""


# ---- readers -------------------------------------------------------------------------------------


def _open_text_stream(path: Path) -> io.BufferedIOBase:
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw)
    if magic == _ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return raw


OnBad = Callable[[str], None]  # called with "<file>: line <n>: <what is wrong>" for a row that is not a document


def _fail_on_bad(message: str) -> None:
    raise InputError(message)


def _surrogate_problem(text: str) -> str | None:
    """A lone UTF-16 surrogate in ``text`` (not encodable as UTF-8, refused by every tokenizer), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
            "(a \\u escape or CESU-8 bytes of half a UTF-16 pair; not text)"
        )
    return None


def iter_jsonl(path: Path, text_field: str, on_bad: OnBad | None = None) -> Iterator[str]:
    """The text of each JSON line; bad rows go to ``on_bad`` (default: raise :class:`InputError`)."""
    bad = on_bad or _fail_on_bad
    stream = _open_text_stream(path)
    try:
        for line_no, line in enumerate(io.BufferedReader(stream, buffer_size=1 << 20), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                bad(f"{path}: line {line_no}: not UTF-8 ({exc.reason})")
                continue
            except json.JSONDecodeError as exc:
                bad(f"{path}: line {line_no}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                bad(f"{path}: line {line_no}: no text field {text_field!r}")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad(f"{path}: line {line_no}: field {text_field!r} is {type(text).__name__}, not a string")
                continue
            if problem := _surrogate_problem(text):
                bad(f"{path}: line {line_no}: field {text_field!r} has {problem}")
                continue
            yield text
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated compressed stream ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError is not an OSError
        if type(exc).__name__ == "ZstdError":
            raise InputError(f"{path}: corrupt zstd data ({exc})") from None
        raise
    finally:
        stream.close()


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _t: False)
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or is_view(arrow_type)
        or pa.types.is_null(arrow_type)
    )


_BAD = object()


def iter_parquet(path: Path, text_field: str, batch_rows: int = 1024, on_bad: OnBad | None = None) -> Iterator[str]:
    """The text column's values (null = empty document); rows that are not UTF-8 go to ``on_bad``."""
    import pyarrow.parquet as pq

    bad = on_bad or _fail_on_bad
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 (pyarrow raises many kinds for one broken file; named here)
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    if text_field not in parquet.schema_arrow.names:
        raise InputError(f"{path}: no text column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    column_type = parquet.schema_arrow.field(text_field).type
    if not _is_text_type(column_type):
        raise InputError(
            f"{path}: column {text_field!r} is {column_type}, not a string column "
            "(a schema problem of the file, not one bad row; check the dataset's text_field)"
        )
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
            column = batch.column(0)
            try:
                values = column.to_pylist()
            except UnicodeDecodeError:  # find the row(s): only on this rare path, value by value
                values = []
                for i in range(len(column)):
                    try:
                        values.append(column[i].as_py())
                    except UnicodeDecodeError as exc:
                        bad(f"{path}: row {row + i + 1}: not UTF-8 ({exc.reason})")
                        values.append(_BAD)
            for text in values:
                row += 1
                if text is not _BAD:
                    yield "" if text is None else text
    except OSError as exc:
        raise InputError(f"{path}: row {row}: truncated or corrupt parquet ({exc})") from None


def iter_documents(path: str | Path, fmt: str, text_field: str = "text", on_bad: OnBad | None = None) -> Iterator[str]:
    path = Path(path)
    if fmt == "parquet":
        return iter_parquet(path, text_field, on_bad=on_bad)
    return iter_jsonl(path, text_field, on_bad=on_bad)


# ---- the Megatron writer -------------------------------------------------------------------------


class MegatronWriter:
    """Streams token arrays into ``<prefix>.bin`` and writes ``<prefix>.idx`` on :meth:`finish`."""

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix.with_name(self.prefix.name + f".bin.tmp{os.getpid()}")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []

    def _write_error(self, target: str, exc: OSError) -> OutputError:
        """Removes every temporary file and returns the error to raise, naming the shard's file."""
        self.abort()
        return OutputError(
            exc.errno,
            f"cannot write {target} ({exc.strerror or exc}); no partial {self.prefix.name}.bin/.idx left behind",
        )

    def add_batch(self, token_lists: list[list[int]]) -> None:
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int32, count=len(token_lists))
        flat = np.fromiter((tok for toks in token_lists for tok in toks), dtype=self.dtype, count=int(lengths.sum()))
        self.add_encoded(flat, lengths)

    def add_encoded(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as their tokens back to back plus one length per document; a length of 0
        is an empty document (no sequence, an entry in the document index, as Megatron writes it)."""
        try:
            self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes(order="C"))
        except OSError as exc:
            raise self._write_error(f"{self.prefix}.bin", exc) from exc
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def has_data(self) -> bool:
        return any(bool(np.any(lengths)) for lengths in self._lengths)

    def finish(self) -> dict[str, int]:
        try:
            return self._finish()
        except OSError as exc:  # a full disk often shows only here, when the buffered tail is flushed
            raise self._write_error(f"{self.prefix}.bin/.idx", exc) from exc

    def _finish(self) -> dict[str, int]:
        self._bin.close()
        per_document = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        has_sequence = per_document > 0
        lengths = per_document[has_sequence]  # one sequence per non-empty document
        count = len(lengths)
        pointers = np.zeros(count, dtype=np.int64)
        if count:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        # 0, then the sequence count at the end of each document: an empty document repeats it
        doc_indices = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(has_sequence, dtype=np.int64)])
        idx_tmp = self.prefix.with_name(self.prefix.name + f".idx.tmp{os.getpid()}")
        with open(idx_tmp, "wb") as fh:
            fh.write(_IDX_MAGIC)
            fh.write(struct.pack("<Q", 1))
            fh.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            fh.write(struct.pack("<Q", count))
            fh.write(struct.pack("<Q", len(doc_indices)))
            fh.write(lengths.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(doc_indices.tobytes(order="C"))
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")
        return {"documents": count, "tokens": int(lengths.sum(dtype=np.int64))}

    def abort(self) -> None:
        try:
            self._bin.close()
        except OSError:
            pass  # flushing the buffered tail onto a full disk fails again; the file goes anyway
        for tmp in self.prefix.parent.glob(self.prefix.name + ".*.tmp*"):
            tmp.unlink(missing_ok=True)


def load_tokenizer(tokenizer_dir: str | Path, expected_sha256: str | None = None):
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: {path} does not exist (config key tokenizer.path)")
    if expected_sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"tokenizer: {path} has sha256 {digest}, config tokenizer.sha256 says {expected_sha256}")
    return Tokenizer.from_file(str(path))


# ---- backends ------------------------------------------------------------------------------------

BACKENDS = ("hf", "gigatoken")


class BackendUnavailable(RuntimeError):
    """The selected tokenizer backend cannot be used here (not installed, unknown name)."""


class BackendMismatch(RuntimeError):
    """The fast backend tokenized the shard's sample differently from HF tokenizers; shard refused."""


class EncodedBatch(NamedTuple):
    tokens: np.ndarray  # every document's ids and its EOD, back to back, in the output dtype
    lengths: np.ndarray  # int32 tokens per document, EOD included
    text_bytes: int  # UTF-8 bytes of the batch's texts


def _utf8_bytes(texts: list[str]) -> int:
    return sum(len(text.encode("utf-8")) for text in texts)


def _checked_ids(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if len(ids) and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(ids.max())} does not fit the output dtype {dtype}")
    return ids.astype(dtype, copy=False)


class HFEncoder:
    """HF ``tokenizers`` ``encode_batch_fast``: the reference the output format was verified with."""

    name = "hf"
    is_reference = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer; it pickles as its JSON, so workers get a copy

    def encode(self, texts: list[str], eod_id: int, dtype=np.uint16) -> EncodedBatch:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int32, count=len(ids))
        # numpy raises OverflowError on an id that does not fit the dtype
        tokens = np.fromiter(chain.from_iterable(doc + [eod_id] for doc in ids), dtype=dtype, count=int(lengths.sum()))
        return EncodedBatch(tokens, lengths, _utf8_bytes(texts))


class GigatokenEncoder:
    """gigatoken's ``encode_batch`` on the same ``tokenizer.json``; must pass the sample check."""

    name = "gigatoken"
    is_reference = False

    def __init__(self, hf_tokenizer):
        self._json = hf_tokenizer.to_str()
        self._tokenizer = self._build(self._json)

    @staticmethod
    def _build(tokenizer_json: str):
        try:
            import gigatoken
        except ImportError as exc:
            raise BackendUnavailable(
                f"tokenizer backend 'gigatoken' needs the gigatoken package ({exc}); "
                "pip install gigatoken, or use backend 'hf'"
            ) from None
        return gigatoken.Tokenizer.from_json(tokenizer_json)

    def __getstate__(self) -> dict:
        return {"json": self._json}

    def __setstate__(self, state: dict) -> None:
        self._json = state["json"]
        self._tokenizer = self._build(self._json)

    def encode(self, texts: list[str], eod_id: int, dtype=np.uint16) -> EncodedBatch:
        import awkward  # a gigatoken dependency

        # parallel=None: gigatoken's thread pool in a plain process, the calling thread in a pool worker
        ragged = self._tokenizer.encode_batch(texts)
        counts = awkward.to_numpy(awkward.num(ragged, axis=1))
        ids = _checked_ids(awkward.to_numpy(awkward.flatten(ragged, axis=1)), np.dtype(dtype))
        lengths = (counts + 1).astype(np.int32)
        tokens = np.empty(int(lengths.sum()), dtype=dtype)
        is_eod = np.zeros(len(tokens), dtype=bool)
        is_eod[np.cumsum(lengths) - 1] = True
        tokens[is_eod] = eod_id
        tokens[~is_eod] = ids
        return EncodedBatch(tokens, lengths, _utf8_bytes(texts))


def make_encoder(backend, tokenizer):
    """``backend``: ``"hf"``, ``"gigatoken"``, or an object with ``encode``, ``name`` and ``is_reference``."""
    if not isinstance(backend, str):
        return backend
    if backend == "hf":
        return HFEncoder(tokenizer)
    if backend == "gigatoken":
        return GigatokenEncoder(tokenizer)
    raise BackendUnavailable(f"unknown tokenizer backend {backend!r} (choose from {', '.join(BACKENDS)})")


class SampleCheck:
    """Compares the first ``documents`` non-empty documents of a shard with the HF reference."""

    def __init__(self, reference: HFEncoder, documents: int, backend_name: str, shard: str):
        self.reference = reference
        self.remaining = documents
        self.checked = 0
        self.backend_name = backend_name
        self.shard = shard

    def compare(self, texts: list[str], batch: EncodedBatch, eod_id: int) -> None:
        count = min(self.remaining, len(texts))
        expected = self.reference.encode(texts[:count], eod_id, batch.tokens.dtype)
        got_tokens = batch.tokens[: int(batch.lengths[:count].sum(dtype=np.int64))]
        if not (
            np.array_equal(expected.lengths, batch.lengths[:count]) and np.array_equal(expected.tokens, got_tokens)
        ):
            raise BackendMismatch(self._describe(expected, batch, count))
        self.remaining -= count
        self.checked += count

    def _describe(self, expected: EncodedBatch, got: EncodedBatch, count: int) -> str:
        want_docs = np.split(expected.tokens, np.cumsum(expected.lengths)[:-1])
        got_docs = np.split(got.tokens, np.cumsum(got.lengths)[:-1])[:count]
        doc = next(i for i, (a, b) in enumerate(zip(want_docs, got_docs, strict=False)) if not np.array_equal(a, b))
        a, b = want_docs[doc].tolist(), got_docs[doc].tolist()
        pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        return (
            f"{self.shard}: backend {self.backend_name!r} differs from HF tokenizers on non-empty document "
            f"{self.checked + doc} of the shard (0-based), token {pos}: HF gives {a[pos : pos + 5]}, "
            f"{self.backend_name} gives {b[pos : pos + 5]} ({len(a)} vs {len(b)} tokens with EOD). Shard refused; "
            "known cause: NFC order of rare combining marks (Unicode data versions differ). "
            "Tokenize this shard with backend 'hf'."
        )


# ---- worker processes ----------------------------------------------------------------------------

_worker_encoder = None


def _start_worker(encoder) -> None:
    global _worker_encoder
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizer first runs in parallel, i.e. later
    if type(encoder) is not HFEncoder:
        # HF tokenizers is known to be fork-safe (a child forked after its thread pool ran encodes on
        # one thread); for any other backend build a fresh copy in this process from its pickled state
        import pickle

        encoder = pickle.loads(pickle.dumps(encoder))  # our own object
    _worker_encoder = encoder


def _worker_start_method() -> str:
    """``fork`` on Linux: workers are up in milliseconds with the parent's tokenizer, where spawned
    ones re-import numpy and re-parse the 2 MB tokenizer.json (two workers: 0.03 s vs 2.3 s, measured
    on a loaded 2-core machine; a fixed cost, small next to a real shard group). Safe here: with workers > 1 the parent only reads, writes
    and, for gigatoken, runs the HF sample check; HF ``tokenizers`` falls back to one thread in a child
    forked after its thread pool ran; other backends are rebuilt in the child (:func:`_start_worker`).
    ``spawn`` elsewhere (fork is unsafe on macOS)."""
    import multiprocessing
    import sys

    return "fork" if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _encode_in_worker(texts: list[str], eod_id: int, dtype: str) -> EncodedBatch:
    return _worker_encoder.encode(texts, eod_id, dtype)


class _Ready:
    """A finished result with the ``result()`` of a future, for the in-process path."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


BAD_EXAMPLES = 20  # bad rows whose message is kept in a group's stats (and logged) when they are skipped

# A batch also closes at about this many characters (~0.3 s of HF tokenizers on one core), so the
# last batches of a shard leave workers idle only briefly.
BATCH_CHARS = 1 << 20


def _batched(texts: Iterable[str], size: int, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) == size or chars >= max_chars:
            yield batch
            batch = []
            chars = 0
    if batch:
        yield batch


def tokenize_files(
    files: list[str | Path],
    out_prefix: str | Path,
    tokenizer,
    *,
    fmt: str,
    text_field: str = "text",
    eod_id: int = 0,
    max_documents: int | None = None,
    batch_size: int = 1000,
    workers: int = 1,
    backend="hf",
    verify_documents: int = 1000,
    progress: bool = True,
    start_method: str | None = None,
    parallelism: str = "processes",
    bad_documents: str = "fail",
    max_bad_fraction: float = 0.0,
) -> dict:
    """Tokenize ``files`` in order into one ``.bin/.idx`` pair; returns the shard's stats.

    ``tokenizer`` is the HF ``tokenizers.Tokenizer`` (also the reference for a non-HF backend).
    ``workers`` > 1 encodes in that many worker processes, one thread each; the output is the same.
    ``start_method``: how they start (default: :func:`_worker_start_method`).
    ``parallelism="threads"`` instead encodes in this process, one batch at a time on a background
    thread, with the backend's own thread pool (HF: ``RAYON_NUM_THREADS`` = workers, set by the
    caller before the tokenizer first runs) while this thread reads and writes the neighbouring
    batches; the output is the same.
    Empty documents are indexed as Megatron indexes them (see the module docstring) and counted.
    ``bad_documents``: ``"fail"`` (the first bad row fails the group naming file and line) or ``"skip"``
    (bad rows are left out and counted, the first :data:`BAD_EXAMPLES` messages kept in the stats and
    logged; the group still fails when more than ``max_bad_fraction`` of its rows are bad).
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if bad_documents not in ("fail", "skip"):
        raise ValueError(f"bad_documents must be 'fail' or 'skip', not {bad_documents!r}")
    encoder = make_encoder(backend, tokenizer)
    writer = MegatronWriter(out_prefix)
    dtype = writer.dtype.name
    check = (
        None
        if encoder.is_reference
        else SampleCheck(HFEncoder(tokenizer), verify_documents, encoder.name, str(out_prefix))
    )
    stats: dict[str, Any] = {
        "files": [str(f) for f in files],
        "documents": 0,
        "tokens": 0,
        "text_bytes": 0,
        "empty_documents": 0,
        "empty_files": [],
        "bad_documents": 0,
        "bad_examples": [],
        "bad_policy": bad_documents,
        "backend": encoder.name,
        "workers": workers,
    }

    def on_bad(message: str) -> None:
        if bad_documents == "fail":
            raise InputError(message)
        stats["bad_documents"] += 1
        if len(stats["bad_examples"]) < BAD_EXAMPLES:
            stats["bad_examples"].append(message)
            print(f"skipped a bad row: {message}", file=sys.stderr)

    started = time.time()
    bar = tqdm(total=max_documents, unit="doc", disable=not progress, mininterval=2.0, desc=Path(out_prefix).name)
    if parallelism not in ("processes", "threads"):
        raise ValueError(f"parallelism must be 'processes' or 'threads', not {parallelism!r}")
    pool = None
    if workers > 1 and parallelism == "threads":
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)  # the encode releases the GIL; its threads are the backend's
    elif workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(start_method or _worker_start_method()),
            initializer=_start_worker,
            initargs=(encoder,),
        )
    max_in_flight = (2 if parallelism == "threads" else 2 * workers) if pool else 1
    try:
        seen = 0  # documents read (empty ones included); rows = these + the bad ones

        def documents() -> Iterator[str]:
            nonlocal seen
            for path in files:
                in_file = 0
                for text in iter_documents(path, fmt, text_field, on_bad=on_bad):
                    if max_documents is not None and seen >= max_documents:
                        return
                    seen += 1
                    in_file += 1
                    if not text:
                        stats["empty_documents"] += 1
                    yield text
                if in_file == 0:
                    stats["empty_files"].append(str(path))

        pending: deque = deque()

        def write_oldest() -> None:
            result, texts_to_check, empty_slots = pending.popleft()
            batch = result.result()
            if texts_to_check is not None:
                check.compare(texts_to_check, batch, eod_id)
            lengths = np.insert(batch.lengths, empty_slots, 0) if empty_slots else batch.lengths
            writer.add_encoded(batch.tokens, lengths)
            stats["text_bytes"] += batch.text_bytes
            bar.update(len(lengths))

        submitted_for_check = 0
        for texts in _batched(documents(), batch_size):
            # empty documents never reach the encoder: they become zero lengths (no EOD) when written
            empty_slots = [i - k for k, i in enumerate(i for i, text in enumerate(texts) if not text)]
            if empty_slots:
                texts = [text for text in texts if text]
            if not texts:
                result = _Ready(EncodedBatch(np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int32), 0))
            elif pool and parallelism == "threads":
                result = pool.submit(encoder.encode, texts, eod_id, dtype)
            elif pool:
                result = pool.submit(_encode_in_worker, texts, eod_id, dtype)
            else:
                result = _Ready(encoder.encode(texts, eod_id, dtype))
            texts_to_check = None
            if check is not None and submitted_for_check < verify_documents and texts:
                texts_to_check = texts
                submitted_for_check += len(texts)
            pending.append((result, texts_to_check, empty_slots))
            if len(pending) >= max_in_flight:
                write_oldest()
        while pending:
            write_oldest()
        rows = seen + stats["bad_documents"]
        if stats["bad_documents"] > max_bad_fraction * rows:
            raise InputError(
                f"{stats['bad_documents']} of {rows} rows ({100 * stats['bad_documents'] / rows:.1f} %) were bad, more "
                f"than max_bad_fraction {max_bad_fraction} (config tokenizer.max_bad_fraction); a wrong text field "
                f"or a broken file? First: {stats['bad_examples'][0]}"
            )
        if not writer.has_data():
            raise InputError(f"no documents in {', '.join(map(str, files))}")
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    stats.update(writer.finish())
    if check is not None:
        stats["verified_documents"] = check.checked
    stats["seconds"] = round(time.time() - started, 3)
    stats["tokens_per_second"] = round(stats["tokens"] / max(stats["seconds"], 1e-9))
    return stats


# ---- per-dataset manifest ------------------------------------------------------------------------


def dataset_manifest(stats_paths: list[str | Path], out_path: str | Path) -> dict:
    """Sums the groups' ``.stats.json`` of one dataset into ``out_path``; returns the manifest."""
    from osref.files import write_json_atomic

    totals = {"documents": 0, "tokens": 0, "text_bytes": 0, "empty_documents": 0, "bad_documents": 0}
    groups, empty_files, datasets, backends = [], [], set(), set()
    for path in stats_paths:
        stats = json.loads(Path(path).read_text())
        for key in totals:
            totals[key] += int(stats.get(key, 0))  # stats written before bad rows were counted have none
        empty_files += stats.get("empty_files", [])
        datasets.add(stats.get("dataset"))
        backends.add(stats.get("backend", "hf"))
        groups.append(
            {
                "group": stats.get("group"),
                "stats": str(path),
                **{key: int(stats[key]) for key in ("documents", "tokens", "text_bytes")},
            }
        )
    datasets.discard(None)
    if len(datasets) > 1:
        raise ValueError(f"stats of several datasets in one manifest: {', '.join(sorted(datasets))}")
    manifest = {
        "dataset": datasets.pop() if datasets else None,
        "groups": len(groups),
        **totals,
        "empty_files": empty_files,
        "backends": sorted(backends),
        "per_group": groups,
    }
    write_json_atomic(out_path, manifest)
    return manifest
