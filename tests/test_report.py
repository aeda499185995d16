"""The report: tidy table, averages only where complete, missing cells, deltas vs the reference."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from osref.report import build_report

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "reference"
NEMOTRON_1_7B = "13715533"  # 1.7b nemotron-cc-hq 300B, final avg11 0.616
DCLM_1_7B = 12254566  # 1.7b dclm 300B, final avg11 0.562 (job id as an int works too)
OPEN_SCI_REF_PROTOCOL = [
    {"task": t, "shots": s, "metric": m, "in_average": t != "social_iqa"}
    for t, s, m in [
        ("copa", 0, "acc"), ("lambada_openai", 0, "acc"), ("openbookqa", 0, "acc_norm"), ("winogrande", 0, "acc"),
        ("social_iqa", 0, "acc"), ("mmlu", 5, "acc"), ("commonsense_qa", 10, "acc"), ("piqa", 10, "acc_norm"),
        ("hellaswag", 10, "acc_norm"), ("arc_easy", 10, "acc_norm"), ("arc_challenge", 10, "acc_norm"),
        ("boolq", 10, "acc"),
    ]
]  # fmt: skip
SMALL_PROTOCOL = [
    {"task": "copa", "shots": 0, "metric": "acc", "in_average": True},
    {"task": "lambada_openai", "shots": 0, "metric": "acc", "in_average": True},
    {"task": "social_iqa", "shots": 0, "metric": "acc", "in_average": False},
]
PARAMS = 1_000_000
TOKENS_PER_ITERATION = 8 * 128


def _run(run_id: str, eval_files: list[Path], reference_run=None, **extra) -> dict:
    return {
        "run_id": run_id, "dataset": "demo", "scale": "tiny", "budget": "0.25M", "tokens": 250_000,
        "seq_length": 128, "global_batch_size": 8, "params": PARAMS, "train_iters": 20, "checkpoint_iters": [10, 20],
        "reference_run": reference_run, "eval_files": [str(p) for p in eval_files],
        "train_metrics": None, "valid_metrics": None, **extra,
    }  # fmt: skip


def _eval_json(path: Path, run_id: str, iteration: int, scores: dict[str, float], shots: int = 0) -> Path:
    tasks = {
        task: {"metric": "acc", "value": value, "stderr": None if task == "copa" else 0.01, "n_samples": 100}
        for task, value in scores.items()
    }
    payload = {"run_id": run_id, "iteration": iteration, "tokens_seen": iteration * TOKENS_PER_ITERATION,
               "num_fewshot": shots, "tasks": tasks, "raw": {}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("synthetic")
    files = [
        _eval_json(base / "a/10.json", "run-a", 10, {"copa": 0.6, "lambada_openai": 0.2, "social_iqa": 0.4}),
        _eval_json(base / "a/20.json", "run-a", 20, {"copa": 0.7, "social_iqa": 0.45}),  # lambada missing
    ]
    train = base / "a/train_metrics.jsonl"
    train.write_text(
        "".join(
            json.dumps({"iteration": i, "consumed_tokens": i * 1024, "loss": 10 - i / 4}) + "\n" for i in range(1, 21)
        )
    )
    valid = base / "a/valid_metrics.jsonl"
    valid.write_text(json.dumps({"iteration": 20, "consumed_tokens": 20480, "valid_loss": 6.0}) + "\n")
    manifest = {
        "protocol": SMALL_PROTOCOL,
        "runs": [
            _run("run-a", files, NEMOTRON_1_7B, train_metrics=str(train), valid_metrics=str(valid)),
            _run("run-b", [base / "b/10.json", base / "b/20.json"]),  # not evaluated yet
        ],
    }
    out = base / "report"
    summary = build_report(manifest, REFERENCE, out)
    return out, summary


def test_written_files(synthetic):
    out, summary = synthetic
    names = {Path(p).relative_to(out).as_posix() for p in summary["files"]}
    assert {"results.csv", "results.parquet", "missing.csv", "final_scores.csv", "index.html"} <= names
    assert {"comparison.csv", "compute_multiplier.csv", "reference_finals.csv"} <= names
    assert set(summary["plots"]) == {
        "scores_run-a", "loss_run-a", "avg_vs_flops", "datasets_tiny_0.25M", "losses_tiny_0.25M",
        "references_published",
    }  # run-b: nothing to plot yet  # fmt: skip
    assert all(Path(p).is_file() for p in summary["files"])
    page = (out / "index.html").read_text()
    assert page.count("Plotly.newPlot(") == 6 and page.count("<img") == 0
    assert page.count("* plotly.js v") == 1  # the library, inlined once
    assert "Missing cells" in page and "run-b" in page
    parquet = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert len(parquet) == len(csv) == summary["n_results"]
    assert list(parquet.columns) == list(csv.columns)


def test_our_rows_and_average(synthetic):
    out, _ = synthetic
    table = pd.read_csv(out / "results.csv")
    ours = table[table["source"] == "ours"]
    assert set(ours["run_id"]) == {"run-a"}
    copa_10 = ours[(ours["iteration"] == 10) & (ours["task"] == "copa")].iloc[0]
    assert copa_10["value"] == 0.6 and pd.isna(copa_10["stderr"])
    assert copa_10["tokens_seen"] == 10 * TOKENS_PER_ITERATION
    assert copa_10["flops"] == 6 * PARAMS * 10 * TOKENS_PER_ITERATION
    averages = ours[ours["task"] == "avg"]
    assert averages["iteration"].tolist() == [10]  # iteration 20 lacks lambada_openai: no average
    assert averages["value"].iloc[0] == pytest.approx((0.6 + 0.2) / 2)  # social_iqa not in the average


def test_missing_cells(synthetic):
    out, summary = synthetic
    missing = pd.read_csv(out / "missing.csv")
    cells = set(zip(missing["run_id"], missing["iteration"], missing["task"], strict=False))
    expected = {("run-a", 20, "lambada_openai")} | {("run-b", i, t["task"]) for i in (10, 20) for t in SMALL_PROTOCOL}
    assert cells == expected and summary["n_missing"] == 7
    assert missing.set_index(["run_id", "iteration", "task"]).loc[("run-a", 20, "lambada_openai"), "in_average"]


def test_reference_rows_and_deltas(synthetic):
    out, _ = synthetic
    final_csv = pd.read_csv(REFERENCE / "final.csv")
    ref_final = final_csv[final_csv["slurm_job_id"] == int(NEMOTRON_1_7B)].iloc[0]
    final = pd.read_csv(out / "final_scores.csv").set_index(["run_id", "task"])
    copa = final.loc[("run-a", "copa")]
    assert copa["ours_iteration"] == 20 and bool(copa["ours_is_final"])
    assert copa["reference_iteration"] == 72661
    assert copa["reference"] == pytest.approx(ref_final["copa"])
    assert copa["delta"] == pytest.approx(0.7 - ref_final["copa"])
    ref_avg = (ref_final["copa"] + ref_final["lambada_openai"]) / 2  # the protocol's average, not avg11
    assert final.loc[("run-a", "avg"), "reference"] == pytest.approx(ref_avg)
    assert pd.isna(final.loc[("run-a", "avg"), "ours"])  # our last checkpoint has no average
    assert pd.isna(final.loc[("run-b", "copa"), "ours"]) and pd.isna(final.loc[("run-b", "copa"), "reference"])
    table = pd.read_csv(out / "results.csv")
    reference = table[table["source"] == "reference"]
    assert set(reference["task"]) == {"copa", "lambada_openai", "social_iqa", "avg"}
    assert reference["reference_run"].str.endswith("_13715533").all()
    first = reference[(reference["iteration"] == 2000) & (reference["task"] == "copa")].iloc[0]
    assert first["value"] == pytest.approx(0.58) and first["tokens_seen"] == 2000 * 1008 * 4096
    baselines = table[table["source"] == "baseline"]
    assert len(baselines[baselines["task"] == "avg"]) == 15


def test_reference_only_reproduces_published_averages(tmp_path: Path):
    runs = [
        _run(
            "1.7b-nemotron-cc-hq-300B-4096",
            [],
            NEMOTRON_1_7B,
            params=1_714_377_728,
            train_iters=72661,
            checkpoint_iters=[72661],
        ),
        _run("1.7b-dclm-300B-4096", [], DCLM_1_7B, params=1_714_377_728, train_iters=72661, checkpoint_iters=[72661]),
    ]
    build_report({"protocol": OPEN_SCI_REF_PROTOCOL, "runs": runs}, REFERENCE, tmp_path)
    final = pd.read_csv(tmp_path / "final_scores.csv").set_index(["run_id", "task"])
    assert round(final.loc[("1.7b-nemotron-cc-hq-300B-4096", "avg"), "reference"], 3) == 0.616
    assert round(final.loc[("1.7b-dclm-300B-4096", "avg"), "reference"], 3) == 0.562
    table = pd.read_csv(tmp_path / "results.csv")
    final_csv = pd.read_csv(REFERENCE / "final.csv").set_index("slurm_job_id")
    for run_id, job in (("1.7b-nemotron-cc-hq-300B-4096", 13715533), ("1.7b-dclm-300B-4096", 12254566)):
        rows = table[(table["run_id"] == run_id) & (table["source"] == "reference") & (table["task"] == "avg")]
        assert rows.set_index("iteration").loc[72661, "value"] == pytest.approx(final_csv.loc[job, "avg11"], abs=1e-6)
    missing = pd.read_csv(tmp_path / "missing.csv")
    assert len(missing) == 2 * 12  # nothing of ours yet


def test_clear_errors(tmp_path: Path):
    wrong_shots = _eval_json(tmp_path / "w.json", "run-a", 10, {"copa": 0.5}, shots=5)
    with pytest.raises(ValueError, match="w.json.*5-shot"):
        build_report({"protocol": SMALL_PROTOCOL, "runs": [_run("run-a", [wrong_shots])]}, REFERENCE, tmp_path / "r1")
    other_run = _eval_json(tmp_path / "o.json", "run-x", 10, {"copa": 0.5})
    with pytest.raises(ValueError, match="o.json.*run-x"):
        build_report({"protocol": SMALL_PROTOCOL, "runs": [_run("run-a", [other_run])]}, REFERENCE, tmp_path / "r2")
    with pytest.raises(ValueError, match="reference_run"):
        build_report(
            {"protocol": SMALL_PROTOCOL, "runs": [_run("run-a", [], "no-such-run")]}, REFERENCE, tmp_path / "r3"
        )
    with pytest.raises(ValueError, match="lacks key 'checkpoint_iters'"):
        run = _run("run-a", [])
        del run["checkpoint_iters"]
        build_report({"protocol": SMALL_PROTOCOL, "runs": [run]}, REFERENCE, tmp_path / "r4")


def test_snakemake_script_mode(tmp_path: Path):
    import runpy
    from types import SimpleNamespace

    manifest = {"protocol": SMALL_PROTOCOL, "runs": [_run("run-b", [tmp_path / "none.json"])]}
    smk = SimpleNamespace(
        params=SimpleNamespace(manifest=manifest, reference_dir=str(REFERENCE), out_dir=str(tmp_path / "report")),
        output=SimpleNamespace(manifest=str(tmp_path / "report" / "manifest.json")),
        log=[str(tmp_path / "report.log")],
    )
    runpy.run_path(str(REPO / "scripts" / "report.py"), init_globals={"snakemake": smk}, run_name="__main__")
    assert json.loads((tmp_path / "report" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "report" / "index.html").is_file()
    assert len(pd.read_csv(tmp_path / "report" / "missing.csv")) == 6
    assert "missing cells" in (tmp_path / "report.log").read_text()


def test_incremental_rebuild_reads_and_draws_only_what_changed(tmp_path: Path):
    a10 = _eval_json(tmp_path / "a/10.json", "run-a", 10, {"copa": 0.6, "lambada_openai": 0.2, "social_iqa": 0.4})
    b10 = tmp_path / "b/10.json"
    manifest = {"protocol": SMALL_PROTOCOL, "runs": [_run("run-a", [a10]), _run("run-b", [b10])]}
    out = tmp_path / "report"
    first = build_report(manifest, REFERENCE, out)
    assert first["cache"]["eval_files_parsed"] == 1 and first["cache"]["plots_reused"] == 0
    assert set(first["plots"]) == {"scores_run-a", "datasets_tiny_0.25M", "avg_vs_flops", "references_published"}

    unchanged = build_report(manifest, REFERENCE, out)
    assert unchanged["cache"] == {"eval_files_parsed": 0, "eval_files_reused": 1, "plots_drawn": 0, "plots_reused": 4}

    _eval_json(b10, "run-b", 10, {"copa": 0.5, "lambada_openai": 0.3, "social_iqa": 0.1})
    (out / "index.html").unlink()  # what Snakemake does with the outputs before a rerun
    added = build_report(manifest, REFERENCE, out)
    # new: scores_run-b; changed: the scale's datasets plot and avg_vs_flops; scores_run-a and the references reused
    assert added["cache"] == {"eval_files_parsed": 1, "eval_files_reused": 1, "plots_drawn": 3, "plots_reused": 2}
    assert "plot-scores_run-b" in (out / "index.html").read_text()

    _eval_json(a10, "run-a", 10, {"copa": 0.7, "lambada_openai": 0.2, "social_iqa": 0.4})  # re-evaluated
    changed = build_report(manifest, REFERENCE, out)
    assert changed["cache"]["eval_files_parsed"] == 1
    table = pd.read_csv(out / "results.csv").set_index(["run_id", "iteration", "task"])
    assert table.loc[("run-a", 10, "copa"), "value"] == 0.7
    assert table.loc[("run-a", 10, "avg"), "value"] == pytest.approx((0.7 + 0.2) / 2)
    assert table.loc[("run-b", 10, "avg"), "value"] == pytest.approx((0.5 + 0.3) / 2)

    cold = build_report(manifest, REFERENCE, tmp_path / "cold")
    assert cold["cache"]["eval_files_reused"] == 0
    for name in ("results.csv", "missing.csv", "final_scores.csv"):
        assert (out / name).read_text() == (tmp_path / "cold" / name).read_text(), name


def test_plot_cache_is_keyed_on_the_plotting_code_only(tmp_path: Path):
    """An edit of the page or the tables keeps every cached plot; an edit of the plotting code
    redraws them all (before osref/report/ was a package, any edit of report.py redrew every plot)."""
    import subprocess
    import sys
    import sysconfig

    package = tmp_path / "code"
    shutil.copytree(REPO / "osref", package / "osref", ignore=shutil.ignore_patterns("__pycache__"))
    a10 = _eval_json(tmp_path / "a/10.json", "run-a", 10, {"copa": 0.6, "lambada_openai": 0.2, "social_iqa": 0.4})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"protocol": SMALL_PROTOCOL, "runs": [_run("run-a", [a10])]}))
    build = (
        "import json, sys, osref; from osref.report import build_report; print(osref.__file__); "
        "print(json.dumps(build_report(json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3])['cache']))"
    )

    def plots_drawn_and_reused() -> tuple[int, int]:
        # the edited copy, not the installed package: -S skips the .pth of the editable install
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), sysconfig.get_paths()["purelib"]])}
        command = [sys.executable, "-S", "-c", build, str(manifest), str(REFERENCE), str(tmp_path / "report")]
        proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
        where, cache = proc.stdout.strip().splitlines()[-2:]
        assert where == str(package / "osref" / "__init__.py")
        cache = json.loads(cache)
        return cache["plots_drawn"], cache["plots_reused"]

    assert plots_drawn_and_reused() == (4, 0)
    for module in ("html.py", "entry.py", "tables.py"):
        with open(package / "osref" / "report" / module, "a") as fh:
            fh.write("\n# an edit that is not plotting code\n")
    assert plots_drawn_and_reused() == (0, 4)
    with open(package / "osref" / "report" / "plots.py", "a") as fh:
        fh.write("\n# an edit of the plotting code\n")
    assert plots_drawn_and_reused() == (4, 0)


def test_training_logs_are_folded_in(tmp_path):
    from osref.report import training_log, training_summary

    metrics = tmp_path / "train_metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps(
                {
                    "iteration": i,
                    "consumed_tokens": i * 10,
                    "loss": 10.0 - i,
                    "lr": 0.001 * i,
                    "grad_norm": 1.0,
                    "tokens_per_s": 100.0 + i,
                }
            )
            + "\n"
            for i in range(1, 8)
        )
    )
    valid = tmp_path / "valid_metrics.jsonl"
    valid.write_text(json.dumps({"iteration": 7, "consumed_tokens": 70, "valid_loss": 3.5}) + "\n")
    from osref.contracts import ReportManifest, ReportRun

    runs = (
        ReportRun(
            run_id="r",
            checkpoint_iters=(),
            eval_files=(),
            train_metrics=str(metrics),
            valid_metrics=str(valid),
            global_batch_size=1,
            seq_length=10,
        ),
        ReportRun(
            run_id="not-started", checkpoint_iters=(), eval_files=(), train_metrics=str(tmp_path / "absent.jsonl")
        ),
    )
    manifest = ReportManifest(protocol=(), runs=runs)
    log = training_log(manifest)
    assert list(log["iteration"]) == list(range(1, 8)) and set(log["run_id"]) == {"r"}
    summary = training_summary(manifest, log).set_index("run_id")
    assert summary.loc["r", "trained_iterations"] == 7
    assert summary.loc["r", "train_loss_last5"] == pytest.approx((7 + 6 + 5 + 4 + 3) / 5)
    assert summary.loc["r", "valid_loss"] == 3.5 and summary.loc["r", "peak_lr"] == pytest.approx(0.007)
    assert summary.loc["r", "median_tokens_per_s"] == 104.0
    assert summary.loc["not-started", "trained_iterations"] == 0
