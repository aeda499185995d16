"""Guard against silently mixing two configurations in one run directory.

A run id names a directory of checkpoints. If the config that produced those checkpoints changes
in a training-relevant way (architecture, recipe, data) and training is relaunched, resuming would
continue the old weights under the new recipe. The first training job of a run therefore records
the identity-relevant part of ``run.json`` next to the checkpoints; every later job compares and
refuses with the list of changed keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from osref.contracts import RunDocument
from osref.files import write_json_atomic
from osref.paths import IDENTITY_FILE

# Keys that may change without changing what is being trained (extra save points included: a
# cool-down branch added later adds its branch point to the parent's checkpoints; the fused
# kernels give the plain path's losses, tests/test_kernels.py, so a run may switch them, e.g.
# when a new node image cannot compile: each metrics line records the ones in effect).
VOLATILE_TRAIN_KEYS = {"segment_ends", "checkpoint_iters", "log_interval", "eval_iters", "tensorboard", "kernels"}


class RunIdentityError(RuntimeError):
    pass


def identity(run: RunDocument | Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant part of ``run.json`` (paths and :data:`VOLATILE_TRAIN_KEYS` left out)."""
    run = RunDocument.coerce(run).to_json()
    return {
        "model": run["model"],
        "train": {k: v for k, v in run["train"].items() if k not in VOLATILE_TRAIN_KEYS},
        "data": {"prefixes": [Path(p).name for p in run["data"]["prefixes"]], "weights": run["data"]["weights"]},
        "tokenizer": {k: v for k, v in run["tokenizer"].items() if k != "path"},
        "dataset": run.get("dataset"),  # a plain dict here: to_json leaves out what was not given
        "branch": {k: v for k, v in (run.get("branch") or {}).items() if k != "parent_run_dir"},
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def check_or_record(run: RunDocument | Mapping[str, Any], checkpoint_root: str | Path | None = None) -> None:
    """Record the run's identity on first use; raise :class:`RunIdentityError` when it changed.
    The record is :attr:`osref.paths.RunLayout.identity` (or in ``checkpoint_root``, given)."""
    run = RunDocument.coerce(run)
    checkpoint_root = run.layout.checkpoints if checkpoint_root is None else checkpoint_root
    path = Path(checkpoint_root) / IDENTITY_FILE
    current = identity(run)
    if not path.exists():
        write_json_atomic(path, current)
        return
    recorded = json.loads(path.read_text())
    if recorded == current:
        return
    old, new = _flatten(recorded), _flatten(current)
    changes = [
        f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    raise RunIdentityError(
        f"run {run.run_id}: the config changed since its checkpoints in {Path(checkpoint_root)} were written:\n  "
        + "\n  ".join(changes)
        + "\nGive the changed experiment a new `suffix` (a new run id), or delete the run directory to start over."
    )
