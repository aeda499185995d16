"""Benchmark: what the workflow's own code adds to `snakemake -n` of the release grid.

Times, in one run on the same machine, (1) `snakemake -n` of the release grid and (2) a toy
workflow with the same number of jobs, the same DAG shape (data groups → training chains →
per-checkpoint exports → per-shot-group evaluations → report) and a `log:` on every rule, whose
inputs are plain patterns, i.e. Snakemake's own cost per job. Prints ms per planned job for both
and the ratio: what the workflow's own functions (config validation, grid expansion, input
lookups) add.

    python scripts/bench_dryrun.py            # release grid, 1 repetition each
    python scripts/bench_dryrun.py --repeat 3 # best of 3
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TOY = r"""
RUNS = {runs!r}          # run -> (segments, checkpoints)
DATA = {data!r}          # dataset -> groups
GROUPS = ["0shot", "5shot", "10shot"]
RUN_DATA = {run_data!r}

rule all:
    input: "report.txt"

rule listing:
    output: "data/{{d}}/listing"
    log: "logs/listing/{{d}}.log"
    shell: "touch {{output}}"

rule download:
    input: "data/{{d}}/listing"
    output: "data/{{d}}/g{{g}}.raw"
    log: "logs/download/{{d}}/{{g}}.log"
    shell: "touch {{output}}"

rule tokenize:
    input: "data/{{d}}/g{{g}}.raw"
    output: "data/{{d}}/g{{g}}.bin"
    log: "logs/tokenize/{{d}}/{{g}}.log"
    shell: "touch {{output}}"

rule run_config:
    output: "runs/{{r}}/run.json"
    log: "logs/run_config/{{r}}.log"
    shell: "touch {{output}}"

rule segment:
    input: lambda wc: ["runs/%s/run.json" % wc.r] + expand("data/{{d}}/g{{g}}.bin", d=RUN_DATA[wc.r], g=range(DATA[RUN_DATA[wc.r]]))
    output: "runs/{{r}}/seg_{{s}}"
    log: "logs/train/{{r}}/{{s}}.log"
    shell: "touch {{output}}"

rule export:
    input: lambda wc: "runs/%s/seg_0" % wc.r
    output: "runs/{{r}}/hf_{{i}}"
    log: "logs/export/{{r}}/{{i}}.log"
    shell: "touch {{output}}"

rule evaluate:
    input: "runs/{{r}}/hf_{{i}}"
    output: "runs/{{r}}/eval_{{i}}_{{k}}"
    log: "logs/eval/{{r}}/{{i}}_{{k}}.log"
    shell: "touch {{output}}"

rule report:
    input: [f"runs/{{r}}/eval_{{i}}_{{k}}" for r, (s, c) in RUNS.items() for i in range(c) for k in GROUPS] + [f"runs/{{r}}/seg_{{j}}" for r, (s, c) in RUNS.items() for j in range(s)]
    output: "report.txt"
    log: "logs/report.log"
    shell: "touch {{output}}"
"""


def dry_run(args: list[str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-q", "rules", *args], cwd=cwd, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"snakemake failed in {cwd}:\n{proc.stderr[-2000:]}")
    total = int(re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M).group(1))
    return elapsed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    from osref.grid import load_grid

    grid = load_grid(ROOT / "config" / "config.yaml")
    runs = {rid: (len(r.segment_ends), len(r.eval_iters)) for rid, r in grid.runs.items()}
    data = {d: len(grid.shard_groups(d)) for d in grid.datasets_in_use}  # the groups the plan fetches
    run_data = {rid: r.dataset for rid, r in grid.runs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        toy = Path(tmp) / "toy"
        toy.mkdir()
        (toy / "Snakefile").write_text(TOY.format(runs=runs, data=data, run_data=run_data))
        real = Path(tmp) / "real"
        real.mkdir()
        ours, theirs = [], []
        for _ in range(args.repeat):
            ours.append(dry_run(["-s", str(ROOT / "Snakefile")], real))
            theirs.append(dry_run([], toy))
    (t_ours, n_ours), (t_toy, n_toy) = min(ours), min(theirs)
    print(f"release grid : {n_ours:6d} jobs  {t_ours:6.1f} s  {1000 * t_ours / n_ours:5.2f} ms/job")
    print(f"toy workflow : {n_toy:6d} jobs  {t_toy:6.1f} s  {1000 * t_toy / n_toy:5.2f} ms/job")
    print(f"ratio (ours / Snakemake's own cost per job): {(t_ours / n_ours) / (t_toy / n_toy):.2f}")


if __name__ == "__main__":
    main()
