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

Rebuilding after one more checkpoint is evaluated must cost seconds on the full grid (36 runs × 37
checkpoints × 3 shot groups ≈ 4 000 JSONs, ~80 plots), so the report keeps a cache in
``<out_dir>/.cache`` (not a declared output: Snakemake deletes declared outputs before a rerun):

* parsed evaluation JSONs, keyed by path + mtime + size (only new or changed files are read),
* the reference CSVs as parquet, keyed by the source file's size + mtime,
* every plot's PNG with a digest of its inputs (a plot is drawn again only when they changed);
  the PNGs are copied from there into ``plots/``.

Deleting ``.cache`` is always safe; the next build is then a cold one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from stat import S_ISREG
from typing import Any

import pandas as pd

AVG_TASK = "avg"
SOURCES = ("ours", "reference", "baseline", "released")  # released: osref.released_results
RESULT_COLUMNS = [
    "source", "run_id", "reference_run", "dataset", "scale", "budget", "iteration", "tokens_seen", "flops",
    "task", "shots", "metric", "value", "stderr",
]  # fmt: skip
MISSING_COLUMNS = ["run_id", "iteration", "task", "shots", "metric", "in_average", "eval_files_found"]
REQUIRED_RUN_KEYS = ("run_id", "checkpoint_iters", "eval_files")
CACHE_DIR_NAME = ".cache"
EVAL_CACHE_COLUMNS = [
    "path", "mtime_ns", "size", "run_id", "iteration", "tokens_seen", "num_fewshot", "task", "metric", "value", "stderr",
]  # fmt: skip

log = logging.getLogger(__name__)


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


def _stat_key(path: str | Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a regular file, None when it does not exist (yet)."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (stat.st_mtime_ns, stat.st_size) if S_ISREG(stat.st_mode) else None


class EvalFileCache:
    """Parsed evaluation JSONs (the fields the report uses, not lm-eval's raw dict) by path + mtime + size.

    ``payload(path)`` returns what :func:`load_eval_json` would, minus ``raw``; a file whose
    (mtime, size) matches the cached entry is not read. ``save()`` keeps only the files asked for
    in this build, so the cache does not grow with deleted runs.
    """

    def __init__(self, cache_file: Path | None):
        self.cache_file = cache_file
        self.parsed = 0
        self.reused = 0
        self._entries: dict[str, tuple[tuple[int, int], dict]] = {}
        self._used: set[str] = set()
        if cache_file is not None and cache_file.is_file():
            try:
                self._entries = self._read(cache_file)
            except Exception as error:  # noqa: BLE001 (a damaged cache only costs a cold build)
                log.warning("ignoring unreadable cache %s (%s)", cache_file, error)

    @staticmethod
    def _read(cache_file: Path) -> dict[str, tuple[tuple[int, int], dict]]:
        frame = pd.read_parquet(cache_file)
        columns = [frame[column].to_numpy(dtype=object) for column in EVAL_CACHE_COLUMNS]
        entries: dict[str, tuple[tuple[int, int], dict]] = {}
        for path, mtime_ns, size, run_id, iteration, tokens_seen, shots, task, metric, value, stderr in zip(
            *columns, strict=False
        ):
            if path not in entries:
                payload = {"run_id": run_id, "iteration": int(iteration), "tokens_seen": int(tokens_seen),
                           "num_fewshot": int(shots), "tasks": {}}  # fmt: skip
                entries[path] = ((int(mtime_ns), int(size)), payload)
            if isinstance(task, str):
                entries[path][1]["tasks"][task] = {
                    "metric": metric if isinstance(metric, str) else None,
                    "value": None if value is None or math.isnan(value) else float(value),
                    "stderr": None if stderr is None or math.isnan(stderr) else float(stderr),
                }
        return entries

    def payload(self, path: str | Path) -> dict | None:
        """The file's fields, or None when it does not exist."""
        path = os.path.abspath(path)
        key = _stat_key(path)
        if key is None:
            return None
        self._used.add(path)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == key:
            self.reused += 1
            return cached[1]
        payload = load_eval_json(Path(path))
        slim = {key_: payload[key_] for key_ in ("run_id", "iteration", "tokens_seen", "num_fewshot")} | {
            "tasks": {
                task: {field: score.get(field) for field in ("metric", "value", "stderr")}
                for task, score in payload["tasks"].items()
            }
        }
        self._entries[path] = (key, slim)
        self.parsed += 1
        return slim

    def save(self) -> None:
        if self.cache_file is None or (self.parsed == 0 and set(self._entries) == self._used):
            return
        records = []
        for path in sorted(self._used):
            (mtime_ns, size), payload = self._entries[path]
            head = {"path": path, "mtime_ns": mtime_ns, "size": size} | {
                key: payload[key] for key in ("run_id", "iteration", "tokens_seen", "num_fewshot")
            }
            if not payload["tasks"]:  # still cached, so the file is not read again
                records.append(head | {"task": None, "metric": None, "value": None, "stderr": None})
            for task, score in payload["tasks"].items():
                records.append(head | {"task": task} | score)
        frame = pd.DataFrame(records, columns=EVAL_CACHE_COLUMNS)
        for column in ("value", "stderr"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        for column in ("run_id", "task", "metric"):
            frame[column] = frame[column].astype("object")
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        _write_frame(frame, self.cache_file)


def our_rows(run: dict, protocol: list[dict], eval_files: EvalFileCache) -> tuple[list[dict], int]:
    """Rows of one run's evaluation JSONs that exist (absent files are simply not there yet)."""
    by_task = {spec["task"]: spec for spec in protocol}
    rows, seen, found = [], {}, 0
    for path in run["eval_files"]:
        payload = eval_files.payload(path)
        if payload is None:
            continue
        found += 1
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
    """The files of ``config/reference`` (see its README), read lazily; parsed once into ``cache_dir``."""

    def __init__(self, reference_dir: Path, cache_dir: Path | None = None):
        self.reference_dir = Path(reference_dir)
        self.cache_dir = cache_dir
        self._runs: pd.DataFrame | None = None
        self._curves: pd.DataFrame | None = None
        self._baselines: pd.DataFrame | None = None
        self._parameter_counts: dict[str, int] = {}
        self._curves_by_run: dict[str, pd.DataFrame] | None = None

    def _read(self, name: str) -> pd.DataFrame:
        path = self.reference_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"reference file not found: {path}")
        if self.cache_dir is None:
            return pd.read_csv(path)
        mtime_ns, size = _stat_key(path)  # type: ignore[misc]
        stem = name.split(".")[0]
        cached = self.cache_dir / f"reference_{stem}_{size}_{mtime_ns}.parquet"
        if cached.is_file():
            try:
                return pd.read_parquet(cached)
            except Exception as error:  # noqa: BLE001 (a damaged cache only costs a cold build)
                log.warning("ignoring unreadable cache %s (%s)", cached, error)
        frame = pd.read_csv(path)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.cache_dir.glob(f"reference_{stem}_*.parquet"):
            stale.unlink()
        _write_frame(frame, cached)
        return frame

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

    def curves_of(self, run_id: str) -> pd.DataFrame:
        if self._curves_by_run is None:
            self._curves_by_run = {name: rows for name, rows in self.curves.groupby("run_id", sort=False)}
        return self._curves_by_run.get(run_id, self.curves.iloc[0:0])

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
        if run["run_id"] not in self._parameter_counts:
            self._parameter_counts[run["run_id"]] = self._count_parameters(run)
        return self._parameter_counts[run["run_id"]]

    @staticmethod
    def _count_parameters(run: pd.Series) -> int:
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


def reference_rows(run: dict, protocol: list[dict], reference: ReferenceData, index: int) -> pd.DataFrame:
    """The published curve of the run's reference_run, restricted to the protocol's (task, shots, metric)."""
    ref_run = reference.resolve_run(run["reference_run"], f"manifest runs[{index}] ({run['run_id']})")
    params = reference.parameter_count(ref_run)
    specs = pd.DataFrame(protocol)[["task", "shots", "metric"]]
    curves = reference.curves_of(ref_run["run_id"])
    cells = curves.merge(specs, left_on=["task", "num_fewshot", "metric"], right_on=["task", "shots", "metric"])
    fields = _run_fields(run) | {"source": "reference", "reference_run": ref_run["run_id"], "stderr": None}
    frame = pd.DataFrame(
        {
            "iteration": cells["iteration"].to_numpy(dtype="int64"),
            "tokens_seen": cells["tokens_seen"].to_numpy(dtype="int64"),
            "flops": 6.0 * float(params) * cells["tokens_seen"].to_numpy(dtype="float64"),
            "task": cells["task"].to_numpy(dtype=object),
            "shots": cells["shots"].to_numpy(dtype="int64"),
            "metric": cells["metric"].to_numpy(dtype=object),
            "value": cells["value"].to_numpy(dtype="float64"),
        }
    )
    for column, value in fields.items():
        frame[column] = pd.Series([value] * len(frame), dtype=object)
    return frame[RESULT_COLUMNS]


def baseline_rows(protocol: list[dict], reference: ReferenceData) -> list[dict]:
    """One row per (baseline model, protocol task found in baselines.csv); shots are not recorded there."""
    baselines = reference.baselines
    rows = []
    for model in baselines.itertuples(index=False):
        model = model._asdict()
        tokens = model.get("train_tokens_T")
        tokens_seen = None if pd.isna(tokens) else round(float(tokens) * 1e12)
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


def published_rows(manifest: dict, protocol: list[dict], reference: ReferenceData, cache_dir: Path) -> pd.DataFrame:
    """Reference curves of every run plus the baselines (only when some run has a reference curve).

    They depend only on the manifest's run fields, the protocol and the reference files, so they
    are cached as one parquet file under a digest of those.
    """
    reference_files = sorted(reference.reference_dir.glob("*.csv*"))
    key = inputs_digest(
        [[_run_fields(run), run.get("reference_run")] for run in manifest["runs"]],
        protocol,
        [(path.name, _stat_key(path)) for path in reference_files],
    )[:20]
    cached = cache_dir / f"published_rows_{key}.parquet"
    if cached.is_file():
        try:
            return pd.read_parquet(cached)
        except Exception as error:  # noqa: BLE001 (a damaged cache only costs a cold build)
            log.warning("ignoring unreadable cache %s (%s)", cached, error)
    parts = [
        reference_rows(run, protocol, reference, index)
        for index, run in enumerate(manifest["runs"])
        if run.get("reference_run") not in (None, "")
    ]
    parts = [part for part in parts if not part.empty]
    if parts:
        parts.append(pd.DataFrame(baseline_rows(protocol, reference), columns=RESULT_COLUMNS))
        published = pd.concat(parts, ignore_index=True)
    else:
        published = pd.DataFrame(columns=RESULT_COLUMNS)
    for column in ("iteration", "tokens_seen", "shots"):
        published[column] = pd.to_numeric(published[column], errors="coerce").astype("Int64")
    for column in ("flops", "value", "stderr"):
        published[column] = pd.to_numeric(published[column], errors="coerce").astype("float64")
    for column in ("source", "run_id", "reference_run", "dataset", "scale", "budget", "task", "metric"):
        published[column] = published[column].astype(object)
    for stale in cache_dir.glob("published_rows_*.parquet"):
        stale.unlink()
    _write_frame(published, cached)
    return published


# ---- derived tables -----------------------------------------------------------------------------


def average_rows(rows: pd.DataFrame, protocol: list[dict]) -> pd.DataFrame:
    """``task == "avg"`` rows for every (source, run, checkpoint) that has all in-average tasks."""
    in_average = [spec["task"] for spec in protocol if spec["in_average"]]
    if rows.empty or not in_average:
        return rows.iloc[0:0]
    keys = ["source", "run_id", "iteration"]
    scored = rows.assign(value=pd.to_numeric(rows["value"], errors="coerce"))
    scored = scored[scored["task"].isin(in_average) & scored["value"].notna()]
    if scored.empty:
        return rows.iloc[0:0]
    groups = scored.groupby(keys, dropna=False, sort=True)
    complete = (groups["task"].nunique() == len(in_average)) & (groups["task"].size() == len(in_average))
    averages = groups.first()[complete].copy()
    averages["value"] = (groups["value"].sum()[complete] / len(in_average)).astype("float64")
    averages = averages.reset_index()
    averages["task"], averages["shots"], averages["metric"], averages["stderr"] = AVG_TASK, None, "mean", None
    return averages[list(rows.columns)]


def missing_cells(
    manifest: dict, protocol: list[dict], ours: pd.DataFrame, files_found: dict[str, int]
) -> pd.DataFrame:
    """Every (run, scheduled checkpoint, protocol task) with no value of ours."""
    present = set()
    if not ours.empty:
        valued = ours[ours["value"].notna()]
        present = set(zip(valued["run_id"], valued["iteration"].astype(int), valued["task"], strict=False))
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


def tidy_table(parts: list[pd.DataFrame], protocol: list[dict]) -> pd.DataFrame:
    """Rows + averages, typed and in a fixed order."""
    parts = [part for part in parts if not part.empty]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=RESULT_COLUMNS)
    for column in ("value", "flops", "stderr"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    table = pd.concat([table, average_rows(table, protocol)], ignore_index=True) if not table.empty else table
    for column in ("iteration", "tokens_seen", "shots"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    for column in ("flops", "value", "stderr"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    for column in ("source", "run_id", "reference_run", "dataset", "scale", "budget", "task", "metric"):
        values = table[column].astype(object)
        present = values.notna()
        values[present] = values[present].map(str)
        table[column] = values.where(present, None)
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
    last_iteration, last_values = _last_checkpoints(table[table["source"].isin(["ours", "reference"])])
    for run in manifest["runs"]:
        our_iteration = last_iteration.get(("ours", run["run_id"]))
        ref_iteration = last_iteration.get(("reference", run["run_id"]))
        our_values = last_values.get(("ours", run["run_id"]), {})
        ref_values = last_values.get(("reference", run["run_id"]), {})
        for task in tasks:
            our_value, ref_value = our_values.get(task), ref_values.get(task)
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


def _last_checkpoints(rows: pd.DataFrame) -> tuple[dict[tuple, int], dict[tuple, dict[str, float]]]:
    """Per (source, run_id): the last evaluated iteration, and its non-missing values by task."""
    if rows.empty:
        return {}, {}
    last = rows.groupby(["source", "run_id"], sort=False)["iteration"].max()
    iterations = {key: int(value) for key, value in last.items()}
    at_last = rows[(rows["iteration"] == rows.groupby(["source", "run_id"], sort=False)["iteration"].transform("max"))
                   & rows["value"].notna()]  # fmt: skip
    values: dict[tuple, dict[str, float]] = {}
    for source, run_id, task, value in zip(
        *(at_last[c].to_numpy(dtype=object) for c in ("source", "run_id", "task", "value")), strict=False
    ):
        values.setdefault((source, run_id), {})[task] = float(value)
    return iterations, values


def read_metrics(
    path: str | Path | None, value_keys: tuple[str, ...], tokens_per_iteration: int | None
) -> pd.DataFrame:
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


TRAINING_COLUMNS = ["run_id", "iteration", "consumed_tokens", "loss", "lr", "grad_norm", "tokens_per_s"]


def training_log(manifest: dict) -> pd.DataFrame:
    """Every run's training metrics (loss, lr, grad norm, throughput per logged iteration) in one table."""
    frames = []
    for run in manifest["runs"]:
        path = run.get("train_metrics")
        if not path or not Path(path).is_file():
            continue
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        frame = pd.DataFrame(records).reindex(columns=TRAINING_COLUMNS[1:])
        frame.insert(0, "run_id", run["run_id"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)


def training_summary(manifest: dict, log: pd.DataFrame) -> pd.DataFrame:
    """Per run: where training stands, its recent loss, last validation loss, peak LR, throughput."""
    rows = []
    for run in manifest["runs"]:
        own = log[log["run_id"] == run["run_id"]]
        valid = read_metrics(run.get("valid_metrics"), ("valid_loss", "loss"), _tokens_per_iteration(run))
        rows.append(
            {
                "run_id": run["run_id"],
                "trained_iterations": int(own["iteration"].max()) if not own.empty else 0,
                "train_loss_last5": float(own["loss"].tail(5).mean()) if not own.empty else None,
                "valid_loss": float(valid["loss"].iloc[-1]) if not valid.empty else None,
                "peak_lr": float(own["lr"].max()) if not own.empty else None,
                "median_tokens_per_s": float(own["tokens_per_s"].median()) if not own.empty else None,
            }
        )
    return pd.DataFrame(rows)


# ---- plots --------------------------------------------------------------------------------------

# A change to this module (its styles or the data it selects) redraws every plot.
PLOT_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


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


def _log_x(ax) -> None:
    """Log x axis with few ticks: minor ticks on log axes are most of a small figure's drawing time."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(numticks=5))
    ax.xaxis.set_minor_locator(NullLocator())


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def inputs_digest(*parts: Any) -> str:
    """A digest of a plot's inputs: data frames by content, anything else by its JSON text."""
    digest = hashlib.sha256(PLOT_CODE_DIGEST.encode())
    for part in parts:
        if isinstance(part, pd.DataFrame):
            digest.update(",".join(map(str, part.columns)).encode())
            digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


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
        target = self.plot_dir / f"{name}.png"
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(cached, tmp)
        os.replace(tmp, target)
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
        _write_text_atomic(self.digest_file, json.dumps(self._digests, indent=1, sort_keys=True))


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


def _tokens_per_iteration(run: dict) -> int | None:
    if run.get("global_batch_size") and run.get("seq_length"):
        return int(run["global_batch_size"]) * int(run["seq_length"])
    return None


def run_losses(run: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, validation) loss of a run as (tokens_seen, loss) frames; empty when not written yet."""
    tokens_per_iteration = _tokens_per_iteration(run)
    train = read_metrics(run.get("train_metrics"), ("loss", "lm_loss", "train_loss"), tokens_per_iteration)
    valid = read_metrics(run.get("valid_metrics"), ("valid_loss", "loss", "lm_loss"), tokens_per_iteration)
    return train, valid


def loss_inputs(run: dict) -> list | None:
    """What a run's loss curves depend on (file stats, not contents); None when there is no loss file."""
    stats = [(str(run.get(key)), _stat_key(run[key])) for key in ("train_metrics", "valid_metrics") if run.get(key)]
    if not any(key is not None for _, key in stats):
        return None
    return [run["run_id"], run.get("dataset"), _tokens_per_iteration(run), stats]


def draw_losses(run: dict, path: Path) -> None:
    plt = _pyplot()
    train, valid = run_losses(run)
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


def draw_losses_at_scale(runs: list[dict], title: str, colours: dict[str, str], path: Path) -> None:
    """Training (thin, solid) and validation (markers) loss of every run of one scale and budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        train, valid = run_losses(run)
        colour = colours.get(str(run.get("dataset")), "black")
        label = str(run.get("dataset") or run["run_id"])
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


def scale_groups(manifest: dict) -> dict[tuple[str, str], list[dict]]:
    """Runs by (scale, budget), in manifest order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in manifest["runs"]:
        groups.setdefault((str(run.get("scale")), str(run.get("budget"))), []).append(run)
    return groups


def draw_plots(table: pd.DataFrame, manifest: dict, protocol: list[dict], plots: PlotCache) -> dict[str, list[Path]]:
    """Every plot of the report, by HTML section; a plot without data is left out."""
    colours = dataset_colours([run.get("dataset") for run in manifest["runs"]])
    curves = table[table["source"].isin(["ours", "reference"])]
    averages = table[table["task"] == AVG_TASK]
    curve_rows = {run_id: rows for run_id, rows in curves.groupby("run_id", sort=False)}
    sections: dict[str, list[Path]] = {"overview": [], "losses": [], "runs": []}

    for (scale, budget), runs in scale_groups(manifest).items():
        title = f"{scale}, {budget} tokens"
        run_ids = [run["run_id"] for run in runs]
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

    for run in manifest["runs"]:
        run_id = run["run_id"]
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


def render_html(manifest: dict, final: pd.DataFrame, missing: pd.DataFrame, plots: dict[str, list[Path]],
                overview: pd.DataFrame) -> str:  # fmt: skip
    protocol_frame = pd.DataFrame(normalise_protocol(manifest["protocol"]))
    missing_by_checkpoint = (
        missing.groupby(["run_id", "iteration"], sort=True)
        .agg(missing_tasks=("task", lambda t: ", ".join(t)), blocks_average=("in_average", "any"))
        .reset_index()
        if not missing.empty
        else missing
    )
    per_run = []
    for run in manifest["runs"]:
        names = {f"scores_{safe_name(run['run_id'])}.png", f"loss_{safe_name(run['run_id'])}.png"}
        images = [_image_html(p) for p in plots.get("runs", []) if p.name in names]
        if images:
            per_run.append(
                f"<details class='run'><summary>{html.escape(run['run_id'])}</summary>{''.join(images)}</details>"
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

    Returns ``{"files": [written paths], "n_results": rows, "n_missing": cells, "cache": {...}}``
    (``cache``: eval files parsed/reused, plots drawn/reused).
    """
    validate_manifest(manifest)
    protocol = normalise_protocol(manifest["protocol"])
    out_dir = Path(out_dir)
    cache_dir = out_dir / CACHE_DIR_NAME
    cache_dir.mkdir(parents=True, exist_ok=True)
    reference = ReferenceData(reference_dir, cache_dir)
    eval_files = EvalFileCache(cache_dir / "eval_files.parquet")

    ours: list[dict] = []
    files_found: dict[str, int] = {}
    for run in manifest["runs"]:
        run_rows, files_found[run["run_id"]] = our_rows(run, protocol, eval_files)
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
                key: run.get(key)
                for key in ("run_id", "dataset", "scale", "budget", "params", "train_iters", "reference_run")
            }
            | {
                "checkpoints_scheduled": len(run["checkpoint_iters"]),
                "eval_files_found": files_found[run["run_id"]],
                "eval_files_expected": len(run["eval_files"]),
            }
            for run in manifest["runs"]
        ]
    )

    log = training_log(manifest)
    overview = overview.merge(training_summary(manifest, log), on="run_id", how="left")
    written = [
        _write_frame(log, out_dir / "training.csv"),
        _write_frame(table, out_dir / "results.csv"),
        _write_frame(table, out_dir / "results.parquet"),
        _write_frame(missing, out_dir / "missing.csv"),
        _write_frame(final, out_dir / "final_scores.csv"),
    ]
    plot_cache = PlotCache(cache_dir / "plots", out_dir / "plots")
    plots = draw_plots(table, manifest, protocol, plot_cache)
    written.extend(path for section in plots.values() for path in section)
    written.append(_write_text_atomic(out_dir / "index.html", render_html(manifest, final, missing, plots, overview)))
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
