"""A training job killed at any moment loses at most the work since its last complete checkpoint.

Preemption and node failures on a cluster arrive as SIGKILL, with no chance to clean up. These
tests kill the real CLI (``scripts/train.py`` in a subprocess) in the two places that matter —
between checkpoint saves, and inside a save before ``complete.json`` — then rerun the same
command and check what is on disk: the rerun finishes, its final checkpoint (model and optimizer
tensors) and its de-duplicated ``train_metrics.jsonl`` are bit-identical to an uninterrupted run,
and no checkpoint directory is left without ``complete.json``.

Run from the repository root: ``python -m pytest tests/test_training_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, checkpoint_tensors, make_run, read_jsonl

TRAIN_ITERS = 8
CHECKPOINTS = [2, 6, 8]  # the wider 2 → 6 gap leaves room to kill between two saves
KILL_AFTER_LOGGED = 3
SUBPROCESS_TIMEOUT_S = 240

torch.set_num_threads(1)


def fault_run(data_root: Path, run_dir: Path) -> Path:
    """A short tiny run written as a run JSON next to its run directory; returns the JSON path."""
    run = make_run(data_root, run_dir)
    run["train"].update(
        train_iters=TRAIN_ITERS,
        warmup_iters=2,
        cooldown_iters=2,
        checkpoint_iters=CHECKPOINTS,
        segment_ends=[TRAIN_ITERS],
        global_batch_size=4,
        micro_batch_size=4,
    )
    run_json = run_dir.with_suffix(".json")
    run_json.write_text(json.dumps(run))
    return run_json


def train_command(run_json: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts/train.py"), "--run-json", str(run_json), "--until", str(TRAIN_ITERS)]


def train_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run_to_completion(run_json: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(run_json),
        env=train_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )


def start_in_own_session(run_json: Path, **extra_env: str) -> subprocess.Popen:
    """Start training in a new process group, so that killing it also ends the checkpoint
    writer's helper processes."""
    return subprocess.Popen(
        train_command(run_json),
        env=train_env(**extra_env),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def logged_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "logs/train_metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines() if line.endswith("}")]


def checkpoint_dirs(run_dir: Path) -> dict[int, bool]:
    """iteration → has complete.json, for every iter_* directory."""
    root = run_dir / "checkpoints"
    return {int(d.name[len("iter_") :]): (d / "complete.json").is_file() for d in sorted(root.glob("iter_*"))}


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> Path:
    """The run directory of one uninterrupted 0 → TRAIN_ITERS run. In this process, to save a
    CLI start-up: both use one thread, so the CLI's results must match it bit for bit."""
    from osref.training import train

    run_dir = tmp_path_factory.mktemp("fault-runs") / "uninterrupted"
    train(json.loads(fault_run(data_root, run_dir).read_text()), TRAIN_ITERS)
    return run_dir


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    assert checkpoint_dirs(run_dir) == {i: True for i in CHECKPOINTS}
    fields = ("iteration", "consumed_tokens", "loss", "lr", "grad_norm")
    logged = [tuple(r[f] for f in fields) for r in read_jsonl(run_dir / "logs/train_metrics.jsonl")]
    expected = [tuple(r[f] for f in fields) for r in read_jsonl(reference / "logs/train_metrics.jsonl")]
    assert [r[0] for r in logged] == list(range(1, TRAIN_ITERS + 1))
    assert logged == expected
    valid = read_jsonl(run_dir / "logs/valid_metrics.jsonl")
    assert valid == read_jsonl(reference / "logs/valid_metrics.jsonl")
    final, expected_final = checkpoint_tensors(run_dir, TRAIN_ITERS), checkpoint_tensors(reference, TRAIN_ITERS)
    assert final.keys() == expected_final.keys()
    assert any("optimizer" in k for k in final)
    for key in final:
        assert torch.equal(final[key], expected_final[key]), key


def test_sigkill_between_checkpoints_then_rerun_is_bit_identical(data_root, reference, tmp_path):
    run_dir = tmp_path / "killed-between-saves"
    run_json = fault_run(data_root, run_dir)
    proc = start_in_own_session(run_json)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while not any(i >= KILL_AFTER_LOGGED for i in logged_iterations(run_dir)):
            assert proc.poll() is None, f"training exited early:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "training never reached the kill point"
            time.sleep(0.005)
    finally:
        kill_process_group(proc)
    assert proc.returncode == -signal.SIGKILL

    # Killed between the saves of iterations 2 and 6: only 2 is on disk, and the log ran past it.
    killed_at = max(logged_iterations(run_dir))
    assert KILL_AFTER_LOGGED <= killed_at < CHECKPOINTS[1], "training outran the kill: rerun the test"
    assert checkpoint_dirs(run_dir) == {CHECKPOINTS[0]: True}

    rerun = run_to_completion(run_json)
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{CHECKPOINTS[0]:07d}'}" in rerun.stderr
    assert_same_as_reference(run_dir, reference)


def test_sigkill_during_checkpoint_write_leaves_torn_checkpoint_that_is_ignored(data_root, reference, tmp_path):
    from osref.checkpointing import KILL_DURING_SAVE_ENV, latest_complete_iteration

    run_dir = tmp_path / "killed-during-save"
    run_json = fault_run(data_root, run_dir)
    torn_iteration = CHECKPOINTS[1]
    proc = start_in_own_session(run_json, **{KILL_DURING_SAVE_ENV: str(torn_iteration)})
    try:
        proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        kill_process_group(proc)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()

    # The save of iteration 6 wrote its tensors and RNG state but never its completion marker.
    torn = run_dir / f"checkpoints/iter_{torn_iteration:07d}"
    assert checkpoint_dirs(run_dir) == {CHECKPOINTS[0]: True, torn_iteration: False}
    assert (torn / ".metadata").is_file() and (torn / "rng/rank_00000.pt").is_file()
    assert latest_complete_iteration(run_dir / "checkpoints") == CHECKPOINTS[0]
    assert max(logged_iterations(run_dir)) == torn_iteration

    rerun = run_to_completion(run_json)
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{CHECKPOINTS[0]:07d}'}" in rerun.stderr
    assert_same_as_reference(run_dir, reference)  # includes: the torn checkpoint is now complete


def test_rerun_drops_a_metrics_line_torn_by_the_kill(tmp_path):
    from osref.training import truncate_metrics

    metrics = tmp_path / "train_metrics.jsonl"
    metrics.write_text("".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in range(1, 6)) + '{"iterat')
    truncate_metrics(metrics, keep_up_to=3)
    assert [r["iteration"] for r in read_jsonl(metrics)] == [1, 2, 3]
    truncate_metrics(metrics, keep_up_to=3)  # idempotent
    assert metrics.read_text().count("\n") == 3


# ---- issue 11: divergence, and two trainers on one run directory ------------------------------------

EXIT_LOCKED, EXIT_NON_FINITE = 4, 5


def test_diverging_learning_rate_stops_the_segment_naming_the_iteration(data_root, tmp_path):
    """fp32 with a learning rate of 1e6 and no clipping: the gradient norm is NaN at iteration 3
    (before the check, training ran on to 8, saved NaN checkpoints at 4, 6 and 8 with complete.json
    and exited 0). The segment stops at 3 with an error naming it; only the finite checkpoint of
    iteration 2 exists; no marker."""
    run_dir = tmp_path / "diverging"
    run_json = fault_run(data_root, run_dir)
    run = json.loads(run_json.read_text())
    run["train"].update(lr=1e6, clip_grad=0.0, checkpoint_iters=[2, 4, 6, 8])
    run_json.write_text(json.dumps(run))
    marker = tmp_path / "segment.json"
    proc = subprocess.run(
        train_command(run_json) + ["--marker", str(marker)],
        env=train_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == EXIT_NON_FINITE, proc.stderr[-3000:]
    assert "iteration 3: the loss or the gradient norm is not finite (loss 10.8258, gradient norm nan)" in proc.stderr
    assert "training diverged" in proc.stderr
    assert checkpoint_dirs(run_dir) == {2: True}
    assert not marker.exists()
    assert all(torch.isfinite(t).all() for t in checkpoint_tensors(run_dir, 2).values())


def _poisoned_complete_checkpoint(run: dict, source: int, iteration: int, monkeypatch) -> None:
    """A checkpoint as the code before the finiteness check saved it: complete.json over NaN
    weights (checkpoint ``source`` with its weights set to NaN, saved by the real save with its
    check switched off)."""
    from osref import checkpointing, training

    trainer = training._build_trainer(run)
    checkpointing.load_checkpoint(
        checkpointing.checkpoint_dir(run["paths"]["run_dir"], source),
        trainer.model.module,
        trainer.optimizer,
        trainer.scheduler,
    )
    with torch.no_grad():
        for param in trainer.model.module.parameters():
            param.fill_(float("nan"))
    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "model_is_finite", lambda model: True, raising=False)  # (old code: no check)
        checkpointing.save_checkpoint(
            run["paths"]["run_dir"], iteration, 0, trainer.model.module, trainer.optimizer, trainer.scheduler
        )
    marker = json.loads((Path(run["paths"]["run_dir"]) / f"checkpoints/iter_{iteration:07d}/complete.json").read_text())
    marker.pop("finite", None)  # and without the flag of a checked save
    checkpointing.write_json_atomic(
        Path(run["paths"]["run_dir"]) / f"checkpoints/iter_{iteration:07d}/complete.json", marker
    )


def test_resume_skips_a_complete_checkpoint_holding_nan(data_root, reference, tmp_path, monkeypatch):
    """Checkpoint 6 is complete but NaN (saved before the check existed), checkpoint 2 is good:
    the rerun demotes 6 (nonfinite.json), resumes from 2 and ends bit-identical to an
    uninterrupted run. Before, it resumed from the NaN checkpoint and trained NaN to the end."""
    from osref.training import train

    run_dir = tmp_path / "poisoned"
    run_json = fault_run(data_root, run_dir)
    run = json.loads(run_json.read_text())
    train(run, CHECKPOINTS[0])
    (run_dir / "logs/valid_metrics.jsonl").unlink()  # the reference validates at its end only
    _poisoned_complete_checkpoint(run, CHECKPOINTS[0], CHECKPOINTS[1], monkeypatch)
    assert checkpoint_dirs(run_dir) == {CHECKPOINTS[0]: True, CHECKPOINTS[1]: True}

    rerun = run_to_completion(run_json)
    assert f"iter_{CHECKPOINTS[1]:07d} holds NaN/inf weights although marked complete: skipped" in rerun.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{CHECKPOINTS[0]:07d}'}" in rerun.stderr
    assert_same_as_reference(run_dir, reference)  # checkpoint 6 was trained again, finite this time


def test_a_nan_model_is_never_saved(data_root, tmp_path):
    from osref import checkpointing, training

    run = make_run(data_root, tmp_path / "nan-save")
    trainer = training._build_trainer(run)
    with torch.no_grad():
        next(trainer.model.module.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(checkpointing.NonFiniteCheckpoint, match="iteration 10: the model holds NaN/inf"):
        checkpointing.save_checkpoint(
            tmp_path / "nan-save", 10, 0, trainer.model.module, trainer.optimizer, trainer.scheduler
        )
    assert not (tmp_path / "nan-save" / "checkpoints").exists()


def test_second_trainer_on_the_same_run_is_refused_naming_the_first(data_root, reference, tmp_path):
    """Two real trainer processes on one run directory (two Snakemake instances sharing paths.runs,
    or a rerun after --unlock while the old Slurm segment still runs). The first holds the run's
    lock (frozen with SIGSTOP once it has it, so that it is surely alive); the second is refused
    with the first's host, pid and Slurm job id and changes nothing. Once the first is SIGKILLed,
    its lock is gone with it: the same command then finishes the run, bit-identical to an
    uninterrupted one."""
    import socket

    run_dir = tmp_path / "contended"
    run_json = fault_run(data_root, run_dir)
    lock = run_dir / "train.lock"
    first = start_in_own_session(run_json, SLURM_JOB_ID="424242")
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    try:
        while f'"pid": {first.pid},' not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, f"the first trainer exited early:\n{first.stderr.read()}"
            assert time.monotonic() < deadline, "the first trainer never took the lock"
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)
        before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

        second = subprocess.run(
            train_command(run_json),
            env=train_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
        assert second.returncode == EXIT_LOCKED, second.stderr[-3000:]
        assert "another job trains this run" in second.stderr
        assert f"on host {socket.gethostname()}, pid {first.pid}, Slurm job 424242" in second.stderr
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before
    finally:
        kill_process_group(first)

    rerun = run_to_completion(run_json)
    assert rerun.returncode == 0
    assert_same_as_reference(run_dir, reference)
