"""Measure training throughput of one model scale on this machine: tokens/s, TFLOP/s per device, MFU.

The plan's GPU-hours rest on an assumed throughput (``tokens_per_gpu_second`` or
``cluster.peak_tflops_per_gpu × assumed_mfu`` in the config). This script measures it with the
training stack itself — the model, megatron DDP, optimizer and update step of ``osref.training`` —
on random tokens, so it needs no data. On a GPU it trains in bf16 with the Transformer Engine
layer spec when TE is installed (else megatron's local spec with PyTorch SDPA attention); on the
CPU in fp32 (only ``--tiny`` is practical there).

FLOPs per token are ``ModelSpec.flops_per_token(with_attention=True)`` (6·N + causal attention);
MFU is against the device's dense bf16 peak (``osref.training.BF16_PEAK_TFLOPS``, or
``--peak-tflops``), reported as n/a on the CPU. Reference: open-sci-ref 0.01 trained 1.7B at
1.15–1.24 s/iteration on 252 A100s, 162–181 TFLOP/s per GPU by Megatron's count (≈ 55 % MFU).

Usage (from the repository root):

    python scripts/bench_train.py --tiny --steps 3                      # CPU smoke test
    python scripts/bench_train.py --scale 1.7b --steps 20               # one GPU, micro-batch 4 × 4096
    python scripts/bench_train.py --scale 1.7b --micro-batch-size 2 --recompute none
    torchrun --nproc-per-node=4 scripts/bench_train.py --scale 1.7b     # data parallel, one node

Prints one ``name: value`` line per result (device, model, step_s, tokens_per_s,
tflops_per_device, mfu, mem_gb) and, with ``--json``, the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY_RUN = REPO / "tests/data/tiny_run.json"
RANDOM_SAMPLES = 64  # distinct random sequences, cycled


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--scale", help="a scale of the config's `scales` block, e.g. 1.7b")
    which.add_argument("--tiny", action="store_true", help="the 2-layer test model of tests/data/tiny_run.json")
    parser.add_argument("--config", type=Path, default=REPO / "config/config.yaml", help="config with the scale")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocation, autotuning)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the scale's resources.micro_batch_size")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    parser.add_argument("--seq-length", type=int, help="default: the scale's sequence length")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], help="default: the recipe's (GPU)")
    parser.add_argument(
        "--attention",
        choices=["transformer_engine", "sdpa", "local"],
        help="core attention (default: TE when installed, else SDPA on a GPU, else megatron's local)",
    )
    parser.add_argument("--no-fusion", action="store_true", help="turn off megatron's jit bias/activation fusions")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: by GPU name)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    return parser.parse_args(argv)


def bench_run(args, on_gpu: bool, world_size: int) -> dict:
    """A run document (model + train blocks) for the benchmark: the scale's architecture and
    training settings, with the batch, schedule and precision set for a short benchmark."""
    if args.tiny:
        run = json.loads(TINY_RUN.read_text())
    else:
        from osref.grid import load_grid, run_document

        grid = load_grid(args.config)
        runs = [r for r in grid.runs.values() if r.scale == args.scale]
        if not runs:
            scales = sorted({r.scale for r in grid.runs.values()})
            raise SystemExit(f"--scale {args.scale}: no run of that scale in {args.config} (have {scales})")
        run = run_document(grid, runs[0])
    train = run["train"]
    data_parallel = world_size // train.get("tensor_parallel", 1)
    micro_batch_size = args.micro_batch_size or train["micro_batch_size"]
    seq_length = args.seq_length or train["seq_length"]
    total_steps = args.warmup_steps + args.steps
    train.update(
        micro_batch_size=micro_batch_size,
        global_batch_size=micro_batch_size * args.micro_batches * data_parallel,
        seq_length=seq_length,
        train_iters=total_steps + 2,
        warmup_iters=total_steps,  # a gentle ramp: random tokens at the peak LR diverge
        cooldown_iters=1,
        precision="bf16" if on_gpu else "fp32",
        recompute=(args.recompute or train.get("recompute", "none")) if on_gpu else "none",
        peak_tflops=args.peak_tflops,
        attention=args.attention,
        fusion=on_gpu and not args.no_fusion,
    )
    run["model"]["seq_length"] = max(run["model"]["seq_length"], seq_length)
    return run


class RandomTokens:
    """Stands in for a ``GPTDataset``: sample ``i`` is one of a few fixed random sequences."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, vocab_size, size=(RANDOM_SAMPLES, seq_length + 1), dtype=np.int64)
        self.loss_mask = np.ones(seq_length, dtype=np.float32)
        self.position_ids = np.arange(seq_length, dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        row = self.tokens[index % RANDOM_SAMPLES]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": self.loss_mask, "position_ids": self.position_ids}


def use_nccl_for_a_single_gpu() -> None:
    """Without torchrun, ``init_distributed`` falls back to a gloo world of one; on a GPU the
    benchmark wants NCCL like a real job, so it sets up a one-process env:// world instead."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        use_nccl_for_a_single_gpu()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    from osref.megatron_model import attention_backend
    from osref.model_spec import ModelSpec
    from osref.training import Trainer, build_model_and_optimizer, device_name, peak_tflops_per_device

    run = bench_run(args, on_gpu, world_size)
    train_cfg = run["train"]
    model, optimizer, scheduler, device = build_model_and_optimizer(run)
    data = RandomTokens(run["model"]["vocab_size"], train_cfg["seq_length"])
    trainer = Trainer(run, model, optimizer, scheduler, data, None, device)

    step_seconds, losses = [], []
    for iteration in range(1, args.warmup_steps + args.steps + 1):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(trainer.step(iteration)["loss"])  # loss.item(): the step has finished on the device
        if iteration > args.warmup_steps:
            step_seconds.append(time.perf_counter() - started)

    spec = ModelSpec.from_run(run)
    step_s = statistics.median(step_seconds)
    tokens_per_s = trainer.tokens_per_iteration / step_s
    tflops_per_device = spec.flops_per_token(with_attention=True) * tokens_per_s / dist.get_world_size() / 1e12
    peak = peak_tflops_per_device(train_cfg)
    results = {
        "device": device_name(),
        "devices": dist.get_world_size(),
        "dtype": "bf16" if train_cfg["precision"] == "bf16" else "fp32",
        "attention": train_cfg["attention"] or attention_backend(),
        "fusion": train_cfg["fusion"],
        "model": spec.name,
        "parameters": spec.parameter_count(),
        "seq_length": train_cfg["seq_length"],
        "micro_batch_size": train_cfg["micro_batch_size"],
        "global_batch_size": train_cfg["global_batch_size"],
        "recompute": train_cfg["recompute"],
        "steps": len(step_seconds),
        "step_s": step_s,
        "step_s_min": min(step_seconds),
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops_per_device,
        "peak_tflops": peak,
        "mfu": tflops_per_device / peak if peak else None,
        "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if dist.get_rank() == 0:
        print_results(results, as_json=args.json)
    dist.destroy_process_group()
    return 0


def print_results(results: dict, as_json: bool) -> None:
    formats = {
        "parameters": lambda v: f"{v / 1e9:.3f} B" if v >= 1e8 else f"{v / 1e6:.2f} M",
        "step_s": lambda v: f"{v:.4f} (median)",
        "step_s_min": lambda v: f"{v:.4f}",
        "tokens_per_s": lambda v: f"{v:.1f}",
        "tflops_per_device": lambda v: f"{v:.3f}",
        "mfu": lambda v: "n/a (no bf16 peak for this device)" if v is None else f"{100 * v:.1f} %",
        "mem_gb": lambda v: "n/a" if v is None else f"{v:.2f} (max allocated)",
        "peak_tflops": lambda v: "n/a" if v is None else f"{v:g}",
        "loss_first": lambda v: f"{v:.4f}",
        "loss_last": lambda v: f"{v:.4f}",
    }
    for name, value in results.items():
        print(f"{name}: {formats.get(name, str)(value)}")
    if as_json:
        print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
