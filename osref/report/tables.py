"""The report's tables: parsed evaluation files, published rows, averages, missing cells, final scores.

One tidy long table (:data:`RESULT_COLUMNS`) feeds every plot and table of the report; see
:mod:`osref.report` for what its rows are and how the build is cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from osref.contracts import AVG_TASK, ProtocolTask, ReportManifest, ReportRun, parse_protocol
from osref.files import stat_key, write_frame_atomic
from osref.reference import ReferenceData

log = logging.getLogger(__name__)

# cached tables (the published rows) are keyed on this module's code too
TABLES_CODE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

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


def content_digest(*parts: Any) -> str:
    """A digest of cache inputs: data frames by content, anything else by its JSON text."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, pd.DataFrame):
            digest.update(",".join(map(str, part.columns)).encode())
            digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def normalise_protocol(protocol: list[dict] | tuple[ProtocolTask, ...]) -> list[dict]:
    """The protocol as plain rows (``task``, ``shots``, ``metric``, ``in_average`` filled), checked
    as the manifest's (:func:`osref.contracts.parse_protocol`)."""
    tasks = protocol if protocol and isinstance(protocol[0], ProtocolTask) else parse_protocol(protocol)
    return [{**spec.to_json(), "in_average": spec.counts_in_average} for spec in tasks]


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


def _run_fields(run: ReportRun) -> dict:
    return {"run_id": run.run_id, "dataset": run.dataset, "scale": run.scale, "budget": run.budget} | {
        "reference_run": run.reference_run
    }


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
        key = stat_key(path)
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
        write_frame_atomic(frame, self.cache_file)


def our_rows(run: ReportRun, protocol: list[dict], eval_files: EvalFileCache) -> tuple[list[dict], int]:
    """Rows of one run's evaluation JSONs that exist (absent files are simply not there yet)."""
    by_task = {spec["task"]: spec for spec in protocol}
    rows: list[dict] = []
    seen: dict[tuple[int, str], str] = {}
    found = 0
    for path in run.eval_files:
        payload = eval_files.payload(path)
        if payload is None:
            continue
        found += 1
        if payload["run_id"] != run.run_id:
            raise ValueError(f"{path}: run_id {payload['run_id']!r} but the manifest lists it under {run.run_id!r}")
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
                    "flops": _flops(run.params, payload["tokens_seen"]),
                    "task": task,
                    "shots": int(payload["num_fewshot"]),
                    "metric": score.get("metric"),
                    "value": score.get("value"),
                    "stderr": score.get("stderr"),
                }
            )
    return rows, found


def reference_rows(run: ReportRun, protocol: list[dict], reference: ReferenceData, index: int) -> pd.DataFrame:
    """The published curve of the run's reference_run, restricted to the protocol's (task, shots, metric)."""
    assert run.reference_run is not None  # the caller skips runs without one
    ref_run = reference.resolve_run(run.reference_run, f"manifest runs[{index}] ({run.run_id})")
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


def published_rows(
    manifest: ReportManifest, protocol: list[dict], reference: ReferenceData, cache_dir: Path
) -> pd.DataFrame:
    """Reference curves of every run plus the baselines (only when some run has a reference curve).

    They depend only on the manifest's run fields, the protocol and the reference files, so they
    are cached as one parquet file under a digest of those.
    """
    reference_files = sorted(reference.reference_dir.glob("*.csv*"))
    key = content_digest(
        TABLES_CODE_DIGEST,
        [[_run_fields(run), run.reference_run] for run in manifest.runs],
        protocol,
        [(path.name, stat_key(path)) for path in reference_files],
    )[:20]
    cached = cache_dir / f"published_rows_{key}.parquet"
    if cached.is_file():
        try:
            return pd.read_parquet(cached)
        except Exception as error:  # noqa: BLE001 (a damaged cache only costs a cold build)
            log.warning("ignoring unreadable cache %s (%s)", cached, error)
    parts = [
        reference_rows(run, protocol, reference, index)
        for index, run in enumerate(manifest.runs)
        if run.reference_run not in (None, "")
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
    write_frame_atomic(published, cached)
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
    manifest: ReportManifest, protocol: list[dict], ours: pd.DataFrame, files_found: dict[str, int]
) -> pd.DataFrame:
    """Every (run, scheduled checkpoint, protocol task) with no value of ours."""
    present = set()
    if not ours.empty:
        valued = ours[ours["value"].notna()]
        present = set(zip(valued["run_id"], valued["iteration"].astype(int), valued["task"], strict=False))
    missing = []
    for run in manifest.runs:
        for iteration in sorted(int(i) for i in run.checkpoint_iters):
            for spec in protocol:
                if (run.run_id, iteration, spec["task"]) not in present:
                    missing.append(
                        {
                            "run_id": run.run_id,
                            "iteration": iteration,
                            "task": spec["task"],
                            "shots": spec["shots"],
                            "metric": spec["metric"],
                            "in_average": spec["in_average"],
                            "eval_files_found": files_found.get(run.run_id, 0),
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


def final_scores(table: pd.DataFrame, manifest: ReportManifest, protocol: list[dict]) -> pd.DataFrame:
    """Per run and task: our last evaluated checkpoint vs the reference run's last checkpoint."""
    records = []
    tasks = [spec["task"] for spec in protocol] + [AVG_TASK]
    last_iteration, last_values = _last_checkpoints(table[table["source"].isin(["ours", "reference"])])
    for run in manifest.runs:
        our_iteration = last_iteration.get(("ours", run.run_id))
        ref_iteration = last_iteration.get(("reference", run.run_id))
        our_values = last_values.get(("ours", run.run_id), {})
        ref_values = last_values.get(("reference", run.run_id), {})
        for task in tasks:
            our_value, ref_value = our_values.get(task), ref_values.get(task)
            records.append(
                {
                    "run_id": run.run_id,
                    "task": task,
                    "ours_iteration": our_iteration,
                    "ours_is_final": our_iteration is not None and our_iteration == run.train_iters,
                    "ours": our_value,
                    "reference_run": run.reference_run,
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


def training_log(manifest: ReportManifest) -> pd.DataFrame:
    """Every run's training metrics (loss, lr, grad norm, throughput per logged iteration) in one table."""
    frames = []
    for run in manifest.runs:
        path = run.train_metrics
        if not path or not Path(path).is_file():
            continue
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        frame = pd.DataFrame(records).reindex(columns=TRAINING_COLUMNS[1:])
        frame.insert(0, "run_id", run.run_id)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TRAINING_COLUMNS)


def training_summary(manifest: ReportManifest, log: pd.DataFrame) -> pd.DataFrame:
    """Per run: where training stands, its recent loss, last validation loss, peak LR, throughput."""
    rows = []
    for run in manifest.runs:
        own = log[log["run_id"] == run.run_id]
        valid = read_metrics(run.valid_metrics, ("valid_loss", "loss"), run.tokens_per_iteration)
        rows.append(
            {
                "run_id": run.run_id,
                "trained_iterations": int(own["iteration"].max()) if not own.empty else 0,
                "train_loss_last5": float(own["loss"].tail(5).mean()) if not own.empty else None,
                "valid_loss": float(valid["loss"].iloc[-1]) if not valid.empty else None,
                "peak_lr": float(own["lr"].max()) if not own.empty else None,
                "median_tokens_per_s": float(own["tokens_per_s"].median()) if not own.empty else None,
            }
        )
    columns = ["run_id", "trained_iterations", "train_loss_last5", "valid_loss", "peak_lr", "median_tokens_per_s"]
    return pd.DataFrame(rows, columns=columns)  # no run of ours (released models only): no rows, same columns
