"""Tokenization into Megatron ``.bin/.idx`` pairs (GPT-NeoX-20B, EOD appended, uint16).

The output is byte-identical to Megatron-LM ``tools/preprocess_data.py --append-eod`` over the
same files in the same order (document level, one sequence per document), which is what
megatron-core's ``IndexedDataset`` reads. Tokenization needs no Megatron: the format is small
and written here directly, streaming, so memory is bounded by one batch of documents plus four
bytes per document for the index.

Readers stream parquet, jsonl, jsonl.gz / json.gz and jsonl.zst / jsonl.zstd (DCLM's suffix)
without an Arrow cache copy. Outputs are written under temporary names and renamed only when
complete, ``.bin`` first and ``.idx`` last, so a pair whose ``.idx`` exists is whole.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class InputError(ValueError):
    """Bad input data; the message names the file (and line/row where known)."""


# ---- readers -------------------------------------------------------------------------------------

def _open_text_stream(path: Path) -> io.BufferedIOBase:
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw)
    if magic == _ZSTD_MAGIC:
        import zstandard  # noqa: PLC0415

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return raw


def iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    stream = _open_text_stream(path)
    try:
        for line_no, line in enumerate(io.BufferedReader(stream, buffer_size=1 << 20), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {line_no}: not UTF-8 ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise InputError(f"{path}: line {line_no}: no text field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise InputError(f"{path}: line {line_no}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: corrupt or truncated compressed stream ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError is not an OSError
        if type(exc).__name__ == "ZstdError":
            raise InputError(f"{path}: corrupt zstd data ({exc})") from None
        raise
    finally:
        stream.close()


def iter_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    if text_field not in parquet.schema_arrow.names:
        raise InputError(f"{path}: no text column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield "" if text is None else text
    except OSError as exc:
        raise InputError(f"{path}: row {row}: truncated or corrupt parquet ({exc})") from None


def iter_documents(path: str | Path, fmt: str, text_field: str = "text") -> Iterator[str]:
    path = Path(path)
    if fmt == "parquet":
        return iter_parquet(path, text_field)
    return iter_jsonl(path, text_field)


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

    def add_batch(self, token_lists: list[list[int]]) -> None:
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int32, count=len(token_lists))
        flat = np.fromiter((tok for toks in token_lists for tok in toks), dtype=self.dtype, count=int(lengths.sum()))
        self._bin.write(flat.tobytes(order="C"))
        self._lengths.append(lengths)

    def has_data(self) -> bool:
        return any(len(lengths) for lengths in self._lengths)

    def finish(self) -> dict[str, int]:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        count = len(lengths)
        pointers = np.zeros(count, dtype=np.int64)
        if count:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(count + 1, dtype=np.int64)
        idx_tmp = self.prefix.with_name(self.prefix.name + f".idx.tmp{os.getpid()}")
        with open(idx_tmp, "wb") as fh:
            fh.write(_IDX_MAGIC)
            fh.write(struct.pack("<Q", 1))
            fh.write(struct.pack("<B", _DTYPE_CODES[self.dtype.type]))
            fh.write(struct.pack("<Q", count))
            fh.write(struct.pack("<Q", count + 1))
            fh.write(lengths.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(doc_indices.tobytes(order="C"))
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")
        return {"documents": count, "tokens": int(lengths.sum(dtype=np.int64))}

    def abort(self) -> None:
        self._bin.close()
        for tmp in self.prefix.parent.glob(self.prefix.name + ".*.tmp*"):
            tmp.unlink(missing_ok=True)


def load_tokenizer(tokenizer_dir: str | Path, expected_sha256: str | None = None):
    from tokenizers import Tokenizer  # noqa: PLC0415

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: {path} does not exist (config key tokenizer.path)")
    if expected_sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"tokenizer: {path} has sha256 {digest}, config tokenizer.sha256 says {expected_sha256}")
    return Tokenizer.from_file(str(path))


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
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
    progress: bool = True,
) -> dict:
    """Tokenize ``files`` in order into one ``.bin/.idx`` pair; returns the shard's stats.

    Empty documents are skipped and counted (Megatron would index an empty document).
    """
    from tqdm import tqdm  # noqa: PLC0415

    writer = MegatronWriter(out_prefix)
    stats = {"files": [str(f) for f in files], "documents": 0, "tokens": 0, "text_bytes": 0, "empty_documents": 0,
             "empty_files": []}
    started = time.time()
    bar = tqdm(total=max_documents, unit="doc", disable=not progress, mininterval=2.0, desc=Path(out_prefix).name)
    try:
        def documents() -> Iterator[str]:
            seen = 0
            for path in files:
                in_file = 0
                for text in iter_documents(path, fmt, text_field):
                    if max_documents is not None and seen >= max_documents:
                        return
                    seen += 1
                    in_file += 1
                    if not text:
                        stats["empty_documents"] += 1
                        continue
                    yield text
                if in_file == 0:
                    stats["empty_files"].append(str(path))

        for batch in _batched(documents(), batch_size):
            encodings = tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            tokens = [enc.ids + [eod_id] for enc in encodings]
            writer.add_batch(tokens)
            stats["text_bytes"] += sum(len(t.encode("utf-8")) for t in batch)
            bar.update(len(batch))
        if not writer.has_data():
            raise InputError(f"no documents in {', '.join(map(str, files))}")
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    stats.update(writer.finish())
    stats["seconds"] = round(time.time() - started, 3)
    stats["tokens_per_second"] = round(stats["tokens"] / max(stats["seconds"], 1e-9))
    return stats
