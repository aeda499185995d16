"""Lookup tables that the Snakemake rules read, computed once from the grid.

The ``.smk`` files only wire inputs to outputs; every decision they need — which checkpoints a
run exports, which training job writes a checkpoint, how a training job is launched and with which
cluster resources — is a dictionary lookup into a :class:`WorkflowIndex`. That keeps the Snakefile
readable, makes the decisions unit-testable, and keeps ``snakemake -n`` of the ~6 000-job release
grid close to Snakemake's own cost per job.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from functools import cached_property
from typing import Any

from osref.config import walltime_minutes
from osref.contracts import ReportManifest, ReportRun, parse_protocol
from osref.fingerprint import SourceCheck, check_local_sources, describe_changes
from osref.grid import Grid, Run, recipe_differences, run_document
from osref.paths import REPO_ROOT, fmt_iter, repo_path
from osref.plan import PLAN_DATA_COLUMNS, plan_rows
from osref.protocol import parse_shot_set
from osref.reference import reference_run_ids

# what the report's manifest says of a run, straight from osref.grid.Run
REPORT_RUN_FIELDS = (
    "run_id",
    "dataset",
    "scale",
    "budget",
    "tokens",
    "seq_length",
    "global_batch_size",
    "params",
    "train_iters",
)
LISTING_KEYS = (
    "source",
    "repo_id",
    "revision",
    "allow_patterns",
    "ignore_patterns",
    "paths",
    "urls_file",
    "list_url",
    "list_sha256",
    "base_url",
    "format",
    "shard_groups",
)

WILDCARD_CONSTRAINTS = {
    "run_id": r"[^/]+",
    "dataset": r"[^/]+",
    "group": r"\d{3}",
    "iteration": r"\d{7}",
    "end": r"\d{7}",
    "shots": r"\d+shot",
    "release": r"[^/]+",
}
# The evaluation rule also serves released checkpoints (run_id "released/{name}") and their extra
# tasks (one file "extra-{task}-{k}shot" each); only that rule widens these two wildcards.
EVALUATE_WILDCARD_CONSTRAINTS = {
    "run_id": r"(?:released/)?[^/]+",
    "shots": r"\d+shot|extra-[A-Za-z0-9_.\-]+-\d+shot",
}


class WorkflowIndex:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.layout = grid.layout
        self.config = grid.config
        self.runs = grid.runs
        self._source_checks: dict[str, SourceCheck] = {}
        self._previous_segment: dict[tuple[str, str], list[str]] = {}
        self._segment_of_checkpoint: dict[tuple[str, str], str] = {}
        for run in self.runs.values():
            for end in run.segment_ends:
                prev = run.previous_segment(end)
                if prev:
                    after = [self.layout.segment_marker(run.run_id, prev)]
                elif run.parent_run:  # a cool-down branch starts once its parent has saved the branch point
                    parent = self.runs[run.parent_run]
                    after = [self.layout.segment_marker(parent.run_id, parent.segment_for(run.branch_iteration))]
                else:
                    after = []
                self._previous_segment[(run.run_id, fmt_iter(end))] = after
            for iteration in run.checkpoint_iters:
                self._segment_of_checkpoint[(run.run_id, fmt_iter(iteration))] = self.layout.segment_marker(
                    run.run_id, run.segment_for(iteration)
                )

    # ---- stage targets --------------------------------------------------------------------------
    @cached_property
    def listings(self) -> list[str]:
        return [self.layout.listing(d) for d in self.grid.datasets_in_use]

    @cached_property
    def download_manifests(self) -> list[str]:
        return [
            self.layout.download_manifest(d, g) for d in self.grid.datasets_in_use for g in self.grid.shard_groups(d)
        ]

    @cached_property
    def tokenized(self) -> list[str]:
        """Every group's .bin/.idx/.stats.json and every dataset's manifest."""
        groups = [
            f
            for d in self.grid.datasets_in_use
            for g in self.grid.shard_groups(d)
            for f in self.layout.tokenized_files(d, g).values()
        ]
        return groups + [self.layout.tokenized_manifest(d) for d in self.grid.datasets_in_use]

    def tokenized_stats(self, dataset: str) -> list[str]:
        return [self.layout.tokenized_files(dataset, g)["stats"] for g in self.grid.shard_groups(dataset)]

    @cached_property
    def final_segments(self) -> list[str]:
        return [self.layout.segment_marker(r.run_id, r.train_iters) for r in self.runs.values()]

    @cached_property
    def exports(self) -> list[str]:
        return [self.layout.hf_dir(r.run_id, i) for r in self.runs.values() for i in r.eval_iters]

    @cached_property
    def evaluations(self) -> list[str]:
        return [
            self.layout.eval_json(r.run_id, i, shots)
            for r in self.runs.values()
            for i in r.eval_iters
            for shots in self.grid.shot_sets
        ]

    # ---- per-job lookups --------------------------------------------------------------------------
    def dataset_block(self, dataset: str) -> dict[str, Any]:
        return self.config["datasets"][dataset]

    def listing_params(self, dataset: str) -> dict[str, Any]:
        """The part of a dataset's config that decides its file list (not label, size estimate, ...),
        so that editing a description never re-lists, re-downloads and re-tokenizes a dataset; for a
        local dataset also its content fingerprint (``sources_token``, :mod:`osref.fingerprint`), so that
        an edited file re-lists it and a touched one does not."""
        block = self.config["datasets"][dataset]
        params = {k: block[k] for k in LISTING_KEYS if k in block}
        if block["source"] == "local":
            params["sources_token"] = self.local_sources(dataset).token
        return params

    def local_sources(self, dataset: str) -> SourceCheck:
        """The local dataset's files checked against its listing, once per workflow run; prints what
        changed, since that reruns the dataset's listing and everything after it."""
        if dataset not in self._source_checks:
            check = check_local_sources(
                dataset,
                self.config["datasets"][dataset],
                REPO_ROOT,
                self.layout.listing(dataset),
                self.layout.local_hash_cache(dataset),
            )
            if check.changes:
                print(describe_changes(dataset, check), file=sys.stderr)
            self._source_checks[dataset] = check
        return self._source_checks[dataset]

    @cached_property
    def bad_documents_args(self) -> str:
        """The tokenize command's bad-row policy. Not a rule parameter on purpose: changing it must not
        rerun finished groups, whose bytes are the same under either policy."""
        tokenizer = self.config["tokenizer"]
        return (
            f"--bad-documents {shlex.quote(tokenizer['bad_documents'])} "
            f"--max-bad-fraction {shlex.quote(str(tokenizer['max_bad_fraction']))}"
        )

    def tokenized_inputs(self, run_id: str) -> list[str]:
        """The .bin/.idx of the shard groups this run trains on (not every group of its dataset)."""
        dataset = self.runs[run_id].dataset
        return [
            path
            for g in self.grid.run_groups(run_id)
            for key, path in self.layout.tokenized_files(dataset, g).items()
            if key != "stats"
        ]

    def previous_segment(self, run_id: str, end: str) -> list[str]:
        return self._previous_segment[(run_id, end)]

    def segment_of_checkpoint(self, run_id: str, iteration: str) -> str:
        return self._segment_of_checkpoint[(run_id, iteration)]

    def run_document(self, run_id: str) -> dict[str, Any]:
        """The run_config rule's params: run.json (:class:`osref.contracts.RunDocument` as JSON)."""
        return run_document(self.grid, self.runs[run_id]).to_json()

    @cached_property
    def local_tasks_corpus(self) -> list[str]:
        """Corpus the demo's local eval tasks are built from (the download manifest of group 0)."""
        name = self.config["evaluation"]["local_tasks"]
        return [self.layout.download_manifest(name, 0)] if name else []

    @cached_property
    def prefetch_marker(self) -> list[str]:
        """Hub tasks need their data prefetched on a node with network; local tasks do not."""
        return [] if self.local_tasks_corpus else [self.layout.prefetch_marker()]

    @cached_property
    def eval_tasks_marker(self) -> list[str]:
        """The demo's local lm-eval tasks, when the config builds them (``evaluation.local_tasks``)."""
        return [self.layout.eval_tasks_marker()] if self.local_tasks_corpus else []

    @property
    def python(self) -> str:
        """Interpreter for job commands: Snakemake's own, or the container's `python`."""
        return "python" if self.config["cluster"]["container"] else shlex.quote(sys.executable)

    @cached_property
    def plan_rows(self) -> list[dict[str, Any]]:
        """The plan's rows (:func:`osref.plan.plan_rows`), computed once per workflow run."""
        return plan_rows(self.grid)

    def plan_params(self) -> list[dict[str, Any]]:
        """The plan rows the config decides (the plan rule's params, its rerun trigger)."""
        return [{k: v for k, v in row.items() if k not in PLAN_DATA_COLUMNS} for row in self.plan_rows]

    def plan_warnings(self) -> list[str]:
        """The plan's warnings per training run (too many epochs, from a local dataset's bytes before it
        is tokenized; a recipe that differs from the reference runs'): the Snakefile prints them once
        on every start, dry-runs included, before anything is spent."""
        return [
            f"WARNING {row['run_id']}: {row['warning']}"
            for row in self.plan_rows
            if row.get("source", "train") == "train" and row["warning"]
        ]

    # ---- training launch and resources -------------------------------------------------------------
    def train_resources(self, run_id: str) -> dict[str, Any]:
        res = self.runs[run_id].resources
        nodes, gpus = res["nodes"], res["gpus_per_node"]
        return {
            "nodes": nodes,
            "gres": f"gpu:{gpus}" if gpus else None,
            "tasks_per_gpu": 0,
            "mpi": "srun" if nodes > 1 else None,
            "tasks": nodes if nodes > 1 else None,
            "runtime": walltime_minutes(res["walltime"]),
            "mem_mb": res["mem_mb"],
            "cpus_per_task": res["cpus_per_task"],
        }

    def train_threads(self, run_id: str) -> int:
        res = self.runs[run_id].resources
        if res["gpus_per_node"] == 0:
            return self.config["cluster"]["cpu_threads_per_rank"] * res["nodes"]
        return res["cpus_per_task"]

    def train_launcher(self, run_id: str) -> str:
        """Command prefix that starts ``scripts/train.py`` on every rank of the run."""
        res = self.runs[run_id].resources
        cluster = self.config["cluster"]
        nodes, per_node = res["nodes"], max(res["gpus_per_node"], 1)
        container = f"apptainer exec --nv {shlex.quote(cluster['container'])} " if cluster["container"] else ""
        launcher = cluster["launcher"]
        if launcher == "auto":
            launcher = "srun" if nodes > 1 else "torchrun"
        if launcher == "srun":
            return (
                f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
                f"{container}bash {shlex.quote(repo_path('scripts', 'torchrun_slurm.sh'))} {per_node} {self.python}"
            )
        if per_node == 1:
            return f"{container}{self.python}"
        return f"{container}{self.python} -m torch.distributed.run --standalone --nproc-per-node={per_node}"

    @cached_property
    def eval_resources(self) -> dict[str, Any]:
        res = self.config["cluster"]["eval_resources"]
        return {
            "gres": f"gpu:{res['gpus']}" if res["gpus"] else None,
            "cpus_per_task": res["cpus"],
            "mem_mb": res["mem_mb"],
            "runtime": walltime_minutes(res["walltime"]),
        }

    def train_env(self) -> str:
        cluster = self.config["cluster"]
        env = {"OMP_NUM_THREADS": str(cluster["cpu_threads_per_rank"])}
        if cluster["device"] == "cuda":
            env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
            env.update(cluster["nccl_env"])
        return " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))

    # ---- evaluation: our runs and released checkpoints ----------------------------------------------
    def eval_tasks_json(self, run_id: str, shots: str) -> str:
        """--tasks-json of one evaluation job: the protocol (the script picks the shot set), or the
        one extra task of an ``extra-{task}-{k}shot`` file of a released checkpoint."""
        if parse_shot_set(shots)[1] is not None:
            return json.dumps(self.released_shot_sets[shots])
        return json.dumps(self.grid.protocol)

    @cached_property
    def prefetch_tasks_json(self) -> str:
        """Every task whose data evaluation jobs need: the protocol, then the released extra tasks."""
        tasks = list(self.grid.protocol)
        names = {t["task"] for t in tasks}
        for shots, shot_set in self.released_shot_sets.items():
            for task in shot_set:
                if parse_shot_set(shots)[1] is not None and task["task"] not in names:  # one prefetch per dataset
                    tasks.append(task)
                    names.add(task["task"])
        return json.dumps(tasks)

    # ---- released checkpoints ----------------------------------------------------------------------
    @cached_property
    def released_shot_sets(self) -> dict[str, list[dict[str, Any]]]:
        from osref.released_models import evaluation_shot_sets

        return evaluation_shot_sets(self.config, self.grid.protocol) if self.grid.released else {}

    @cached_property
    def released_listings(self) -> list[str]:
        return [self.layout.released_listing(name) for name in self.grid.released]

    @cached_property
    def released_exports(self) -> list[str]:
        return [self.layout.hf_dir(m.run_id, i) for m in self.grid.released.values() for i in m.iterations]

    @cached_property
    def released_evaluations(self) -> list[str]:
        return [
            self.layout.eval_json(m.run_id, i, shots)
            for m in self.grid.released.values()
            for i in m.iterations
            for shots in self.released_shot_sets
        ]

    @cached_property
    def released_results(self) -> list[str]:
        """The tidy released rows and the protocol-reproduction table (none without released models)."""
        return list(self.layout.released_results().values()) if self.grid.released else []

    def released_model(self, name: str):
        try:
            return self.grid.released[name]
        except KeyError:
            raise KeyError(f"no released model {name!r} in the config (released.models)") from None

    def released_listing_request(self, name: str) -> str:
        from osref.released_models import listing_request

        return json.dumps(listing_request(self.released_model(name)), sort_keys=True)

    def released_revision(self, name: str, iteration: str) -> str:
        model = self.released_model(name)
        if int(iteration) not in model.schedule:
            raise ValueError(f"{iteration} is not a saved iteration of released model {name}")
        return model.revision(int(iteration))

    def released_run_document(self, name: str) -> dict[str, Any]:
        from osref.released_models import run_document as released_document

        return released_document(self.released_model(name)).to_json()

    def released_convert_mem_mb(self, name: str) -> int:
        """Released tensors + the exported model + the reference forward's activations: ~10 bytes per
        parameter at bf16 (fp32 copies are made one tensor at a time), plus 4 GB."""
        return int(self.released_model(name).params * 10 / 2**20) + 4000

    @property
    def released_keep(self) -> str:
        return self.config["released"]["keep"]

    def released_manifest(self) -> dict[str, Any]:
        """What scripts/released.py results reads: the protocol, extra tasks and every model's files."""
        return {
            "protocol": self.grid.protocol,
            "shot_sets": self.released_shot_sets,
            "models": [
                {
                    "name": m.name,
                    "run_id": m.run_id,
                    "repo": m.repo,
                    "reference_run": m.reference_run,
                    "dataset": m.dataset,
                    "scale": m.scale,
                    "budget": m.budget,
                    "params": m.params,
                    "iterations": list(m.iterations),
                    "eval_files": [
                        self.layout.eval_json(m.run_id, i, g) for i in m.iterations for g in self.released_shot_sets
                    ],
                }
                for m in self.grid.released.values()
            ],
        }

    # ---- report ------------------------------------------------------------------------------------
    def reference_run_for(self, run: Run) -> str | None:
        if run.reference_run is not None:
            return run.reference_run
        if run.seq_length != 4096:
            return None
        return reference_run_ids().get((run.scale, run.dataset, run.budget))

    def present_evaluations(self) -> list[str]:
        """The scheduled evaluation files that exist now, each with its mtime (for report_partial)."""
        present = []
        for path in self.evaluations:
            try:
                present.append(f"{path}@{os.stat(path).st_mtime_ns}")
            except FileNotFoundError:
                pass
        return present

    def report_manifest(self) -> dict[str, Any]:
        """The report rule's params: :class:`osref.contracts.ReportManifest` as JSON."""
        runs = []
        for run in self.runs.values():
            files = self.layout.run(run.run_id)
            runs.append(
                ReportRun(
                    **{key: getattr(run, key) for key in REPORT_RUN_FIELDS},
                    checkpoint_iters=run.eval_iters,
                    reference_run=self.reference_run_for(run),
                    eval_files=tuple(files.eval_json(i, s) for i in run.eval_iters for s in self.grid.shot_sets),
                    train_metrics=files.train_metrics,
                    valid_metrics=files.valid_metrics,
                    recipe_differences=recipe_differences(self.grid, run),
                )
            )
        released = self.layout.released_results() if self.grid.released else {}
        return ReportManifest(
            protocol=parse_protocol(self.grid.protocol),
            runs=tuple(runs),
            # None (the config's default): all of config/reference's datasets; left out of the JSON then,
            # so the report of an existing campaign is not rerun for this key
            references=None if self.config["references"] is None else tuple(self.config["references"]),
            released_results=released.get("results"),
            released_reproduction=released.get("reproduction"),
        ).to_json()
