"""Measure training throughput on this machine, every kernel variant side by side in one process.

The plan's GPU-hours rest on an assumed throughput (``tokens_per_gpu_second`` or
``cluster.peak_tflops_per_gpu × assumed_mfu`` in the config). This script measures it with the
training stack itself — the model, megatron DDP, optimizer and update step of ``osref.training`` —
on random tokens (or the demo corpus, ``--data demo``), so it needs no prepared data. On a GPU it
trains in bf16 with the Transformer Engine layer spec when TE is installed (else megatron's local
spec with PyTorch SDPA attention); on the CPU in fp32 (only ``--tiny`` is practical there).

Variants (``--variants``, comma-separated; see osref/kernels.py): ``plain`` (no fused kernels),
``megatron`` (megatron's compiled bias-SwiGLU / bias-dropout-add + native fused cross-entropy),
``fused_adamw``, ``compile_layers`` (torch.compile per transformer layer), ``sdpa`` (cuDNN > Flash
SDPA priority), ``all``, or keys joined with ``+`` (``megatron+fused_adamw``). Each is built,
warmed up (compilation happens there) and timed in turn; one that runs out of memory is reported
as such and, with ``--fit``, retried at half the micro-batch.

Per variant: tokens/s, TFLOP/s and MFU with both FLOP counts — 6·N + 12·L·s·h per token
(attention over the full s×s square, the 0.01 logs' convention) and 6·N + 6·L·s·h (the causal
half, megatron-core 0.16's count) — peak memory, the optimizer state (Adam moments + fp32 main
weights, what the distributed optimizer shards) and the memory a GPU would need with that state
sharded over ``--cluster-dp`` ranks, the first/last loss and, against the first variant, the
largest relative loss difference per step (same weights, same batches). MFU is against the
device's dense bf16 peak (``osref.training.BF16_PEAK_TFLOPS`` or ``--peak-tflops``); n/a on the
CPU. ``--profile`` records which attention kernels ran in one profiled step.

Usage (from the repository root):

    python scripts/bench_train.py --tiny --steps 3 --variants plain,fused_adamw          # CPU smoke test
    python scripts/bench_train.py --scale 1.7b --variants plain,megatron,all --fit --profile
    python scripts/bench_train.py --scale 0.13b --variants plain,all --data demo --no-dropout --steps 20
    torchrun --nproc-per-node=4 scripts/bench_train.py --scale 1.7b --variants all      # data parallel

Prints a table (one row per variant) and, with ``--json``, one JSON line per variant; with
``--out FILE`` each variant's JSON line is appended to FILE as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_RUN = REPO / "tests/data/tiny_run.json"
DEMO_CORPUS = REPO / "assets/demo-corpus/pydocs311_rst_corpus.jsonl.zst"
RANDOM_SAMPLES = 64  # distinct random sequences, cycled
ALL_KEYS = ("megatron_fusions", "fused_cross_entropy", "fused_adamw", "compile_layers")
PRESETS = {
    "plain": (),
    "megatron": ("megatron_fusions", "fused_cross_entropy"),
    "compile": ("compile_layers",),
    "sdpa": ("sdpa",),
    "all": (*ALL_KEYS, "sdpa"),
}
ATTENTION_KERNEL = re.compile(r"flash|cudnn|fmha|attention|sdpa|efficient", re.IGNORECASE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--scale", help="a scale of the config's `scales` block, e.g. 1.7b")
    which.add_argument("--tiny", action="store_true", help="the 2-layer test model of tests/data/tiny_run.json")
    parser.add_argument("--config", type=Path, default=REPO / "config/config.yaml", help="config with the scale")
    parser.add_argument(
        "--variants", default="plain,all", help="comma-separated variants (see above); default plain,all"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="untimed steps first (compilation, allocation, autotuning)"
    )
    parser.add_argument("--micro-batch-size", type=int, help="default: the scale's resources.micro_batch_size")
    parser.add_argument("--micro-batches", type=int, default=1, help="gradient-accumulation micro-batches per step")
    parser.add_argument("--seq-length", type=int, help="default: the scale's sequence length")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], help="default: the recipe's (GPU)")
    parser.add_argument(
        "--attention",
        choices=["transformer_engine", "sdpa", "local"],
        help="core attention (default: TE when installed, else SDPA on a GPU, else megatron's local)",
    )
    parser.add_argument("--data", choices=["random", "demo"], default="random", help="random tokens or the demo corpus")
    parser.add_argument(
        "--no-dropout", action="store_true", help="dropout 0 (for loss comparisons across variants on a GPU)"
    )
    parser.add_argument(
        "--fit", action="store_true", help="after an out-of-memory failure retry at half the micro-batch"
    )
    parser.add_argument("--profile", action="store_true", help="profile one extra step: which attention kernels ran")
    parser.add_argument(
        "--cluster-dp", type=int, help="data-parallel ranks of the scale's cluster layout (default: from the config)"
    )
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: by GPU name)")
    parser.add_argument("--out", type=Path, help="append each variant's JSON line here as soon as it is measured")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per variant")
    return parser.parse_args(argv)


def variant_request(name: str) -> dict:
    """``train.kernels`` for a variant name: a preset or keys joined with ``+``."""
    parts = PRESETS.get(name, tuple(name.split("+")))
    unknown = [p for p in parts if p not in ALL_KEYS and p != "sdpa"]
    if unknown:
        raise SystemExit(
            f"--variants: unknown {unknown} in {name!r} (presets {sorted(PRESETS)}; keys {ALL_KEYS}, sdpa)"
        )
    request = {key: key in parts for key in ALL_KEYS}
    request["sdpa_backends"] = ["cudnn", "flash", "efficient", "math"] if "sdpa" in parts else None
    return request


def bench_run(
    args, on_gpu: bool, world_size: int, kernels: dict | None = None, micro_batch_size: int | None = None
) -> tuple[dict, int]:
    """A run document (model + train blocks) for the benchmark: the scale's architecture and
    training settings, with the batch, schedule, precision and kernels set for a short benchmark;
    and the data-parallel size of the scale on the cluster (the optimizer state's sharding)."""
    if args.tiny:
        run = json.loads(TINY_RUN.read_text())
        cluster_dp = 1
    else:
        from osref.grid import load_grid, run_document

        grid = load_grid(args.config)
        runs = [r for r in grid.runs.values() if r.scale == args.scale]
        if not runs:
            scales = sorted({r.scale for r in grid.runs.values()})
            raise SystemExit(f"--scale {args.scale}: no run of that scale in {args.config} (have {scales})")
        run = run_document(grid, runs[0]).to_json()  # a dict: the benchmark edits it below
        resources = runs[0].resources
        cluster_dp = resources["nodes"] * resources["gpus_per_node"] // resources["tensor_parallel"]
    train = run["train"]
    data_parallel = world_size // train.get("tensor_parallel", 1)
    micro_batch_size = micro_batch_size or args.micro_batch_size or train["micro_batch_size"]
    seq_length = args.seq_length or train["seq_length"]
    total_steps = args.warmup_steps + args.steps + (1 if args.profile else 0)
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
        kernels=kernels,
    )
    run["model"]["seq_length"] = max(run["model"]["seq_length"], seq_length)
    if args.no_dropout:
        run["model"].update(hidden_dropout=0.0, attention_dropout=0.0)
    return run, args.cluster_dp or cluster_dp


class RandomTokens:
    """Stands in for a ``GPTDataset``: sample ``i`` is one of a few fixed random sequences."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, vocab_size, size=(RANDOM_SAMPLES, seq_length + 1), dtype=np.int64)
        self.loss_mask = np.ones(seq_length, dtype=np.float32)
        self.position_ids = np.arange(seq_length, dtype=np.int64)

    def __getitem__(self, index: int) -> dict:
        row = self.tokens[index % len(self.tokens)]
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": self.loss_mask, "position_ids": self.position_ids}


class DemoTokens(RandomTokens):
    """Consecutive windows of the demo corpus (GPT-NeoX-20B, EOD after each document): real text,
    so the loss falls and a numerics difference between variants shows in it."""

    def __init__(self, seq_length: int, samples: int):
        import io

        import numpy as np
        import zstandard
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(REPO / "assets/gpt-neox-20b/tokenizer.json"))
        needed, ids = samples * (seq_length + 1), []
        with DEMO_CORPUS.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            for line in io.TextIOWrapper(reader, encoding="utf-8"):
                ids += tokenizer.encode(json.loads(line)["text"]).ids + [0]
                if len(ids) >= needed:
                    break
        rows = len(ids) // (seq_length + 1)
        self.tokens = np.array(ids[: rows * (seq_length + 1)], dtype=np.int64).reshape(rows, seq_length + 1)
        self.loss_mask = np.ones(seq_length, dtype=np.float32)
        self.position_ids = np.arange(seq_length, dtype=np.int64)


def use_nccl_for_a_single_gpu() -> None:
    """Without torchrun, ``init_distributed`` falls back to a gloo world of one; on a GPU the
    benchmark wants NCCL like a real job, so it sets up a one-process env:// world instead."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(args, name: str, run: dict, baseline_losses: list[float] | None, cluster_dp: int = 1) -> dict:
    """Build the training stack of ``run``, warm up, time ``args.steps`` steps; the result row."""
    import torch
    import torch.distributed as dist

    from osref.contracts import RunDocument
    from osref.kernels import optimizer_state_bytes
    from osref.megatron_model import attention_backend
    from osref.training import Trainer, build_model_and_optimizer, device_name, peak_tflops_per_device

    on_gpu = torch.cuda.is_available()
    run = RunDocument.coerce(run)
    train_cfg = run.train
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model, optimizer, scheduler, device = build_model_and_optimizer(run)
    total = args.warmup_steps + args.steps
    if args.data == "demo":
        data = DemoTokens(train_cfg.seq_length, total * train_cfg.global_batch_size + 1)
    else:
        data = RandomTokens(run.model.vocab_size, train_cfg.seq_length)
    trainer = Trainer(run, model, optimizer, scheduler, data, None, device)
    build_s = time.perf_counter() - started

    step_seconds, losses = [], []
    warmup_started = time.perf_counter()
    for iteration in range(1, total + 1):
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(trainer.step(iteration)["loss"])  # loss.item(): the step has finished on the device
        if iteration == args.warmup_steps:
            warmup_s = time.perf_counter() - warmup_started
        if iteration > args.warmup_steps:
            step_seconds.append(time.perf_counter() - started)
    attention_kernels = profile_attention(trainer, total + 1) if args.profile else None

    spec = run.model
    step_s = statistics.median(step_seconds)
    tokens_per_s = trainer.tokens_per_iteration / step_s
    world = dist.get_world_size()
    tflops = spec.flops_per_token(with_attention=True) * tokens_per_s / world / 1e12
    tflops_causal = spec.flops_per_token(with_attention=True, causal=True) * tokens_per_s / world / 1e12
    peak = peak_tflops_per_device(train_cfg.peak_tflops)
    state_gb = optimizer_state_bytes(optimizer) / 2**30
    mem_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    dp = dist.get_world_size() // train_cfg.tensor_parallel
    reference = losses if baseline_losses is None else baseline_losses  # the first variant is its own reference
    differences = [abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=False)]
    return {
        "variant": name,
        "kernels": trainer.variants.record(),
        "kernel_notes": list(trainer.variants.notes),
        "device": device_name(),
        "devices": world,
        "dtype": "bf16" if train_cfg.precision == "bf16" else "fp32",
        "attention": train_cfg.attention or attention_backend(),
        "model": spec.name,
        "parameters": spec.parameter_count(),
        "seq_length": train_cfg.seq_length,
        "micro_batch_size": train_cfg.micro_batch_size,
        "global_batch_size": train_cfg.global_batch_size,
        "recompute": train_cfg.recompute,
        "data": args.data,
        "dropout": not args.no_dropout,
        "steps": len(step_seconds),
        "build_s": build_s,
        "warmup_s": warmup_s if args.warmup_steps else 0.0,
        "step_s": step_s,
        "step_s_min": min(step_seconds),
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "tflops_per_device_causal": tflops_causal,
        "peak_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "mfu_causal": tflops_causal / peak if peak else None,
        "mem_gb": mem_gb,
        "optimizer_state_gb": state_gb,
        "cluster_dp": cluster_dp,
        # the distributed optimizer shards the state over the data-parallel ranks (here: `dp`)
        "mem_gb_sharded_estimate": mem_gb - state_gb * (1 - dp / cluster_dp) if mem_gb is not None else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,
        "loss_max_rel_diff_vs_first_variant": max(differences) if differences else None,
        "attention_kernels": attention_kernels,
    }


def profile_attention(trainer, iteration: int) -> list[str]:
    """Names of the attention kernels/operators run in one profiled training step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.step(iteration)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = {event.key for event in prof.key_averages() if ATTENTION_KERNEL.search(event.key)}
    return sorted(names)


def release_memory() -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_variant(args, name: str, on_gpu: bool, world_size: int, baseline: list[float] | None) -> dict:
    """``measure`` one variant; on out-of-memory, an error row, or with ``--fit`` a retry at half
    the micro-batch (down to 1)."""
    request = variant_request(name)
    mbs = None
    while True:
        run, cluster_dp = bench_run(args, on_gpu, world_size, request, mbs)
        mbs = run["train"]["micro_batch_size"]
        try:
            return measure(args, name, run, baseline, cluster_dp)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_memory()
            print(f"{name}: out of memory at micro-batch {mbs}", file=sys.stderr, flush=True)
            if not args.fit or mbs == 1:
                return {"variant": name, "micro_batch_size": mbs, "error": "out of memory", "kernels": request}
            mbs //= 2
        finally:
            release_memory()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        use_nccl_for_a_single_gpu()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    for name in names:
        variant_request(name)  # fail on a bad name before any model is built

    rows, baseline = [], None
    for name in names:
        row = bench_variant(args, name, on_gpu, world_size, baseline)
        if baseline is None and "losses" in row:
            baseline = row["losses"]
        rows.append(row)
        if dist.get_rank() == 0:
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            if args.json:
                print(json.dumps(row), flush=True)
    if dist.get_rank() == 0:
        print(format_table(rows))
    dist.destroy_process_group()
    return 0


def format_table(rows: list[dict]) -> str:
    """The variants side by side (one row each)."""

    def num(value, fmt):
        width = int(fmt.split(".")[0])
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return f"{'n/a':>{width}}" if missing else format(value, fmt)

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    header = (
        f"{'variant':14} {'model':6} {'mbs':>3} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'causal':>7} "
        f"{'MFU':>6} {'causal':>6} {'mem GB':>7} {'opt GB':>7} {'shard GB':>8} {'loss':>15} {'Δloss':>8}"
    )
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:14} {'':6} {r['micro_batch_size']:>3} {r['error']}")
            continue
        lines.append(
            f"{r['variant']:14} {r['model'][:6]:6} {r['micro_batch_size']:>3} {r['step_s']:8.4f} "
            f"{r['tokens_per_s']:10.1f} {num(r['tflops_per_device'], '8.3f')} {num(r['tflops_per_device_causal'], '7.3f')} "
            f"{pct(r['mfu']):>6} {pct(r['mfu_causal']):>6} {num(r['mem_gb'], '7.2f')} {r['optimizer_state_gb']:7.3f} "
            f"{num(r['mem_gb_sharded_estimate'], '8.2f')} {r['loss_first']:7.3f}->{r['loss_last']:<7.3f} "
            f"{num(r['loss_max_rel_diff_vs_first_variant'], '8.1e')}"
        )
    first = next((r for r in rows if "error" not in r), None)
    if first:
        lines.append(
            f"device {first['device']} x{first['devices']}, {first['dtype']}, attention {first['attention']}, "
            f"seq {first['seq_length']}, recompute {first['recompute']}, data {first['data']}; "
            "TFLOP/s and MFU: 6N + 12·L·s·h per token (full square) | 6N + 6·L·s·h (causal); "
            f"shard GB: memory with the optimizer state sharded over {first['cluster_dp']} data-parallel ranks"
        )
        for r in rows:
            for note in r.get("kernel_notes") or []:
                lines.append(f"{r['variant']}: {note}")
            if r.get("attention_kernels"):
                lines.append(f"{r['variant']}: attention kernels {', '.join(r['attention_kernels'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
