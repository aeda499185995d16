"""A dry-run in one screen: jobs per rule and partition, with what they ask of the cluster.

``snakemake --profile slurm -n`` of the release grid prints every one of its ~8 000 jobs (91 000
lines): right for checking one job, useless for "what will this cost the cluster?". This module reads
that output — each ``rule NAME:`` block and its ``resources:`` line (``slurm_partition``, ``nodes``,
``gres``, ``runtime``) — and sums it per rule and partition. Rules marked ``localrule: True`` in
``workflow/rules/*.smk`` run where Snakemake runs (the login node), whatever partition the profile's
default resources name, and are shown as ``local``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

from osref.paths import REPO_ROOT

_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_RESOURCE = re.compile(r"(\w+)=([^,]*)(?:,\s*|$)")


@dataclasses.dataclass
class RuleSummary:
    """The jobs of one rule on one partition."""

    rule: str
    partition: str
    jobs: int = 0
    nodes: list[int] = dataclasses.field(default_factory=list)
    gpus_per_node: list[int] = dataclasses.field(default_factory=list)
    runtime_min: list[int] = dataclasses.field(default_factory=list)

    @property
    def node_hours(self) -> float:
        """Requested node-hours: the sum over jobs of nodes x walltime (an upper bound)."""
        return sum(n * m for n, m in zip(self.nodes, self.runtime_min, strict=True)) / 60


def local_rules(rule_files: Iterable[Path] | None = None) -> set[str]:
    """Rules with ``localrule: True`` in the workflow's rule files (and ``all``, which runs nothing)."""
    files = rule_files if rule_files is not None else sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk"))
    local, current = {"all"}, None
    for path in files:
        for line in Path(path).read_text().splitlines():
            match = re.match(r"^rule (\w+):", line)
            if match:
                current = match.group(1)
            elif current and line.strip() == "localrule: True":
                local.add(current)
    return local


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:  # "<TBD>" (a resource computed from inputs) or a literal "$VAR"
        return default


def summarize(output: str, local: set[str] | None = None) -> list[RuleSummary]:
    """Per (rule, partition), in order of first appearance, from a ``snakemake -n`` output."""
    local = local_rules() if local is None else local
    table: dict[tuple[str, str], RuleSummary] = {}
    rule: str | None = None
    resources: dict[str, str] = {}

    def close() -> None:
        if rule is None:
            return
        partition = "local" if rule in local else resources.get("slurm_partition", "-")
        row = table.setdefault((rule, partition), RuleSummary(rule, partition))
        row.jobs += 1
        row.nodes.append(_int(resources.get("nodes"), 1))
        gres = resources.get("gres", "")
        row.gpus_per_node.append(_int(gres.rsplit(":", 1)[-1], 0) if gres.startswith("gpu") else 0)
        row.runtime_min.append(_int(resources.get("runtime"), 0))

    for line in output.splitlines():
        match = _RULE.match(line.strip())
        if match:
            close()
            rule, resources = match.group(1), {}
        elif rule is not None and line.strip().startswith("resources:"):
            resources = dict(_RESOURCE.findall(line.strip()[len("resources:") :].strip()))
    close()
    return list(table.values())


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _hours(minutes: list[int]) -> str:
    low, high = min(minutes) / 60, max(minutes) / 60
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def format_table(rows: list[RuleSummary]) -> str:
    """The summary as text: one line per rule and partition, then the totals per partition."""
    header = f"{'rule':28s} {'partition':12s} {'jobs':>7s} {'nodes/job':>9s} {'GPUs/node':>9s} {'walltime h':>10s} {'node-h':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.partition == "local":  # runs inside Snakemake's own process or node: no allocation
            lines.append(f"{r.rule:28s} {r.partition:12s} {r.jobs:7d} {'-':>9s} {'-':>9s} {'-':>10s} {'-':>10s}")
            continue
        lines.append(
            f"{r.rule:28s} {r.partition:12s} {r.jobs:7d} {_span(r.nodes):>9s} {_span(r.gpus_per_node):>9s} "
            f"{_hours(r.runtime_min):>10s} {r.node_hours:10,.0f}"
        )
    lines.append("-" * len(header))
    partitions: dict[str, list[RuleSummary]] = {}
    for r in rows:
        partitions.setdefault(r.partition, []).append(r)
    for name, group in partitions.items():
        hours = "-" if name == "local" else f"{sum(r.node_hours for r in group):,.0f}"
        lines.append(
            f"{'total':28s} {name:12s} {sum(r.jobs for r in group):7d} {'':>9s} {'':>9s} {'':>10s} {hours:>10s}"
        )
    lines.append(f"{'total':28s} {'':12s} {sum(r.jobs for r in rows):7d}")
    lines.append("node-h: nodes x walltime requested per job, summed (an upper bound: jobs end early)")
    return "\n".join(lines)
