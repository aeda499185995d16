"""Your dataset next to the references: the overlay on the release config, the same recipe, and the
plan before spending (epochs from a local corpus's bytes, disk per stage). Config level, no Snakemake
run (tests/test_overlay_workflow.py runs the overlay through Snakemake)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from osref.config import RELEASE_CONFIG, ConfigError, merge_config, read_yaml, with_release_config
from osref.grid import load_grid, recipe_differences
from osref.plan import DEFAULT_TOKENS_PER_BYTE, plan_rows
from osref.workflow import WorkflowIndex

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = ROOT / "config" / "examples" / "my-dataset.yaml"
USER_RUN = "0.13b-my-dataset-300B-4096"


def stacked(overlay: dict) -> dict:
    """`--configfile config/config.yaml overlay.yaml`, merged as Snakemake merges them."""
    return merge_config(read_yaml(RELEASE_CONFIG), copy.deepcopy(overlay))


def overlay(**experiment) -> dict:
    config = read_yaml(OVERLAY)
    config["experiments"][0].update(experiment)
    return config


def test_the_overlay_with_only_the_new_dataset():
    """An experiment of only the new dataset: the release's override of the 0.13B C4 run (not in the
    grid) is no error, and the overlay given alone makes the same grid as stacked on the release file."""
    grid = load_grid(stacked(read_yaml(OVERLAY)))
    assert list(grid.runs) == [USER_RUN]
    assert set(grid.config["datasets"]) == {*read_yaml(RELEASE_CONFIG)["datasets"], "my-dataset"}
    alone = load_grid(with_release_config(read_yaml(OVERLAY)))  # no `scales`: on top of the release file
    assert alone.config == grid.config and list(alone.runs) == [USER_RUN]
    run = grid.runs[USER_RUN]
    assert (run.global_batch_size, run.train_iters, run.recipe["lr"], run.recipe["warmup_iters"]) == (
        1008,
        72661,
        0.004,
        25000,
    )


def test_the_overlay_with_reference_runs_in_the_grid():
    """datasets: [my-dataset, c4]: the C4 reference runs are retrained with the release's recipe (the
    0.13B one with its batch of 1024 / 71 526 iterations), the user's with the reference recipe of
    its scale (0.4B: batch 1000)."""
    grid = load_grid(stacked(overlay(datasets=["my-dataset", "c4"], scales=["0.13b", "0.4b"])))
    runs = grid.runs
    assert sorted(runs) == sorted(
        ["0.13b-my-dataset-300B-4096", "0.4b-my-dataset-300B-4096", "0.13b-c4-300B-4096", "0.4b-c4-300B-4096"]
    )
    assert (runs["0.13b-c4-300B-4096"].global_batch_size, runs["0.13b-c4-300B-4096"].train_iters) == (1024, 71526)
    assert runs["0.4b-my-dataset-300B-4096"].global_batch_size == 1000
    assert runs["0.4b-my-dataset-300B-4096"].train_iters == 73243
    for run_id in ("0.4b-my-dataset-300B-4096", "0.13b-c4-300B-4096", "0.4b-c4-300B-4096"):
        assert recipe_differences(grid, runs[run_id]) == (), run_id


def test_an_override_of_the_overlay_that_names_no_run_is_an_error():
    config = read_yaml(OVERLAY)
    config["overrides"] = {"0.13b-my-dataset-1T-4096": {"lr": 0.002}}  # a typo for the 300B run
    with pytest.raises(ConfigError, match=r"overrides: no run with id '0.13b-my-dataset-1T-4096' in the grid"):
        load_grid(stacked(config))


def test_the_recipe_mismatch_names_the_values_in_plan_and_report_manifest():
    """At 0.13B the C4 reference ran with 1024 sequences per batch; a run of the user's with another LR
    differs from every reference: plan.csv's recipe_differences, its warning and the report manifest
    name each value."""
    config = read_yaml(OVERLAY)
    config["overrides"] = {USER_RUN: {"lr": 0.002}}
    grid = load_grid(stacked(config))
    row = next(r for r in plan_rows(grid) if r["run_id"] == USER_RUN)
    text = row["recipe_differences"]
    assert (
        "vs 0.13b-c4-300B-4096: cooldown_iters 14532 (reference 14305), global_batch_size 1008 (reference 1024), "
        "lr 0.002 (reference 0.004), train_iters 72661 (reference 71526)"
    ) in text
    # the seven others differ only in the LR: one clause for all of them
    assert "; vs 0.13b-pile-300B-4096, 0.13b-slimpajama-300B-4096, " in text
    assert text.endswith(", 0.13b-commoncorpus-300B-4096: lr 0.002 (reference 0.004)")
    assert "a different recipe from the reference runs of its scale and budget: " + text in row["warning"]
    index = WorkflowIndex(grid)
    assert any(text in w for w in index.plan_warnings())
    manifest = index.report_manifest()
    differences = manifest["runs"][0]["recipe_differences"]
    assert {"key": "global_batch_size", "run": 1008, "reference": 1024, "versus": "c4",
            "reference_run": "0.13b-c4-300B-4096"} in differences  # fmt: skip
    assert {d["versus"] for d in differences if d["key"] == "lr"} == {
        "c4", "commoncorpus", "dclm", "fineweb-edu-1.4t", "hplt-2.0", "nemotron-cc-hq", "pile", "slimpajama"
    }  # fmt: skip
    assert "references" not in manifest  # the default: every reference dataset (the report's rule)


def test_references_key_narrows_the_comparison_and_names_unknown_datasets():
    config = read_yaml(OVERLAY)
    config["references"] = ["dclm", "fineweb-edu-1.4t"]
    grid = load_grid(stacked(config))
    assert recipe_differences(grid, grid.runs[USER_RUN]) == ()  # C4's batch is not compared with
    assert WorkflowIndex(grid).report_manifest()["references"] == ["dclm", "fineweb-edu-1.4t"]
    config["references"] = ["dclm", "fineweb"]
    with pytest.raises(ConfigError, match=r"references\[1\]: 'fineweb' is not a dataset of config/reference/runs.csv"):
        load_grid(stacked(config))


# ---- plan before spending -------------------------------------------------------------------------------


def test_epochs_from_a_local_corpus_bytes_before_tokenization(tmp_path):
    corpus = tmp_path / "mine.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200)))
    size = corpus.stat().st_size
    config = read_yaml(OVERLAY)
    config["datasets"]["my-dataset"].update({"paths": [str(corpus)], "format": "jsonl"})
    config["paths"] = {"data": str(tmp_path / "data"), "runs": str(tmp_path / "runs"), "results": str(tmp_path)}
    grid = load_grid(stacked(config))
    row = next(r for r in plan_rows(grid) if r["run_id"] == USER_RUN)
    tokens = size * DEFAULT_TOKENS_PER_BYTE["jsonl"]
    assert row["dataset_tokens"] == pytest.approx(tokens)
    assert row["dataset_tokens_source"] == (
        f"before tokenization: {size:.4g} bytes of local files x 0.259 tokens/byte (default for jsonl)"
    )
    assert row["epochs"] == pytest.approx(72661 * 1008 * 4096 / tokens, rel=1e-3)
    assert (
        f"needs {row['epochs']:,.1f} epochs of my-dataset (more than plan.warn_epochs = 4): it trains "
        f"3e+11 tokens, my-dataset holds ~{tokens:.4g} (before tokenization: {size:.4g} bytes"
    ) in row["warning"]
    assert row["disk_raw_bytes"] == size
    config["datasets"]["my-dataset"]["max_documents"] = 20  # the estimate cannot see the cut: it says so
    row = next(r for r in plan_rows(load_grid(stacked(config))) if r["run_id"] == USER_RUN)
    assert row["dataset_tokens"] == pytest.approx(tokens)
    assert row["dataset_tokens_source"].endswith("; at most, as max_documents = 20 per group is not counted")
    assert "per group is not counted)" in row["warning"]


def test_plan_disk_per_stage_and_evaluation_gpu_hours():
    """1.7B DCLM 300B: 37 checkpoints of 14 bytes per parameter (bf16), 37 bf16 exports, raw and
    tokenized data of the 49 of 512 groups it reads, and the evaluation's GPU-hours."""
    grid = load_grid(RELEASE_CONFIG)
    row = next(r for r in plan_rows(grid) if r["run_id"] == "1.7b-dclm-300B-4096")
    params = grid.runs["1.7b-dclm-300B-4096"].params
    assert (row["checkpoints"], row["evaluated_checkpoints"], row["data_groups"]) == (37, 37, 49)
    assert row["disk_checkpoint_bytes"] == round(params * 14 * 37)
    assert row["disk_export_bytes"] == params * 2 * 37
    assert row["disk_raw_bytes"] == round(5.6e12 * 49 / 512)
    assert row["disk_tokenized_bytes"] == round(5.6e12 * 0.68 * 49 / 512 * 2)
    assert row["eval_gpu_hours"] > 0 and row["recipe_differences"] == "" and row["warning"] == ""
