"""Sum a dataset's per-group tokenization stats into {data}/tokenized/{dataset}/manifest.json.

The plan reads the token count from it (epochs of data per run) once a dataset is tokenized:

    python scripts/dataset_manifest.py --out results/demo/data/tokenized/pydocs/manifest.json \
        results/demo/data/tokenized/pydocs/group_000.stats.json
"""

import argparse
import logging

from osref.tokenize import dataset_manifest

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("stats", nargs="+", help="group_XXX.stats.json files of one dataset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = dataset_manifest(args.stats, args.out)
    logging.info(
        "%s: %d documents, %d tokens in %d groups", args.out, manifest["documents"], manifest["tokens"], len(args.stats)
    )
