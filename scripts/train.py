"""Train one run up to an iteration, resuming from its newest complete checkpoint.

Tiny CPU run on the demo (the run JSON is written by the workflow's ``run_config`` rule, e.g.
``snakemake --profile profiles/local --configfile config/demo.yaml results/demo/runs/tiny-demo-0.25M-128/run.json``):

    python scripts/train.py --run-json results/demo/runs/tiny-demo-0.25M-128/run.json --until 20

Two CPU processes (data parallel over gloo; ``tensor_parallel: 2`` in the run JSON gives TP=2):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node=2 scripts/train.py \
        --run-json results/demo/runs/tiny-demo-0.25M-128/run.json --until 40 --marker /tmp/done.json

One GPU node, 4 GPUs (srun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT the same way):

    torchrun --nproc-per-node=4 scripts/train.py --run-json results/runs/<run_id>/run.json \
        --until 2000 --marker results/runs/<run_id>/train/segment_0002000.json

Without RANK/WORLD_SIZE in the environment it runs as a single process (world size 1). On success
rank 0 writes the marker (``{"iteration", "consumed_tokens", "checkpoint", "kernels"}``: the fused
kernels in effect, osref/kernels.py) via temp + rename.
Rank 0 holds ``{run_dir}/train.lock`` from before the checkpoint to resume from is chosen until the
marker is written (osref/locks.py).

Exit status: 0 trained (or already trained); 3 the run's training config changed since its
checkpoints were written; 4 another job trains this run (the message names it: host, pid, Slurm
job id), or the filesystem refuses the lock (README, "Locks on shared filesystems"); 5 the loss or
gradient norm became NaN/inf (the message names the iteration; nothing after the last checkpoint
is saved, a rerun resumes from the newest finite checkpoint); 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-json", required=True, type=Path, help="resolved run JSON")
    parser.add_argument("--until", required=True, type=int, help="train until this iteration (inclusive)")
    parser.add_argument("--marker", type=Path, help="JSON written by rank 0 when the segment is saved")
    parser.add_argument(
        "--dump-final-weights",
        action="store_true",
        help="debug: every rank writes {run_dir}/weights_rank<R>.pt to compare data-parallel replicas",
    )
    return parser.parse_args(argv)


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO if rank == "0" else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    import torch
    import torch.distributed as dist

    from osref.checkpointing import NonFiniteCheckpoint
    from osref.contracts import ContractError, RunDocument, load_run_document
    from osref.files import write_json_atomic
    from osref.locks import LockHeld, LockUnsupported
    from osref.run_identity import RunIdentityError, check_or_record
    from osref.training import NonFiniteLoss, init_distributed, segment_lock, train_and_return_model

    try:
        run = load_run_document(args.run_json)
        if not isinstance(run, RunDocument):
            raise ContractError(f"{args.run_json}: a released checkpoint's run document; nothing to train")
    except ContractError as exc:
        logging.error("%s", exc)
        return 2
    try:
        check_or_record(run)
    except RunIdentityError as exc:
        logging.error("%s", exc)
        return 3
    init_distributed(run.train.tensor_parallel)
    try:
        with segment_lock(run, args.until):
            result, model = train_and_return_model(run, args.until)
            if args.dump_final_weights and model is not None:
                weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
                torch.save(weights, run.layout.path(f"weights_rank{dist.get_rank()}.pt"))
            if dist.get_rank() == 0 and args.marker:
                args.marker.parent.mkdir(parents=True, exist_ok=True)
                marker = {k: result[k] for k in ("iteration", "consumed_tokens", "checkpoint", "kernels")}
                write_json_atomic(args.marker, marker)
            dist.barrier()
    except (LockHeld, LockUnsupported) as exc:
        logging.error("%s", exc)
        return 4
    except (NonFiniteLoss, NonFiniteCheckpoint) as exc:
        logging.error("run %s: %s", run.run_id, exc)
        return 5
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
