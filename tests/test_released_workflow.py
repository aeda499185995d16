"""Released checkpoints as a source of runs: the config, the shipped mapping, the plan, the DAG.

* the mapping of the 36 reference runs and the config's bad inputs (each stops before any job, naming
  the key, file line or closest name);
* golden: the offline dry-run and the plan of `snakemake --configfile config/released.yaml`
  (every released checkpoint of the 36 reference runs);
* end to end (slow): a synthetic released repo in the release's layout on the local hub, through
  real Snakemake: list, fetch, convert, evaluate on the demo's local tasks, results; the remote code
  is stored but never run; the fetched copies are gone; a rerun has nothing to do.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import snakemake_cmd
from demo_pipeline import reduced_demo_config
from hub_server import HubServer
from released_repo import other_repo, released_repo
from test_workflow import job_counts, snakemake

from osref.config import ConfigError, load_config
from osref.grid import load_grid
from osref.plan import plan_rows

ROOT = Path(__file__).resolve().parent.parent
RELEASED_YAML = ROOT / "config" / "released.yaml"


def released_config(**released) -> dict:
    config = yaml.safe_load(RELEASED_YAML.read_text())
    config["released"].update(released)
    return config


# ---- the shipped mapping -------------------------------------------------------------------------


def test_the_mapping_names_a_repo_for_each_of_the_36_reference_runs():
    grid = load_grid(released_config())
    models = grid.released
    with open(ROOT / "config" / "reference" / "runs.csv", newline="") as fh:
        references = {r["run_id"] for r in csv.DictReader(fh) if r["reference"] == "True"}
    assert len(models) == 36 and {m.reference_run for m in models.values()} == references
    # the names are the release grid's run ids, so a run of ours and its released twin line up
    assert set(models) == set(load_grid(load_config(ROOT / "config" / "config.yaml")).runs)
    assert all(m.repo.startswith("open-sci/open-sci-ref-v0.01-") for m in models.values())
    statuses = {s: sorted(n for n, m in models.items() if m.repo_status == s) for s in ("seen", "inferred")}
    assert len(statuses["seen"]) == 16 and len(statuses["inferred"]) == 20
    # the iterations come from the spec: every save interval below train_iters, main for the last
    assert sum(len(m.iterations) for m in models.values()) == 1562
    c4 = models["0.13b-c4-300B-4096"]  # GBS 1024: 71 526 iterations, last branch iter_0070000
    assert (len(c4.iterations), c4.revision(70000), c4.revision(71526)) == (36, "iter_0070000", "main")
    assert len(models["1.7b-dclm-1T-4096"].iterations) == 122 and len(models["1.3b-c4-50B-4096"].iterations) == 13
    assert models["1.7b-dclm-300B-4096"].params == 1714377728  # the same count as the training plan's


def test_schema_default_protocol_is_the_release_config_protocol():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    default = schema["properties"]["evaluation"]["properties"]["protocols"]["default"]
    release = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["evaluation"]["protocols"]
    assert default == release


BAD_RELEASED = {
    "name not in the mapping": (
        {"models": ["0.13b-dclm-300B-4069"]},
        "released.models[0]: '0.13b-dclm-300B-4069' is not a name in config/released_models.csv "
        "(closest: 0.13b-dclm-300B-4096",
    ),
    "iteration that was never saved": (
        {"models": [{"name": "0.13b-dclm-300B-4096", "iterations": [2000, 72000, 72001]}]},
        "released.models[0] (config/released_models.csv:4).iterations: [72001] are not saved iterations "
        "(every 2000 and the last, 72661); closest saved: [72000]",
    ),
    "section default iteration that was never saved": (
        {"models": ["0.13b-dclm-300B-4096"], "iterations": [3000]},
        "released.iterations: [3000] are not saved iterations (every 2000 and the last, 72661); closest saved: [2000]",
    ),
    "repo outside the mapping without its shape": (
        {"models": [{"name": "mine", "repo": "me/my-model", "save_interval": 1000}]},
        "released.models[0]: released model 'mine' lacks train_iters, global_batch_size, seq_length, params",
    ),
    "unknown reference run": (
        {"models": [{"name": "mine", "repo": "me/my-model", "save_interval": 1000, "reference_run": 123}]},
        "released.models[0].reference_run: reference_run 123 is not a run_id or slurm_job_id",
    ),
    "extra task already in the protocol": (
        {"models": "all", "extra_tasks": [{"task": "hellaswag", "shots": 10, "metric": "acc_norm"}]},
        "released.extra_tasks[0]: hellaswag 10-shot is already in the protocol",
    ),
    "unknown extra task": (
        {"models": "all", "extra_tasks": [{"task": "hellaswagg", "shots": 0, "metric": "acc"}]},
        "released.extra_tasks[0].task: unknown eval task 'hellaswagg'",
    ),
    "duplicate model": (
        {"models": ["0.4b-pile-300B-4096", {"name": "0.4b-pile-300B-4096", "iterations": "final"}]},
        "released.models[1] (config/released_models.csv:16): released model '0.4b-pile-300B-4096' is also "
        "released.models[0] (config/released_models.csv:16)",
    ),
    "nothing at all": ({"models": []}, "experiments: empty, and released.models names no released model"),
    "misspelt key": ({"model": "all"}, "released: unknown key 'model'"),
}


@pytest.mark.parametrize("kind", BAD_RELEASED)
def test_bad_released_config_is_refused_naming_the_key(kind):
    section, expected = BAD_RELEASED[kind]
    config = released_config()
    config["released"] = {**{k: v for k, v in config["released"].items() if k != "models"}, **section}
    with pytest.raises(ConfigError) as error:
        load_grid(config)
    assert expected in str(error.value)


def test_a_malformed_mapping_line_is_named(tmp_path):
    mapping = tmp_path / "mapping.csv"
    lines = (ROOT / "config" / "released_models.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",seen,", ",maybe,")
    mapping.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"{mapping}:4: repo_status 'maybe' is not one of"):
        load_grid(released_config(mapping=str(mapping)))


def test_a_repo_outside_the_mapping_with_a_reference_run():
    grid = load_grid(
        released_config(
            models=[
                {
                    "name": "dclm-lr6e-3",
                    "repo": "open-sci/open-sci-ref-v0.01-0.13b-dclm-300B-4096-lr0.006-2",
                    "save_interval": 2000,
                    "reference_run": 14333760,
                    "iterations": {"every": 10},
                }
            ]
        )
    )
    model = grid.released["dclm-lr6e-3"]
    assert (model.repo_status, model.train_iters, model.global_batch_size, model.params) == (
        "config",
        72661,
        1008,
        125240512,
    )
    assert model.iterations == (20000, 40000, 60000, 72661)


# ---- golden: the dry-run and the plan of config/released.yaml --------------------------------------

RELEASED_JOBS = {
    "list_released": 36,
    "released_run_config": 36,
    "fetch_released": 1562,
    "convert_released": 1562,
    "evaluate_shots": 4686,  # 1562 checkpoints x 3 shot sets, the same rule as our runs
    "released_results": 1,
    "report": 1,  # the released rows and the protocol reproduction on the report's page
    "prefetch_eval_data": 1,
    "plan": 1,
    "all": 1,
}


def test_released_dry_run_plans_every_released_checkpoint_offline(tmp_path):
    """`snakemake --configfile config/released.yaml -n` from config alone: no listing exists yet."""
    proc = snakemake(
        "-n",
        "-q",
        "rules",
        "-d",
        str(tmp_path),
        "--configfile",
        str(RELEASED_YAML),
        env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert job_counts(proc.stdout + proc.stderr) == RELEASED_JOBS
    assert not (tmp_path / "results").exists()


def test_released_plan_says_what_it_costs():
    rows = [r for r in plan_rows(load_grid(released_config())) if r["source"] == "released"]
    assert len(rows) == 36
    assert sum(r["revisions"] for r in rows) == 1562
    assert sum(r["jobs"] for r in rows) == 36 * 2 + 1562 * 5
    # before any listing: params x 2 bytes (bf16) + 2.2 MB per revision
    assert all(r["download_bytes_source"] == "estimate (params x 2 B + 2.2 MB)" for r in rows)
    total_bytes = sum(r["download_bytes"] for r in rows)
    assert total_bytes == 3_394_738_798_592  # 3.39 TB
    assert round(sum(r["eval_gpu_hours"] for r in rows), 1) == 1000.7
    one = next(r for r in rows if r["run_id"] == "released/1.7b-dclm-300B-4096")
    assert (one["params"], one["revisions"], one["checkpoints"]) == (1714377728, 37, 37)
    # 37 x (2 x 1.714e9 x 7e7 tokens / (312e12 x 0.25) s + 3 jobs x 2 min) = 37 x 1.22 h
    assert one["eval_gpu_hours"] == pytest.approx(37 * (2 * 1714377728 * 7e7 / (312e12 * 0.25) + 360) / 3600, abs=0.05)
    assert one["download_bytes"] == 37 * (2 * 1714377728 + 2_200_000)


# ---- end to end: a synthetic released repo through real Snakemake -------------------------------------

TINY_REPO = "open-sci/open-sci-ref-v0.01-tiny-synthetic-40-4096"
ITERATIONS, FINAL = (10, 20, 30), 40
GROUPS = ("2shot", "extra-demo_lastword-0shot")  # the protocol's one shot set, one extra task


def e2e_config(tmp_path: Path) -> Path:
    config = reduced_demo_config()
    config["experiments"] = []
    config["paths"] = {
        "data": str(tmp_path / "data"),
        "runs": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
    }
    config["evaluation"]["limit"] = 8
    # one protocol task and one extra task keep the test to 8 lm-eval jobs (each starts in ~15 s)
    config["evaluation"]["protocols"]["demo"] = [{"task": "demo_continuation", "shots": 2, "metric": "acc_norm"}]
    config["released"] = {
        "models": [
            {
                "name": "tiny-synthetic",
                "repo": TINY_REPO,
                "save_interval": 10,
                "train_iters": FINAL,
                "global_batch_size": 8,
                "seq_length": 128,
                "params": 3_300_000,
            }
        ],
        "iterations": "all",
        "extra_tasks": [{"task": "demo_lastword", "shots": 0, "metric": "perplexity", "in_average": False}],
        "keep": "converted",
    }
    path = tmp_path / "released-e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_small_released_config_dry_run_and_extra_task_files(tmp_path):
    """Offline, from config alone: one listing, per revision a fetch, a conversion and one evaluation
    per protocol shot set and per extra task (the same evaluate_shots rule)."""
    proc = snakemake(
        "-n",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp_path / "work"),
        "--configfile",
        str(e2e_config(tmp_path)),
        env={"HF_HUB_OFFLINE": "1"},
    )
    counts = job_counts(proc.stdout)
    assert {
        k: counts[k]
        for k in (
            "list_released",
            "released_run_config",
            "fetch_released",
            "convert_released",
            "evaluate_shots",
            "released_results",
        )
    } == {
        "list_released": 1,
        "released_run_config": 1,
        "fetch_released": 4,
        "convert_released": 4,
        "evaluate_shots": 8,
        "released_results": 1,
    }
    assert "train_segment" not in counts and "export_hf" not in counts and counts.get("report") == 1
    extra = next(b for b in proc.stdout.split("rule evaluate_shots:")[1:] if "shots=extra-demo_lastword-0shot" in b)
    assert (
        "run_id=released/tiny-synthetic" in extra
        and "eval/iter_" in extra
        and "extra-demo_lastword-0shot.json" in extra
    )


def test_adding_an_extra_task_evaluates_only_its_new_files(tmp_path):
    """Done evaluations stay done when an extra task is added: its data is prefetched again (the
    prefetch marker is an ancient() input of the evaluations, so its new mtime re-runs nothing), and
    its files are planned because `all` lists every evaluation (not only through released_results),
    whatever the rerun triggers. Nothing is fetched or converted again."""
    from osref.workflow import WorkflowIndex

    smoke = yaml.safe_load((ROOT / "config" / "released_smoke.yaml").read_text())
    work = tmp_path / "work"
    index = WorkflowIndex(load_grid(copy.deepcopy(smoke)))
    layout = index.layout
    prefetched = work / index.layout.prefetch_marker()
    done = [
        *index.released_listings,
        *(layout.run_json(m.run_id) for m in index.grid.released.values()),
        *index.released_evaluations,
        *index.released_results,
        *(layout.report_file(name) for name in ("index.html", "comparison.csv", "final_scores.csv", "results.csv")),
        layout.report_manifest(),
        layout.plan_csv(),
    ]
    for path in [*(work / p for p in done), prefetched]:  # a finished smoke run, as far as Snakemake can tell
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    for path in index.released_exports:
        (work / path).mkdir(parents=True)
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke))
    common = [
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(work),
        "--cores",
        "1",
        "--configfile",
        str(config),
        "--rerun-triggers",
        "mtime",
    ]
    snakemake("--touch", "-q", *common, env={"HF_HUB_OFFLINE": "1"})
    assert "Nothing to be done" in snakemake("-n", *common, env={"HF_HUB_OFFLINE": "1"}).stdout

    smoke["released"]["extra_tasks"] = [{"task": "sciq", "shots": 0, "metric": "acc_norm"}]
    config.write_text(yaml.safe_dump(smoke))
    future = prefetched.stat().st_mtime + 60
    prefetched.write_text('{"tasks": ["sciq"]}')  # the new task's data was just prefetched
    os.utime(prefetched, (future, future))
    proc = snakemake("-n", *common, env={"HF_HUB_OFFLINE": "1"})
    counts = job_counts(proc.stdout)
    assert counts.get("evaluate_shots") == 2, proc.stdout[-3000:]  # the two revisions' extra-sciq-0shot.json
    assert set(counts) <= {"evaluate_shots", "released_results", "report", "all"}
    assert proc.stdout.count("shots=extra-sciq-0shot") == 2


def test_evaluate_script_selects_one_extra_task_by_its_file_name():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tasks = [
        {"task": "hellaswag", "shots": 10, "metric": "acc_norm"},
        {"task": "hellaswag", "shots": 0, "metric": "acc_norm"},
    ]
    assert cli.select_shot_set(tasks, "extra-hellaswag-0shot") == ([tasks[1]], 0)
    assert cli.select_shot_set(tasks[:1], "10shot") == (tasks[:1], 10)
    with pytest.raises(SystemExit, match="no single task 'sciq' with 0 shots"):
        cli.select_shot_set(tasks, "extra-sciq-0shot")


@pytest.mark.slow
def test_released_checkpoints_end_to_end(tmp_path):
    marker = tmp_path / "REMOTE_CODE_WAS_EXECUTED"
    config = e2e_config(tmp_path)
    models = {TINY_REPO: released_repo(ITERATIONS, FINAL), f"{TINY_REPO}-lr0.006-2": other_repo()}
    with HubServer(models=models) as hub:
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OSREF_TEST_EXECUTED_MARKER": str(marker),
        }
        env = {**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}, **env}
        work = tmp_path / "work"
        cmd = snakemake_cmd(work, config)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        repo = hub.models[TINY_REPO]

        released = tmp_path / "runs" / "released" / "tiny-synthetic"
        listing = json.loads((released / "listing.json").read_text())
        assert listing["branches"] == repo.refs and listing["main_iteration"] == FINAL
        for iteration in (*ITERATIONS, FINAL):
            revision = "main" if iteration == FINAL else f"iter_{iteration:07d}"
            hf = released / "hf" / f"iter_{iteration:07d}"
            provenance = json.loads((hf / "provenance.json").read_text())
            assert (provenance["revision"], provenance["iteration"], provenance["source_repo"]) == (
                revision,
                iteration,
                TINY_REPO,
            )
            assert provenance["source_commit"] == repo.refs[revision]
            assert (
                provenance["kv_heads"] == 4 and provenance["source_config_num_key_value_heads"] == 1
            )  # the wrong value
            assert (
                provenance["qk_norm"]["kind"] == "rmsnorm"
                and provenance["reference_forward"]["max_abs_logit_diff"] < 1e-3
            )
            assert (hf / "released_remote_code" / "modeling_opensci.py").is_file()
            assert "auto_map" not in json.loads((hf / "config.json").read_text())
            assert not (released / "fetched" / f"iter_{iteration:07d}").exists()  # temp(): deleted once converted
            for group in GROUPS:
                payload = json.loads((released / "eval" / f"iter_{iteration:07d}" / f"{group}.json").read_text())
                assert (payload["run_id"], payload["iteration"]) == ("released/tiny-synthetic", iteration)
                assert payload["tokens_seen"] == iteration * 8 * 128
                expected = {"2shot": {"demo_continuation"}, "extra-demo_lastword-0shot": {"demo_lastword"}}[group]
                assert set(payload["tasks"]) == expected
                assert payload["num_fewshot"] == {"2shot": 2, "extra-demo_lastword-0shot": 0}[group]
                for score in payload["tasks"].values():
                    assert isinstance(score["value"], float) and score["n_samples"] == 8
        assert not (released / "fetched").exists() or not list((released / "fetched").iterdir())
        with open(tmp_path / "results" / "released" / "results.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        cells = {(int(r["iteration"]), r["task"], r["shots"]) for r in rows if r["task"] != "avg"}
        assert cells == {
            (i, t, s) for i in (*ITERATIONS, FINAL) for t, s in (("demo_continuation", "2"), ("demo_lastword", "0"))
        }
        averages = [r for r in rows if r["task"] == "avg"]  # the protocol's in-average task only, not the extra
        assert len(averages) == 4 and all(
            a["value"] == c["value"]
            for a, c in zip(averages, [r for r in rows if r["task"] == "demo_continuation"], strict=False)
        )
        assert {r["source"] for r in rows} == {"released"}
        assert (
            tmp_path / "results" / "released" / "reproduction.csv"
        ).is_file()  # no published demo tasks: header only
        # the report (the default target builds it for released models alone): source = released rows
        # in its tidy table and the protocol-reproduction section on its page
        with open(tmp_path / "results" / "report" / "results.csv", newline="") as fh:
            report_rows = list(csv.DictReader(fh))
        released_cells = {
            (r["run_id"], int(r["iteration"]), r["task"]) for r in report_rows if r["source"] == "released"
        }
        assert {("tiny-synthetic", i, "demo_continuation") for i in (*ITERATIONS, FINAL)} <= released_cells
        assert not [r for r in report_rows if r["source"] == "ours"]
        page = (tmp_path / "results" / "report" / "index.html").read_text()
        assert "tiny-synthetic" in page and "reproduction" in page.lower()

        # every download asked for a listed commit; branch names were used only by the listing's config read
        resolves = [r.path for r in hub.requests if "/resolve/" in r.path and "config.json" not in r.path]
        assert resolves and all(any(f"/resolve/{sha}/" in p for sha in repo.refs.values()) for p in resolves)

        # nothing to redo although the fetched copies are gone (only the plan, which now reads the
        # listing's exact bytes instead of the estimate); re-evaluation needs no download
        again = subprocess.run([*cmd, "-n"], capture_output=True, text=True, env=env, timeout=600)
        assert set(job_counts(again.stdout)) <= {"plan", "all"}, again.stdout[-3000:]
        forced = subprocess.run(
            [*cmd, "-n", "--forcerun", "evaluate_shots", "--", "released"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        counts = job_counts(forced.stdout)
        assert counts.get("evaluate_shots") == 4 * len(GROUPS) and "fetch_released" not in counts, forced.stdout[-3000:]
    assert not marker.exists(), marker.read_text()
