"""The path layout, in one place.

Every file the workflow reads or writes is named here; the Snakemake rules, the stage scripts and
the tests call these functions, so a layout change is one edit. Arguments may be concrete values
or Snakemake wildcards (``"{run_id}"``), which is how the rules build their patterns.
:class:`Layout` holds the three roots of the config's ``paths``; :class:`RunLayout` is one run
directory, the object the training, checkpoint and export code take (from ``run.json``'s
``paths.run_dir``, :attr:`osref.contracts.RunDocument.layout`). ``REPO_ROOT`` is the checkout
(assets, config/reference, scripts).

    {data}/raw/{dataset}/listing.json              file list of the dataset, grouped (download)
    {data}/raw/{dataset}/local_hashes.json         local source: sha256 cache keyed by size + mtime
    {data}/raw/{dataset}/group_{g}/manifest.json   one download group, with sizes and hashes
    {data}/tokenized/{dataset}/group_{g}.bin|.idx  Megatron binaries of that group (+ .stats.json)
    {data}/tokenized/{dataset}/manifest.json       totals over the dataset's groups
    {runs}/{run_id}/run.json                       the fully resolved run (model, recipe, data)
    {runs}/{run_id}/checkpoints/iter_{i}/          torch_dist checkpoints (never deleted by Snakemake)
    {runs}/{run_id}/checkpoints/run_identity.json  the training-relevant config of the first job
    {runs}/{run_id}/train/segment_{i}.json         marker of a training job that ended at iteration i
    {runs}/{run_id}/train.lock                     held by the running segment (osref.training, osref.locks)
    {runs}/{run_id}/hf/iter_{i}/                   Hugging Face export of checkpoint i (.iter_{i}.lock while written)
    {runs}/{run_id}/logs/train_metrics.jsonl       training / validation metrics (+ valid_metrics.jsonl)
    {runs}/{run_id}/eval/iter_{i}/{shots}.json     lm-eval results of one shot set ("0shot", "10shot")
    {runs}/released/{name}/listing.json            refs of a released model's hub repo (resolved commits)
    {runs}/released/{name}/fetched/iter_{i}/       one downloaded revision (deleted once converted, by default)
    {runs}/released/{name}/run.json|hf/|eval/      as for our runs, with run_id "released/{name}"
    {data}/eval_tasks/tasks.json                   the demo's local lm-eval tasks (marker)
    {results}/hf_home/prefetched.json              the evaluations' shared HF cache, filled once
    {results}/plan.csv, {results}/report/          the plan and the report
    {results}/report_partial/                      the report over what exists (report_partial)
    {results}/released/results.csv|reproduction.csv  released evaluations, next to the published values
    {results}/logs/{stage}/...                     one log per job
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IDENTITY_FILE = "run_identity.json"  # in a run's checkpoints/ (osref.run_identity)
EVAL_TASKS_MARKER = "tasks.json"  # written last into the local tasks' folder (osref.eval_tasks)


def repo_path(*parts: str) -> str:
    """A path inside the checkout (``repo_path("config", "reference")``)."""
    return str(Path(REPO_ROOT, *parts))


def fmt_iter(iteration: int | str) -> str:
    """``20`` -> ``"0000020"``; a wildcard string is kept."""
    return f"{iteration:07d}" if isinstance(iteration, int) else iteration


def fmt_group(group: int | str) -> str:
    """A shard group's number in file names: ``3`` -> ``"003"``; a wildcard string is kept."""
    return f"{group:03d}" if isinstance(group, int) else group


def local_hash_cache(listing: str | Path) -> str:
    """The sha256 cache of a local dataset's source files lives next to its listing."""
    return str(Path(listing).with_name("local_hashes.json"))


def group_files_of_prefix(tokenized_prefix: str | Path) -> dict[str, str]:
    """The files a tokenized group was made from and with, from its prefix
    (``{data}/tokenized/{dataset}/group_{g}``): ``download_manifest`` (the group's source files, with
    sizes and sha256) and ``stats`` (its token and document counts). The run identity's data check
    (:func:`osref.run_identity.data_content`) reads them; ``run.json`` names only prefixes."""
    prefix = Path(tokenized_prefix)
    dataset, group = prefix.parent.name, prefix.name.removeprefix("group_")
    layout = Layout(data=str(prefix.parent.parent.parent), runs="", results="")
    return {
        "download_manifest": layout.download_manifest(dataset, group),
        "stats": layout.tokenized_files(dataset, group)["stats"],
    }


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory (``{runs}/{run_id}``; a released model's too)."""

    run_dir: str

    def path(self, *parts: str) -> Path:
        return Path(self.run_dir, *parts)

    @property
    def run_json(self) -> str:
        return f"{self.run_dir}/run.json"

    @property
    def checkpoints(self) -> str:
        return f"{self.run_dir}/checkpoints"

    def checkpoint(self, iteration: int | str) -> str:
        return f"{self.checkpoints}/iter_{fmt_iter(iteration)}"

    @property
    def identity(self) -> str:
        """The training-relevant config recorded by the run's first job (osref.run_identity)."""
        return f"{self.checkpoints}/{IDENTITY_FILE}"

    @property
    def train_lock(self) -> str:
        """Held by the running training segment (osref.training, osref.locks)."""
        return f"{self.run_dir}/train.lock"

    def segment_marker(self, end: int | str) -> str:
        return f"{self.run_dir}/train/segment_{fmt_iter(end)}.json"

    def hf_dir(self, iteration: int | str) -> str:
        return f"{self.run_dir}/hf/iter_{fmt_iter(iteration)}"

    def eval_json(self, iteration: int | str, shots: str) -> str:
        return f"{self.run_dir}/eval/iter_{fmt_iter(iteration)}/{shots}.json"

    @property
    def train_metrics(self) -> str:
        return f"{self.run_dir}/logs/train_metrics.jsonl"

    @property
    def valid_metrics(self) -> str:
        return f"{self.run_dir}/logs/valid_metrics.jsonl"

    @property
    def tensorboard(self) -> str:
        return f"{self.run_dir}/tensorboard"


@dataclass(frozen=True)
class Layout:
    """The three roots of the config's ``paths`` and everything under them."""

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

    def eval_tasks_marker(self) -> str:
        return f"{self.eval_tasks_dir()}/{EVAL_TASKS_MARKER}"

    # ---- runs (each a RunLayout) -------------------------------------------------------------
    def run(self, run_id: str) -> RunLayout:
        return RunLayout(f"{self.runs}/{run_id}")

    def run_dir(self, run_id: str) -> str:
        return self.run(run_id).run_dir

    def run_json(self, run_id: str) -> str:
        return self.run(run_id).run_json

    def checkpoints(self, run_id: str) -> str:
        return self.run(run_id).checkpoints

    def segment_marker(self, run_id: str, end: int | str) -> str:
        return self.run(run_id).segment_marker(end)

    def hf_dir(self, run_id: str, iteration: int | str) -> str:
        return self.run(run_id).hf_dir(iteration)

    def eval_json(self, run_id: str, iteration: int | str, shots: str) -> str:
        return self.run(run_id).eval_json(iteration, shots)

    def train_metrics(self, run_id: str) -> str:
        return self.run(run_id).train_metrics

    def valid_metrics(self, run_id: str) -> str:
        return self.run(run_id).valid_metrics

    # ---- released checkpoints (run_id "released/{name}" for run_json, hf_dir, eval_json) ---------
    def released_run(self, name: str) -> str:
        return f"released/{name}"

    def released_listing(self, name: str) -> str:
        return f"{self.runs}/released/{name}/listing.json"

    def released_fetch_dir(self, name: str, iteration: int | str) -> str:
        return f"{self.runs}/released/{name}/fetched/iter_{fmt_iter(iteration)}"

    def released_results_dir(self) -> str:
        return f"{self.results}/released"

    def released_results(self) -> dict[str, str]:
        """The tidy released rows and the protocol-reproduction table."""
        out = self.released_results_dir()
        return {"results": f"{out}/results.csv", "reproduction": f"{out}/reproduction.csv"}

    # ---- results -------------------------------------------------------------------------
    def plan_csv(self) -> str:
        return f"{self.results}/plan.csv"

    def report_dir(self, partial: bool = False) -> str:
        """``{results}/report``; ``partial``: ``{results}/report_partial`` (the report over what exists)."""
        return f"{self.results}/report_partial" if partial else f"{self.results}/report"

    def report_manifest(self, partial: bool = False) -> str:
        return f"{self.report_dir(partial)}/manifest.json"

    def report_file(self, name: str, partial: bool = False) -> str:
        """A file (``index.html``, ``results.csv``, ``missing.csv``, ``final_scores.csv``) or the
        ``plots`` folder of the report."""
        return f"{self.report_dir(partial)}/{name}"

    def eval_hf_home(self) -> str:
        """The HF cache shared by all evaluation jobs (filled once by ``prefetch_eval_data``)."""
        return f"{self.results}/hf_home"

    def prefetch_marker(self) -> str:
        return f"{self.eval_hf_home()}/prefetched.json"

    def log(self, stage: str, *parts: str) -> str:
        return f"{self.results}/logs/{stage}/" + "/".join(parts) + ".log"

    def benchmark(self, stage: str, *parts: str) -> str:
        return f"{self.results}/benchmarks/{stage}/" + "/".join(parts) + ".tsv"
