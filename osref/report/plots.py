"""The report's plots, and the cache that draws a plot only when its inputs changed.

Every figure is drawn from the tidy table (:mod:`osref.report.tables`) or a run's loss files; its
PNG is kept in the report's ``.cache/plots`` with a digest of its inputs and of this module's code
(:data:`PLOT_CODE_DIGEST`), so a rebuild after one more evaluation redraws only the plots whose
data changed, and an edit of the HTML or the tables redraws nothing.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from osref.contracts import ReportManifest, ReportRun
from osref.files import atomic_target, copy_atomic, stat_key, write_text_atomic
from osref.report.tables import AVG_TASK, content_digest, read_metrics

log = logging.getLogger(__name__)

# A change to this module (its styles or the data it selects) redraws every plot; nothing else does
# (an edit of the HTML or the tables keeps the cached PNGs), except the loss-file parser it uses.
PLOT_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes() + inspect.getsource(read_metrics).encode()).hexdigest()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_target(path) as tmp:
        fig.savefig(tmp, dpi=90, metadata={"Software": None}, format=path.suffix.lstrip("."))
    return path


def _log_x(ax) -> None:
    """Log x axis with few ticks: minor ticks on log axes are most of a small figure's drawing time."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(numticks=5))
    ax.xaxis.set_minor_locator(NullLocator())


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def inputs_digest(*parts: Any) -> str:
    """A digest of a plot's inputs and of the plotting code (:data:`PLOT_CODE_DIGEST`)."""
    return content_digest(PLOT_CODE_DIGEST, *parts)


class PlotCache:
    """Draws a plot only when the digest of its inputs changed, then copies it into ``plots/``.

    The drawn PNGs and their digests live in the cache folder, not in ``plots/``, because
    Snakemake deletes a rule's declared outputs before running it again.
    """

    def __init__(self, cache_dir: Path, plot_dir: Path):
        self.cache_dir = cache_dir
        self.plot_dir = plot_dir
        self.digest_file = cache_dir / "plot_digests.json"
        self.drawn = 0
        self.reused = 0
        self._digests: dict[str, str] = {}
        self._produced: list[Path] = []
        if self.digest_file.is_file():
            try:
                self._digests = json.loads(self.digest_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                log.warning("ignoring unreadable cache %s (%s)", self.digest_file, error)
        cache_dir.mkdir(parents=True, exist_ok=True)
        plot_dir.mkdir(parents=True, exist_ok=True)

    def plot(self, name: str, digest: str, draw: Callable[[Path], None]) -> Path:
        cached = self.cache_dir / f"{name}.png"
        if self._digests.get(name) == digest and cached.is_file():
            self.reused += 1
        else:
            self._digests.pop(name, None)
            draw(cached)
            self._digests[name] = digest
            self.drawn += 1
        target = copy_atomic(cached, self.plot_dir / f"{name}.png")
        self._produced.append(target)
        return target

    def finish(self) -> None:
        """Save the digests; drop plots (cached and in ``plots/``) that this build did not produce."""
        names = {path.stem for path in self._produced}
        for folder in (self.cache_dir, self.plot_dir):
            for stale in folder.glob("*.png"):
                if stale.stem not in names:
                    stale.unlink()
        self._digests = {name: d for name, d in self._digests.items() if name in names}
        write_text_atomic(self.digest_file, json.dumps(self._digests, indent=1, sort_keys=True))


def dataset_colours(datasets: list[str]) -> dict[str, str]:
    """One fixed colour per dataset, the same in every plot of the report."""
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]  # fmt: skip
    names = sorted({str(d) for d in datasets if d is not None})
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def draw_run_curves(rows: pd.DataFrame, run_id: str, protocol: list[dict], path: Path) -> None:
    """Score vs tokens seen, one panel per task + avg, ours and the reference run."""
    plt = _pyplot()
    tasks = [spec["task"] for spec in protocol] + [AVG_TASK]
    metric_of = {spec["task"]: spec["metric"] for spec in protocol}
    columns = min(4, len(tasks))
    n_rows = math.ceil(len(tasks) / columns)
    height = 2.4 * n_rows + 0.8
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.2 * columns, height), squeeze=False)
    by_source_task = {key: series for key, series in rows.groupby(["source", "task"], sort=False)}
    log_x = rows["tokens_seen"].min() > 0
    for ax, task in zip(axes.flat, tasks, strict=False):
        for source, style in (("reference", "--"), ("ours", "-o")):
            series = by_source_task.get((source, task))
            if series is not None:
                series = series.sort_values("tokens_seen")
                ax.plot(series["tokens_seen"].astype(float), series["value"], style, markersize=3, label=source)
        ax.set_title(f"{task} ({metric_of[task]})" if task in metric_of else task, fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.has_data() and log_x:
            _log_x(ax)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("tokens seen", fontsize=9)
    fig.suptitle(run_id, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.55 / height, top=1 - 0.55 / height, hspace=0.55, wspace=0.3)
    _save(fig, path)
    plt.close(fig)


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


def draw_losses(run: ReportRun, path: Path) -> None:
    plt = _pyplot()
    train, valid = run_losses(run)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not train.empty:
        ax.plot(train["tokens_seen"], train["loss"], "-", linewidth=1, label="training loss")
    if not valid.empty:
        ax.plot(valid["tokens_seen"], valid["loss"], "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title(run.run_id, fontsize=10)
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
    _save(fig, path)
    plt.close(fig)


def draw_losses_at_scale(runs: list[ReportRun], title: str, colours: dict[str, str], path: Path) -> None:
    """Training (thin, solid) and validation (markers) loss of every run of one scale and budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        train, valid = run_losses(run)
        colour = colours.get(str(run.dataset), "black")
        label = str(run.dataset or run.run_id)
        if not train.empty:
            ax.plot(train["tokens_seen"], train["loss"], "-", linewidth=0.8, color=colour, label=f"{label} train")
        if not valid.empty:
            ax.plot(valid["tokens_seen"], valid["loss"], "o:", markersize=4, color=colour, label=f"{label} validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title(f"loss, {title}", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.92)
    _save(fig, path)
    plt.close(fig)


def draw_datasets_at_scale(averages: pd.DataFrame, title: str, colours: dict[str, str], path: Path) -> None:
    """Average score vs tokens for every dataset of one scale and budget: ours solid, reference dashed."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7, 4.5))
    datasets = []
    for (source, _run_id), series in averages.groupby(["source", "run_id"], sort=True):
        series = series.sort_values("tokens_seen")
        dataset = series["dataset"].iloc[0]
        datasets.append(dataset)
        style = "-o" if source == "ours" else "--"
        ax.plot(series["tokens_seen"].astype(float), series["value"], style, markersize=3, linewidth=1.2,
                color=colours.get(str(dataset), "black"))  # fmt: skip
    handles = [
        Line2D([], [], color=colours.get(str(d), "black"), label=str(d)) for d in sorted(set(map(str, datasets)))
    ]
    handles += [
        Line2D([], [], color="grey", linestyle="-", marker="o", markersize=3, label="ours"),
        Line2D([], [], color="grey", linestyle="--", label="reference (0.01)"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("average score")
    ax.set_title(f"all datasets, {title}", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.93)
    _save(fig, path)
    plt.close(fig)


def draw_average_vs_flops(averages: pd.DataFrame, colours: dict[str, str], path: Path) -> None:
    """Average vs training FLOPs (log x): every run (colour = dataset; ours solid, reference dashed) and the baselines."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    runs = averages[averages["source"] != "baseline"]
    for (source, _run_id), series in runs.groupby(["source", "run_id"], sort=True):
        series = series.sort_values("flops")
        style = "-o" if source == "ours" else "--"
        ax.plot(series["flops"], series["value"], style, markersize=2, linewidth=1,
                color=colours.get(str(series["dataset"].iloc[0]), "black"))  # fmt: skip
    handles = [
        Line2D([], [], color=colours.get(str(d), "black"), label=str(d))
        for d in sorted(set(map(str, runs["dataset"].dropna())))
    ]
    handles += [
        Line2D([], [], color="grey", linestyle="-", marker="o", markersize=3, label="ours"),
        Line2D([], [], color="grey", linestyle="--", label="reference (0.01)"),
    ]
    baselines = averages[averages["source"] == "baseline"]
    if not baselines.empty:
        ax.scatter(baselines["flops"], baselines["value"], marker="x", color="black")
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="external baselines"))
        for row in baselines.itertuples():
            ax.annotate(row.run_id, (row.flops, row.value), fontsize=6, xytext=(3, 2), textcoords="offset points")
    _log_x(ax)
    ax.margins(x=0.12)  # room for the baselines' labels
    ax.set_xlabel("training FLOPs (6 N D)")
    ax.set_ylabel("average score")
    ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.11, top=0.96)
    _save(fig, path)
    plt.close(fig)


def scale_groups(manifest: ReportManifest) -> dict[tuple[str, str], list[ReportRun]]:
    """Runs by (scale, budget), in manifest order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in manifest.runs:
        groups.setdefault((str(run.scale), str(run.budget)), []).append(run)
    return groups


def draw_plots(
    table: pd.DataFrame, manifest: ReportManifest, protocol: list[dict], plots: PlotCache
) -> dict[str, list[Path]]:
    """Every plot of the report, by HTML section; a plot without data is left out."""
    colours = dataset_colours([run.dataset for run in manifest.runs])
    curves = table[table["source"].isin(["ours", "reference"])]
    averages = table[table["task"] == AVG_TASK]
    curve_rows = {run_id: rows for run_id, rows in curves.groupby("run_id", sort=False)}
    sections: dict[str, list[Path]] = {"overview": [], "losses": [], "runs": []}

    for (scale, budget), runs in scale_groups(manifest).items():
        title = f"{scale}, {budget} tokens"
        run_ids = [run.run_id for run in runs]
        group_averages = averages[averages["run_id"].isin(run_ids) & averages["source"].isin(["ours", "reference"])]
        group_averages = group_averages[["source", "run_id", "dataset", "tokens_seen", "value"]]
        if not group_averages.empty:
            name = f"datasets_{safe_name(scale)}_{safe_name(budget)}"
            digest = inputs_digest(group_averages, title, colours)
            sections["overview"].append(
                plots.plot(
                    name, digest, lambda path, a=group_averages, t=title: draw_datasets_at_scale(a, t, colours, path)
                )
            )
        loss_keys = [loss_inputs(run) for run in runs]
        if any(key is not None for key in loss_keys):
            name = f"losses_{safe_name(scale)}_{safe_name(budget)}"
            digest = inputs_digest(loss_keys, title, colours)
            sections["losses"].append(
                plots.plot(name, digest, lambda path, r=runs, t=title: draw_losses_at_scale(r, t, colours, path))
            )

    flops_averages = averages[averages["flops"].notna() & (averages["flops"] > 0)]
    if not flops_averages[flops_averages["source"] != "baseline"].empty:
        flops_averages = flops_averages[["source", "run_id", "dataset", "flops", "value"]]
        digest = inputs_digest(flops_averages, colours)
        draw = functools.partial(draw_average_vs_flops, flops_averages, colours)
        sections["overview"].append(plots.plot("avg_vs_flops", digest, draw))

    for run in manifest.runs:
        run_id = run.run_id
        rows = curve_rows.get(run_id)
        if rows is not None:
            rows = rows[["source", "task", "tokens_seen", "value"]]
            digest = inputs_digest(rows, run_id, protocol)
            draw = functools.partial(draw_run_curves, rows, run_id, protocol)
            sections["runs"].append(plots.plot(f"scores_{safe_name(run_id)}", digest, draw))
        loss_key = loss_inputs(run)
        if loss_key is not None:
            sections["runs"].append(
                plots.plot(
                    f"loss_{safe_name(run_id)}", inputs_digest(loss_key), lambda path, r=run: draw_losses(r, path)
                )
            )
    plots.finish()
    return sections
