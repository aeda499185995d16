"""`snakemake --lint` on the shipped configs, failing on any finding that is not justified below.

Part of the style gate (`make lint`, run by .ci/run before the tests). Snakemake has no way to
silence one finding in a rule file, so the findings that stay are listed here, each with the reason
it stays; anything else fails the gate, naming the rule, file and finding:

    python scripts/lint_workflow.py                                  # release, demo and released configs
    python scripts/lint_workflow.py --configfile config/demo.yaml    # one config
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from osref.paths import REPO_ROOT

CONFIGS = (None, "config/demo.yaml", "config/released.yaml")  # None: the release grid (config/config.yaml)

# finding title (as snakemake prints it, up to the colon) -> why it stays
JUSTIFIED = {
    "Specify a conda environment or container for each rule.": (
        "one environment for every rule by design: `make env` installs envs/requirements.lock.txt, and "
        "on a cluster the whole job runs in cluster.container (envs/osref.def); per-rule environments "
        "would be a dozen copies of torch + megatron-core to keep in step"
    ),
    "Shell command directly uses variable PYTHON from outside of the rule": (
        "the interpreter running Snakemake (or the container's python); as a rule param it would be a "
        "rerun trigger: another venv path would rerun every finished job of a campaign, and it is not "
        "provenance of any output (the software versions are recorded in the outputs)"
    ),
    "Shell command directly uses variable SCRIPTS from outside of the rule": (
        "this checkout's scripts/ folder; as a param, moving the checkout would rerun every finished job"
    ),
    "Shell command directly uses variable BAD_DOCUMENTS_ARGS from outside of the rule": (
        "the tokenizer's bad-row policy stays out of params on purpose (workflow/rules/tokenize.smk): "
        "changing it must not rerun finished groups, whose bytes are the same under either policy"
    ),
}

_RULE = re.compile(r"^Lints for (.+?):$")
_FINDING = re.compile(r"^    \* (.+?):?$")


@dataclass(frozen=True)
class Finding:
    where: str  # "rule train_segment (line 18, .../train.smk)"
    title: str


def parse_lints(text: str) -> list[Finding]:
    """The findings of `snakemake --lint` (text output): one per rule and title."""
    findings, where = [], None
    for line in text.splitlines():
        if match := _RULE.match(line):
            where = match.group(1)
        elif where is not None and (match := _FINDING.match(line)):
            findings.append(Finding(where, match.group(1).rstrip(":")))
    return findings


def unjustified(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.title not in JUSTIFIED]


def lint(configfile: str | None) -> tuple[list[Finding], str]:
    """Run `snakemake --lint` on one config (in a scratch working directory); (findings, output)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--lint"]
    if configfile:
        command += ["--configfile", str(REPO_ROOT / configfile)]
    with tempfile.TemporaryDirectory(prefix="osref-lint-") as work:
        proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    findings = parse_lints(output)
    if proc.returncode != 0 and not findings:
        raise SystemExit(f"snakemake --lint ({configfile or 'config/config.yaml'}) failed:\n{output}")
    return findings, output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configfile", action="append", help="a config to lint (default: the three shipped)")
    args = parser.parse_args(argv)
    failed = False
    for configfile in args.configfile or CONFIGS:
        findings, _ = lint(configfile)
        bad = unjustified(findings)
        name = configfile or "config/config.yaml"
        print(f"snakemake --lint {name}: {len(findings)} findings, {len(findings) - len(bad)} of them justified")
        for finding in bad:
            print(f"  {finding.where}: {finding.title}", file=sys.stderr)
        failed |= bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
