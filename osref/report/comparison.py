"""The report's answer to "is my dataset better at equal compute?": the comparison table.

Why here and not in :mod:`osref.compare`: compare.py holds the statistics (intervals, the noise
floor, verdicts, scaling fits, decision accuracy) as pure functions of tables; this module picks
*which* pairs the report compares and lays the rows out as ``comparison.csv`` and the first table
of ``index.html``. No statistic is computed here that compare.py does not define.

Pairs, per (scale, budget) of the manifest's runs, at equal tokens (within
:data:`osref.compare.TOKENS_TOLERANCE`), the last checkpoint of the run that has a match:

* ``versus_source = "reference"``: the published reference run of that dataset, scale and budget
  (only at the release's scales: 0.13b … 1.7b), every dataset of ``manifest.references``;
* ``versus_source = "ours"``: every other run of ours at the same scale and budget (both
  directions, so each run's rows name it in ``run_id``): the demo-scale case, a user dataset next
  to locally trained C4/… runs;
* ``versus_source = "released"``: the released checkpoints re-evaluated by us (issue 14), same
  scale and budget;
* ``comparison = "equal FLOPs"`` rows: a final run of ours against each reference dataset's fit
  a + b·log10(C) at the run's compute (:func:`osref.compare.compare_equal_flops`).

Columns of ``comparison.csv`` (:data:`COMPARISON_COLUMNS`): ``run_id``, ``dataset``, ``versus``
(the other run id, or the reference run id, or ``"<dataset> fit"``), ``versus_source``
(ours|reference|released), ``versus_dataset``, ``comparison`` (equal tokens|equal FLOPs),
``scale``, ``budget``, ``iteration``, ``versus_iteration``, ``tokens_seen``, ``task`` (``"avg"``
for the average over the protocol's in-average tasks), ``score``, ``score_ci_low``,
``score_ci_high``, ``versus_score``, ``versus_ci_low``, ``versus_ci_high``, ``diff``
(score − versus_score), ``diff_ci_low``, ``diff_ci_high`` (95 % item intervals,
:func:`osref.compare.compare_pair`), ``noise_floor`` (run-to-run floor of a difference from the
release's repeated runs, 0 where the release has none for the task), ``noise`` (the verdict's
yardstick: floor and the item noise beyond a full protocol evaluation), ``noise_source``,
``verdict`` (better|worse|within noise|no estimate|outside the references' compute range; for a
perplexity, lower is better: :data:`LOWER_IS_BETTER`),
``decision_accuracy`` (how often a ranking at this scale held at 1.7b, ``agree/pairs`` over the
release's 28 dataset pairs; "(target scale)" at 1.7b; "" at scales the release does not have).

Where the task is not one of the release's (the demo's local tasks), there is no run-to-run floor:
the verdict then uses the item noise of both scores alone (``noise_source = "item noise only"``),
which is a lower bound of the real noise: such a verdict says "the items separate them", not
"another seed would too".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from osref import compare as stats
from osref.contracts import ReportManifest
from osref.reference import ReferenceData
from osref.report.tables import AVG_TASK

COMPARISON_COLUMNS = [
    "run_id", "dataset", "versus", "versus_source", "versus_dataset", "comparison", "scale", "budget", "iteration",
    "versus_iteration", "tokens_seen", "task", "score", "score_ci_low", "score_ci_high", "versus_score",
    "versus_ci_low", "versus_ci_high", "diff", "diff_ci_low", "diff_ci_high", "noise_floor", "noise", "noise_source",
    "verdict", "decision_accuracy",
]  # fmt: skip
MULTIPLIER_COLUMNS = [
    "dataset", "run_id", "scale", "flops", "score", "reference_dataset", "fit_a", "fit_b", "multiplier",
    "multiplier_lo", "multiplier_hi", "reference_flops_needed", "extrapolated",
]  # fmt: skip
EQUAL_TOKENS, EQUAL_FLOPS = "equal tokens", "equal FLOPs"
# metrics where a smaller value is the better one (lm-eval's perplexities, e.g. the demo's
# demo_lastword): the verdict reads the difference the other way round
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
FLOOR_SOURCE, ITEM_ONLY = "release repeats", "item noise only"


@dataclass
class ReportComparison:
    """What the report shows of the comparison (every field a table)."""

    rows: pd.DataFrame  # COMPARISON_COLUMNS
    multipliers: pd.DataFrame  # MULTIPLIER_COLUMNS
    floor: pd.DataFrame  # osref.compare.floor_table under the release's protocol (the comparison uses the manifest's)
    decision: pd.DataFrame  # osref.compare.decision_accuracy, likewise
    references: pd.DataFrame  # reference scores (tidy, with stderr) of the datasets shown
    reference_finals: pd.DataFrame  # final 300B scores of those datasets: dataset, scale, task, value, ci
    scores: pd.DataFrame  # scored rows for the plots: ours, released, the shown datasets' canonical runs
    published: pd.DataFrame  # the shown datasets' canonical runs, 11-task average of the release's protocol


def protocol_spec(protocol: list[dict]) -> pd.DataFrame:
    """The manifest's protocol as compare.py's ``spec`` frame (task, shots, metric, in_average)."""
    return pd.DataFrame(protocol, columns=["task", "shots", "metric", "in_average"])


def scored(table: pd.DataFrame, source: str, spec: pd.DataFrame) -> pd.DataFrame:
    """The ``source`` rows of the tidy table as compare.py's scores: item noise, averages with their
    propagated stderr (Σ se² / n²), ``final``; restricted to the manifest's protocol."""
    rows = table[table["source"] == source]
    if rows.empty:
        return pd.DataFrame()
    out = stats.user_scores(rows.assign(source="ours"), spec, where=f"{source} rows")
    return out.assign(source=source)


def reference_table(
    reference: ReferenceData, published: pd.DataFrame, spec: pd.DataFrame, datasets: tuple[str, ...] | None
) -> pd.DataFrame:
    """Published scores (``published``: :func:`osref.compare.reference_scores`) restricted to the
    manifest's protocol; ``avg`` re-computed over its in-average tasks (the 11-task average when the
    manifest has the 0.01 protocol)."""
    refs = published[published["task"] != AVG_TASK]
    keys = set(zip(spec["task"], spec["shots"].astype(int), spec["metric"], strict=False))
    refs = refs[[(t, int(s), m) in keys for t, s, m in zip(refs["task"], refs["shots"], refs["metric"], strict=False)]]
    in_average = list(spec.loc[spec["in_average"].astype(bool), "task"])
    refs = pd.concat([refs, stats.average_rows(refs, in_average)], ignore_index=True)
    if datasets is not None:
        unknown = sorted(set(datasets) - set(reference.runs["dataset"]))
        if unknown:
            raise ValueError(
                f"manifest references: unknown dataset(s) {unknown} (config/reference/runs.csv has "
                f"{sorted(set(reference.runs['dataset']))})"
            )
    return refs


def _floor_of(floor: stats.NoiseFloor, task: str, both_final: bool) -> tuple[float, str]:
    value = floor.final(task) if both_final else floor.intermediate(task)
    return (value, FLOOR_SOURCE) if value == value else (0.0, ITEM_ONLY)


def carry_table(decision: pd.DataFrame) -> dict[tuple[str, str], str]:
    """``(scale, task) -> "agree/pairs"`` of :func:`osref.compare.decision_accuracy`."""
    if decision.empty:
        return {}
    return {
        (str(scale), str(task)): f"{int(agree)}/{int(pairs)}"
        for scale, task, agree, pairs in zip(
            decision["scale"], decision["task"], decision["agree"], decision["pairs"], strict=False
        )
    }


def _carry(carry: dict[tuple[str, str], str], scale: str, task: str) -> str:
    return "(target scale)" if scale == stats.TARGET_SCALE else carry.get((scale, task), "")


@dataclass
class _Checkpoints:
    """One run's scored rows split by checkpoint (splitting once keeps a full grid's pairs fast)."""

    run_id: str
    scale: str
    budget: str
    tokens: dict[int, int]  # iteration -> tokens seen
    rows: dict[int, dict[str, dict]]  # iteration -> task -> row

    @classmethod
    def split(cls, frame: pd.DataFrame) -> dict[str, _Checkpoints]:
        runs: dict[str, _Checkpoints] = {}
        for row in frame.to_dict("records"):
            run = runs.get(row["run_id"])
            if run is None:
                run = runs[row["run_id"]] = cls(row["run_id"], str(row["scale"]), str(row["budget"]), {}, {})
            iteration = int(row["iteration"])
            run.tokens.setdefault(iteration, int(row["tokens_seen"]))
            run.rows.setdefault(iteration, {})[row["task"]] = row
        return runs


def _pair_rows(
    mine: _Checkpoints, other: _Checkpoints, versus_source: str, floor: stats.NoiseFloor, carry: dict
) -> list[dict]:
    """One run of ours against one other run (same scale and budget) at its last checkpoint with a
    checkpoint of the other at equal tokens; a row per task both have."""
    for iteration in sorted(mine.rows, reverse=True):
        tokens = mine.tokens[iteration]
        gap, nearest = min(((abs(t - tokens), i) for i, t in other.tokens.items()), default=(math.inf, None))
        if nearest is None or gap > stats.TOKENS_TOLERANCE * tokens:
            continue
        at, versus_at = mine.rows[iteration], other.rows[nearest]
        both_final = bool(next(iter(at.values()))["final"]) and bool(next(iter(versus_at.values()))["final"])
        records = []
        for task, o in at.items():
            r = versus_at.get(task)
            if r is None:
                continue
            noise_floor, source = _floor_of(floor, task, both_final)
            pair = stats.compare_pair(o["value"], o["stderr"], r["value"], r["stderr"], noise_floor,
                                      o["excess_se"], r["excess_se"])  # fmt: skip
            if o.get("metric") in LOWER_IS_BETTER:
                pair["verdict"] = stats.verdict(-pair["diff"], pair["noise_sd"])
            records.append(_row(o, r, task, versus_source, EQUAL_TOKENS, pair, noise_floor, source, carry))
        return records
    return []


def _row(o: dict, r: dict, task: str, versus_source: str, comparison: str, pair: dict, noise_floor: float,
         noise_source: str, carry: dict) -> dict:  # fmt: skip
    """One comparison row: ``o`` (ours) and ``r`` (the other) at one task, ``pair`` from compare_pair."""
    return {
        "run_id": o["run_id"], "dataset": o["dataset"], "versus": r["run_id"], "versus_source": versus_source,
        "versus_dataset": r["dataset"], "comparison": comparison, "scale": o["scale"], "budget": o["budget"],
        "iteration": int(o["iteration"]), "versus_iteration": int(r["iteration"]), "tokens_seen": int(o["tokens_seen"]),
        "task": task, "score": pair["ours"], "score_ci_low": pair["ours_lo"], "score_ci_high": pair["ours_hi"],
        "versus_score": pair["reference"], "versus_ci_low": pair["reference_lo"], "versus_ci_high": pair["reference_hi"],
        "diff": pair["diff"], "diff_ci_low": pair["diff_lo"], "diff_ci_high": pair["diff_hi"],
        "noise_floor": noise_floor, "noise": pair["noise_sd"], "noise_source": noise_source,
        "verdict": pair["verdict"], "decision_accuracy": _carry(carry, str(o["scale"]), task),
    }  # fmt: skip


def equal_token_rows(
    ours: pd.DataFrame, others: dict[str, pd.DataFrame], floor: stats.NoiseFloor, decision: pd.DataFrame
) -> list[dict]:
    """Every run of ours against every run of ``others`` (by source) of the same scale and budget."""
    records: list[dict] = []
    carry = carry_table(decision)
    if ours.empty:
        return records
    splits = {source: _Checkpoints.split(frame) for source, frame in others.items() if not frame.empty}
    for run_id, mine in _Checkpoints.split(ours).items():
        for source, runs in splits.items():
            for other_id in sorted(runs):
                other = runs[other_id]
                if (other.scale, other.budget) != (mine.scale, mine.budget) or (
                    source == "ours" and other_id == run_id
                ):
                    continue
                records.extend(_pair_rows(mine, other, source, floor, carry))
    return records


def equal_flops_rows(ours: pd.DataFrame, fits: dict, floor: stats.NoiseFloor) -> list[dict]:
    """compare.py's equal-FLOPs comparison in the table's columns."""
    if ours.empty or not fits:
        return []
    frame = stats.compare_equal_flops(ours, fits, floor)
    records = []
    for row in frame.itertuples(index=False):
        noise_floor = floor.run_sd.get(row.task, math.nan)
        records.append({
            "run_id": row.run_id, "dataset": row.dataset, "versus": f"{row.reference_dataset} fit",
            "versus_source": "reference", "versus_dataset": row.reference_dataset, "comparison": EQUAL_FLOPS,
            "scale": row.scale, "budget": row.budget, "task": row.task, "score": row.ours,
            "score_ci_low": row.ours_lo, "score_ci_high": row.ours_hi, "versus_score": row.reference,
            "versus_ci_low": row.reference_lo, "versus_ci_high": row.reference_hi, "diff": row.diff,
            "diff_ci_low": row.diff_lo, "diff_ci_high": row.diff_hi, "noise_floor": noise_floor,
            "noise": row.noise_sd, "noise_source": FLOOR_SOURCE + " + fit", "verdict": row.verdict,
            "decision_accuracy": "",
        })  # fmt: skip
    return records


def build_comparison(table: pd.DataFrame, manifest: ReportManifest, protocol: list[dict],
                     reference: ReferenceData) -> ReportComparison:  # fmt: skip
    """The comparison table, compute multipliers, noise floor and decision accuracy of the report."""
    spec = protocol_spec(protocol)
    release = stats.reference_scores(reference)  # the release's own protocol: the published numbers as published
    refs_all = reference_table(reference, release, spec, manifest.references)
    floor = stats.estimate_noise_floor(refs_all, reference.runs)
    finals_all = stats.final_scores(refs_all)
    decision = stats.decision_accuracy(finals_all) if not finals_all.empty else pd.DataFrame()
    shown = manifest.references
    refs = refs_all if shown is None else refs_all[refs_all["dataset"].isin(shown)]
    ours = scored(table, "ours", spec)
    released = scored(table, "released", spec)
    canonical = refs[refs["reference"].astype(bool)].assign(source="reference")
    records = equal_token_rows(ours, {"reference": canonical, "ours": ours, "released": released}, floor, decision)
    tasks = [*spec.loc[spec["in_average"].astype(bool), "task"], AVG_TASK]
    fits = stats.reference_fits(stats.final_scores(refs), floor, tasks)
    records += equal_flops_rows(ours, fits, floor)
    rows = pd.DataFrame.from_records(records, columns=COMPARISON_COLUMNS)
    if not rows.empty:
        order = {task: i for i, task in enumerate([AVG_TASK, *spec["task"]])}
        source_order = {"reference": 0, "released": 1, "ours": 2}
        rows = rows.assign(_t=rows["task"].map(order), _s=rows["versus_source"].map(source_order))
        rows = rows.sort_values(["run_id", "comparison", "_t", "_s", "versus"], kind="mergesort")
        rows = rows.drop(columns=["_t", "_s"]).reset_index(drop=True)
    multipliers = pd.DataFrame(columns=MULTIPLIER_COLUMNS)
    if not ours.empty and fits:
        finals = ours[ours["final"]]
        scales = finals.groupby("dataset")["scale"].nunique()
        several = finals[finals["dataset"].isin(scales[scales >= 2].index)]
        found = stats.compute_multipliers(several, fits, floor)
        if not found.empty:
            multipliers = found[MULTIPLIER_COLUMNS]
    release_all = release
    if shown is not None:
        release = release[release["dataset"].isin(shown)]
    reference_finals = stats.final_scores(release)
    reference_finals = reference_finals.assign(
        ci_low=reference_finals["value"] - stats.Z95 * reference_finals["stderr"],
        ci_high=reference_finals["value"] + stats.Z95 * reference_finals["stderr"],
    )[["dataset", "scale", "task", "value", "stderr", "ci_low", "ci_high"]]
    # the References section shows the release's facts under its own protocol, whatever the manifest's
    if len(refs_all) != len(release_all) or set(refs_all["task"]) != set(release_all["task"]):
        floor = stats.estimate_noise_floor(release_all, reference.runs)
        decision = stats.decision_accuracy(stats.final_scores(release_all))
    return ReportComparison(
        rows=rows, multipliers=multipliers, floor=stats.floor_table(floor) if floor.run_sd else pd.DataFrame(),
        decision=decision, references=refs, reference_finals=reference_finals.reset_index(drop=True),
        published=release[release["reference"].astype(bool) & (release["task"] == AVG_TASK)].assign(source="reference"),
        scores=pd.concat([frame for frame in (ours, released, canonical) if not frame.empty], ignore_index=True)
        if not (ours.empty and released.empty and canonical.empty) else pd.DataFrame(),
    )  # fmt: skip


def interval_text(value: float, low: float, high: float, digits: int = 3) -> str:
    """``0.512 ± 0.014`` for a symmetric interval, ``0.512 [0.49, 0.53]`` otherwise; "–" for none."""
    if value is None or not np.isfinite(value):
        return "–"
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.{digits}f}"
    half = (high - low) / 2
    if abs((value - low) - (high - value)) < 10 ** -(digits + 1):
        return f"{value:.{digits}f} ± {half:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
