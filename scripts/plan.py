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
import csv
import sys
from pathlib import Path

from osref.files import atomic_target
from osref.grid import PLAN_COLUMNS, load_grid, plan_rows


def write_plan(rows: list[dict], out: str) -> None:
    with atomic_target(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PLAN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict]) -> str:
    lines = [
        f"{'run_id':40s} {'params':>8s} {'iters':>8s} {'ckpts':>5s} {'FLOPs':>9s} {'GPU-h':>9s} {'nodes':>5s} {'jobs':>5s}"
    ]
    for r in rows:
        lines.append(
            f"{r['run_id']:40s} {r['params'] / 1e6:7.1f}M {r['train_iters']:8d} {r['checkpoints']:5d} "
            f"{r['flops']:9.2e} {r['gpu_hours']:9.1f} {r['nodes']:5d} {r['jobs']:5d}"
        )
    for r in rows:
        if r["warning"]:
            lines.append(f"WARNING {r['run_id']}: {r['warning']}")
    trained = [r for r in rows if r.get("source", "train") == "train"]
    released = [r for r in rows if r.get("source") == "released"]
    total_h = sum(r["gpu_hours"] for r in trained)
    if trained or not released:
        lines.append(
            f"{len(trained)} runs, {sum(r['flops'] for r in trained):.3e} FLOPs, {total_h:,.0f} GPU-hours, "
            f"{sum(r['jobs'] for r in trained)} training/export/eval jobs"
        )
    if released:
        inferred = sum(r["repo_status"] == "inferred" for r in released)
        lines.append(
            f"{len(released)} released models ({inferred} repo names inferred, not seen), "
            f"{sum(r['revisions'] for r in released)} checkpoints, {sum(r['download_bytes'] for r in released) / 1e12:.2f} TB "
            f"to download, {sum(r['eval_gpu_hours'] for r in released):,.0f} GPU-hours of evaluation (evaluation.cost), "
            f"{sum(r['jobs'] for r in released)} list/fetch/convert/eval jobs"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if "snakemake" in globals():
        # the params hold only the config's part; the data-dependent columns are read now
        rows = plan_rows(load_grid(snakemake.config))  # noqa: F821
        write_plan(rows, snakemake.output[0])  # noqa: F821
        text = summary(rows)
        Path(snakemake.log[0]).write_text(text + "\n")  # noqa: F821
        print(text, file=sys.stderr)
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", default="config/config.yaml")
        parser.add_argument("--out", default="results/plan.csv")
        args = parser.parse_args()
        rows = plan_rows(load_grid(args.config))
        write_plan(rows, args.out)
        print(summary(rows))
