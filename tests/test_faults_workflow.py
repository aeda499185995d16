"""Faults of the whole workflow, on the local executor (profiles/local, 2 cores): what a user sees
and what is left on disk. The Slurm counterparts (scancel of a running segment, a TIMEOUT and its
retry) are in tests/slurm/test_slurm_tier.py; these two need no Slurm because what they test is
Snakemake's bookkeeping and the stages' atomic outputs, which are the same under any executor, and
the local executor makes them ~2x cheaper.

* SIGKILL of Snakemake (and its running jobs, as when the session or machine dies) mid-grid, then
  `--unlock` and `--rerun-incomplete`: the demo completes, and an integrity sweep finds nothing
  that looks complete but is not. This test is also the end-to-end test of `make demo` (the same
  profile and config, at a reduced size).
* An export that fails its parity gate: that job fails, `--keep-going` finishes the rest of the
  grid, and `report_partial` shows the hole.
"""

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import snakemake_cmd
from demo_pipeline import CHECKPOINTS, RUN_ID, assert_demo_outputs, reduced_demo_config

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1500


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    print(f"snakemake {' '.join(cmd[3 : cmd.index('-s')])}: rc {proc.returncode} in {time.monotonic() - t0:.0f} s")
    return proc


def assert_integrity(demo: Path, scratch: Path) -> None:
    """Everything on disk that looks complete is complete and readable:
    every tokenized .bin/.idx pair opens in megatron's IndexedDataset with its manifest's counts,
    every checkpoint directory holds complete.json and loads, every export loads in transformers
    and carries its provenance, every evaluation JSON parses, and no temporary file is left over."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    leftovers = [p for p in demo.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp")]
    assert not leftovers, leftovers

    work = demo.parents[1]  # the Snakemake working directory: the manifests' paths are relative to it
    manifests = sorted((demo / "data" / "tokenized").glob("*/manifest.json"))
    assert manifests
    for manifest_path in manifests:
        manifest = json.loads(manifest_path.read_text())
        groups = {str(work / g["stats"].removesuffix(".stats.json")): g for g in manifest["per_group"]}
        on_disk = {str(p.with_suffix("")) for p in manifest_path.parent.glob("*.bin")}
        assert on_disk == set(groups), (on_disk, groups)  # no pair outside the manifest, none missing
        for prefix, group in groups.items():
            assert Path(f"{prefix}.idx").exists(), prefix
            dataset = IndexedDataset(prefix, mmap=True)
            assert len(dataset) == group["documents"], prefix
            assert int(dataset.sequence_lengths.sum()) == group["tokens"], prefix
            assert Path(f"{prefix}.bin").stat().st_size == group["tokens"] * 2, prefix  # uint16
        assert manifest["tokens"] == sum(g["tokens"] for g in groups.values())

    for run_dir in sorted((demo / "runs").iterdir()):
        checkpoints = sorted((run_dir / "checkpoints").glob("iter_*"))
        for ckpt in checkpoints:
            complete = json.loads((ckpt / "complete.json").read_text())  # fails on a torn checkpoint
            assert complete["iteration"] == int(ckpt.name[5:]), complete
            out = scratch / f"{run_dir.name}-{ckpt.name}.pt"
            dcp_to_torch_save(str(ckpt), str(out))
            state = torch.load(out, weights_only=False)
            assert any(isinstance(v, torch.Tensor) and v.numel() for v in state.values()), ckpt
            out.unlink()
        saved = {p.name for p in checkpoints}
        for hf_dir in sorted((run_dir / "hf").glob("iter_*")):
            assert hf_dir.name in saved, hf_dir
            provenance = json.loads((hf_dir / "provenance.json").read_text())
            assert provenance["parity"]["max_abs_logit_diff"] <= provenance["parity"]["tolerance"]
            model = AutoModelForCausalLM.from_pretrained(hf_dir)
            assert sum(p.numel() for p in model.parameters()) > 0
        for eval_json in sorted((run_dir / "eval").rglob("*.json")):
            payload = json.loads(eval_json.read_text())
            assert payload["run_id"] == run_dir.name and payload["tasks"], eval_json


@pytest.mark.slow
def test_demo_survives_sigkill_of_snakemake_and_rerun_incomplete(tmp_path):
    """The reduced demo through profiles/local (= `make demo` at a reduced size). Snakemake's whole
    process group is SIGKILLed while the second training segment writes its checkpoint (other jobs
    run beside it): no cleanup runs, the lock stays. `snakemake --unlock`, then the same command with
    `--rerun-incomplete`, finishes the demo; then the integrity sweep."""
    config = tmp_path / "demo_small.yaml"
    config.write_text(yaml.safe_dump(reduced_demo_config()))
    work = tmp_path / "work"
    demo = work / "results" / "demo"
    ckpt = demo / "runs" / RUN_ID / "checkpoints" / f"iter_{CHECKPOINTS[1]:07d}"
    log = (tmp_path / "killed_run.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        snakemake_cmd(work, config),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        while proc.poll() is None and not ckpt.exists() and time.monotonic() - t0 < TIMEOUT_S:
            time.sleep(0.2)
        assert proc.poll() is None, "the demo finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    print(
        f"SIGKILL after {time.monotonic() - t0:.0f} s, at {ckpt.name} "
        f"({'complete' if (ckpt / 'complete.json').exists() else 'being written'})"
    )
    assert not (demo / "report" / "index.html").exists()
    assert any((work / ".snakemake" / "locks").iterdir()), "a killed Snakemake leaves its lock"

    locked = run(snakemake_cmd(work, config))
    assert locked.returncode != 0 and "LockException" in locked.stdout + locked.stderr, locked.stderr[-3000:]
    unlock = run(snakemake_cmd(work, config, "--unlock"))
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    resumed = run(snakemake_cmd(work, config, "--rerun-incomplete"))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-6000:]
    assert_demo_outputs(demo)
    assert sorted(p.name for p in (demo / "runs" / RUN_ID / "checkpoints").glob("iter_*")) == [
        f"iter_{it:07d}" for it in CHECKPOINTS
    ]
    assert_integrity(demo, tmp_path)


@pytest.mark.slow
def test_failed_parity_gate_leaves_a_hole_the_partial_report_shows(tmp_path):
    """Two runs of 10 iterations (the second one an experiment with a run-id suffix); the second has
    a parity tolerance no real export meets (1e-12 on max |Δlogit|, fp32 CPU noise is ~1e-6), set
    the way a user would: `overrides: {run: {parity_tolerance: ...}}`. Its export fails the gate for
    real and leaves nothing; `--keep-going` still trains both runs and exports and evaluates the
    first; the full report cannot be built, `report_partial` can, and lists exactly the failed run's
    cells as missing."""
    good, bad = "tiny-pydocs-10240-128", "tiny-pydocs-10240-128-strict"
    demo_config = reduced_demo_config(budget_iters=10)
    demo_config["experiments"].append({**demo_config["experiments"][0], "name": "strict", "suffix": "strict"})
    demo_config["overrides"] = {bad: {"parity_tolerance": 1e-12}}
    config = tmp_path / "two_runs.yaml"
    config.write_text(yaml.safe_dump(demo_config))
    work = tmp_path / "work"
    demo = work / "results" / "demo"

    proc = run(snakemake_cmd(work, config, "--keep-going"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    export_log = (demo / "logs" / "export" / bad / "iter_0000010.log").read_text()
    assert "PARITY FAILURE" in export_log and "tolerance" in export_log, export_log[-2000:]
    assert not (demo / "runs" / bad / "hf" / "iter_0000010").exists()
    assert "Error in rule export_hf" in output
    # the rest of the grid went on: the failing run was trained, the other one exported and evaluated
    assert json.loads((demo / "runs" / bad / "train" / "segment_0000010.json").read_text())["iteration"] == 10
    assert (demo / "runs" / good / "hf" / "iter_0000010" / "provenance.json").exists()
    assert len(list((demo / "runs" / good / "eval" / "iter_0000010").glob("*.json"))) == 2
    assert not (demo / "report" / "index.html").exists()

    partial = run(snakemake_cmd(work, config, "report_partial"))
    assert partial.returncode == 0, partial.stdout[-3000:] + partial.stderr[-3000:]
    report = demo / "report_partial"
    with open(report / "missing.csv", newline="") as fh:
        missing = {(r["run_id"], int(r["iteration"]), r["task"]) for r in csv.DictReader(fh)}
    tasks = ("demo_lastword", "demo_continuation")
    assert missing == {(bad, 10, task) for task in tasks}, missing
    with open(report / "results.csv", newline="") as fh:
        ours = {(r["run_id"], int(r["iteration"]), r["task"]) for r in csv.DictReader(fh) if r["source"] == "ours"}
    assert {(good, 10, task) for task in tasks} <= ours and not any(r[0] == bad for r in ours), ours
    html = (report / "index.html").read_text()
    assert "Missing cells" in html and bad in html.split("Missing cells", 1)[1]
    # up to date: asking again does nothing, since the set of evaluation files has not changed
    again = run(snakemake_cmd(work, config, "report_partial"))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]
