"""evaluate_checkpoint on a tiny random Llama with the real tokenizer and the local demo tasks."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from osref.eval_tasks import build_demo_tasks
from osref.evaluate import (
    EvaluationError,
    average_of,
    evaluate_checkpoint,
    protocol_scores,
    validate_protocol_tasks,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst"
TOKENIZER = REPO / "assets" / "gpt-neox-20b" / "tokenizer.json"
DEMO_PROTOCOL = [
    {"task": "demo_lastword", "shots": 0, "metric": "acc", "in_average": True},
    {"task": "demo_continuation", "shots": 0, "metric": "acc_norm", "in_average": True},
]
LIMIT = 6


def make_tiny_llama(out_dir: Path) -> Path:
    """A random 2-layer Llama (hidden 32, vocab 50304) saved with the GPT-NeoX tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50304, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out_dir)
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER), bos_token=special, eos_token=special, unk_token=special
    )
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory) -> Path:
    return build_demo_tasks(CORPUS, tmp_path_factory.mktemp("demo_tasks"), n_items=20)


def _evaluate(model: Path, tasks: Path, out_json: Path, hf_home: Path, likelihood: bool = True) -> dict:
    return evaluate_checkpoint(
        model, DEMO_PROTOCOL, num_fewshot=0, out_json=out_json, run_id="tiny-demo", iteration=40,
        tokens_seen=40960, include_path=tasks, limit=LIMIT, hf_home=hf_home, likelihood=likelihood,
    )  # fmt: skip


def test_average_of():
    assert average_of({"a": 0.5, "b": 0.25, "c": 0.9}, ["a", "b"]) == pytest.approx(0.375)
    assert average_of({"a": 0.5}, ["a", "b"]) is None  # never a smaller mean
    assert average_of({"a": 0.5, "b": None}, ["a", "b"]) is None
    assert average_of({"a": 0.5, "b": math.nan}, ["a", "b"]) is None
    assert average_of({"a": 0.5}, []) is None


def test_one_call_per_shot_group():
    with pytest.raises(ValueError, match="one call per shot set"):
        validate_protocol_tasks(DEMO_PROTOCOL + [{"task": "copa", "shots": 10, "metric": "acc"}], 0)
    with pytest.raises(ValueError, match="metric"):
        validate_protocol_tasks([{"task": "copa", "shots": 0, "metric": "f1"}], 0)


def test_protocol_scores_handles_na_stderr_and_groups():
    raw = {
        "results": {
            "t": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
            "g": {"acc,none": 0.25, "acc_stderr,none": 0.01},
        },
        "group_subtasks": {"g": ["g1", "g2"]},
        "n-samples": {"t": {"effective": 4}, "g1": {"effective": 3}, "g2": {"effective": 5}},
    }
    scores = protocol_scores(raw, [{"task": "t", "metric": "acc"}, {"task": "g", "metric": "acc"}])
    assert scores == {
        "t": {"metric": "acc", "value": 0.5, "stderr": None, "n_samples": 4},
        "g": {"metric": "acc", "value": 0.25, "stderr": 0.01, "n_samples": 8},
    }
    with pytest.raises(EvaluationError, match="acc_norm"):
        protocol_scores(raw, [{"task": "t", "metric": "acc_norm"}])


def test_evaluate_demo_tasks_is_deterministic(tiny_model: Path, demo_tasks: Path, tmp_path: Path):
    first = _evaluate(tiny_model, demo_tasks, tmp_path / "a" / "0shot.json", tmp_path / "hf_home")
    second = _evaluate(tiny_model, demo_tasks, tmp_path / "b" / "0shot.json", tmp_path / "hf_home")

    assert (tmp_path / "hf_home" / "datasets").is_dir()  # the per-call HF_HOME received the datasets cache
    on_disk = json.loads((tmp_path / "a" / "0shot.json").read_text())
    assert on_disk == first
    assert set(first) == {
        "run_id", "iteration", "tokens_seen", "num_fewshot", "tasks", "likelihood", "lm_eval_version",
        "transformers_version", "torch_version", "model_dir", "duration_s", "raw",
    }  # fmt: skip
    assert (first["run_id"], first["iteration"], first["tokens_seen"], first["num_fewshot"]) == (
        "tiny-demo",
        40,
        40960,
        0,
    )
    assert first["lm_eval_version"] == "0.4.13"
    assert set(first["tasks"]) == {"demo_lastword", "demo_continuation"}
    for name, spec in zip(["demo_lastword", "demo_continuation"], DEMO_PROTOCOL, strict=False):
        score = first["tasks"][name]
        assert score["metric"] == spec["metric"]
        assert 0.0 <= score["value"] <= 1.0
        assert score["stderr"] is None or score["stderr"] >= 0.0
        assert score["n_samples"] == LIMIT
        assert score["value"] == first["raw"]["results"][name][f"{spec['metric']},none"]
    assert "samples" not in first["raw"] and "date" not in first["raw"]
    # only our file: no lm-eval timestamped results_*.json / samples_*.jsonl next to it
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["0shot.json"]

    first.pop("duration_s"), second.pop("duration_s")
    assert first == second


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's HFLM does (context's trailing spaces
    move to the continuation; the continuation's tokens are those of the whole string past the
    context's), summed over the continuation's tokens."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_context, len(whole))))


def test_likelihood_metrics_match_a_direct_computation(tiny_model: Path, demo_tasks: Path, tmp_path: Path):
    """The recorded per-item likelihood metrics equal log-probabilities computed here with the model
    itself, and recording them leaves every protocol number and lm-eval result unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with_lik = _evaluate(tiny_model, demo_tasks, tmp_path / "a" / "0shot.json", tmp_path / "hf_home")
    without = _evaluate(tiny_model, demo_tasks, tmp_path / "b" / "0shot.json", tmp_path / "hf_home", likelihood=False)
    assert with_lik["tasks"] == without["tasks"] and with_lik["raw"]["results"] == without["raw"]["results"]
    assert without["likelihood"] == {} and set(with_lik["likelihood"]) == {"demo_lastword", "demo_continuation"}

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    docs = {name: [json.loads(line) for line in (demo_tasks / f"{name}_test.jsonl").read_text().splitlines()[:LIMIT]]
            for name in ("demo_lastword", "demo_continuation")}  # fmt: skip
    correct, per_char, norm = [], [], []
    for doc in docs["demo_continuation"]:
        lls = [_continuation_logprob(model, tokenizer, doc["context"], " " + choice) for choice in doc["choices"]]
        correct.append(lls[doc["label"]])
        per_char.append(lls[doc["label"]] / len(" " + doc["choices"][doc["label"]]))
        norm.append(math.exp(lls[doc["label"]]) / sum(math.exp(ll) for ll in lls))
    continuation = with_lik["likelihood"]["demo_continuation"]
    assert continuation["n_items"] == LIMIT
    assert continuation["logprob_correct"]["value"] == pytest.approx(sum(correct) / LIMIT, rel=1e-4)
    assert continuation["logprob_correct_per_char"]["value"] == pytest.approx(sum(per_char) / LIMIT, rel=1e-4)
    assert continuation["prob_correct_norm"]["value"] == pytest.approx(sum(norm) / LIMIT, rel=1e-3)
    mean = sum(correct) / LIMIT
    stderr = math.sqrt(sum((c - mean) ** 2 for c in correct) / (LIMIT - 1) / LIMIT)
    assert continuation["logprob_correct"]["stderr"] == pytest.approx(stderr, rel=1e-3)

    words = [doc["text"].split(" ") for doc in docs["demo_lastword"]]
    lastword = [_continuation_logprob(model, tokenizer, " ".join(w[:-1]), " " + w[-1]) for w in words]
    recorded = with_lik["likelihood"]["demo_lastword"]
    assert recorded["logprob_correct"]["value"] == pytest.approx(sum(lastword) / LIMIT, rel=1e-4)
    assert "prob_correct_norm" not in recorded  # one continuation: nothing to renormalise over
    on_disk = json.loads((tmp_path / "a" / "0shot.json").read_text())
    assert on_disk["likelihood"] == with_lik["likelihood"]


def test_hub_task_offline_fails_fast(tiny_model: Path, tmp_path: Path):
    out_json = tmp_path / "copa.json"
    started = time.perf_counter()
    with pytest.raises(EvaluationError) as error:
        evaluate_checkpoint(
            tiny_model, [{"task": "copa", "shots": 0, "metric": "acc"}], num_fewshot=0, out_json=out_json,
            run_id="tiny-demo", iteration=40, tokens_seen=40960, hf_home=tmp_path / "empty_hf_home",
        )  # fmt: skip
    assert time.perf_counter() - started < 60
    message = str(error.value)
    assert "copa" in message and "offline" in message
    assert not out_json.exists()


def test_missing_model_dir_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluate_checkpoint(
            tmp_path, DEMO_PROTOCOL, num_fewshot=0, out_json=tmp_path / "x.json", run_id="r", iteration=1, tokens_seen=1
        )
