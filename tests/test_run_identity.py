"""A changed training-relevant value for an existing run id is refused, naming the keys."""

import copy
import json
from pathlib import Path

import pytest

from osref.run_identity import RunIdentityError, check_or_record, identity

RUN = json.loads((Path(__file__).parent / "data" / "tiny_run.json").read_text())


def test_first_use_records_and_same_config_passes(tmp_path):
    check_or_record(RUN, tmp_path)
    assert (tmp_path / "run_identity.json").exists()
    again = copy.deepcopy(RUN)
    again["train"]["segment_ends"] = [10, 20, 30, 40]  # re-segmenting is not a new run
    again["tokenizer"]["path"] = "/elsewhere/gpt-neox-20b"
    check_or_record(again, tmp_path)


def test_changed_recipe_is_refused_with_the_keys(tmp_path):
    check_or_record(RUN, tmp_path)
    changed = copy.deepcopy(RUN)
    changed["train"]["lr"] = 0.006
    changed["model"]["rotary_base"] = 100000.0
    with pytest.raises(RunIdentityError) as info:
        check_or_record(changed, tmp_path)
    message = str(info.value)
    assert "train.lr: 0.004 -> 0.006" in message and "model.rotary_base: 10000.0 -> 100000.0" in message
    assert "suffix" in message


# ---- the data, by content --------------------------------------------------------------------------


def _data(root: Path, sha: str, tokens: int = 1000) -> dict:
    """A run document over one tokenized group of `demo` under ``root``, with its download manifest and
    stats as the download and tokenize jobs write them."""
    raw = root / "data" / "raw" / "demo" / "group_000"
    raw.mkdir(parents=True, exist_ok=True)
    record = {"path": str(raw / "mine.jsonl"), "source_path": "mine.jsonl", "size": 52, "sha256": sha}
    (raw / "manifest.json").write_text(json.dumps({"dataset": "demo", "group": 0, "files": [record]}))
    tokenized = root / "data" / "tokenized" / "demo"
    tokenized.mkdir(parents=True, exist_ok=True)
    (tokenized / "group_000.stats.json").write_text(json.dumps({"tokens": tokens, "documents": 10}))
    run = copy.deepcopy(RUN)
    run["data"]["prefixes"] = [str(tokenized / "group_000")]
    return run


def test_a_content_change_of_the_data_is_refused_naming_the_group(tmp_path):
    run = _data(tmp_path, "a" * 64)
    check_or_record(run, tmp_path / "ckpt")
    check_or_record(run, tmp_path / "ckpt")  # same content: resumes
    edited = _data(tmp_path, "b" * 64)  # the corpus edited in place: same names, new sha256
    with pytest.raises(RunIdentityError) as info:
        check_or_record(edited, tmp_path / "ckpt")
    message = str(info.value)
    assert "the data changed since its checkpoints" in message and "demo/group_000" in message
    assert "suffix" in message and str(tmp_path / "ckpt") in message
    retokenized = _data(tmp_path, "a" * 64, tokens=999)  # same files, tokenized differently (text_field)
    with pytest.raises(RunIdentityError, match="demo/group_000"):
        check_or_record(retokenized, tmp_path / "ckpt")


def test_a_record_of_the_previous_version_loads_and_is_guarded_from_then_on(tmp_path):
    """A run_identity.json written before the data check (no digests) is the same run when the config
    is: the job resumes, the digests are added, and a later change is refused."""
    run = _data(tmp_path, "a" * 64)
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    previous = identity(run)  # what the previous version recorded: the config part only
    (checkpoints / "run_identity.json").write_text(json.dumps(previous))
    check_or_record(run, checkpoints)
    upgraded = json.loads((checkpoints / "run_identity.json").read_text())
    assert set(upgraded) == set(previous) | {"data_content"} and list(upgraded["data_content"]) == ["demo/group_000"]
    with pytest.raises(RunIdentityError, match="the data changed"):
        check_or_record(_data(tmp_path, "c" * 64), checkpoints)


def test_the_training_script_refuses_to_resume_on_changed_data(tmp_path):
    """scripts/train.py, as the train_segment rule runs it: exit 3 and the message, before any training."""
    import subprocess
    import sys

    run = _data(tmp_path, "a" * 64)
    run["paths"]["run_dir"] = str(tmp_path / "run")
    check_or_record(run)
    changed = _data(tmp_path, "d" * 64)
    changed["paths"]["run_dir"] = str(tmp_path / "run")
    (tmp_path / "run.json").write_text(json.dumps(changed))
    script = Path(__file__).resolve().parent.parent / "scripts" / "train.py"
    proc = subprocess.run(
        [sys.executable, str(script), f"--run-json={tmp_path / 'run.json'}", "--until=20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the data changed since its checkpoints" in proc.stderr and "demo/group_000" in proc.stderr
