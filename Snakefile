# open-sci-ref 0.01, reproduced: download -> tokenize -> train -> export -> evaluate -> report.
#
# Paths (roots from config `paths`; the full layout is osref/paths.py):
#   {data}/raw/{dataset}/...                     listings and downloaded shard groups
#   {data}/tokenized/{dataset}/group_{g}.bin|idx Megatron binaries
#   {runs}/{run_id}/checkpoints/iter_{i}/        torch_dist checkpoints (never deleted by Snakemake)
#   {runs}/{run_id}/train/segment_{i}.json       one marker per training job
#   {runs}/{run_id}/hf/iter_{i}/                 Hugging Face exports (parity-checked)
#   {runs}/{run_id}/eval/iter_{i}/{k}shot.json   lm-eval results per shot set
#   {runs}/released/{name}/...                   released checkpoints: listing, fetched/, hf/, eval/
#   {results}/plan.csv, {results}/report/        the plan and the report
#
# Without --configfile the release grid (config/config.yaml) is used; the demo is
# `snakemake --configfile config/demo.yaml`; the released checkpoints `--configfile config/released.yaml`;
# your dataset next to the references: `--configfile config/config.yaml config/examples/my-dataset.yaml`.

from snakemake.utils import min_version

min_version("9.27")

import json
import sys

from osref.grid import load_grid
from osref.config import check_config_files, repo_relative, with_release_config
from osref.paths import repo_path
from osref.workflow import EVALUATE_WILDCARD_CONSTRAINTS, WILDCARD_CONSTRAINTS, WorkflowIndex

check_config_files(workflow.configfiles)  # Snakemake's own reading keeps the last of two equal keys
with_release_config(config)  # an overlay given alone goes on top of config/config.yaml

GRID = load_grid(config)  # schema + cross-field validation; a bad config stops here, naming the key
INDEX = WorkflowIndex(GRID)
LAYOUT = GRID.layout
SCRIPTS = repo_path("scripts")
PYTHON = INDEX.python  # the interpreter running Snakemake (its venv has osref installed)
if workflow.is_main_process:  # not again in every Slurm job (each job parses this file in remote mode)
    for _warning in INDEX.plan_warnings():  # epochs before tokenization, recipe differences: before any job
        print(_warning, file=sys.stderr)


wildcard_constraints:
    **WILDCARD_CONSTRAINTS,


include: "workflow/rules/download.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/released.smk"


# Exports and evaluations are targets in their own right: Snakemake does not rebuild a missing
# intermediate file whose consumers are up to date, so without them a deleted export or evaluation
# would stay deleted (a rebuilt export is a new input: its evaluations and the report rerun).
rule all:
    default_target: True
    input:
        rules.report.output if GRID.runs or GRID.released else [],
        rules.plan.output,
        [LAYOUT.tokenized_manifest(d) for d in GRID.datasets_in_use],
        INDEX.exports,
        INDEX.evaluations,
        INDEX.released_evaluations,  # listed, not only behind released_results: a new one is always made
        INDEX.released_results,
