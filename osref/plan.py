"""The plan's outputs: what the grid will cost, and how its data looks once it exists.

Unlike :mod:`osref.grid` (config → runs, nothing read from disk), the plan also reads what the
data stages have left: a dataset's ``listing.json`` (its real size) and its tokenized
``manifest.json`` (counted tokens), to fill the data columns of ``plan.csv`` (:data:`PLAN_DATA_COLUMNS`)
and warn about repeated data. Those columns are not a rerun trigger of the ``plan`` rule
(:meth:`osref.workflow.WorkflowIndex.plan_params` leaves them out).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from osref.files import atomic_target
from osref.grid import Grid, approx_tokens

# the plan columns that are a Run's own fields, as they are (the rest is derived below)
PLAN_RUN_FIELDS = ("run_id", "scale", "dataset", "tokens", "seq_length", "global_batch_size", "params", "train_iters")
# plan.csv columns that read the data on disk (listing, tokenized counts): they change once the data
# exists, so they are left out of the plan rule's params (else every first run after a complete one
# would re-schedule `plan`).
PLAN_DATA_COLUMNS = ("dataset_tokens", "dataset_tokens_source", "epochs", "warning")

PLAN_COLUMNS = [
    "run_id",
    "scale",
    "dataset",
    "tokens",
    "seq_length",
    "global_batch_size",
    "params",
    "train_iters",
    "checkpoints",
    "flops",
    "gpu_hours",
    "nodes",
    "gpus_per_node",
    "jobs",
    "budget",
    "warmup_iters",
    "cooldown_iters",
    "save_interval",
    "segments",
    "hours_per_segment",
    "walltime",
    "evaluated_checkpoints",
    "data_groups",
    "dataset_groups",
    "shard_groups",
    "dataset_tokens",
    "dataset_tokens_source",
    "epochs",
    "warning",
    "branch_of",
    "branch_iteration",
    "trained_iters",
    "source",
    "revisions",
    "download_bytes",
    "download_bytes_source",
    "eval_gpu_hours",
    "repo",
    "repo_status",
]


def _counted_group_tokens(grid: Grid, dataset: str) -> dict[int, int]:
    """Tokens per group from the dataset's tokenized manifest (empty until it exists)."""
    manifest = Path(grid.layout.tokenized_manifest(dataset))
    if not manifest.exists():
        return {}
    return {
        int(g["group"]): int(g["tokens"])
        for g in json.loads(manifest.read_text())["per_group"]
        if g.get("group") is not None
    }


def listed_bytes(grid: Grid, dataset: str) -> int | None:
    """Total size in the dataset's listing.json, once the listing job has run (else None)."""
    listing = Path(grid.layout.listing(dataset))
    if not listing.exists():
        return None
    return sum(f["size"] or 0 for f in json.loads(listing.read_text())["files"])


def dataset_tokens(
    grid: Grid, dataset: str, groups: list[int] | None = None, counted: dict[int, int] | None = None
) -> tuple[float | None, str]:
    """Tokens in ``groups`` of a dataset (default: every group it is cut into): counted once
    tokenized, else the catalog's estimate x groups / shard_groups."""
    block = grid.config["datasets"][dataset]
    groups = list(range(block["shard_groups"])) if groups is None else groups
    counted = _counted_group_tokens(grid, dataset) if counted is None else counted
    known = [counted[g] for g in groups if g in counted]
    if known and len(known) == len(groups):
        return float(sum(known)), "tokenized"
    if known:
        return sum(known) / len(known) * len(groups), f"tokenized ({len(known)} of {len(groups)} groups), extrapolated"
    estimate = approx_tokens(block)
    if estimate is None:
        return None, "unknown"
    return estimate * len(groups) / block["shard_groups"], "catalog estimate"


def plan_rows(grid: Grid) -> list[dict[str, Any]]:
    """One row per training run, then one per released model (``source`` train / released)."""
    from osref.released_models import evaluation_gpu_hours

    n_shot_sets = len(grid.shot_sets)
    warn_epochs = grid.config["plan"]["warn_epochs"]
    counted = {d: _counted_group_tokens(grid, d) for d in grid.datasets_in_use}
    size_warnings = {}
    for d in grid.datasets_in_use:
        listed, approx = listed_bytes(grid, d), grid.config["datasets"][d]["approx_bytes"]
        if listed and approx and not 1 / 1.5 <= listed / approx <= 1.5:
            size_warnings[d] = (
                f"{d} lists {listed:.3g} bytes, datasets.{d}.approx_bytes says {approx:.3g}: "
                "correct it, the number of groups a run reads relies on it"
            )
    rows = []
    for run in grid.runs.values():
        jobs = len(run.segment_ends) + len(run.eval_iters) * (1 + n_shot_sets)
        groups = grid.run_groups(run.run_id)
        total_groups = grid.config["datasets"][run.dataset]["shard_groups"]
        size, size_source = dataset_tokens(grid, run.dataset, groups, counted[run.dataset])
        epochs = run.train_iters * run.tokens_per_iteration / size if size else None
        warnings = []
        if epochs is not None and epochs > warn_epochs:
            warnings.append(
                f"needs {epochs:.1f} epochs of {run.dataset} (more than plan.warn_epochs = {warn_epochs:g})"
            )
        elif epochs is not None and epochs > 1 and len(groups) < total_groups:
            warnings.append(
                f"repeats data ({epochs:.2f} epochs of its {len(groups)} of {total_groups} shard groups) although "
                f"{run.dataset} has more: raise datasets.{run.dataset}.data_safety or correct its approx_bytes / "
                "tokens_per_byte"
            )
        if run.dataset in size_warnings and len(groups) < total_groups:
            warnings.append(size_warnings[run.dataset])
        warning = "; ".join(warnings)
        rows.append(
            {
                **{key: getattr(run, key) for key in PLAN_RUN_FIELDS},
                "checkpoints": len(run.checkpoint_iters),
                "flops": run.flops,
                "gpu_hours": round(run.gpu_hours, 1),
                "nodes": run.resources["nodes"],
                "gpus_per_node": run.resources["gpus_per_node"],
                "jobs": jobs,
                "budget": run.budget,
                "warmup_iters": run.recipe["warmup_iters"],
                "cooldown_iters": run.cooldown_iters,
                "save_interval": run.recipe["save_interval"],
                "segments": len(run.segment_ends),
                "hours_per_segment": round(run.hours_per_segment, 2),
                "walltime": run.resources["walltime"],
                "evaluated_checkpoints": len(run.eval_iters),
                "data_groups": len(groups),
                "dataset_groups": len(grid.shard_groups(run.dataset)),
                "shard_groups": total_groups,
                "dataset_tokens": size,
                "dataset_tokens_source": size_source,
                "epochs": round(epochs, 3) if epochs is not None else None,
                "warning": warning,
                "branch_of": run.parent_run or "",
                "branch_iteration": run.branch_iteration or "",
                "trained_iters": run.trained_iters,
                "source": "train",
                "revisions": "",
                "download_bytes": "",
                "download_bytes_source": "",
                "eval_gpu_hours": round(
                    evaluation_gpu_hours(grid.config, run.params, len(run.eval_iters), n_shot_sets), 1
                ),
                "repo": "",
                "repo_status": "",
            }
        )
    from osref.released_models import released_plan_rows

    return rows + released_plan_rows(grid)


def write_plan(rows: list[dict], out: str | Path) -> None:
    """``plan.csv`` (:data:`PLAN_COLUMNS`), atomically."""
    with atomic_target(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PLAN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def summary(rows: list[dict]) -> str:
    """The plan as text: one line per row, the warnings, and the totals (the rule's log)."""
    lines = [
        f"{'run_id':40s} {'params':>8s} {'iters':>8s} {'ckpts':>5s} {'FLOPs':>9s} {'GPU-h':>9s} {'nodes':>5s} {'jobs':>5s}"
    ]
    for r in rows:
        lines.append(
            f"{r['run_id']:40s} {r['params'] / 1e6:7.1f}M {r['train_iters']:8d} {r['checkpoints']:5d} "
            f"{r['flops']:9.2e} {r['gpu_hours']:9.1f} {r['nodes']:5d} {r['jobs']:5d}"
        )
    for r in rows:
        if r["warning"]:
            lines.append(f"WARNING {r['run_id']}: {r['warning']}")
    trained = [r for r in rows if r.get("source", "train") == "train"]
    released = [r for r in rows if r.get("source") == "released"]
    total_h = sum(r["gpu_hours"] for r in trained)
    if trained or not released:
        lines.append(
            f"{len(trained)} runs, {sum(r['flops'] for r in trained):.3e} FLOPs, {total_h:,.0f} GPU-hours, "
            f"{sum(r['jobs'] for r in trained)} training/export/eval jobs"
        )
    if released:
        inferred = sum(r["repo_status"] == "inferred" for r in released)
        lines.append(
            f"{len(released)} released models ({inferred} repo names inferred, not seen), "
            f"{sum(r['revisions'] for r in released)} checkpoints, {sum(r['download_bytes'] for r in released) / 1e12:.2f} TB "
            f"to download, {sum(r['eval_gpu_hours'] for r in released):,.0f} GPU-hours of evaluation (evaluation.cost), "
            f"{sum(r['jobs'] for r in released)} list/fetch/convert/eval jobs"
        )
    return "\n".join(lines)
