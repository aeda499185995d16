"""Evaluate one exported checkpoint on one shot set of the protocol (lm-eval, offline).

Writes one JSON (fixed name, atomic) with the protocol metric per task and, from lm-eval's logged
samples, per-item likelihood metrics (`likelihood`); see osref/evaluate.py.

Examples (from the repository root):

    # tiny CPU demo: local demo tasks, 20 items each, a tiny model exported by the demo run
    python scripts/build_eval_tasks.py --corpus assets/demo-corpus/pydocs311_rst_corpus.jsonl.zst \
        --out results/data/eval_tasks
    python scripts/evaluate.py --hf-dir results/runs/tiny-demo-0.25M-128/hf/iter_0000040 \
        --run-json tests/data/tiny_run.json --iteration 40 --shots 0shot \
        --tasks-json '[{"task": "demo_lastword", "shots": 0, "metric": "acc"},
                       {"task": "demo_continuation", "shots": 0, "metric": "acc_norm"}]' \
        --include-path results/data/eval_tasks --limit 20 --out /tmp/eval_0shot.json

    # open-sci-ref protocol, 10-shot set, on a GPU, datasets pre-fetched into HF_HOME
    python scripts/evaluate.py --hf-dir results/runs/RUN/hf/iter_0072661 --run-json results/runs/RUN/run.json \
        --iteration 72661 --shots 10shot --tasks-json protocol.json --device cuda --dtype bfloat16 \
        --batch-size 32 --hf-home /path/to/hf_home --out results/runs/RUN/eval/iter_0072661/10shot.json

--tasks-json is a file or an inline JSON list of {"task", "shots", "metric", "in_average"}; --shots
"<k>shot" selects the tasks with k shots from it (all of them must then share k); --shots
"extra-<task>-<k>shot" selects that one task (the extra tasks of released checkpoints, one file each).
tokens_seen = iteration * train.global_batch_size * train.seq_length of the run JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def read_tasks(tasks_json: str) -> list[dict]:
    text = Path(tasks_json).read_text(encoding="utf-8") if Path(tasks_json).is_file() else tasks_json
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--tasks-json: neither a file nor valid JSON: {error}") from None
    if not isinstance(tasks, list):
        raise SystemExit("--tasks-json: expected a JSON list of task objects")
    return tasks


def select_shot_set(tasks: list[dict], name: str) -> tuple[list[dict], int]:
    from osref.protocol import parse_shot_set, shot_sets

    try:
        shots, task = parse_shot_set(name)
    except ValueError as error:
        raise SystemExit(f"--shots: {error}") from None
    if task is not None:  # one extra task (released checkpoints): extra-<task>-<k>shot
        selected = [t for t in tasks if t["task"] == task and int(t["shots"]) == shots]
        if len(selected) != 1:
            raise SystemExit(f"--shots {name!r}: --tasks-json has no single task {task!r} with {shots} shots")
        return selected, shots
    sets = shot_sets(tasks)
    if name not in sets:
        raise SystemExit(f"--shots {name!r}: the tasks form the shot sets {sorted(sets)}")
    selected = sets[name]
    return selected, int(selected[0]["shots"])


def batch_size_arg(text: str) -> int | str:
    return text if text == "auto" or text.startswith("auto:") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json, weights, tokenizer)")
    parser.add_argument(
        "--run-json", required=True, help="resolved run JSON (run_id, train.global_batch_size, train.seq_length)"
    )
    parser.add_argument("--iteration", type=int, required=True, help="training iteration of the checkpoint")
    # --group: the name before "shot set" (jobs submitted by an older Snakefile still pass it)
    parser.add_argument(
        "--shots", "--group", dest="shots", required=True, help="shot set to evaluate, '<k>shot' (e.g. 0shot, 10shot)"
    )
    parser.add_argument("--tasks-json", required=True, help="protocol task list: a file or inline JSON")
    parser.add_argument("--out", required=True, help="output JSON (written atomically)")
    parser.add_argument("--include-path", default=None, help="folder of local task YAMLs (only these are used)")
    parser.add_argument("--batch-size", type=batch_size_arg, default=8, help="an integer, or 'auto' (GPU)")
    parser.add_argument("--limit", type=float, default=None, help="items per task (int) or fraction (<1); for tests")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--hf-home", default=None, help="private HF_HOME holding pre-fetched datasets")
    args = parser.parse_args(argv)

    # The HF libraries read these at import time, so set them before anything imports them.
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if args.hf_home:
        os.environ["HF_HOME"] = str(Path(args.hf_home).resolve())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    try:
        torch.device(args.device)  # a bad evaluation.device fails here, not after loading model and tasks
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"--device {args.device!r} (config evaluation.device): not a torch device: {error}") from None

    from osref.contracts import ContractError, load_run_document
    from osref.evaluate import evaluate_checkpoint

    try:  # ours or a released checkpoint's: both say their run id and tokens per iteration
        run = load_run_document(args.run_json)
    except ContractError as error:
        raise SystemExit(str(error)) from None
    tasks, num_fewshot = select_shot_set(read_tasks(args.tasks_json), args.shots)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    result = evaluate_checkpoint(
        Path(args.hf_dir),
        tasks,
        num_fewshot=num_fewshot,
        out_json=Path(args.out),
        run_id=run.run_id,
        iteration=args.iteration,
        tokens_seen=args.iteration * run.tokens_per_iteration,
        include_path=Path(args.include_path) if args.include_path else None,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        limit=limit,
        seed=args.seed,
        hf_home=Path(args.hf_home).resolve() if args.hf_home else None,
    )
    for task, score in result["tasks"].items():
        logging.info(
            "%s %s = %s (stderr %s, n=%s)", task, score["metric"], score["value"], score["stderr"], score["n_samples"]
        )
    for task, metrics in result["likelihood"].items():
        logging.info(
            "%s per-item likelihood: %s",
            task,
            ", ".join(f"{name} = {value['value']:.4g}" for name, value in metrics.items() if isinstance(value, dict)),
        )
    logging.info("wrote %s in %.1f s", args.out, result["duration_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
