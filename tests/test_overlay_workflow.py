"""The overlay through Snakemake, as the README writes it: the release config plus
config/examples/my-dataset.yaml (plan, dry-run, the epochs warning before tokenization, the dry-run
summary) and, end to end at demo scale, config/demo.yaml plus config/examples/my-dataset-demo.yaml to
the report."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from demo_pipeline import reduced_demo_config
from test_workflow import job_counts

ROOT = Path(__file__).resolve().parent.parent
OVERLAY = "config/examples/my-dataset.yaml"
USER_RUN = "0.13b-my-dataset-300B-4096"


def run(args: list[str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", *args])


def test_overlay_dry_run_warns_once_before_tokenization(tmp_path):
    """`snakemake --profile local -n --configfile config/config.yaml config/examples/my-dataset.yaml`:
    only the user's run is scheduled (the references are not retrained), and before anything is
    tokenized the dry-run warns once, naming the dataset, its size, the run's tokens and the epochs,
    and the recipe values that differ from the 0.13B C4 reference run."""
    proc = snakemake("--profile", "local", "-n", "-d", str(tmp_path), "--configfile", "config/config.yaml", OVERLAY)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    counts = job_counts(output)
    assert counts["train_segment"] == 1 and counts["list_dataset"] == 1 and counts["tokenize_group"] == 1
    assert "dataset=c4" not in output and USER_RUN in output
    size = (ROOT / "assets" / "demo-corpus" / "pydocs311_rst_corpus.jsonl.zst").stat().st_size
    warning = (
        f"WARNING {USER_RUN}: needs 180,431.7 epochs of my-dataset (more than plan.warn_epochs = 4): it trains "
        f"3e+11 tokens, my-dataset holds ~1.663e+06 (before tokenization: {size:.4g} bytes of local files x 0.69 "
        "tokens/byte (default for jsonl.zst))"
    )
    assert output.count(warning) == 1, output[-3000:]
    assert output.count("global_batch_size 1008 (reference 1024)") == 1


def test_a_job_does_not_repeat_the_plan_warnings(tmp_path):
    """Each Slurm job runs Snakemake again on the Snakefile (``--mode remote``); the warnings are for the
    person who starts the workflow, once, not for every one of a campaign's thousands of job logs."""
    args = ("-n", "-q", "rules", "--cores", "1", "-d", str(tmp_path), "--configfile", "config/config.yaml", OVERLAY)
    main, job = snakemake(*args), snakemake(*args, "--mode", "remote")
    assert main.returncode == 0 and job.returncode == 0, (main.stderr + job.stderr)[-3000:]
    assert f"WARNING {USER_RUN}: needs" in main.stderr
    assert "WARNING" not in job.stdout + job.stderr, job.stderr[-3000:]


def test_overlay_given_alone_plans_the_same_run(tmp_path):
    proc = snakemake("--profile", "local", "plan", "-d", str(tmp_path), "--configfile", OVERLAY)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(tmp_path / "results" / "plan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run_id"] for r in rows] == [USER_RUN]
    assert rows[0]["recipe_differences"].startswith("vs 0.13b-c4-300B-4096: cooldown_iters 14532 (reference 14305)")
    assert int(rows[0]["disk_checkpoint_bytes"]) == int(rows[0]["params"]) * 14 * 37


def test_dry_run_summary_runs_snakemake_itself(tmp_path):
    proc = run(
        [sys.executable, "scripts/dryrun_summary.py", "--profile", "local", "--", "-d", str(tmp_path),
         "--configfile", "config/config.yaml", OVERLAY]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[2:] if line.strip()}
    assert rows["train_segment"][:2] == ["-", "1"] and rows["plan"][:2] == ["local", "1"]
    bad = run([sys.executable, "scripts/dryrun_summary.py", "--from", str(tmp_path / "missing.txt")])
    assert bad.returncode == 2 and "missing.txt" in bad.stderr


def test_the_readme_overlay_commands_work_as_written(tmp_path):
    """Every command of the README's bash blocks that names an overlay, run from the repository root
    as written, only redirected to a scratch directory and made a dry-run (the plan commands run for
    real in tests/test_rerun_workflow.py)."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [
        line.split("#", 1)[0].strip()
        for block in blocks
        for line in block.splitlines()
        if "config/examples/" in line and "plan" not in shlex.split(line.split("#", 1)[0])
    ]
    assert len(commands) >= 4, commands
    env = {"OSR_SLURM_ACCOUNT": "acct", "OSR_SLURM_PARTITION": "cpu", "OSR_SLURM_GPU_PARTITION": "gpu"}
    for k, command in enumerate(commands):
        args = shlex.split(command)
        args = [sys.executable, *args[1:]] if args[0] == "python" else [sys.executable, "-m", *args]
        extra = ["-d", str(tmp_path / f"w{k}")] + ([] if "dryrun_summary.py" in command or "-n" in args else ["-n"])
        proc = subprocess.run(
            args + extra, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
        )
        assert proc.returncode == 0, f"{command}:\n{(proc.stdout + proc.stderr)[-3000:]}"


# ---- end to end at demo scale -------------------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_overlay_trains_evaluates_and_reports_the_new_dataset(tmp_path):
    """config/demo.yaml + config/examples/my-dataset-demo.yaml through Snakemake to the report, with the
    reduced demo's sizes (30 iterations): the new corpus's run is trained, evaluated and in the report's
    results.csv next to the demo's run."""
    base = tmp_path / "demo_small.yaml"
    base.write_text(yaml.safe_dump(reduced_demo_config(budget_iters=30)))
    overlay = yaml.safe_load((ROOT / "config" / "examples" / "my-dataset-demo.yaml").read_text())
    overlay["experiments"][0]["budgets"] = [30 * 8 * 128]  # the overlay's list replaces the base's
    overlay_path = tmp_path / "my-dataset-demo.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))
    work = tmp_path / "work"
    proc = run(
        [sys.executable, "-m", "snakemake", "report", "-d", str(work), "--profile", str(ROOT / "profiles" / "local"),
         "--cores", "2", "--configfile", str(base), str(overlay_path)],
        timeout=1800,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    demo = work / "results" / "demo"
    user_run = "tiny-pydocs-head-30720-128"
    stats = json.loads((demo / "data" / "tokenized" / "pydocs-head" / "group_000.stats.json").read_text())
    assert stats["documents"] == 60
    for shots in ("0shot", "2shot"):
        assert (demo / "runs" / user_run / "eval" / "iter_0000030" / f"{shots}.json").is_file()
    with open(demo / "report" / "results.csv", newline="") as fh:
        ours = [r for r in csv.DictReader(fh) if r["source"] == "ours"]
    cells = {(r["run_id"], int(r["iteration"]), r["task"]) for r in ours}
    for run_id in (user_run, "tiny-pydocs-30720-128"):
        assert {(run_id, 30, "demo_lastword"), (run_id, 30, "demo_continuation")} <= cells, run_id
    manifest = json.loads((demo / "report" / "manifest.json").read_text())
    assert {r["run_id"] for r in manifest["runs"]} == {user_run, "tiny-pydocs-30720-128"}

    # the report's answer: the new corpus's run against the demo's, at equal tokens, with intervals
    with open(demo / "report" / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pair = [r for r in rows if r["run_id"] == user_run and r["versus"] == "tiny-pydocs-30720-128"]
    assert {r["task"] for r in pair} >= {"demo_lastword", "demo_continuation"}, pair
    for row in pair:
        assert row["versus_source"] == "ours" and row["comparison"] == "equal tokens"
        assert int(row["iteration"]) == int(row["versus_iteration"]) == 30
        diff, low, high = float(row["diff"]), float(row["diff_ci_low"]), float(row["diff_ci_high"])
        assert low < diff < high, row
        assert abs(diff - (float(row["score"]) - float(row["versus_score"]))) < 1e-9
        assert row["verdict"] in {"better", "worse", "within noise"}, row
    mirrored = {r["task"]: r for r in rows if r["run_id"] == "tiny-pydocs-30720-128" and r["versus"] == user_run}
    for row in pair:
        assert abs(float(mirrored[row["task"]]["diff"]) + float(row["diff"])) < 1e-9

    # and the page a reader opens, in a real browser: drawn, no errors, the comparison first
    browser = _browser_checks()
    browser._check_screenshot(demo / "report" / "index.html", tmp_path / "shot")
    dom = browser._run_chromium(demo / "report" / "index.html", tmp_path / "dom-profile", "--dump-dom").stdout
    body = dom.split("<body>", 1)[1]
    assert body.index('id="comparison"') < body.index("<table") < body.index('id="references"')
    assert user_run in body.split('id="references"', 1)[0]
    assert 'class="plot-container plotly"' in dom


def _browser_checks():
    """tests/test_report_browser.py's helpers (skips, saying why, where Chromium is absent)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_browser_checks", ROOT / "tests" / "test_report_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._chromium()
    return module
