"""Atomic file writes, in one place.

Every JSON the stages leave behind (listings, manifests, markers, checkpoint completion files,
evaluation results) is written under a temporary name in the same directory and renamed over the
target, so a killed job never leaves a half-written file that looks complete.
"""

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` under a temporary name in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: no stray temporary file
        raise


def write_json_atomic(
    path: str | Path, payload: Any, *, indent: int = 1, sort_keys: bool = False, allow_nan: bool = True
) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")
