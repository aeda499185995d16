"""Time a cold report build of the full grid, then the rebuild after one more checkpoint is evaluated.

The report is rebuilt every time an evaluation finishes, so the rebuild must cost seconds even for
the release grid. This script writes a synthetic grid shaped like the release: the 36 reference
runs of ``config/reference/runs.csv`` × 37 checkpoints × the 12 protocol tasks, as one evaluation
JSON per checkpoint and shot set (0/5/10-shot, 3 996 files) in the format of
:func:`osref.evaluate.evaluate_checkpoint` (a trimmed lm-eval ``raw`` dict included, so files have
a realistic size), plus a training-loss log per run, all next to the real reference data.
It then times

1. a cold build (empty report folder, no cache),
2. the rebuild after the last checkpoint of the first run gets its three JSONs,

and prints both, their ratio, and the size of index.html. It is a benchmark, not a test: numbers depend on the machine.

Usage (from the repository root):

    python scripts/bench_report.py                  # full grid in a temporary folder
    python scripts/bench_report.py --runs 4 --checkpoints 5 --keep /tmp/bench   # small, keep files
"""

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO / "config" / "reference"


def release_protocol() -> list[dict]:
    import yaml

    evaluation = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["evaluation"]
    return [
        {**spec, "in_average": spec.get("in_average", True)} for spec in evaluation["protocols"][evaluation["protocol"]]
    ]


def _eval_payload(
    run: dict, iteration: int, shots: int, tasks: list[dict], rng: random.Random, progress: float
) -> dict:
    scores, raw_results, raw_configs = {}, {}, {}
    for spec in tasks:
        value = round(min(0.95, 0.25 + 0.35 * progress + rng.uniform(-0.02, 0.02)), 6)
        stderr = round(rng.uniform(0.004, 0.02), 6)
        scores[spec["task"]] = {"metric": spec["metric"], "value": value, "stderr": stderr, "n_samples": 1000}
        raw_results[spec["task"]] = {
            f"{spec['metric']},none": value,
            f"{spec['metric']}_stderr,none": stderr,
            "alias": spec["task"],
        }
        raw_configs[spec["task"]] = {"task": spec["task"], "num_fewshot": shots, "doc_to_text": "x" * 1500}
    return {
        "run_id": run["run_id"],
        "iteration": iteration,
        "tokens_seen": iteration * run["global_batch_size"] * run["seq_length"],
        "num_fewshot": shots,
        "tasks": scores,
        "lm_eval_version": "0.4.9",
        "transformers_version": "4.57.0",
        "torch_version": "2.9.0",
        "model_dir": f"/runs/{run['run_id']}/hf/iter_{iteration:07d}",
        "duration_s": round(rng.uniform(100, 900), 3),
        "raw": {"results": raw_results, "configs": raw_configs, "n-samples": {}},
    }


def write_synthetic_grid(
    base: Path, n_runs: int = 36, n_checkpoints: int = 37, seed: int = 0
) -> tuple[dict, list[tuple[Path, dict]]]:
    """Write the grid's evaluation JSONs and loss logs under ``base`` except the first run's last checkpoint.

    Returns (manifest, pending): ``pending`` holds the (path, payload) of the held-back JSONs.
    """
    import pandas as pd

    from osref.protocol import shot_sets
    from osref.reference import ReferenceData

    protocol = release_protocol()
    groups = shot_sets(protocol)
    reference = ReferenceData(REFERENCE_DIR)
    ref_runs = reference.runs[reference.runs["reference"]].sort_values(["tokens", "size", "dataset"])
    ref_runs = ref_runs.head(n_runs)  # the 50B reference has no published curve: a run with ours only
    rng = random.Random(seed)
    runs, pending = [], []
    for number, ref in enumerate(ref_runs.itertuples(index=False)):
        run_id = f"{ref.size}_{ref.dataset}_{ref.tokens}_{ref.seq_length}"
        train_iters = int(ref.train_iters)
        checkpoints = sorted({max(1, train_iters * k // n_checkpoints) for k in range(1, n_checkpoints + 1)})
        run_dir = base / "runs" / run_id
        run = {
            "run_id": run_id, "dataset": ref.dataset, "scale": ref.size, "budget": ref.tokens,
            "tokens": int(ref.tokens_total), "seq_length": int(ref.seq_length),
            "global_batch_size": int(ref.global_batch_size), "params": reference.parameter_count(pd.Series(ref._asdict())),
            "train_iters": train_iters, "checkpoint_iters": checkpoints, "reference_run": ref.run_id,
            "eval_files": [], "train_metrics": str(run_dir / "logs" / "train_metrics.jsonl"),
            "valid_metrics": str(run_dir / "logs" / "valid_metrics.jsonl"),
        }  # fmt: skip
        for iteration in checkpoints:
            for group, tasks in groups.items():
                path = run_dir / "eval" / f"iter_{iteration:07d}" / f"{group}.json"
                run["eval_files"].append(str(path))
                payload = _eval_payload(run, iteration, tasks[0]["shots"], tasks, rng, iteration / train_iters)
                if number == 0 and iteration == checkpoints[-1]:
                    pending.append((path, payload))
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        tokens_per_iteration = run["global_batch_size"] * run["seq_length"]
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        step = max(1, train_iters // 500)
        logs.joinpath("train_metrics.jsonl").write_text("".join(
            json.dumps({"iteration": i, "consumed_tokens": i * tokens_per_iteration, "loss": 2.2 + 9 / math.sqrt(i)}) + "\n"
            for i in range(step, train_iters + 1, step)
        ))  # fmt: skip
        logs.joinpath("valid_metrics.jsonl").write_text("".join(
            json.dumps({"iteration": i, "consumed_tokens": i * tokens_per_iteration, "valid_loss": 2.4 + 9 / math.sqrt(i)}) + "\n"
            for i in checkpoints
        ))  # fmt: skip
        runs.append(run)
    return {"protocol": protocol, "runs": runs}, pending


def write_pending(pending: list[tuple[Path, dict]]) -> None:
    for path, payload in pending:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def timed_build(manifest: dict, out_dir: Path) -> tuple[float, dict]:
    """Wall seconds of one build, and its summary with ``cpu_s`` (this process's CPU seconds: on a
    shared machine the wall time also holds the waits for a core)."""
    from osref.report import build_report

    start, cpu = time.perf_counter(), time.process_time()
    summary = build_report(manifest, REFERENCE_DIR, out_dir)
    return time.perf_counter() - start, summary | {"cpu_s": time.process_time() - cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=36, help="runs (the first N reference runs; default 36)")
    parser.add_argument("--checkpoints", type=int, default=37, help="checkpoints per run (default 37)")
    parser.add_argument("--keep", type=Path, help="write the grid and the report here and keep them")
    args = parser.parse_args(argv)
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        base = args.keep or Path(tmp)
        start = time.perf_counter()
        manifest, pending = write_synthetic_grid(base, args.runs, args.checkpoints)
        n_files = sum(len(run["eval_files"]) for run in manifest["runs"])
        print(f"synthetic grid: {len(manifest['runs'])} runs, {n_files} eval JSONs ({len(pending)} held back), "
              f"written in {time.perf_counter() - start:.1f} s")  # fmt: skip
        out_dir = base / "report"
        cold_s, cold = timed_build(manifest, out_dir)
        print(
            f"cold build:        {cold_s:7.2f} s ({cold['cpu_s']:.2f} CPU-s)  {cold['n_results']} rows, cache {cold['cache']}"
        )
        write_pending(pending)
        incremental_s, incremental = timed_build(manifest, out_dir)
        print(
            f"incremental build: {incremental_s:7.2f} s ({incremental['cpu_s']:.2f} CPU-s)  {incremental['n_results']} rows, "
            f"cache {incremental['cache']}"
        )
        print(f"ratio cold / incremental: {cold_s / incremental_s:.1f}x")
        page = out_dir / "index.html"
        print(f"index.html: {page.stat().st_size / 1e6:.2f} MB ({len(incremental['plots'])} interactive figures, "
              f"plotly.js inlined once), comparison.csv: {len(pd.read_csv(out_dir / 'comparison.csv'))} rows")  # fmt: skip
        if args.keep:
            (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
            print(f"report: {out_dir / 'index.html'}, manifest: {base / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
