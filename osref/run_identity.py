"""Guard against silently mixing two configurations, or two datasets, in one run directory.

A run id names a directory of checkpoints. If the config that produced those checkpoints changes
in a training-relevant way (architecture, recipe, data) and training is relaunched, resuming would
continue the old weights under the new recipe. The first training job of a run therefore records
the identity-relevant part of ``run.json`` next to the checkpoints; every later job compares and
refuses with the list of changed keys.

The data is compared by content too, not only by name: a local corpus edited in place is re-listed
and re-tokenized under the same prefixes (osref/fingerprint.py), and its runs' training jobs rerun.
The record holds, per tokenized group, a digest of what the group was made from (its download
manifest: every source file's path, size and sha256) and of what tokenization made of it (tokens and
documents of its stats), :func:`data_content`: small files, read in milliseconds. A later job whose
digests differ refuses to resume, naming the groups. A record written before this check existed has
no digests: it is accepted as it is (nothing says the data changed) and the current digests are added
to it, so existing campaigns go on and are guarded from then on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from osref.contracts import RunDocument
from osref.files import write_json_atomic
from osref.paths import IDENTITY_FILE, group_files_of_prefix

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


def _group_name(prefix: str) -> str:
    return "/".join(Path(prefix).parts[-2:])  # "{dataset}/group_{g}"


def data_content(run: RunDocument) -> dict[str, str]:
    """``{"{dataset}/group_{g}": sha256}`` for each of the run's tokenized groups whose download manifest
    exists: a digest of the group's source files (path, size, sha256 from the manifest) and of its
    tokenized counts (tokens, documents, from its stats, where present). A group without a download
    manifest (data made outside the workflow) has no entry and is not compared."""
    content = {}
    for prefix in run.data.prefixes:
        files = group_files_of_prefix(prefix)
        try:
            manifest = json.loads(Path(files["download_manifest"]).read_text())
        except (OSError, ValueError):
            continue
        sources = sorted(
            (f.get("source_path", f.get("path")), f.get("size"), f.get("sha256")) for f in manifest["files"]
        )
        try:
            stats = json.loads(Path(files["stats"]).read_text())
            counts = [stats.get("tokens"), stats.get("documents")]
        except (OSError, ValueError):
            counts = None
        blob = json.dumps({"sources": sources, "tokenized": counts}, sort_keys=True).encode()
        content[_group_name(prefix)] = hashlib.sha256(blob).hexdigest()
    return content


def _check_data(run: RunDocument, recorded: dict[str, str], current: dict[str, str], root: Path) -> None:
    changed = sorted(name for name in set(recorded) & set(current) if recorded[name] != current[name])
    if changed:
        shown = ", ".join(f"{name} ({recorded[name][:12]} -> {current[name][:12]})" for name in changed[:10])
        more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
        raise RunIdentityError(
            f"run {run.run_id}: the data changed since its checkpoints in {root} were written: {shown}{more} "
            "(the group's source files or their tokenization differ; e.g. a local corpus edited in place). "
            f"Resuming would train one run on two datasets. Delete {root} to train on the new data from the "
            "start, give the experiment a new `suffix` (a new run id), or restore the old data."
        )


def check_or_record(run: RunDocument | Mapping[str, Any], checkpoint_root: str | Path | None = None) -> None:
    """Record the run's identity (config and data content, :func:`data_content`) on first use; raise
    :class:`RunIdentityError` when either changed. The record is :attr:`osref.paths.RunLayout.identity`
    (or in ``checkpoint_root``, given)."""
    run = RunDocument.coerce(run)
    checkpoint_root = run.layout.checkpoints if checkpoint_root is None else checkpoint_root
    path = Path(checkpoint_root) / IDENTITY_FILE
    current = identity(run)
    content = data_content(run)
    if not path.exists():
        write_json_atomic(path, {**current, "data_content": content} if content else current)
        return
    recorded = json.loads(path.read_text())
    recorded_content = recorded.pop("data_content", {})
    if recorded == current:
        _check_data(run, recorded_content, content, Path(checkpoint_root))
        if set(content) - set(recorded_content):  # a record of the previous version, or new groups
            write_json_atomic(path, {**recorded, "data_content": {**content, **recorded_content}})
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
