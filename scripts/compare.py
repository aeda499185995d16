"""Is it better at equal compute? The user's runs of a results.csv against the open-sci-ref references.

Prints the references' noise floor, the release's ranking at 300B with "≈" for differences within
noise, how often a smaller scale's order of two datasets held at 1.7B, and, for every user run
(``source == ours``) scored with the 0.01 protocol: the 11-task average (and, with --all-tasks,
each task) against each reference dataset at equal tokens and at equal FLOPs, with 95 % intervals
and a verdict (better / worse / within noise), and the compute multiplier. Methods: the docstring
of osref/compare.py.

Examples (from the repository root):

    # the references alone (seconds): noise floor, ranking, decision accuracy, scaling fits
    python scripts/compare.py

    # a report's table, every task, and each table as CSV
    python scripts/compare.py results/report/results.csv --all-tasks --out-dir results/compare

    # the demo's table: its local tasks are not the protocol's, so only the references are shown
    python scripts/compare.py results/demo/report/results.csv
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("results", nargs="?", default=None, help="a report's results.csv (omit: the references alone)")
    parser.add_argument("--reference-dir", default=str(REPO / "config" / "reference"), help="published reference data")
    parser.add_argument("--all-tasks", action="store_true", help="print every task, not only the 11-task average")
    parser.add_argument("--out-dir", default=None, help="also write each table as <name>.csv here")
    args = parser.parse_args(argv)

    import pandas as pd

    from osref.compare import compare, summary_text, tables
    from osref.files import write_text_atomic

    results = None
    if args.results is not None:
        path = Path(args.results)
        if not path.is_file():
            print(f"compare: {path}: no such file", file=sys.stderr)
            return 2
        results = pd.read_csv(path)
    try:
        result = compare(results, Path(args.reference_dir), where=str(args.results or "results.csv"))
    except (ValueError, FileNotFoundError) as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    print(summary_text(result, all_tasks=args.all_tasks))
    if args.out_dir:
        for name, frame in tables(result).items():
            out = Path(args.out_dir) / f"{name}.csv"
            write_text_atomic(out, frame.to_csv(index=False, float_format="%.10g"))
            print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
