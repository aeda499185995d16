"""Tokenize stage: one download group → one Megatron .bin/.idx pair (GPT-NeoX-20B, EOD appended).

Usage:

    # the demo corpus (fetched by scripts/download.py) into results/demo/data/tokenized/pydocs/group_000.{bin,idx}
    python scripts/tokenize_group.py --manifest results/demo/data/raw/pydocs/group_000/manifest.json \
        --format jsonl.zst --tokenizer assets/gpt-neox-20b \
        --out-prefix results/demo/data/tokenized/pydocs/group_000 \
        --stats results/demo/data/tokenized/pydocs/group_000.stats.json

    # only the first 500 documents (tests)
    python scripts/tokenize_group.py ... --max-documents 500

    # the job's 8 cores: 8 single-threaded worker processes (same output bytes)
    RAYON_NUM_THREADS=1 python scripts/tokenize_group.py ... --workers 8

    # gigatoken (in the environment; ~20x faster per core): the shard is refused unless its first
    # 1000 documents tokenize exactly as with HF tokenizers
    python scripts/tokenize_group.py ... --backend gigatoken --verify-documents 1000

    # fail on the first bad row (invalid JSON/UTF-8, lone surrogate, text not a string) instead of
    # skipping and counting it (the default skips, and fails only above 1 % bad rows)
    python scripts/tokenize_group.py ... --bad-documents fail

The output is byte-identical to Megatron-LM `tools/preprocess_data.py --append-eod` over the same
files in the same order, whatever --workers. With --workers 1 the tokenizer runs in this process and
RAYON_NUM_THREADS bounds its threads; workers always run one thread each, parsing and encoding the
chunks this process reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from osref.files import write_json_atomic
from osref.tokenize import (
    BACKENDS,
    BackendMismatch,
    BackendUnavailable,
    InputError,
    OutputError,
    load_tokenizer,
    tokenize_files,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="download manifest of the group (lists the files in order)")
    parser.add_argument("--format", required=True)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--tokenizer-sha256", default=None)
    parser.add_argument("--eod-id", type=int, default=0)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (the job's cores)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument(
        "--verify-documents",
        type=int,
        default=1000,
        help="non-HF backend: documents compared with HF tokenizers before the shard is accepted",
    )
    parser.add_argument(
        "--bad-documents",
        choices=("skip", "fail"),
        default="skip",
        help="a row that is not a document: skip and count it, or fail the group (file and line)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="skip: fail anyway when more than this share of the rows is bad",
    )
    parser.add_argument("--out-prefix", required=True)
    parser.add_argument("--stats", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    manifest = json.loads(Path(args.manifest).read_text())
    files = [record["path"] for record in manifest["files"]]
    for record in manifest["files"]:  # a stat each: a copy truncated or edited since its download is not used
        size = Path(record["path"]).stat().st_size
        if record.get("size") is not None and size != record["size"]:
            sys.exit(
                f"tokenize: {record['path']} has {size} bytes, its download manifest {args.manifest} says "
                f"{record['size']}: it changed after the download; delete the manifest and rerun"
            )
    tokenizer = load_tokenizer(args.tokenizer, args.tokenizer_sha256)
    try:
        stats = tokenize_files(
            files,
            args.out_prefix,
            tokenizer,
            fmt=args.format,
            text_field=args.text_field,
            eod_id=args.eod_id,
            max_documents=args.max_documents,
            workers=args.workers,
            backend=args.backend,
            verify_documents=args.verify_documents,
            bad_documents=args.bad_documents,
            max_bad_fraction=args.max_bad_fraction,
        )
    except (InputError, OutputError, BackendUnavailable, BackendMismatch) as exc:
        sys.exit(f"tokenize: {exc}")
    stats.update({"dataset": manifest["dataset"], "group": manifest["group"], "tokenizer": args.tokenizer})
    write_json_atomic(args.stats, stats)
    logging.info(
        "%s: %d documents, %d tokens, %.0f tokens/s; %d empty, %d bad rows skipped",
        args.out_prefix,
        stats["documents"],
        stats["tokens"],
        stats["tokens_per_second"],
        stats["empty_documents"],
        stats["bad_documents"],
    )


if __name__ == "__main__":
    main()
