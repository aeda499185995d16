"""The reduced demo shared by the end-to-end tests (local and through Slurm): its config and the
outputs every complete run of it must leave on disk."""

import csv
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "tiny-pydocs-30720-128"  # 30 iterations of 8 x 128 tokens
CHECKPOINTS = (10, 20, 30)


def reduced_demo_config(budget_iters: int = 30) -> dict:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"]["pydocs"]["max_documents"] = 400
    config["scales"]["tiny"]["num_layers"] = 2
    config["scales"]["tiny"]["resources"]["segment_iters"] = 10
    config["recipes"]["demo"].update({"warmup_iters": 4, "save_interval": 10, "log_interval": 2})
    config["experiments"][0]["budgets"] = [budget_iters * 8 * 128]
    config["evaluation"]["limit"] = 16
    return config


def assert_demo_outputs(demo: Path) -> None:
    """Three segment jobs, complete checkpoints, a falling loss, parity-checked exports, and a
    score for every checkpoint and task in the report."""
    run_dir = demo / "runs" / RUN_ID
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == [f"segment_{it:07d}.json" for it in CHECKPOINTS]
    for it in CHECKPOINTS:
        assert (run_dir / "checkpoints" / f"iter_{it:07d}" / "complete.json").exists()
    losses = [json.loads(line)["loss"] for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    for it in CHECKPOINTS:
        provenance = json.loads((run_dir / "hf" / f"iter_{it:07d}" / "provenance.json").read_text())
        assert provenance["iteration"] == it
        assert provenance["parity"]["max_abs_logit_diff"] < provenance["parity"]["tolerance"]
    with open(demo / "report" / "results.csv", newline="") as fh:
        cells = {(int(r["iteration"]), r["task"]) for r in csv.DictReader(fh) if r["source"] == "ours"}
    for it in CHECKPOINTS:
        assert {(it, "demo_lastword"), (it, "demo_continuation")} <= cells
    assert (demo / "report" / "index.html").stat().st_size > 10_000
