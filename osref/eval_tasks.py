"""Small local lm-eval tasks built from the demo corpus, for CPU demo runs and tests.

The open-sci-ref benchmark suite lives on the Hugging Face hub and takes hours on a CPU. The demo
pipeline and CI need an evaluation that runs offline in seconds and still measures something a
tiny model trained on the demo corpus (Python documentation) can learn. This module cuts real
prose from that corpus into two task shapes that mirror the real suite:

* ``demo_lastword`` (like lambada_openai): a short passage; the model must give the final word
  (``loglikelihood``, metric ``acc`` = the greedy continuation is the word). Only passages whose
  last word already occurs earlier in the passage are kept, so copying from context helps.
* ``demo_continuation`` (like hellaswag): the start of a paragraph and four candidate next
  sentences, one true and three taken from other documents (``multiple_choice``, ``acc`` and
  ``acc_norm``).

The output is an lm-eval include directory: one JSONL file per split and one YAML per task, with
absolute ``data_files`` paths (lm-eval resolves relative ones against the working directory).
Everything is a pure function of the corpus bytes, ``n_items`` and ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from osref.files import write_json_atomic, write_text_atomic
from osref.paths import EVAL_TASKS_MARKER

LASTWORD_TASK = "demo_lastword"
CONTINUATION_TASK = "demo_continuation"
DEMO_TASKS = (LASTWORD_TASK, CONTINUATION_TASK)

MARKER_NAME = EVAL_TASKS_MARKER  # written last: its presence means the include folder is complete
N_FEWSHOT_POOL = 16  # items in the "train" split that few-shot examples are drawn from
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z][a-z]{2,}$")  # plain lower-case word, optionally capitalised
_MARKUP = re.compile(r"[`*_|<>\[\]{}\\]|:[a-z]+:|\.\.|::|=|>>>")
# Inline reST markup that wraps plain words: :role:`text <target>`, ``literal``, *emphasis*, `link`_
_INLINE_MARKUP = (
    re.compile(r":[a-z:]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`"),
    re.compile(r"``([^`]+)``"),
    re.compile(r"\*\*?([^*]+)\*\*?"),
    re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`_{0,2}"),
)


def read_corpus(corpus_paths: Path | Sequence[Path]) -> Iterator[str]:
    """Yield the ``text`` field of every document, file by file (JSONL, plain/gzip/zstd, or parquet)."""
    from osref.tokenize import iter_documents

    paths = [corpus_paths] if isinstance(corpus_paths, (str, Path)) else list(corpus_paths)
    if not paths:
        raise ValueError("no corpus files given")
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"demo corpus not found: {path}")
        yield from iter_documents(path, "parquet" if path.suffix == ".parquet" else "jsonl", "text")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of plain prose (no reST markup, code, lists or headings), whitespace-collapsed."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented: code, directive bodies, list continuations
        joined = " ".join(line.strip() for line in lines)
        for pattern in _INLINE_MARKUP:
            joined = pattern.sub(r"\1", joined)
        joined = " ".join(joined.split())
        if _MARKUP.search(joined) or joined[:1] in "*-#+0123456789" or not joined[:1].isupper():
            continue
        if not joined.endswith("."):
            continue
        paragraphs.append(joined)
    return paragraphs


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _lastword_item(paragraph: str, min_words: int = 12, max_words: int = 60) -> dict | None:
    words = paragraph.rstrip(".").split(" ")
    if not min_words <= len(words) <= max_words:
        return None
    last = words[-1]
    if not _WORD.match(last) or last not in words[:-1]:
        return None
    return {"text": " ".join(words)}


def _continuation_parts(paragraph: str) -> tuple[str, str] | None:
    sentences = split_sentences(paragraph)
    if len(sentences) < 2:
        return None
    context = " ".join(sentences[:2]) if len(sentences) >= 3 else sentences[0]
    ending = sentences[2] if len(sentences) >= 3 else sentences[1]
    if not 6 <= len(context.split()) <= 50 or not 4 <= len(ending.split()) <= 30:
        return None
    return context, ending


def _continuation_items(candidates: list[tuple[int, str, str]], n: int, rng: random.Random) -> list[dict]:
    """Pick ``n`` (doc, context, ending) candidates and add three endings from other documents."""
    chosen = rng.sample(range(len(candidates)), n)
    items = []
    for index in chosen:
        doc_id, context, ending = candidates[index]
        distractors: list[str] = []
        while len(distractors) < 3:
            other_doc, _, other_ending = candidates[rng.randrange(len(candidates))]
            if other_doc != doc_id and other_ending != ending and other_ending not in distractors:
                distractors.append(other_ending)
        choices = distractors + [ending]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(ending)})
    return items


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def _write_yaml(path: Path, config: dict) -> None:
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False, width=1000))


def _task_yaml(name: str, data_dir: Path, body: dict) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {
                "train": str((data_dir / f"{name}_train.jsonl").resolve()),
                "test": str((data_dir / f"{name}_test.jsonl").resolve()),
            }
        },
        "training_split": "train",
        "test_split": "test",
        "fewshot_split": "train",
        **body,
        "metadata": {"version": 1.0},
    }


def build_demo_tasks(
    corpus_path: Path | Sequence[Path], out_dir: Path, *, n_items: int = 100, seed: int = 1234
) -> Path:
    """Write the two demo tasks (data + YAML + a ``tasks.json`` marker) into ``out_dir``; return it.

    ``corpus_path`` is one corpus file or several (read in the given order). ``n_items`` test items
    per task, plus a fixed pool of few-shot items. Same corpus, ``n_items`` and ``seed`` give
    byte-identical data files.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lastword_candidates: list[dict] = []
    continuation_candidates: list[tuple[int, str, str]] = []
    for doc_id, text in enumerate(read_corpus(corpus_path)):
        for paragraph in prose_paragraphs(text):
            if (item := _lastword_item(paragraph)) is not None:
                lastword_candidates.append(item)
            if (parts := _continuation_parts(paragraph)) is not None:
                continuation_candidates.append((doc_id, *parts))

    needed = n_items + N_FEWSHOT_POOL
    for name, pool in ((LASTWORD_TASK, lastword_candidates), (CONTINUATION_TASK, continuation_candidates)):
        if len(pool) < needed:
            raise ValueError(f"{corpus_path}: only {len(pool)} usable passages for {name}, need {needed}")

    rng = random.Random(seed)
    lastword = [lastword_candidates[i] for i in rng.sample(range(len(lastword_candidates)), needed)]
    continuation = _continuation_items(continuation_candidates, needed, rng)

    for name, rows in ((LASTWORD_TASK, lastword), (CONTINUATION_TASK, continuation)):
        _write_jsonl(out_dir / f"{name}_test.jsonl", rows[:n_items])
        _write_jsonl(out_dir / f"{name}_train.jsonl", rows[n_items:])

    _write_yaml(
        out_dir / f"{LASTWORD_TASK}.yaml",
        _task_yaml(
            LASTWORD_TASK,
            out_dir,
            {
                "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "target_delimiter": "",
                "metric_list": [
                    {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        ),
    )
    _write_yaml(
        out_dir / f"{CONTINUATION_TASK}.yaml",
        _task_yaml(
            CONTINUATION_TASK,
            out_dir,
            {
                "output_type": "multiple_choice",
                "doc_to_text": "{{context}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        ),
    )
    marker = {
        "include_path": str(out_dir),
        "tasks": list(DEMO_TASKS),
        "n_items": n_items,
        "n_fewshot_pool": N_FEWSHOT_POOL,
        "seed": seed,
        "sha256": {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out_dir.glob("demo_*.jsonl"))
        },
    }
    write_json_atomic(out_dir / MARKER_NAME, marker, indent=2, sort_keys=True)
    return out_dir
