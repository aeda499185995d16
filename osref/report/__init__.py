"""The report: our evaluation results next to the published open-sci-ref 0.01 numbers.

The scores of the manifest's runs come from one tidy long table (``results.csv``/``.parquet``), one row
per (source, run, checkpoint, task), with ``source`` one of

* ``ours``: the per-checkpoint JSONs written by :func:`osref.evaluate.evaluate_checkpoint`,
* ``reference``: the matching published run's curve (``config/reference/curves.csv.gz``),
* ``baseline``: the external models of ``config/reference/baselines.csv``,
* ``released``: released checkpoints re-evaluated by us (``manifest.released_results``, issue 14),

plus ``task == "avg"`` rows: the unweighted mean over the protocol's in-average tasks, written only
where every one of them is present (a mean over fewer tasks is not comparable, so it is left out
and the checkpoint appears in ``missing.csv``). A partly finished grid is normal: runs without
evaluations simply have all their cells in ``missing.csv``.

The manifest (written by the workflow; :class:`osref.contracts.ReportManifest`) is::

    {"protocol": [{"task": "copa", "shots": 0, "metric": "acc", "in_average": true}, ...],
     "runs": [{"run_id": ..., "dataset": ..., "scale": ..., "budget": ..., "tokens": ...,
               "seq_length": ..., "global_batch_size": ..., "params": ..., "train_iters": ...,
               "checkpoint_iters": [...], "reference_run": <runs.csv run_id or slurm job id, or null>,
               "eval_files": [...], "train_metrics": <path or null>, "valid_metrics": <path or null>,
               "recipe_differences": [{"key", "run", "reference", ...}] (optional)}],
     "references": [datasets to show] (optional, default all 8), "released_results": <path>,
     "released_reproduction": <path> (optional: only with released models)}

The comparison ("is it better at equal compute?", ``comparison.csv``, the page's first table) is
:mod:`~osref.report.comparison`; its statistics are :mod:`osref.compare`'s.

Rebuilding after one more checkpoint is evaluated must cost seconds on the full grid (36 runs × 37
checkpoints × 3 shot sets ≈ 4 000 JSONs, ~86 figures), so the report keeps a cache in
``<out_dir>/.cache`` (not a declared output: Snakemake deletes declared outputs before a rerun):

* parsed evaluation JSONs, keyed by path + mtime + size (only new or changed files are read),
* the reference CSVs as parquet, keyed by the source file's size + mtime,
* every plotly figure as JSON with a digest of its inputs (a figure is built again only when they
  changed); the figures are inlined into ``index.html`` (no ``plots/`` folder).

Deleting ``.cache`` is always safe; the next build is then a cold one.

The package follows the report's seams: :mod:`~osref.report.tables` (evaluation files and
published rows → the tidy table, averages, missing cells, final scores, training logs),
:mod:`~osref.report.comparison` (the pairs compared, ``comparison.csv``, the compute multiplier),
:mod:`~osref.report.plots` (figures and their cache, keyed on the plotting code only),
:mod:`~osref.report.html` (the page) and :mod:`~osref.report.entry` (:func:`build_report`). The
published reference data is read by :mod:`osref.reference`.
"""

from osref.report.entry import build_report
from osref.report.tables import (
    AVG_TASK,
    RESULT_COLUMNS,
    SOURCES,
    load_eval_json,
    normalise_protocol,
    tidy_table,
    training_log,
    training_summary,
)

__all__ = [
    "AVG_TASK",
    "RESULT_COLUMNS",
    "SOURCES",
    "build_report",
    "load_eval_json",
    "normalise_protocol",
    "tidy_table",
    "training_log",
    "training_summary",
]
