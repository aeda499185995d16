"""A dry-run as one table: jobs per rule and partition, nodes, GPUs, walltime, node-hours.

Runs ``snakemake --profile slurm -n`` (with any further Snakemake arguments after ``--``) and
prints osref/dryrun.py's summary instead of its ~91 000 lines; or reads a saved dry-run output:

    python scripts/dryrun_summary.py                                   # the release grid
    python scripts/dryrun_summary.py -- --configfile config/config.yaml config/examples/my-dataset.yaml
    snakemake --profile slurm -n > dryrun.txt 2>&1; python scripts/dryrun_summary.py --from dryrun.txt
    make dryrun-summary

The partition and account come from OSR_SLURM_PARTITION / OSR_SLURM_GPU_PARTITION as in the profile
(unset, the table shows the literal ``$OSR_SLURM_PARTITION``).
"""

import argparse
import subprocess
import sys
from pathlib import Path

from osref.dryrun import format_table, summarize
from osref.paths import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="a saved `snakemake -n` output (stdout + stderr)")
    parser.add_argument("--profile", default="slurm", help="the Snakemake profile of the dry-run (default: slurm)")
    parser.add_argument("snakemake_args", nargs="*", help="after --: more arguments for snakemake -n")
    args = parser.parse_args(argv)
    if args.source:
        try:
            output = args.source.read_text()
        except OSError as exc:
            print(f"dryrun_summary: cannot read {args.source}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        command = [sys.executable, "-m", "snakemake", "--profile", args.profile, "-n", *args.snakemake_args]
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            print(f"dryrun_summary: {' '.join(command[2:])} failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
    rows = summarize(output)
    if not rows:
        print("dryrun_summary: no jobs in the dry-run output (Nothing to be done?)", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
