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

Parallelism within a job: ``tokenize_files(..., workers=N)`` only reads in the job's process — it
decompresses each file into a reused buffer and cuts it into ~1 MB chunks of whole lines (parquet:
Arrow arrays) — and hands the chunks to N single-threaded worker processes, which parse them (orjson;
a line orjson refuses goes through the standard library's rules), check every row and encode. Results
are written in submission order, so the bytes do not depend on N, and at most ``2 N`` chunks are in
flight; bad rows travel back with their chunk and are numbered and reported (or fail the group) in file
order. Forked workers get their chunks through shared memory (:class:`SharedChunks`), not the pool's
pipe. So the job's process spends per MB about the decompression: with gigatoken, whose encode is ~20x
faster than HF's, parsing and pickling in the job's process (and the HF sample check there) had made
the job reach 0.15 of the tokenizer's raw speed.

Backends: ``"hf"`` (HF ``tokenizers``, the reference) or ``"gigatoken"`` (about 18x faster per
core). gigatoken agrees with HF on real text but not on every Unicode string: a differential fuzz
found one mismatch in 60,000 adversarial documents, the NFC canonical order of two rare combining
marks (U+1ACA, U+135E), because gigatoken's Unicode data version differs from the one HF
``tokenizers`` normalizes with. So a gigatoken shard is accepted only if its first
``verify_documents`` non-empty documents tokenize exactly as with HF; otherwise it is refused
(:class:`BackendMismatch`) and nothing is written. A mismatch later in the shard is not caught. The
sample is encoded with HF by the worker that encodes its chunk; its cost (1-2 CPU-s for 1000 documents of
~1000 tokens) is fixed per group, small next to a real group (~5 B tokens) but not next to a benchmark's.

:func:`dataset_manifest` sums the per-group stats of a dataset into one manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import mmap
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from concurrent.futures import Executor

    import zstandard

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
#
# The job's process only reads: it decompresses and cuts each file into chunks of whole lines (jsonl) or
# Arrow arrays (parquet); whoever encodes a chunk also parses it (parse_chunk). So with worker
# processes the JSON parsing, the checks of every row and the Python strings are made in the workers,
# in parallel, and only bytes cross the process boundary.


def _open_text_stream(path: Path) -> io.BufferedIOBase | zstandard.ZstdDecompressionReader:
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


# A chunk is about this many bytes of input (~10 ms of gigatoken, ~0.3 s of HF tokenizers on one core).
CHUNK_BYTES = 1 << 20


class Chunk(NamedTuple):
    """Consecutive rows of one input file, as read (not yet parsed)."""

    path: str  # the file, as messages name it
    data: bytes | memoryview | None  # jsonl: whole lines, blank ones included (they count in line numbers)
    column: Any = None  # parquet: the text column's values, an Arrow array
    shared: tuple[int, int] | None = None  # jsonl, sent to a worker: (offset, size) of data in the shared buffer


class Parsed(NamedTuple):
    texts: list[str]  # the chunk's documents in order, empty ones included
    sizes: list[int]  # UTF-8 bytes of each document
    bad: list[tuple[int, int, str]]  # per bad row: (documents before it in the chunk, its row in the chunk, problem)
    rows: int  # lines (jsonl) or rows (parquet) in the chunk


def _jsonl_chunks(path: Path, max_bytes: int, copy: bool = True) -> Generator[Chunk, None, None]:
    # decompressed straight into one reused buffer (a fresh MB-sized bytes object per block cost the job's
    # process about as much again as the decompression); no line is counted here: a worker splits the
    # chunk, and the job numbers the lines when it writes the results in order. copy=False: a chunk's
    # data is a view into that buffer, valid until the next chunk is asked for
    stream = _open_text_stream(path)
    buffer = bytearray(2 * max_bytes)
    view = memoryview(buffer)
    filled, name = 0, str(path)
    try:
        while True:
            if filled == len(buffer):  # no newline in a whole buffer: a longer line, a bigger buffer
                bigger = bytearray(2 * len(buffer))
                bigger[:filled] = view[:filled]
                buffer, view = bigger, memoryview(bigger)
            read = stream.readinto(view[filled : min(len(buffer), filled + max_bytes)])
            if not read:
                break
            end = filled + read
            cut = buffer.rfind(b"\n", filled, end) + 1  # a chunk ends with a whole line
            if cut:
                yield Chunk(name, bytes(view[:cut]) if copy else view[:cut])
                view[: end - cut] = bytes(view[cut:end])  # the start of the next line
                end -= cut
            filled = end
        if filled:  # the last line has no newline
            yield Chunk(name, bytes(view[:filled]) if copy else view[:filled])
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated compressed stream ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError is not an OSError
        if type(exc).__name__ == "ZstdError":
            raise InputError(f"{path}: corrupt zstd data ({exc})") from None
        raise
    finally:
        stream.close()


def _parquet_chunks(path: Path, text_field: str, max_rows: int) -> Generator[Chunk, None, None]:
    import pyarrow.parquet as pq

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
        for batch in parquet.iter_batches(batch_size=max_rows, columns=[text_field]):
            yield Chunk(str(path), None, batch.column(0))
            row += batch.num_rows
    except OSError as exc:
        raise InputError(f"{path}: row {row}: truncated or corrupt parquet ({exc})") from None
    finally:
        parquet.close()


def read_chunks(
    path: str | Path,
    fmt: str,
    text_field: str = "text",
    max_rows: int = 1000,
    max_bytes: int = CHUNK_BYTES,
    copy: bool = True,
) -> Generator[Chunk, None, None]:
    """The file's rows in order, in chunks: jsonl, whole lines of about ``max_bytes``; parquet,
    ``max_rows`` rows. A file that cannot be read (corrupt compression, not parquet, no text column, a
    text column that is not a string type) raises :class:`InputError` naming it; rows are checked by
    :func:`parse_chunk`. ``copy=False``: a jsonl chunk's data is a memoryview into the reader's buffer,
    valid only until the next chunk is asked for (:func:`owned` makes it bytes)."""
    path = Path(path)
    if fmt == "parquet":
        return _parquet_chunks(path, text_field, max_rows)
    return _jsonl_chunks(path, max_bytes, copy)


def owned(chunk: Chunk) -> Chunk:
    """The chunk with its data as bytes of its own (not a view into a reader's buffer)."""
    return chunk._replace(data=bytes(chunk.data)) if isinstance(chunk.data, memoryview) else chunk


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _strict_text(line: bytes, text_field: str) -> tuple[str | None, str | None]:
    """One JSON line by the standard library's rules: ``(text, None)``, ``(None, problem)`` for a bad row,
    ``(None, None)`` for a blank line. The reference for what a document is and for the messages."""
    if not line.strip():
        return None, None
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg})"
    if not isinstance(record, dict) or text_field not in record:
        return None, f"no text field {text_field!r}"
    text = record[text_field]
    if not isinstance(text, str):
        return None, f"field {text_field!r} is {type(text).__name__}, not a string"
    if problem := _surrogate_problem(text):
        return None, f"field {text_field!r} has {problem}"
    return text, None


def _parse_lines(data: bytes, text_field: str) -> Parsed:
    # orjson first (about 3x faster than json on long texts); it is stricter than json (no NaN, no BOM,
    # no lone surrogate, UTF-8 only), and any line it refuses, or whose text field is missing or not a
    # string, goes through _strict_text, so what counts as a document and every message are json's.
    from orjson import loads

    texts: list[str] = []
    sizes: list[int] = []
    bad: list[tuple[int, int, str]] = []
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()
    for row, line in enumerate(lines):
        try:
            text = loads(line)[text_field]
        except Exception:  # noqa: BLE001 (not JSON to orjson, not an object, no such field: checked strictly below)
            text = None
        if type(text) is not str:
            text, problem = _strict_text(line, text_field)
            if text is None:
                if problem is not None:
                    bad.append((len(texts), row, problem))
                continue
        texts.append(text)
        sizes.append(_utf8_size(text))
    return Parsed(texts, sizes, bad, len(lines))


def _parse_column(column) -> Parsed:
    try:
        values = column.to_pylist()
        bad: list[tuple[int, int, str]] = []
    except UnicodeDecodeError:  # find the row(s): only on this rare path, value by value
        values, bad = [], []
        for row in range(len(column)):
            try:
                values.append(column[row].as_py())
            except UnicodeDecodeError as exc:
                bad.append((len(values), row, f"not UTF-8 ({exc.reason})"))
    texts = ["" if text is None else text for text in values]  # null = an empty document
    return Parsed(texts, [_utf8_size(text) for text in texts], bad, len(column))


def parse_chunk(chunk: Chunk, text_field: str = "text") -> Parsed:
    """The chunk's documents (empty ones included), their UTF-8 sizes, its bad rows with their positions
    and problems, and its row count. Bad rows: a line that is not JSON or not UTF-8, a lone surrogate,
    a text field missing or not a string; a parquet value that is not UTF-8 (null is an empty document)."""
    if chunk.column is not None:
        return _parse_column(chunk.column)
    assert chunk.data is not None  # a chunk has a column (parquet) or data (jsonl)
    return _parse_lines(bytes(chunk.data) if isinstance(chunk.data, memoryview) else chunk.data, text_field)


def bad_row_message(path: str, fmt: str, number: int, problem: str) -> str:
    """``<file>: line <n>: <problem>`` (parquet: ``row <n>``), ``number`` 1-based."""
    return f"{path}: {'row' if fmt == 'parquet' else 'line'} {number}: {problem}"


def iter_documents(path: str | Path, fmt: str, text_field: str = "text", on_bad: OnBad | None = None) -> Iterator[str]:
    """The text of each document of one file, in order; bad rows go to ``on_bad`` in their place
    (default: raise :class:`InputError`)."""
    bad_row = on_bad or _fail_on_bad
    rows_before = 0
    for chunk in read_chunks(path, fmt, text_field):
        parsed = parse_chunk(chunk, text_field)
        bad = deque(parsed.bad)
        for i, text in enumerate(parsed.texts):
            while bad and bad[0][0] <= i:
                _, row, problem = bad.popleft()
                bad_row(bad_row_message(chunk.path, fmt, rows_before + row + 1, problem))
            yield text
        for _, row, problem in bad:
            bad_row(bad_row_message(chunk.path, fmt, rows_before + row + 1, problem))
        rows_before += parsed.rows


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
            data = np.ascontiguousarray(tokens, dtype=self.dtype)
            self._bin.write(memoryview(data).cast("B"))  # type: ignore[arg-type]  # numpy stubs: no __buffer__ on 3.11
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
    text_bytes: int = 0  # UTF-8 bytes of the batch's texts (the job counts them while parsing; backends may leave 0)


def _checked_ids(ids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if len(ids) and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(ids.max())} does not fit the output dtype {dtype}")
    return ids.astype(dtype, copy=False)


class HFEncoder:
    """HF ``tokenizers`` ``encode_batch_fast``: the reference the output format was verified with."""

    name = "hf"
    is_reference = True
    fork_safe = True  # a child forked after the thread pool ran falls back to one thread

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer; it pickles as its JSON, so workers get a copy

    def encode(self, texts: list[str], eod_id: int, dtype=np.uint16) -> EncodedBatch:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int32, count=len(ids))
        # numpy raises OverflowError on an id that does not fit the dtype
        tokens = np.fromiter(chain.from_iterable(doc + [eod_id] for doc in ids), dtype=dtype, count=int(lengths.sum()))
        return EncodedBatch(tokens, lengths)


def _ragged_to_numpy(ragged) -> tuple[np.ndarray, np.ndarray]:
    """(ids per document, all ids back to back) of gigatoken's awkward array: straight from its offsets
    and content buffers when it has the usual layout (0.1 ms a chunk; awkward's num/flatten: ~0.7 ms)."""
    import awkward  # a gigatoken dependency

    layout = ragged.layout
    if isinstance(layout, awkward.contents.ListOffsetArray) and isinstance(layout.content, awkward.contents.NumpyArray):
        offsets = np.asarray(layout.offsets.data)
        return np.diff(offsets), np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
    return awkward.to_numpy(awkward.num(ragged, axis=1)), awkward.to_numpy(awkward.flatten(ragged, axis=1))


class GigatokenEncoder:
    """gigatoken's ``encode_batch`` on the same ``tokenizer.json``; must pass the sample check.

    ``parallel``: None = gigatoken's thread pool (``RAYON_NUM_THREADS``) in a plain process; a worker
    process sets False, gigatoken's sequential path, which never touches the pool. That path is also
    what makes a forked copy safe: the job's process encodes with it only sequentially (:meth:`warm_up`),
    so no pool exists at the fork, and a worker skips rebuilding it from ``tokenizer.json`` (0.2-0.5 s)."""

    name = "gigatoken"
    is_reference = False
    fork_safe = True

    def __init__(self, hf_tokenizer):
        self._json = hf_tokenizer.to_str()
        self._tokenizer = self._build(self._json)
        self.parallel: bool | None = None

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
        return {"json": self._json, "parallel": self.parallel}

    def __setstate__(self, state: dict) -> None:
        self._json = state["json"]
        self.parallel = state.get("parallel")
        self._tokenizer = self._build(self._json)

    def warm_up(self) -> None:
        """gigatoken's first encode in a process costs ~0.25 s (tables built on first use), whatever its
        size. Done once before forking, workers inherit it; sequential, so no thread pool is started."""
        self._tokenizer.encode_batch(["warm up"], parallel=False)

    def encode(self, texts: list[str], eod_id: int, dtype=np.uint16) -> EncodedBatch:
        ragged = self._tokenizer.encode_batch(texts, parallel=self.parallel)
        counts, ids = _ragged_to_numpy(ragged)
        ids = _checked_ids(ids, np.dtype(dtype))
        lengths = (counts + 1).astype(np.int32)
        ends = np.cumsum(lengths, dtype=np.int64)
        tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
        is_eod = np.zeros(len(tokens), dtype=bool)
        is_eod[ends - 1] = True
        tokens[is_eod] = eod_id
        tokens[~is_eod] = ids
        return EncodedBatch(tokens, lengths)


def make_encoder(backend, tokenizer):
    """``backend``: ``"hf"``, ``"gigatoken"``, or an object with ``encode``, ``name`` and ``is_reference``."""
    if not isinstance(backend, str):
        return backend
    if backend == "hf":
        return HFEncoder(tokenizer)
    if backend == "gigatoken":
        return GigatokenEncoder(tokenizer)
    raise BackendUnavailable(f"unknown tokenizer backend {backend!r} (choose from {', '.join(BACKENDS)})")


# ---- encoding a chunk: parse, tokenize, compare the sample with HF ---------------------------------


class ChunkResult(NamedTuple):
    tokens: np.ndarray  # the ids of the chunk's non-empty documents, each followed by the EOD, back to back
    lengths: np.ndarray  # int32 per document in row order, EOD included; 0 = an empty document
    sizes: np.ndarray  # int64 UTF-8 bytes per document
    bad: list[tuple[int, int, str]]  # the chunk's bad rows: (documents before it, its row in the chunk, problem)
    rows: int  # lines (jsonl) or rows (parquet) in the chunk
    difference: tuple | None  # where the backend first differs from HF in the sample, see _first_difference
    verify_seconds: float  # spent on the HF sample


def _first_difference(expected: EncodedBatch, got: EncodedBatch, count: int) -> tuple | None:
    """None if the first ``count`` documents agree, else (document, token, HF's ids there, the backend's
    ids there, HF's length, the backend's length), all within the sample."""
    got_tokens = got.tokens[: int(np.asarray(got.lengths[:count]).sum(dtype=np.int64))]
    if np.array_equal(expected.lengths, got.lengths[:count]) and np.array_equal(expected.tokens, got_tokens):
        return None
    want_docs = np.split(expected.tokens, np.cumsum(expected.lengths)[:-1])
    got_docs = np.split(got.tokens, np.cumsum(got.lengths)[:-1])[:count]
    doc = next(i for i, (a, b) in enumerate(zip(want_docs, got_docs, strict=False)) if not np.array_equal(a, b))
    a, b = want_docs[doc].tolist(), got_docs[doc].tolist()
    pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return doc, pos, a[pos : pos + 5], b[pos : pos + 5], len(a), len(b)


class ChunkEncoder:
    """What a worker (or the job's process) does with a chunk: parse it, encode its non-empty documents
    (``batch_size`` at a time), and encode the first ``verify`` of them with HF tokenizers too and
    compare (a non-HF backend)."""

    def __init__(
        self, encoder, reference: HFEncoder | None, text_field: str, eod_id: int, dtype: str, batch_size: int = 1000
    ):
        self.encoder = encoder
        self.reference = reference
        self.text_field = text_field
        self.eod_id = eod_id
        self.dtype = dtype
        self.batch_size = batch_size
        self.shared: mmap.mmap | None = None  # the job's shared buffer (forked workers only)

    def _encode(self, texts: list[str]) -> EncodedBatch:
        parts = [
            self.encoder.encode(texts[i : i + self.batch_size], self.eod_id, self.dtype)
            for i in range(0, len(texts), self.batch_size)
        ]
        if len(parts) == 1:
            return parts[0]
        return EncodedBatch(
            np.concatenate([part.tokens for part in parts]), np.concatenate([part.lengths for part in parts])
        )

    def __call__(self, chunk: Chunk, verify: int = 0) -> ChunkResult:
        if chunk.shared is not None:
            offset, size = chunk.shared
            assert self.shared is not None  # shared chunks are only made for workers given the buffer
            chunk = chunk._replace(data=self.shared[offset : offset + size], shared=None)
        return self.encode_parsed(parse_chunk(chunk, self.text_field), verify)

    def encode_parsed(self, parsed: Parsed, verify: int = 0) -> ChunkResult:
        """The second half of :meth:`__call__`, for a chunk parsed already."""
        texts = [text for text in parsed.texts if text]  # empty documents are never encoded
        lengths = np.zeros(len(parsed.texts), dtype=np.int32)
        tokens = np.zeros(0, dtype=self.dtype)
        difference, seconds = None, 0.0
        if texts:
            batch = self._encode(texts)
            tokens = batch.tokens
            if len(texts) == len(parsed.texts):
                lengths[:] = batch.lengths
            else:
                lengths[np.fromiter(map(bool, parsed.texts), dtype=bool, count=len(parsed.texts))] = batch.lengths
            if verify and self.reference is not None:
                started = time.perf_counter()
                count = min(verify, len(texts))
                difference = _first_difference(
                    self.reference.encode(texts[:count], self.eod_id, self.dtype), batch, count
                )
                seconds = time.perf_counter() - started
        return ChunkResult(
            tokens, lengths, np.asarray(parsed.sizes, dtype=np.int64), parsed.bad, parsed.rows, difference, seconds
        )


# ---- worker processes ----------------------------------------------------------------------------

_worker: ChunkEncoder | None = None


def _start_worker(work: ChunkEncoder) -> None:
    global _worker
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizer first runs in parallel, i.e. later
    if not getattr(work.encoder, "fork_safe", False):
        # a backend not known to be fork-safe: a fresh copy built in this process from its pickled state
        import pickle

        work.encoder = pickle.loads(pickle.dumps(work.encoder))
    if isinstance(work.encoder, GigatokenEncoder):
        work.encoder.parallel = False  # one thread per worker, and never gigatoken's pool in a forked child
    _worker = work


def _worker_start_method() -> str:
    """``fork`` on Linux: workers are up in milliseconds with the parent's tokenizers, where spawned
    ones re-import numpy and re-parse the 2 MB tokenizer.json (two workers: 0.03 s vs 2.3 s, measured
    on a loaded 2-core machine; a fixed cost, small next to a real shard group). Safe here: with workers
    > 1 the parent only reads, writes and parses the sample's chunks, never encodes; HF ``tokenizers``
    falls back to one thread in a child forked after its thread pool ran; gigatoken runs its sequential
    path in a worker; backends not marked ``fork_safe`` are rebuilt in the child (:func:`_start_worker`).
    ``spawn`` elsewhere (fork is unsafe on macOS)."""
    import multiprocessing

    return "fork" if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _encode_in_worker(chunk: Chunk, verify: int) -> ChunkResult:
    assert _worker is not None  # set by _start_worker, the pool's initializer
    return _worker(chunk, verify)


class SharedChunks:
    """Hands jsonl chunks to forked workers through shared memory instead of a pipe: one anonymous
    shared mapping, made before the workers fork, with one slot per chunk in flight. Pickling chunks
    through the pool's pipe cost the job's process as much as decompressing them (measured per 11 MB of
    the demo corpus: 0.018 CPU-s against 0.017 for zstd; the worker's unpickling on top); a copy into a
    slot costs ~0.1 ms per MB. Slots are
    used round-robin: a slot is written again only after the result of the chunk that used it was
    written, i.e. its worker has read it (at most ``slots - 1`` chunks are pending then). A chunk
    larger than a slot (a very long line) goes through the pipe."""

    def __init__(self, slots: int, slot_bytes: int = 2 * CHUNK_BYTES):
        self.buffer = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS: shared with forked children
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.used = 0

    def place(self, chunk: Chunk) -> Chunk:
        """The chunk as it is sent: its bytes in the next slot, or unchanged when it does not fit."""
        if chunk.data is None or len(chunk.data) > self.slot_bytes:
            return chunk
        offset = (self.used % self.slots) * self.slot_bytes
        self.used += 1
        self.buffer[offset : offset + len(chunk.data)] = chunk.data
        return chunk._replace(data=None, shared=(offset, len(chunk.data)))

    def close(self) -> None:
        self.buffer.close()


class _Ready:
    """A finished result with the ``result()`` of a future, for the in-process path."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


BAD_EXAMPLES = 20  # bad rows whose message is kept in a group's stats (and logged) when they are skipped


def _mismatch_message(shard: str, backend: str, first: int, difference: tuple) -> str:
    doc, pos, want, got, want_len, got_len = difference
    return (
        f"{shard}: backend {backend!r} differs from HF tokenizers on non-empty document "
        f"{first + doc} of the shard (0-based), token {pos}: HF gives {want}, "
        f"{backend} gives {got} ({want_len} vs {got_len} tokens with EOD). Shard refused; "
        "known cause: NFC order of rare combining marks (Unicode data versions differ). "
        "Tokenize this shard with backend 'hf'."
    )


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
    chunk_bytes: int = CHUNK_BYTES,
) -> dict:
    """Tokenize ``files`` in order into one ``.bin/.idx`` pair; returns the shard's stats.

    ``tokenizer`` is the HF ``tokenizers.Tokenizer`` (also the reference for a non-HF backend).
    This process reads the files in chunks (jsonl: whole lines, about ``chunk_bytes``; parquet:
    ``batch_size`` rows); ``workers`` > 1 parses and encodes them in that many worker processes, one
    thread each, ``batch_size`` documents per encode call, while this process reads ahead and writes the
    results in file order: the output is the same for any ``workers``, ``batch_size``, ``chunk_bytes``.
    ``start_method``: how they start (default: :func:`_worker_start_method`).
    ``parallelism="threads"`` instead parses and encodes in this process, one chunk at a time on a
    background thread, with the backend's own thread pool (HF: ``RAYON_NUM_THREADS`` = workers, set by
    the caller before the tokenizer first runs) while this thread reads the next chunk and writes the
    previous one; the output is the same.
    Empty documents are indexed as Megatron indexes them (see the module docstring) and counted.
    ``bad_documents``: ``"fail"`` (the first bad row fails the group naming file and line) or ``"skip"``
    (bad rows are left out and counted, the first :data:`BAD_EXAMPLES` messages kept in the stats and
    logged; the group still fails when more than ``max_bad_fraction`` of its rows are bad).
    ``max_documents``: stop after that many documents (empty ones included); rows after the last one
    taken are not read.
    A non-HF backend's first ``verify_documents`` non-empty documents are also encoded with HF tokenizers
    (by whoever encodes their chunk) and must agree, or :class:`BackendMismatch`; ``verify_seconds`` in
    the stats is the time that took, summed over the workers.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if bad_documents not in ("fail", "skip"):
        raise ValueError(f"bad_documents must be 'fail' or 'skip', not {bad_documents!r}")
    if parallelism not in ("processes", "threads"):
        raise ValueError(f"parallelism must be 'processes' or 'threads', not {parallelism!r}")
    encoder = make_encoder(backend, tokenizer)
    reference = None if encoder.is_reference else HFEncoder(tokenizer)
    writer = MegatronWriter(out_prefix)
    work = ChunkEncoder(encoder, reference, text_field, eod_id, writer.dtype.name, batch_size)
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
    shared: SharedChunks | None = None
    bar = tqdm(total=max_documents, unit="doc", disable=not progress, mininterval=2.0, desc=Path(out_prefix).name)
    pool: Executor | None = None
    seen = 0  # documents written (empty ones included); rows = these + the bad ones
    checked = 0  # sample documents compared with HF so far
    verify_seconds = 0.0
    file_documents = [0] * len(files)
    file_rows = [0] * len(files)  # lines/rows written per file: the numbers in bad-row messages
    names = [str(Path(path)) for path in files]
    pending: deque = deque()  # (result, file index, sample documents in it, documents to take or None)

    def write_oldest() -> None:
        nonlocal seen, checked, verify_seconds
        result, file_index, verify, take = pending.popleft()
        if result is None:  # the end of a file read to its end
            if file_documents[file_index] == 0:
                stats["empty_files"].append(str(files[file_index]))
            return
        result = result.result()
        for documents_before, row, problem in result.bad:
            if take is None or documents_before < take:
                on_bad(bad_row_message(names[file_index], fmt, file_rows[file_index] + row + 1, problem))
        file_rows[file_index] += result.rows
        if result.difference is not None:
            raise BackendMismatch(_mismatch_message(str(out_prefix), encoder.name, checked, result.difference))
        checked += verify
        verify_seconds += result.verify_seconds
        lengths, tokens, sizes = result.lengths, result.tokens, result.sizes
        if take is not None:
            lengths, sizes = lengths[:take], sizes[:take]
            tokens = tokens[: int(lengths.sum(dtype=np.int64))]
        writer.add_encoded(tokens, lengths)
        seen += len(lengths)
        file_documents[file_index] += len(lengths)
        stats["empty_documents"] += int(np.count_nonzero(lengths == 0))
        stats["text_bytes"] += int(sizes.sum())
        bar.update(len(lengths))

    def submit(chunk: Chunk, verify: int, parsed: Parsed | None):
        if pool is None:
            return _Ready(work.encode_parsed(parsed or parse_chunk(owned(chunk), text_field), verify))
        if parallelism == "threads":  # parsed here, encoded there: parsing holds the GIL, encoding does not
            return pool.submit(work.encode_parsed, parsed or parse_chunk(owned(chunk), text_field), verify)
        if shared is not None:  # the slot is free: fewer than max_in_flight (= its slots) chunks are pending
            chunk = shared.place(chunk)
        return pool.submit(_encode_in_worker, owned(chunk), verify)

    try:
        if workers > 1 and parallelism == "threads":
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1)  # the encode releases the GIL; its threads are the backend's
        elif workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context(start_method or _worker_start_method())
            if context.get_start_method() == "fork":
                if hasattr(encoder, "warm_up"):
                    encoder.warm_up()  # once here instead of once per worker
                shared = SharedChunks(2 * workers, 2 * chunk_bytes)
                work.shared = shared.buffer  # inherited by the workers at the fork
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(work,))
        max_in_flight = (2 if parallelism == "threads" else 2 * workers) if pool else 1
        to_verify = verify_documents if reference is not None else 0
        read = 0  # documents read (counted only while needed: the sample, or up to max_documents)
        done = max_documents is not None and max_documents <= 0
        for file_index, path in enumerate(files):
            if done:
                break
            chunks = read_chunks(path, fmt, text_field, batch_size, chunk_bytes, copy=False)
            try:
                for chunk in chunks:
                    verify, take, parsed = 0, None, None
                    if to_verify > 0 or max_documents is not None:
                        # parsed here too (cheap next to encoding) to know how many of its documents
                        # belong to the sample and where max_documents falls; its bad rows are reported
                        # when its result is written
                        chunk = owned(chunk)
                        parsed = parse_chunk(chunk, text_field)
                        texts = parsed.texts
                        if max_documents is not None and read + len(texts) >= max_documents:
                            take = max_documents - read
                            texts = texts[:take]
                            done = True
                        read += len(texts)
                        verify = min(to_verify, sum(1 for text in texts if text))
                        to_verify -= verify
                    pending.append((submit(chunk, verify, parsed), file_index, verify, take))
                    while len(pending) >= max_in_flight:
                        write_oldest()
                    if done:
                        break
                else:
                    pending.append((None, file_index, 0, None))
            finally:
                chunks.close()
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
        if shared is not None:
            shared.close()
        bar.close()
    stats.update(writer.finish())
    if reference is not None:
        stats["verified_documents"] = checked
        stats["verify_seconds"] = round(verify_seconds, 3)
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
