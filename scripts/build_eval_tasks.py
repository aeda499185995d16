"""Build the small local lm-eval demo tasks (demo_lastword, demo_continuation) from a text corpus.

The corpus is given directly (--corpus, one or more JSONL(.gz/.zst) or parquet files with a "text"
field) or as a download manifest (--manifest, its "files"[*]["path"] in order). The output folder is
an lm-eval include path; its tasks.json is written last and marks it complete.

Examples (from the repository root; about a second):

    python scripts/build_eval_tasks.py --corpus assets/demo-corpus/pydocs311_rst_corpus.jsonl.zst \
        --out results/data/eval_tasks
    python scripts/build_eval_tasks.py --manifest results/data/raw/demo/group_000/manifest.json \
        --out results/data/eval_tasks
    # then: scripts/evaluate.py ... --include-path results/data/eval_tasks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def corpus_files_from_manifest(manifest_path: Path) -> list[Path]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return [Path(entry["path"]) for entry in manifest["files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"{manifest_path}: not a download manifest with files[*].path ({error!r})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", nargs="+", help="corpus file(s) with a 'text' field")
    source.add_argument("--manifest", help="download manifest JSON whose files are the corpus")
    parser.add_argument("--out", required=True, help="include folder to write (data, task YAMLs, tasks.json)")
    parser.add_argument("--n-items", type=int, default=100, help="test items per task")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    from osref.eval_tasks import build_demo_tasks

    corpus = [Path(p) for p in args.corpus] if args.corpus else corpus_files_from_manifest(Path(args.manifest))
    out = build_demo_tasks(corpus, Path(args.out), n_items=args.n_items, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
