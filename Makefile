# Two commands do all set-up on a fresh machine (Debian 12, Python 3.11, no GPU):
#   make demo   creates .venv and runs the whole pipeline on the embedded demo (results/demo/)
#   make test   creates .venv and runs the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: env demo test test-unit test-no-e2e lint plan dryrun dryrun-summary bench-dryrun clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml envs/requirements.lock.txt
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r envs/requirements.lock.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: env
	$(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml
	@echo "report: results/demo/report/index.html"

# `make test` is the whole suite, the Slurm tier included: it first starts the local Slurm of
# scripts/slurm_local.sh (root + apt: installs and starts it, ~20 s cold). Where that is impossible
# (not root, no apt, a failed start) the reason is printed and handed to the tests, which are then
# skipped with it (pytest -rs shows it). OSREF_SLURM_TESTS=0 make test skips the tier on purpose.
test: env
	@if [ "$${OSREF_SLURM_TESTS:-}" = 0 ]; then \
	    export OSREF_SLURM_UNAVAILABLE="OSREF_SLURM_TESTS=0 was set"; \
	elif out=$$(bash scripts/slurm_local.sh start 2>&1); then \
	    echo "$$out" | tail -n 1; export OSREF_SLURM_TESTS=1; \
	else \
	    rc=$$?; echo "$$out" | tail -n 20; \
	    export OSREF_SLURM_UNAVAILABLE="scripts/slurm_local.sh start failed (exit $$rc): $$(echo "$$out" | tail -n 1)"; \
	fi; \
	[ -z "$${OSREF_SLURM_UNAVAILABLE:-}" ] || echo "make test: the Slurm tier will be skipped: $$OSREF_SLURM_UNAVAILABLE"; \
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# The fast tests (~1 min on 2 cores): no torch model, no training, export, evaluation or Snakemake
# run (config, grid, plan, contracts, download/http against local servers, locks, report, statistics).
UNIT_TESTS := tests/test_config.py tests/test_contracts.py tests/test_shard_groups.py tests/test_download.py \
	tests/test_download_http.py tests/test_fingerprints.py tests/test_locks.py tests/test_run_identity.py \
	tests/test_report.py tests/test_report_comparison.py tests/test_compare.py tests/test_released_results.py \
	tests/test_lint_workflow.py tests/test_files.py tests/test_overlay.py tests/test_imports.py
UNIT_SKIP := --deselect tests/test_fingerprints.py::test_a_corpus_edited_in_place_is_re_tokenized_and_a_touched_one_is_not \
	--deselect tests/test_run_identity.py::test_the_training_script_refuses_to_resume_on_changed_data
test-unit: env
	$(BIN)/python -m pytest -q -rs -m "not slow and not slurm" $(UNIT_TESTS) $(UNIT_SKIP) $(PYTEST_ARGS)

# Everything but the end-to-end (slow) tests and the Slurm tier: tiny real models trained, exported
# and evaluated on the CPU, Snakemake dry-runs and small real runs (measured: see README, Tests).
test-no-e2e: env
	$(BIN)/python -m pytest -q -rs -m "not slow and not slurm" $(PYTEST_ARGS)

# The style gate (.ci/run runs it before the tests): ruff lint + format, snakefmt, snakemake --lint
# and a static type check of osref (mypy; its settings are [tool.mypy] in pyproject.toml)
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/mypy
	$(BIN)/python scripts/lint_workflow.py

# CONFIGFILES: e.g. make plan CONFIGFILES="config/config.yaml config/examples/my-dataset.yaml"
CONFIGFILES ?=
plan: env
	$(BIN)/snakemake plan --profile profiles/local $(if $(CONFIGFILES),--configfile $(CONFIGFILES))

dryrun: env
	$(BIN)/snakemake -n -q rules

# the release grid's slurm dry-run (~1 min) as one table: jobs per rule and partition
dryrun-summary: env
	$(BIN)/python scripts/dryrun_summary.py $(if $(CONFIGFILES),-- --configfile $(CONFIGFILES))

bench-dryrun: env
	$(BIN)/python scripts/bench_dryrun.py

clean-demo:
	rm -rf results/demo

# Slurm tier: a real local Slurm (2 fake nodes, slurmdbd accounting; root on Debian 12) and the
# workflow through profiles/slurm against it. `scripts/slurm_local.sh stop` shuts the cluster down.
.PHONY: test-slurm
test-slurm: env
	bash scripts/slurm_local.sh start
	OSREF_SLURM_TESTS=1 $(BIN)/python -m pytest -q -rs -m slurm tests/slurm $(PYTEST_ARGS)
