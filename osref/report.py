"""The report: our evaluation results next to the published open-sci-ref 0.01 numbers.

Everything the report shows comes from one tidy long table (``results.csv``/``.parquet``), one row
per (source, run, checkpoint, task), with ``source`` one of

* ``ours``: the per-checkpoint JSONs written by :func:`osref.evaluate.evaluate_checkpoint`,
* ``reference``: the matching published run's curve (``config/reference/curves.csv.gz``),
* ``baseline``: the external models of ``config/reference/baselines.csv``,

plus ``task == "avg"`` rows: the unweighted mean over the protocol's in-average tasks, written only
where every one of them is present (a mean over fewer tasks is not comparable, so it is left out
and the checkpoint appears in ``missing.csv``). A partly finished grid is normal: runs without
evaluations simply have all their cells in ``missing.csv``.

The manifest (written by the workflow) is plain data::

    {"protocol": [{"task": "copa", "shots": 0, "metric": "acc", "in_average": true}, ...],
     "runs": [{"run_id": ..., "dataset": ..., "scale": ..., "budget": ..., "tokens": ...,
               "seq_length": ..., "global_batch_size": ..., "params": ..., "train_iters": ...,
               "checkpoint_iters": [...], "reference_run": <runs.csv run_id or slurm job id, or null>,
               "eval_files": [...], "train_metrics": <path or null>, "valid_metrics": <path or null>}]}
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from osref.evaluate import average_of

AVG_TASK = "avg"
SOURCES = ("ours", "reference", "baseline")
RESULT_COLUMNS = [
    "source", "run_id", "reference_run", "dataset", "scale", "budget", "iteration", "tokens_seen", "flops",
    "task", "shots", "metric", "value", "stderr",
]  # fmt: skip
MISSING_COLUMNS = ["run_id", "iteration", "task", "shots", "metric", "in_average", "eval_files_found"]
REQUIRED_RUN_KEYS = ("run_id", "checkpoint_iters", "eval_files")


# ---- inputs -------------------------------------------------------------------------------------


def normalise_protocol(protocol: list[dict]) -> list[dict]:
    """Check the protocol entries and fill the default ``in_average = True``."""
    if not protocol:
        raise ValueError("manifest key 'protocol' is empty")
    normalised = []
    for index, spec in enumerate(protocol):
        missing = {"task", "shots", "metric"} - set(spec)
        if missing:
            raise ValueError(f"manifest protocol[{index}] lacks key(s) {sorted(missing)}: {spec!r}")
        normalised.append({**spec, "shots": int(spec["shots"]), "in_average": bool(spec.get("in_average", True))})
    names = [spec["task"] for spec in normalised]
    if len(set(names)) != len(names) or AVG_TASK in names:
        raise ValueError(f"manifest protocol task names must be unique and not {AVG_TASK!r}: {names}")
    return normalised


def validate_manifest(manifest: dict) -> None:
    for key in ("protocol", "runs"):
        if key not in manifest:
            raise ValueError(f"manifest lacks key {key!r}")
    seen = set()
    for index, run in enumerate(manifest["runs"]):
        for key in REQUIRED_RUN_KEYS:
            if key not in run:
                raise ValueError(f"manifest runs[{index}] ({run.get('run_id', '?')}) lacks key {key!r}")
        if run["run_id"] in seen:
            raise ValueError(f"manifest runs[{index}]: duplicate run_id {run['run_id']!r}")
        seen.add(run["run_id"])


def load_eval_json(path: Path) -> dict:
    """One evaluation JSON, checked for the keys the report uses."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    for key in ("run_id", "iteration", "tokens_seen", "num_fewshot", "tasks"):
        if key not in payload:
            raise ValueError(f"{path}: evaluation JSON lacks key {key!r}")
    return payload


def _flops(params: Any, tokens_seen: Any) -> float:
    if params is None or tokens_seen is None or pd.isna(params) or pd.isna(tokens_seen):
        return math.nan
    return 6.0 * float(params) * float(tokens_seen)


def _run_fields(run: dict) -> dict:
    return {key: run.get(key) for key in ("run_id", "dataset", "scale", "budget")} | {
        "reference_run": run.get("reference_run")
    }


def our_rows(run: dict, protocol: list[dict]) -> tuple[list[dict], int]:
    """Rows of one run's evaluation JSONs that exist (absent files are simply not there yet)."""
    by_task = {spec["task"]: spec for spec in protocol}
    rows, seen, found = [], {}, 0
    for path in run["eval_files"]:
        if not Path(path).is_file():
            continue
        found += 1
        payload = load_eval_json(path)
        if payload["run_id"] != run["run_id"]:
            raise ValueError(f"{path}: run_id {payload['run_id']!r} but the manifest lists it under {run['run_id']!r}")
        for task, score in payload["tasks"].items():
            spec = by_task.get(task)
            if spec is not None and int(payload["num_fewshot"]) != spec["shots"]:
                raise ValueError(
                    f"{path}: task {task!r} evaluated {payload['num_fewshot']}-shot, the protocol says {spec['shots']}"
                )
            key = (int(payload["iteration"]), task)
            if key in seen:
                raise ValueError(f"{path}: {task!r} at iteration {key[0]} is also in {seen[key]}")
            seen[key] = path
            rows.append(
                _run_fields(run)
                | {
                    "source": "ours",
                    "iteration": int(payload["iteration"]),
                    "tokens_seen": int(payload["tokens_seen"]),
                    "flops": _flops(run.get("params"), payload["tokens_seen"]),
                    "task": task,
                    "shots": int(payload["num_fewshot"]),
                    "metric": score.get("metric"),
                    "value": score.get("value"),
                    "stderr": score.get("stderr"),
                }
            )
    return rows, found


class ReferenceData:
    """The files of ``config/reference`` (see its README), read lazily."""

    def __init__(self, reference_dir: Path):
        self.reference_dir = Path(reference_dir)
        self._runs: pd.DataFrame | None = None
        self._curves: pd.DataFrame | None = None
        self._baselines: pd.DataFrame | None = None

    def _read(self, name: str, **kwargs) -> pd.DataFrame:
        path = self.reference_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"reference file not found: {path}")
        return pd.read_csv(path, **kwargs)

    @property
    def runs(self) -> pd.DataFrame:
        if self._runs is None:
            self._runs = self._read("runs.csv")
        return self._runs

    @property
    def curves(self) -> pd.DataFrame:
        if self._curves is None:
            self._curves = self._read("curves.csv.gz")
        return self._curves

    @property
    def baselines(self) -> pd.DataFrame:
        if self._baselines is None:
            self._baselines = self._read("baselines.csv")
        return self._baselines

    def resolve_run(self, reference_run: str | int, context: str) -> pd.Series:
        """The runs.csv row for a run_id or a slurm job id."""
        runs = self.runs
        text = str(reference_run)
        match = runs[runs["run_id"] == text]
        if match.empty and text.isdigit():
            match = runs[runs["slurm_job_id"] == int(text)]
        if len(match) != 1:
            raise ValueError(
                f"{context}: reference_run {reference_run!r} is not a run_id or slurm_job_id in "
                f"{self.reference_dir / 'runs.csv'}"
            )
        return match.iloc[0]

    def parameter_count(self, run: pd.Series) -> int:
        from osref.model_spec import ModelSpec

        spec = ModelSpec(
            name=str(run["size"]),
            num_layers=int(run["num_layers"]),
            hidden_size=int(run["hidden_size"]),
            ffn_hidden_size=int(run["ffn_hidden_size"]),
            num_attention_heads=int(run["num_attention_heads"]),
            kv_channels=int(run["hidden_size"]) // int(run["num_attention_heads"]),
            seq_length=int(run["seq_length"]),
            tie_embeddings=bool(run["tied_embedding"]),
        )
        return spec.parameter_count()


def reference_rows(run: dict, protocol: list[dict], reference: ReferenceData, index: int) -> list[dict]:
    """The published curve of the run's reference_run, restricted to the protocol's (task, shots, metric)."""
    ref_run = reference.resolve_run(run["reference_run"], f"manifest runs[{index}] ({run['run_id']})")
    params = reference.parameter_count(ref_run)
    curves = reference.curves
    curves = curves[curves["run_id"] == ref_run["run_id"]]
    rows = []
    for spec in protocol:
        cells = curves[
            (curves["task"] == spec["task"])
            & (curves["num_fewshot"] == spec["shots"])
            & (curves["metric"] == spec["metric"])
        ]
        for cell in cells.itertuples(index=False):
            rows.append(
                _run_fields(run)
                | {
                    "source": "reference",
                    "reference_run": ref_run["run_id"],
                    "iteration": int(cell.iteration),
                    "tokens_seen": int(cell.tokens_seen),
                    "flops": _flops(params, cell.tokens_seen),
                    "task": spec["task"],
                    "shots": spec["shots"],
                    "metric": spec["metric"],
                    "value": float(cell.value),
                    "stderr": None,
                }
            )
    return rows


def baseline_rows(protocol: list[dict], reference: ReferenceData) -> list[dict]:
    """One row per (baseline model, protocol task found in baselines.csv); shots are not recorded there."""
    baselines = reference.baselines
    rows = []
    for model in baselines.itertuples(index=False):
        model = model._asdict()
        tokens = model.get("train_tokens_T")
        tokens_seen = None if pd.isna(tokens) else int(round(float(tokens) * 1e12))
        for spec in protocol:
            value = model.get(spec["task"])
            if value is None or pd.isna(value):
                continue
            rows.append(
                {
                    "source": "baseline",
                    "run_id": model["model_name"],
                    "reference_run": None,
                    "dataset": None,
                    "scale": None if pd.isna(model.get("params_B")) else f"{model['params_B']}B",
                    "budget": None if pd.isna(tokens) else f"{tokens}T",
                    "iteration": None,
                    "tokens_seen": tokens_seen,
                    "flops": float(model["train_flops_6ND"]) if not pd.isna(model.get("train_flops_6ND")) else math.nan,
                    "task": spec["task"],
                    "shots": spec["shots"],
                    "metric": spec["metric"],
                    "value": float(value),
                    "stderr": None,
                }
            )
    return rows


# ---- derived tables -----------------------------------------------------------------------------


def average_rows(rows: pd.DataFrame, protocol: list[dict]) -> pd.DataFrame:
    """``task == "avg"`` rows for every (source, run, checkpoint) that has all in-average tasks."""
    in_average = [spec["task"] for spec in protocol if spec["in_average"]]
    if rows.empty or not in_average:
        return rows.iloc[0:0]
    keys = ["source", "run_id", "iteration"]
    averages = []
    for _, group in rows.groupby(keys, dropna=False, sort=True):
        scores = {row.task: (None if pd.isna(row.value) else float(row.value)) for row in group.itertuples()}
        value = average_of(scores, in_average)
        if value is None:
            continue
        first = group.iloc[0].to_dict()
        averages.append(first | {"task": AVG_TASK, "shots": None, "metric": "mean", "value": value, "stderr": None})
    return pd.DataFrame(averages, columns=rows.columns)


def missing_cells(manifest: dict, protocol: list[dict], ours: pd.DataFrame, files_found: dict[str, int]) -> pd.DataFrame:
    """Every (run, scheduled checkpoint, protocol task) with no value of ours."""
    present = set()
    if not ours.empty:
        valued = ours[ours["value"].notna()]
        present = set(zip(valued["run_id"], valued["iteration"].astype(int), valued["task"]))
    missing = []
    for run in manifest["runs"]:
        for iteration in sorted(int(i) for i in run["checkpoint_iters"]):
            for spec in protocol:
                if (run["run_id"], iteration, spec["task"]) not in present:
                    missing.append(
                        {
                            "run_id": run["run_id"],
                            "iteration": iteration,
                            "task": spec["task"],
                            "shots": spec["shots"],
                            "metric": spec["metric"],
                            "in_average": spec["in_average"],
                            "eval_files_found": files_found.get(run["run_id"], 0),
                        }
                    )
    return pd.DataFrame(missing, columns=MISSING_COLUMNS)


def tidy_table(rows: list[dict], protocol: list[dict]) -> pd.DataFrame:
    """Rows + averages, typed and in a fixed order."""
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    table = pd.concat([table, average_rows(table, protocol)], ignore_index=True) if not table.empty else table
    for column in ("iteration", "tokens_seen", "shots"):
        table[column] = pd.array([None if pd.isna(v) else int(v) for v in table[column]], dtype="Int64")
    for column in ("flops", "value", "stderr"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    for column in ("source", "run_id", "reference_run", "dataset", "scale", "budget", "task", "metric"):
        table[column] = table[column].astype("object").where(table[column].notna(), None)
        table[column] = table[column].map(lambda v: None if v is None else str(v))
    task_order = {spec["task"]: i for i, spec in enumerate(protocol)} | {AVG_TASK: len(protocol)}
    table["_source_order"] = table["source"].map(SOURCES.index)
    table["_task_order"] = table["task"].map(lambda t: task_order.get(t, len(protocol) + 1))
    table = table.sort_values(
        ["_source_order", "run_id", "iteration", "_task_order", "task"], na_position="first", kind="mergesort"
    )
    return table.drop(columns=["_source_order", "_task_order"]).reset_index(drop=True)


def final_scores(table: pd.DataFrame, manifest: dict, protocol: list[dict]) -> pd.DataFrame:
    """Per run and task: our last evaluated checkpoint vs the reference run's last checkpoint."""
    records = []
    tasks = [spec["task"] for spec in protocol] + [AVG_TASK]
    metric_of = {spec["task"]: spec["metric"] for spec in protocol}
    for run in manifest["runs"]:
        run_rows = table[table["run_id"] == run["run_id"]]
        ours = run_rows[run_rows["source"] == "ours"]
        ref = run_rows[run_rows["source"] == "reference"]
        our_iteration = int(ours["iteration"].max()) if not ours.empty else None
        ref_iteration = int(ref["iteration"].max()) if not ref.empty else None
        for task in tasks:
            our_value = _value_at(ours, our_iteration, task)
            ref_value = _value_at(ref, ref_iteration, task)
            records.append(
                {
                    "run_id": run["run_id"],
                    "task": task,
                    "ours_iteration": our_iteration,
                    "ours_is_final": our_iteration is not None and our_iteration == run.get("train_iters"),
                    "ours": our_value,
                    "reference_run": run.get("reference_run"),
                    "reference_iteration": ref_iteration,
                    "reference": ref_value,
                    "delta": (our_value - ref_value) if our_value is not None and ref_value is not None else None,
                }
            )
    columns = ["run_id", "task", "ours_iteration", "ours_is_final", "ours", "reference_run", "reference_iteration",
               "reference", "delta"]  # fmt: skip
    frame = pd.DataFrame(records, columns=columns)
    for column in ("ours", "reference", "delta"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in ("ours_iteration", "reference_iteration"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _value_at(rows: pd.DataFrame, iteration: int | None, task: str) -> float | None:
    if iteration is None:
        return None
    hit = rows[(rows["iteration"] == iteration) & (rows["task"] == task)]
    return None if hit.empty or pd.isna(hit.iloc[0]["value"]) else float(hit.iloc[0]["value"])


def read_metrics(path: str | Path | None, value_keys: tuple[str, ...], tokens_per_iteration: int | None) -> pd.DataFrame:
    """A training/validation metrics JSONL as (tokens_seen, loss); empty when the file is absent."""
    empty = pd.DataFrame(columns=["tokens_seen", "loss"])
    if not path or not Path(path).is_file():
        return empty
    records = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        loss = next((record[k] for k in value_keys if k in record), None)
        if loss is None:
            raise ValueError(f"{path}: line {line_no} has none of the keys {value_keys}")
        tokens = record.get("consumed_tokens", record.get("tokens_seen"))
        if tokens is None and tokens_per_iteration and "iteration" in record:
            tokens = int(record["iteration"]) * tokens_per_iteration
        records.append({"tokens_seen": tokens, "loss": float(loss)})
    return pd.DataFrame(records, columns=["tokens_seen", "loss"])


# ---- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})
    os.replace(tmp, path)
    return path


def plot_run_curves(table: pd.DataFrame, run_id: str, protocol: list[dict], path: Path) -> Path | None:
    """Score vs tokens seen, one panel per task + avg, ours and the reference run."""
    rows = table[(table["run_id"] == run_id) & table["source"].isin(["ours", "reference"])]
    if rows.empty:
        return None
    plt = _pyplot()
    tasks = [spec["task"] for spec in protocol] + [AVG_TASK]
    metric_of = {spec["task"]: spec["metric"] for spec in protocol}
    columns = min(4, len(tasks))
    n_rows = math.ceil(len(tasks) / columns)
    height = 2.4 * n_rows + 0.8
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.2 * columns, height), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for source, style in (("reference", "--"), ("ours", "-o")):
            series = rows[(rows["source"] == source) & (rows["task"] == task)].sort_values("tokens_seen")
            if not series.empty:
                ax.plot(series["tokens_seen"].astype(float), series["value"], style, markersize=3, label=source)
        ax.set_title(f"{task} ({metric_of[task]})" if task in metric_of else task, fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.has_data() and rows["tokens_seen"].min() > 0:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("tokens seen", fontsize=9)
    fig.suptitle(run_id, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.55 / height, top=1 - 0.55 / height, hspace=0.55, wspace=0.3)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_losses(run: dict, path: Path) -> Path | None:
    tokens_per_iteration = None
    if run.get("global_batch_size") and run.get("seq_length"):
        tokens_per_iteration = int(run["global_batch_size"]) * int(run["seq_length"])
    train = read_metrics(run.get("train_metrics"), ("loss", "lm_loss", "train_loss"), tokens_per_iteration)
    valid = read_metrics(run.get("valid_metrics"), ("valid_loss", "loss", "lm_loss"), tokens_per_iteration)
    if train.empty and valid.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if not train.empty:
        ax.plot(train["tokens_seen"], train["loss"], "-", linewidth=1, label="training loss")
    if not valid.empty:
        ax.plot(valid["tokens_seen"], valid["loss"], "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.set_title(run["run_id"], fontsize=10)
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.15, top=0.9)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_average_vs_flops(table: pd.DataFrame, path: Path) -> Path | None:
    averages = table[(table["task"] == AVG_TASK) & table["flops"].notna() & (table["flops"] > 0)]
    if averages.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (source, run_id), series in averages[averages["source"] != "baseline"].groupby(["source", "run_id"]):
        series = series.sort_values("flops")
        style = "-o" if source == "ours" else "--"
        ax.plot(series["flops"], series["value"], style, markersize=3, label=f"{run_id} ({source})")
    baselines = averages[averages["source"] == "baseline"]
    if not baselines.empty:
        ax.scatter(baselines["flops"], baselines["value"], marker="x", color="black", label="baselines")
        for row in baselines.itertuples():
            ax.annotate(row.run_id, (row.flops, row.value), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6 N D)")
    ax.set_ylabel("average score")
    ax.legend(fontsize=6, loc="lower right")
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.95)
    _save(fig, path)
    plt.close(fig)
    return path


# ---- HTML ---------------------------------------------------------------------------------------


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


def render_html(manifest: dict, final: pd.DataFrame, missing: pd.DataFrame, plots: list[Path], overview: pd.DataFrame) -> str:
    protocol_frame = pd.DataFrame(normalise_protocol(manifest["protocol"]))
    missing_by_checkpoint = (
        missing.groupby(["run_id", "iteration"], sort=True)
        .agg(missing_tasks=("task", lambda t: ", ".join(t)), blocks_average=("in_average", "any"))
        .reset_index()
        if not missing.empty
        else missing
    )
    sections = [
        "<h2>Runs</h2>", _table_html(overview, "no runs in the manifest"),
        "<h2>Protocol</h2>", _table_html(protocol_frame, ""),
        "<h2>Final scores vs reference</h2>",
        "<p>ours = the run's last evaluated checkpoint; reference = the reference run's last checkpoint; "
        "delta = ours − reference. Re-evaluating one checkpoint varies by 0.01–0.03 on small tasks.</p>",
        _table_html(final, "no scores yet"),
        "<h2>Missing cells</h2>",
        "<p>Scheduled checkpoints without a value for a protocol task (full list: missing.csv). "
        "blocks_average = no average is reported for that checkpoint.</p>",
        _table_html(missing_by_checkpoint, "none: every scheduled cell has a value"),
        "<h2>Plots</h2>", *[_image_html(p) for p in plots],
    ]  # fmt: skip
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;} table.data{border-collapse:collapse;font-size:12px}"
        "table.data td,table.data th{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}"
        "img{max-width:100%} figcaption{font-size:11px;color:#666}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>open-sci-ref reproduction report</title>"
        f"<style>{style}</style></head><body><h1>open-sci-ref reproduction report</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


# ---- entry point --------------------------------------------------------------------------------


def _write_text_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_frame(frame: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False, float_format="%.10g")
    os.replace(tmp, path)
    return path


def build_report(manifest: dict, reference_dir: Path, out_dir: Path) -> dict:
    """Write results.csv/.parquet, missing.csv, final_scores.csv, plots/*.png and index.html.

    Returns ``{"files": [written paths], "n_results": rows, "n_missing": cells}``.
    """
    validate_manifest(manifest)
    protocol = normalise_protocol(manifest["protocol"])
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    reference = ReferenceData(reference_dir)

    rows: list[dict] = []
    files_found: dict[str, int] = {}
    for index, run in enumerate(manifest["runs"]):
        run_rows, files_found[run["run_id"]] = our_rows(run, protocol)
        rows.extend(run_rows)
        if run.get("reference_run") not in (None, ""):
            rows.extend(reference_rows(run, protocol, reference, index))
    reference_in_scope = any(row["source"] == "reference" for row in rows)
    if reference_in_scope:
        rows.extend(baseline_rows(protocol, reference))

    table = tidy_table(rows, protocol)
    ours = table[(table["source"] == "ours") & (table["task"] != AVG_TASK)]
    missing = missing_cells(manifest, protocol, ours, files_found)
    final = final_scores(table, manifest, protocol)
    overview = pd.DataFrame(
        [
            {key: run.get(key) for key in ("run_id", "dataset", "scale", "budget", "params", "train_iters", "reference_run")}
            | {
                "checkpoints_scheduled": len(run["checkpoint_iters"]),
                "eval_files_found": files_found[run["run_id"]],
                "eval_files_expected": len(run["eval_files"]),
            }
            for run in manifest["runs"]
        ]
    )

    written = [
        _write_frame(table, out_dir / "results.csv"),
        _write_frame(table, out_dir / "results.parquet"),
        _write_frame(missing, out_dir / "missing.csv"),
        _write_frame(final, out_dir / "final_scores.csv"),
    ]
    plots: list[Path] = []
    for run in manifest["runs"]:
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in run["run_id"])
        for plot in (
            plot_run_curves(table, run["run_id"], protocol, plot_dir / f"scores_{safe_id}.png"),
            plot_losses(run, plot_dir / f"loss_{safe_id}.png"),
        ):
            if plot is not None:
                plots.append(plot)
    if reference_in_scope:
        plot = plot_average_vs_flops(table, plot_dir / "avg_vs_flops.png")
        if plot is not None:
            plots.append(plot)
    written.extend(plots)
    written.append(_write_text_atomic(out_dir / "index.html", render_html(manifest, final, missing, plots, overview)))
    return {"files": [str(p) for p in written], "n_results": len(table), "n_missing": len(missing)}
