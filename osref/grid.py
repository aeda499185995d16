"""The experiment grid: config → one :class:`Run` per training run, with everything derived.

A run is identified by a readable id in the style of the release names (``0.13b-c4-300B-4096``,
plus an experiment suffix). Everything the workflow needs to plan a run is computed here once —
iterations, the checkpoint schedule, the training-job segments that fit the walltime, which
checkpoints are exported and evaluated, the cost — so that the Snakefile's input functions are
dictionary lookups and ``snakemake -n`` of the full grid stays cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from functools import cached_property
from pathlib import Path
from typing import Any

from osref.config import (
    RELEASE_CONFIG,
    ConfigError,
    budget_tokens,
    load_config,
    read_yaml,
    repo_relative,
    validate,
    walltime_minutes,
)
from osref.contracts import BranchSettings, DataSettings, RunDocument, TokenizerSettings, TrainSettings
from osref.model_spec import ModelSpec
from osref.paths import Layout
from osref.protocol import shot_sets
from osref.reference import reference_datasets

_SCALE_OVERRIDE_KEYS = {"rotary_base"}
_RESOURCE_OVERRIDE_KEYS = {"nodes", "micro_batch_size"}
_RUN_OVERRIDE_KEYS = {"reference_run", "parity_tolerance"}


@dataclasses.dataclass(frozen=True)
class Run:
    run_id: str
    experiment: str
    dataset: str
    scale: str
    budget: str
    tokens: int
    recipe_name: str
    spec: ModelSpec
    recipe: dict[str, Any]  # resolved: recipe defaults + per-run overrides
    resources: dict[str, Any]
    global_batch_size: int
    seq_length: int
    train_iters: int
    cooldown_iters: int
    checkpoint_iters: tuple[int, ...]
    eval_iters: tuple[int, ...]
    segment_ends: tuple[int, ...]
    reference_run: str | None
    parity_tolerance: float  # the export's logit parity gate (evaluation.parity_tolerance unless overridden)
    gpu_hours: float
    hours_per_segment: float
    segment_iters: int
    # a WSD cool-down branch starts from ``parent_run``'s checkpoint at ``branch_iteration``
    parent_run: str | None = None
    branch_iteration: int = 0

    @property
    def trained_iters(self) -> int:
        """Iterations this run's own jobs train (a branch trains only its cool-down)."""
        return self.train_iters - self.branch_iteration

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def params(self) -> int:
        return self.spec.parameter_count()

    @property
    def flops(self) -> float:
        return 6.0 * self.params * self.train_iters * self.tokens_per_iteration

    @property
    def world_size(self) -> int:
        return self.resources["nodes"] * max(self.resources["gpus_per_node"], 1)

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.resources["tensor_parallel"] * self.resources["pipeline_parallel"])

    def segment_for(self, iteration: int) -> int:
        """End iteration of the training job that writes checkpoint ``iteration``."""
        for end in self.segment_ends:
            if end >= iteration:
                return end
        raise KeyError(iteration)

    def previous_segment(self, end: int) -> int | None:
        """The segment before ``end``; None for the first (a branch's first follows its parent)."""
        index = self.segment_ends.index(end)
        return self.segment_ends[index - 1] if index else None


@dataclasses.dataclass
class Grid:
    config: dict[str, Any]
    runs: dict[str, Run]
    layout: Layout
    released: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> ReleasedModel (osref.released_models)

    @cached_property
    def protocol(self) -> list[dict[str, Any]]:
        evaluation = self.config["evaluation"]
        return evaluation["protocols"][evaluation["protocol"]]

    @cached_property
    def shot_sets(self) -> dict[str, list[dict[str, Any]]]:
        """The protocol's tasks by shot count (``"0shot"``, ``"10shot"``): one evaluation job each."""
        return shot_sets(self.protocol)

    @cached_property
    def datasets_in_use(self) -> list[str]:
        return sorted({run.dataset for run in self.runs.values()})

    @cached_property
    def _groups_per_run(self) -> dict[str, int]:
        # a cool-down branch reads its parent's groups: the same dataset, hence the same sample order
        return {
            rid: run_group_count(
                self.config["datasets"][r.dataset],
                r.dataset,
                tokens_read(self.runs[r.parent_run] if r.parent_run else r),
            )
            for rid, r in self.runs.items()
        }

    def run_groups(self, run_id: str) -> list[int]:
        """The shard groups a run trains on: the first n of its dataset's fixed groups."""
        return list(range(self._groups_per_run[run_id]))

    def shard_groups(self, dataset: str) -> list[int]:
        """The groups of ``dataset`` that are downloaded and tokenized: what its largest run reads."""
        used = [n for rid, n in self._groups_per_run.items() if self.runs[rid].dataset == dataset]
        return list(range(max(used, default=1)))

    def data_prefixes(self, dataset: str, run_id: str | None = None) -> list[str]:
        groups = self.run_groups(run_id) if run_id is not None else self.shard_groups(dataset)
        return [self.layout.tokenized_prefix(dataset, g) for g in groups]


# ---- data: how many shard groups a run needs -------------------------------------------------------


def train_share(split: str) -> float:
    """Share of the documents Megatron's GPTDataset trains on, from a ``"989,10,1"`` split."""
    weights = [float(w) for w in split.split(",")]
    return weights[0] / sum(weights)


def tokens_read(run: Run) -> float:
    """Tokens of data a run consumes: what it trains on, over the train share of its split."""
    return run.train_iters * run.tokens_per_iteration / train_share(run.recipe["split"])


def approx_tokens(block: dict[str, Any]) -> float | None:
    """The catalog's token estimate of a dataset (approx_bytes x tokens_per_byte), if it has one."""
    if block.get("approx_bytes") and block.get("tokens_per_byte"):
        return float(block["approx_bytes"]) * float(block["tokens_per_byte"])
    return None


def groups_needed(total_groups: int, needed_tokens: float, dataset_tokens: float, safety: float) -> int:
    """ceil(total x min(1, needed x safety / dataset)), at least one group.

    The groups are byte-balanced chunks of the whole listing, so the first n hold about n/total of
    the dataset's tokens; ``safety`` covers the estimate's error and uneven token density.
    """
    share = min(1.0, needed_tokens * safety / dataset_tokens)
    return max(1, min(total_groups, math.ceil(total_groups * share - 1e-9)))


def run_group_count(block: dict[str, Any], dataset: str, needed_tokens: float) -> int:
    """How many of a dataset's ``shard_groups`` a run reading ``needed_tokens`` trains on."""
    total = block["shard_groups"]
    if block["groups_used"] == "all" or total == 1:
        return total
    estimate = approx_tokens(block)
    if estimate is None:
        raise ConfigError(
            f"datasets.{dataset}.approx_bytes, tokens_per_byte: required to choose how many of its {total} "
            "shard_groups a run needs (groups_used: auto); or set groups_used: all"
        )
    return groups_needed(total, needed_tokens, estimate, block["data_safety"])


# ---- derivations ----------------------------------------------------------------------------------


def run_id_for(scale: str, dataset: str, budget: str | int, seq_length: int, suffix: str = "") -> str:
    run_id = f"{scale}-{dataset}-{budget}-{seq_length}"
    return f"{run_id}-{suffix}" if suffix else run_id


def checkpoint_schedule(train_iters: int, save_interval: int) -> tuple[int, ...]:
    """Every save interval, plus the last iteration (37 checkpoints for 72 661 iterations / 2000)."""
    iters = list(range(save_interval, train_iters, save_interval))
    return tuple(iters + [train_iters])


def throughput_tokens_per_gpu_s(spec: ModelSpec, resources: dict, cluster: dict) -> float:
    if resources["tokens_per_gpu_second"]:
        return float(resources["tokens_per_gpu_second"])
    achieved = cluster["peak_tflops_per_gpu"] * 1e12 * cluster["assumed_mfu"]
    return achieved / spec.flops_per_token(with_attention=True)


def segments_from(start: int, checkpoints: tuple[int, ...], segment_iters: int) -> tuple[int, ...]:
    """Segment ends after ``start``: each the furthest checkpoint within ``segment_iters`` of the
    previous end (checkpoints are at most one save interval ≤ ``segment_iters`` apart)."""
    ends, last = [], start
    pending = [c for c in checkpoints if c > start]
    for i, c in enumerate(pending):
        following = pending[i + 1] if i + 1 < len(pending) else None
        if following is None or following - last > segment_iters:
            ends.append(c)
            last = c
    return tuple(ends)


def _selected_eval_iters(checkpoints: tuple[int, ...], evaluation: dict, where: str) -> tuple[int, ...]:
    if evaluation["iterations"] is not None:
        missing = sorted(set(evaluation["iterations"]) - set(checkpoints))
        if missing:
            raise ConfigError(
                f"evaluation.iterations: {missing} are not saved checkpoints of {where} "
                f"(checkpoints every save_interval and at the last iteration {checkpoints[-1]})"
            )
        return tuple(sorted(set(evaluation["iterations"]) | {checkpoints[-1]}))
    every = evaluation["every"]
    chosen = checkpoints[every - 1 :: every]
    return tuple(sorted(set(chosen) | {checkpoints[-1]}))


def build_run(config: dict, experiment: dict, exp_index: int, dataset: str, scale_name: str, budget) -> Run:
    scale = config["scales"][scale_name]
    recipe_name = experiment["recipe"]
    recipe = dict(config["recipes"][recipe_name])
    if recipe["global_batch_size"] is None:
        recipe["global_batch_size"] = scale["global_batch_size"]
    base_id = run_id_for(scale_name, dataset, budget, recipe["seq_length"], experiment["suffix"])
    override = config["overrides"].get(base_id, {})
    resources = dict(scale["resources"])
    scale_fields = dict(scale)
    for key, value in override.items():
        if key in _SCALE_OVERRIDE_KEYS:
            scale_fields[key] = value
        elif key in _RESOURCE_OVERRIDE_KEYS:
            resources[key] = value
        elif key not in _RUN_OVERRIDE_KEYS:
            recipe[key] = value
    run_id = run_id_for(scale_name, dataset, budget, recipe["seq_length"], experiment["suffix"])
    where = f"run {run_id} (experiments[{exp_index}])"
    spec = ModelSpec.from_config(scale_name, scale_fields, seq_length=recipe["seq_length"])
    gbs, seq = recipe["global_batch_size"], recipe["seq_length"]
    tokens = budget_tokens(budget)
    train_iters = math.ceil(tokens / (gbs * seq))
    if recipe["warmup_iters"] >= train_iters:

        def source(key: str, fallback: str | None = None) -> str:
            if key in override:
                return f"overrides.{base_id}.{key}"
            if fallback and config["recipes"][recipe_name].get(key) is None:
                return fallback
            return f"recipes.{recipe_name}.{key}"

        budget_key = f"experiments[{exp_index}].budgets[{experiment['budgets'].index(budget)}]"
        raise ConfigError(
            f"{where}: the warm-up does not fit: {source('warmup_iters')} = {recipe['warmup_iters']} >= its "
            f"{train_iters} iterations = ceil({budget_key} = {budget} tokens / "
            f"({source('global_batch_size', f'scales.{scale_name}.global_batch_size')} = {gbs} x "
            f"{source('seq_length')} = {seq})); lower warmup_iters (for this run: overrides.{base_id}.warmup_iters), "
            "raise the budget or shorten seq_length"
        )

    ranks = resources["nodes"] * max(resources["gpus_per_node"], 1)
    model_parallel = resources["tensor_parallel"] * resources["pipeline_parallel"]
    if ranks % model_parallel:
        raise ConfigError(
            f"scales.{scale_name}.resources: {ranks} ranks not divisible by tensor_parallel x pipeline_parallel "
            f"= {model_parallel}"
        )
    data_parallel = ranks // model_parallel
    if gbs % (resources["micro_batch_size"] * data_parallel):
        raise ConfigError(
            f"{where}: global_batch_size {gbs} is not divisible by micro_batch_size "
            f"{resources['micro_batch_size']} x data-parallel size {data_parallel} "
            f"(scales.{scale_name}.resources: nodes {resources['nodes']}, gpus_per_node {resources['gpus_per_node']})"
        )

    save_interval = recipe["save_interval"]
    checkpoints = checkpoint_schedule(train_iters, save_interval)
    cluster = config["cluster"]
    tokens_per_gpu_s = throughput_tokens_per_gpu_s(spec, resources, cluster)
    tokens_per_s = tokens_per_gpu_s * ranks
    seconds_per_iter = gbs * seq / tokens_per_s
    walltime_s = walltime_minutes(resources["walltime"]) * 60
    if resources["segment_iters"]:
        segment_iters = resources["segment_iters"]
        if segment_iters % save_interval:
            raise ConfigError(
                f"scales.{scale_name}.resources.segment_iters: {segment_iters} is not a multiple of "
                f"save_interval {save_interval} of {where}"
            )
    else:
        usable = walltime_s * cluster["walltime_safety"]
        segment_iters = int(usable / seconds_per_iter) // save_interval * save_interval
        if segment_iters < save_interval:
            raise ConfigError(
                f"scales.{scale_name}.resources.walltime: {resources['walltime']} is shorter than one save "
                f"interval of {where} ({save_interval} iterations ≈ {save_interval * seconds_per_iter / 3600:.1f} h "
                f"at the estimated throughput); raise walltime or lower save_interval"
            )
    segments = segments_from(0, checkpoints, segment_iters)
    gpu_hours = train_iters * gbs * seq / tokens_per_gpu_s / 3600
    cooldown = int(recipe["cooldown_fraction"] * train_iters) if recipe["schedule"] == "wsd" else 0
    return Run(
        run_id=run_id,
        experiment=experiment.get("name", f"experiments[{exp_index}]"),
        dataset=dataset,
        scale=scale_name,
        budget=str(budget),
        tokens=tokens,
        recipe_name=recipe_name,
        spec=spec,
        recipe=recipe,
        resources=resources,
        global_batch_size=gbs,
        seq_length=seq,
        train_iters=train_iters,
        cooldown_iters=cooldown,
        checkpoint_iters=checkpoints,
        eval_iters=_selected_eval_iters(checkpoints, config["evaluation"], where),
        segment_ends=segments,
        reference_run=override.get("reference_run"),
        parity_tolerance=override.get("parity_tolerance", config["evaluation"]["parity_tolerance"]),
        gpu_hours=gpu_hours,
        hours_per_segment=min(segment_iters, train_iters) * seconds_per_iter / 3600,
        segment_iters=segment_iters,
    )


# Recipe keys a cool-down branch must share with its parent: up to the branch point the two runs
# are one trajectory (same data order, same optimizer, same constant learning rate).
_BRANCH_SHARED_KEYS = (
    "schedule",
    "lr",
    "min_lr",
    "warmup_iters",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "weight_decay",
    "clip_grad",
    "seed",
    "split",
    "precision",
)


def make_branch(run: Run, parent: Run, where: str, config: dict) -> tuple[Run, Run]:
    """(branch, parent with the branch point added to its checkpoints) for a WSD cool-down branch.

    The branch's schedule is the WSD schedule of its own budget: warm-up and constant phase equal
    the parent's, so the branch starts from the parent's checkpoint at the first iteration of its
    own cool-down, ``k = train_iters - cooldown_iters``, and trains only ``k+1 … train_iters``.
    """
    problems = []
    if run.recipe["schedule"] != "wsd":
        problems.append(f"schedule is {run.recipe['schedule']!r}, cool-down branches need 'wsd'")
    for key in _BRANCH_SHARED_KEYS:
        if run.recipe[key] != parent.recipe[key]:
            problems.append(f"{key} {run.recipe[key]!r} differs from the parent's {parent.recipe[key]!r}")
    for name in ("global_batch_size", "seq_length", "spec"):
        if getattr(run, name) != getattr(parent, name):
            problems.append(f"{name} differs from the parent's")
    branch_at = run.train_iters - run.cooldown_iters
    stable_end = parent.train_iters - parent.cooldown_iters
    if run.train_iters >= parent.train_iters:
        problems.append(f"its {run.train_iters} iterations are not fewer than the parent's {parent.train_iters}")
    elif branch_at > stable_end:
        problems.append(
            f"its cool-down starts at iteration {branch_at}, after the parent's stable phase ends ({stable_end})"
        )
    if branch_at <= run.recipe["warmup_iters"]:
        problems.append(f"its cool-down starts at iteration {branch_at}, inside the warm-up")
    if problems:
        raise ConfigError(f"{where}: run {run.run_id} cannot branch from {parent.run_id}: " + "; ".join(problems))
    checkpoints = tuple(c for c in run.checkpoint_iters if c > branch_at)
    segments = segments_from(branch_at, checkpoints, run.segment_iters)
    branch = dataclasses.replace(
        run,
        parent_run=parent.run_id,
        branch_iteration=branch_at,
        checkpoint_iters=checkpoints,
        eval_iters=_selected_eval_iters(checkpoints, config["evaluation"], f"run {run.run_id}"),
        segment_ends=segments,
        gpu_hours=run.gpu_hours * (run.train_iters - branch_at) / run.train_iters,
    )
    parent = dataclasses.replace(parent, checkpoint_iters=tuple(sorted({*parent.checkpoint_iters, branch_at})))
    return branch, parent


def _apply_branches(config: dict, runs: dict[str, Run], built: list[tuple[int, Run]]) -> None:
    for i, experiment in enumerate(config["experiments"]):
        if experiment["branch_from"] is None:
            continue
        where = f"experiments[{i}].branch_from"
        if str(experiment["branch_from"]) not in map(str, experiment["budgets"]):
            raise ConfigError(f"{where}: {experiment['branch_from']!r} is not one of the experiment's budgets")
        for index, run in built:
            if index != i or run.budget == str(experiment["branch_from"]):
                continue
            parent_id = run_id_for(
                run.scale, run.dataset, experiment["branch_from"], run.seq_length, experiment["suffix"]
            )
            runs[run.run_id], runs[parent_id] = make_branch(run, runs[parent_id], where, config)


def expand_grid(config: dict[str, Any]) -> Grid:
    """All runs of the (validated) config, in config order, after ``select``."""
    runs: dict[str, Run] = {}
    origin: dict[str, str] = {}
    built: list[tuple[int, Run]] = []
    for i, experiment in enumerate(config["experiments"]):
        for dataset in experiment["datasets"]:
            for scale in experiment["scales"]:
                for budget in experiment["budgets"]:
                    run = build_run(config, experiment, i, dataset, scale, budget)
                    if run.run_id in runs:
                        raise ConfigError(
                            f"experiments[{i}]: duplicate run id {run.run_id!r} (also from {origin[run.run_id]}); "
                            "give one experiment a suffix"
                        )
                    runs[run.run_id] = run
                    origin[run.run_id] = f"experiments[{i}]"
                    built.append((i, run))
    _apply_branches(config, runs, built)
    # the release file's per-run deviations (the 0.13B C4 run's batch) stay in every overlay's merged
    # config; they apply when that run is in the grid and are not an error when it is not
    unknown = sorted(set(config["overrides"]) - set(runs) - release_override_ids())
    if unknown:
        raise ConfigError(
            f"overrides: no run with id {', '.join(map(repr, unknown))} in the grid (known: "
            f"{', '.join(runs) if len(runs) <= 12 else ', '.join(list(runs)[:12]) + ', ...'})"
        )
    select = config["select"]
    if select:
        missing = sorted(set(select.get("runs", [])) - set(runs))
        if missing:
            raise ConfigError(f"select.runs: no run with id {', '.join(map(repr, missing))} in the grid")
        chosen = {
            rid
            for rid, r in runs.items()
            if (not select.get("runs") or rid in select["runs"])
            and (not select.get("datasets") or r.dataset in select["datasets"])
            and (not select.get("scales") or r.scale in select["scales"])
        }
        chosen |= {p for p in (runs[rid].parent_run for rid in chosen) if p}  # a branch needs its parent
        runs = {rid: r for rid, r in runs.items() if rid in chosen}
    from osref.released_models import build_released  # it imports this module

    released = build_released(config)
    if not config["experiments"] and not released:
        raise ConfigError("experiments: empty, and released.models names no released model: nothing to plan")
    return Grid(config=config, runs=runs, layout=Layout.from_config(config), released=released)


def load_grid(config: dict[str, Any] | str | Path) -> Grid:
    """Validate a config (a dict, filled in place, or a YAML path) and expand its grid."""
    if isinstance(config, dict):
        validate(config)
    else:
        config = load_config(config)
    return expand_grid(config)


@functools.cache
def release_override_ids() -> frozenset[str]:
    """Run ids that ``config/config.yaml``'s ``overrides`` name (see :func:`expand_grid`)."""
    return frozenset((read_yaml(RELEASE_CONFIG) or {}).get("overrides") or {})


# ---- the same recipe as the reference runs -----------------------------------------------------------

# run.json keys that change how a run is laid out on the machine, not what it learns (micro-batches,
# parallel layout, optimizer sharding, recompute, device, how often it saves)
LAYOUT_KEYS = frozenset(
    {"micro_batch_size", "tensor_parallel", "pipeline_parallel", "distributed_optimizer", "overlap_grad_reduce",
     "recompute", "device", "save_interval"}
)  # fmt: skip


@functools.cache
def release_grid() -> Grid:
    """The release grid (``config/config.yaml``): the recipe each reference run was trained with
    (its ``overrides`` hold the release's per-run deviations, e.g. the 0.13B C4 run's batch of 1024)."""
    return load_grid(RELEASE_CONFIG)


def recipe_values(grid: Grid, run: Run) -> dict[str, Any]:
    """The training-relevant values of a run, flat: ``global_batch_size``, ``train_iters``, ``lr``,
    ``warmup_iters``, ``cooldown_iters``, ``seq_length``, ``split``, ``seed``, ... and the architecture
    as ``model.hidden_size`` etc. The run identity's values (:func:`osref.run_identity.identity`)
    without data, paths and :data:`LAYOUT_KEYS`."""
    from osref.run_identity import identity

    ident = identity(run_document(grid, run))
    values = {key: value for key, value in ident["train"].items() if key not in LAYOUT_KEYS}
    values.update({f"model.{key}": value for key, value in ident["model"].items() if key != "seq_length"})
    values["tokenizer.sha256"] = ident["tokenizer"].get("sha256")
    return values


def reference_runs_for(grid: Grid, run: Run) -> list[Run]:
    """The release runs a run is compared with: of the same scale and tokens, among the config's
    ``references``; only its own dataset's when the run reproduces one of them."""
    wanted = grid.config.get("references") or reference_datasets()
    same = {
        r.dataset: r
        for r in release_grid().runs.values()
        if r.scale == run.scale and r.tokens == run.tokens and r.dataset in wanted
    }
    return [same[run.dataset]] if run.dataset in same else list(same.values())


def recipe_differences(grid: Grid, run: Run) -> tuple[dict[str, Any], ...]:
    """Every training-relevant value of ``run`` that differs from a reference run of the same scale
    and budget (:func:`reference_runs_for`): ``{"key", "run", "reference", "versus", "reference_run"}``,
    ``versus`` the reference's dataset and ``reference_run`` its run id; () when the recipe is the same."""
    ours = recipe_values(grid, run)
    release = release_grid()
    out = []
    for ref in reference_runs_for(grid, run):
        theirs = recipe_values(release, ref)
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                out.append(
                    {"key": key, "run": ours.get(key), "reference": theirs.get(key), "versus": ref.dataset,
                     "reference_run": ref.run_id}
                )  # fmt: skip
    return tuple(out)


def describe_recipe_differences(differences: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> str:
    """``"vs c4 (0.13b-c4-300B-4096): global_batch_size 1008 (reference 1024), ..."``, one clause per
    reference, identical clauses merged (``"vs c4, pile: ..."``); "" when there is none."""
    by_reference: dict[str, list[str]] = {}
    for d in differences:
        by_reference.setdefault(d["reference_run"], []).append(
            f"{d['key']} {d['run']!r} (reference {d['reference']!r})"
        )
    merged: dict[str, list[str]] = {}
    for ref_id, values in by_reference.items():
        merged.setdefault(", ".join(values), []).append(ref_id)
    return "; ".join(f"vs {', '.join(ids)}: {values}" for values, ids in merged.items())


# ---- outputs --------------------------------------------------------------------------------------


def run_document(grid: Grid, run: Run) -> RunDocument:
    """The resolved run (``run.json``) that the training, export and evaluation scripts read."""
    recipe, resources, layout = run.recipe, run.resources, grid.layout
    config = grid.config
    device = config["cluster"]["device"]
    on_gpu = device == "cuda"
    # the recipe keys that reach run.json unchanged (the others are resolved below)
    copied = ("schedule", "lr", "min_lr", "warmup_iters", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay",
              "clip_grad", "save_interval", "seed", "split", "log_interval", "eval_iters", "tensorboard")  # fmt: skip
    train = TrainSettings(
        **{key: recipe[key] for key in copied},
        cooldown_iters=run.cooldown_iters,
        train_iters=run.train_iters,
        global_batch_size=run.global_batch_size,
        micro_batch_size=resources["micro_batch_size"],
        seq_length=run.seq_length,
        checkpoint_iters=run.checkpoint_iters,
        segment_ends=run.segment_ends,
        precision=recipe["precision"] if on_gpu else "fp32",
        device=device,
        tensor_parallel=resources["tensor_parallel"],
        pipeline_parallel=resources["pipeline_parallel"],
        # activation recompute saves GPU memory; on CPU it only costs time (and megatron's
        # checkpointed attention builds its mask on CUDA)
        recompute=recipe["recompute"] if on_gpu else "none",
        distributed_optimizer=recipe["distributed_optimizer"] and on_gpu,
        overlap_grad_reduce=recipe["overlap_grad_reduce"] and on_gpu,
        kernels=_kernels(recipe, device),
    )
    return RunDocument(
        run_id=run.run_id,
        experiment=run.experiment,
        scale=run.scale,
        dataset=run.dataset,
        budget=run.budget,
        tokens=run.tokens,
        model=run.spec,
        train=train,
        data=DataSettings(prefixes=tuple(grid.data_prefixes(run.dataset, run.run_id)), cache_dir=layout.index_cache()),
        tokenizer=TokenizerSettings.from_json(
            {**config["tokenizer"], "path": repo_relative(config["tokenizer"]["path"])}, "tokenizer"
        ),
        run_dir=layout.run_dir(run.run_id),
        branch=_branch_settings(grid, run),
    )


def _kernels(recipe: dict[str, Any], device: str) -> dict[str, Any]:
    """The recipe's fused kernels for this device (osref/kernels.py): none on the CPU (they only add
    compile time there); megatron's fused cross-entropy only in bf16 (its logit gradient is bf16)."""
    kernels = dict(recipe["kernels"])
    if device != "cuda":
        return {key: False for key in kernels if key != "sdpa_backends"} | {"sdpa_backends": None}
    kernels["fused_cross_entropy"] = kernels["fused_cross_entropy"] and recipe["precision"] == "bf16"
    return kernels


def _branch_settings(grid: Grid, run: Run) -> BranchSettings | None:
    """Where a cool-down branch starts: the parent's run directory and checkpoint iteration, and
    the parent's length, which sizes the data so that the branch reads the parent's sample order."""
    if not run.parent_run:
        return None
    parent = grid.runs[run.parent_run]
    return BranchSettings(
        parent_run_id=parent.run_id,
        parent_run_dir=grid.layout.run_dir(parent.run_id),
        iteration=run.branch_iteration,
        parent_train_iters=parent.train_iters,
    )
