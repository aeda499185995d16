"""Slurm tier: the workflow through the real `profiles/slurm` profile against a real (local) Slurm.

Needs a running cluster, e.g. the two fake nodes of `scripts/slurm_local.sh start` (root, Debian 12),
and `OSREF_SLURM_TESTS=1`; otherwise every test is skipped with the reason.

    sudo bash scripts/slurm_local.sh start
    OSREF_SLURM_TESTS=1 .venv/bin/python -m pytest -m slurm tests/slurm -v    (= make test-slurm)

Fake nodes have 2 CPUs / 4000 MB each, so the profile's production defaults (16 GB, 4 CPUs) and the
rules' memory requests are scaled down on the command line; partitions and account come from the
OSR_SLURM_* variables the profile reads.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from demo_pipeline import assert_demo_outputs, reduced_demo_config

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "slurm"
ACCOUNT = os.environ.get("OSREF_SLURM_ACCOUNT", "testacct")
TIMEOUT_S = int(os.environ.get("OSREF_SLURM_TIMEOUT", "1500"))

pytestmark = pytest.mark.slurm


def _slurm_unavailable() -> str | None:
    if os.environ.get("OSREF_SLURM_TESTS") != "1":
        return "Slurm tier disabled: set OSREF_SLURM_TESTS=1 (cluster: sudo bash scripts/slurm_local.sh start)"
    if shutil.which("sinfo") is None:
        return "Slurm tier: `sinfo` not found (run: sudo bash scripts/slurm_local.sh start)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "Slurm tier: `sinfo` did not answer in 20 s"
    if proc.returncode != 0:
        return f"Slurm tier: `sinfo` failed: {proc.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)


def reduced_config(tmp_path: Path, *, nodes: int = 1, budget_iters: int = 30) -> Path:
    """The reduced demo of tests/test_demo_e2e.py, fitted to 2-CPU / 4000 MB fake nodes."""
    config = reduced_demo_config(budget_iters)
    tiny = config["scales"]["tiny"]
    tiny["resources"].update({"mem_mb": 1800, "cpus_per_task": 1, "nodes": nodes})
    if nodes > 1:
        # CPU data parallel over the nodes: one rank per node, global batch 8 = 4 per rank x 2
        tiny["resources"]["micro_batch_size"] = 4
        config["cluster"]["launcher"] = "srun"
    config["cluster"]["eval_resources"]["mem_mb"] = 1800
    path = tmp_path / "slurm_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_snakemake(tmp_path: Path, config: Path, *targets: str, gpu_partition: str = "gpu",
                  retries: int = 0, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONUNBUFFERED": "1",
        "OSR_SLURM_ACCOUNT": ACCOUNT,
        "OSR_SLURM_PARTITION": "debug",
        "OSR_SLURM_GPU_PARTITION": gpu_partition,
    }
    # `--default-resources` / `--set-resources` replace the profile's keys whole, so the profile's
    # partition settings are restated here (from the same variables the profile reads).
    cmd = [
        "timeout", "-s", "INT", "-k", "60", str(TIMEOUT_S),
        sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path / "work"),
        "--profile", str(PROFILE), "--configfile", str(config),
        "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs",
        "--latency-wait", "5", "--retries", str(retries),
        "--default-resources", f"slurm_partition={env['OSR_SLURM_PARTITION']}",
        f"slurm_account={ACCOUNT}", "runtime=30", "mem_mb=1000", "cpus_per_task=1",
        "--set-resources", "tokenize_group:mem_mb=1800", "export_hf:mem_mb=1800",
        f"train_segment:slurm_partition={gpu_partition}", f"evaluate_group:slurm_partition={gpu_partition}",
    ]  # targets come first: nargs options (--set-resources, ...) would swallow them
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    print(f"snakemake --profile slurm: rc {proc.returncode} in {time.monotonic() - t0:.0f} s")
    return proc


def failure_details(proc: subprocess.CompletedProcess, tmp_path: Path) -> str:
    logs = sorted((tmp_path / "work" / ".snakemake" / "slurm_logs").rglob("*.log"))
    tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs[-4:])
    return proc.stdout[-3000:] + proc.stderr[-6000:] + tails


def sacct_jobs(comment_prefix: str = "rule_") -> list[dict[str, str]]:
    proc = subprocess.run(
        ["sacct", "-a", "-P", "-S", "now-2hours", "-o", "JobID,JobName,Partition,State,NNodes,NTasks,NodeList,Comment,Account"],
        capture_output=True, text=True, check=True,
    )
    return list(csv.DictReader(proc.stdout.splitlines(), delimiter="|"))


def test_demo_pipeline_through_slurm_profile(tmp_path):
    """download -> tokenize -> train (3 segment jobs) -> export -> eval -> report, every non-local
    rule as a Slurm job submitted by the plugin through profiles/slurm."""
    config = reduced_config(tmp_path)
    proc = run_snakemake(tmp_path, config)
    assert proc.returncode == 0, failure_details(proc, tmp_path)
    assert_demo_outputs(tmp_path / "work" / "results" / "demo")

    # the jobs really went through Slurm, under the account, and accounting saw them
    logs = tmp_path / "work" / ".snakemake" / "slurm_logs"
    job_rule = {p.stem: p.relative_to(logs).parts[0] for p in logs.rglob("*.log")}
    rules = set(job_rule.values())
    assert {"rule_download_group", "rule_tokenize_group", "rule_train_segment", "rule_export_hf",
            "rule_evaluate_group"} <= rules, rules
    jobs = {r["JobID"]: r for r in sacct_jobs() if r["JobID"] in job_rule}
    assert set(jobs) == set(job_rule), (sorted(jobs), sorted(job_rule))
    for job_id, row in jobs.items():
        assert row["State"] == "COMPLETED" and row["Account"] == ACCOUNT, row
        expected = "gpu" if job_rule[job_id] in ("rule_train_segment", "rule_evaluate_group") else "debug"
        assert row["Partition"] == expected, row


def test_two_node_training_segment(tmp_path):
    """nodes: 2 -> the plugin's `mpi` recipe: one sbatch job over node1+node2, the rule's
    `srun --nodes=2 --ntasks-per-node=1 bash scripts/torchrun_slurm.sh 1 PYTHON scripts/train.py`
    starts one torchrun agent per node; the gloo group only forms with both ranks."""
    config = reduced_config(tmp_path, nodes=2, budget_iters=10)
    # LOGLEVEL=INFO: each torchrun agent logs its rendezvous result (group_rank, world sizes);
    # it reaches the rule through sbatch --export=ALL (only SLURM_*/SRUN_*/SBATCH_* are stripped)
    proc = run_snakemake(tmp_path, config, "train", extra_env={"LOGLEVEL": "INFO"})
    assert proc.returncode == 0, failure_details(proc, tmp_path)
    run_dir = tmp_path / "work" / "results" / "demo" / "runs" / "tiny-pydocs-10240-128"
    marker = json.loads((run_dir / "train" / "segment_0000010.json").read_text())
    assert marker["iteration"] == 10
    assert (run_dir / "checkpoints" / "iter_0000010" / "complete.json").exists()

    logs = list((tmp_path / "work" / ".snakemake" / "slurm_logs" / "rule_train_segment").rglob("*.log"))
    assert logs, "no slurm log of the training job"
    job_id = logs[0].stem
    steps = {r["JobID"]: r for r in sacct_jobs() if r["JobID"].split(".")[0] == job_id}
    assert steps[job_id]["NNodes"] == "2" and steps[job_id]["State"] == "COMPLETED", steps
    srun_steps = [r for k, r in steps.items() if k.split(".")[-1].isdigit()]
    assert any(r["NNodes"] == "2" and r["NTasks"] == "2" and r["NodeList"] == "node[1-2]" for r in srun_steps), steps
    # both torchrun agents joined one rendezvous: group ranks 0 and 1, two workers in total
    train_log = (tmp_path / "work" / "results" / "demo" / "logs" / "train" / "tiny-pydocs-10240-128"
                 / "segment_0000010.log").read_text()
    assert "group_rank=0" in train_log and "group_rank=1" in train_log, train_log[-3000:]
    assert train_log.count("global_world_sizes=[2]") == 2, train_log[-3000:]


def test_timed_out_segment_is_retried_and_resumes(tmp_path):
    """A 120-iteration segment under a 1-minute walltime: Slurm ends attempt 1 with TIMEOUT, the
    profile's retries resubmit it, and each attempt resumes from the latest complete checkpoint
    (save_interval 10) until the segment's marker is written."""
    config_path = reduced_config(tmp_path, budget_iters=120)
    config = yaml.safe_load(config_path.read_text())
    config["scales"]["tiny"]["resources"].update({"segment_iters": 120, "walltime": "1m"})
    config_path.write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, config_path, "train", retries=4)
    assert proc.returncode == 0, failure_details(proc, tmp_path)
    run_id = "tiny-pydocs-122880-128"
    run_dir = tmp_path / "work" / "results" / "demo" / "runs" / run_id
    assert json.loads((run_dir / "train" / "segment_0000120.json").read_text())["iteration"] == 120

    logs = (tmp_path / "work" / ".snakemake" / "slurm_logs" / "rule_train_segment").rglob("*.log")
    job_ids = sorted((p.stem for p in logs), key=int)
    states = {r["JobID"]: r["State"] for r in sacct_jobs() if r["JobID"] in job_ids}
    print("train_segment attempts:", states)
    assert len(job_ids) >= 2 and states[job_ids[0]] == "TIMEOUT", states
    assert states[job_ids[-1]] == "COMPLETED", states
    last_log = (tmp_path / "work" / "results" / "demo" / "logs" / "train" / run_id / "segment_0000120.log").read_text()
    assert "resumed from" in last_log, last_log[-3000:]
