"""End to end: the demo pipeline through Snakemake on a reduced size (real tokenizer, real
megatron-core training, real HF export behind the parity gate, real lm-eval, the report)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def reduced_demo_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"]["pydocs"]["max_documents"] = 400
    config["scales"]["tiny"]["num_layers"] = 2
    config["scales"]["tiny"]["resources"]["segment_iters"] = 10
    config["recipes"]["demo"].update({"warmup_iters": 4, "save_interval": 10, "log_interval": 2})
    config["experiments"][0]["budgets"] = [30 * 8 * 128]  # 30 iterations of 8 x 128 tokens
    config["evaluation"]["limit"] = 16
    path = tmp_path / "demo_small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    config = reduced_demo_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path / "work"),
         "--profile", str(ROOT / "profiles" / "local"), "--cores", "2", "--configfile", str(config)],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    demo = tmp_path / "work" / "results" / "demo"
    run_dir = demo / "runs" / "tiny-pydocs-30720-128"

    # training: three segment jobs, a complete checkpoint at every save interval, a falling loss
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == [
        "segment_0000010.json", "segment_0000020.json", "segment_0000030.json"]
    for it in (10, 20, 30):
        assert (run_dir / "checkpoints" / f"iter_{it:07d}" / "complete.json").exists()
    losses = [json.loads(line)["loss"] for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    # export: parity measured and recorded for every evaluated checkpoint
    for it in (10, 20, 30):
        provenance = json.loads((run_dir / "hf" / f"iter_{it:07d}" / "provenance.json").read_text())
        assert provenance["iteration"] == it
        assert provenance["parity"]["max_abs_logit_diff"] < provenance["parity"]["tolerance"]

    # evaluation + report: a score for every checkpoint and task
    with open(demo / "report" / "results.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "ours"]
    cells = {(int(r["iteration"]), r["task"]) for r in rows}
    for it in (10, 20, 30):
        assert {(it, "demo_lastword"), (it, "demo_continuation")} <= cells
    assert (demo / "report" / "index.html").stat().st_size > 10_000
