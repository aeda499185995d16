"""Evaluation protocols as data: which tasks, with how many shots, scored by which metric.

The 0.01 protocol (copa … boolq, social_iqa outside the average) lives in ``config/config.yaml``;
this module only splits them into *shot sets*, one evaluation job and file each (``"0shot"``,
``"10shot"``: one lm-eval call per shot count, as in the original; "group" is kept for the data's
shard groups), and checks that every task name is one lm-eval or our local task builder knows.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any

OPEN_SCI_REF_TASKS = {
    "copa",
    "lambada_openai",
    "openbookqa",
    "winogrande",
    "social_iqa",
    "mmlu",
    "commonsense_qa",
    "piqa",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "mmlu_pro",
    "mmlu_continuation",
}
LOCAL_DEMO_TASKS = {"demo_lastword", "demo_continuation"}


def shot_set_name(shots: int) -> str:
    """The name of the tasks with ``shots`` shots, and of their evaluation file: ``"10shot"``."""
    return f"{shots}shot"


def shot_sets(tasks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The protocol's tasks by shot count (its shot sets), in order of first appearance."""
    sets: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        sets.setdefault(shot_set_name(task["shots"]), []).append(task)
    return sets


@functools.lru_cache(maxsize=1)
def lm_eval_task_names() -> frozenset[str]:
    """Task and group names defined by the installed lm-eval's YAML files (read, not imported)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        return frozenset()
    root = os.path.join(os.path.dirname(spec.origin), "tasks")
    pattern = re.compile(rb"^(?:task|group):\s*([A-Za-z0-9_\-.]+)\s*$", re.M)
    names: set[str] = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".yaml"):
                with open(os.path.join(dirpath, name), "rb") as fh:
                    names.update(m.decode() for m in pattern.findall(fh.read()))
    return frozenset(names)


def task_problem(name: str, evaluation: dict[str, Any], where: str) -> str | None:
    """Why ``name`` is not a task lm-eval (or, with ``evaluation.local_tasks``, the demo) knows; None if it is."""
    local = evaluation.get("local_tasks") is not None
    if (local and name in LOCAL_DEMO_TASKS) or name in OPEN_SCI_REF_TASKS or name in lm_eval_task_names():
        return None
    hint = " (local demo tasks need evaluation.local_tasks)" if name in LOCAL_DEMO_TASKS else ""
    return f"{where}: unknown eval task {name!r}{hint}"


def check_tasks(tasks: list[dict[str, Any]], evaluation: dict[str, Any]) -> list[str]:
    problems = []
    seen = set()
    for i, task in enumerate(tasks):
        name = task["task"]
        where = f"evaluation.protocols.{evaluation['protocol']}[{i}].task"
        if name in seen:
            problems.append(f"{where}: task {name!r} listed twice")
        seen.add(name)
        if (problem := task_problem(name, evaluation, where)) is not None:
            problems.append(problem)
    return problems


EXTRA_SHOT_SET = re.compile(r"^extra-(?P<task>[A-Za-z0-9_.\-]+)-(?P<shots>\d+)shot$")


def parse_shot_set(name: str) -> tuple[int, str | None]:
    """(shots, task) of an evaluation file name: ``5shot`` -> (5, None); ``extra-mmlu_pro-5shot`` ->
    (5, "mmlu_pro"), the one-task file of an extra task (osref.released_models.extra_shot_set_name)."""
    if match := re.fullmatch(r"(\d+)shot", name):
        return int(match.group(1)), None
    if match := EXTRA_SHOT_SET.match(name):
        return int(match.group("shots")), match.group("task")
    raise ValueError(f"shot set {name!r}: expected '<k>shot' or 'extra-<task>-<k>shot'")
