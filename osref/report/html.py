"""The report's page: one self-contained, offline ``index.html``.

The comparison comes first (the question the report answers), then the references, the plots,
the protocol reproduction of released checkpoints, and the bookkeeping tables. Plotly figures are
embedded as JSON and drawn by one inlined copy of plotly.js (``plotly.offline.get_plotlyjs``), so
the page needs no network and its size grows with the data, not with the number of figures.
Wide tables scroll inside their own box (``div.scroll``) instead of widening the page.
"""

from __future__ import annotations

import functools
import html
import json
import math
from typing import Any

import pandas as pd

from osref.compare import OUT_OF_RANGE, TARGET_SCALE
from osref.contracts import ReportManifest
from osref.report.comparison import EQUAL_TOKENS, ITEM_ONLY, ReportComparison, interval_text
from osref.report.plots import safe_name
from osref.report.tables import AVG_TASK, normalise_protocol

VERDICT_CLASS = {"better": "better", "worse": "worse", "within noise": "within"}


@functools.cache
def plotly_js() -> str:
    """plotly.js, minified, from the pinned plotly package (offline)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _compact(value: object) -> object:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return f"{value:.4g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
    return value


def _table_html(frame: pd.DataFrame, empty_text: str, *, escape: bool = True) -> str:
    if frame.empty:
        return f"<p><em>{html.escape(empty_text)}</em></p>"
    frame = frame.copy()
    for column in frame.columns:
        if str(frame[column].dtype) == "Int64":  # nullable ints print <NA>, not na_rep
            frame[column] = [None if pd.isna(v) else int(v) for v in frame[column]]
            frame[column] = frame[column].astype(object)
        elif frame[column].dtype == "float64":
            frame[column] = [_compact(v) for v in frame[column]]
    table = frame.to_html(index=False, na_rep="–", border=0, classes="data", escape=escape)
    return f"<div class='scroll'>{table}</div>"


def _figure_html(name: str, figure: dict) -> str:
    div = f"plot-{safe_name(name)}"
    payload = json.dumps(figure, separators=(",", ":")).replace("</", "<\\/")
    return (
        f"<div class='plot' id='{div}'></div><script>(function(f){{Plotly.newPlot('{div}',f.data,f.layout,"
        f"{{responsive:true,displaylogo:false}});}})({payload});</script>"
    )


def _verdict_cell(verdict: str) -> str:
    return f"<span class='v {VERDICT_CLASS.get(verdict, 'none')}'>{html.escape(verdict)}</span>"


def _versus_label(row: Any) -> str:  # a comparison row (pandas itertuples)
    """A published run by dataset, scale, budget and Slurm job (its runs.csv id is ~150 characters)."""
    if row.versus_source == "reference" and row.comparison == EQUAL_TOKENS:
        job = str(row.versus).rsplit("_", 1)[-1]
        return f"{row.versus_dataset} {row.scale} {row.budget} (published, job {job})"
    if row.versus_source == "reference":
        return f"{row.versus_dataset} (published, fit over scales)"
    return f"{row.versus} ({row.versus_source})"


COMPARISON_HEADER = ("run", "versus", "at", "task", "score (95 % CI)", "versus (95 % CI)", "diff (95 % CI)",
                     "noise floor", "noise (1.96× → verdict)", "verdict", f"held at {TARGET_SCALE}")  # fmt: skip


def comparison_table(rows: pd.DataFrame, empty_text: str) -> str:
    """The comparison rows as the page shows them: intervals as text, the verdict coloured. Written
    row by row (a full grid has thousands of per-task rows; pandas' to_html took seconds)."""
    if rows.empty:
        return f"<p><em>{html.escape(empty_text)}</em></p>"
    lines = []
    for r in rows.itertuples(index=False):
        at = r.comparison if r.comparison != EQUAL_TOKENS else f"{r.comparison}, iter {int(r.iteration)}"
        floor = f"{r.noise_floor:.4f}" + (" *" if r.noise_source == ITEM_ONLY else "")
        cells = (
            html.escape(str(r.run_id)), html.escape(_versus_label(r)), html.escape(at), html.escape(str(r.task)),
            interval_text(r.score, r.score_ci_low, r.score_ci_high),
            interval_text(r.versus_score, r.versus_ci_low, r.versus_ci_high),
            interval_text(r.diff, r.diff_ci_low, r.diff_ci_high), floor,
            f"{r.noise:.4f}" if r.noise == r.noise else "–", _verdict_cell(str(r.verdict)),
            html.escape(r.decision_accuracy if isinstance(r.decision_accuracy, str) else ""),
        )  # fmt: skip
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in COMPARISON_HEADER)
    return (
        f"<div class='scroll'><table class='data comparison'><thead><tr>{header}</tr></thead><tbody>"
        + "\n".join(lines)
        + "</tbody></table></div>"
    )


def _comparison_section(manifest: ReportManifest, comparison: ReportComparison) -> list[str]:
    rows = comparison.rows
    out = [
        "<h2 id='comparison'>Is it better at equal compute?</h2>",
        (
            "<p>Each run against every reference run of the same scale and budget (published, and every other run "
            "of this report), at equal tokens, its last checkpoint with a match; and against each reference "
            "dataset's scaling fit at equal FLOPs. <b>verdict</b>: better / worse when |diff| &gt; 1.96 × noise, "
            "else within noise; noise = the run-to-run <b>noise floor</b> of a difference (from the release's "
            "repeated runs) and the item noise beyond a full protocol evaluation. Intervals: 95 %, from lm-eval's "
            "stderr (the average's: √Σse²/n). <b>held at 1.7b</b>: of the release's dataset pairs, how many were "
            "ordered at this scale as at 1.7b. * no release floor for this task: item noise only (a lower bound). "
            "All rows, per task: comparison.csv.</p>"
        ),
    ]
    for run in manifest.runs:
        by_reference: dict[str, list[str]] = {}
        for d in run.recipe_differences:  # {"key", "run", "reference"[, "versus", "reference_run"]}
            versus = d.get("reference_run") or run.reference_run or d.get("versus") or "its reference run"
            by_reference.setdefault(str(versus), []).append(
                f"{d.get('key')} {d.get('run')} (reference {d.get('reference')})"
            )
        for versus, values in by_reference.items():
            out.append(
                f"<p class='warn'>⚠ {html.escape(run.run_id)} was not trained with the recipe of "
                f"{html.escape(versus)}: {html.escape(', '.join(values))}. Differences to that run are not only "
                "the dataset's.</p>"
            )
    if rows.empty:
        out.append("<p><em>nothing to compare yet: no run has a checkpoint at the tokens of another run or "
                   "reference of its scale and budget</em></p>")  # fmt: skip
        return out
    outside = rows["verdict"] == OUT_OF_RANGE
    if outside.any():
        out.append(f"<p>{int(outside.sum())} equal-FLOPs rows outside the references' compute range (an "
                   "extrapolation of the fit) are left out here; they are in comparison.csv.</p>")  # fmt: skip
    rows = rows[~outside]
    averages = rows[rows["task"] == AVG_TASK]
    out.append(comparison_table(averages, "no average yet (a checkpoint needs every in-average task)"))
    per_task = rows[rows["task"] != AVG_TASK]
    for run_id, frame in per_task.groupby("run_id", sort=False):
        out.append(
            f"<details class='tasks'><summary>{html.escape(str(run_id))}: per task ({len(frame)} rows)</summary>"
            + comparison_table(frame, "")
            + "</details>"
        )
    multipliers = comparison.multipliers
    out.append("<h3 id='multiplier'>Compute multiplier</h3>")
    if multipliers.empty:
        out.append("<p><em>none: needs a dataset of ours with final runs at two or more of the release's scales "
                   "(the fit is over the reference's 0.13b-1.7b final scores)</em></p>")  # fmt: skip
    else:
        out.append("<p>How many times our largest run's compute the reference dataset needs to reach our score "
                   "(fit a + b·log10 C of its final 300B scores; bootstrap 95 % interval).</p>")  # fmt: skip
        view = multipliers.assign(
            multiplier=[
                f"{r.multiplier:.3g}× [{r.multiplier_lo:.3g}, {r.multiplier_hi:.3g}]"
                + (" (extrapolated)" if r.extrapolated else "")
                for r in multipliers.itertuples()
            ]
        )[["dataset", "run_id", "scale", "score", "reference_dataset", "multiplier"]]
        out.append(_table_html(view, ""))
    return out


def _reference_section(comparison: ReportComparison, plots: dict) -> list[str]:
    finals = comparison.reference_finals
    out = ["<h2 id='references'>References: published final scores (300B)</h2>"]
    if finals.empty:
        return [*out, "<p><em>no reference scores for this protocol's tasks</em></p>"]
    averages = finals[finals["task"] == AVG_TASK]
    wide = averages.assign(cell=[interval_text(r.value, r.ci_low, r.ci_high) for r in averages.itertuples()])
    wide = wide.pivot(index="dataset", columns="scale", values="cell").reset_index()
    out += [
        "<p>The release's 11-task average (its own protocol) ± 95 % item interval, every dataset shown "
        "(whatever the grid schedules), and their curves. Per task: reference_finals.csv.</p>",
        _table_html(wide, ""),
        *[_figure_html(name, figure) for name, figure in plots.get("references", [])],
    ]
    floor = comparison.floor
    if not floor.empty:
        out += ["<h3 id='noise-floor'>Noise floor</h3>",
                "<p>run_sd: σ of one run's final score (the release's repeated runs); wiggle_sd: σ of one "
                "checkpoint around its curve late in the stable phase; floor_*: of a difference of two runs.</p>",
                _table_html(floor, "")]  # fmt: skip
    decision = comparison.decision
    if not decision.empty:
        cells = decision.assign(cell=decision["agree"].astype(str) + "/" + decision["pairs"].astype(str))
        wide = cells.pivot(index="task", columns="scale", values="cell")
        order = [AVG_TASK, *(t for t in wide.index if t != AVG_TASK)]
        wide = wide.reindex([t for t in order if t in wide.index]).reset_index()
        out += [f"<h3 id='decision'>How far a small-scale verdict carries (dataset pairs ordered as at {TARGET_SCALE})</h3>",
                "<p>Of the release's dataset pairs (300B final scores), how many a smaller scale orders as "
                f"{TARGET_SCALE} does (the disagreeing pairs: decision_accuracy.csv of "
                "scripts/compare.py --out-dir).</p>", _table_html(wide, "")]  # fmt: skip
    return out


def _reproduction_section(reproduction: pd.DataFrame | None, plots: dict) -> list[str]:
    if reproduction is None:
        return []
    out = [
        "<h2 id='reproduction'>Protocol reproduction: released checkpoints, our evaluation vs the published</h2>",
        "<p>difference = ours − published; within = |difference| ≤ the combined standard error "
        "√(se_ours² + se_published²) (the published stderr: binomial at our item count).</p>",
    ]
    if not reproduction.empty:
        within = reproduction["within"].astype(str).str.lower() == "true"
        out.append(f"<p>{int(within.sum())} of {len(reproduction)} cells within the combined standard error.</p>")
    out.append(_table_html(reproduction, "no released checkpoint with a published value evaluated yet"))
    out += [_figure_html(name, figure) for name, figure in plots.get("reproduction", [])]
    return out


def render_html(manifest: ReportManifest, final: pd.DataFrame, missing: pd.DataFrame,
                plots: dict[str, list[tuple[str, dict]]], overview: pd.DataFrame, comparison: ReportComparison,
                reproduction: pd.DataFrame | None = None) -> str:  # fmt: skip
    protocol_frame = pd.DataFrame(normalise_protocol(manifest.protocol))
    missing_by_checkpoint = (
        missing.groupby(["run_id", "iteration"], sort=True)
        .agg(missing_tasks=("task", lambda t: ", ".join(t)), blocks_average=("in_average", "any"))
        .reset_index()
        if not missing.empty
        else missing
    )
    per_run = []
    for run in manifest.runs:
        names = {f"scores_{safe_name(run.run_id)}", f"loss_{safe_name(run.run_id)}"}
        figures = [_figure_html(name, figure) for name, figure in plots.get("runs", []) if name in names]
        if figures:
            per_run.append(
                f"<details class='run'><summary>{html.escape(run.run_id)}</summary>{''.join(figures)}</details>"
            )
    for name, figure in plots.get("runs", []):  # released checkpoints, re-evaluated by us
        if name.startswith("released_"):
            title = html.escape(name.removeprefix("released_"))
            per_run.append(
                f"<details class='run'><summary>released: {title}</summary>{_figure_html(name, figure)}</details>"
            )
    sections = [
        *_comparison_section(manifest, comparison),
        *_reference_section(comparison, plots),
        "<h2 id='overview-plots'>Average score: all datasets per scale, and vs training FLOPs</h2>",
        ("<p>Ours solid with markers, published reference runs dashed with a 95 % band, released checkpoints "
         "re-evaluated by us dotted; error bars 95 %. Click a legend entry to hide it, double-click to show it "
         "alone; hover for values.</p>"),
        *([_figure_html(n, f) for n, f in plots.get("overview", [])] or ["<p><em>no averages yet</em></p>"]),
        *_reproduction_section(reproduction, plots),
        "<h2 id='runs'>Runs</h2>", _table_html(overview, "no runs in the manifest"),
        "<h2 id='protocol'>Protocol</h2>", _table_html(protocol_frame, ""),
        "<h2 id='final'>Final scores vs reference</h2>",
        ("<p>ours = the run's last evaluated checkpoint; reference = the reference run's last checkpoint; "
         "delta = ours − reference (with intervals and verdicts: the comparison above).</p>"),
        _table_html(final, "no scores yet"),
        "<h2 id='missing'>Missing cells</h2>",
        ("<p>Scheduled checkpoints without a value for a protocol task (full list: missing.csv). "
         "blocks_average = no average is reported for that checkpoint.</p>"),
        _table_html(missing_by_checkpoint, "none: every scheduled cell has a value"),
        "<h2 id='loss-plots'>Loss curves</h2>",
        *([_figure_html(n, f) for n, f in plots.get("losses", [])] or ["<p><em>no loss logs yet</em></p>"]),
        "<h2 id='run-plots'>Per run: every task vs tokens, and the loss</h2>",
        *(per_run or ["<p><em>nothing evaluated yet</em></p>"]),
    ]  # fmt: skip
    style = (
        "body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}"
        "div.scroll{overflow-x:auto;max-width:100%} table.data{border-collapse:collapse;font-size:12px}"
        "table.data td,table.data th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}"
        "div.plot{width:100%;min-height:300px} details summary{cursor:pointer;padding:2px 0}"
        ".v.better{color:#1a7f37;font-weight:bold}.v.worse{color:#c62828;font-weight:bold}.v.within{color:#555}"
        "p.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:4px 8px}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>open-sci-ref reproduction report</title>"
        f"<style>{style}</style><script>{plotly_js()}</script></head><body><h1>open-sci-ref reproduction report</h1>\n"
        + "\n".join(sections)
        # a figure drawn inside a closed <details> has no width yet: fit it when the details open
        + "\n<script>document.querySelectorAll('details').forEach(d=>d.addEventListener('toggle',()=>"
        "d.querySelectorAll('.js-plotly-plot').forEach(p=>Plotly.Plots.resize(p))));</script>" + "\n</body></html>\n"
    )
