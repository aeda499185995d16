"""Measure lm-eval throughput (requests/s) on CPU at batch sizes 1 and 16, in one process.

The demo and CI evaluate on CPU, where the batch size decides whether evaluation takes seconds or
minutes; `batch_size: auto` always picks the maximum on CPU, so the config names a number. This
script gives the number behind that choice: the demo's tiny model shape (random weights, 0.01 block,
HYV3, vocab 50304) on the demo's two local tasks (osref/eval_tasks.py), each shot set evaluated as
the pipeline does (demo_lastword 0-shot, demo_continuation 2-shot), once per batch size. Timing
covers lm-eval's simple_evaluate (request building, model calls, scoring), not model or task loading,
and separately the model calls alone. lm-eval's stderr bootstrap (100000 resamples by default, for
perplexity-type metrics) is off here unless --bootstrap-iters says otherwise: it does not depend on
the batch size and would swamp the comparison.
It also checks that the scores do not depend on the batch size.

Usage:

    python scripts/bench_eval.py                       # 40 items per task, 2 threads
    python scripts/bench_eval.py --n-items 100 --threads 4 --batch-sizes 1 8 16 32

Numbers on a shared machine are noisy (CPU seconds are printed beside wall seconds to show
contention); compare runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst"
TOKENIZER = REPO / "assets" / "gpt-neox-20b"
SHOT_GROUPS = {0: ["demo_lastword"], 2: ["demo_continuation"]}  # the demo protocol (config/demo.yaml)
TINY_SHAPE = {
    "num_layers": 4,
    "hidden_size": 64,
    "ffn_hidden_size": 192,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "seq_length": 512,
}  # config/demo.yaml scales.tiny


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-items", type=int, default=40, help="test items per task")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=0,
        help="lm-eval stderr bootstrap (its default, 100000, used by the pipeline, is slow on CPU)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    return parser.parse_args(argv)


def write_tiny_model(directory: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from osref.export import hf_config_for, write_hf_directory
    from osref.model_spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(name="bench-tiny", **TINY_SHAPE)
    model = AutoModelForCausalLM.from_config(hf_config_for(spec, {"eod_id": 0}))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_hf_directory(directory, state, spec, eod_id=0, tokenizer_dir=TOKENIZER, save_dtype=torch.float32)
    return directory


def run_group(
    model, tokenizer, batch_size: int, shots: int, task_names: list[str], include_path: Path, bootstrap_iters: int
) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from osref.evaluate import load_tasks, make_task_manager

    manager = make_task_manager(task_names, include_path)
    tasks = load_tasks(task_names, manager)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    model_seconds = model_cpu_seconds = 0.0

    def timed(method):
        def call(*a, **k):
            nonlocal model_seconds, model_cpu_seconds
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return method(*a, **k)
            finally:
                model_seconds += time.perf_counter() - started
                model_cpu_seconds += time.process_time() - cpu_started

        return call

    lm.loglikelihood, lm.loglikelihood_rolling = timed(lm.loglikelihood), timed(lm.loglikelihood_rolling)
    started = time.perf_counter()
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=shots,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=bootstrap_iters,
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    seconds = time.perf_counter() - started
    requests = sum(len(sample["arguments"]) for samples in raw["samples"].values() for sample in samples)
    scores = {
        f"{task}/{metric}": value
        for task, metrics in raw["results"].items()
        for metric, value in metrics.items()
        if isinstance(value, float) and "stderr" not in metric
    }
    return {
        "seconds": seconds,
        "model_seconds": model_seconds,
        "model_cpu_seconds": model_cpu_seconds,
        "requests": requests,
        "scores": scores,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from osref.eval_tasks import build_demo_tasks
    from osref.evaluate import offline_environment

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp, offline_environment(Path(tmp) / "hf_home"):
        tmp = Path(tmp)
        include_path = build_demo_tasks(CORPUS, tmp / "tasks", n_items=args.n_items)
        (tmp / "model").mkdir()
        model_dir = write_tiny_model(tmp / "model")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        parameters = sum(p.numel() for p in model.parameters())

        results = {}
        for batch_size in args.batch_sizes:
            groups = [
                run_group(model, tokenizer, batch_size, shots, names, include_path, args.bootstrap_iters)
                for shots, names in SHOT_GROUPS.items()
            ]
            seconds, requests = sum(g["seconds"] for g in groups), sum(g["requests"] for g in groups)
            model_seconds = sum(g["model_seconds"] for g in groups)
            model_cpu_seconds = sum(g["model_cpu_seconds"] for g in groups)
            results[batch_size] = {
                "seconds": seconds,
                "model_seconds": model_seconds,
                "model_cpu_seconds": model_cpu_seconds,
                "requests": requests,
                "requests_per_s": requests / seconds,
                "model_requests_per_s": requests / model_seconds,
                "scores": {k: v for g in groups for k, v in g["scores"].items()},
            }

    sizes = args.batch_sizes
    print(
        f"model: demo tiny shape, {parameters / 1e6:.2f} M parameters, fp32, {args.threads} threads, "
        f"bootstrap_iters {args.bootstrap_iters}; tasks: demo_lastword (0-shot) + demo_continuation (2-shot), {args.n_items} items each"
    )
    for batch_size in sizes:
        r = results[batch_size]
        print(
            f"batch {batch_size:>3}: {r['requests']} requests in {r['seconds']:.2f} s = {r['requests_per_s']:.1f} requests/s "
            f"end to end; model calls {r['model_seconds']:.2f} s = {r['model_requests_per_s']:.1f} requests/s "
            f"({r['model_cpu_seconds']:.2f} CPU s, all threads)"
        )
    if len(sizes) >= 2:
        first, last = results[sizes[0]], results[sizes[-1]]
        print(
            f"ratio batch {sizes[-1]} / batch {sizes[0]}: {last['requests_per_s'] / first['requests_per_s']:.2f}x end to end, "
            f"{last['model_requests_per_s'] / first['model_requests_per_s']:.2f}x model calls"
        )
        worst = max(
            abs(last["scores"][k] - first["scores"][k]) / max(1.0, abs(first["scores"][k]))
            for k in first["scores"]
            if not math.isnan(first["scores"][k])
        )
        print(f"largest relative score difference between batch sizes: {worst:.2e}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "threads": args.threads,
                    "n_items": args.n_items,
                    "parameters": parameters,
                    "results": {str(k): v for k, v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
