"""The demo lm-eval tasks: deterministic, well-formed, loadable by lm-eval offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from osref.eval_tasks import (
    CONTINUATION_TASK,
    DEMO_TASKS,
    LASTWORD_TASK,
    N_FEWSHOT_POOL,
    build_demo_tasks,
    prose_paragraphs,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst"
N_ITEMS = 40


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return build_demo_tasks(CORPUS, tmp_path_factory.mktemp("tasks"), n_items=N_ITEMS)


def test_prose_paragraphs_keeps_prose_and_strips_inline_markup():
    text = (
        "Title\n=====\n\nThe :func:`len` function returns the ``size`` of a\ncontainer.\n\n"
        "   indented code block.\n\n* a list item.\n\n.. note:: directive.\n\nNo full stop here"
    )
    assert prose_paragraphs(text) == ["The len function returns the size of a container."]


def test_files_and_yaml(task_dir: Path):
    for name in DEMO_TASKS:
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        assert config["task"] == name
        files = config["dataset_kwargs"]["data_files"]
        assert set(files) == {"train", "test"}
        for path in files.values():
            assert Path(path).is_absolute() and Path(path).is_file()
        assert len(_rows(Path(files["test"]))) == N_ITEMS
        assert len(_rows(Path(files["train"]))) == N_FEWSHOT_POOL
        assert "num_fewshot" not in config  # a YAML num_fewshot of 0 would block the per-call shot count
    assert yaml.safe_load((task_dir / f"{LASTWORD_TASK}.yaml").read_text())["output_type"] == "loglikelihood"
    assert yaml.safe_load((task_dir / f"{CONTINUATION_TASK}.yaml").read_text())["output_type"] == "multiple_choice"


def test_items_are_answerable(task_dir: Path):
    for row in _rows(task_dir / f"{LASTWORD_TASK}_test.jsonl"):
        words = row["text"].split(" ")
        assert 12 <= len(words) <= 60 and words[-1].isalpha() and words[-1] in words[:-1]
    rows = _rows(task_dir / f"{CONTINUATION_TASK}_test.jsonl")
    for row in rows:
        assert len(row["choices"]) == 4 == len(set(row["choices"]))
        assert 0 <= row["label"] < 4 and row["context"]
    labels = [row["label"] for row in rows]
    assert len(set(labels)) == 4  # the true ending is not always in the same slot


def test_deterministic(task_dir: Path, tmp_path: Path):
    again = build_demo_tasks(CORPUS, tmp_path / "again", n_items=N_ITEMS)
    other_seed = build_demo_tasks(CORPUS, tmp_path / "seed", n_items=N_ITEMS, seed=7)
    for name in DEMO_TASKS:
        for split in ("test", "train"):
            first = (task_dir / f"{name}_{split}.jsonl").read_bytes()
            assert first == (again / f"{name}_{split}.jsonl").read_bytes()
        assert (task_dir / f"{name}_test.jsonl").read_bytes() != (other_seed / f"{name}_test.jsonl").read_bytes()


def test_too_small_corpus_is_a_clear_error(tmp_path: Path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_text(json.dumps({"text": "One sentence. Another sentence here."}) + "\n")
    with pytest.raises(ValueError, match="usable passages"):
        build_demo_tasks(corpus, tmp_path / "out", n_items=5)


def test_lm_eval_loads_the_tasks_offline(task_dir: Path, tmp_path: Path):
    from osref.evaluate import load_tasks, make_task_manager, offline_environment

    with offline_environment(tmp_path / "hf_home"):
        manager = make_task_manager(list(DEMO_TASKS), task_dir)
        tasks = load_tasks(list(DEMO_TASKS), manager)
    assert [t.task_name for t in tasks] == list(DEMO_TASKS)
    assert all(len(list(t.test_docs())) == N_ITEMS for t in tasks)


def test_marker_and_cli_from_download_manifest(task_dir: Path, tmp_path: Path):
    import importlib.util

    marker = json.loads((task_dir / "tasks.json").read_text())
    assert marker["tasks"] == list(DEMO_TASKS) and marker["include_path"] == str(task_dir)
    download_manifest = tmp_path / "manifest.json"
    download_manifest.write_text(json.dumps({"dataset": "demo", "group": 0, "files": [{"path": str(CORPUS)}]}))
    spec = importlib.util.spec_from_file_location("build_eval_tasks", REPO / "scripts" / "build_eval_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "from_manifest"
    assert script.main(["--manifest", str(download_manifest), "--out", str(out), "--n-items", str(N_ITEMS)]) == 0
    assert json.loads((out / "tasks.json").read_text())["sha256"] == marker["sha256"]
