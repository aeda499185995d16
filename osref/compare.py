"""Is a dataset better than the open-sci-ref references at equal compute? Scores with error bars.

The report's tidy table (``results.csv``: source, run_id, dataset, scale, budget, iteration,
tokens_seen, flops, task, shots, metric, value, stderr) holds the user's scores; the published
scores of every reference run are read from ``config/reference`` here (all 8 datasets, whatever
the user's grid schedules). Everything below is a pure function of those tables; no plotting.

**A score's interval (item sampling).** lm-eval's per-task ``stderr`` is the standard error of a
mean over the task's items, sqrt(p(1-p)/(n-1)) for an accuracy. The release publishes no stderr,
so a reference score gets exactly that formula with ``n`` = the task's item count under the
protocol (:data:`PROTOCOL_ITEMS`). The 11-task average is a plain mean, and with the tasks taken
as independent, Var(avg) = Σ se_i² / n² (n = 11). Caveat: the tasks are not independent (one
model answers all of them, and arc_easy/arc_challenge, hellaswag/piqa share skills), so this is
the interval of the item sampling only, not of the model. 95 % intervals are ±1.96 se.

**A difference's interval.** diff = ours − reference; its item interval uses
se = sqrt(se_ours² + se_ref²), the unpaired form. Both models answered the same items, so the
paired error would be smaller, but the release has no per-item outputs: this interval is an
upper bound for "would it hold on other items of the same kind".

**The noise floor.** Two training runs that differ only in seed-like details, scored on the same
items, still differ. The release contains such repeats (:func:`repeat_groups`: runs at 300B of
the same size, dataset and context that differ only in peak LR 4e-3/6e-3, warm-up or a few
percent of batch size, e.g. the ``-lr0.006-2`` and ``-warmup25000`` releases of 0.13B/0.4B C4
and DCLM, and the 1.3B C4 warm-up sweep). Their pooled within-group variance of the final score
is the run-to-run variance σ_run² (pooled over groups, n−1 per group); the noise floor of a
difference of two runs is sqrt(2)·σ_run. It contains training noise, re-evaluation noise and
the part of item noise that does not cancel between two models on the same items. Scores of
intermediate checkpoints (constant LR) also wiggle from one checkpoint to the next; that wiggle
is estimated from second differences of each reference curve late in its stable phase
(0.5·T up to the cool-down start; for white noise around a locally straight curve
Var(Δ²y) = 6σ²), and the floor of a comparison that involves a non-final checkpoint is
max(sqrt(2)·σ_run, sqrt(2)·σ_wiggle).

**The verdict.** "better" when diff > 1.96·noise, "worse" when diff < −1.96·noise, else "within
noise", with noise = sqrt(floor² + excess_ours² + excess_ref²). The floor already holds the item
noise of a full protocol evaluation; ``excess`` is the item noise a run has beyond that because
it was scored on fewer items (lm-eval ``--limit``): sqrt(max(0, se² − se_full²)), se_full being
the binomial stderr at the protocol's item count. The item interval of the difference is shown
next to it.

**Equal compute across scales.** Per dataset, the final scores at 300B of the 4 scales are fitted
with avg = a + b·log10(C), C = 6·N·D (N from the model spec, as in results.csv). Four points
spanning 1.1 decades of compute support two parameters; a saturating form (a − b·C^−α) has three
and is not determined by them. The points' noise is the larger of σ_run² and the fit's residual
variance, so misfit counts as noise. The reference's value at the user's compute is the fit's
prediction (with its standard error); the **compute multiplier** is C_ref(y_user) / C_user,
C_ref(y) = 10^((y − a)/b): how much more compute the reference needs to match the user's score
at the user's largest run. Its interval is a parametric bootstrap (2000 draws, fixed seed): the
reference points redrawn around the fit with the points' noise, the user's score with σ_run and
its excess item noise, the fit repeated. A multiplier outside the fitted compute range is an
extrapolation and flagged.

**How far a small-scale verdict carries.** For each smaller scale, the fraction of dataset pairs
whose order at that scale agrees with the order at 1.7B (published 300B final scores; 8 datasets,
28 pairs), for the average and per task (:func:`decision_accuracy`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from osref.config import ConfigError, budget_tokens
from osref.contracts import AVG_TASK
from osref.reference import ReferenceData

Z95 = 1.959963984540054
TARGET_SCALE = "1.7b"
REFERENCE_BUDGET = "300B"
BETTER, WORSE, WITHIN = "better", "worse", "within noise"
OUT_OF_RANGE = "outside the references' compute range"
# Items scored per task under the 0.01 protocol with lm-eval 0.4.13 (the evaluated split; mmlu:
# its 57 test subjects together). Used for the binomial stderr of published scores.
PROTOCOL_ITEMS = {
    "copa": 100, "lambada_openai": 5153, "openbookqa": 500, "winogrande": 1267, "social_iqa": 1954,
    "mmlu": 14042, "commonsense_qa": 1221, "piqa": 1838, "hellaswag": 10042, "arc_easy": 2376,
    "arc_challenge": 1172, "boolq": 3270,
}  # fmt: skip
# Published runs whose scores are not what their label says (config/reference/README.md, caveats):
# kept out of the noise floor and the scaling fits.
SUSPECT_JOBS = {11796685: "its curve is ~bit-identical to 1.7b C4 (job 11844147): most likely the 1.7b checkpoints"}
TOKENS_TOLERANCE = 0.02  # two checkpoints are at "equal tokens" within 2 %
KEY = ["source", "run_id", "iteration"]


# ---- scores with standard errors ---------------------------------------------------------------


def binomial_stderr(p: float | np.ndarray, n: int | np.ndarray) -> float | np.ndarray:
    """lm-eval's stderr of an accuracy over n items: sample sd / sqrt(n) = sqrt(p(1-p)/(n-1))."""
    p, n = np.asarray(p, dtype="float64"), np.asarray(n, dtype="float64")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sqrt(p * (1 - p) / (n - 1))
    return out if out.ndim else float(out)


def protocol_tasks(reference: ReferenceData) -> pd.DataFrame:
    """The 0.01 protocol as the reference data records it: task, shots, metric, in_average."""
    curves = reference.curves
    spec = curves[["task", "num_fewshot", "metric", "in_avg11"]].drop_duplicates()
    spec = spec.rename(columns={"num_fewshot": "shots", "in_avg11": "in_average"})
    if spec["task"].duplicated().any():
        raise ValueError(f"{reference.reference_dir / 'curves.csv.gz'}: a task appears with two shot counts or metrics")
    order = {task: i for i, task in enumerate(PROTOCOL_ITEMS)}
    return spec.sort_values("task", key=lambda s: s.map(order)).reset_index(drop=True)


def with_item_noise(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``stderr`` filled (binomial at the protocol's item count where lm-eval gave
    none) and ``excess_se``: the item noise beyond a full protocol evaluation (0 for a full one)."""
    rows = rows.copy()
    items = rows["task"].map(PROTOCOL_ITEMS).astype("float64")
    value = pd.to_numeric(rows["value"], errors="coerce").astype("float64")
    full = pd.Series(binomial_stderr(value.to_numpy(), items.to_numpy()), index=rows.index)
    stderr = pd.to_numeric(rows["stderr"], errors="coerce").astype("float64")
    rows["stderr"] = stderr.fillna(full)
    rows["excess_se"] = np.sqrt(np.clip(rows["stderr"] ** 2 - full.fillna(0.0) ** 2, 0.0, None))
    return rows


def average_rows(rows: pd.DataFrame, tasks: Iterable[str]) -> pd.DataFrame:
    """``task == "avg"`` rows with their stderr (Σ se² / n², tasks independent) for every checkpoint
    that has all ``tasks``; a checkpoint missing one gets no average."""
    tasks = list(tasks)
    scored = rows[rows["task"].isin(tasks) & rows["value"].notna()]
    if scored.empty:
        return rows.iloc[0:0]
    groups = scored.groupby(KEY, sort=False)
    complete = groups["task"].transform("nunique").eq(len(tasks)) & groups["task"].transform("size").eq(len(tasks))
    scored = scored[complete]
    if scored.empty:
        return rows.iloc[0:0]
    groups = scored.groupby(KEY, sort=False)
    n = len(tasks)
    averages = groups.first().reset_index()
    averages["value"] = groups["value"].sum().to_numpy() / n
    squares = scored.assign(stderr=scored["stderr"] ** 2, excess_se=scored["excess_se"] ** 2).groupby(KEY, sort=False)
    averages["stderr"] = np.sqrt(squares["stderr"].sum().to_numpy()) / n
    averages["excess_se"] = np.sqrt(squares["excess_se"].sum().to_numpy()) / n
    averages["task"], averages["metric"], averages["shots"] = AVG_TASK, "mean", pd.NA
    return averages[list(rows.columns)]


def reference_scores(reference: ReferenceData) -> pd.DataFrame:
    """Every published per-checkpoint score as tidy rows (source ``reference``), with stderr,
    FLOPs (6·N·D, N from the model spec as in results.csv) and the runs.csv flags."""
    curves, runs = reference.curves, reference.runs.set_index("run_id", drop=False)
    params = {run_id: reference.parameter_count(runs.loc[run_id]) for run_id in curves["run_id"].unique()}
    flags = runs[["slurm_job_id", "canonical", "reference", "train_iters", "seq_length"]]
    table = pd.DataFrame({
        "source": "reference",
        "run_id": curves["run_id"],
        "dataset": curves["dataset"],
        "scale": curves["size"],
        "budget": curves["tokens"],
        "iteration": curves["iteration"].astype("int64"),
        "tokens_seen": curves["tokens_seen"].astype("int64"),
        "flops": 6.0 * curves["run_id"].map(params).astype("float64") * curves["tokens_seen"].astype("float64"),
        "task": curves["task"],
        "shots": curves["num_fewshot"].astype("int64"),
        "metric": curves["metric"],
        "value": curves["value"].astype("float64"),
        "stderr": np.nan,
        "final": curves["train_end"].astype(bool),
    })  # fmt: skip
    table = table.join(flags.drop(columns="seq_length").rename_axis(None), on="run_id")
    table["seq_length"] = table["run_id"].map(flags["seq_length"])
    table = with_item_noise(table)
    spec = protocol_tasks(reference)
    return pd.concat([table, average_rows(table, spec.loc[spec["in_average"], "task"])], ignore_index=True)


def user_scores(results: pd.DataFrame, spec: pd.DataFrame, *, where: str = "results.csv") -> pd.DataFrame:
    """The ``ours`` rows of a results table restricted to the protocol's (task, shots, metric), with
    item noise, averages, and ``final`` (the checkpoint reached the run's token budget)."""
    missing = {"source", "run_id", "dataset", "scale", "budget", "iteration", "tokens_seen", "flops", "task", "shots",
               "metric", "value", "stderr"} - set(results.columns)  # fmt: skip
    if missing:
        raise ValueError(f"{where}: lacks column(s) {sorted(missing)}")
    ours = results[(results["source"] == "ours") & (results["task"] != AVG_TASK)].copy()
    for column in ("value", "stderr", "flops", "iteration", "tokens_seen"):
        numbers = pd.to_numeric(ours[column], errors="coerce")
        bad = ours[column].notna() & numbers.isna()
        if bad.any():  # the index is the row number of the CSV read (line = index + 2 after the header)
            index = bad.idxmax()
            raise ValueError(
                f"{where}: line {int(index) + 2}: {column} {ours.at[index, column]!r} is not a number "
                f"(run {ours.at[index, 'run_id']}, task {ours.at[index, 'task']})"
            )
        ours[column] = numbers
    ours["shots"] = pd.to_numeric(ours["shots"], errors="coerce").astype("Int64")
    merged = ours.merge(spec[["task", "shots", "metric"]].astype({"shots": "Int64"}), on=["task", "shots", "metric"])
    merged["value"] = merged["value"].astype("float64")
    merged["iteration"] = merged["iteration"].astype("int64")
    merged["tokens_seen"] = merged["tokens_seen"].astype("int64")
    merged["final"] = merged["tokens_seen"] >= merged["budget"].map(_budget_or_inf)
    merged = with_item_noise(merged)
    return pd.concat([merged, average_rows(merged, spec.loc[spec["in_average"], "task"])], ignore_index=True)


def _budget_or_inf(budget: Any) -> float:
    try:
        return float(budget_tokens(str(budget)))
    except ConfigError:
        return math.inf


def protocol_mismatches(results: pd.DataFrame, spec: pd.DataFrame) -> list[str]:
    """Our tasks that are in the protocol but scored with another shot count or metric."""
    ours = results[(results["source"] == "ours") & results["task"].isin(spec["task"])]
    expected = spec.set_index("task")
    found = ours[["task", "shots", "metric"]].drop_duplicates()
    return [
        f"{row.task}: {row.shots}-shot {row.metric} (the protocol: {expected.at[row.task, 'shots']}-shot "
        f"{expected.at[row.task, 'metric']})"
        for row in found.itertuples()
        if (int(row.shots), row.metric) != (int(expected.at[row.task, "shots"]), expected.at[row.task, "metric"])
    ]


# ---- the noise floor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseFloor:
    """Run-to-run noise of a score, per task and for ``avg`` (see the module docstring)."""

    run_sd: dict[str, float]  # σ_run of one run's final score
    wiggle_sd: dict[str, float]  # σ of one checkpoint's score around its curve, late in the stable phase
    dof: int  # degrees of freedom of the average's σ_run² (Σ (runs − 1) over the repeat groups)
    wiggle_dof: int  # number of second differences behind σ_wiggle² of the average
    groups: pd.DataFrame  # the repeat groups: group, run_id, slurm_job_id, lr, warm-up, GBS, final avg

    def final(self, task: str) -> float:
        """Noise floor of a difference between two runs' final scores: sqrt(2)·σ_run."""
        return math.sqrt(2.0) * self.run_sd.get(task, math.nan)

    def intermediate(self, task: str) -> float:
        """Noise floor when a non-final checkpoint is involved: also the checkpoint wiggle."""
        return math.sqrt(2.0) * max(self.run_sd.get(task, math.nan), self.wiggle_sd.get(task, math.nan))


def repeat_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs.csv rows that repeat one another up to seed-like details, with a ``group`` label.

    Rule: a final evaluation exists; 300B; WSD; no ablation flag (``variant`` empty: untied
    embeddings, no bias, no softmax fusion, long-context cool-down); not a suspect job; then
    grouped by (size, dataset, tokens, seq_length), keeping groups of two or more. Within a group
    the runs differ only in peak LR (4e-3 / 6e-3), warm-up (10k-30k) or batch (1008 / 1024).
    """
    keep = (
        runs["final_evaluated"].astype(bool)
        & (runs["tokens"] == REFERENCE_BUDGET)
        & (runs["schedule"] == "WSD")
        & runs["variant"].isna()
        & ~runs["slurm_job_id"].isin(list(SUSPECT_JOBS))
    )
    chosen = runs[keep].copy()
    chosen["group"] = (
        chosen["size"] + " " + chosen["dataset"] + " " + chosen["tokens"] + " ctx" + chosen["seq_length"].astype(str)
    )
    sizes = chosen.groupby("group")["run_id"].transform("size")
    return chosen[sizes >= 2].sort_values(["group", "slurm_job_id"]).reset_index(drop=True)


def checkpoint_wiggle(curves: pd.DataFrame) -> tuple[float, int]:
    """σ of one checkpoint's score around its curve, and the number of second differences used.

    ``curves``: rows of one task (run_id, iteration, value, train_iters). Per run, the checkpoints
    from 0.5·T up to the cool-down start (T − 0.2·T); every three consecutive, equally spaced ones
    give a second difference; for white noise of sd σ around a locally straight curve,
    E[(y[i+2] − 2y[i+1] + y[i])²] = 6σ²; pooled over runs.
    """
    iters = curves["train_iters"].astype("float64")
    window = curves[
        (curves["iteration"] >= 0.5 * iters) & (curves["iteration"] < iters - (0.2 * iters).astype("int64"))
    ]
    window = window.sort_values(["run_id", "iteration"])
    by_run = window.groupby("run_id")
    spacing, first = by_run["iteration"].diff(), by_run["value"].diff()
    second = first.groupby(window["run_id"]).diff()
    equal = spacing.groupby(window["run_id"]).diff() == 0  # three checkpoints, equally spaced
    d2 = second[equal].dropna().to_numpy(dtype="float64")
    total, count = float(np.sum(d2**2)), len(d2)
    return (math.sqrt(total / count / 6.0), count) if count else (math.nan, 0)


def estimate_noise_floor(scores: pd.DataFrame, runs: pd.DataFrame) -> NoiseFloor:
    """σ_run from the release's repeat groups, σ_wiggle from the reference curves (module docstring).

    ``scores``: :func:`reference_scores`; ``runs``: runs.csv.
    """
    groups = repeat_groups(runs)
    finals = scores[scores["final"] & scores["run_id"].isin(groups["run_id"])]
    finals = finals.merge(groups[["run_id", "group"]], on="run_id")
    run_sd, dof = {}, 0
    for task, rows in finals.groupby("task"):
        sizes = rows.groupby("group")["value"].transform("size")
        rows = rows[sizes >= 2]
        ss = float(((rows["value"] - rows.groupby("group")["value"].transform("mean")) ** 2).sum())
        task_dof = int(len(rows) - rows["group"].nunique())
        if task_dof > 0:
            run_sd[task] = math.sqrt(ss / task_dof)
            if task == AVG_TASK:
                dof = task_dof
    wiggle_sd, wiggle_dof = {}, 0
    canonical = scores[scores["reference"].astype(bool) & (scores["budget"] == REFERENCE_BUDGET)]
    for task, rows in canonical.groupby("task"):
        sd, count = checkpoint_wiggle(rows)
        if count:
            wiggle_sd[task] = sd
            if task == AVG_TASK:
                wiggle_dof = count
    avg_finals = finals[finals["task"] == AVG_TASK].set_index("run_id")["value"]
    shown = groups[["group", "run_id", "slurm_job_id", "lr", "lr_warmup_iters", "global_batch_size"]].copy()
    shown["final_avg"] = shown["run_id"].map(avg_finals)
    return NoiseFloor(run_sd=run_sd, wiggle_sd=wiggle_sd, dof=dof, wiggle_dof=wiggle_dof, groups=shown)


# ---- verdicts and comparisons at equal tokens --------------------------------------------------------


def verdict(diff: float, noise_sd: float, z: float = Z95) -> str:
    """ "better" / "worse" when |diff| exceeds z noise standard deviations, else "within noise"."""
    if diff is None or noise_sd is None or math.isnan(diff) or math.isnan(noise_sd):
        return "no estimate"
    if diff > z * noise_sd:
        return BETTER
    if diff < -z * noise_sd:
        return WORSE
    return WITHIN


def compare_pair(
    ours: float,
    ours_se: float,
    ref: float,
    ref_se: float,
    floor: float,
    ours_excess: float = 0.0,
    ref_excess: float = 0.0,
    z: float = Z95,
) -> dict[str, Any]:
    """One score against another: the difference, its item interval and the verdict."""
    diff = ours - ref
    diff_se = math.sqrt(ours_se**2 + ref_se**2)
    noise = math.sqrt(floor**2 + ours_excess**2 + ref_excess**2)
    return {
        "ours": ours, "ours_lo": ours - z * ours_se, "ours_hi": ours + z * ours_se,
        "reference": ref, "reference_lo": ref - z * ref_se, "reference_hi": ref + z * ref_se,
        "diff": diff, "diff_lo": diff - z * diff_se, "diff_hi": diff + z * diff_se,
        "noise_sd": noise, "verdict": verdict(diff, noise, z),
    }  # fmt: skip


def compare_equal_tokens(
    ours: pd.DataFrame,
    refs: pd.DataFrame,
    floor: NoiseFloor,
    carry: pd.DataFrame | None = None,
    *,
    last_only: bool = True,
) -> pd.DataFrame:
    """Each user checkpoint against each reference run of the same scale and budget (the runs.csv
    ``reference`` run per dataset) at equal tokens (within 2 %), per task and for the average.

    ``carry``: :func:`decision_accuracy` output, shown as ``holds_at_1.7b`` next to the verdict.
    ``last_only``: only each user run's last checkpoint that has a match.
    """
    targets = refs[refs["reference"].astype(bool)]
    records = []
    for (run_id, scale, budget), mine in ours.groupby(["run_id", "scale", "budget"], sort=True):
        candidates = targets[(targets["scale"] == scale) & (targets["budget"] == budget)]
        iterations = sorted(mine["iteration"].unique(), reverse=True)
        for iteration in iterations:
            at = mine[mine["iteration"] == iteration].set_index("task")
            tokens = int(at["tokens_seen"].iloc[0])
            matched = False
            for ref_run, curve in candidates.groupby("run_id", sort=True):
                nearest = curve.iloc[(curve["tokens_seen"] - tokens).abs().argsort()[:1]]
                if nearest.empty or abs(int(nearest["tokens_seen"].iloc[0]) - tokens) > TOKENS_TOLERANCE * tokens:
                    continue
                ref_at = curve[curve["iteration"] == int(nearest["iteration"].iloc[0])].set_index("task")
                both_final = bool(at["final"].iloc[0]) and bool(ref_at["final"].iloc[0])
                for task in at.index.intersection(ref_at.index):
                    o, r = at.loc[task], ref_at.loc[task]
                    noise_floor = floor.final(task) if both_final else floor.intermediate(task)
                    row = compare_pair(o["value"], o["stderr"], r["value"], r["stderr"], noise_floor,
                                       o["excess_se"], r["excess_se"])  # fmt: skip
                    records.append({
                        "run_id": run_id, "dataset": at["dataset"].iloc[0], "scale": scale, "budget": budget,
                        "iteration": int(iteration), "tokens_seen": tokens, "reference_dataset": r["dataset"],
                        "reference_run": ref_run, "reference_iteration": int(r["iteration"]), "final": both_final,
                        "task": task, **row, "noise_floor": noise_floor,
                        "holds_at_1.7b": _carry(carry, scale, task),
                    })  # fmt: skip
                matched = True
            if matched and last_only:
                break
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    order = {task: i for i, task in enumerate([AVG_TASK, *PROTOCOL_ITEMS])}
    frame["_order"] = frame["task"].map(order)
    frame = frame.sort_values(
        ["run_id", "iteration", "_order", "reference_dataset"], ascending=[True, False, True, True]
    )
    return frame.drop(columns="_order").reset_index(drop=True)


def _carry(carry: pd.DataFrame | None, scale: str, task: str) -> str:
    if scale == TARGET_SCALE:
        return "(target scale)"
    if carry is None:
        return ""
    row = carry[(carry["scale"] == scale) & (carry["task"] == task)]
    if row.empty:
        return ""
    agree, pairs = int(row["agree"].iloc[0]), int(row["pairs"].iloc[0])
    return f"{agree}/{pairs} pairs"


# ---- ranking, decision accuracy ------------------------------------------------------------------


def final_scores(refs: pd.DataFrame, budget: str = REFERENCE_BUDGET) -> pd.DataFrame:
    """The reference runs' final scores at ``budget``: one row per (dataset, scale, task)."""
    rows = refs[refs["reference"].astype(bool) & refs["final"] & (refs["budget"] == budget)]
    return rows[["dataset", "scale", "task", "value", "stderr", "excess_se", "flops", "slurm_job_id"]].reset_index(
        drop=True
    )


def ranked_groups(values: pd.Series, noise_sd: float, z: float = Z95) -> list[list[str]]:
    """Datasets ordered by score, adjacent ones joined into a group ("≈") when within noise.

    ``values``: score by dataset; ``noise_sd``: the noise floor of a difference (e.g.
    ``NoiseFloor.final("avg")``). Groups are chained through neighbours, as in the release's
    "A ≈ B > C" notation.
    """
    ordered = values.sort_values(ascending=False)
    groups: list[list[str]] = []
    previous = None
    for name, value in ordered.items():
        if previous is not None and verdict(previous - value, noise_sd, z) == WITHIN:
            groups[-1].append(str(name))
        else:
            groups.append([str(name)])
        previous = value
    return groups


def ranking_text(groups: list[list[str]]) -> str:
    return " > ".join(" ≈ ".join(group) for group in groups)


def decision_accuracy(finals: pd.DataFrame, target_scale: str = TARGET_SCALE) -> pd.DataFrame:
    """Per smaller scale and task: dataset pairs whose order at that scale equals their order at
    ``target_scale`` (a tie counts as a disagreement), with the disagreeing pairs listed."""
    records: list[dict[str, Any]] = []
    wide = finals.pivot_table(index=["task", "dataset"], columns="scale", values="value")
    if target_scale not in wide:
        return pd.DataFrame.from_records(records)
    for task in wide.index.unique("task"):
        table = wide.loc[task]
        for scale in [s for s in table.columns if s != target_scale]:
            both = table[[scale, target_scale]].dropna().sort_index()
            names, small, large = list(both.index), both[scale].to_numpy(), both[target_scale].to_numpy()
            agree, disagree = 0, []
            for i, j in itertools.combinations(range(len(names)), 2):
                same = np.sign(small[i] - small[j])
                if same != 0 and same == np.sign(large[i] - large[j]):
                    agree += 1
                else:
                    disagree.append(f"{names[i]} vs {names[j]}")
            pairs = agree + len(disagree)
            records.append({"scale": scale, "task": task, "agree": agree, "pairs": pairs,
                            "accuracy": agree / pairs if pairs else math.nan, "disagree": "; ".join(disagree)})  # fmt: skip
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    order = {task: i for i, task in enumerate([*PROTOCOL_ITEMS, AVG_TASK])}
    frame["_order"] = frame["task"].map(order)
    return frame.sort_values(["scale", "_order"]).drop(columns="_order").reset_index(drop=True)


# ---- scaling fits, equal FLOPs, compute multiplier ---------------------------------------------


@dataclass(frozen=True)
class ScalingFit:
    """score = a + b·log10(C) by least squares over one dataset's points (C = training FLOPs)."""

    dataset: str
    task: str
    a: float
    b: float
    cov: tuple[tuple[float, float], tuple[float, float]]
    point_sd: float  # noise of one point: max(σ_run, residual sd)
    residual_sd: float
    log10_flops: tuple[float, ...]
    values: tuple[float, ...]

    def predict(self, flops: float) -> tuple[float, float]:
        """The fitted score at ``flops`` and its standard error (from the parameters' covariance)."""
        x = math.log10(flops)
        cov = np.asarray(self.cov)
        se = math.sqrt(max(float(np.array([1.0, x]) @ cov @ np.array([1.0, x])), 0.0))
        return self.a + self.b * x, se

    def flops_for(self, score: float) -> float:
        """The compute at which the fit reaches ``score`` (inf when the slope is not positive)."""
        return 10 ** ((score - self.a) / self.b) if self.b > 0 else math.inf

    def in_range(self, flops: float, slack: float = 0.02) -> bool:
        x = math.log10(flops)
        return min(self.log10_flops) - slack <= x <= max(self.log10_flops) + slack


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    design = np.column_stack([np.ones_like(x), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coef
    dof = len(x) - 2
    residual_var = float(residuals @ residuals / dof) if dof > 0 else math.nan
    return float(coef[0]), float(coef[1]), np.linalg.inv(design.T @ design), residual_var


def fit_scaling(points: pd.DataFrame, run_sd: float, *, dataset: str = "", task: str = AVG_TASK) -> ScalingFit:
    """Fit ``value`` against ``log10(flops)`` (at least 3 points); parameters' covariance =
    max(σ_run², residual variance)·(XᵀX)⁻¹."""
    if len(points) < 3:
        raise ValueError(f"{dataset} {task}: a scaling fit needs 3 or more points, got {len(points)}")
    x = np.log10(points["flops"].to_numpy(dtype="float64"))
    y = points["value"].to_numpy(dtype="float64")
    a, b, xtx_inv, residual_var = _least_squares(x, y)
    point_var = max(run_sd**2, residual_var if not math.isnan(residual_var) else 0.0)
    (c00, c01), (c10, c11) = (point_var * xtx_inv).tolist()  # 2 x 2: intercept and slope
    return ScalingFit(
        dataset=dataset, task=task, a=a, b=b, cov=((c00, c01), (c10, c11)),
        point_sd=math.sqrt(point_var), residual_sd=math.sqrt(residual_var) if not math.isnan(residual_var) else math.nan,
        log10_flops=tuple(x.tolist()), values=tuple(y.tolist()),
    )  # fmt: skip


def reference_fits(
    finals: pd.DataFrame, floor: NoiseFloor, tasks: Iterable[str] = (AVG_TASK,)
) -> dict[tuple[str, str], ScalingFit]:
    """One fit per (dataset, task) over the reference runs' final 300B scores (suspect jobs left out)."""
    usable = finals[~finals["slurm_job_id"].isin(list(SUSPECT_JOBS))]
    fits = {}
    for task in tasks:
        for dataset, points in usable[usable["task"] == task].groupby("dataset", sort=True):
            if len(points) >= 3:
                fits[(dataset, task)] = fit_scaling(points, floor.run_sd.get(task, 0.0), dataset=dataset, task=task)
    return fits


def compute_multiplier(
    fit: ScalingFit, score: float, flops: float, score_sd: float, *, draws: int = 2000, seed: int = 1234
) -> dict[str, Any]:
    """How many times ``flops`` the reference needs to reach ``score``, with a bootstrap 95 % interval.

    Parametric bootstrap: the fit's points redrawn as fitted value + N(0, point_sd²), the user's
    score as score + N(0, score_sd²); a draw whose slope is not positive never reaches the score
    (multiplier inf). Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(fit.log10_flops)
    fitted = fit.a + fit.b * x
    ys = fitted + rng.normal(0.0, fit.point_sd, size=(draws, len(x)))
    targets = score + rng.normal(0.0, score_sd, size=draws)
    xc = x - x.mean()
    slopes = (ys - ys.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)
    intercepts = ys.mean(axis=1) - slopes * x.mean()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_needed = np.where(slopes > 0, (targets - intercepts) / slopes, np.inf)
    multipliers = np.power(10.0, log_needed - math.log10(flops))
    needed = fit.flops_for(score)
    lo, hi = np.percentile(multipliers, [2.5, 97.5])
    return {
        "multiplier": needed / flops, "multiplier_lo": float(lo), "multiplier_hi": float(hi),
        "reference_flops_needed": needed, "extrapolated": not fit.in_range(needed) if math.isfinite(needed) else True,
    }  # fmt: skip


def compare_equal_flops(ours: pd.DataFrame, fits: dict[tuple[str, str], ScalingFit], floor: NoiseFloor) -> pd.DataFrame:
    """Each user run's final score against every reference dataset's fitted score at the same FLOPs
    (a checkpoint before the end of its cool-down is not compared with fits of final scores)."""
    finals = _last_final(ours)
    finals = finals[finals["final"]] if not finals.empty else finals
    records = []
    for row in finals.itertuples(index=False):
        for (dataset, task), fit in sorted(fits.items()):
            if task != row.task:
                continue
            predicted, predicted_se = fit.predict(row.flops)
            noise = math.sqrt(floor.run_sd.get(task, math.nan) ** 2 + predicted_se**2 + row.excess_se**2)
            pair = compare_pair(row.value, row.stderr, predicted, predicted_se, 0.0)
            in_range = fit.in_range(row.flops)
            records.append({
                "run_id": row.run_id, "dataset": row.dataset, "scale": row.scale, "budget": row.budget,
                "flops": row.flops, "reference_dataset": dataset, "task": task, **pair, "noise_sd": noise,
                "verdict": verdict(pair["diff"], noise) if in_range else OUT_OF_RANGE,
            })  # fmt: skip
    return pd.DataFrame.from_records(records)


def _last_final(ours: pd.DataFrame) -> pd.DataFrame:
    """Per user run, the rows of its last checkpoint (final or not, flagged by ``final``)."""
    if ours.empty:
        return ours
    last = ours.groupby("run_id")["iteration"].transform("max")
    return ours[ours["iteration"] == last]


def compute_multipliers(
    ours: pd.DataFrame, fits: dict[tuple[str, str], ScalingFit], floor: NoiseFloor, task: str = AVG_TASK
) -> pd.DataFrame:
    """Per user dataset and reference dataset: the multiplier at the user's largest run (most FLOPs)."""
    finals = _last_final(ours)
    finals = finals[(finals["task"] == task) & finals["final"]]
    records = []
    for dataset, rows in finals.groupby("dataset", sort=True):
        top = rows.loc[rows["flops"].idxmax()]
        score_sd = math.sqrt(floor.run_sd.get(task, 0.0) ** 2 + float(top["excess_se"]) ** 2)
        for (ref_dataset, fit_task), fit in sorted(fits.items()):
            if fit_task != task:
                continue
            records.append({
                "dataset": dataset, "run_id": top["run_id"], "scale": top["scale"], "flops": float(top["flops"]),
                "score": float(top["value"]), "reference_dataset": ref_dataset, "task": task,
                "fit_a": fit.a, "fit_b": fit.b,
                **compute_multiplier(fit, float(top["value"]), float(top["flops"]), score_sd),
            })  # fmt: skip
    return pd.DataFrame.from_records(records)


# ---- everything at once ---------------------------------------------------------------------------


@dataclass
class Comparison:
    """The whole analysis of one results table against the references (every field a table)."""

    floor: NoiseFloor
    finals: pd.DataFrame
    decision: pd.DataFrame
    equal_tokens: pd.DataFrame
    equal_flops: pd.DataFrame
    multipliers: pd.DataFrame
    fits: dict[tuple[str, str], ScalingFit]
    mismatches: list[str]
    ours: pd.DataFrame


def compare(results: pd.DataFrame | None, reference_dir: Path, *, where: str = "results.csv") -> Comparison:
    """Run every comparison of the user's ``ours`` rows (None: the references alone)."""
    reference = ReferenceData(Path(reference_dir))
    spec = protocol_tasks(reference)
    refs = reference_scores(reference)
    floor = estimate_noise_floor(refs, reference.runs)
    finals = final_scores(refs)
    decision = decision_accuracy(finals)
    tasks = [*spec.loc[spec["in_average"], "task"], AVG_TASK]
    fits = reference_fits(finals, floor, tasks)
    if results is None:
        ours = refs.iloc[0:0]
        mismatches: list[str] = []
    else:
        ours = user_scores(results, spec, where=where)
        mismatches = protocol_mismatches(results, spec)
    return Comparison(
        floor=floor, finals=finals, decision=decision,
        equal_tokens=compare_equal_tokens(ours, refs, floor, decision),
        equal_flops=compare_equal_flops(ours, fits, floor),
        multipliers=compute_multipliers(ours, fits, floor),
        fits=fits, mismatches=mismatches, ours=ours,
    )  # fmt: skip


# ---- text and tables for the command line -------------------------------------------------------


def _interval(value: float, lo: float, hi: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _multiplier_text(row: Any) -> str:
    def fmt(x: float) -> str:
        return "inf" if not math.isfinite(x) else (f"{x:.3g}" if x < 1000 else f"{x:.2e}")

    return f"{fmt(row.multiplier)}× [{fmt(row.multiplier_lo)}, {fmt(row.multiplier_hi)}]" + (
        " (extrapolated)" if row.extrapolated else ""
    )


def floor_table(floor: NoiseFloor) -> pd.DataFrame:
    """Per task and ``avg``: σ_run, checkpoint wiggle, and the floors of a difference."""
    tasks = sorted(set(floor.run_sd) | set(floor.wiggle_sd), key=lambda t: [*PROTOCOL_ITEMS, AVG_TASK].index(t)
                   if t in PROTOCOL_ITEMS or t == AVG_TASK else 99)  # fmt: skip
    return pd.DataFrame([
        {"task": t, "run_sd": floor.run_sd.get(t, math.nan), "wiggle_sd": floor.wiggle_sd.get(t, math.nan),
         "floor_final": floor.final(t), "floor_intermediate": floor.intermediate(t)}
        for t in tasks
    ])  # fmt: skip


def fits_table(fits: dict[tuple[str, str], ScalingFit]) -> pd.DataFrame:
    return pd.DataFrame([
        {"dataset": d, "task": t, "a": f.a, "b_per_decade": f.b, "b_se": math.sqrt(f.cov[1][1]),
         "residual_sd": f.residual_sd, "point_sd": f.point_sd, "points": len(f.values),
         "flops_min": 10 ** min(f.log10_flops), "flops_max": 10 ** max(f.log10_flops)}
        for (d, t), f in sorted(fits.items())
    ])  # fmt: skip


def tables(result: Comparison) -> dict[str, pd.DataFrame]:
    """Every table of the analysis, by file stem (what ``scripts/compare.py --out-dir`` writes)."""
    return {
        "noise_floor": floor_table(result.floor), "repeat_groups": result.floor.groups,
        "decision_accuracy": result.decision, "reference_fits": fits_table(result.fits),
        "equal_tokens": result.equal_tokens, "equal_flops": result.equal_flops,
        "compute_multiplier": result.multipliers,
    }  # fmt: skip


def summary_text(result: Comparison, *, all_tasks: bool = False) -> str:
    """The analysis as plain text: noise floor, release ranking, decision accuracy, scaling fits,
    then the user's runs at equal tokens, at equal FLOPs, and the compute multipliers (the
    11-task average only, unless ``all_tasks``)."""
    lines = _floor_lines(result.floor) + _reference_lines(result)
    if result.ours.empty:
        lines += _section(
            f"Compute multiplier at {TARGET_SCALE}: C4's compute to match each dataset's {TARGET_SCALE} run, "
            "÷ that run's (bootstrap 95 %)", reference_multipliers(result), "no fit for c4",
            lambda f: {"dataset": f["dataset"], "score": f["score"].map("{:.3f}".format),
                       "multiplier": [_multiplier_text(r) for r in f.itertuples()]})  # fmt: skip
        return "\n".join([*lines, "No user scores with the protocol's tasks: the references only."])
    return "\n".join(lines + _user_lines(result, all_tasks)).rstrip("\n")


def _floor_lines(floor: NoiseFloor) -> list[str]:
    return [
        "Noise floor of the references (300B final scores; 95 % verdicts at 1.96 noise sd)",
        f"  one run's 11-task average: σ_run = {floor.run_sd.get(AVG_TASK, math.nan):.4f} (pooled over "
        f"{floor.groups['group'].nunique()} repeat groups, {floor.dof} dof) → a difference of two runs: "
        f"{floor.final(AVG_TASK):.4f}",
        f"  checkpoint wiggle, stable-LR phase: {floor.wiggle_sd.get(AVG_TASK, math.nan):.4f} per checkpoint "
        f"({floor.wiggle_dof} second differences) → floor with a non-final checkpoint: {floor.intermediate(AVG_TASK):.4f}",
        _indent(floor.groups.drop(columns="run_id").assign(final_avg=floor.groups["final_avg"].round(4)).to_string(index=False)),
        "",
    ]  # fmt: skip


def _reference_lines(result: Comparison) -> list[str]:
    avg = result.finals[result.finals["task"] == AVG_TASK]
    lines = ["Release ranking at 300B by the 11-task average (≈: within noise)"]
    for scale, rows in avg.groupby("scale", sort=True):
        groups = ranked_groups(rows.set_index("dataset")["value"], result.floor.final(AVG_TASK))
        lines.append(f"  {scale:>6}: {ranking_text(groups)}")
    lines.append("")
    if not result.decision.empty:
        decision = result.decision.assign(
            cell=result.decision["agree"].astype(str) + "/" + result.decision["pairs"].astype(str)
        )
        pivot = decision.pivot(index="task", columns="scale", values="cell")
        order = [t for t in [AVG_TASK, *PROTOCOL_ITEMS] if t in pivot.index]
        lines += [f"How far a small-scale verdict carries: dataset pairs ordered as at {TARGET_SCALE} (300B finals)",
                  _indent(pivot.loc[order].to_string()), ""]  # fmt: skip
    fits = fits_table(result.fits)
    lines += _section(
        "Scaling fits of the references' 11-task average: a + b·log10(C), C = 6·N·D at 300B",
        fits[fits["task"] == AVG_TASK], "no fits",
        lambda f: {"dataset": f["dataset"], "b per decade": [f"{b:.4f} ± {se:.4f}" for b, se in zip(f["b_per_decade"], f["b_se"], strict=False)],
                   "a": f["a"].map("{:.3f}".format), "residual sd": f["residual_sd"].map("{:.4f}".format),
                   "points": f["points"]})  # fmt: skip
    if (fits["points"] < 4).any():
        lines.insert(-1, "  (3 points: the 1.3B C4 run, job 11796685, is left out as a suspected copy of the 1.7B one)")
    return lines


def _user_lines(result: Comparison, all_tasks: bool) -> list[str]:
    def shown(frame: pd.DataFrame) -> pd.DataFrame:
        return frame if all_tasks or frame.empty else frame[frame["task"] == AVG_TASK]

    lines = (
        ["Scored differently from the protocol (left out): " + "; ".join(result.mismatches)]
        if result.mismatches
        else []
    )
    lines += _section(
        "At equal tokens (same scale and budget): ours − reference, 95 % item intervals", shown(result.equal_tokens),
        "no reference run at the scale and budget of any user run",
        lambda f: {"run": f["run_id"], "iter": f["iteration"], "task": f["task"], "vs": f["reference_dataset"],
                   **_intervals(f, "reference"), "diff": [_interval(r.diff, r.diff_lo, r.diff_hi) for r in f.itertuples()],
                   "noise": f["noise_sd"].map("{:.4f}".format), "verdict": f["verdict"], "held at 1.7b": f["holds_at_1.7b"]})  # fmt: skip
    lines += _section(
        "At equal FLOPs: ours − the reference's fit a + b·log10(C) at our compute", shown(result.equal_flops),
        "no final user score with all protocol tasks",
        lambda f: {"run": f["run_id"], "task": f["task"], "FLOPs": f["flops"].map("{:.3g}".format),
                   "vs": f["reference_dataset"], **_intervals(f, "reference fit"), "diff": f["diff"].map("{:+.3f}".format),
                   "noise": f["noise_sd"].map("{:.4f}".format), "verdict": f["verdict"]})  # fmt: skip
    lines += _section(
        "Compute multiplier: the reference's compute to match our largest final run, ÷ ours (bootstrap 95 %)",
        result.multipliers, "no final user score with all protocol tasks",
        lambda f: {"dataset": f["dataset"], "run": f["run_id"], "score": f["score"].map("{:.3f}".format),
                   "vs": f["reference_dataset"], "multiplier": [_multiplier_text(r) for r in f.itertuples()]})  # fmt: skip
    return lines


def _intervals(frame: pd.DataFrame, reference_label: str) -> dict[str, list[str]]:
    return {
        "ours": [_interval(r.ours, r.ours_lo, r.ours_hi) for r in frame.itertuples()],
        reference_label: [_interval(r.reference, r.reference_lo, r.reference_hi) for r in frame.itertuples()],
    }


def _section(title: str, frame: pd.DataFrame, empty: str, columns: Any) -> list[str]:
    """A titled table (``columns(frame)`` → the printed columns), or the ``empty`` line."""
    if frame.empty:
        return [title, f"  {empty}", ""]
    return [title, _indent(pd.DataFrame(columns(frame)).to_string(index=False)), ""]


def reference_multipliers(result: Comparison, baseline: str = "c4", scale: str = TARGET_SCALE) -> pd.DataFrame:
    """The same multiplier analysis on the references alone: each dataset's ``scale`` final run
    against the ``baseline`` dataset's fit."""
    rows = result.finals[result.finals["scale"] == scale].assign(
        run_id=lambda f: f["scale"] + " " + f["dataset"], iteration=0, final=True
    )
    fits = {key: fit for key, fit in result.fits.items() if key[0] == baseline}
    return compute_multipliers(rows, fits, result.floor)


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
