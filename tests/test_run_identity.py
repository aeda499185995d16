"""A changed training-relevant value for an existing run id is refused, naming the keys."""

import copy
import json
from pathlib import Path

import pytest

from osref.run_identity import RunIdentityError, check_or_record

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
