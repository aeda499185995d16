"""Released open-sci-ref checkpoints: list a hub repo's refs, fetch one revision, tabulate the results.

The rules of workflow/rules/released.smk call exactly this (conversion is scripts/convert_released.py,
evaluation scripts/evaluate.py). HF_ENDPOINT / HF_TOKEN are honoured and never written.

Examples (from the repository root; network needed for list and fetch):

    # list one repo: its branches at their current commits, the selected revisions' files
    python scripts/released.py list --out /tmp/listing.json --request-json '{"name": "0.13b-dclm-300B-4096",
        "repo": "open-sci/open-sci-ref-v0.01-0.13b-dclm-300B-4096", "where": "by hand", "final_iteration": 72661,
        "revisions": {"main": 72661, "iter_0070000": 70000}, "patterns": ["*.json", "*.safetensors", "*.py", "*.txt"]}'

    # fetch one listed revision (resumable: a retry reuses <out>.partial)
    python scripts/released.py fetch --listing /tmp/listing.json --revision iter_0070000 --out /tmp/iter_0070000

    # tiny CPU example against the tests' local hub: tests/test_released_workflow.py runs the whole chain

    # results.csv (source = released) + reproduction.csv from a manifest (osref/workflow.py released_manifest)
    python scripts/released.py results --manifest manifest.json --reference-dir config/reference --out-dir results/released

Exit status: 0 done; 2 the hub does not hold what was asked (wrong repo or branch name, wrong final
iteration; the message names the closest existing ones); 1 any other error.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list a repo's refs and the selected revisions' files")
    p_list.add_argument("--request-json", required=True, help="name, repo, where, final_iteration, revisions, patterns")
    p_list.add_argument("--out", required=True)
    p_fetch = sub.add_parser("fetch", help="download one listed revision")
    p_fetch.add_argument("--listing", required=True)
    p_fetch.add_argument("--revision", required=True, help="main or iter_XXXXXXX")
    p_fetch.add_argument("--out", required=True, help="directory (created via <out>.partial)")
    p_results = sub.add_parser("results", help="results.csv and reproduction.csv from a manifest")
    p_results.add_argument("--manifest", required=True)
    p_results.add_argument("--reference-dir", default="config/reference")
    p_results.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from osref.released_hub import ReleasedHubError, fetch_revision, list_released

    try:
        if args.command == "list":
            listing = list_released(json.loads(args.request_json), args.out)
            logging.info(
                "%s: %d branches; %d revisions listed, %.3g GB",
                listing["repo"],
                len(listing["branches"]),
                len(listing["revisions"]),
                sum(r["bytes"] for r in listing["revisions"].values()) / 1e9,
            )
        elif args.command == "fetch":
            manifest = fetch_revision(args.listing, args.revision, args.out)
            logging.info("%s %s: %d files", manifest["repo"], manifest["revision"], len(manifest["files"]))
        else:
            from osref.released_results import write_results

            manifest = json.loads(Path(args.manifest).read_text(encoding="utf-8"))
            for path in write_results(manifest, Path(args.reference_dir), Path(args.out_dir)).values():
                print(path)
    except ReleasedHubError as error:
        print(f"released.py {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def snakemake_main(smk) -> None:
    """The released_results rule (script: directive): params manifest, reference_dir; outputs results, reproduction."""
    logging.basicConfig(
        filename=smk.log[0], level=logging.INFO, force=True, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from osref.released_results import write_results

    written = write_results(smk.params.manifest, Path(smk.params.reference_dir), Path(smk.output.results).parent)
    for key, path in written.items():
        if str(path) != str(Path(smk.output[key])):
            raise RuntimeError(f"{key}: wrote {path}, the rule expects {smk.output[key]}")
        logging.info("wrote %s", path)


if __name__ == "__main__":
    if "snakemake" in globals():
        snakemake_main(snakemake)  # noqa: F821 (injected by Snakemake's script: directive)
    else:
        sys.exit(main())
