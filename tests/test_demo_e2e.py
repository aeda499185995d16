"""End to end: the demo pipeline through Snakemake on a reduced size (real tokenizer, real
megatron-core training, real HF export behind the parity gate, real lm-eval, the report)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demo_pipeline import assert_demo_outputs, reduced_demo_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    config = tmp_path / "demo_small.yaml"
    config.write_text(yaml.safe_dump(reduced_demo_config()))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path / "work"),
         "--profile", str(ROOT / "profiles" / "local"), "--cores", "2", "--configfile", str(config)],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert_demo_outputs(tmp_path / "work" / "results" / "demo")
