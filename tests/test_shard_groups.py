"""How many shard groups a dataset is fetched and tokenized in, and which of them each run reads.

The listing cuts a dataset's whole file list into `shard_groups` fixed groups; the plan takes the
first n = ceil(total x min(1, tokens read x data_safety / (approx_bytes x tokens_per_byte))) of them
for each run, and a dataset is fetched up to its largest run's n.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from osref.config import ConfigError
from osref.download import assign_groups
from osref.grid import groups_needed, load_grid, run_document, run_group_count, tokens_read
from osref.plan import plan_rows
from osref.workflow import WorkflowIndex

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release_raw() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def grid_of(raw: dict, mutate=None, data_root: Path | None = None):
    config = copy.deepcopy(raw)
    if mutate:
        mutate(config)
    if data_root is not None:
        config["paths"] = {"data": str(data_root / "data"), "runs": str(data_root / "runs"), "results": str(data_root)}
    return load_grid(config)


# ---- the formula -----------------------------------------------------------------------------------


def test_groups_needed_takes_the_share_of_the_dataset_times_the_safety_factor():
    assert groups_needed(100, 30e9, 300e9, 1.0) == 10
    assert groups_needed(100, 30e9, 300e9, 1.2) == 12
    assert groups_needed(100, 30.1e9, 300e9, 1.0) == 11  # a part of a group is a group
    assert groups_needed(64, 0.25, 1.0, 1.0) == 16  # exact products do not round up to 17


def test_a_tiny_budget_still_needs_one_group_and_a_huge_one_needs_all():
    assert groups_needed(512, 1.0, 4e12, 1.2) == 1
    assert groups_needed(512, 4e12, 4e12, 1.0) == 512
    assert groups_needed(512, 9e12, 4e12, 1.2) == 512  # more than the dataset: every group, never more


def test_all_and_single_group_datasets_need_no_size_estimate():
    block = {"shard_groups": 8, "groups_used": "all", "approx_bytes": None, "tokens_per_byte": None, "data_safety": 1.2}
    assert run_group_count(block, "x", 1.0) == 8
    assert run_group_count({**block, "groups_used": "auto", "shard_groups": 1}, "x", 1e15) == 1
    with pytest.raises(ConfigError, match=r"datasets\.x\.approx_bytes, tokens_per_byte"):
        run_group_count({**block, "groups_used": "auto"}, "x", 1.0)


def test_tokens_read_counts_the_train_share_of_the_split(release_raw):
    run = grid_of(release_raw).runs["1.7b-dclm-1T-4096"]
    assert tokens_read(run) == pytest.approx(run.train_iters * 1008 * 4096 * 1000 / 989)


# ---- the release grid ------------------------------------------------------------------------------


def test_release_grid_fetches_only_what_its_largest_run_needs(release_raw):
    grid = grid_of(release_raw)
    # C4 (~156 B tokens) and Pile (~183 B) are smaller than a 300B run: every group
    assert len(grid.shard_groups("c4")) == 32 and len(grid.shard_groups("pile")) == 30
    # DCLM: ~3.8 T tokens in 512 groups; the 1T run needs ceil(512 x 1.0112e12 / 0.989 x 1.2 / 3.808e12)
    dclm = grid.config["datasets"]["dclm"]
    one_t = grid.runs["1.7b-dclm-1T-4096"]
    expected = groups_needed(512, tokens_read(one_t), dclm["approx_bytes"] * dclm["tokens_per_byte"], 1.2)
    assert 100 < expected < 512
    assert grid.shard_groups("dclm") == list(range(expected))
    # the 300B runs on DCLM read fewer groups than the 1T run, and the first of them
    small = grid.run_groups("0.13b-dclm-300B-4096")
    assert 1 < len(small) < expected and small == list(range(len(small)))
    # the 50B C4 run reads a part of C4 while the 300B runs read all of it
    assert 1 < len(grid.run_groups("1.3b-c4-50B-4096")) < 32 == len(grid.run_groups("1.7b-c4-300B-4096"))
    # several groups per large dataset
    assert all(len(grid.shard_groups(d)) >= 30 for d in grid.datasets_in_use)


def test_training_reads_only_the_groups_of_its_run(release_raw):
    grid = grid_of(release_raw)
    index = WorkflowIndex(grid)
    n = len(grid.run_groups("0.13b-dclm-300B-4096"))
    inputs = index.tokenized_inputs("0.13b-dclm-300B-4096")
    assert len(inputs) == 2 * n  # .bin and .idx
    assert inputs[-1].endswith(f"/tokenized/dclm/group_{n - 1:03d}.idx")
    assert not any(f"group_{n:03d}." in p for p in inputs)
    document = run_document(grid, grid.runs["0.13b-dclm-300B-4096"])
    assert document.data.prefixes == tuple(grid.layout.tokenized_prefix("dclm", g) for g in range(n))
    # the dataset's tokenize jobs cover the 1T run's groups
    assert len(index.tokenized_stats("dclm")) == len(grid.run_groups("1.7b-dclm-1T-4096")) > n


def test_groups_used_all_takes_every_group_for_every_run(release_raw):
    grid = grid_of(release_raw, lambda c: c["datasets"]["dclm"].update(groups_used="all"))
    assert len(grid.shard_groups("dclm")) == 512
    assert len(grid.run_groups("0.13b-dclm-300B-4096")) == 512


def test_a_bigger_budget_only_adds_groups_and_never_relists(release_raw):
    before = grid_of(release_raw)
    after = grid_of(release_raw, lambda c: c["experiments"][1].update(budgets=["2T"]))
    assert len(after.shard_groups("dclm")) > len(before.shard_groups("dclm"))
    assert after.shard_groups("dclm")[: len(before.shard_groups("dclm"))] == before.shard_groups("dclm")
    # membership is decided by the listing, whose inputs do not include budgets or size estimates
    resized = grid_of(release_raw, lambda c: c["datasets"]["dclm"].update(approx_bytes=9e12, data_safety=2.0))
    assert (
        WorkflowIndex(after).listing_params("dclm")
        == WorkflowIndex(before).listing_params("dclm")
        == WorkflowIndex(resized).listing_params("dclm")
    )
    # and the listing chunks the whole file list into shard_groups, whatever the runs use
    files = [{"path": f"f{i:03d}", "size": 100 + i} for i in range(40)]
    assert assign_groups(files, 8) == assign_groups(list(files), 8)


@pytest.mark.parametrize("key", ["approx_bytes", "tokens_per_byte"])
def test_missing_size_estimate_is_a_config_error_naming_the_key(release_raw, key):
    with pytest.raises(ConfigError, match=rf"datasets\.dclm\.{key}: required to choose how many of its 512"):
        grid_of(release_raw, lambda c: c["datasets"]["dclm"].pop(key))
    # not with groups_used: all
    grid_of(release_raw, lambda c: (c["datasets"]["dclm"].pop(key), c["datasets"]["dclm"].update(groups_used="all")))


def test_bad_groups_used_names_the_key(release_raw):
    with pytest.raises(ConfigError, match=r"datasets\.c4\.groups_used: 'some' is not one of"):
        grid_of(release_raw, lambda c: c["datasets"]["c4"].update(groups_used="some"))


# ---- the plan --------------------------------------------------------------------------------------


def test_plan_shows_groups_and_counts_tokens_of_the_run_groups_once_tokenized(release_raw, tmp_path):
    grid = grid_of(release_raw, data_root=tmp_path)
    rows = {r["run_id"]: r for r in plan_rows(grid)}
    small = rows["0.13b-dclm-300B-4096"]
    n, n_big = small["data_groups"], rows["1.7b-dclm-1T-4096"]["data_groups"]
    assert (small["dataset_groups"], small["shard_groups"]) == (n_big, 512)
    assert small["dataset_tokens_source"] == "catalog estimate"
    assert small["epochs"] < 1 and small["warning"] == ""

    # tokenized: the run's groups hold only half of what the estimate promised -> it would repeat data
    per_group = 300e9 / 2 / n
    manifest = Path(grid.layout.tokenized_manifest("dclm"))
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"per_group": [{"group": g, "tokens": int(per_group)} for g in range(n_big)]}))
    rows = {r["run_id"]: r for r in plan_rows(grid)}
    small = rows["0.13b-dclm-300B-4096"]
    assert small["dataset_tokens_source"] == "tokenized"
    assert small["dataset_tokens"] == pytest.approx(int(per_group) * n)
    assert small["epochs"] > 1.9
    assert "repeats data" in small["warning"] and "datasets.dclm.data_safety" in small["warning"]


def test_plan_warns_when_the_listing_contradicts_approx_bytes(release_raw, tmp_path):
    grid = grid_of(release_raw, data_root=tmp_path)
    listing = Path(grid.layout.listing("dclm"))
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps({"files": [{"path": "a", "size": int(1e12)}]}))  # 1 TB, not 5.6
    rows = {r["run_id"]: r for r in plan_rows(grid)}
    assert "datasets.dclm.approx_bytes says 5.6e+12" in rows["0.13b-dclm-300B-4096"]["warning"]
    assert rows["0.13b-c4-300B-4096"]["warning"] == ""
