"""Slurm tier: the workflow through the real `profiles/slurm` profile against a real (local) Slurm.

Needs a running cluster, e.g. the two fake nodes of `scripts/slurm_local.sh start` (root, Debian 12),
and `OSREF_SLURM_TESTS=1`; otherwise every test is skipped with the reason (`make test` starts the
cluster itself and passes on why it could not, see OSREF_SLURM_UNAVAILABLE).

    sudo bash scripts/slurm_local.sh start
    OSREF_SLURM_TESTS=1 .venv/bin/python -m pytest -m slurm tests/slurm -v    (= make test-slurm)

Every run is `snakemake --profile profiles/slurm --profile profiles/slurm-ci`: the production profile
plus the small-cluster overlay (2-CPU / 4000 MB fake nodes, early status checks, kept job logs);
partitions and account come from the OSR_SLURM_* variables both profiles read.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from demo_pipeline import CHECKPOINTS, RUN_ID, assert_demo_outputs, reduced_demo_config

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("--profile", str(ROOT / "profiles" / "slurm"), "--profile", str(ROOT / "profiles" / "slurm-ci"))
ACCOUNT = os.environ.get("OSREF_SLURM_ACCOUNT", "testacct")
TIMEOUT_S = int(os.environ.get("OSREF_SLURM_TIMEOUT", "1500"))
# a token-shaped secret that must never be written anywhere (HF_TOKEN reaches every job's environment)
FAKE_HF_TOKEN = "hf_fakeOsrefCiToken0123456789abcdefXYZ"

pytestmark = pytest.mark.slurm


def _slurm_unavailable() -> str | None:
    if os.environ.get("OSREF_SLURM_UNAVAILABLE"):  # set by `make test` when the cluster could not start
        return f"Slurm tier skipped: {os.environ['OSREF_SLURM_UNAVAILABLE']}"
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
    """The reduced demo of tests/demo_pipeline.py, its per-scale resources fitted to the fake nodes."""
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


def snakemake_command(tmp_path: Path, config: Path, *targets: str, retries: int = 0) -> list[str]:
    # targets come first: nargs options would swallow them. SIGINT on timeout: the plugin scancels.
    return [
        "timeout",
        "-s",
        "INT",
        "-k",
        "60",
        str(TIMEOUT_S),
        sys.executable,
        "-m",
        "snakemake",
        *targets,
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp_path / "work"),
        *PROFILES,
        "--configfile",
        str(config),
        "--retries",
        str(retries),
    ]


def snakemake_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        **(extra_env or {}),
        "PYTHONUNBUFFERED": "1",
        "OSR_SLURM_ACCOUNT": ACCOUNT,
        "OSR_SLURM_PARTITION": "debug",
        "OSR_SLURM_GPU_PARTITION": "gpu",
    }


def run_snakemake(
    tmp_path: Path, config: Path, *targets: str, retries: int = 0, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(
        snakemake_command(tmp_path, config, *targets, retries=retries),
        capture_output=True,
        text=True,
        env=snakemake_env(extra_env),
        cwd=tmp_path,
    )
    print(f"snakemake --profile slurm: rc {proc.returncode} in {time.monotonic() - t0:.0f} s")
    return proc


def failure_details(proc: subprocess.CompletedProcess, tmp_path: Path) -> str:
    logs = sorted((tmp_path / "work" / ".snakemake" / "slurm_logs").rglob("*.log"))
    tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs[-4:])
    return proc.stdout[-3000:] + proc.stderr[-6000:] + tails


def sacct_jobs() -> list[dict[str, str]]:
    proc = subprocess.run(
        [
            "sacct",
            "-a",
            "-P",
            "-S",
            "now-2hours",
            "-o",
            "JobID,JobName,Partition,State,NNodes,NTasks,NodeList,Comment,Account",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return list(csv.DictReader(proc.stdout.splitlines(), delimiter="|"))


def sacct_state(job_id: str) -> str:
    return {r["JobID"]: r["State"] for r in sacct_jobs()}.get(job_id, "")


def running_job(comment_parts: tuple[str, ...]) -> str | None:
    """Id of a RUNNING job whose comment (the plugin's rule_<rule>_wildcards_<...>) holds every part."""
    proc = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        job_id, _, comment = line.partition("|")
        if all(part in comment for part in comment_parts):
            return job_id.strip()
    return None


def checkpoint_dirs(run_dir: Path) -> dict[str, bool]:
    """Every iter_* directory under checkpoints/ -> whether it holds complete.json."""
    root = run_dir / "checkpoints"
    return {p.name: (p / "complete.json").exists() for p in sorted(root.glob("iter_*"))} if root.exists() else {}


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Binary-safe search of every regular file under root (symlinks are not followed)."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(path)
    return hits


def test_demo_through_slurm_scancel_rerun_and_no_token_leak(tmp_path):
    """The demo pipeline through profiles/slurm: download -> tokenize -> train (3 segment jobs) ->
    export -> eval -> report, every non-local rule a Slurm job submitted by the plugin.

    Training runs on 2 nodes (nodes: 2 -> the plugin's `mpi` recipe): one sbatch job over
    node1+node2 per segment, the rule's `srun --nodes=2 --ntasks-per-node=1 bash
    scripts/torchrun_slurm.sh 1 PYTHON scripts/train.py` starts one torchrun agent per node, and the
    gloo group only forms with both ranks (CPU data parallel, 4 sequences per rank); the exports
    read the 2-rank checkpoints in one process.

    Fault: the second training segment is `scancel`led while it runs; Snakemake is stopped with
    Ctrl-C (see below why), and a plain rerun of the same command completes, leaving exactly the
    scheduled checkpoints, each complete, and one marker per segment.
    Security: HF_TOKEN is set to a fake token for both runs (it reaches every job through
    sbatch --export=ALL); it must appear in no file under results, logs or .snakemake/."""
    config = reduced_config(tmp_path, nodes=2)
    # LOGLEVEL=INFO: each torchrun agent logs its rendezvous result (group_rank, world sizes); it
    # reaches the rule through sbatch --export=ALL (only SLURM_*/SRUN_*/SBATCH_* are stripped)
    env = {"HF_TOKEN": FAKE_HF_TOKEN, "LOGLEVEL": "INFO"}
    work = tmp_path / "work"
    run_dir = work / "results" / "demo" / "runs" / RUN_ID
    out = (tmp_path / "first_run.log").open("w")
    t0 = time.monotonic()
    first = subprocess.Popen(
        snakemake_command(tmp_path, config), stdout=out, stderr=subprocess.STDOUT, env=snakemake_env(env), cwd=tmp_path
    )
    cancelled = None
    while first.poll() is None and time.monotonic() - t0 < TIMEOUT_S:
        cancelled = running_job(("rule_train_segment", f"{CHECKPOINTS[1]:07d}"))
        if cancelled:
            subprocess.run(["scancel", cancelled], check=True)
            print(f"scancel {cancelled} (segment ending at {CHECKPOINTS[1]}) after {time.monotonic() - t0:.0f} s")
            break
        time.sleep(1)
    # sacct reports the job as "CANCELLED by 0"; the slurm plugin (2.8.0) matches states exactly, never
    # recognises that one, and Snakemake would wait for the job forever (seen: > 5 min). So the user
    # stops Snakemake with Ctrl-C, as here (SIGINT to `timeout`, which passes it on: the plugin then
    # scancels the jobs still running), once Slurm has recorded the cancellation.
    for _ in range(60):
        if cancelled and sacct_state(cancelled).startswith("CANCELLED"):
            break
        time.sleep(1)
    if first.poll() is None:
        first.send_signal(signal.SIGINT)
    rc = first.wait(timeout=300)
    out.close()
    first_jobs = {p.stem for p in (work / ".snakemake" / "slurm_logs").rglob("*.log")}
    first_log = (tmp_path / "first_run.log").read_text()
    print(f"first run: rc {rc} in {time.monotonic() - t0:.0f} s")
    assert cancelled, "never saw the second training segment running\n" + first_log[-4000:]
    assert rc != 0, first_log[-4000:]
    state = sacct_state(cancelled)
    assert state.startswith("CANCELLED"), state  # cancelled while running, not after it finished
    # on disk: the first segment's checkpoint only (a torn later one may exist, but never complete)
    assert not (run_dir / "train" / f"segment_{CHECKPOINTS[1]:07d}.json").exists()
    dirs = checkpoint_dirs(run_dir)
    assert [name for name, complete in dirs.items() if complete] == [f"iter_{CHECKPOINTS[0]:07d}"], dirs

    proc = run_snakemake(tmp_path, config, extra_env=env)  # the same command again, nothing else
    assert proc.returncode == 0, failure_details(proc, tmp_path)
    assert_demo_outputs(work / "results" / "demo")
    assert checkpoint_dirs(run_dir) == {f"iter_{it:07d}": True for it in CHECKPOINTS}
    assert (
        json.loads((run_dir / "train" / f"segment_{CHECKPOINTS[1]:07d}.json").read_text())["iteration"]
        == CHECKPOINTS[1]
    )

    # the jobs really went through Slurm, under the account, and accounting saw them
    logs = work / ".snakemake" / "slurm_logs"
    job_rule = {p.stem: p.relative_to(logs).parts[0] for p in logs.rglob("*.log")}
    rules = set(job_rule.values())
    assert {
        "rule_download_group",
        "rule_tokenize_group",
        "rule_train_segment",
        "rule_export_hf",
        "rule_evaluate_shots",
    } <= rules, rules
    jobs = {r["JobID"]: r for r in sacct_jobs() if r["JobID"] in job_rule}
    assert set(jobs) == set(job_rule), (sorted(jobs), sorted(job_rule))
    for job_id, row in jobs.items():
        if job_id == cancelled:
            assert row["State"].startswith("CANCELLED"), row  # sacct: "CANCELLED by 0"
        elif job_id in first_jobs and row["State"] != "COMPLETED":
            # running at the Ctrl-C: the plugin scancelled it; the rerun did the same job again
            assert row["State"].startswith(("CANCELLED", "FAILED")), row
            assert any(
                r["Comment"] == row["Comment"] and r["State"] == "COMPLETED" and k not in first_jobs
                for k, r in jobs.items()
            ), row
        else:
            assert row["State"] == "COMPLETED", row
        assert row["Account"] == ACCOUNT, row
        expected = "gpu" if job_rule[job_id] in ("rule_train_segment", "rule_evaluate_shots") else "debug"
        assert row["Partition"] == expected, row

    # every training job ran over both nodes, its srun step with one task per node
    train_jobs = [job_id for job_id, rule in job_rule.items() if rule == "rule_train_segment"]
    assert len(train_jobs) == len(CHECKPOINTS) + 1, train_jobs  # 3 segments + the cancelled attempt
    assert sum(jobs[j]["State"] == "COMPLETED" for j in train_jobs) == len(CHECKPOINTS)
    steps = [r for r in sacct_jobs() if r["JobID"].split(".")[0] in train_jobs]
    for job_id in train_jobs:
        assert jobs[job_id]["NNodes"] == "2", jobs[job_id]
        if job_id != cancelled:
            assert any(
                r["JobID"].startswith(f"{job_id}.")
                and r["JobID"].split(".")[-1].isdigit()
                and r["NNodes"] == "2"
                and r["NTasks"] == "2"
                and r["NodeList"] == "node[1-2]"
                for r in steps
            ), [r for r in steps if r["JobID"].startswith(job_id)]
    # both torchrun agents joined one rendezvous: group ranks 0 and 1, two workers in total
    train_log = (
        work / "results" / "demo" / "logs" / "train" / RUN_ID / f"segment_{CHECKPOINTS[-1]:07d}.log"
    ).read_text()
    assert "group_rank=0" in train_log and "group_rank=1" in train_log, train_log[-3000:]
    assert train_log.count("global_world_sizes=[2]") == 2, train_log[-3000:]

    # the token reached the jobs' environment but was written nowhere (results, logs, metadata)
    assert (work / ".snakemake" / "metadata").is_dir() and (work / "results" / "demo" / "logs").is_dir()
    leaks = files_containing(work, FAKE_HF_TOKEN.encode())
    assert not leaks, f"HF_TOKEN written to: {leaks}"


def test_timed_out_segment_is_retried_and_resumes(tmp_path):
    """A 120-iteration segment under a 1-minute walltime: Slurm ends attempt 1 with TIMEOUT, the
    profile's retries resubmit it, and each attempt resumes from the latest complete checkpoint
    (save_interval 10) until the segment's marker is written; the final weights and optimizer
    state equal an uninterrupted run's."""
    config_path = reduced_config(tmp_path, budget_iters=120)
    config = yaml.safe_load(config_path.read_text())
    config["scales"]["tiny"]["resources"].update({"segment_iters": 120, "walltime": "1m"})
    config_path.write_text(yaml.safe_dump(config))
    proc = run_snakemake(tmp_path, config_path, "train", retries=6)  # each attempt: ~1 min minus start-up
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
    # the last attempt resumed, or found that a killed attempt had already saved iteration 120 (it
    # died in the validation pass or before its marker) and only wrote the marker
    assert "resumed from" in last_log or "120 is already complete" in last_log, last_log[-3000:]

    # The attempts end where one uninterrupted run of the same run JSON ends, bit for bit.
    import torch
    from conftest import checkpoint_tensors

    run = json.loads((run_dir / "run.json").read_text())
    run["paths"]["run_dir"] = str(tmp_path / "uninterrupted")
    reference_json = tmp_path / "uninterrupted.json"
    reference_json.write_text(json.dumps(run))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "--run-json",
            str(reference_json),
            "--until",
            "120",
            "--marker",
            str(tmp_path / "uninterrupted.done"),
        ],
        check=True,
        timeout=900,
        cwd=tmp_path / "work",
        # the job's thread count (the rule's OMP_NUM_THREADS): CPU matmuls round differently with more
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(config["cluster"]["cpu_threads_per_rank"])},
    )
    resumed, reference = checkpoint_tensors(run_dir, 120), checkpoint_tensors(tmp_path / "uninterrupted", 120)
    assert resumed.keys() == reference.keys() and any("optimizer" in key for key in reference)
    for key, tensor in reference.items():
        assert torch.equal(resumed[key], tensor), key
