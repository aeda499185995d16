"""The report's comparison (issue 13) and released rows (issue 14), on hand-computed values.

Tiny synthetic manifests (evaluation JSONs written here) against the real published data in
config/reference; the statistics are osref/compare.py's, the numbers below are computed by hand
from the formulas in its docstring (95 % intervals ±1.96·se, the average's se = sqrt(Σ se²)/n,
a difference's se = sqrt(se_a² + se_b²), verdict at 1.96·noise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from osref.report import build_report

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "reference"
Z = 1.959963984540054
DEMO_PROTOCOL = [
    {"task": "demo_a", "shots": 0, "metric": "acc", "in_average": True},
    {"task": "demo_b", "shots": 0, "metric": "acc", "in_average": True},
]


def _release_protocol() -> list[dict]:
    """The 0.01 protocol as config/config.yaml states it (12 tasks, social_iqa not in the average)."""
    import yaml

    evaluation = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["evaluation"]
    specs = evaluation["protocols"][evaluation["protocol"]]
    return [{**spec, "in_average": spec.get("in_average", True)} for spec in specs]


RELEASE_PROTOCOL = _release_protocol()
ITEMS = {"copa": 100, "lambada_openai": 5153, "openbookqa": 500, "winogrande": 1267, "social_iqa": 1954,
         "mmlu": 14042, "commonsense_qa": 1221, "piqa": 1838, "hellaswag": 10042, "arc_easy": 2376,
         "arc_challenge": 1172, "boolq": 3270}  # fmt: skip
TOKENS_PER_ITERATION = 1024
C4_0_13B = 14253828  # 0.13b c4 300B, the canonical reference run: 71 526 iterations of 1024 × 4096 tokens
C4_1_7B = 11844147  # 1.7b c4 300B


def eval_json(path: Path, run_id: str, iteration: int, scores: dict[str, tuple[float, float | None]], *,
              shots: int = 0, tokens_per_iteration: int = TOKENS_PER_ITERATION, metric: str = "acc") -> Path:  # fmt: skip
    tasks = {task: {"metric": metric if isinstance(metric, str) else metric[task], "value": value, "stderr": se}
             for task, (value, se) in scores.items()}  # fmt: skip
    payload = {"run_id": run_id, "iteration": iteration, "tokens_seen": iteration * tokens_per_iteration,
               "num_fewshot": shots, "tasks": tasks}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def run_entry(run_id: str, dataset: str, files: list[Path], **extra) -> dict:
    return {
        "run_id": run_id, "dataset": dataset, "scale": "tiny", "budget": "0.25M", "tokens": 250_000,
        "seq_length": 128, "global_batch_size": 8, "params": 1_000_000, "train_iters": 20,
        "checkpoint_iters": [10, 20], "reference_run": None, "eval_files": [str(p) for p in files], **extra,
    }  # fmt: skip


def write_demo_scale(base: Path) -> dict:
    """Two runs of ours at one scale and budget on local tasks (the demo case), no reference run:
    their evaluation JSONs and loss logs under ``base``; returns the manifest."""
    mine = [
        eval_json(base / "mine/10.json", "mine", 10, {"demo_a": (0.55, 0.02), "demo_b": (0.45, 0.02)}),
        eval_json(base / "mine/20.json", "mine", 20, {"demo_a": (0.70, 0.02), "demo_b": (0.50, 0.02)}),
    ]
    c4 = [
        eval_json(base / "c4/10.json", "c4-local", 10, {"demo_a": (0.50, 0.01), "demo_b": (0.40, 0.01)}),
        eval_json(base / "c4/20.json", "c4-local", 20, {"demo_a": (0.60, 0.01), "demo_b": (0.50, 0.01)}),
    ]
    metrics = {}
    for name, offset in (("mine", 0.0), ("c4-local", 1.0)):
        train, valid = base / f"{name}_train.jsonl", base / f"{name}_valid.jsonl"
        train.write_text("".join(json.dumps({"iteration": i, "loss": 9 - i / 5 + offset}) + "\n" for i in range(1, 21)))
        valid.write_text(
            "".join(json.dumps({"iteration": i, "valid_loss": 8 - i / 5 + offset}) + "\n" for i in (10, 20))
        )
        metrics[name] = {"train_metrics": str(train), "valid_metrics": str(valid)}
    return {
        "protocol": DEMO_PROTOCOL,
        "references": ["c4", "dclm"],
        "runs": [
            run_entry(
                "mine",
                "mydata",
                mine,
                **metrics["mine"],
                recipe_differences=[
                    {
                        "key": "global_batch_size",
                        "run": 8,
                        "reference": 16,
                        "versus": "c4",
                        "reference_run": "tiny-c4-0.25M-128",
                    },
                    {
                        "key": "train_iters",
                        "run": 20,
                        "reference": 21,
                        "versus": "c4",
                        "reference_run": "tiny-c4-0.25M-128",
                    },
                ],  # fmt: skip
            ),  # fmt: skip
            run_entry("c4-local", "c4", c4, **metrics["c4-local"]),
        ],
    }


@pytest.fixture(scope="module")
def demo_scale(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("demo_scale")
    out = base / "report"
    summary = build_report(write_demo_scale(base), REFERENCE, out)
    return out, summary


def test_comparison_rows_by_hand(demo_scale):
    out, _ = demo_scale
    rows = pd.read_csv(out / "comparison.csv")
    for column in ("run_id", "versus", "versus_source", "scale", "budget", "task", "score", "score_ci_low",
                   "score_ci_high", "versus_score", "diff", "diff_ci_low", "diff_ci_high", "noise", "verdict"):  # fmt: skip
        assert column in rows.columns, column
    assert set(rows["versus_source"]) == {"ours"} and len(rows) == 2 * 3  # both directions × (2 tasks + avg)
    mine = rows[rows["run_id"] == "mine"].set_index("task")
    assert set(mine["versus"]) == {"c4-local"} and set(mine["iteration"]) == {20}  # the last checkpoint with a match

    a = mine.loc["demo_a"]
    se = math.sqrt(0.02**2 + 0.01**2)
    assert a["score"] == pytest.approx(0.70) and a["score_ci_low"] == pytest.approx(0.70 - Z * 0.02)
    assert a["versus_score"] == pytest.approx(0.60) and a["score_ci_high"] == pytest.approx(0.70 + Z * 0.02)
    assert a["diff"] == pytest.approx(0.10)
    assert (a["diff_ci_low"], a["diff_ci_high"]) == (pytest.approx(0.10 - Z * se), pytest.approx(0.10 + Z * se))
    # no release floor for a local task: the item noise of both scores is the yardstick
    assert a["noise_floor"] == 0 and a["noise"] == pytest.approx(se) and a["noise_source"] == "item noise only"
    assert a["verdict"] == "better"  # 0.10 > 1.96 × 0.0224
    assert mine.loc["demo_b", "diff"] == pytest.approx(0.0) and mine.loc["demo_b", "verdict"] == "within noise"

    avg = mine.loc["avg"]
    se_mine, se_c4 = math.sqrt(2 * 0.02**2) / 2, math.sqrt(2 * 0.01**2) / 2  # sqrt(Σ se²)/n
    assert avg["score"] == pytest.approx(0.60) and avg["versus_score"] == pytest.approx(0.55)
    assert avg["score_ci_high"] - avg["score"] == pytest.approx(Z * se_mine)
    assert avg["diff"] == pytest.approx(0.05)
    assert avg["diff_ci_high"] - avg["diff"] == pytest.approx(Z * math.hypot(se_mine, se_c4))
    assert avg["verdict"] == "better"  # 0.05 > 1.96 × 0.0158 = 0.031
    back = rows[(rows["run_id"] == "c4-local") & (rows["task"] == "avg")].iloc[0]
    assert back["diff"] == pytest.approx(-0.05) and back["verdict"] == "worse"
    assert pd.isna(avg["decision_accuracy"])  # "tiny" is not a scale of the release


def test_comparison_table_is_first_and_recipe_differences_shown(demo_scale):
    out, _ = demo_scale
    page = (out / "index.html").read_text()
    body = page.split("<body>", 1)[1]
    assert body.index("<h2") == body.index("<h2 id='comparison'>")
    first_table = body.index("<table")
    assert body.index("id='comparison'") < first_table < body.index("id='references'")
    warning = "the recipe of tiny-c4-0.25M-128: global_batch_size 8 (reference 16), train_iters 20 (reference 21)"
    assert warning in body.split("<table", 1)[0]
    assert "class='v better'" in body and "div class='scroll'" in body


def test_references_shown_without_reference_runs(demo_scale):
    """The grid schedules no reference run; the report still shows the asked-for references."""
    out, summary = demo_scale
    finals = pd.read_csv(out / "reference_finals.csv")
    assert set(finals["dataset"]) == {"c4", "dclm"}
    assert set(finals["scale"]) == {"0.13b", "0.4b", "1.3b", "1.7b"}
    c4 = finals[(finals["dataset"] == "c4") & (finals["scale"] == "0.13b") & (finals["task"] == "copa")].iloc[0]
    assert c4["value"] == pytest.approx(0.69)  # the published final copa of job 14253828
    assert c4["stderr"] == pytest.approx(math.sqrt(0.69 * 0.31 / 99))  # binomial at copa's 100 items
    assert "references_published" in summary["plots"]
    figure = json.loads((out / ".cache" / "plots" / "references_published.json").read_text())["figure"]
    names = [t["name"] for t in figure["data"] if t.get("showlegend", True)]
    assert any(n.startswith("c4 · published") for n in names) and any(n.startswith("dclm · published") for n in names)
    assert not any(n.startswith("pile") for n in names)
    # the release's noise floor and decision accuracy are shown although the manifest's tasks are local ones
    references = page_section(out, "references")
    assert "id='noise-floor'" in references and "id='decision'" in references and "25/28" in references
    # the published 11-task average never shares an axis with the average of other (local) tasks
    ours_vs_flops = json.loads((out / ".cache" / "plots" / "avg_vs_flops.json").read_text())["figure"]
    assert {t["name"] for t in ours_vs_flops["data"]} == {"mydata · ours (mine)", "c4 · ours (c4-local)"}
    page = (out / "index.html").read_text()
    assert "plot-references_published" in page.split("id='references'", 1)[1].split("<h2", 1)[0]


def test_references_default_to_every_dataset(tmp_path: Path):
    files = [eval_json(tmp_path / "a/20.json", "a", 20, {"demo_a": (0.5, 0.01), "demo_b": (0.5, 0.01)})]
    build_report({"protocol": DEMO_PROTOCOL, "runs": [run_entry("a", "mydata", files)]}, REFERENCE, tmp_path / "r")
    finals = pd.read_csv(tmp_path / "r" / "reference_finals.csv")
    assert finals["dataset"].nunique() == 8


def page_section(out: Path, section: str) -> str:
    """The HTML of one ``<h2 id=...>`` section of the report's page."""
    return (out / "index.html").read_text().split(f"id='{section}'", 1)[1].split("<h2", 1)[0]


def _figures(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["figure"] for p in (out / ".cache" / "plots").glob("*.json")}


def test_no_phantom_legend_entries_and_error_bars(demo_scale):
    out, _ = demo_scale
    figures = _figures(out)
    assert {"datasets_tiny_0.25M", "scores_mine", "losses_tiny_0.25M"} <= set(figures)
    for name, figure in figures.items():
        for trace in figure["data"]:
            if trace.get("showlegend", True):
                assert any(y is not None for y in trace["y"]), f"{name}: legend entry {trace['name']!r} draws nothing"
    legend = [t["name"] for t in figures["datasets_tiny_0.25M"]["data"] if t.get("showlegend", True)]
    assert legend == ["c4 · ours (c4-local)", "mydata · ours (mine)"]  # no reference drawn at "tiny": none listed
    for trace in figures["scores_mine"]["data"]:  # every score of ours carries its 95 % interval
        assert trace["error_y"]["array"] == pytest.approx([Z * 0.02] * 2 if trace["yaxis"] != "y3" else
                                                          [Z * math.sqrt(2 * 0.02**2) / 2] * 2, rel=1e-3)  # fmt: skip


def test_losses_of_different_validation_sets_never_share_an_axis(demo_scale):
    out, _ = demo_scale
    figure = _figures(out)["losses_tiny_0.25M"]
    axis_of = {t["name"]: t["yaxis"] for t in figure["data"]}
    valid = {name: axis for name, axis in axis_of.items() if "validation" in name}
    assert len(valid) == 2 and len(set(valid.values())) == 2
    titles = {key: value["title"]["text"] for key, value in figure["layout"].items() if key.startswith("yaxis")}
    assert titles == {"yaxis": "loss on mydata data", "yaxis2": "loss on c4 data"}
    # a run's training and validation loss (same dataset) may share its panel
    assert axis_of["mydata: training loss (training data)"] == valid["mydata: validation loss (mydata held-out split)"]


def final_run(base: Path, run_id: str, job: int, offset: float) -> tuple[dict, dict[str, float]]:
    """A run of ours at the scale and budget of published run ``job``, evaluated once at its final
    checkpoint with the full protocol, each task scoring the published value + ``offset`` with the
    binomial stderr at the protocol's item count. Returns (manifest run, published final values)."""
    from osref.reference import ReferenceData

    reference = ReferenceData(REFERENCE)
    ref = reference.resolve_run(job, "test")
    curves = reference.curves_of(ref["run_id"])
    published = curves[curves["train_end"].astype(bool)].set_index("task")["value"]
    final_iter, tokens_per_iter = int(ref["train_iters"]), int(ref["global_batch_size"]) * int(ref["seq_length"])
    scores: dict[int, dict] = {}
    for spec in RELEASE_PROTOCOL:
        p = float(published[spec["task"]]) + offset
        scores.setdefault(spec["shots"], {})[spec["task"]] = (p, math.sqrt(p * (1 - p) / (ITEMS[spec["task"]] - 1)))
    metrics = {spec["task"]: spec["metric"] for spec in RELEASE_PROTOCOL}
    files = [
        eval_json(
            base / run_id / f"{shots}.json",
            run_id,
            final_iter,
            tasks,
            shots=shots,
            tokens_per_iteration=tokens_per_iter,
            metric=metrics,
        )  # fmt: skip
        for shots, tasks in scores.items()
    ]
    run = run_entry(run_id, "mydata", files, scale=ref["size"], budget=ref["tokens"],
                    tokens=final_iter * tokens_per_iter, seq_length=int(ref["seq_length"]),
                    global_batch_size=int(ref["global_batch_size"]), params=reference.parameter_count(ref),
                    train_iters=final_iter, checkpoint_iters=[final_iter])  # fmt: skip
    return run, {"scores": scores, "published": published}


def test_against_the_published_reference_by_hand(tmp_path: Path):
    """A 0.13b run at 300B tokens next to the published 0.13b C4 run: diff, interval, floor, and the
    decision accuracy of 0.13b vs 1.7b (25 of 28 pairs on the 11-task average, issue 13)."""
    run, values = final_run(tmp_path, "0.13b-mine-300B-4096", C4_0_13B, 0.01)
    scores, published = values["scores"], values["published"]
    build_report({"protocol": RELEASE_PROTOCOL, "runs": [run], "references": ["c4"]}, REFERENCE, tmp_path / "r")
    rows = pd.read_csv(tmp_path / "r" / "comparison.csv")
    tokens = rows[(rows["comparison"] == "equal tokens") & (rows["versus_source"] == "reference")]
    assert len(set(tokens["versus"])) == 1 and tokens["versus"].iloc[0].endswith(f"_{C4_0_13B}")
    avg = tokens.set_index("task").loc["avg"]
    assert avg["diff"] == pytest.approx(0.01)
    in_avg = [s["task"] for s in RELEASE_PROTOCOL if s["in_average"]]
    se_pub = math.sqrt(sum(published[t] * (1 - published[t]) / (ITEMS[t] - 1) for t in in_avg)) / 11
    se_ours = math.sqrt(sum(scores[s["shots"]][s["task"]][1] ** 2 for s in RELEASE_PROTOCOL if s["in_average"])) / 11
    assert avg["versus_ci_high"] - avg["versus_score"] == pytest.approx(Z * se_pub)
    assert avg["diff_ci_high"] - avg["diff"] == pytest.approx(Z * math.hypot(se_ours, se_pub))
    # the floor of two final runs: sqrt(2)·σ_run, σ_run ≈ 0.0025 from the release's repeats; full
    # protocol evaluations on both sides, so noise = floor
    assert avg["noise_floor"] == pytest.approx(math.sqrt(2) * 0.0025, abs=0.0005)
    assert avg["noise"] == pytest.approx(avg["noise_floor"], rel=1e-6)
    assert avg["verdict"] == "better"  # 0.01 > 1.96 × 0.0035
    assert avg["decision_accuracy"] == "25/28"
    copa = tokens.set_index("task").loc["copa"]
    assert copa["diff"] == pytest.approx(0.01) and copa["verdict"] == "within noise"  # 100 items: copa is noisy
    flops = rows[rows["comparison"] == "equal FLOPs"]
    assert set(flops["versus"]) == {"c4 fit"}  # only the datasets shown
    # one scale of mydata only: no compute multiplier
    assert pd.read_csv(tmp_path / "r" / "compute_multiplier.csv").empty


def test_compute_multiplier_needs_two_scales(tmp_path: Path):
    """mydata at 0.13b and 1.7b (300B, final): the multiplier at the largest run against every
    reference dataset's fit, multiplier = 10^((score − a)/b) / C, inside its bootstrap interval."""
    small, _ = final_run(tmp_path, "0.13b-mine-300B-4096", C4_0_13B, 0.02)
    large, values = final_run(tmp_path, "1.7b-mine-300B-4096", C4_1_7B, 0.02)
    build_report({"protocol": RELEASE_PROTOCOL, "runs": [small, large]}, REFERENCE, tmp_path / "r")
    multipliers = pd.read_csv(tmp_path / "r" / "compute_multiplier.csv")
    assert set(multipliers["run_id"]) == {"1.7b-mine-300B-4096"} and multipliers["reference_dataset"].nunique() == 8
    c4 = multipliers.set_index("reference_dataset").loc["c4"]
    in_avg = [s["task"] for s in RELEASE_PROTOCOL if s["in_average"]]
    assert c4["score"] == pytest.approx(sum(values["published"][t] for t in in_avg) / 11 + 0.02)
    assert c4["multiplier"] == pytest.approx(10 ** ((c4["score"] - c4["fit_a"]) / c4["fit_b"]) / c4["flops"])
    assert c4["multiplier"] > 1  # 0.02 above C4's own 1.7b run: C4 needs more compute
    assert c4["multiplier_lo"] <= c4["multiplier"] <= c4["multiplier_hi"]
    page = (tmp_path / "r" / "index.html").read_text()
    assert "id='multiplier'" in page and f"{c4['multiplier']:.3g}×" in page


def test_released_rows_and_protocol_reproduction(tmp_path: Path):
    """Released checkpoints: source=released rows in results.csv, compared with our run of the same
    scale and budget; the protocol reproduction table and plot from a hand-made reproduction.csv."""
    ours = [eval_json(tmp_path / "o/20.json", "mine", 20, {"demo_a": (0.70, 0.02), "demo_b": (0.50, 0.02)})]
    released = pd.DataFrame([
        {"source": "released", "run_id": "rel", "reference_run": None, "dataset": "c4", "scale": "tiny",
         "budget": "0.25M", "iteration": 20, "tokens_seen": 20 * TOKENS_PER_ITERATION, "flops": 1.0, "task": task,
         "shots": 0, "metric": "acc", "value": value, "stderr": 0.01}
        for task, value in (("demo_a", 0.65), ("demo_b", 0.52))
    ] + [{"source": "released", "run_id": "rel", "dataset": "c4", "scale": "tiny", "budget": "0.25M", "iteration": 20,
          "tokens_seen": 20 * TOKENS_PER_ITERATION, "task": "avg", "metric": "mean", "value": 0.585}])  # fmt: skip
    released_csv = tmp_path / "released" / "results.csv"
    released_csv.parent.mkdir()
    released.to_csv(released_csv, index=False)
    reproduction = pd.DataFrame(
        [
            ["rel", "refrun", 2000, "copa", 0, "acc", 0.62, 0.0488, 100, 0.60, 0.0492, 0.02, 0.0693, 0.2886, True],
            ["rel", "refrun", 2000, "piqa", 10, "acc_norm", 0.61, 0.0114, 1838, 0.64, 0.0112, -0.03, 0.0160, -1.875, False],
            ["rel", "refrun", 4000, "copa", 0, "acc", 0.66, 0.0476, 100, 0.67, 0.0473, -0.01, 0.0671, -0.149, True],
        ],
        columns=["run_id", "reference_run", "iteration", "task", "shots", "metric", "value", "stderr", "n",
                 "published", "published_stderr", "difference", "combined_stderr", "z", "within"],
    )  # fmt: skip
    reproduction_csv = tmp_path / "released" / "reproduction.csv"
    reproduction.to_csv(reproduction_csv, index=False)
    manifest = {"protocol": DEMO_PROTOCOL, "runs": [run_entry("mine", "mydata", ours)],
                "released_results": str(released_csv), "released_reproduction": str(reproduction_csv)}  # fmt: skip
    summary = build_report(manifest, REFERENCE, tmp_path / "r")
    table = pd.read_csv(tmp_path / "r" / "results.csv")
    rel = table[table["source"] == "released"].set_index("task")
    assert set(rel.index) == {"demo_a", "demo_b", "avg"} and len(rel) == 3  # avg recomputed once, not twice
    assert rel.loc["avg", "value"] == pytest.approx(0.585)
    rows = pd.read_csv(tmp_path / "r" / "comparison.csv")
    versus = rows[rows["versus_source"] == "released"].set_index("task")
    assert versus.loc["demo_a", "diff"] == pytest.approx(0.05)
    assert versus.loc["demo_a", "diff_ci_high"] - 0.05 == pytest.approx(Z * math.hypot(0.02, 0.01))
    assert versus.loc["demo_a", "verdict"] == "better" and versus.loc["demo_b", "verdict"] == "within noise"
    assert versus.loc["avg", "diff"] == pytest.approx(0.015)
    page = (tmp_path / "r" / "index.html").read_text()
    section = page.split("id='reproduction'", 1)[1].split("<h2", 1)[0]
    assert "2 of 3 cells within the combined standard error" in section
    assert "-0.03" in section and "0.0160" in section and "False" in section
    assert "protocol_reproduction" in summary["plots"] and "plot-protocol_reproduction" in section
    figure = _figures(tmp_path / "r")["protocol_reproduction"]
    by_task = {t["name"]: t for t in figure["data"]}
    assert by_task["copa"]["y"] == [0.02, -0.01] and by_task["copa"]["error_y"]["array"] == [0.0693, 0.0671]
    assert by_task["piqa"]["x"] == [2000]
    scores_figure = _figures(tmp_path / "r")["datasets_tiny_0.25M"]
    assert {t["name"] for t in scores_figure["data"]} == {"c4 · released, re-evaluated by us", "mydata · ours (mine)"}


def test_bad_comparison_inputs_name_the_file_or_key(tmp_path: Path):
    files = [eval_json(tmp_path / "a/20.json", "a", 20, {"demo_a": (0.5, 0.01), "demo_b": (0.5, 0.01)})]
    run = run_entry("a", "mydata", files)
    with pytest.raises(ValueError, match=r"manifest references: unknown dataset\(s\) \['c5'\]"):
        build_report({"protocol": DEMO_PROTOCOL, "runs": [run], "references": ["c4", "c5"]}, REFERENCE, tmp_path / "1")
    bad = tmp_path / "released.csv"
    bad.write_text("source,run_id\nreleased,x\n")
    with pytest.raises(ValueError, match=r"released.csv: lacks column\(s\) \['reference_run'"):
        build_report(
            {"protocol": DEMO_PROTOCOL, "runs": [run], "released_results": str(bad)}, REFERENCE, tmp_path / "2"
        )


def test_workflow_wires_released_results_only_when_configured():
    """The report's manifest names the released results (and the rule waits for them) only when the
    config has released models; the demo's manifest is unchanged."""
    import yaml

    from osref.grid import load_grid
    from osref.workflow import WorkflowIndex

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    plain = WorkflowIndex(load_grid(config))
    assert "released_results" not in plain.report_manifest() and plain.released_results == []
    config["released"] = {"models": ["0.13b-dclm-300B-4096"], "iterations": [72661]}
    index = WorkflowIndex(load_grid(config))
    manifest = index.report_manifest()
    paths = index.layout.released_results()
    assert (manifest["released_results"], manifest["released_reproduction"]) == (
        paths["results"],
        paths["reproduction"],
    )
    assert index.released_results == [paths["results"], paths["reproduction"]]


def test_lower_perplexity_is_better(tmp_path: Path):
    """The demo's demo_lastword is scored by perplexity: the run with the lower one is the better."""
    protocol = [{"task": "demo_ppl", "shots": 0, "metric": "perplexity", "in_average": False}, DEMO_PROTOCOL[0]]
    metric = {"demo_ppl": "perplexity", "demo_a": "acc"}
    low = eval_json(tmp_path / "low.json", "low", 20, {"demo_ppl": (100.0, 5.0), "demo_a": (0.5, 0.01)}, metric=metric)
    high = eval_json(tmp_path / "high.json", "high", 20, {"demo_ppl": (150.0, 5.0), "demo_a": (0.5, 0.01)},
                     metric=metric)  # fmt: skip
    runs = [run_entry("low", "a", [low]), run_entry("high", "b", [high])]
    build_report({"protocol": protocol, "runs": runs}, REFERENCE, tmp_path / "r")
    rows = pd.read_csv(tmp_path / "r" / "comparison.csv").set_index(["run_id", "task"])
    assert rows.loc[("low", "demo_ppl"), "diff"] == pytest.approx(-50.0)
    assert rows.loc[("low", "demo_ppl"), "verdict"] == "better"  # 50 > 1.96 × sqrt(5² + 5²) = 13.9
    assert rows.loc[("high", "demo_ppl"), "verdict"] == "worse"


def test_a_report_of_released_checkpoints_alone(tmp_path: Path):
    """A config of released models only (`experiments: []`): the default target builds the report,
    whose manifest then has no run of ours; the released rows and the reproduction still show."""
    released = pd.DataFrame([
        {"source": "released", "run_id": "rel", "reference_run": None, "dataset": "c4", "scale": "tiny",
         "budget": "0.25M", "iteration": iteration, "tokens_seen": iteration * TOKENS_PER_ITERATION, "flops": 1.0,
         "task": "demo_a", "shots": 0, "metric": "acc", "value": value, "stderr": 0.01}
        for iteration, value in ((10, 0.55), (20, 0.65))
    ])  # fmt: skip
    released_csv = tmp_path / "released" / "results.csv"
    released_csv.parent.mkdir()
    released.to_csv(released_csv, index=False)
    reproduction_csv = tmp_path / "released" / "reproduction.csv"
    pd.DataFrame(
        [["rel", "refrun", 20, "copa", 0, "acc", 0.62, 0.0488, 100, 0.60, 0.0492, 0.02, 0.0693, 0.2886, True]],
        columns=["run_id", "reference_run", "iteration", "task", "shots", "metric", "value", "stderr", "n",
                 "published", "published_stderr", "difference", "combined_stderr", "z", "within"],
    ).to_csv(reproduction_csv, index=False)  # fmt: skip
    manifest = {"protocol": DEMO_PROTOCOL, "runs": [], "released_results": str(released_csv),
                "released_reproduction": str(reproduction_csv)}  # fmt: skip
    build_report(manifest, REFERENCE, tmp_path / "r")
    table = pd.read_csv(tmp_path / "r" / "results.csv")
    assert set(table.loc[table["source"] == "released", "iteration"]) == {10, 20}
    assert "ours" not in set(table["source"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert "1 of 1 cells within the combined standard error" in page
    assert "<summary>released: rel</summary>" in page
    figure = _figures(tmp_path / "r")["released_rel"]  # the released model's curve, per task
    assert [trace["y"] for trace in figure["data"] if trace.get("y")] == [[0.55, 0.65]]
