"""Download the datasets of every evaluation task into a shared HF cache, where network is available.

Evaluation jobs run offline on compute nodes (osref/evaluate.py sets HF_HUB_OFFLINE), so each task's
dataset must already sit in the Hugging Face cache they read. The safest way to fill that cache is to
let lm-eval itself load every task once, exactly as an evaluation would: the cache then holds what
lm-eval 0.4.13 asks for (repo, config name, revision, processed Arrow files), not what we think it
asks for. Run this on a login node; it refuses at once when the hub is switched off or unreachable,
naming the task it could not fetch, instead of letting datasets retry for minutes.

Usage:

    python scripts/prefetch_eval_data.py --tasks-json '[{"task": "copa", "shots": 0, "metric": "acc"}]' \\
        --hf-home results/hf_home --out results/hf_home/prefetched.json

--tasks-json takes the protocol list (as config `evaluation.protocols.<name>`, or a path to a JSON
file holding it). The demo's local tasks (demo_lastword, demo_continuation) need no download and are
listed as local. --include-path DIR resolves tasks from local YAMLs instead of lm-eval's built-ins.

Exit status: 0 all fetched (marker written); 2 no network / hub offline (nothing fetched); 1 a task failed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from osref.files import write_json_atomic
from osref.protocol import LOCAL_DEMO_TASKS

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"


class NoNetwork(RuntimeError):
    """The hub cannot be reached from here; prefetching would only retry and time out."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks-json", required=True, help="protocol task list as JSON, or a path to a JSON file")
    parser.add_argument("--hf-home", type=Path, required=True, help="HF_HOME to fill (shared by evaluation jobs)")
    parser.add_argument("--out", type=Path, default=None, help="marker JSON listing tasks and dataset ids")
    parser.add_argument("--include-path", type=Path, default=None, help="folder of local task YAMLs")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds for the hub reachability probe")
    parser.add_argument("--no-network-check", action="store_true", help="skip the probe (local include-path tasks)")
    return parser.parse_args(argv)


def read_tasks(tasks_json: str) -> list[dict]:
    text = Path(tasks_json).read_text() if not tasks_json.lstrip().startswith("[") else tasks_json
    tasks = json.loads(text)
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "task" in t for t in tasks):
        raise ValueError("--tasks-json must be a list of {'task': ..., 'shots': ..., 'metric': ...} entries")
    return tasks


def check_network(first_task: str, all_tasks: list[str], timeout: float) -> None:
    """Fail at once, naming the task, when the environment switches the hub off or it does not answer."""
    where = f"cannot prefetch task {first_task!r} (and {len(all_tasks) - 1} more: {all_tasks[1:]})"
    switched_off = [
        name for name in OFFLINE_SWITCHES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
    ]
    if switched_off:
        raise NoNetwork(
            f"{where}: the hub is switched off ({', '.join(f'{n}=1' for n in switched_off)}). "
            "Run this on a node with network access and without the offline variables."
        )
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise NoNetwork(
            f"{where}: {endpoint.hostname}:{port} is not reachable ({error}). "
            "Run this on a login node with network access."
        ) from error


def dataset_entry(task) -> dict:
    config = task.config
    splits = {}
    dataset = getattr(task, "dataset", None)
    if dataset is not None and hasattr(dataset, "items"):
        splits = {split: len(rows) for split, rows in dataset.items()}
    return {
        "task": task.task_name,
        "dataset_path": config.dataset_path,
        "dataset_name": config.dataset_name,
        "revision": (config.dataset_kwargs or {}).get("revision"),
        "splits": splits,
    }


def prefetch(task_names: list[str], include_path: Path | None) -> dict[str, list[dict]]:
    """Load every task through lm-eval's TaskManager (which downloads its data); return dataset ids per task."""
    from osref.evaluate import make_task_manager

    manager = make_task_manager(task_names, include_path)
    fetched: dict[str, list[dict]] = {}
    for name in task_names:
        started = time.monotonic()
        try:
            loaded = manager.load([name])
        except Exception as error:  # datasets/lm-eval raise many types; name the task and keep the cause
            raise RuntimeError(f"task {name!r}: prefetch failed: {type(error).__name__}: {error}") from error
        if not loaded["tasks"]:
            raise RuntimeError(f"task {name!r}: the task manager resolved it to no tasks")
        fetched[name] = [dataset_entry(task) for task in loaded["tasks"].values()]
        print(f"{name}: {len(fetched[name])} task(s), {time.monotonic() - started:.1f} s", flush=True)
    return fetched


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = read_tasks(args.tasks_json)
    local = [t["task"] for t in tasks if t["task"] in LOCAL_DEMO_TASKS]
    remote = [t["task"] for t in tasks if t["task"] not in local]
    if remote and not args.no_network_check:
        try:
            check_network(remote[0], remote, args.connect_timeout)
        except NoNetwork as error:
            print(f"prefetch_eval_data: {error}", file=sys.stderr)
            return 2
    # Before any HF library is imported: they read HF_HOME once, at import.
    hf_home = args.hf_home.resolve()
    hf_home.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HOME"] = str(hf_home)
    try:
        fetched = prefetch(remote, args.include_path) if remote else {}
    except RuntimeError as error:
        print(f"prefetch_eval_data: {error}", file=sys.stderr)
        return 1

    from importlib import metadata

    marker = {
        "hf_home": str(hf_home),
        "tasks": {name: {"local": True, "datasets": []} for name in local}
        | {name: {"local": False, "datasets": entries} for name, entries in fetched.items()},
        "dataset_ids": sorted(
            {
                f"{d['dataset_path']}" + (f":{d['dataset_name']}" if d["dataset_name"] else "")
                for entries in fetched.values()
                for d in entries
            }
        ),
        "libraries": {package: metadata.version(package) for package in ("lm_eval", "datasets", "huggingface_hub")},
    }
    if args.out is not None:
        write_json_atomic(args.out, marker, indent=2, sort_keys=True)
    print(json.dumps({"tasks": list(marker["tasks"]), "dataset_ids": marker["dataset_ids"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
