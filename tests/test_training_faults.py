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
        train_iters=TRAIN_ITERS, warmup_iters=2, cooldown_iters=2, checkpoint_iters=CHECKPOINTS,
        segment_ends=[TRAIN_ITERS], global_batch_size=4, micro_batch_size=4,
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
        train_command(run_json), env=train_env(), cwd=REPO, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=True,
    )


def start_in_own_session(run_json: Path, **extra_env: str) -> subprocess.Popen:
    """Start training in a new process group, so that killing it also ends the checkpoint
    writer's helper processes."""
    return subprocess.Popen(
        train_command(run_json), env=train_env(**extra_env), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
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
    return {int(d.name[len("iter_"):]): (d / "complete.json").is_file() for d in sorted(root.glob("iter_*"))}


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
