"""Evaluate one exported Hugging Face checkpoint with lm-eval, offline and reproducibly.

The open-sci-ref protocol runs lm-evaluation-harness once per few-shot set on every saved
checkpoint. lm-eval's own outputs are awkward for a workflow: files carry a timestamp in their
name, stderr may be the string ``"N/A"``, and a hub task without a local cache retries the network
instead of failing. This module wraps ``lm_eval.simple_evaluate`` so that one call

* evaluates the tasks of one shot set (the protocol is passed in as data),
* never touches the network (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``, optional private
  ``HF_HOME``) and fails before loading the model when a task's data is not available locally,
* writes one JSON with a fixed name, atomically, holding the protocol metric per task plus the
  raw lm-eval results, and nothing that changes between two identical runs except ``duration_s``,
* records, next to the protocol metric and without changing it, continuous per-item likelihood
  metrics computed from lm-eval's logged samples (``likelihood``; see :func:`likelihood_metrics`):
  DataDecide (Magnusson et al. 2025, arXiv 2504.11393) found such metrics to predict large-scale
  rankings from small models better than accuracy.

Protocol task dicts look like ``{"task": "copa", "shots": 0, "metric": "acc", "in_average": True}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from osref.files import write_json_atomic

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Fields of lm-eval's result dict that change on every run; the run time is kept as duration_s.
VOLATILE_RAW_KEYS = ("date", "start_time", "end_time", "total_evaluation_time_seconds")
# Accuracies (higher is better) and, for the demo's language-modelling tasks, perplexity-style
# metrics (lower is better; keep them out of the average).
PROTOCOL_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "bits_per_byte")


BOOTSTRAP_ITERS = 1000
# Output types whose per-item log-likelihoods the likelihood metrics are defined for.
LIKELIHOOD_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


class EvaluationError(RuntimeError):
    """A task cannot be evaluated as asked (unknown task, data not available offline, bad metric)."""


def validate_protocol_tasks(tasks: list[dict], num_fewshot: int | None = None) -> None:
    """Check the task dicts' keys and that they all share ``num_fewshot`` (one call per shot set)."""
    if not tasks:
        raise ValueError("no tasks given")
    for spec in tasks:
        missing = {"task", "shots", "metric"} - set(spec)
        if missing:
            raise ValueError(f"task entry {spec!r} lacks key(s) {sorted(missing)}")
        if spec["metric"] not in PROTOCOL_METRICS:
            raise ValueError(f"task {spec['task']!r}: metric {spec['metric']!r} is not one of {PROTOCOL_METRICS}")
        if num_fewshot is not None and int(spec["shots"]) != int(num_fewshot):
            raise ValueError(
                f"task {spec['task']!r} has shots={spec['shots']} but this call evaluates num_fewshot={num_fewshot}: "
                "split the protocol into one call per shot set"
            )
    names = [spec["task"] for spec in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")


def average_of(scores: dict[str, float | None], tasks_in_average: Iterable[str]) -> float | None:
    """Unweighted mean of ``scores`` over ``tasks_in_average``; None if any of them is missing.

    A mean over fewer tasks is not comparable with the published average, so it is never returned.
    """
    names = list(tasks_in_average)
    if not names:
        return None
    values = [scores.get(name) for name in names]
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if len(present) < len(values):
        return None
    return float(sum(present) / len(present))


def _set_hub_constants(offline: bool, hf_home: Path | None) -> None:
    """Push the offline switch and cache home into already-imported HF libraries.

    They read the environment once at import; a process that imported them earlier (a test
    session, a notebook) would otherwise ignore the variables set here.
    """
    # Any: the attributes set are the modules' own constants, which a plain ModuleType does not declare
    datasets_config: Any = sys.modules.get("datasets.config")
    hub_constants: Any = sys.modules.get("huggingface_hub.constants")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = offline
        datasets_config.HF_DATASETS_OFFLINE = offline
        if hf_home is not None:
            datasets_config.HF_DATASETS_CACHE = Path(hf_home) / "datasets"
            datasets_config.HF_MODULES_CACHE = Path(hf_home) / "modules"
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = offline
        if hf_home is not None:
            hub_constants.HF_HOME = str(hf_home)
            hub_constants.HF_HUB_CACHE = str(Path(hf_home) / "hub")


@contextlib.contextmanager
def offline_environment(hf_home: Path | None = None) -> Iterator[None]:
    """Run the body with the hub offline (and ``HF_HOME`` set, if given); restore everything after."""
    names = list(OFFLINE_ENV) + (["HF_HOME"] if hf_home is not None else [])
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(OFFLINE_ENV)
    if hf_home is not None:
        Path(hf_home).mkdir(parents=True, exist_ok=True)
        os.environ["HF_HOME"] = str(hf_home)
    datasets_config = sys.modules.get("datasets.config")
    hub_constants = sys.modules.get("huggingface_hub.constants")
    saved_constants = {
        (module, attr): getattr(module, attr)
        for module, attrs in (
            (datasets_config, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE")),
            (hub_constants, ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")),
        )
        if module is not None
        for attr in attrs
        if hasattr(module, attr)
    }
    _set_hub_constants(True, hf_home)
    try:
        yield
    finally:
        for (module, attr), value in saved_constants.items():
            setattr(module, attr, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def builtin_task_dirs(names: Iterable[str]) -> list[Path] | None:
    """Folders of lm-eval's built-in tasks that define ``names`` (``task:``/``group:`` lines).

    Indexing all ~15k built-in tasks takes seconds to tens of seconds on a busy CPU; scanning the
    YAML text for the few names needed and including only their folders takes a fraction of that.
    Returns None when a name is not found this way (the caller then indexes everything).
    """
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    wanted = set(names)
    pattern = re.compile(r"^(?:task|group):\s*['\"]?([A-Za-z0-9_.\-]+)['\"]?\s*$", re.MULTILINE)
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for match in pattern.finditer(text):
            if match.group(1) in wanted and match.group(1) not in found:
                found[match.group(1)] = path.parent
    if set(found) != wanted:
        return None
    return sorted(set(found.values()))


def make_task_manager(task_names: list[str], include_path: Path | None):
    """A TaskManager that knows ``task_names``: the include path alone, or just the built-in folders needed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        include_path = Path(include_path)
        if not include_path.is_dir():
            raise FileNotFoundError(f"task include path is not a directory: {include_path}")
        return TaskManager(include_path=str(include_path.resolve()), include_defaults=False)
    dirs = builtin_task_dirs(task_names)
    if dirs is None:
        return TaskManager()
    return TaskManager(include_path=[str(d) for d in dirs], include_defaults=False)


def _is_offline_failure(error: BaseException) -> bool:
    chain: BaseException | None = error
    while chain is not None:
        text = f"{type(chain).__name__}: {chain}"
        if isinstance(chain, ConnectionError) or "Offline" in text or "offline" in text or "not cached" in text:
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def load_tasks(task_names: list[str], task_manager) -> list[Any]:
    """Build every task (its dataset included) before the model is loaded, so bad tasks fail fast."""
    loaded_objects = []
    for name in task_names:
        try:
            loaded = task_manager.load([name])
        except Exception as error:  # lm-eval and datasets raise many types; we re-raise with context
            if _is_offline_failure(error):
                raise EvaluationError(
                    f"task {name!r}: its dataset is not available locally and the hub is offline "
                    f"(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1, HF_HOME={os.environ.get('HF_HOME', '<default>')}). "
                    "Pre-fetch it into HF_HOME where network is available, or use local task YAMLs via --include-path. "
                    f"Cause: {type(error).__name__}: {error}"
                ) from error
            raise EvaluationError(f"task {name!r} could not be loaded: {type(error).__name__}: {error}") from error
        task_object = loaded["groups"].get(name) or loaded["tasks"].get(name)
        if task_object is None:
            raise EvaluationError(f"task {name!r}: not found by the task manager (got {sorted(loaded['tasks'])})")
        loaded_objects.append(task_object)
    return loaded_objects


def _number_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, str):  # lm-eval writes "N/A" when it has no stderr
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _leaf_sample_count(raw: dict, name: str) -> int | None:
    counts = raw.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    children = raw.get("group_subtasks", {}).get(name)
    if not children:
        return None
    child_counts = [_leaf_sample_count(raw, child) for child in children]
    known = [c for c in child_counts if c is not None]
    return None if len(known) < len(child_counts) else sum(known)


def protocol_scores(raw: dict, tasks: list[dict]) -> dict[str, dict]:
    """Pick the protocol metric (and its stderr) of each task out of lm-eval's result dict."""
    scores = {}
    for spec in tasks:
        name, metric = spec["task"], spec["metric"]
        task_results = raw.get("results", {}).get(name) or raw.get("groups", {}).get(name)
        if task_results is None:
            raise EvaluationError(f"lm-eval returned no results for task {name!r}")
        key = f"{metric},none"
        if key not in task_results:
            raise EvaluationError(f"task {name!r}: metric key {key!r} not in lm-eval results ({sorted(task_results)})")
        scores[name] = {
            "metric": metric,
            "value": _number_or_none(task_results[key]),
            "stderr": _number_or_none(task_results.get(f"{metric}_stderr,none")),
            "n_samples": _leaf_sample_count(raw, name),
        }
    return scores


def _leaf_tasks(raw: dict, name: str) -> list[str]:
    children = raw.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(raw, child)]


def _item_likelihoods(sample: dict, output_type: str, where: str) -> tuple[float, float, float | None] | None:
    """(log p(correct), log p(correct) per character, p(correct) renormalised over the choices) of
    one logged sample; None for an item with several correct answers."""
    try:
        lls = [float(response[0]) for response in sample["filtered_resps"]]
        continuations = [str(argument[1]) for argument in sample["arguments"]]
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise EvaluationError(f"{where}: unexpected lm-eval sample layout ({type(error).__name__}: {error})") from error
    if output_type == "loglikelihood":
        return lls[0], lls[0] / max(len(continuations[0]), 1), None
    target = sample.get("target")
    if not isinstance(target, int) or not 0 <= target < len(lls):
        return None
    correct = lls[target]
    top = max(lls)
    normaliser = top + math.log(sum(math.exp(ll - top) for ll in lls))
    return correct, correct / max(len(continuations[target]), 1), math.exp(correct - normaliser)


def _mean_and_stderr(values: list[float]) -> dict[str, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"value": mean, "stderr": None}
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)  # as lm-eval's mean_stderr
    return {"value": mean, "stderr": math.sqrt(variance / n)}


def likelihood_metrics(raw: dict, tasks: list[dict]) -> dict[str, dict]:
    """Per task, the mean over its scored items (a group: over all its subtasks' items) of

    * ``logprob_correct``: log-likelihood of the correct continuation (nats, summed over its tokens),
    * ``logprob_correct_per_char``: the same divided by the continuation's length in characters,
    * ``prob_correct_norm`` (multiple choice only): the correct choice's probability renormalised
      over the choices, exp(ll_correct) / Σ_j exp(ll_j),

    each with its standard error (sample sd / sqrt(n), as lm-eval's). Computed from the same
    log-likelihoods lm-eval scored acc/acc_norm with; tasks of other output types (generation,
    rolling perplexity) and items with several correct answers are left out.
    """
    metrics: dict[str, dict] = {}
    samples = raw.get("samples") or {}
    for spec in tasks:
        name = spec["task"]
        items: list[tuple[float, float, float | None]] = []
        for leaf in _leaf_tasks(raw, name):
            output_type = raw.get("configs", {}).get(leaf, {}).get("output_type")
            if output_type not in LIKELIHOOD_OUTPUT_TYPES or leaf not in samples:
                items = []
                break
            for sample in samples[leaf]:
                item = _item_likelihoods(sample, output_type, f"task {leaf!r} doc {sample.get('doc_id')}")
                if item is not None:
                    items.append(item)
        if not items:
            continue
        entry = {
            "logprob_correct": _mean_and_stderr([item[0] for item in items]),
            "logprob_correct_per_char": _mean_and_stderr([item[1] for item in items]),
            "n_items": len(items),
        }
        norms = [item[2] for item in items if item[2] is not None]
        if len(norms) == len(items):
            entry["prob_correct_norm"] = _mean_and_stderr(norms)
        metrics[name] = entry
    return metrics


def json_safe(raw: dict) -> Any:
    """lm-eval's results without samples or run-time stamps, as plain JSON types."""
    from lm_eval.utils import handle_non_serializable

    trimmed = {key: value for key, value in raw.items() if key != "samples" and key not in VOLATILE_RAW_KEYS}
    return json.loads(json.dumps(trimmed, default=handle_non_serializable, sort_keys=True))


def evaluate_checkpoint(
    hf_dir: Path,
    tasks: list[dict],
    *,
    num_fewshot: int,
    out_json: Path,
    run_id: str,
    iteration: int,
    tokens_seen: int,
    include_path: Path | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | float | None = None,
    seed: int = 1234,
    hf_home: Path | None = None,
    likelihood: bool = True,
) -> dict:
    """Evaluate the tasks of one shot set on ``hf_dir``, write ``out_json`` and return its content.

    ``likelihood``: also log lm-eval's samples and record :func:`likelihood_metrics` (the protocol
    metrics are the same either way).
    """
    validate_protocol_tasks(tasks, num_fewshot)
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model folder (no config.json): {hf_dir}")
    task_names = [spec["task"] for spec in tasks]
    started = time.perf_counter()
    with offline_environment(hf_home):
        import lm_eval
        import torch
        import transformers

        task_manager = make_task_manager(task_names, include_path)
        task_objects = load_tasks(task_names, task_manager)
        raw = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir.resolve()), "dtype": dtype},
            tasks=task_objects,
            num_fewshot=num_fewshot,
            task_manager=task_manager,
            device=device,
            batch_size=batch_size,
            limit=limit,
            log_samples=likelihood,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            # Bootstrap only serves the stderr of non-mean metrics (perplexity); lm-eval's default of
            # 100 000 resamples dominated the demo's CPU evaluations. Accuracies are unaffected.
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    if raw is None:
        raise EvaluationError("lm-eval returned no results (not rank 0?)")
    payload = {
        "run_id": run_id,
        "iteration": int(iteration),
        "tokens_seen": int(tokens_seen),
        "num_fewshot": int(num_fewshot),
        "tasks": protocol_scores(raw, tasks),
        "likelihood": likelihood_metrics(raw, tasks) if likelihood else {},
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else raw.get("lm_eval_version"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model_dir": str(hf_dir.resolve()),
        "duration_s": round(time.perf_counter() - started, 3),
        "raw": json_safe(raw),
    }
    write_json_atomic(Path(out_json), payload, indent=2, sort_keys=True, allow_nan=False)
    return payload
