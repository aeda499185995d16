"""The report's interactive plots (plotly figures as JSON), and the cache that builds a figure only
when its inputs changed.

Why plotly, and no PNGs: a full grid is 36 runs × 37 checkpoints × 12 tasks; 85 static PNGs
(8.7 MB) could not be read at that density. Plotly figures give hover values and legend toggling
(click a dataset or a source to hide it), render offline from one inlined copy of plotly.js per
page (``index.html`` stays one self-contained file), and a figure is plain JSON, so building one
costs milliseconds where matplotlib spent most of a report build drawing PNGs. The archival copy
for ``snakemake --report`` is ``index.html`` itself (plus the CSVs); the figure JSONs are not
outputs of the rule.

Rules every figure follows (tests: tests/test_report_plots.py):

* every score has its 95 % interval: error bars (±1.96·stderr; lm-eval's stderr for our runs and
  released checkpoints, the binomial stderr at the protocol's item count for published values,
  the average's from :func:`osref.compare.average_rows`: sqrt(Σ se²)/n) or a band for published
  curves;
* losses measured on different validation sets (each dataset has its own held-out split) are
  never on one shared axis: one panel per run, its axis labelled with the validation set;
* a legend entry exists only for a trace that is drawn (no styling-only entries); traces of one
  dataset or source share a legend group, so one click toggles them in every panel.

Every figure is cached in the report's ``.cache/plots`` as JSON with a digest of its inputs and of
this module's code (:data:`PLOT_CODE_DIGEST`), so an edit of the HTML or the tables rebuilds no
figure.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osref.compare import Z95
from osref.contracts import ReportManifest, ReportRun
from osref.files import stat_key, write_text_atomic
from osref.report.tables import AVG_TASK, content_digest, read_metrics

log = logging.getLogger(__name__)

# A change to this module redraws every plot; nothing else does (an edit of the HTML or the tables
# keeps the cached figures), except the loss-file parser it uses.
PLOT_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes() + inspect.getsource(read_metrics).encode()).hexdigest()
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]  # fmt: skip
SOURCE_STYLE: dict[str, dict[str, Any]] = {
    "ours": {"mode": "lines+markers", "line": {"width": 2}, "marker": {"size": 5}},
    "reference": {"mode": "lines", "line": {"width": 1.5, "dash": "dash"}},
    "released": {"mode": "lines+markers", "line": {"width": 1.5, "dash": "dot"}, "marker": {"size": 4, "symbol": "diamond"}},
}  # fmt: skip
SOURCE_LABEL = {"ours": "ours", "reference": "published (0.01)", "released": "released, re-evaluated by us"}


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def inputs_digest(*parts: Any) -> str:
    """A digest of a plot's inputs and of the plotting code (:data:`PLOT_CODE_DIGEST`)."""
    return content_digest(PLOT_CODE_DIGEST, *parts)


def _numbers(values: Any, digits: int = 5) -> list:
    """JSON numbers, rounded to ``digits`` significant digits (None for NaN): the page's size."""
    out: list[float | None] = []
    for value in np.asarray(values, dtype="float64"):
        if not math.isfinite(value):
            out.append(None)
        elif value == 0:
            out.append(0)
        else:
            out.append(float(f"{value:.{digits}g}"))
    return out


class PlotCache:
    """Builds a figure only when the digest of its inputs changed; figures live in ``cache_dir``."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.drawn = 0
        self.reused = 0
        self._produced: set[str] = set()
        cache_dir.mkdir(parents=True, exist_ok=True)

    def plot(self, name: str, digest: str, build: Callable[[], dict]) -> dict:
        """The figure ``{"data": [...], "layout": {...}}`` named ``name``."""
        cached = self.cache_dir / f"{name}.json"
        self._produced.add(name)
        if cached.is_file():
            try:
                entry = json.loads(cached.read_text(encoding="utf-8"))
                if entry.get("digest") == digest:
                    self.reused += 1
                    return entry["figure"]
            except (OSError, json.JSONDecodeError) as error:
                log.warning("ignoring unreadable cache %s (%s)", cached, error)
        figure = build()
        write_text_atomic(cached, json.dumps({"digest": digest, "figure": figure}, separators=(",", ":")))
        self.drawn += 1
        return figure

    def finish(self) -> None:
        """Drop cached figures that this build did not produce."""
        for stale in self.cache_dir.glob("*.json"):
            if stale.stem not in self._produced:
                stale.unlink()


def dataset_colours(datasets: list[str]) -> dict[str, str]:
    """One fixed colour per dataset, the same in every plot of the report."""
    names = sorted({str(d) for d in datasets if d is not None and d == d})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


# ---- figure pieces --------------------------------------------------------------------------------


def score_traces(rows: pd.DataFrame, x: str, source: str, name: str, colour: str, *, axis: str | None = None,
                 legend: bool = True, group: str | None = None) -> list[dict]:  # fmt: skip
    """One series with its 95 % interval: error bars for ours/released, a band for published curves."""
    rows = rows.sort_values(x)
    xs, ys = _numbers(rows[x], 6), _numbers(rows["value"])
    se = pd.to_numeric(rows["stderr"], errors="coerce").to_numpy(dtype="float64")
    half = _numbers(Z95 * se, 3)
    style = SOURCE_STYLE[source]
    trace = {
        "type": "scatter", "x": xs, "y": ys, "name": name, "legendgroup": group or name, "showlegend": legend,
        "mode": style["mode"], "line": {**style["line"], "color": colour},
        "hovertemplate": f"{name}<br>%{{x:.4g}}: %{{y:.4f}} ± %{{error_y.array:.4f}}<extra></extra>",
    }  # fmt: skip
    if "marker" in style:
        trace["marker"] = {**style["marker"], "color": colour}
    if axis is not None:
        trace["xaxis"], trace["yaxis"] = f"x{axis}", f"y{axis}"
    if source == "reference" and len(rows) > 8:
        trace["hovertemplate"] = f"{name}<br>%{{x:.4g}}: %{{y:.4f}}<extra></extra>"
        upper = {"type": "scatter", "x": xs, "y": _numbers(rows["value"] + Z95 * se), "mode": "lines",
                 "line": {"width": 0}, "hoverinfo": "skip", "showlegend": False, "legendgroup": group or name}  # fmt: skip
        lower = {**upper, "y": _numbers(rows["value"] - Z95 * se), "fill": "tonexty",
                 "fillcolor": _transparent(colour)}  # fmt: skip
        if axis is not None:
            for band in (upper, lower):
                band["xaxis"], band["yaxis"] = f"x{axis}", f"y{axis}"
        return [upper, lower, trace]
    trace["error_y"] = {"type": "data", "array": half, "visible": True, "thickness": 1, "width": 2}
    return [trace]


def _transparent(colour: str, alpha: float = 0.18) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def grid_layout(titles: list[str], columns: int, *, x_title: str, log_x: bool, height_per_row: int = 230,
                y_titles: list[str] | None = None) -> dict:  # fmt: skip
    """A layout of ``len(titles)`` panels, each with its own axes (``x``, ``x2``, …)."""
    n_rows = max(1, math.ceil(len(titles) / columns))
    gap_x, gap_y = 0.06, 0.32 / n_rows
    width = (1 - gap_x * (columns - 1)) / columns
    height = (1 - gap_y * (n_rows - 1)) / n_rows
    layout: dict[str, Any] = {"annotations": [], "height": 80 + height_per_row * n_rows}
    for index, title in enumerate(titles):
        row, column = divmod(index, columns)
        suffix = "" if index == 0 else str(index + 1)
        x0 = column * (width + gap_x)
        y1 = 1 - row * (height + gap_y)
        layout[f"xaxis{suffix}"] = {"domain": [x0, x0 + width], "anchor": f"y{suffix}", "type": "log" if log_x else "linear",
                                    "title": {"text": x_title if row == n_rows - 1 else "", "font": {"size": 10}}}  # fmt: skip
        layout[f"yaxis{suffix}"] = {"domain": [y1 - height, y1], "anchor": f"x{suffix}",
                                    "title": {"text": y_titles[index] if y_titles else "", "font": {"size": 10}}}  # fmt: skip
        layout["annotations"].append({"text": title, "x": x0 + width / 2, "y": y1, "xref": "paper", "yref": "paper",
                                      "xanchor": "center", "yanchor": "bottom", "showarrow": False,
                                      "font": {"size": 11}})  # fmt: skip
    return layout


def _base_layout(title: str, **extra: Any) -> dict:
    return {"title": {"text": title, "font": {"size": 14}}, "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
            "legend": {"font": {"size": 10}}, "hovermode": "closest", "template": None, **extra}  # fmt: skip


# ---- figures ---------------------------------------------------------------------------------------


def datasets_figure(curves: pd.DataFrame, title: str, colours: dict[str, str], x: str = "tokens_seen") -> dict:
    """Average score of every dataset and source: ours, published reference runs, released checkpoints."""
    data, legend_done = [], set()
    for (source, run_id), rows in curves.groupby(["source", "run_id"], sort=True):
        dataset = str(rows["dataset"].iloc[0])
        name = f"{dataset} · {SOURCE_LABEL[source]}" + (f" ({run_id})" if source == "ours" else "")
        # one legend entry per dataset and source (a published dataset has runs at several scales and
        # budgets): clicking it toggles all of them
        traces = score_traces(rows, x, source, name, colours.get(dataset, "#000000"), legend=name not in legend_done)
        legend_done.add(name)
        if source != "ours":
            label = f"{dataset} {rows['scale'].iloc[0]} {rows['budget'].iloc[0]} · {SOURCE_LABEL[source]}"
            traces[-1]["hovertemplate"] = traces[-1]["hovertemplate"].replace(name, label, 1)
        data += traces
    x_title = "tokens seen" if x == "tokens_seen" else "training FLOPs (6 N D)"
    layout = _base_layout(title, height=460, xaxis={"title": {"text": x_title}, "type": "log"},
                          yaxis={"title": {"text": "average score (95 % interval)"}})  # fmt: skip
    return {"data": data, "layout": layout}


def flops_figure(curves: pd.DataFrame, baselines: pd.DataFrame, colours: dict[str, str],
                 title: str = "average score vs training compute") -> dict:  # fmt: skip
    """Average vs training FLOPs: every run shown and the external baselines."""
    figure = datasets_figure(curves, title, colours, x="flops")
    if not baselines.empty:
        figure["data"].append({
            "type": "scatter", "mode": "markers+text", "x": _numbers(baselines["flops"], 6),
            "y": _numbers(baselines["value"]), "text": list(baselines["run_id"]), "textposition": "top center",
            "textfont": {"size": 8}, "marker": {"symbol": "x", "color": "black", "size": 7},
            "name": "external baselines (published)", "legendgroup": "baselines",
            "hovertemplate": "%{text}<br>%{x:.3g} FLOPs: %{y:.4f}<extra></extra>",
        })  # fmt: skip
    figure["layout"]["height"] = 520
    return figure


def run_figure(rows: pd.DataFrame, run_id: str, protocol: list[dict]) -> dict:
    """Every task and the average vs tokens, one panel each: ours, the published reference run,
    the released checkpoints."""
    tasks = [spec["task"] for spec in protocol] + [AVG_TASK]
    metric_of = {spec["task"]: spec["metric"] for spec in protocol}
    titles = [f"{task} ({metric_of[task]})" if task in metric_of else "average" for task in tasks]
    log_x = bool(rows["tokens_seen"].min() > 0) if not rows.empty else False
    layout = _base_layout(run_id) | grid_layout(titles, 4, x_title="tokens seen", log_x=log_x)
    colours = {"ours": PALETTE[0], "reference": PALETTE[1], "released": PALETTE[2]}
    data, legend_done = [], set()
    for index, task in enumerate(tasks):
        axis = "" if index == 0 else str(index + 1)
        for source in ("reference", "released", "ours"):
            series = rows[(rows["source"] == source) & (rows["task"] == task)]
            if series.empty:
                continue
            data += score_traces(series, "tokens_seen", source, SOURCE_LABEL[source], colours[source], axis=axis,
                                 legend=source not in legend_done, group=source)  # fmt: skip
            legend_done.add(source)
    return {"data": data, "layout": layout}


def run_losses(run: ReportRun) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, validation) loss of a run as (tokens_seen, loss) frames; empty when not written yet."""
    tokens_per_iteration = run.tokens_per_iteration
    train = read_metrics(run.train_metrics, ("loss", "lm_loss", "train_loss"), tokens_per_iteration)
    valid = read_metrics(run.valid_metrics, ("valid_loss", "loss", "lm_loss"), tokens_per_iteration)
    return train, valid


def loss_inputs(run: ReportRun) -> list | None:
    """What a run's loss curves depend on (file stats, not contents); None when there is no loss file."""
    paths = [run.train_metrics, run.valid_metrics]
    stats = [(str(path), stat_key(path)) for path in paths if path]
    if not any(key is not None for _, key in stats):
        return None
    return [run.run_id, run.dataset, run.tokens_per_iteration, stats]


def losses_figure(runs: list[ReportRun], title: str, colours: dict[str, str]) -> dict:
    """Training and validation loss, one panel per run: each run is measured on its own dataset's
    data, so losses of two runs never share an axis (the axis names the validation set)."""
    drawn = [(run, *run_losses(run)) for run in runs]
    drawn = [(run, train, valid) for run, train, valid in drawn if not (train.empty and valid.empty)]
    titles = [f"{run.run_id}" for run, _, _ in drawn]
    y_titles = [f"loss on {run.dataset or run.run_id} data" for run, _, _ in drawn]
    layout = _base_layout(f"loss, {title} (one panel per run: each on its own dataset's validation set)")
    layout |= grid_layout(titles, min(3, max(1, len(drawn))), x_title="tokens seen", log_x=False, y_titles=y_titles)
    data = []
    for index, (run, train, valid) in enumerate(drawn):
        axis = "" if index == 0 else str(index + 1)
        colour = colours.get(str(run.dataset), "#000000")
        label = str(run.dataset or run.run_id)
        if not train.empty:
            data.append({"type": "scatter", "mode": "lines", "x": _numbers(train["tokens_seen"], 8),
                         "y": _numbers(train["loss"]), "name": f"{label}: training loss (training data)",
                         "line": {"width": 1, "color": colour}, "xaxis": f"x{axis}", "yaxis": f"y{axis}"})  # fmt: skip
        if not valid.empty:
            data.append({"type": "scatter", "mode": "lines+markers", "x": _numbers(valid["tokens_seen"], 8),
                         "y": _numbers(valid["loss"]), "name": f"{label}: validation loss ({label} held-out split)",
                         "line": {"width": 1, "dash": "dot", "color": colour}, "marker": {"size": 5},
                         "xaxis": f"x{axis}", "yaxis": f"y{axis}"})  # fmt: skip
    return {"data": data, "layout": layout}


def reproduction_figure(reproduction: pd.DataFrame) -> dict:
    """Ours − published for every released checkpoint and task, ± the combined standard error."""
    runs = sorted(reproduction["run_id"].unique())
    layout = _base_layout("protocol reproduction: our re-evaluation − published value (± combined stderr)")
    layout |= grid_layout(runs, 1, x_title="iteration", log_x=False, height_per_row=280,
                          y_titles=["ours − published"] * len(runs))  # fmt: skip
    tasks = sorted(reproduction["task"].unique())
    colours = {task: PALETTE[i % len(PALETTE)] for i, task in enumerate(tasks)}
    data, legend_done = [], set()
    for index, run_id in enumerate(runs):
        axis = "" if index == 0 else str(index + 1)
        for task in tasks:
            rows = reproduction[(reproduction["run_id"] == run_id) & (reproduction["task"] == task)]
            if rows.empty:
                continue
            rows = rows.sort_values("iteration")
            data.append({
                "type": "scatter", "mode": "markers", "x": _numbers(rows["iteration"], 8),
                "y": _numbers(rows["difference"]), "name": task, "legendgroup": task,
                "showlegend": task not in legend_done, "marker": {"color": colours[task], "size": 6},
                "error_y": {"type": "data", "array": _numbers(rows["combined_stderr"], 3), "visible": True},
                "xaxis": f"x{axis}", "yaxis": f"y{axis}",
                "hovertemplate": f"{task}<br>iteration %{{x}}: %{{y:+.4f}} ± %{{error_y.array:.4f}}<extra></extra>",
            })  # fmt: skip
            legend_done.add(task)
        layout.setdefault("shapes", []).append({
            "type": "line", "xref": f"x{axis} domain", "yref": f"y{axis}", "x0": 0, "x1": 1, "y0": 0, "y1": 0,
            "line": {"color": "#888", "width": 1},
        })  # fmt: skip
    return {"data": data, "layout": layout}


def legend_entries(figure: dict) -> list[str]:
    """Names the figure's legend shows: traces not hidden from the legend (plotly's default shows a
    trace's legend entry when there are two traces or more)."""
    return [trace.get("name", "") for trace in figure["data"] if trace.get("showlegend", True)]


# ---- all figures -----------------------------------------------------------------------------------


def scale_groups(manifest: ReportManifest) -> dict[tuple[str, str], list[ReportRun]]:
    """Runs by (scale, budget), in manifest order."""
    groups: dict[tuple[str, str], list[ReportRun]] = {}
    for run in manifest.runs:
        groups.setdefault((str(run.scale), str(run.budget)), []).append(run)
    return groups


def draw_plots(scores: pd.DataFrame, baselines: pd.DataFrame, reference_of: dict[str, str], manifest: ReportManifest,
               protocol: list[dict], reproduction: pd.DataFrame, plots: PlotCache,
               published: pd.DataFrame | None = None) -> dict[str, list[tuple[str, dict]]]:  # fmt: skip
    """Every figure of the report, by HTML section, as (name, figure); a figure without data is left out.

    ``scores``: compare.py's scored rows (value, stderr filled) of sources ours, reference (the
    references shown: published runs.csv run ids) and released; ``reference_of``: our run id → the
    runs.csv run id of its reference run; ``published``: the shown references' 11-task averages
    under the release's own protocol (drawn alone, whatever the manifest's protocol).
    """
    keep = ["source", "run_id", "dataset", "scale", "budget", "iteration", "tokens_seen", "flops", "task", "value",
            "stderr"]  # fmt: skip
    scores = scores[keep] if not scores.empty else pd.DataFrame(columns=keep)
    colours = dataset_colours(list(scores["dataset"].dropna().unique()) + [run.dataset for run in manifest.runs])
    averages = scores[scores["task"] == AVG_TASK]
    sections: dict[str, list[tuple[str, dict]]] = {
        "references": [],
        "overview": [],
        "losses": [],
        "runs": [],
        "reproduction": [],
    }

    def add(section: str, name: str, digest_parts: list, build: Callable[[], dict]) -> None:
        sections[section].append((name, plots.plot(name, inputs_digest(name, *digest_parts), build)))

    for (scale, budget), runs in scale_groups(manifest).items():
        title = f"all datasets, {scale}, {budget} tokens: average score"
        group = averages[(averages["scale"] == scale) & (averages["budget"] == budget)]
        if not group.empty:
            group = group.drop(columns=["task"])
            add("overview", f"datasets_{safe_name(scale)}_{safe_name(budget)}", [group, colours],
                partial(datasets_figure, group, title, colours))  # fmt: skip
        loss_keys = [loss_inputs(run) for run in runs]
        if any(key is not None for key in loss_keys):
            add("losses", f"losses_{safe_name(scale)}_{safe_name(budget)}", [loss_keys, colours],
                partial(losses_figure, runs, f"{scale}, {budget} tokens", colours))  # fmt: skip

    if published is not None and not published.empty:
        published = published[keep]
        add("references", "references_published", [published, colours],
            lambda: flops_figure(published, pd.DataFrame(), colours,
                                 "published reference runs: 11-task average vs training compute (0.01 protocol)"))  # fmt: skip

    flops_rows = averages[averages["flops"].notna() & (averages["flops"] > 0)].drop(columns=["task"])
    if not flops_rows.empty:
        add("overview", "avg_vs_flops", [flops_rows, baselines, colours],
            lambda: flops_figure(flops_rows, baselines, colours))  # fmt: skip

    for run in manifest.runs:
        mine = scores[(scores["run_id"] == run.run_id) & (scores["source"] != "reference")]
        reference_id = reference_of.get(run.run_id)
        refs = scores[(scores["source"] == "reference") & (scores["run_id"] == reference_id)] if reference_id else None
        rows = pd.concat([mine, refs], ignore_index=True) if refs is not None and not refs.empty else mine
        if not mine[mine["source"] == "ours"].empty or (refs is not None and not refs.empty):
            add("runs", f"scores_{safe_name(run.run_id)}", [rows, protocol],
                partial(run_figure, rows, run.run_id, protocol))  # fmt: skip
        loss_key = loss_inputs(run)
        if loss_key is not None:
            add("runs", f"loss_{safe_name(run.run_id)}", [loss_key, colours],
                partial(losses_figure, [run], run.run_id, colours))  # fmt: skip
    released = scores[scores["source"] == "released"]
    for run_id in sorted(released["run_id"].unique()):  # each released model's re-evaluated curves, per task
        rows = released[released["run_id"] == run_id]
        add("runs", f"released_{safe_name(run_id)}", [rows, protocol],
            partial(run_figure, rows, f"released: {run_id}", protocol))  # fmt: skip
    if reproduction is not None and not reproduction.empty:
        cells = reproduction[["run_id", "iteration", "task", "difference", "combined_stderr"]]
        add("reproduction", "protocol_reproduction", [cells], lambda: reproduction_figure(cells))
    plots.finish()
    return sections
