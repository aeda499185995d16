"""Released checkpoints' evaluations: tidy rows for the report, and the protocol-reproduction table.

Two uses of re-evaluating the released models with our evaluation stage:

* their curves, next to our own runs' (``released_rows``: the columns of the report's
  ``results.csv``, ``source = "released"``, ``run_id`` = the released model's name, e.g.
  ``0.13b-dclm-300B-4096``, so a run of ours with that id lines up with it);
* a check of our evaluation protocol: the same checkpoint, evaluated by us and by the authors
  (``config/reference/curves.csv.gz``), should agree. ``protocol_reproduction`` puts the two
  values of every (run, iteration, task) next to each other, with their difference and whether it
  lies within the combined standard error.

The published values come without a standard error. For the protocol's accuracies (a mean of 0/1
scores over n items) lm-eval's stderr is ``sqrt(p (1 - p) / (n - 1))``; the published value's is
estimated the same way with our item count n (the same task, so the same n), or, where n is not
known, by scaling ours: ``se_o * sqrt(p_pub (1 - p_pub) / (p_o (1 - p_o)))``. The combined stderr is
``sqrt(se_ours² + se_pub²)``; a cell is ``within`` when ``|ours - published| <= z * combined``
(``z = 1`` by default: "within the combined standard error"). Since both evaluations score the same
items, a difference is not sampling noise but a protocol difference (prompt, shots, harness
version, numerics); the stderr is the yardstick of what a difference means for a comparison.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from osref.files import write_frame_atomic
from osref.reference import ReferenceData
from osref.report.tables import AVG_TASK, RESULT_COLUMNS, load_eval_json, normalise_protocol, tidy_table

REPRODUCTION_COLUMNS = [
    "run_id", "reference_run", "iteration", "task", "shots", "metric", "value", "stderr", "n", "published",
    "published_stderr", "difference", "combined_stderr", "z", "within",
]  # fmt: skip
BINARY_METRICS = ("acc", "acc_norm")


def _records(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (model, iteration, task, shots) of the evaluation files that exist, with n."""
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, int, str, int], str] = {}
    for model in manifest["models"]:
        for path in model["eval_files"]:
            if not Path(path).is_file():
                continue
            payload = load_eval_json(Path(path))
            if payload["run_id"] != model["run_id"]:
                raise ValueError(f"{path}: run_id {payload['run_id']!r}, expected {model['run_id']!r}")
            for task, score in payload["tasks"].items():
                key = (model["name"], int(payload["iteration"]), task, int(payload["num_fewshot"]))
                if key in seen:
                    raise ValueError(f"{path}: {task!r} {key[3]}-shot at iteration {key[1]} is also in {seen[key]}")
                seen[key] = path
                records.append(
                    {
                        "source": "released",
                        "run_id": model["name"],
                        "reference_run": model.get("reference_run"),
                        "dataset": model.get("dataset"),
                        "scale": model.get("scale"),
                        "budget": model.get("budget"),
                        "iteration": int(payload["iteration"]),
                        "tokens_seen": int(payload["tokens_seen"]),
                        "flops": 6.0 * float(model["params"]) * float(payload["tokens_seen"])
                        if model.get("params")
                        else math.nan,
                        "task": task,
                        "shots": int(payload["num_fewshot"]),
                        "metric": score.get("metric"),
                        "value": score.get("value"),
                        "stderr": score.get("stderr"),
                        "n": score.get("n_samples"),
                    }
                )
    return records


def released_rows(manifest: dict[str, Any]) -> pd.DataFrame:
    """Tidy rows (the report's ``results.csv`` columns, ``source = "released"``) of the released
    evaluations that exist, plus ``avg`` rows where every in-average protocol task is present.

    ``manifest``: ``{"protocol": [...], "models": [{"name", "run_id", "reference_run", "dataset",
    "scale", "budget", "params", "eval_files": [...]}, ...]}`` (``osref.workflow.WorkflowIndex.released_manifest``).
    """

    protocol = normalise_protocol(manifest["protocol"])
    frame = pd.DataFrame(_records(manifest), columns=[*RESULT_COLUMNS, "n"])[RESULT_COLUMNS]
    in_protocol = pd.Series(
        list(zip(frame["task"], frame["shots"], strict=False)), index=frame.index, dtype=object
    ).isin({(t["task"], t["shots"]) for t in protocol})
    # averages over the protocol's cells only: an extra task may repeat a protocol task at other shots
    parts = [tidy_table([frame[in_protocol]], protocol)]
    if (~in_protocol).any():
        parts.append(tidy_table([frame[~in_protocol]], []))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def published_values(reference: ReferenceData, reference_runs: list[str]) -> pd.DataFrame:
    """(reference_run, iteration, task, shots, metric, published) from curves.csv.gz for those runs."""
    curves = reference.curves
    curves = curves[curves["run_id"].isin(set(reference_runs))]
    return pd.DataFrame(
        {
            "reference_run": curves["run_id"].astype(object),
            "iteration": curves["iteration"].astype("int64"),
            "task": curves["task"].astype(object),
            "shots": curves["num_fewshot"].astype("int64"),
            "metric": curves["metric"].astype(object),
            "published": curves["value"].astype("float64"),
        }
    )


def _published_stderr(p_pub: float, p_ours: float, se_ours: float, n: float, metric: str) -> float:
    if metric not in BINARY_METRICS or not 0 <= p_pub <= 1:
        return math.nan
    if n == n and n > 1:  # n is not NaN
        return math.sqrt(p_pub * (1 - p_pub) / (n - 1))
    if se_ours == se_ours and 0 < p_ours < 1:
        return se_ours * math.sqrt(p_pub * (1 - p_pub) / (p_ours * (1 - p_ours)))
    return math.nan


def protocol_reproduction(ours: pd.DataFrame, published: pd.DataFrame, z: float = 1.0) -> pd.DataFrame:
    """Our re-evaluation of released checkpoints next to the published values (see the module docstring).

    ``ours``: run_id, reference_run, iteration, task, shots, metric, value, stderr and optionally n
    (items scored); ``published``: reference_run, iteration, task, shots, metric, published. Only
    (run, iteration, task) cells with both values, the same shot count and the same metric appear;
    ``avg`` rows are left out (their stderr is not a binomial one). Pure: no files, no network.
    """
    if "n" not in ours.columns:
        ours = ours.assign(n=math.nan)
    ours = ours[(ours["task"] != AVG_TASK) & ours["reference_run"].notna() & ours["value"].notna()]
    keys = ["reference_run", "iteration", "task", "shots", "metric"]
    left = ours[["run_id", *keys, "value", "stderr", "n"]].astype({"iteration": "int64", "shots": "int64"})
    cells = left.merge(published[[*keys, "published"]], on=keys, how="inner")
    if cells.empty:
        return pd.DataFrame(columns=REPRODUCTION_COLUMNS)
    values = cells["value"].astype("float64")
    stderr = pd.to_numeric(cells["stderr"], errors="coerce").astype("float64")
    n = pd.to_numeric(cells["n"], errors="coerce").astype("float64")
    cells["published_stderr"] = [
        _published_stderr(p, o, s, k, m)
        for p, o, s, k, m in zip(cells["published"], values, stderr, n, cells["metric"], strict=False)
    ]
    cells["difference"] = values - cells["published"]
    cells["combined_stderr"] = (stderr**2 + cells["published_stderr"] ** 2) ** 0.5
    cells["z"] = cells["difference"] / cells["combined_stderr"].where(cells["combined_stderr"] > 0)
    known = cells["combined_stderr"].notna()
    within = cells["difference"].abs() <= z * cells["combined_stderr"]
    cells["within"] = within.astype(object).where(known, None)
    cells["n"] = n.astype("Int64")
    return (
        cells[REPRODUCTION_COLUMNS]
        .sort_values(["run_id", "iteration", "shots", "task"], kind="mergesort")
        .reset_index(drop=True)
    )


def write_results(manifest: dict[str, Any], reference_dir: Path, out_dir: Path) -> dict[str, Path]:
    """``results.csv`` (tidy released rows) and ``reproduction.csv`` under ``out_dir``, atomically."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = pd.DataFrame(_records(manifest), columns=[*RESULT_COLUMNS, "n"])
    reference_runs = sorted({m["reference_run"] for m in manifest["models"] if m.get("reference_run")})
    published = (
        published_values(ReferenceData(reference_dir), reference_runs)
        if reference_runs
        else pd.DataFrame(columns=["reference_run", "iteration", "task", "shots", "metric", "published"])
    )
    reproduction = protocol_reproduction(records, published)
    return {
        "results": write_frame_atomic(released_rows(manifest), out_dir / "results.csv"),
        "reproduction": write_frame_atomic(reproduction, out_dir / "reproduction.csv"),
    }
