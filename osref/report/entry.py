"""The report's entry point: manifest in, tables, plots and ``index.html`` out (:func:`build_report`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from osref.contracts import ReportManifest
from osref.files import write_frame_atomic, write_text_atomic
from osref.reference import ReferenceData
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


def build_report(manifest: ReportManifest | Mapping[str, Any], reference_dir: Path, out_dir: Path) -> dict:
    """Write results.csv/.parquet, missing.csv, final_scores.csv, plots/*.png and index.html.

    Returns ``{"files": [written paths], "n_results": rows, "n_missing": cells, "cache": {...}}``
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

    table = tidy_table([pd.DataFrame(ours, columns=RESULT_COLUMNS), published], protocol)
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
        ]
    )

    log = training_log(manifest)
    overview = overview.merge(training_summary(manifest, log), on="run_id", how="left")
    written = [
        write_frame_atomic(log, out_dir / "training.csv"),
        write_frame_atomic(table, out_dir / "results.csv"),
        write_frame_atomic(table, out_dir / "results.parquet"),
        write_frame_atomic(missing, out_dir / "missing.csv"),
        write_frame_atomic(final, out_dir / "final_scores.csv"),
    ]
    plot_cache = PlotCache(cache_dir / "plots", out_dir / "plots")
    plots = draw_plots(table, manifest, protocol, plot_cache)
    written.extend(path for section in plots.values() for path in section)
    written.append(write_text_atomic(out_dir / "index.html", render_html(manifest, final, missing, plots, overview)))
    return {
        "files": [str(p) for p in written],
        "n_results": len(table),
        "n_missing": len(missing),
        "cache": {
            "eval_files_parsed": eval_files.parsed,
            "eval_files_reused": eval_files.reused,
            "plots_drawn": plot_cache.drawn,
            "plots_reused": plot_cache.reused,
        },
    }
