"""Build the report (comparison.csv, tidy results table, missing cells, interactive index.html) from a manifest.

A rebuild re-reads only new or changed evaluation JSONs and rebuilds only the figures whose data
changed (cache: ``<out-dir>/.cache``, safe to delete). index.html is one offline file (plotly.js
inlined once); the comparison of every run (95 % intervals, noise floor, verdict) comes first.

Runs as a command line or as a Snakemake ``script:`` (params: manifest (dict), reference_dir,
out_dir; output: manifest (the manifest is saved there); log: one file).

Examples (from the repository root):

    # the workflow's report, with the reference data
    python scripts/report.py --manifest results/report/manifest.json --reference-dir config/reference \
        --out-dir results/report

    # tiny CPU example: a manifest by hand (format: osref/report/__init__.py, osref.contracts.ReportManifest), a few seconds
    python scripts/report.py --manifest /tmp/manifest.json --reference-dir config/reference --out-dir /tmp/report
    xdg-open /tmp/report/index.html   # a static file, no server needed
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from osref.files import write_json_atomic


def run(manifest: dict, reference_dir: Path, out_dir: Path) -> list[str]:
    from osref.report import build_report

    summary = build_report(manifest, reference_dir, out_dir)
    logging.info("%d result rows, %d missing cells", summary["n_results"], summary["n_missing"])
    logging.info("cache: %s", ", ".join(f"{key} {value}" for key, value in summary["cache"].items()))
    for path in summary["files"]:
        logging.info("wrote %s", path)
    return summary["files"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="manifest JSON: protocol + runs with their eval files")
    parser.add_argument(
        "--reference-dir", default="config/reference", help="folder with runs.csv, curves.csv.gz, baselines.csv"
    )
    parser.add_argument("--out-dir", required=True, help="report folder (created)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest_path = Path(args.manifest)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"{manifest_path}: cannot read the manifest ({error})") from None
    for path in run(manifest, Path(args.reference_dir), Path(args.out_dir)):
        print(path)
    return 0


def snakemake_main(smk) -> None:
    logging.basicConfig(
        filename=smk.log[0], level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    manifest = smk.params.manifest
    write_json_atomic(smk.output.manifest, manifest, indent=2, sort_keys=True)
    try:
        run(manifest, Path(smk.params.reference_dir), Path(smk.params.out_dir))
    except Exception:
        logging.exception("report failed")
        raise


if __name__ == "__main__":
    if "snakemake" in globals():
        snakemake_main(snakemake)  # noqa: F821 (injected by Snakemake's script: directive)
    else:
        sys.exit(main())
