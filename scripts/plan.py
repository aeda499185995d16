"""Plan stage: what the grid will cost, before any of it runs.

Writes one row per run (parameters, iterations, checkpoints, FLOPs = 6·N·D, GPU-hours at the
configured throughput, nodes, Snakemake jobs) and one per released model (source = released:
checkpoints, bytes to download, GPU-hours of evaluation) and prints a summary:

    snakemake --profile local plan                                # the release grid → results/plan.csv
    snakemake --profile local plan --configfile config/demo.yaml  # the demo → results/demo/plan.csv
    snakemake --profile local plan --configfile config/released.yaml  # re-evaluating the released checkpoints
    python scripts/plan.py --config config/config.yaml --out /tmp/plan.csv   # without Snakemake
"""

import argparse
import sys
from pathlib import Path

from osref.grid import load_grid
from osref.plan import plan_rows, summary, write_plan

if __name__ == "__main__":
    if "snakemake" in globals():
        smk = snakemake  # noqa: F821 (injected by Snakemake's script: directive)
        # the params hold only the config's part; the data-dependent columns are read now
        rows = plan_rows(load_grid(smk.config))
        write_plan(rows, smk.output[0])
        text = summary(rows)
        Path(smk.log[0]).write_text(text + "\n")
        print(text, file=sys.stderr)
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", default="config/config.yaml")
        parser.add_argument("--out", default="results/plan.csv")
        args = parser.parse_args()
        rows = plan_rows(load_grid(args.config))
        write_plan(rows, args.out)
        print(summary(rows))
