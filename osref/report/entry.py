"""The report's entry point: manifest in, tables, plots and ``index.html`` out (:func:`build_report`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import osref.released_results as released_results  # a module import: released_results imports osref.report.tables
from osref.contracts import ReportManifest
from osref.files import write_frame_atomic, write_text_atomic
from osref.reference import ReferenceData
from osref.report.comparison import build_comparison
from osref.report.html import render_html
from osref.report.plots import PlotCache, draw_plots
from osref.report.tables import (
    AVG_TASK,
    CACHE_DIR_NAME,
    RESULT_COLUMNS,
    EvalFileCache,
    final_scores,
    missing_cells,
    normalise_protocol,
    our_rows,
    published_rows,
    tidy_table,
    training_log,
    training_summary,
)

log = logging.getLogger(__name__)


def read_released(manifest: ReportManifest) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The released checkpoints' tidy rows (without their ``avg`` rows: the report recomputes them
    with the others) and the protocol-reproduction table; empty / None without released models."""
    rows, reproduction = pd.DataFrame(columns=RESULT_COLUMNS), None
    for path in (manifest.released_results, manifest.released_reproduction):
        if path and not Path(path).is_file():  # report_partial: released results not written yet
            log.warning("%s not found: the report shows no released checkpoints", path)
            return rows, None
    if manifest.released_results:
        results_path = Path(manifest.released_results)
        frame = _read_csv(results_path, RESULT_COLUMNS)
        if not (frame["source"] == "released").all():
            bad = frame.index[frame["source"] != "released"][0]
            raise ValueError(
                f"{results_path}: line {int(bad) + 2}: source {frame.at[bad, 'source']!r}, expected 'released'"
            )
        rows = frame[frame["task"] != AVG_TASK][RESULT_COLUMNS]
    if manifest.released_reproduction:
        reproduction = _read_csv(Path(manifest.released_reproduction), released_results.REPRODUCTION_COLUMNS)
    return rows, reproduction


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: cannot read ({error})") from error
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: lacks column(s) {missing}")
    return frame


def build_report(manifest: ReportManifest | Mapping[str, Any], reference_dir: Path, out_dir: Path) -> dict:
    """Write results.csv/.parquet, comparison.csv, compute_multiplier.csv, missing.csv,
    final_scores.csv, reference_finals.csv and index.html (interactive plots inlined).

    Returns ``{"files": [written paths], "n_results": rows, "n_missing": cells, "plots": [figure names],
    "cache": {...}}``
    (``cache``: eval files parsed/reused, plots drawn/reused).
    """
    manifest = ReportManifest.coerce(manifest)
    protocol = normalise_protocol(manifest.protocol)
    out_dir = Path(out_dir)
    cache_dir = out_dir / CACHE_DIR_NAME
    cache_dir.mkdir(parents=True, exist_ok=True)
    reference = ReferenceData(reference_dir, cache_dir)
    eval_files = EvalFileCache(cache_dir / "eval_files.parquet")

    ours: list[dict] = []
    files_found: dict[str, int] = {}
    for run in manifest.runs:
        run_rows, files_found[run.run_id] = our_rows(run, protocol, eval_files)
        ours.extend(run_rows)
    eval_files.save()
    published = published_rows(manifest, protocol, reference, cache_dir)

    released, reproduction = read_released(manifest)
    table = tidy_table([pd.DataFrame(ours, columns=RESULT_COLUMNS), published, released], protocol)
    ours = table[(table["source"] == "ours") & (table["task"] != AVG_TASK)]
    missing = missing_cells(manifest, protocol, ours, files_found)
    final = final_scores(table, manifest, protocol)
    overview = pd.DataFrame(
        [
            {
                key: getattr(run, key)
                for key in ("run_id", "dataset", "scale", "budget", "params", "train_iters", "reference_run")
            }
            | {
                "checkpoints_scheduled": len(run.checkpoint_iters),
                "eval_files_found": files_found[run.run_id],
                "eval_files_expected": len(run.eval_files),
            }
            for run in manifest.runs
        ],
        columns=["run_id", "dataset", "scale", "budget", "params", "train_iters", "reference_run",
                 "checkpoints_scheduled", "eval_files_found", "eval_files_expected"],
    )  # fmt: skip

    log = training_log(manifest)
    overview = overview.merge(training_summary(manifest, log), on="run_id", how="left")
    written = [
        write_frame_atomic(log, out_dir / "training.csv"),
        write_frame_atomic(table, out_dir / "results.csv"),
        write_frame_atomic(table, out_dir / "results.parquet"),
        write_frame_atomic(missing, out_dir / "missing.csv"),
        write_frame_atomic(final, out_dir / "final_scores.csv"),
    ]
    comparison = build_comparison(table, manifest, protocol, reference)
    written += [
        write_frame_atomic(comparison.rows, out_dir / "comparison.csv"),
        write_frame_atomic(comparison.multipliers, out_dir / "compute_multiplier.csv"),
        write_frame_atomic(comparison.reference_finals, out_dir / "reference_finals.csv"),
    ]
    reference_of = {
        run.run_id: str(reference.resolve_run(run.reference_run, f"manifest runs[{i}] ({run.run_id})")["run_id"])
        for i, run in enumerate(manifest.runs)
        if run.reference_run not in (None, "")
    }
    baselines = table[(table["source"] == "baseline") & (table["task"] == AVG_TASK)]
    plot_cache = PlotCache(cache_dir / "plots")
    plots = draw_plots(comparison.scores, baselines, reference_of, manifest, protocol, reproduction, plot_cache,
                       comparison.published)  # fmt: skip
    page = render_html(manifest, final, missing, plots, overview, comparison, reproduction)
    written.append(write_text_atomic(out_dir / "index.html", page))
    return {
        "files": [str(p) for p in written],
        "n_results": len(table),
        "n_missing": len(missing),
        "plots": [name for section in plots.values() for name, _ in section],
        "cache": {
            "eval_files_parsed": eval_files.parsed,
            "eval_files_reused": eval_files.reused,
            "plots_drawn": plot_cache.drawn,
            "plots_reused": plot_cache.reused,
        },
    }
