"""The Snakemake workflow as users drive it: dry-runs of the release grid, profiles, plan, bad configs."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# Golden job counts of the release grid (36 runs; 911 shard groups: per dataset what its largest
# run needs, c4 32/32, pile 30/30, slimpajama 75/128, fineweb-edu 241/256, dclm 164/512,
# nemotron-cc-hq 256/256, hplt 66/512, commoncorpus 47/256; 1562 evaluated checkpoints; 3 shot
# groups). A change here is a change of the plan: update it knowingly.
RELEASE_GROUPS = {
    "c4": 32,
    "pile": 30,
    "slimpajama": 75,
    "fineweb-edu-1.4t": 241,
    "dclm": 164,
    "nemotron-cc-hq": 256,
    "hplt-2.0": 66,
    "commoncorpus": 47,
}
RELEASE_JOBS = {
    "list_dataset": 8,
    "download_group": 911,
    "tokenize_group": 911,
    "tokenized_dataset_manifest": 8,
    "run_config": 36,
    "train_segment": 64,
    "export_hf": 1562,
    "evaluate_shots": 4686,
    "report": 1,
    "plan": 1,
    "prefetch_eval_data": 1,
    "all": 1,
}


def snakemake(*args: str, cwd: Path = ROOT, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*SNAKEMAKE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "OSR_SLURM_ACCOUNT": "acct",
            "OSR_SLURM_PARTITION": "cpu",
            "OSR_SLURM_GPU_PARTITION": "gpu",
            **(env or {}),
        },
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[-1]
    counts = {}
    for line in table.splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.fixture(scope="module")
def release_dry_run() -> str:
    """`snakemake --profile slurm -n` literally, from the repo root, on a machine without Slurm."""
    proc = snakemake("--profile", "slurm", "-n")
    return proc.stdout + proc.stderr


def test_release_dry_run_plans_the_whole_grid(release_dry_run):
    assert job_counts(release_dry_run) == RELEASE_JOBS


def test_dry_run_summary_of_the_release_grid(release_dry_run, tmp_path):
    """scripts/dryrun_summary.py: the 91k-line dry-run as one line per rule and partition, with the
    golden job counts, the GPU rules on the GPU partition and the local rules marked local."""
    saved = tmp_path / "dryrun.txt"
    saved.write_text(release_dry_run)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dryrun_summary.py"), "--from", str(saved)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) < 25 and len(release_dry_run.splitlines()) > 90_000
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if line.split()[0] in RELEASE_JOBS}
    assert {rule: int(row[1]) for rule, row in rows.items()} == RELEASE_JOBS
    assert rows["train_segment"][:4] == ["gpu", "64", "16-63", "4"] and rows["evaluate_shots"][:4] == [
        "gpu",
        "4686",
        "1",
        "1",
    ]
    assert rows["download_group"][:2] == ["cpu", "911"] and rows["export_hf"][:2] == ["cpu", "1562"]
    assert {rule for rule, row in rows.items() if row[0] == "local"} == {
        "list_dataset", "tokenized_dataset_manifest", "run_config", "report", "plan", "prefetch_eval_data", "all"
    }  # fmt: skip
    assert any(line.split()[:2] == ["total", str(sum(RELEASE_JOBS.values()))] for line in lines)


def test_dry_run_lists_the_shard_groups_each_dataset_needs(release_dry_run):
    """Offline, from config alone: every group's download and tokenize job, several per dataset."""
    for rule in ("download_group", "tokenize_group"):
        groups: dict[str, set[str]] = {}
        for block in release_dry_run.split(f"rule {rule}:")[1:]:
            match = re.search(r"wildcards: dataset=([^,\s]+), group=(\d{3})", block)
            groups.setdefault(match.group(1), set()).add(match.group(2))
        assert {d: len(g) for d, g in groups.items()} == RELEASE_GROUPS
        assert groups["dclm"] == {f"{g:03d}" for g in range(164)}


def test_training_reads_only_the_groups_its_run_needs(release_dry_run):
    def data_inputs(run_id: str) -> set[str]:
        block = next(b for b in release_dry_run.split("rule train_segment:")[1:] if f"run_id={run_id}," in b)
        return set(re.findall(r"tokenized/dclm/group_(\d{3})\.bin", block.split("output:")[0]))

    assert data_inputs("0.13b-dclm-300B-4096") == {f"{g:03d}" for g in range(49)}
    assert data_inputs("1.7b-dclm-1T-4096") == {f"{g:03d}" for g in range(164)}


def test_slurm_profile_maps_multi_node_training(release_dry_run):
    job = next(
        block
        for block in release_dry_run.split("rule train_segment:")[1:]
        if "run_id=1.7b-dclm-1T-4096, end=0060000" in block
    )
    assert "nodes=63" in job and "gres=gpu:4" in job and "mpi=srun" in job and "tasks=63" in job
    assert "runtime=1440" in job and "slurm_partition=gpu" in job and "slurm_account=acct" in job
    assert "srun --nodes=63 --ntasks-per-node=1" in job and "torchrun_slurm.sh 4" in job
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in job
    assert "--until=60000" in job


def test_segment_chain_and_checkpoint_flow(release_dry_run):
    block = next(
        b for b in release_dry_run.split("rule train_segment:")[1:] if "run_id=1.7b-dclm-1T-4096, end=0120000" in b
    )
    assert "1.7b-dclm-1T-4096/train/segment_0060000.json" in block.split("output:")[0]
    export = next(
        b for b in release_dry_run.split("rule export_hf:")[1:] if "run_id=1.7b-dclm-1T-4096, iteration=0062000" in b
    )
    assert "segment_0120000.json" in export.split("output:")[0]


def test_local_profile_and_demo_dry_run(tmp_path):
    proc = snakemake(
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp_path),
        "--profile",
        str(ROOT / "profiles" / "local"),
        "-n",
        "--configfile",
        str(ROOT / "config" / "demo.yaml"),
    )
    counts = job_counts(proc.stdout)
    assert counts["train_segment"] == 3 and counts["export_hf"] == 5 and counts["evaluate_shots"] == 10
    assert counts["build_eval_tasks"] == 1 and counts["report"] == 1


def test_plan_target_writes_the_plan(tmp_path):
    snakemake("plan", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-c1")
    with open(tmp_path / "results" / "plan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 36
    row = next(r for r in rows if r["run_id"] == "1.7b-dclm-300B-4096")
    assert (row["params"], row["train_iters"], row["checkpoints"]) == ("1714377728", "72661", "37")
    assert float(row["flops"]) == pytest.approx(6 * 1714377728 * 72661 * 1008 * 4096)
    assert (tmp_path / "results" / "logs" / "plan" / "plan.log").read_text().startswith("run_id")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["recipes"]["demo"].update({"warmup_itrs": 3}), "recipes.demo: unknown key 'warmup_itrs'"),
        (lambda c: c["experiments"][0].update({"scales": ["huge"]}), "experiments[0].scales[0]: unknown scale 'huge'"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, mutate, expected):
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    mutate(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake("-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-c1", "--configfile", str(bad), check=False)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


# ---- bad configs through the workflow: `snakemake -n` stops at config loading, naming the field ------
# (the same checks in detail, on the release grid: tests/test_config.py; here: the Snakefile really
# runs them before building any job, so nothing is planned, submitted or written)


def _demo_resources(c: dict) -> dict:
    return c["scales"]["tiny"]["resources"]


BAD_DEMO_CONFIGS = {
    "unknown dataset": (
        lambda c: c["experiments"][0]["datasets"].append("redpajama"),
        "experiments[0].datasets[1]: unknown dataset 'redpajama'",
    ),
    "unknown scale": (
        lambda c: c["experiments"][0]["scales"].append("0.2b"),
        "experiments[0].scales[1]: unknown scale '0.2b'",
    ),
    "negative budget": (lambda c: c["experiments"][0].update({"budgets": [-5]}), "experiments[0].budgets[0]"),
    "malformed budget": (lambda c: c["experiments"][0].update({"budgets": ["300G"]}), "experiments[0].budgets[0]"),
    "segment not a multiple of the save interval": (
        lambda c: _demo_resources(c).update({"segment_iters": 75}),
        "scales.tiny.resources.segment_iters: 75 is not a multiple of save_interval 50",
    ),
    "missing path": (
        lambda c: c["datasets"]["pydocs"].pop("paths"),
        "datasets.pydocs.paths: required for source 'local'",
    ),
    "path matching no file": (
        lambda c: c["datasets"]["pydocs"].update({"paths": ["assets/demo-corpus/nope*.zst"]}),
        "datasets.pydocs.paths[0]: no file matches 'assets/demo-corpus/nope*.zst'",
    ),
    "wrong type": (lambda c: c["scales"]["tiny"].update({"num_layers": "4"}), "scales.tiny.num_layers"),
    "duplicate run id": (
        lambda c: c["experiments"].append(dict(c["experiments"][0])),
        "duplicate run id 'tiny-pydocs-0.25M-128'",
    ),
    "unknown eval task": (
        lambda c: c["evaluation"]["protocols"]["demo"].append({"task": "hellaswagg", "shots": 0, "metric": "acc"}),
        "evaluation.protocols.demo[2].task",
    ),
    "walltime shorter than one save interval": (
        lambda c: _demo_resources(c).update({"segment_iters": None, "walltime": "1m", "tokens_per_gpu_second": 10}),
        "scales.tiny.resources.walltime: 1m is shorter than one save interval",
    ),
    "batch not divisible by micro-batch x DP": (
        lambda c: _demo_resources(c).update({"micro_batch_size": 3}),
        "global_batch_size 8 is not divisible by micro_batch_size 3 x data-parallel size 1",
    ),
    # issue 11
    "tokenizer path pointing nowhere": (
        lambda c: c.update({"tokenizer": {"path": "/nonexistent/gpt-neox-20b"}}),
        "tokenizer.path: '/nonexistent/gpt-neox-20b': cannot read",
    ),
    "tokenizer with the wrong sha256": (lambda c: c.update({"tokenizer": {"sha256": "ab" * 32}}), "tokenizer.sha256:"),
    "float budget": (
        lambda c: c["experiments"][0].update({"budgets": [250000.0]}),
        "experiments[0].budgets[0]: 250000.0 is not valid",
    ),
    "dataset name ending in a newline": (
        lambda c: (
            c["datasets"].update({"pydocs\n": c["datasets"].pop("pydocs")}),
            c["experiments"][0].update({"datasets": ["pydocs\n"]}),
            c["evaluation"].update({"local_tasks": "pydocs\n"}),
        ),
        "datasets: bad name 'pydocs\\n'",
    ),
    "infinite parity tolerance": (
        lambda c: c["evaluation"].update({"parity_tolerance": float("inf")}),
        "evaluation.parity_tolerance: inf is not a finite number",
    ),
    "warm-up longer than the run": (
        lambda c: c["recipes"]["demo"].update({"warmup_iters": 245}),
        "recipes.demo.warmup_iters = 245 >= its 245 iterations",
    ),
}


@pytest.mark.parametrize("kind", BAD_DEMO_CONFIGS)
def test_bad_config_stops_snakemake_before_any_job(kind, tmp_path):
    mutate, expected = BAD_DEMO_CONFIGS[kind]
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    proc = snakemake(
        "-n",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--configfile",
        str(path),
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert expected in output, output[-3000:]
    assert "Job stats" not in output and "rule " not in output, output[-3000:]  # no job was planned
    assert not (work / "results").exists()


def test_duplicate_key_in_a_configfile_stops_snakemake(tmp_path):
    """Snakemake reads --configfile itself and keeps the last of two equal keys; the Snakefile
    re-reads every config file strictly."""
    text = (ROOT / "config" / "demo.yaml").read_text()
    first = text.splitlines().index("scales:") + 1
    path = tmp_path / "twice.yaml"
    path.write_text(
        text + "\nscales:\n  tiny: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 192, num_attention_heads: 4}\n"
    )
    second = len(text.splitlines()) + 2
    work = tmp_path / "work"
    proc = snakemake("-n", "-s", str(ROOT / "Snakefile"), "-d", str(work), "--configfile", str(path), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"duplicate key 'scales' on lines {first} and {second}" in output, output[-3000:]
    assert "Job stats" not in output and not (work / "results").exists()


def test_plan_fails_on_a_tokenizer_that_is_not_there(tmp_path):
    """`snakemake plan` (not only -n) stops at config loading, before writing a plan."""
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["tokenizer"] = {"path": str(tmp_path / "no-tokenizer")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(
        "plan",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp_path / "work"),
        "-c1",
        "--configfile",
        str(path),
        check=False,
    )
    assert proc.returncode == 1 and "tokenizer.path:" in proc.stdout + proc.stderr
    assert not (tmp_path / "work" / "results").exists()
