"""The released evaluations as tidy rows, and the protocol-reproduction table, on hand-computed values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from osref.released_results import REPRODUCTION_COLUMNS, protocol_reproduction, released_rows, write_results
from osref.report import RESULT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
REF = "open-sci-ref_model-0.13b_data-DCLM_tokenizer-GPT-NeoX_samples-300B_global_bs-1008_context-4096_schedule-WSD_lr-4e-3_warmup-25000_machine-LEONARDO_14333760"


def ours_row(task, value, stderr, n=math.nan, metric="acc", shots=0, iteration=72661, run_id="0.13b-dclm-300B-4096"):
    return {
        "run_id": run_id,
        "reference_run": REF,
        "iteration": iteration,
        "task": task,
        "shots": shots,
        "metric": metric,
        "value": value,
        "stderr": stderr,
        "n": n,
    }


def pub_row(task, value, metric="acc", shots=0, iteration=72661):
    return {
        "reference_run": REF,
        "iteration": iteration,
        "task": task,
        "shots": shots,
        "metric": metric,
        "published": value,
    }


def test_protocol_reproduction_on_hand_computed_values():
    ours = pd.DataFrame(
        [
            # se_pub = sqrt(0.2 * 0.8 / 100) = 0.04; combined = sqrt(0.03² + 0.04²) = 0.05; diff 0.06 > 0.05
            ours_row("copa", 0.26, 0.03, n=101),
            # se_pub = sqrt(0.25 / 100) = 0.05; combined = sqrt(0.12² + 0.05²) = 0.13; diff -0.03
            ours_row("boolq", 0.47, 0.12, n=101, shots=10),
            # no n: se_pub = 0.05 * sqrt(0.1 * 0.9 / (0.5 * 0.5)) = 0.03; combined = sqrt(0.0034); diff 0.4
            ours_row("piqa", 0.5, 0.05, metric="acc_norm", shots=10),
            # all items right on both sides: both stderrs 0, difference 0 -> within, z undefined
            ours_row("winogrande", 1.0, 0.0, n=50),
            # not a 0/1 mean: no published stderr can be estimated
            ours_row("lambada_openai", 12.5, 0.4, n=100, metric="perplexity"),
            ours_row("mmlu", 0.3, 0.01, n=1000, shots=5),  # no published value at this iteration
            ours_row("openbookqa", 0.3, 0.02, n=500, metric="acc_norm"),  # published with another metric
            ours_row("avg", 0.4, math.nan),  # averages are left out
        ]
    )
    published = pd.DataFrame(
        [
            pub_row("copa", 0.2),
            pub_row("boolq", 0.5, shots=10),
            pub_row("piqa", 0.1, metric="acc_norm", shots=10),
            pub_row("winogrande", 1.0),
            pub_row("lambada_openai", 12.0, metric="perplexity"),
            pub_row("mmlu", 0.3, shots=5, iteration=70000),
            pub_row("openbookqa", 0.3, metric="acc"),
        ]
    )
    table = protocol_reproduction(ours, published)
    assert list(table.columns) == REPRODUCTION_COLUMNS
    rows = {row.task: row for row in table.itertuples()}
    assert sorted(rows) == ["boolq", "copa", "lambada_openai", "piqa", "winogrande"]

    copa = rows["copa"]
    assert (copa.published, copa.n) == (0.2, 101)
    assert copa.published_stderr == pytest.approx(0.04)
    assert copa.combined_stderr == pytest.approx(0.05)
    assert copa.difference == pytest.approx(0.06) and copa.z == pytest.approx(1.2) and copa.within is False

    boolq = rows["boolq"]
    assert boolq.published_stderr == pytest.approx(0.05) and boolq.combined_stderr == pytest.approx(0.13)
    assert boolq.difference == pytest.approx(-0.03) and boolq.z == pytest.approx(-0.03 / 0.13) and boolq.within is True

    piqa = rows["piqa"]
    assert piqa.published_stderr == pytest.approx(0.03) and piqa.combined_stderr == pytest.approx(math.sqrt(0.0034))
    assert piqa.difference == pytest.approx(0.4) and piqa.within is False and pd.isna(piqa.n)

    wino = rows["winogrande"]
    assert (wino.published_stderr, wino.combined_stderr, wino.difference, wino.within) == (0.0, 0.0, 0.0, True)
    assert math.isnan(wino.z)

    lambada = rows["lambada_openai"]
    assert math.isnan(lambada.published_stderr) and math.isnan(lambada.combined_stderr) and lambada.within is None

    # a wider yardstick: within 2 combined stderrs
    assert protocol_reproduction(ours, published, z=2.0).set_index("task").loc["copa", "within"] is True


def test_protocol_reproduction_without_any_published_cell_is_an_empty_table():
    table = protocol_reproduction(
        pd.DataFrame([ours_row("copa", 0.6, 0.05)]), pd.DataFrame([pub_row("copa", 0.5, iteration=2)])
    )
    assert table.empty and list(table.columns) == REPRODUCTION_COLUMNS


def eval_file(path: Path, run_id: str, iteration: int, shots: int, tasks: dict[str, tuple]) -> str:
    """An evaluation JSON as osref.evaluate writes it (the keys the report reads)."""
    payload = {
        "run_id": run_id,
        "iteration": iteration,
        "tokens_seen": iteration * 1008 * 4096,
        "num_fewshot": shots,
        "tasks": {t: {"metric": m, "value": v, "stderr": s, "n_samples": n} for t, (m, v, s, n) in tasks.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return str(path)


def manifest_for(tmp_path: Path) -> dict:
    run_id, it = "released/0.13b-dclm-300B-4096", 72661
    base = tmp_path / "runs" / run_id / "eval" / f"iter_{it:07d}"
    files = [
        eval_file(
            base / "0shot.json",
            run_id,
            it,
            0,
            {"copa": ("acc", 0.7, 0.046, 100), "social_iqa": ("acc", 0.4, 0.011, 1954)},
        ),
        eval_file(base / "10shot.json", run_id, it, 10, {"boolq": ("acc", 0.6, 0.0086, 3270)}),
        eval_file(base / "extra-copa-5shot.json", run_id, it, 5, {"copa": ("acc", 0.75, 0.0435, 100)}),
        str(base / "missing.json"),  # not evaluated yet: simply absent
    ]
    protocol = [
        {"task": "copa", "shots": 0, "metric": "acc"},
        {"task": "social_iqa", "shots": 0, "metric": "acc", "in_average": False},
        {"task": "boolq", "shots": 10, "metric": "acc"},
    ]
    return {
        "protocol": protocol,
        "models": [
            {
                "name": "0.13b-dclm-300B-4096",
                "run_id": run_id,
                "reference_run": REF,
                "dataset": "dclm",
                "scale": "0.13b",
                "budget": "300B",
                "params": 125_000_000,
                "iterations": [it],
                "eval_files": files,
            }
        ],
    }


def test_released_rows_are_tidy_rows_with_source_released(tmp_path):
    table = released_rows(manifest_for(tmp_path))
    assert list(table.columns) == RESULT_COLUMNS
    assert set(table["source"]) == {"released"} and set(table["run_id"]) == {"0.13b-dclm-300B-4096"}
    cells = {(r.task, int(r.shots)): r.value for r in table.itertuples() if r.task != "avg"}
    assert cells == {("copa", 0): 0.7, ("social_iqa", 0): 0.4, ("boolq", 10): 0.6, ("copa", 5): 0.75}
    # the average: copa and boolq at their protocol shots, (0.7 + 0.6) / 2; the 5-shot copa extra stays out of it
    (avg,) = table[table["task"] == "avg"].itertuples()
    assert avg.value == pytest.approx(0.65) and avg.flops == pytest.approx(6 * 125e6 * 72661 * 1008 * 4096)
    assert (avg.iteration, avg.reference_run, avg.dataset) == (72661, REF, "dclm")


def test_results_files_put_our_value_next_to_the_published_one(tmp_path):
    written = write_results(manifest_for(tmp_path), ROOT / "config" / "reference", tmp_path / "out")
    with open(written["reproduction"], newline="") as fh:
        rows = {(r["task"], r["shots"]): r for r in csv.DictReader(fh)}
    curves = pd.read_csv(ROOT / "config" / "reference" / "curves.csv.gz")
    published = curves[(curves["run_id"] == REF) & (curves["iteration"] == 72661)].set_index("task")["value"]
    assert sorted(rows) == [
        ("boolq", "10"),
        ("copa", "0"),
        ("social_iqa", "0"),
    ]  # the 5-shot extra has no published value
    copa = rows[("copa", "0")]
    assert float(copa["published"]) == pytest.approx(published["copa"])
    assert float(copa["difference"]) == pytest.approx(0.7 - published["copa"])
    expected_se = math.sqrt(published["copa"] * (1 - published["copa"]) / 99)
    assert float(copa["published_stderr"]) == pytest.approx(expected_se)
    assert float(copa["combined_stderr"]) == pytest.approx(math.sqrt(0.046**2 + expected_se**2))
    with open(written["results"], newline="") as fh:
        assert {r["source"] for r in csv.DictReader(fh)} == {"released"}
