"""Atomic writes, in one place: files, tables, figures, copies and whole directories.

Every file the stages leave behind (listings, manifests, markers, checkpoint completion files,
evaluation results, the report's tables, plots and HTML, a Hugging Face export directory) is
written under a temporary name in the same directory and renamed over the target, so a killed job
never leaves a half-written file that looks complete, and a failed write (a full disk) leaves no
temporary behind.

* :func:`atomic_target`: the one "temp name, then ``os.replace``" — every helper below uses it;
* :func:`write_text_atomic`, :func:`write_json_atomic`, :func:`write_frame_atomic` (csv/parquet),
  :func:`copy_atomic`;
* :func:`atomic_directory`: a directory built in a temporary sibling, renamed into place when the
  block succeeds; its writers hold ``.<name>.lock`` (:mod:`osref.locks`), and temporaries of killed
  writers of the same target are removed (an export: ~3.4 GB at 1.7B);
* :func:`commit_partial`: a *resumable* partial (a download kept across retries under a fixed name,
  ``<target>.partial``) renamed into place once complete.

Not here, on purpose: the tokenizer's ``.bin``/``.idx`` pair (:mod:`osref.tokenize`), which renames
its two temporaries in a fixed order (``.bin`` first, ``.idx`` last: a pair counts once ``.idx``
exists).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (``.<name>.tmp-<pid>``); when the block succeeds it
    replaces ``path``, when it fails it is removed. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no stray temporary file
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` under a temporary name in the same directory, then rename."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(
    path: str | Path, payload: Any, *, indent: int = 1, sort_keys: bool = False, allow_nan: bool = True
) -> Path:
    """``payload`` as JSON (one trailing newline), atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def write_frame_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """A data frame as parquet (``.parquet``) or CSV (anything else; floats ``%.10g``), atomically."""
    path = Path(path)
    with atomic_target(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False, float_format="%.10g")
    return path


def copy_atomic(source: str | Path, target: str | Path) -> Path:
    """Copy the bytes of ``source`` to ``target``, atomically."""
    with atomic_target(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, what: str = "a writer") -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; it replaces ``out_dir`` only if the block succeeds.

    On any error (a parity failure included) the temporary directory is removed, so a half-written
    directory can never be taken for a finished one. The writer holds ``.<name>.lock`` next to the
    target for the whole block (a second live writer is refused, :class:`osref.locks.LockHeld`,
    naming the first); temporaries that killed writers of the same target left are removed first.
    """
    from osref.locks import exclusive_lock

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out_dir.parent / f".{out_dir.name}.lock", f"{what} to {out_dir}"):
        # every live writer of this target holds the lock: what is here was left by killed ones
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
            log.warning("removing %s, left behind by a killed %s", stale, what.removeprefix("an ").removeprefix("a "))
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def stat_key(path: str | Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of a regular file, None when it does not exist (yet): what the caches
    (the report's, the reference data's) key a file's content on."""
    from stat import S_ISREG

    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (stat.st_mtime_ns, stat.st_size) if S_ISREG(stat.st_mode) else None


def partial_path(target: str | Path) -> Path:
    """The fixed name (``<target>.partial``) under which a resumable download of ``target`` grows."""
    target = Path(target)
    return target.with_name(target.name + ".partial")


def commit_partial(partial: str | Path, target: str | Path) -> Path:
    """Rename a complete resumable partial (a file or a directory) to ``target``, replacing a
    directory that is already there (a rerun by hand; Snakemake removes its outputs first)."""
    target = Path(target)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target
