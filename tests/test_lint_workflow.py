"""The style gate's `snakemake --lint` step fails on any finding that is not justified, naming it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lint_workflow.py"
spec = importlib.util.spec_from_file_location("lint_workflow", SCRIPT)
lint_workflow = importlib.util.module_from_spec(spec)
sys.modules["lint_workflow"] = lint_workflow  # dataclasses look their module up
spec.loader.exec_module(lint_workflow)

OUTPUT = """\
Lints for rule list_dataset (line 4, /repo/workflow/rules/download.smk):
    * Specify a conda environment or container for each rule.:
      This way, the used software for each specific step is documented, and the
    * Shell command directly uses variable PYTHON from outside of the rule:
      It is recommended to pass all files as input and output, and non-file

Lints for rule report (line 7, /repo/workflow/rules/report.smk):
    * Param out_dir is a prefix of input or output file but hardcoded:
      If this is meant to represent a file path prefix, it will fail when
"""


def test_findings_are_parsed_per_rule():
    findings = lint_workflow.parse_lints(OUTPUT)
    assert [(f.where.split(" (")[0], f.title) for f in findings] == [
        ("rule list_dataset", "Specify a conda environment or container for each rule."),
        ("rule list_dataset", "Shell command directly uses variable PYTHON from outside of the rule"),
        ("rule report", "Param out_dir is a prefix of input or output file but hardcoded"),
    ]


def test_only_the_justified_findings_pass():
    bad = lint_workflow.unjustified(lint_workflow.parse_lints(OUTPUT))
    assert [(f.where, f.title) for f in bad] == [
        (
            "rule report (line 7, /repo/workflow/rules/report.smk)",
            "Param out_dir is a prefix of input or output file but hardcoded",
        )
    ]
    assert all(reason for reason in lint_workflow.JUSTIFIED.values())
