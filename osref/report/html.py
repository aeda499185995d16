"""The report's page: one self-contained ``index.html`` (tables, and the PNGs inlined as data URLs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from osref.contracts import ReportManifest
from osref.report.plots import safe_name
from osref.report.tables import normalise_protocol


def _table_html(frame: pd.DataFrame, empty_text: str) -> str:
    if frame.empty:
        return f"<p><em>{html.escape(empty_text)}</em></p>"
    frame = frame.copy()
    for column in frame.columns:
        if str(frame[column].dtype) == "Int64":  # nullable ints print <NA>, not na_rep
            frame[column] = [None if pd.isna(v) else int(v) for v in frame[column]]
            frame[column] = frame[column].astype(object)
    return frame.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4f}", border=0, classes="data")


def _image_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def render_html(manifest: ReportManifest, final: pd.DataFrame, missing: pd.DataFrame, plots: dict[str, list[Path]],
                overview: pd.DataFrame) -> str:  # fmt: skip
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
        names = {f"scores_{safe_name(run.run_id)}.png", f"loss_{safe_name(run.run_id)}.png"}
        images = [_image_html(p) for p in plots.get("runs", []) if p.name in names]
        if images:
            per_run.append(
                f"<details class='run'><summary>{html.escape(run.run_id)}</summary>{''.join(images)}</details>"
            )
    sections = [
        "<h2 id='runs'>Runs</h2>", _table_html(overview, "no runs in the manifest"),
        "<h2 id='protocol'>Protocol</h2>", _table_html(protocol_frame, ""),
        "<h2 id='final'>Final scores vs reference</h2>",
        ("<p>ours = the run's last evaluated checkpoint; reference = the reference run's last checkpoint; "
         "delta = ours − reference. Re-evaluating one checkpoint varies by 0.01–0.03 on small tasks.</p>"),
        _table_html(final, "no scores yet"),
        "<h2 id='missing'>Missing cells</h2>",
        ("<p>Scheduled checkpoints without a value for a protocol task (full list: missing.csv). "
         "blocks_average = no average is reported for that checkpoint.</p>"),
        _table_html(missing_by_checkpoint, "none: every scheduled cell has a value"),
        "<h2 id='overview-plots'>Average score: all datasets per scale, and vs training FLOPs</h2>",
        ("<p>Ours solid with markers, the published 0.01 reference run dashed, one colour per dataset; "
         "external baselines as crosses.</p>"),
        *([_image_html(p) for p in plots.get("overview", [])] or ["<p><em>no averages yet</em></p>"]),
        "<h2 id='loss-plots'>Loss curves</h2>",
        *([_image_html(p) for p in plots.get("losses", [])] or ["<p><em>no loss logs yet</em></p>"]),
        "<h2 id='run-plots'>Per run: every task vs tokens, and the loss</h2>",
        *(per_run or ["<p><em>nothing evaluated yet</em></p>"]),
    ]  # fmt: skip
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;} table.data{border-collapse:collapse;font-size:12px}"
        "table.data td,table.data th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}"
        "img{max-width:100%} figcaption{font-size:11px;color:#666} details.run summary{cursor:pointer;padding:2px 0}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>open-sci-ref reproduction report</title>"
        f"<style>{style}</style></head><body><h1>open-sci-ref reproduction report</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
