"""The path layout, in one place.

Every file the workflow reads or writes is named here; the Snakemake rules, the stage scripts and
the tests call these functions, so a layout change is one edit. Arguments may be concrete values
or Snakemake wildcards (``"{run_id}"``), which is how the rules build their patterns.

    {data}/raw/{dataset}/listing.json              file list of the dataset, grouped (download)
    {data}/raw/{dataset}/local_hashes.json         local source: sha256 cache keyed by size + mtime
    {data}/raw/{dataset}/group_{g}/manifest.json   one download group, with sizes and hashes
    {data}/tokenized/{dataset}/group_{g}.bin|.idx  Megatron binaries of that group (+ .stats.json)
    {data}/tokenized/{dataset}/manifest.json       totals over the dataset's groups
    {runs}/{run_id}/run.json                       the fully resolved run (model, recipe, data)
    {runs}/{run_id}/checkpoints/iter_{i}/          torch_dist checkpoints (never deleted by Snakemake)
    {runs}/{run_id}/train/segment_{i}.json         marker of a training job that ended at iteration i
    {runs}/{run_id}/train.lock                     held by the running segment (osref.training, osref.locks)
    {runs}/{run_id}/hf/iter_{i}/                   Hugging Face export of checkpoint i (.iter_{i}.lock while written)
    {runs}/{run_id}/eval/iter_{i}/{group}.json     lm-eval results of one shot group
    {runs}/released/{name}/listing.json            refs of a released model's hub repo (resolved commits)
    {runs}/released/{name}/fetched/iter_{i}/       one downloaded revision (deleted once converted, by default)
    {runs}/released/{name}/run.json|hf/|eval/      as for our runs, with run_id "released/{name}"
    {results}/plan.csv, {results}/report/          the plan and the report
    {results}/released/results.csv|reproduction.csv  released evaluations, next to the published values
    {results}/logs/{stage}/...                     one log per job
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def fmt_iter(iteration: int | str) -> str:
    return f"{iteration:07d}" if isinstance(iteration, int) else iteration


def fmt_group(group: int | str) -> str:
    return f"{group:03d}" if isinstance(group, int) else group


def local_hash_cache(listing: str | Path) -> str:
    """The sha256 cache of a local dataset's source files lives next to its listing."""
    return str(Path(listing).with_name("local_hashes.json"))


@dataclass(frozen=True)
class Layout:
    data: str
    runs: str
    results: str

    @classmethod
    def from_config(cls, config: dict) -> Layout:
        paths = config["paths"]
        return cls(*(paths[k].rstrip("/") for k in ("data", "runs", "results")))

    # ---- data ----------------------------------------------------------------------------
    def listing(self, dataset: str) -> str:
        return f"{self.data}/raw/{dataset}/listing.json"

    def local_hash_cache(self, dataset: str) -> str:
        return local_hash_cache(self.listing(dataset))

    def download_dir(self, dataset: str, group: int | str) -> str:
        return f"{self.data}/raw/{dataset}/group_{fmt_group(group)}"

    def download_manifest(self, dataset: str, group: int | str) -> str:
        return f"{self.download_dir(dataset, group)}/manifest.json"

    def tokenized_prefix(self, dataset: str, group: int | str) -> str:
        return f"{self.data}/tokenized/{dataset}/group_{fmt_group(group)}"

    def tokenized_files(self, dataset: str, group: int | str) -> dict[str, str]:
        prefix = self.tokenized_prefix(dataset, group)
        return {"bin": f"{prefix}.bin", "idx": f"{prefix}.idx", "stats": f"{prefix}.stats.json"}

    def tokenized_manifest(self, dataset: str) -> str:
        return f"{self.data}/tokenized/{dataset}/manifest.json"

    def index_cache(self) -> str:
        return f"{self.data}/index_cache"

    def eval_tasks_dir(self) -> str:
        return f"{self.data}/eval_tasks"

    # ---- runs ----------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}"

    def run_json(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}/run.json"

    def checkpoints(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}/checkpoints"

    def segment_marker(self, run_id: str, end: int | str) -> str:
        return f"{self.runs}/{run_id}/train/segment_{fmt_iter(end)}.json"

    def hf_dir(self, run_id: str, iteration: int | str) -> str:
        return f"{self.runs}/{run_id}/hf/iter_{fmt_iter(iteration)}"

    def eval_json(self, run_id: str, iteration: int | str, group: str) -> str:
        return f"{self.runs}/{run_id}/eval/iter_{fmt_iter(iteration)}/{group}.json"

    def train_metrics(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}/logs/train_metrics.jsonl"

    def valid_metrics(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}/logs/valid_metrics.jsonl"

    # ---- released checkpoints (run_id "released/{name}" for run_json, hf_dir, eval_json) ---------
    def released_run(self, name: str) -> str:
        return f"released/{name}"

    def released_listing(self, name: str) -> str:
        return f"{self.runs}/released/{name}/listing.json"

    def released_fetch_dir(self, name: str, iteration: int | str) -> str:
        return f"{self.runs}/released/{name}/fetched/iter_{fmt_iter(iteration)}"

    def released_results_dir(self) -> str:
        return f"{self.results}/released"

    # ---- results -------------------------------------------------------------------------
    def plan_csv(self) -> str:
        return f"{self.results}/plan.csv"

    def report_dir(self) -> str:
        return f"{self.results}/report"

    def report_manifest(self) -> str:
        return f"{self.results}/report/manifest.json"

    def log(self, stage: str, *parts: str) -> str:
        return f"{self.results}/logs/{stage}/" + "/".join(parts) + ".log"

    def benchmark(self, stage: str, *parts: str) -> str:
        return f"{self.results}/benchmarks/{stage}/" + "/".join(parts) + ".tsv"
