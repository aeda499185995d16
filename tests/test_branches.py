"""WSD cool-down branches: a shorter run that starts from a longer run's stable-phase checkpoint and
trains only its own cool-down — planned from config (grid, plan, workflow dependencies) and
trained for real on the CPU from the parent's checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import REPO, make_run, read_jsonl

from osref.config import ConfigError, load_config
from osref.grid import expand_grid, load_grid, run_document, segments_from
from osref.plan import plan_rows
from osref.workflow import WorkflowIndex

BRANCHES = {
    "name": "cooldown-branches",
    "datasets": ["dclm"],
    "scales": ["1.7b"],
    "budgets": ["1T", "300B", "150B"],
    "branch_from": "1T",
    "suffix": "br",
}


@pytest.fixture(scope="module")
def release_config() -> dict:
    return load_config(REPO / "config/config.yaml")


def grid_with(release_config: dict, experiment: dict, **config_changes):
    config = copy.deepcopy(release_config)
    config["experiments"] = [{"recipe": "open-sci-ref-0.01", "suffix": "", "branch_from": None, **experiment}]
    config["overrides"] = {}
    config.update(config_changes)
    return expand_grid(config)


def test_branch_starts_where_its_cooldown_starts(release_config):
    grid = grid_with(release_config, BRANCHES)
    parent = grid.runs["1.7b-dclm-1T-4096-br"]
    for budget in ("300B", "150B"):
        branch = grid.runs[f"1.7b-dclm-{budget}-4096-br"]
        k = branch.branch_iteration
        assert branch.parent_run == parent.run_id
        assert k == branch.train_iters - branch.cooldown_iters
        assert k < parent.train_iters - parent.cooldown_iters  # inside the parent's stable phase
        assert k in parent.checkpoint_iters  # the parent saves the branch point
        assert all(c > k for c in branch.checkpoint_iters) and branch.checkpoint_iters[-1] == branch.train_iters
        assert set(branch.segment_ends) <= set(branch.checkpoint_iters)
        assert branch.segment_ends[-1] == branch.train_iters
        spans = [b - a for a, b in zip((k, *branch.segment_ends), branch.segment_ends, strict=False)]
        assert max(spans) <= branch.segment_iters
        assert branch.trained_iters == branch.cooldown_iters
    # 300B at GBS 1008 × 4096: 72 661 iterations; the branch trains the last 20 % of them
    branch = grid.runs["1.7b-dclm-300B-4096-br"]
    assert (branch.train_iters, branch.cooldown_iters, branch.branch_iteration) == (72661, 14532, 58129)
    unbranched = grid_with(release_config, {**BRANCHES, "branch_from": None}).runs[branch.run_id]
    assert branch.gpu_hours == pytest.approx(unbranched.gpu_hours * 14532 / 72661)


def test_branch_is_planned(release_config):
    grid = grid_with(release_config, BRANCHES)
    rows = {row["run_id"]: row for row in plan_rows(grid)}
    row = rows["1.7b-dclm-300B-4096-br"]
    assert (row["branch_of"], row["branch_iteration"], row["trained_iters"]) == ("1.7b-dclm-1T-4096-br", 58129, 14532)
    assert rows["1.7b-dclm-1T-4096-br"]["branch_of"] == ""
    assert rows["1.7b-dclm-1T-4096-br"]["trained_iters"] == rows["1.7b-dclm-1T-4096-br"]["train_iters"]


def test_branch_waits_for_the_parent_segment_that_saves_the_branch_point(release_config):
    config = copy.deepcopy(release_config)
    config["scales"]["1.7b"]["resources"]["segment_iters"] = 4000  # several segments per branch
    grid = grid_with(config, BRANCHES)
    index = WorkflowIndex(grid)
    branch, parent = grid.runs["1.7b-dclm-300B-4096-br"], grid.runs["1.7b-dclm-1T-4096-br"]
    first = f"{branch.segment_ends[0]:07d}"
    parent_segment = parent.segment_for(branch.branch_iteration)
    assert index.previous_segment(branch.run_id, first) == [grid.layout.segment_marker(parent.run_id, parent_segment)]
    second = f"{branch.segment_ends[1]:07d}"
    assert index.previous_segment(branch.run_id, second) == [
        grid.layout.segment_marker(branch.run_id, branch.segment_ends[0])
    ]
    document = run_document(grid, branch)
    assert document.to_json()["branch"] == {
        "parent_run_id": parent.run_id,
        "parent_run_dir": grid.layout.run_dir(parent.run_id),
        "iteration": 58129,
        "parent_train_iters": parent.train_iters,
    }
    assert run_document(grid, parent).branch is None
    # the branch trains on its parent's shard groups (a 300B run alone would read fewer)
    assert document.data.prefixes == run_document(grid, parent).data.prefixes
    alone = grid_with(release_config, {**BRANCHES, "branch_from": None})
    assert len(run_document(alone, alone.runs[branch.run_id]).data.prefixes) < len(document.data.prefixes)


def test_selecting_a_branch_keeps_its_parent(release_config):
    grid = grid_with(release_config, BRANCHES, select={"runs": ["1.7b-dclm-300B-4096-br"]})
    assert set(grid.runs) == {"1.7b-dclm-300B-4096-br", "1.7b-dclm-1T-4096-br"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"branch_from": "2T"}, r"experiments\[0\].branch_from: '2T' is not one of the experiment's budgets"),
        ({"budgets": ["300B", "1T"], "branch_from": "300B"}, "1.7b-dclm-1T-4096-br cannot branch .*not fewer"),
        ({"budgets": ["1T", "1000B"]}, "1000B.*not fewer"),
    ],
)
def test_bad_branches_name_the_key(release_config, change, message):
    with pytest.raises(ConfigError, match=message):
        grid_with(release_config, {**BRANCHES, **change})


def test_branch_needs_the_parents_recipe(release_config):
    config = copy.deepcopy(release_config)
    config["experiments"] = [{**BRANCHES, "recipe": "open-sci-ref-0.01", "branch_from": "1T"}]
    config["overrides"] = {"1.7b-dclm-300B-4096-br": {"lr": 1e-3}}
    with pytest.raises(ConfigError, match=r"cannot branch from 1.7b-dclm-1T-4096-br: lr 0.001 differs"):
        load_grid(config)
    config["overrides"] = {"1.7b-dclm-300B-4096-br": {"schedule": "cosine"}}
    with pytest.raises(ConfigError, match="cool-down branches need 'wsd'"):
        load_grid(config)


def test_branch_from_cannot_follow_the_parents_cooldown(release_config):
    """A 900B branch starts its cool-down at 720B; a 1T parent with a 50 % cool-down leaves its
    stable phase at 500B."""
    with pytest.raises(ConfigError, match="after the parent's stable phase ends"):
        grid_with(
            release_config,
            {**BRANCHES, "budgets": ["1T", "900B"]},
            overrides={"1.7b-dclm-1T-4096-br": {"cooldown_fraction": 0.5}},
        )


def test_segments_from_end_on_checkpoints():
    assert segments_from(16, (20, 30, 40, 50, 60), 20) == (30, 50, 60)
    assert segments_from(0, (10, 20, 30), 10) == (10, 20, 30)
    assert segments_from(5, (10,), 100) == (10,)


# ---- training ------------------------------------------------------------------------------------


def test_branch_trains_the_cooldown_from_the_parents_checkpoint(data_root, tmp_path):
    """Parent: the tiny 40-iteration WSD run (cool-down 8), saving also at 16. Branch: a 20-iteration
    run (cool-down 4) whose cool-down starts at 16. Its first step is the parent's iteration 17 bit
    for bit (same weights, optimizer state, data, RNG and — still — the peak LR); after that its LR
    follows its own WSD schedule to 0 at 20 and the two trajectories part."""
    from osref.checkpointing import checkpoint_dir, is_complete
    from osref.training import scheduled_lr, train

    parent = make_run(data_root, tmp_path / "parent")
    parent["train"]["checkpoint_iters"] = [10, 16, 20, 30, 40]
    train(parent, 20)
    assert is_complete(checkpoint_dir(parent["paths"]["run_dir"], 16))

    branch = make_run(data_root, tmp_path / "branch")
    branch["train"].update(train_iters=20, cooldown_iters=4, checkpoint_iters=[20], segment_ends=[20])
    branch["branch"] = {
        "parent_run_id": "parent",
        "parent_run_dir": parent["paths"]["run_dir"],
        "iteration": 16,
        "parent_train_iters": parent["train"]["train_iters"],
    }
    result = train(branch, 20)
    assert result["resumed_from"] == 16
    assert sorted(p.name for p in (tmp_path / "branch/checkpoints").iterdir()) == ["iter_0000020"]

    parent_log = {r["iteration"]: r for r in read_jsonl(tmp_path / "parent/logs/train_metrics.jsonl")}
    branch_log = read_jsonl(tmp_path / "branch/logs/train_metrics.jsonl")
    assert [r["iteration"] for r in branch_log] == [17, 18, 19, 20]
    first = branch_log[0]
    assert (first["loss"], first["lr"], first["grad_norm"]) == (
        parent_log[17]["loss"],
        parent_log[17]["lr"],
        parent_log[17]["grad_norm"],
    )
    for record in branch_log:
        assert record["lr"] == pytest.approx(scheduled_lr(branch["train"], record["iteration"] - 1), abs=1e-12)
    assert branch_log[-1]["lr"] < parent_log[20]["lr"] == branch["train"]["lr"]  # decaying vs still at peak
    # iteration 18's loss is still on the shared weights; its update uses the first decayed LR
    assert branch_log[1]["loss"] == parent_log[18]["loss"] and branch_log[1]["lr"] < parent_log[18]["lr"]
    assert branch_log[2]["loss"] != parent_log[19]["loss"]


def test_branch_without_the_parents_checkpoint_fails_clearly(data_root, tmp_path):
    from osref.training import train

    branch = make_run(data_root, tmp_path / "branch")
    branch["train"].update(train_iters=20, cooldown_iters=4, checkpoint_iters=[20], segment_ends=[20])
    branch["branch"] = {
        "parent_run_id": "parent",
        "parent_run_dir": str(tmp_path / "parent"),
        "iteration": 16,
        "parent_train_iters": 40,
    }
    with pytest.raises(FileNotFoundError, match=r"parent run parent has no complete checkpoint at the branch point 16"):
        train(branch, 20)
    assert not (Path(tmp_path) / "branch/checkpoints/iter_0000020").exists()


def test_dry_run_chains_the_branch_after_its_parent(tmp_path):
    """`snakemake -n` on the demo config with a cool-down branch: the branch's only training job
    takes the parent's segment marker that covers the branch point as input."""
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load((REPO / "config/demo.yaml").read_text())
    config["experiments"][0].update(budgets=["0.25M", "0.15M"], branch_from="0.25M")
    config_file = tmp_path / "branch.yaml"
    config_file.write_text(yaml.safe_dump(config))
    grid = load_grid(config_file)
    branch = next(r for r in grid.runs.values() if r.parent_run)
    parent = grid.runs[branch.parent_run]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "train",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(tmp_path),
            "-n",
            "--configfile",
            str(config_file),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = next(
        block
        for block in proc.stdout.split("rule train_segment:")[1:]
        if f"run_id={branch.run_id}, end={branch.train_iters:07d}" in block
    )
    parent_marker = f"{parent.run_id}/train/segment_{parent.segment_for(branch.branch_iteration):07d}.json"
    assert parent_marker in job.split("output:")[0]
    assert proc.stdout.count(f"run_id={branch.run_id}, end=") == len(branch.segment_ends)
