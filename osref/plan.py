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
from osref.fingerprint import local_files
from osref.grid import Grid, Run, approx_tokens, describe_recipe_differences, recipe_differences
from osref.paths import REPO_ROOT

# the plan columns that are a Run's own fields, as they are (the rest is derived below)
PLAN_RUN_FIELDS = ("run_id", "scale", "dataset", "tokens", "seq_length", "global_batch_size", "params", "train_iters")
# plan.csv columns that read the data on disk (listing, tokenized counts): they change once the data
# exists, so they are left out of the plan rule's params (else every first run after a complete one
# would re-schedule `plan`).
PLAN_DATA_COLUMNS = (
    "dataset_tokens",
    "dataset_tokens_source",
    "epochs",
    "warning",
    "disk_raw_bytes",
    "disk_tokenized_bytes",
)

# GPT-NeoX-20B tokens per byte of a file, by format, for a dataset that gives no ``tokens_per_byte``
# (its epochs before tokenization). jsonl: measured on the demo corpus (assets/demo-corpus, the Python
# 3.11 docs: 2 950 737 tokens in 11 393 286 bytes of JSONL, 3.86 bytes per token; 3.74 per byte of
# text); the compressed formats: the release catalog's ratios for web text (config/config.yaml:
# C4's json.gz 0.48, Pile's and DCLM's zstd 0.69 / 0.68, parquet 0.34).
DEFAULT_TOKENS_PER_BYTE = {
    "jsonl": 0.259,
    "jsonl.gz": 0.48,
    "json.gz": 0.48,
    "jsonl.zst": 0.69,
    "jsonl.zstd": 0.69,
    "parquet": 0.34,
}
TOKENIZED_BYTES_PER_TOKEN = 2  # uint16 .bin; the .idx adds ~20 bytes per document, not counted
EXPORT_BYTES_PER_PARAM = {"bfloat16": 2, "float32": 4}

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
    "recipe_differences",
    "disk_raw_bytes",
    "disk_tokenized_bytes",
    "disk_checkpoint_bytes",
    "disk_export_bytes",
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


def local_bytes(grid: Grid, dataset: str) -> int | None:
    """Total size of a local dataset's files now (a ``stat`` each, nothing read); None for other sources."""
    block = grid.config["datasets"][dataset]
    if block["source"] != "local":
        return None
    return sum(path.stat().st_size for path, _ in local_files(block, REPO_ROOT))


def tokens_per_byte(block: dict[str, Any]) -> tuple[float, str]:
    """The dataset's ``tokens_per_byte``, else :data:`DEFAULT_TOKENS_PER_BYTE` of its format."""
    if block.get("tokens_per_byte"):
        return float(block["tokens_per_byte"]), "tokens_per_byte"
    return DEFAULT_TOKENS_PER_BYTE[block["format"]], f"default for {block['format']}"


def dataset_bytes(grid: Grid, dataset: str, groups: list[int] | None = None) -> tuple[float | None, str]:
    """Raw bytes of ``groups`` of a dataset (default: all): a local dataset's files as they are now,
    else its listing once listed, else ``approx_bytes``; x groups / shard_groups."""
    block = grid.config["datasets"][dataset]
    share = (block["shard_groups"] if groups is None else len(groups)) / block["shard_groups"]
    for size, source in ((local_bytes(grid, dataset), "local files"), (listed_bytes(grid, dataset), "listing")):
        if size is not None:
            return size * share, source
    if block.get("approx_bytes"):
        return float(block["approx_bytes"]) * share, "approx_bytes"
    return None, "unknown"


def dataset_tokens(
    grid: Grid, dataset: str, groups: list[int] | None = None, counted: dict[int, int] | None = None
) -> tuple[float | None, str]:
    """Tokens in ``groups`` of a dataset (default: every group it is cut into): counted once
    tokenized; before that, for a local dataset, its files' bytes x tokens per byte
    (:func:`tokens_per_byte`); else the catalog's estimate x groups / shard_groups."""
    block = grid.config["datasets"][dataset]
    groups = list(range(block["shard_groups"])) if groups is None else groups
    counted = _counted_group_tokens(grid, dataset) if counted is None else counted
    known = [counted[g] for g in groups if g in counted]
    if known and len(known) == len(groups):
        return float(sum(known)), "tokenized"
    if known:
        return sum(known) / len(known) * len(groups), f"tokenized ({len(known)} of {len(groups)} groups), extrapolated"
    if block["source"] == "local":
        size, _ = dataset_bytes(grid, dataset, groups)
        assert size is not None  # a local dataset's size is its files' (local_bytes), never unknown
        ratio, ratio_source = tokens_per_byte(block)
        source = f"before tokenization: {size:.4g} bytes of local files x {ratio:g} tokens/byte ({ratio_source})"
        if block.get("max_documents"):  # bytes say nothing about where the cut falls: tokens at most this
            source += f"; at most, as max_documents = {block['max_documents']} per group is not counted"
        return size * ratio, source
    estimate = approx_tokens(block)
    if estimate is None:
        return None, "unknown"
    return estimate * len(groups) / block["shard_groups"], "catalog estimate"


def checkpoint_bytes_per_param(grid: Grid, run: Run) -> float:
    """Disk per parameter of one saved checkpoint: ``plan.checkpoint_bytes_per_param``, else 14 in bf16
    (bf16 weights + fp32 main weights + Adam's two fp32 moments) and 12 in fp32 (no separate main weights)."""
    configured = grid.config["plan"]["checkpoint_bytes_per_param"]
    if configured:
        return float(configured)
    on_gpu = grid.config["cluster"]["device"] == "cuda"
    return 14.0 if on_gpu and run.recipe["precision"] == "bf16" else 12.0


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
                f"needs {epochs:,.1f} epochs of {run.dataset} (more than plan.warn_epochs = {warn_epochs:g}): it trains "
                f"{run.train_iters * run.tokens_per_iteration:.4g} tokens, {run.dataset} holds ~{size:.4g} ({size_source})"
            )
        elif epochs is not None and epochs > 1 and len(groups) < total_groups:
            warnings.append(
                f"repeats data ({epochs:.2f} epochs of its {len(groups)} of {total_groups} shard groups) although "
                f"{run.dataset} has more: raise datasets.{run.dataset}.data_safety or correct its approx_bytes / "
                "tokens_per_byte"
            )
        if run.dataset in size_warnings and len(groups) < total_groups:
            warnings.append(size_warnings[run.dataset])
        differences = describe_recipe_differences(recipe_differences(grid, run))
        if differences:
            warnings.append(f"a different recipe from the reference runs of its scale and budget: {differences}")
        warning = "; ".join(warnings)
        raw_bytes, _ = dataset_bytes(grid, run.dataset, groups)
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
                "recipe_differences": differences,
                "disk_raw_bytes": round(raw_bytes) if raw_bytes is not None else None,
                "disk_tokenized_bytes": round(size * TOKENIZED_BYTES_PER_TOKEN) if size else None,
                "disk_checkpoint_bytes": round(
                    run.params * checkpoint_bytes_per_param(grid, run) * len(run.checkpoint_iters)
                ),
                "disk_export_bytes": run.params
                * EXPORT_BYTES_PER_PARAM[grid.config["evaluation"]["export_dtype"]]
                * len(run.eval_iters),
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
    if trained:
        lines.append(disk_summary(trained))
    if released:
        inferred = sum(r["repo_status"] == "inferred" for r in released)
        lines.append(
            f"{len(released)} released models ({inferred} repo names inferred, not seen), "
            f"{sum(r['revisions'] for r in released)} checkpoints, {sum(r['download_bytes'] for r in released) / 1e12:.2f} TB "
            f"to download, {sum(r['eval_gpu_hours'] for r in released):,.0f} GPU-hours of evaluation (evaluation.cost), "
            f"{sum(r['jobs'] for r in released)} list/fetch/convert/eval jobs"
        )
    return "\n".join(lines)


def _tb(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if value >= scale / 10:
            return f"{value / scale:,.2f} {unit}"
    return f"{value / 1e6:,.1f} MB"


def disk_summary(rows: list[dict]) -> str:
    """Disk per stage over the training rows (raw and tokenized data once per dataset: what its
    largest run reads) and evaluation GPU-hours."""
    raw: dict[str, float] = {}
    tokenized: dict[str, float] = {}
    for r in rows:
        raw[r["dataset"]] = max(raw.get(r["dataset"], 0.0), float(r["disk_raw_bytes"] or 0))
        tokenized[r["dataset"]] = max(tokenized.get(r["dataset"], 0.0), float(r["disk_tokenized_bytes"] or 0))
    checkpoints = sum(r["disk_checkpoint_bytes"] for r in rows)
    exports = sum(r["disk_export_bytes"] for r in rows)
    return (
        f"disk: raw data {_tb(sum(raw.values()))}, tokenized {_tb(sum(tokenized.values()))}, checkpoints "
        f"{_tb(checkpoints)} (every one kept), exports {_tb(exports)}; evaluation "
        f"{sum(r['eval_gpu_hours'] for r in rows):,.0f} GPU-hours"
    )
