"""torch_dist checkpoints of a training run, and how to tell a complete one from a torn one.

Layout (one directory per saved iteration, never rotated away)::

    {run_dir}/checkpoints/iter_0000020/
        .metadata, __*_*.distcp, common.pt, metadata.json   # megatron dist_checkpointing files
        rng/rank_00000.pt ...                               # per-rank RNG states (resume only)
        complete.json                                       # written last: the checkpoint counts

A job killed mid-save leaves a directory without ``complete.json``; it is ignored by
:func:`latest_complete_iteration` and replaced by the next save of that iteration. A model holding
NaN/inf is never saved (:class:`NonFiniteCheckpoint`); a checkpoint found non-finite on resume
(written before that check existed) loses its ``complete.json`` to a ``nonfinite.json`` saying why
(:func:`mark_non_finite`), so that neither resume nor export takes it again. The torch_dist
format reshards on load, so any world size / TP layout can read any other's model weights
(:func:`load_model_for_inference` reads with one process).

Fault injection for tests: with ``OSREF_TEST_KILL_DURING_SAVE=<iteration>`` in the environment, a
process saving that iteration SIGKILLs itself after the torch_dist and RNG files are written and
before ``complete.json`` — the torn checkpoint a preempted job leaves (tests/test_training_faults.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from osref.contracts import RunDocument
from osref.files import write_json_atomic
from osref.paths import RunLayout

log = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"
NON_FINITE_MARKER = "nonfinite.json"
KILL_DURING_SAVE_ENV = "OSREF_TEST_KILL_DURING_SAVE"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    """``{run_dir}/checkpoints`` (:class:`osref.paths.RunLayout`)."""
    return Path(RunLayout(str(run_dir)).checkpoints)


def checkpoint_dir(run_dir: str | Path, iteration: int) -> Path:
    """``{run_dir}/checkpoints/iter_XXXXXXX`` (:class:`osref.paths.RunLayout`)."""
    return Path(RunLayout(str(run_dir)).checkpoint(iteration))


def is_complete(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE_MARKER).is_file()


def complete_iterations(ckpt_root: str | Path) -> list[int]:
    """Sorted iterations whose checkpoint directory holds ``complete.json``."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ITER_DIR.match(entry.name)
        if match and is_complete(entry):
            found.append(int(match.group(1)))
    return sorted(found)


def latest_complete_iteration(ckpt_root: str | Path, at_most: int | None = None) -> int | None:
    """Highest complete checkpoint iteration (optionally ``<= at_most``), or None."""
    candidates = [i for i in complete_iterations(ckpt_root) if at_most is None or i <= at_most]
    return candidates[-1] if candidates else None


def read_complete_marker(ckpt_dir: str | Path) -> dict:
    return json.loads((Path(ckpt_dir) / COMPLETE_MARKER).read_text())


class NonFiniteCheckpoint(RuntimeError):
    """The model to be saved holds NaN or inf: it is not saved, let alone marked complete."""


def model_is_finite(model) -> bool:
    """Whether every parameter of ``model`` (this rank's shard) is finite, agreed over all ranks."""
    params = [p.detach() for p in model.parameters()]
    flag = torch.stack([torch.isfinite(p).all() for p in params]).all().float().reshape(1)  # one sync
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def mark_non_finite(ckpt_dir: str | Path, reason: str) -> None:
    """Demote a complete checkpoint found to hold NaN/inf: ``nonfinite.json`` (why), then
    ``complete.json`` goes, so resume and export skip it. Rank 0 writes; collective."""
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0:
        found_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomic(
            ckpt_dir / NON_FINITE_MARKER,
            {"reason": reason, "found_at": found_at, "complete_was": read_complete_marker(ckpt_dir)},
        )
        (ckpt_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    _barrier()


# ---- RNG state ------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank_{rank:05d}.pt"


# ---- save / load for training ----------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded_state_dict(model, optimizer, scheduler, *, is_loading: bool, dist_optimizer: bool) -> dict:
    model_sd = model.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"} if dist_optimizer else None
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata),
    }
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    consumed_tokens: int,
    model,
    optimizer,
    scheduler,
    *,
    dist_optimizer: bool = False,
) -> Path:
    """Collectively save a resumable checkpoint; ``model`` is the unwrapped megatron module.

    Raises :class:`NonFiniteCheckpoint` (on every rank, before anything is written) when any weight
    is NaN or inf; ``complete.json`` records that the weights were checked (``"finite": true``).
    """
    from megatron.core import dist_checkpointing

    if not model_is_finite(model):
        raise NonFiniteCheckpoint(f"iteration {iteration}: the model holds NaN/inf weights; not saved")
    target = checkpoint_dir(run_dir, iteration)
    if _rank() == 0:
        if target.exists():
            (target / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(target)
        target.mkdir(parents=True)
    _barrier()
    state = _sharded_state_dict(model, optimizer, scheduler, is_loading=False, dist_optimizer=dist_optimizer)
    dist_checkpointing.save(state, str(target))
    _rng_file(target, 0).parent.mkdir(exist_ok=True)
    torch.save(capture_rng_state(), _rng_file(target, _rank()))
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration):
        os.kill(os.getpid(), signal.SIGKILL)
    _barrier()
    if _rank() == 0:
        saved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        marker = {"iteration": iteration, "consumed_tokens": consumed_tokens, "saved_at": saved_at, "finite": True}
        write_json_atomic(target / COMPLETE_MARKER, marker)
    _barrier()
    return target


def load_checkpoint(ckpt_dir: str | Path, model, optimizer, scheduler, *, dist_optimizer: bool = False) -> dict:
    """Restore model, optimizer, scheduler (unless None) and this rank's RNG; returns the
    ``complete.json`` dict."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no {COMPLETE_MARKER}; not a complete checkpoint")
    state = _sharded_state_dict(model, optimizer, scheduler, is_loading=True, dist_optimizer=dist_optimizer)
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, str(ckpt_dir))
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.num_steps = 0  # megatron's load_state_dict adds the saved count: loading twice must not
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    rng_file = _rng_file(ckpt_dir, _rank())
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s missing (different world size?): RNG not restored, resume not bit-identical", rng_file)
    return read_complete_marker(ckpt_dir)


# ---- inference -------------------------------------------------------------------------------


def load_model_for_inference(run: RunDocument | Mapping[str, Any], iteration: int):
    """The megatron ``GPTModel`` of ``run`` at ``iteration``: one process, CPU, fp32, eval mode.

    Reads only the model weights from the torch_dist checkpoint, whatever world size or TP layout
    wrote it. Creates a world-size-1 process group when none exists.
    """
    from megatron.core import dist_checkpointing

    from osref.megatron_compat import enable_cpu_guards, init_single_process_parallel
    from osref.megatron_model import build_gpt_model

    run = RunDocument.coerce(run)
    ckpt_dir = Path(run.layout.checkpoint(iteration))
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: no {COMPLETE_MARKER}; not a complete checkpoint")
    enable_cpu_guards()
    init_single_process_parallel()
    model = build_gpt_model(run.model, seed=run.train.seed, attention="local", device="cpu")
    with torch.no_grad():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
        model.load_state_dict(loaded["model"])
    return model.float().cpu().eval()
