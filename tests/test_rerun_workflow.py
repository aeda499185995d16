"""Rerun what is missing, on the local executor with the `make demo` command (profiles/local) at a
reduced size (one checkpoint): a real Ctrl-C (SIGINT to Snakemake's process group, as a terminal
sends it) and the same command again; then a deleted export and a deleted evaluation, rebuilt by
the default target; and no `plan` job re-scheduled once the data exists."""

import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from demo_pipeline import reduced_demo_config
from test_faults_workflow import TIMEOUT_S, run, snakemake_cmd
from test_workflow import job_counts

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "tiny-pydocs-10240-128"  # 10 iterations, one checkpoint
ITERATION = "iter_0000010"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> SimpleNamespace:
    """The demo, Ctrl-C while the report writes its outputs, then the same command again."""
    tmp = tmp_path_factory.mktemp("rerun")
    config = tmp / "demo_small.yaml"
    config.write_text(yaml.safe_dump(reduced_demo_config(budget_iters=10)))
    work = tmp / "work"
    demo = work / "results" / "demo"
    cmd = snakemake_cmd(work, config)
    log_path = tmp / "interrupted.log"
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # the report's cache folder is made first thing when it builds (before any table, plot or
        # index.html): a SIGINT then leaves ~2 s of report unwritten (results.csv came ~1 s before the
        # end, a window a loaded machine could miss)
        try:
            while (
                proc.poll() is None and not (demo / "report" / ".cache").exists() and time.monotonic() - t0 < TIMEOUT_S
            ):
                time.sleep(0.1)
            assert proc.poll() is None, f"the demo ended before the report started:\n{log_path.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGINT)
        finally:
            first_rc = proc.wait(timeout=300)
    print(f"SIGINT after {time.monotonic() - t0:.0f} s")
    incomplete_dir = work / ".snakemake" / "incomplete"
    state = SimpleNamespace(
        work=work,
        demo=demo,
        cmd=cmd,
        config=config,
        first_rc=first_rc,
        first_log=log_path.read_text(),
        incomplete=sorted(p.name for p in incomplete_dir.iterdir()) if incomplete_dir.is_dir() else [],
        html_after_interrupt=(demo / "report" / "index.html").exists(),
    )
    state.resumed = run(cmd)
    return state


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_resumes(interrupted):
    assert interrupted.first_rc != 0 and "Terminating processes on user request" in interrupted.first_log
    assert interrupted.incomplete and not interrupted.html_after_interrupt  # the report was cut short
    resumed = interrupted.resumed
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "IncompleteFilesException" not in output
    assert (interrupted.demo / "report" / "index.html").stat().st_size > 10_000
    # only the interrupted report ran again; in particular `plan`, written before the data existed,
    # was not re-scheduled although the tokenized counts it reports now exist
    assert job_counts(output) == {"report": 1, "all": 1}, output[-4000:]


@pytest.mark.slow
def test_deleted_export_and_evaluation_are_rebuilt_by_the_default_target(interrupted):
    if interrupted.resumed.returncode != 0:  # independent of the test above
        assert run(interrupted.cmd + ["--rerun-incomplete"]).returncode == 0
    run_dir = interrupted.demo / "runs" / RUN_ID
    export, evaluation = run_dir / "hf" / ITERATION, run_dir / "eval" / ITERATION / "0shot.json"
    report = interrupted.demo / "report" / "index.html"
    before = report.stat().st_mtime_ns
    shutil.rmtree(export)
    evaluation.unlink()

    proc = run(interrupted.cmd)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    # the export, both shot sets of that checkpoint (their input is new) and the report
    assert job_counts(output) == {"export_hf": 1, "evaluate_shots": 2, "report": 1, "all": 1}, output[-4000:]
    assert (export / "provenance.json").is_file() and (export / "config.json").is_file()
    assert evaluation.is_file() and report.stat().st_mtime_ns > before
    again = run(interrupted.cmd + ["-n"])
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]


def readme_commands(word: str) -> list[str]:
    """The `snakemake ... <word> ...` lines of the README's bash blocks, comments stripped."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("snakemake") and word in shlex.split(line)]


def test_plan_works_as_the_readme_writes_it(tmp_path):
    commands = readme_commands("plan")
    assert commands, "the README shows no plan command"
    for command in commands:  # run from the repository root, only the working directory redirected
        work = tmp_path / f"w{commands.index(command)}"
        proc = subprocess.run(
            [*shlex.split(command), "-d", str(work)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        )
        assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
        runs = 1 if "config/examples/my-dataset.yaml" in command else 36  # the overlay: the user's run only
        assert len((work / "results" / "plan.csv").read_text().splitlines()) == 1 + runs


def test_plan_is_not_rescheduled_once_the_data_exists(tmp_path):
    """plan.csv written before tokenization; tokenizing fills the counted-token columns of the plan
    rows, which must not make the next run schedule `plan` again."""
    config = tmp_path / "demo_small.yaml"
    config.write_text(yaml.safe_dump(reduced_demo_config(budget_iters=10)))
    work = tmp_path / "work"
    assert run(snakemake_cmd(work, config, "plan")).returncode == 0
    with open(work / "results" / "demo" / "plan.csv", newline="") as fh:
        # a local corpus: estimated from its files' bytes until it is tokenized
        assert next(csv.DictReader(fh))["dataset_tokens_source"].startswith("before tokenization: ")
    assert run(snakemake_cmd(work, config, "tokenize")).returncode == 0
    dry = run(snakemake_cmd(work, config, "plan", "-n"))
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]
    forced = run(snakemake_cmd(work, config, "plan", "-f"))  # the README's refresh
    assert forced.returncode == 0
    with open(work / "results" / "demo" / "plan.csv", newline="") as fh:
        assert next(csv.DictReader(fh))["dataset_tokens_source"] == "tokenized"
