"""Download stage: list a dataset once, then fetch one shard group per job.

Usage (the Snakemake rules call exactly this; paths follow osref/paths.py):

    # list the demo corpus (a `source: local` dataset) into 1 group
    python scripts/download.py list --name pydocs \
        --dataset-json '{"source": "local", "paths": ["assets/demo-corpus/*.jsonl.zst"], "format": "jsonl.zst", "shard_groups": 1}' \
        --out results/demo/data/raw/pydocs/listing.json

    # materialise group 0 of that listing
    python scripts/download.py fetch --name pydocs --listing results/demo/data/raw/pydocs/listing.json \
        --group 0 --out-dir results/demo/data/raw/pydocs/group_000 \
        --manifest results/demo/data/raw/pydocs/group_000/manifest.json

    # a hub dataset (needs network; HF_ENDPOINT / HF_TOKEN are honoured, never logged)
    python scripts/download.py list --name fineweb-edu-1.4t --dataset-json \
        '{"source": "hub", "repo_id": "HuggingFaceFW/fineweb-edu", "revision": "v1.0.0", "allow_patterns": ["data/CC-MAIN-2024-10/*.parquet"], "format": "parquet", "shard_groups": 4}' \
        --out /scratch/osr/data/raw/fineweb-edu-1.4t/listing.json
"""

from __future__ import annotations

import argparse
import json
import logging

from osref.download import fetch_group, list_dataset
from osref.paths import REPO_ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="write the file listing with its static groups")
    p_list.add_argument("--name", required=True)
    p_list.add_argument("--dataset-json", required=True, help="the datasets.<name> config block as JSON")
    p_list.add_argument("--out", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch one group and write its manifest")
    p_fetch.add_argument("--name", required=True)
    p_fetch.add_argument("--listing", required=True)
    p_fetch.add_argument("--group", type=int, required=True)
    p_fetch.add_argument("--out-dir", required=True)
    p_fetch.add_argument("--manifest", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "huggingface_hub"):  # request lines carry signed URLs
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.command == "list":
        dataset = json.loads(args.dataset_json)
        dataset.setdefault("shard_groups", 1)
        dataset.setdefault("revision", "main")
        listing = list_dataset(args.name, dataset, args.out, REPO_ROOT)
        sizes = [sum(listing["files"][i]["size"] or 0 for i in g) for g in listing["groups"]]
        logging.info(
            "%s: %d files, %d bytes in all (compare datasets.%s.approx_bytes), in %d groups, bytes per group %s",
            args.name,
            len(listing["files"]),
            sum(sizes),
            args.name,
            len(sizes),
            sizes,
        )
    else:
        manifest = fetch_group(args.name, args.listing, args.group, args.out_dir, args.manifest)
        logging.info(
            "%s group %d: %d files, %d bytes",
            args.name,
            args.group,
            len(manifest["files"]),
            sum(f["size"] for f in manifest["files"]),
        )


if __name__ == "__main__":
    main()
