"""Released open-sci-ref checkpoints as a source of runs: config + shipped mapping → what to evaluate.

Most users of open-sci-ref 0.01 never retrain it; they evaluate the released checkpoints (hub model
repos ``open-sci/open-sci-ref-v0.01-…``, ``main`` = final, one branch ``iter_XXXXXXX`` per saved
iteration) on a new task, or put their own run next to them. The ``released`` config section names
such models; ``config/released_models.csv`` maps the 36 reference runs of
``config/reference/runs.csv`` to their repos (``repo_status`` says whether the name was seen in
public material or inferred from the naming pattern; ``alternatives`` lists other names seen that
may be the same run).

The DAG must be plannable offline, before any listing job has asked the hub which branches exist.
So the iterations come from the spec: a run of ``train_iters`` iterations saved every
``save_interval`` has the branches ``iter_{k·save_interval}`` below ``train_iters`` and ``main`` for
the last one (:func:`osref.grid.checkpoint_schedule`); the listing job then verifies that every
selected branch exists and fails naming the closest existing refs when one does not.

Everything here is pure: no network, no files but the mapping and ``config/reference/runs.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from osref.config import ConfigError, repo_relative
from osref.contracts import ReleasedRunDocument, ReleasedTrainSettings
from osref.protocol import shot_set_name, shot_sets, task_problem
from osref.reference import REFERENCE_DIR, ReferenceData

RELEASED_PREFIX = "released"  # released runs live under {runs}/released/{name}/
MAPPING_COLUMNS = ("name", "slurm_job_id", "repo", "repo_status", "save_interval", "alternatives", "note")
REPO_STATUSES = ("seen", "inferred")
FINAL_REVISION = "main"
EXTRA_SHOT_SET_PREFIX = "extra-"
_ENTRY_FIELDS = (
    "repo",
    "reference_run",
    "save_interval",
    "train_iters",
    "global_batch_size",
    "seq_length",
    "params",
    "scale",
    "dataset",
    "budget",
)
_REQUIRED = ("repo", "save_interval", "train_iters", "global_batch_size", "seq_length", "params")
# what a fetched revision needs: weights, configs, tokenizer files, and the remote code (kept, never run)
FETCH_PATTERNS = ("*.json", "*.safetensors", "*.py", "*.txt", "*.model")


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    """One released run to evaluate: its hub repo, what the run was, and the iterations selected."""

    name: str
    repo: str
    repo_status: str  # seen | inferred (from the mapping) | config (given in the config)
    where: str  # where it is defined, for messages: "config/released_models.csv:5" or "released.models[2]"
    reference_run: str | None  # run_id in config/reference/runs.csv
    scale: str | None
    dataset: str | None
    budget: str | None
    seq_length: int
    global_batch_size: int
    train_iters: int
    save_interval: int
    params: int
    iterations: tuple[int, ...]  # selected, ascending
    alternatives: tuple[str, ...] = ()

    @property
    def run_id(self) -> str:
        return f"{RELEASED_PREFIX}/{self.name}"

    @property
    def schedule(self) -> tuple[int, ...]:
        from osref.grid import checkpoint_schedule  # osref.grid imports this module

        return checkpoint_schedule(self.train_iters, self.save_interval)

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    def revision(self, iteration: int) -> str:
        """The hub revision holding ``iteration``: ``main`` for the final one, ``iter_XXXXXXX`` otherwise."""
        return FINAL_REVISION if iteration == self.train_iters else f"iter_{iteration:07d}"

    def revisions(self) -> dict[str, int]:
        return {self.revision(i): i for i in self.iterations}


# ---- inputs ----------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def read_mapping(path: str) -> dict[str, tuple[int, dict[str, str]]]:
    """name -> (line number, row) of the mapping CSV (``path`` relative to the repository or absolute);
    a malformed file fails naming the line."""
    file = Path(repo_relative(path))
    if not file.is_file():
        raise ConfigError(f"released.mapping: {path} does not exist")
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    with open(file, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MAPPING_COLUMNS:
            raise ConfigError(f"{path}:1: columns {reader.fieldnames} (expected {', '.join(MAPPING_COLUMNS)})")
        for row in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if not row["name"] or not row["repo"] or "/" not in row["repo"]:
                raise ConfigError(f"{where}: needs a name and a repo 'org/name' (got {row['name']!r}, {row['repo']!r})")
            if row["repo_status"] not in REPO_STATUSES:
                raise ConfigError(f"{where}: repo_status {row['repo_status']!r} is not one of {REPO_STATUSES}")
            if not row["save_interval"].isdigit() or not row["slurm_job_id"].isdigit():
                raise ConfigError(f"{where}: slurm_job_id and save_interval must be integers")
            if row["name"] in rows:
                raise ConfigError(f"{where}: name {row['name']!r} also on line {rows[row['name']][0]}")
            rows[row["name"]] = (line, row)
    return rows


@lru_cache(maxsize=1)
def _reference_data():
    return ReferenceData(REFERENCE_DIR)


def reference_fields(reference_run: str | int, where: str) -> dict[str, Any]:
    """What runs.csv says about a reference run: shape, budget, schedule, parameter count."""
    data = _reference_data()
    try:
        row = data.resolve_run(reference_run, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return {
        "reference_run": str(row["run_id"]),
        "scale": str(row["size"]),
        "dataset": str(row["dataset"]),
        "budget": str(row["tokens"]),
        "seq_length": int(row["seq_length"]),
        "global_batch_size": int(row["global_batch_size"]),
        "train_iters": int(row["train_iters"]),
        "params": int(data.parameter_count(row)),
    }


# ---- config -> models ----------------------------------------------------------------------------


def _nearest(schedule: tuple[int, ...], iteration: int) -> int:
    return min(schedule, key=lambda s: abs(s - iteration))


def select_iterations(spec: Any, schedule: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The saved iterations an ``iterations`` value selects (the final one always for every-k)."""
    if spec == "final":
        return (schedule[-1],)
    if spec == "all":
        return schedule
    if isinstance(spec, dict):
        every = int(spec["every"])
        return tuple(sorted(set(schedule[every - 1 :: every]) | {schedule[-1]}))
    wanted = sorted(set(int(i) for i in spec))
    unknown = [i for i in wanted if i not in schedule]
    if unknown:
        near = sorted({_nearest(schedule, i) for i in unknown})
        raise ConfigError(
            f"{where}: {unknown} are not saved iterations (every {schedule[0]} and the last, "
            f"{schedule[-1]}); closest saved: {near}"
        )
    return tuple(wanted)


def _entries(section: dict[str, Any], mapping_path: str) -> list[tuple[str, dict[str, Any]]]:
    models = section["models"]
    if models == "all":
        return [(f"{mapping_path}:{line}", {"name": name}) for name, (line, _) in read_mapping(mapping_path).items()]
    return [
        (f"released.models[{i}]", {"name": entry} if isinstance(entry, str) else dict(entry))
        for i, entry in enumerate(models)
    ]


def _resolve(where: str, entry: dict[str, Any], section: dict[str, Any], mapping_path: str) -> ReleasedModel:
    name = entry["name"]
    fields: dict[str, Any] = {}
    status = "config"
    alternatives: tuple[str, ...] = ()
    # a name must be in the mapping (which must then exist); an entry with its own repo may stand alone
    needs_mapping = section["models"] == "all" or "repo" not in entry or Path(repo_relative(mapping_path)).is_file()
    mapping = read_mapping(mapping_path) if needs_mapping else {}
    if name in mapping:
        line, row = mapping[name]
        fields.update(reference_fields(row["slurm_job_id"], f"{mapping_path}:{line}"))
        fields.update(repo=row["repo"], save_interval=int(row["save_interval"]))
        status = row["repo_status"]
        alternatives = tuple(a for a in row["alternatives"].split(";") if a)
        if where.startswith("released.models"):
            where = f"{where} ({mapping_path}:{line})"
    elif "repo" not in entry:
        close = difflib.get_close_matches(name, list(mapping), n=3, cutoff=0.5)
        raise ConfigError(
            f"{where}: {name!r} is not a name in {mapping_path}"
            f"{' (closest: ' + ', '.join(close) + ')' if close else ''}; for another repo give repo, "
            "save_interval and reference_run (or train_iters, global_batch_size, seq_length, params)"
        )
    if entry.get("reference_run") is not None:
        fields.update(reference_fields(entry["reference_run"], f"{where}.reference_run"))
    overrides = {key: entry[key] for key in _ENTRY_FIELDS if key in entry and key != "reference_run"}
    if "repo" in overrides and overrides["repo"] != fields.get("repo"):
        status = "config"
    fields.update(overrides)
    missing = [key for key in _REQUIRED if fields.get(key) is None]
    if missing:
        raise ConfigError(
            f"{where}: released model {name!r} lacks {', '.join(missing)} "
            "(give them, or a reference_run in config/reference/runs.csv)"
        )
    from osref.grid import checkpoint_schedule

    schedule = checkpoint_schedule(int(fields["train_iters"]), int(fields["save_interval"]))
    iterations_where = f"{where}.iterations" if "iterations" in entry else "released.iterations"
    iterations = select_iterations(entry.get("iterations", section["iterations"]), schedule, iterations_where)
    return ReleasedModel(
        name=name,
        repo=str(fields["repo"]),
        repo_status=status,
        where=where,
        reference_run=fields.get("reference_run"),
        scale=fields.get("scale"),
        dataset=fields.get("dataset"),
        budget=fields.get("budget"),
        seq_length=int(fields["seq_length"]),
        global_batch_size=int(fields["global_batch_size"]),
        train_iters=int(fields["train_iters"]),
        save_interval=int(fields["save_interval"]),
        params=int(fields["params"]),
        iterations=iterations,
        alternatives=alternatives,
    )


def build_released(config: dict[str, Any]) -> dict[str, ReleasedModel]:
    """The released models of a validated config, in config (or mapping) order."""
    section = config.get("released") or {}
    if not section.get("models"):
        return {}
    check_extra_tasks(config)
    mapping_path = section["mapping"]  # as written in the config: messages name it so
    models: dict[str, ReleasedModel] = {}
    origin: dict[str, str] = {}
    for where, entry in _entries(section, mapping_path):
        model = _resolve(where, entry, section, mapping_path)
        if model.name in models:
            raise ConfigError(f"{model.where}: released model {model.name!r} is also {origin[model.name]}")
        models[model.name], origin[model.name] = model, model.where
    return models


# ---- evaluation: the protocol plus extra tasks -----------------------------------------------------


def extra_shot_set_name(task: str, shots: int) -> str:
    """The evaluation file of one extra task: ``extra-{task}-{k}shot`` (one job per task and checkpoint)."""
    return f"{EXTRA_SHOT_SET_PREFIX}{task}-{shot_set_name(shots)}"


def check_extra_tasks(config: dict[str, Any]) -> None:
    evaluation = config["evaluation"]
    protocol = {(t["task"], int(t["shots"])) for t in evaluation["protocols"].get(evaluation["protocol"], [])}
    problems, seen = [], set()
    for i, task in enumerate(config["released"]["extra_tasks"]):
        where = f"released.extra_tasks[{i}]"
        key = (task["task"], int(task["shots"]))
        if key in protocol:
            problems.append(f"{where}: {task['task']} {task['shots']}-shot is already in the protocol")
        elif key in seen:
            problems.append(f"{where}: {task['task']} {task['shots']}-shot is listed twice")
        seen.add(key)
        if (problem := task_problem(task["task"], evaluation, f"{where}.task")) is not None:
            problems.append(problem)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def extra_shot_sets(config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``extra-{task}-{k}shot`` -> [that task] for every extra task (never in an average)."""
    return {
        extra_shot_set_name(t["task"], int(t["shots"])): [{**t, "in_average": False}]
        for t in (config.get("released") or {}).get("extra_tasks", [])
    }


def evaluation_shot_sets(config: dict[str, Any], protocol: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every evaluation file of a released checkpoint: the protocol's shot sets, then the extra tasks."""
    return {**shot_sets(protocol), **extra_shot_sets(config)}


def run_document(model: ReleasedModel) -> ReleasedRunDocument:
    """The run JSON of a released run: what evaluation reads (run_id, tokens per iteration) and what it is.

    Only fields that identify the evaluated model: a change here re-runs its evaluations.
    """
    return ReleasedRunDocument(
        run_id=model.run_id,
        repo=model.repo,
        reference_run=model.reference_run,
        train=ReleasedTrainSettings(
            global_batch_size=model.global_batch_size,
            seq_length=model.seq_length,
            train_iters=model.train_iters,
            save_interval=model.save_interval,
        ),
    )


def listing_request(model: ReleasedModel) -> dict[str, Any]:
    """What the listing job of a model must find on the hub (its params: a change re-lists)."""
    return {
        "name": model.name,
        "repo": model.repo,
        "where": model.where,
        "repo_status": model.repo_status,
        "alternatives": list(model.alternatives),
        "final_iteration": model.train_iters,
        "revisions": model.revisions(),
        "patterns": list(FETCH_PATTERNS),
    }


# ---- cost --------------------------------------------------------------------------------------------


def evaluation_gpu_hours(
    config: dict[str, Any], params: int, checkpoints: int, jobs_per_checkpoint: int, extra_tasks: int = 0
) -> float:
    """GPU-hours to evaluate ``checkpoints`` checkpoints of a ``params`` model (``evaluation.cost``).

    2·N FLOPs per forward token, ``tokens_per_checkpoint`` (+ ``tokens_per_extra_task`` per extra
    task) at ``cluster.peak_tflops_per_gpu`` x ``cost.mfu``, plus ``minutes_per_job`` of start-up per
    evaluation job. An estimate: the README says what it rests on.
    """
    cost = config["evaluation"]["cost"]
    tokens = cost["tokens_per_checkpoint"] + extra_tasks * cost["tokens_per_extra_task"]
    flops_per_s = config["cluster"]["peak_tflops_per_gpu"] * 1e12 * cost["mfu"]
    seconds = 2.0 * params * tokens / flops_per_s + jobs_per_checkpoint * cost["minutes_per_job"] * 60
    return checkpoints * seconds / 3600


def estimated_revision_bytes(model: ReleasedModel, bytes_per_param: float) -> int:
    """Download size of one revision before the listing: weights at ``bytes_per_param`` + ~2.2 MB of
    tokenizer, config and code files."""
    return int(math.ceil(model.params * bytes_per_param)) + 2_200_000


def _listed_bytes(listing_path: Path) -> dict[str, int]:
    """Bytes per revision recorded by a listing job (empty until it has run)."""
    import json

    if not listing_path.is_file():
        return {}
    listing = json.loads(listing_path.read_text())
    return {rev: int(entry["bytes"]) for rev, entry in listing.get("revisions", {}).items()}


def released_plan_rows(grid: Any) -> list[dict[str, Any]]:
    """Plan rows of the released models (``source = released``): jobs, bytes to download, eval GPU-hours.

    Bytes come from the model's listing.json where it has run (exact, per revision), else from the
    parameter count x ``released.bytes_per_param``.
    """
    config = grid.config
    section = config["released"]
    shot_sets = evaluation_shot_sets(config, grid.protocol)
    n_extra = len(extra_shot_sets(config))
    rows = []
    for model in grid.released.values():
        listed = _listed_bytes(Path(grid.layout.released_listing(model.name)))
        per_revision = [listed.get(rev) for rev in model.revisions()]
        known = [b for b in per_revision if b is not None]
        estimate = estimated_revision_bytes(model, section["bytes_per_param"])
        total = sum(known) + estimate * (len(per_revision) - len(known))
        if len(known) == len(per_revision):
            source = "listing"
        elif known:
            source = f"listing ({len(known)} of {len(per_revision)} revisions), estimate for the rest"
        else:
            source = f"estimate (params x {section['bytes_per_param']:g} B + 2.2 MB)"
        tokens = model.train_iters * model.tokens_per_iteration
        rows.append(
            {
                "run_id": model.run_id,
                "scale": model.scale or "",
                "dataset": model.dataset or "",
                "tokens": tokens,
                "seq_length": model.seq_length,
                "global_batch_size": model.global_batch_size,
                "params": model.params,
                "train_iters": model.train_iters,
                "checkpoints": len(model.schedule),
                "flops": 6.0 * model.params * tokens,
                "gpu_hours": 0.0,
                "nodes": 0,
                "gpus_per_node": 0,
                "jobs": 2
                + len(model.iterations) * (2 + len(shot_sets)),  # listing, run.json; fetch, convert, evaluations
                "budget": model.budget or "",
                "warmup_iters": "",
                "cooldown_iters": "",
                "save_interval": model.save_interval,
                "segments": 0,
                "hours_per_segment": "",
                "walltime": "",
                "evaluated_checkpoints": len(model.iterations),
                "data_groups": "",
                "dataset_groups": "",
                "shard_groups": "",
                "dataset_tokens": "",
                "dataset_tokens_source": "",
                "epochs": "",
                "warning": "",
                "branch_of": "",
                "branch_iteration": "",
                "trained_iters": 0,
                "source": "released",
                "revisions": len(model.iterations),
                "download_bytes": total,
                "download_bytes_source": source,
                "eval_gpu_hours": round(
                    evaluation_gpu_hours(config, model.params, len(model.iterations), len(shot_sets), n_extra), 1
                ),
                "repo": model.repo,
                "repo_status": model.repo_status,
            }
        )
    return rows
