"""Tokenization throughput: the raw tokenizer limit against our end-to-end job, at 1 and N cores.

Usage:

    # the demo corpus read 4 times in a row (gigatoken: 40 times), N = all cores, 2 rounds
    python scripts/bench_tokenize.py

    # another input (parquet by suffix, else any jsonl variant), 8 cores, 3 rounds
    python scripts/bench_tokenize.py --input shard.jsonl.zst --repeat 1 --workers 8 --rounds 3

    # gigatoken for both the raw limit and the job (the job also runs its HF sample check of the
    # first --verify-documents documents, 1000 as in the pipeline: ~2 CPU-s of HF tokenizers per group)
    python scripts/bench_tokenize.py --backend gigatoken --rounds 3

    # ... and the N-worker job without its HF sample check too (its cost per token)
    python scripts/bench_tokenize.py --backend gigatoken --rounds 3 --compare-no-sample

    # the same on the small input, where the job's fixed costs (HF sample, gigatoken set-up) weigh most
    python scripts/bench_tokenize.py --backend gigatoken --repeat 4 --compare-no-sample

Four measurements on the same input, each in a fresh process (a tokenizer's thread pool is sized
once per process), alternated over the rounds so that load from other work hits all of them:

    raw 1 / raw N   encode_batch_fast (gigatoken: encode_batch) over the texts already in RAM,
                    in batches of --batch-size, with RAYON_NUM_THREADS = 1 / N
    job 1 / job N   tokenize_files: read -> parse -> tokenize -> write .bin/.idx, with 1 / N workers
                    (worker start-up, the backend's set-up and a non-HF backend's HF sample check
                    included; loading the HF tokenizer is not)
    job N spawn     (--compare-spawn) the same with spawned instead of forked workers, which
                    re-import and re-parse the tokenizer: what the fork start saves
    job N threads   (--compare-threads) one process: the tokenizer's own N threads encode one batch
                    at a time on a background thread while the main thread reads and writes
    job N no sample (--compare-no-sample, a non-HF backend) the N-worker job without its HF sample
                    check (--verify-documents 0): the job's cost per token, without the fixed cost
                    per group of the sample

Printed per measurement: best and median tokens/s (wall), tokens per CPU-second (all its processes), and for
the jobs the CPU seconds of the job's process and of its workers, the time spent on the HF sample and
the peak RSS of the main process and of the largest worker. The ratio job / raw at the same core count
is the share of the raw limit the job reaches (goals: HF >= 0.90, gigatoken >= 0.5). On a shared
machine the wall-clock figures move with the load (the load average is printed with each run); the
CPU-second figures much less. The default input is sized so that a raw run takes seconds: 4 copies
of the demo corpus (11.8 M tokens) for HF, 40 (118 M tokens) for gigatoken; a real shard group has
~5 B tokens, so the job's fixed costs weigh less there than in either.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_CORPUS = ROOT / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst"
TOKENIZER = ROOT / "assets" / "gpt-neox-20b"


def cpu_seconds(who=None) -> float:
    usages = [
        resource.getrusage(w) for w in ([who] if who is not None else [resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN])
    ]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def measure_raw(args) -> dict:
    from osref.tokenize import iter_documents, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    texts = [t for _ in range(args.repeat) for t in iter_documents(args.input, args.format) if t]
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    if args.backend == "gigatoken":
        import awkward
        import gigatoken

        fast = gigatoken.Tokenizer.from_json(tokenizer.to_str())

        def encode_and_count(batch: list[str]) -> int:
            return int(awkward.sum(awkward.num(fast.encode_batch(batch), axis=1)))
    else:

        def encode_and_count(batch: list[str]) -> int:
            return sum(len(encoding) for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False))

    tokens, cpu, started = 0, cpu_seconds(), time.perf_counter()
    for batch in batches:
        tokens += encode_and_count(batch) + len(batch)  # + EOD per document, as the job counts them
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}


def measure_job(args) -> dict:
    from osref.tokenize import load_tokenizer, tokenize_files

    if args.backend == "gigatoken":
        import gigatoken  # noqa: F401  (imported before the clock, as for the raw measurement)
    tokenizer = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        main_cpu, started = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
        stats = tokenize_files(
            [args.input] * args.repeat,
            Path(tmp) / "bench",
            tokenizer,
            fmt=args.format,
            batch_size=args.batch_size,
            workers=args.cores,
            backend=args.backend,
            progress=False,
            start_method=args.start_method,
            verify_documents=args.verify_documents,
            parallelism="threads" if args.start_method == "threads" else "processes",
        )
        seconds, main_cpu = time.perf_counter() - started, cpu_seconds(resource.RUSAGE_SELF) - main_cpu
    workers_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)  # the workers are the only children
    return {
        "tokens": stats["tokens"],
        "seconds": seconds,
        "cpu_seconds": main_cpu + workers_cpu,
        "main_cpu_seconds": main_cpu,
        "workers_cpu_seconds": workers_cpu,
        "verify_seconds": stats.get("verify_seconds", 0.0),
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if args.cores > 1 else 0.0,
    }


def run_child(args, kind: str, cores: int, variant: str | None = None) -> dict:
    env = dict(
        os.environ,
        RAYON_NUM_THREADS=str(cores if kind == "raw" or variant == "threads" else 1),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--cores",
        str(cores),
        "--input",
        str(args.input),
        "--format",
        args.format,
        "--repeat",
        str(args.repeat),
        "--batch-size",
        str(args.batch_size),
        "--backend",
        args.backend,
        "--tokenizer",
        str(args.tokenizer),
        "--verify-documents",
        str(0 if variant == "no sample" else args.verify_documents),
    ]
    if variant in ("spawn", "threads"):
        command += ["--start-method", variant]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"bench: {kind} {cores} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEMO_CORPUS)
    parser.add_argument("--format", default=None, help="parquet or jsonl[.gz|.zst|.zstd]; default: from the suffix")
    parser.add_argument(
        "--repeat", type=int, default=None, help="read the input this many times in a row (default: 4, gigatoken 40)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="N, the parallel core count")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--backend", choices=("hf", "gigatoken"), default="hf")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument(
        "--verify-documents",
        type=int,
        default=1000,
        help="gigatoken: the job's HF sample check, in documents (the pipeline's default: 1000)",
    )
    parser.add_argument("--compare-spawn", action="store_true", help="also run the N-worker job with spawned workers")
    parser.add_argument(
        "--compare-threads",
        action="store_true",
        help="also run the job in one process: a background encode thread, the tokenizer's own N threads",
    )
    parser.add_argument(
        "--compare-no-sample",
        action="store_true",
        help="also run the N-worker job without the HF sample check (a non-HF backend)",
    )
    parser.add_argument("--child", choices=("raw", "job"), help=argparse.SUPPRESS)
    parser.add_argument("--start-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.format = args.format or ("parquet" if args.input.suffix == ".parquet" else "jsonl")
    if args.repeat is None:
        args.repeat = 40 if args.backend == "gigatoken" else 4

    if args.child:
        print(json.dumps((measure_raw if args.child == "raw" else measure_job)(args)))
        return

    load = os.getloadavg()
    print(
        f"input {args.input} x{args.repeat}, backend {args.backend}, batch {args.batch_size}, "
        f"{args.rounds} rounds, {os.cpu_count()} cores, load average at start {load[0]:.2f} {load[1]:.2f}"
    )
    cases = [("raw", 1, None), ("job", 1, None), ("raw", args.workers, None), ("job", args.workers, None)]
    if args.compare_spawn:
        cases.append(("job", args.workers, "spawn"))
    if args.compare_threads:
        cases.append(("job", args.workers, "threads"))
    if args.compare_no_sample and args.backend != "hf":
        cases.append(("job", args.workers, "no sample"))
    results: dict[tuple, list[dict]] = {case: [] for case in cases}
    ratios: dict[tuple, list[float]] = {
        (cores, variant): [] for kind, cores, variant in cases if kind == "job" and variant in (None, "no sample")
    }
    for round_no in range(1, args.rounds + 1):
        this_round = {}
        for case in cases:
            result = run_child(args, *case)
            result["tok_s"] = result["tokens"] / result["seconds"]
            result["tok_cpu_s"] = result["tokens"] / result["cpu_seconds"]
            print(
                f"  round {round_no} {label_of(case, args.backend)}: {result['tok_s'] / 1e6:.3f} M tok/s "
                f"({result['seconds']:.1f} s, {result['tok_cpu_s'] / 1e6:.3f} M tok/CPU-s"
                + (
                    f"; CPU s main {result['main_cpu_seconds']:.1f}, workers {result['workers_cpu_seconds']:.1f}"
                    + (f", HF sample {result['verify_seconds']:.1f} s" if result["verify_seconds"] else "")
                    if case[0] == "job"
                    else ""
                )
                + f"; load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            this_round[case] = result
            results[case].append(result)
        for cores, variant in ratios:
            job, raw = this_round[("job", cores, variant)], this_round[("raw", cores, None)]
            ratios[cores, variant].append(job["tok_s"] / raw["tok_s"])
            print(
                f"  round {round_no} job{' (' + variant + ')' if variant else ''} / raw at {cores} core(s), back to "
                f"back: {ratios[cores, variant][-1]:.3f} (wall), {job['tok_cpu_s'] / raw['tok_cpu_s']:.3f} "
                "(per CPU-second)",
                flush=True,
            )
    print(f"load average at end {os.getloadavg()[0]:.2f}; over {args.rounds} rounds:")
    print(f"{'measurement':<28}{'best M tok/s':>13}{'median':>9}{'M tok/CPU-s':>13}{'peak RSS main/worker MB':>26}")
    for case in cases:
        runs = results[case]
        best = max(runs, key=lambda r: r["tok_s"])
        rss = (
            f"{max(r['rss_main_mb'] for r in runs):.0f} / {max(r['rss_worker_mb'] for r in runs):.0f}"
            if case[0] == "job"
            else ""
        )
        print(
            f"{label_of(case, args.backend):<28}{best['tok_s'] / 1e6:>13.3f}"
            f"{statistics.median(r['tok_s'] for r in runs) / 1e6:>9.3f}"
            f"{max(r['tok_cpu_s'] for r in runs) / 1e6:>13.3f}{rss:>26}"
        )
    for (cores, variant), values in ratios.items():
        best_job = max(r["tok_s"] for r in results[("job", cores, variant)])
        best_raw = max(r["tok_s"] for r in results[("raw", cores, None)])
        print(
            f"job{' (' + variant + ')' if variant else ''} / raw at {cores} core(s): best job / best raw "
            f"{best_job / best_raw:.3f}, median of the back-to-back ratios {statistics.median(values):.3f} (wall)"
        )


def label_of(case: tuple, backend: str) -> str:
    kind, cores, variant = case
    if kind == "raw":
        return f"raw {backend}, {cores} thread(s)"
    return f"job, {cores} worker(s)" + (f", {variant}" if variant else "")


if __name__ == "__main__":
    main()
