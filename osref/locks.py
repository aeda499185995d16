"""Exclusive locks that die with their holder, for the outputs two jobs must never write at once.

Snakemake's own lock covers one working directory. Two Snakemake instances with different
``--directory`` but the same ``paths.runs``, or a rerun after ``snakemake --unlock`` while an old
Slurm segment still runs, would train one run twice at once (a save deletes and rewrites a complete
checkpoint under the other job) or write one export twice. So a training segment holds
``{run_dir}/train.lock`` for its whole length, and an export holds ``.iter_XXXXXXX.lock`` next to
its target; a second job is refused with a message naming the holder (host, pid, Slurm job id).

Mechanism: a POSIX record lock on the whole file (``fcntl.lockf``, i.e. ``fcntl(F_SETLK)``). The
kernel (or the file server) drops it when the holding process ends, killed or not, so a crashed job
never leaves a stale lock behind; the holder writes who it is into the file, and a refused process
reads that back. POSIX locks rather than ``flock(2)``: on IBM Storage Scale (GPFS) ``flock`` is
local to one node while POSIX locks are cluster-wide, and on NFS the Linux client implements
``flock`` as a POSIX lock anyway. Which shared filesystems honour it across nodes (README, "Locks
on shared filesystems"): NFSv4, NFSv3 with lockd (not ``nolock``/``local_lock``), Lustre mounted
``-o flock`` (not ``localflock``; ``noflock`` refuses every lock), GPFS, BeeGFS only with
``tuneUseGlobalFileLocks``. Where locking fails outright, the job stops and says so;
``OSREF_LOCKS=off`` turns the locks off for a site that cannot have them.

Two properties of POSIX locks shape the use: a process loses its lock when it closes *any*
descriptor of the file (so the holder opens the file once and nothing else in it opens it), and a
second lock of the same file by the same process succeeds (the guard is between processes, which is
what jobs are).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCKS_ENV = "OSREF_LOCKS"


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


class LockUnsupported(RuntimeError):
    """The filesystem refuses POSIX locks (e.g. Lustre mounted ``noflock``, NFS without lockd)."""


def holder_info(what: str) -> dict:
    """Who takes the lock: written into the lock file for whoever is refused next."""
    return {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe_holder(path: str | Path) -> str:
    """The holder recorded in a lock file, in words."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ", not a Slurm job"
        return f"{info['what']} on host {info['host']}, pid {info['pid']}{job}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet (it is starting)"


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[dict]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Raises :class:`LockHeld` naming the holder when another process has it, and
    :class:`LockUnsupported` when the filesystem refuses locks. ``what`` describes the holder in
    the message another process gets ("training segment of run X").
    """
    path = Path(path)
    if os.environ.get(LOCKS_ENV, "").lower() in ("off", "0", "false", "no"):
        log.warning("%s=%s: not locking %s", LOCKS_ENV, os.environ[LOCKS_ENV], path)
        yield {}
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name stays readable
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise LockHeld(f"{path} is held by {describe_holder(path)}") from None
            raise LockUnsupported(
                f"cannot lock {path}: {exc.strerror} (errno {exc.errno}); this filesystem does not support POSIX "
                f'locks (Lustre needs the `flock` mount option, NFSv3 needs lockd). See the README, "Locks on '
                f'shared filesystems"; {LOCKS_ENV}=off runs without them'
            ) from None
        info = holder_info(what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        yield info
    finally:
        os.close(fd)  # releases the lock; the file (with the last holder's name) stays
