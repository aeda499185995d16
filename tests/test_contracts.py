"""The typed stage documents (osref/contracts.py): run.json and the report manifest.

Campaigns have run.json files written by the previous version on disk, and Snakemake compares a
rule's params by their repr, so the types must read those files and write them back key for key
(tests/data/contracts/ holds files written by main before the types existed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from osref.config import load_config
from osref.contracts import (
    ContractError,
    ReleasedRunDocument,
    ReportManifest,
    RunDocument,
    TrainSettings,
    load_run_document,
)
from osref.grid import expand_grid, load_grid, run_document
from osref.paths import REPO_ROOT
from osref.run_identity import identity
from osref.workflow import WorkflowIndex

DATA = Path(__file__).parent / "data"
CONTRACTS = DATA / "contracts"
OLD_RUNS = {
    "config/demo.yaml": ("tiny-pydocs-0.25M-128", "run_demo_v0.json"),
    "config/config.yaml": ("0.13b-c4-300B-4096", "run_release_0.13b-c4-300B-4096_v0.json"),
}


def _old(name: str) -> dict:
    return json.loads((CONTRACTS / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in CONTRACTS.glob("run_*_v0.json")))
def test_a_run_json_of_the_previous_version_loads_and_writes_back_key_for_key(name):
    document = load_run_document(CONTRACTS / name)
    # repr, not ==: the key order is part of what Snakemake compares (the run_config rule's params)
    assert repr(document.to_json()) == repr(_old(name))


@pytest.mark.parametrize("config", sorted(OLD_RUNS))
def test_run_json_of_this_version_equals_the_previous_one(config):
    """The run_config rule's params are unchanged: no run.json is rewritten, no training reruns."""
    run_id, name = OLD_RUNS[config]
    old = _old(name)
    old["tokenizer"]["path"] = str(REPO_ROOT / "assets" / "gpt-neox-20b")  # written by a checkout elsewhere
    new = WorkflowIndex(load_grid(REPO_ROOT / config)).run_document(run_id)
    assert repr(new) == repr(old)
    assert identity(new) == identity(old)


def test_released_run_json_of_the_previous_version():
    name = "run_released_0.13b-dclm-300B-4096_v0.json"
    document = load_run_document(CONTRACTS / name)
    assert isinstance(document, ReleasedRunDocument)
    assert document.tokens_per_iteration == 1008 * 4096
    index = WorkflowIndex(load_grid(REPO_ROOT / "config" / "released_smoke.yaml"))
    assert repr(index.released_run_document("0.13b-dclm-300B-4096")) == repr(_old(name))


def test_report_manifest_of_the_previous_version():
    old = _old("report_manifest_demo_v0.json")  # as the report rule saves it (keys sorted)
    assert ReportManifest.from_json(old).to_json() == old
    assert WorkflowIndex(load_grid(REPO_ROOT / "config" / "demo.yaml")).report_manifest() == old


def test_every_run_of_the_release_grid_round_trips():
    grid = load_grid(REPO_ROOT / "config" / "config.yaml")
    for run in grid.runs.values():
        document = run_document(grid, run)
        again = RunDocument.from_json(json.loads(json.dumps(document.to_json())))
        assert again == document, run.run_id
        assert repr(again.to_json()) == repr(document.to_json())


def test_a_cool_down_branch_round_trips():
    config = load_config(REPO_ROOT / "config" / "config.yaml")
    config["experiments"] = [
        {"recipe": "open-sci-ref-0.01", "datasets": ["dclm"], "scales": ["1.7b"], "budgets": ["1T", "300B"],
         "branch_from": "1T", "suffix": "br"}
    ]  # fmt: skip
    config["overrides"] = {}
    grid = expand_grid(config)
    branch = next(r for r in grid.runs.values() if r.parent_run)
    document = run_document(grid, branch)
    assert document.branch is not None and document.branch.parent_run_id == branch.parent_run
    assert RunDocument.from_json(json.loads(json.dumps(document.to_json()))) == document


def test_defaults_live_in_the_fields():
    """A hand-written run.json (tests, benchmarks) may leave optional keys out; every reader gets
    the same default from the field."""
    tiny = json.loads((DATA / "tiny_run.json").read_text())
    run = RunDocument.from_json(tiny)
    assert run.train.kernels is None and run.train.tensorboard is False and run.train.overlap_grad_reduce is False
    assert run.train.attention is None and run.train.peak_tflops is None
    assert run.branch is None and run.experiment is None
    assert run.tokens_per_iteration == 8 * 128
    assert run.layout.checkpoint(40) == "REPLACE_IN_TESTS/runs/tiny-demo-0.25M-128/checkpoints/iter_0000040"
    assert "attention" not in run.to_json()["train"]  # a benchmark-only key stays out when unset
    assert TrainSettings.from_json(tiny["train"]) == run.train
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.run_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["train"].pop("lr"), "run.json: train: missing key(s) 'lr'"),
        (lambda d: d["train"].update(learning_rate=1), "run.json: train: unknown key(s) 'learning_rate'"),
        (lambda d: d.pop("paths"), "run.json: missing key 'paths'"),
        (lambda d: d.update(extra=1), "run.json: unknown key(s) 'extra'"),
        (lambda d: d["model"].pop("hidden_size"), "run.json: model: missing key(s) 'hidden_size'"),
    ],
)
def test_a_bad_run_json_names_the_key(edit, message):
    document = _old("run_demo_v0.json")
    edit(document)
    with pytest.raises(ContractError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunDocument.from_json(document)


def test_an_unreadable_run_json_names_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    with pytest.raises(ContractError, match=f"{path}: cannot read the run document"):
        load_run_document(path)


def test_report_manifest_errors_name_the_run_and_key():
    manifest = _old("report_manifest_demo_v0.json")
    broken = copy.deepcopy(manifest)
    del broken["runs"][0]["eval_files"]
    with pytest.raises(ContractError, match=r"manifest runs\[0\] \(tiny-pydocs-0.25M-128\) lacks key 'eval_files'"):
        ReportManifest.from_json(broken)
    broken = copy.deepcopy(manifest)
    broken["runs"].append(broken["runs"][0])
    with pytest.raises(ContractError, match="duplicate run_id"):
        ReportManifest.from_json(broken)


def test_report_manifest_comparison_fields_round_trip():
    old = _old("report_manifest_demo_v0.json")
    document = json.loads(json.dumps(old))
    document["references"] = ["c4", "dclm"]
    document["released_results"] = "results/released/results.csv"
    document["runs"][0]["recipe_differences"] = [{"key": "global_batch_size", "run": 1008, "reference": 1024}]
    manifest = ReportManifest.from_json(document)
    assert manifest.references == ("c4", "dclm")
    assert manifest.runs[0].recipe_differences == ({"key": "global_batch_size", "run": 1008, "reference": 1024},)
    assert ReportManifest.from_json(manifest.to_json()) == manifest
    document["reference"] = ["c4"]  # a typo is named, not ignored
    with pytest.raises(ContractError, match="'reference'"):
        ReportManifest.from_json(document)
