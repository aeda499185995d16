"""osref.locks between real processes: the holder is named, the lock dies with its holder, the
opt-out works, and a filesystem that refuses locks stops the job with a clear message.

Training and export use these locks end to end in tests/test_training_faults.py and
tests/test_export.py; here the lock alone, with processes that start in milliseconds.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from osref.locks import LOCKS_ENV, LockHeld, LockUnsupported, exclusive_lock

HOLD = """
import sys, time
from osref.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "a test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(path: Path, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path, monkeypatch):
    monkeypatch.delenv(LOCKS_ENV, raising=False)
    path = tmp_path / "run" / "train.lock"
    holder = start_holder(path, SLURM_JOB_ID="777")
    try:
        with pytest.raises(LockHeld) as refused:
            with exclusive_lock(path, "the second"):
                pass
        assert (
            f"is held by a test holder on host {socket.gethostname()}, pid {holder.pid}, Slurm job 777, since "
            in str(refused.value)
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with exclusive_lock(path, "the second") as info:  # killed holders leave no stale lock
        assert info["pid"] == os.getpid()
    assert '"what": "the second"' in path.read_text()


def test_locks_off_lets_a_second_process_through(tmp_path, monkeypatch):
    path = tmp_path / "train.lock"
    holder = start_holder(path)
    try:
        monkeypatch.setenv(LOCKS_ENV, "off")
        with exclusive_lock(path, "unlocked") as info:
            assert info == {}
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_filesystem_that_refuses_locks_stops_with_the_reason(tmp_path, monkeypatch):
    """No filesystem here refuses POSIX locks (Lustre `noflock` gives ENOSYS, NFS without lockd
    ENOLCK): the refusal is injected at fcntl.lockf."""
    import fcntl

    def refuse(fd, cmd, *args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.delenv(LOCKS_ENV, raising=False)
    monkeypatch.setattr(fcntl, "lockf", refuse)
    with pytest.raises(LockUnsupported, match="does not support POSIX locks .*OSREF_LOCKS=off runs without them"):
        with exclusive_lock(tmp_path / "train.lock", "x"):
            pass


def test_a_lock_file_without_a_name_yet_is_described(tmp_path):
    from osref.locks import describe_holder

    (tmp_path / "empty.lock").write_text("")
    assert "has not written its name yet" in describe_holder(tmp_path / "empty.lock")
