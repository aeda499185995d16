"""Config contract: schema, defaults, cross-field checks, and the release grid's golden numbers."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml

from osref.config import ConfigError, budget_tokens, load_config
from osref.grid import load_grid, run_document
from osref.model_spec import ModelSpec, padded_vocab_size
from osref.plan import plan_rows

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "config" / "config.yaml"
DEMO = ROOT / "config" / "demo.yaml"


@pytest.fixture(scope="module")
def release_raw() -> dict:
    return yaml.safe_load(RELEASE.read_text())


@pytest.fixture(scope="module")
def release_grid():
    return load_grid(RELEASE)


def bad(raw: dict, mutate) -> str:
    config = copy.deepcopy(raw)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        load_grid(config)
    return str(info.value)


# ---- the release grid ------------------------------------------------------------------------------


def test_release_grid_is_the_36_reference_runs(release_grid):
    with open(ROOT / "config" / "reference" / "runs.csv", newline="") as fh:
        refs = [r for r in csv.DictReader(fh) if r["reference"] == "True"]
    expected = {f"{r['size']}-{r['dataset']}-{r['tokens']}-{r['seq_length']}" for r in refs}
    assert len(release_grid.runs) == 36
    assert set(release_grid.runs) == expected


@pytest.mark.parametrize(
    "scale, params_m",
    [("0.13b", 125.2), ("0.4b", 403.6), ("1.3b", 1308.5), ("1.7b", 1714.4)],
)
def test_parameter_counts_match_the_release(release_grid, scale, params_m):
    run = next(r for r in release_grid.runs.values() if r.scale == scale)
    assert run.params / 1e6 == pytest.approx(params_m, rel=1e-3)


def test_iterations_checkpoints_and_schedule_match_reference_runs(release_grid):
    with open(ROOT / "config" / "reference" / "runs.csv", newline="") as fh:
        refs = {
            f"{r['size']}-{r['dataset']}-{r['tokens']}-{r['seq_length']}": r
            for r in csv.DictReader(fh)
            if r["reference"] == "True"
        }
    for run_id, run in release_grid.runs.items():
        ref = refs[run_id]
        assert run.train_iters == int(ref["train_iters"]), run_id
        assert run.global_batch_size == int(ref["global_batch_size"]), run_id
        assert run.recipe["warmup_iters"] == int(ref["lr_warmup_iters"]), run_id
        assert run.spec.ffn_hidden_size == int(ref["ffn_hidden_size"]), run_id
        # the recipe a user's run is compared with (osref.grid.recipe_differences) is this file's: every
        # value runs.csv records must be the published one
        assert (run.recipe["lr"], run.recipe["min_lr"], run.seq_length) == (
            float(ref["lr"]), float(ref["min_lr"]), int(ref["seq_length"])
        ), run_id  # fmt: skip
        assert (run.recipe["schedule"], run.spec.rotary_base) == (ref["schedule"].lower(), float(ref["rotary_base"]))
        assert (run.spec.num_layers, run.spec.hidden_size, run.spec.num_attention_heads) == (
            int(ref["num_layers"]), int(ref["hidden_size"]), int(ref["num_attention_heads"])
        ), run_id  # fmt: skip
        assert run.spec.tie_embeddings == (ref["tied_embedding"] == "True"), run_id


def test_golden_300b_run(release_grid):
    run = release_grid.runs["1.7b-dclm-300B-4096"]
    assert run.train_iters == 72661
    assert len(run.checkpoint_iters) == 37
    assert run.checkpoint_iters[:2] == (2000, 4000) and run.checkpoint_iters[-2:] == (72000, 72661)
    assert run.cooldown_iters == 14532
    assert run.flops == pytest.approx(6 * 1714377728 * 72661 * 1008 * 4096)
    assert run.segment_ends[-1] == 72661
    assert all(end % 2000 == 0 for end in run.segment_ends[:-1])
    assert run.eval_iters == run.checkpoint_iters
    one_t = release_grid.runs["1.7b-dclm-1T-4096"]
    assert one_t.train_iters == 242204 and one_t.cooldown_iters == 48440 and len(one_t.checkpoint_iters) == 122
    fifty = release_grid.runs["1.3b-c4-50B-4096"]
    assert fifty.train_iters == 12111 and fifty.recipe["warmup_iters"] == 1000 and len(fifty.checkpoint_iters) == 13


def test_0_4b_batch_and_override(release_grid):
    assert release_grid.runs["0.4b-c4-300B-4096"].train_iters == 73243
    c4_small = release_grid.runs["0.13b-c4-300B-4096"]
    assert c4_small.global_batch_size == 1024 and c4_small.train_iters == 71526
    assert c4_small.resources["nodes"] == 16


def test_plan_rows_have_the_contract_columns(release_grid):
    rows = plan_rows(release_grid)
    assert len(rows) == 36
    required = [
        "run_id",
        "scale",
        "dataset",
        "tokens",
        "seq_length",
        "global_batch_size",
        "params",
        "train_iters",
        "checkpoints",
        "flops",
        "gpu_hours",
        "nodes",
        "gpus_per_node",
        "jobs",
    ]
    assert list(rows[0])[: len(required)] == required
    row = next(r for r in rows if r["run_id"] == "1.7b-nemotron-cc-hq-300B-4096")
    # 1.2 s/iteration on 252 A100s in the original → about 6 100 GPU-hours for 72 661 iterations.
    assert 5500 < row["gpu_hours"] < 6500
    assert row["jobs"] == row["segments"] + 37 * (1 + 3)


def test_run_document_is_complete_and_stable(release_grid):
    doc = run_document(release_grid, release_grid.runs["0.13b-pile-300B-4096"])
    assert doc.model.num_layers == 22 and doc.model.vocab_size == 50304
    assert doc.train.lr == 4e-3 and doc.train.warmup_iters == 25000
    assert doc.train.checkpoint_iters[-1] == doc.train.train_iters == 72661
    assert doc.data.prefixes == tuple(
        f"results/data/tokenized/pile/group_{g:03d}" for g in range(30)
    )  # all 30 (one file each)
    assert doc == run_document(load_grid(RELEASE), load_grid(RELEASE).runs["0.13b-pile-300B-4096"])


def test_defaults_are_the_0_01_architecture(release_grid):
    spec = release_grid.runs["1.7b-c4-300B-4096"].spec
    assert (spec.norm_epsilon, spec.rotary_base, spec.kv_channels) == (1e-5, 10000, 64)
    assert spec.qk_layernorm and spec.add_bias_linear and spec.tie_embeddings and spec.swiglu
    assert (spec.hidden_dropout, spec.attention_dropout, spec.seq_length) == (0.1, 0.1, 4096)
    assert spec.family == "hy_v3"
    assert padded_vocab_size(50277) == 50304 and padded_vocab_size(50277, tensor_parallel=2) == 50432


def test_swiglu_means_silu_in_megatron():
    import torch.nn.functional as F

    spec = ModelSpec(name="x", num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=1)
    kwargs = spec.transformer_config_kwargs()
    assert kwargs["gated_linear_unit"] and kwargs["activation_func"] is F.silu


def test_demo_config_is_valid():
    grid = load_grid(DEMO)
    (run,) = grid.runs.values()
    assert run.run_id == "tiny-pydocs-0.25M-128"
    assert run.train_iters == 245 and run.checkpoint_iters == (50, 100, 150, 200, 245)
    assert run.segment_ends == (100, 200, 245)
    assert set(grid.shot_sets) == {"0shot", "2shot"}


def test_budget_units():
    assert budget_tokens("300B") == 300_000_000_000
    assert budget_tokens("1T") == 10**12
    assert budget_tokens("0.25M") == 250_000
    assert budget_tokens(1234) == 1234


def test_model_spec_from_config_ignores_resources():
    spec = ModelSpec.from_config(
        "x",
        {
            "num_layers": 2,
            "hidden_size": 8,
            "ffn_hidden_size": 16,
            "num_attention_heads": 2,
            "resources": {},
            "global_batch_size": 4,
        },
    )
    assert spec.num_layers == 2


# ---- bad configs: each fails before anything runs, naming the key ------------------------------------


def test_misspelled_key_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"warmup_iter": 5}))
    assert "recipes.open-sci-ref-0.01" in msg and "'warmup_iter'" in msg


def test_misspelled_top_level_key(release_raw):
    msg = bad(release_raw, lambda c: c.update({"experiment": []}))
    assert "unknown key 'experiment'" in msg


def test_unknown_scale_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["experiments"][0]["scales"].append("0.2b"))
    assert "experiments[0].scales[4]: unknown scale '0.2b'" in msg


def test_unknown_dataset_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["experiments"][1]["datasets"].append("redpajama"))
    assert "experiments[1].datasets[3]: unknown dataset 'redpajama'" in msg


def test_wrong_type_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["scales"]["0.4b"].update({"num_layers": "22"}))
    assert "scales.0.4b.num_layers" in msg and "not of type 'integer'" in msg


def test_negative_budget(release_raw):
    msg = bad(release_raw, lambda c: c["experiments"][0].update({"budgets": [-5]}))
    assert "experiments[0].budgets[0]" in msg


def test_malformed_budget(release_raw):
    msg = bad(release_raw, lambda c: c["experiments"][0].update({"budgets": ["300G"]}))
    assert "experiments[0].budgets[0]" in msg


def test_duplicate_run_id(release_raw):
    def dup(c):
        c["experiments"].append(copy.deepcopy(c["experiments"][1]))

    assert "duplicate run id '1.7b-dclm-1T-4096'" in bad(release_raw, dup)


def test_unknown_eval_task(release_raw):
    msg = bad(
        release_raw,
        lambda c: c["evaluation"]["protocols"]["open-sci-ref-0.01"].append(
            {"task": "hellaswagg", "shots": 10, "metric": "acc"}
        ),
    )
    assert "unknown eval task 'hellaswagg'" in msg and "evaluation.protocols.open-sci-ref-0.01[12].task" in msg


def test_walltime_shorter_than_one_save_interval(release_raw):
    msg = bad(release_raw, lambda c: c["scales"]["1.7b"]["resources"].update({"walltime": "30m"}))
    assert "scales.1.7b.resources.walltime" in msg and "shorter than one save interval" in msg


def test_batch_not_divisible_by_micro_batch_times_dp(release_raw):
    msg = bad(release_raw, lambda c: c["scales"]["1.3b"]["resources"].update({"micro_batch_size": 5}))
    assert "global_batch_size 1008 is not divisible by micro_batch_size 5 x data-parallel size 252" in msg


def test_missing_required_path_of_a_source(release_raw):
    msg = bad(release_raw, lambda c: c["datasets"]["c4"].pop("repo_id"))
    assert "datasets.c4.repo_id: required for source 'hub'" in msg


def test_parity_tolerance_per_run(release_raw):
    config = copy.deepcopy(release_raw)
    config["overrides"]["0.13b-c4-300B-4096"] = {"parity_tolerance": 0.01}
    runs = load_grid(config).runs
    assert runs["0.13b-c4-300B-4096"].parity_tolerance == 0.01
    assert runs["0.4b-c4-300B-4096"].parity_tolerance == config["evaluation"]["parity_tolerance"] == 1e-3
    assert "lr" in runs["0.13b-c4-300B-4096"].recipe and "parity_tolerance" not in runs["0.13b-c4-300B-4096"].recipe
    assert "overrides.0.13b-c4-300B-4096.parity_tolerance" in bad(
        release_raw, lambda c: c["overrides"].update({"0.13b-c4-300B-4096": {"parity_tolerance": 0}})
    )


def test_override_of_unknown_run(release_raw):
    msg = bad(release_raw, lambda c: c["overrides"].update({"0.13b-c5-300B-4096": {"lr": 1e-3}}))
    assert "overrides: no run with id '0.13b-c5-300B-4096'" in msg


def test_eval_iterations_must_be_checkpoints(release_raw):
    msg = bad(release_raw, lambda c: c["evaluation"].update({"iterations": [2000, 2500]}))
    assert "evaluation.iterations: [2500] are not saved checkpoints" in msg


def test_unknown_protocol(release_raw):
    assert "evaluation.protocol: unknown protocol 'v2'" in bad(
        release_raw, lambda c: c["evaluation"].update({"protocol": "v2"})
    )


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)


def test_select_restricts_the_grid(release_raw):
    config = copy.deepcopy(release_raw)
    config["select"] = {"scales": ["1.7b"], "datasets": ["dclm"]}
    assert sorted(load_grid(config).runs) == ["1.7b-dclm-1T-4096", "1.7b-dclm-300B-4096"]


def test_eval_every_k_keeps_the_last(release_raw):
    config = copy.deepcopy(release_raw)
    config["evaluation"]["every"] = 10
    run = load_grid(config).runs["1.7b-pile-300B-4096"]
    assert run.eval_iters == (20000, 40000, 60000, 72661)


def test_plan_warns_when_a_budget_needs_many_epochs(release_raw):
    config = copy.deepcopy(release_raw)
    config["datasets"]["c4"]["tokens_per_byte"] = 50e9 / config["datasets"]["c4"]["approx_bytes"]
    rows = {r["run_id"]: r for r in plan_rows(load_grid(config))}
    assert rows["0.13b-c4-300B-4096"]["epochs"] == pytest.approx(6.0, rel=1e-3)
    assert "needs 6.0 epochs of c4" in rows["0.13b-c4-300B-4096"]["warning"]
    assert rows["1.3b-c4-50B-4096"]["warning"] == ""
    assert rows["0.13b-pile-300B-4096"]["dataset_tokens_source"] == "catalog estimate"


def test_kernel_variants_per_device_and_precision(release_raw):
    """GPU runs get every fused kernel (osref/kernels.py), CPU runs none; megatron's fused
    cross-entropy only with bf16 (its logit gradient is bf16)."""
    grid = load_grid(release_raw)
    gpu = run_document(grid, grid.runs["1.7b-c4-300B-4096"]).train.kernels
    assert gpu == {
        "megatron_fusions": True,
        "fused_cross_entropy": True,
        "fused_adamw": True,
        "compile_layers": True,
        "sdpa_backends": ["cudnn", "flash", "efficient", "math"],
    }
    fp32 = copy.deepcopy(release_raw)
    fp32["recipes"]["open-sci-ref-0.01"].update(precision="fp32", kernels={"compile_layers": False})
    grid = load_grid(fp32)
    kernels = run_document(grid, grid.runs["1.7b-c4-300B-4096"]).train.kernels
    assert kernels["fused_cross_entropy"] is False and kernels["compile_layers"] is False and kernels["fused_adamw"]
    demo = load_grid(DEMO)
    (run,) = demo.runs.values()
    assert not any(v for v in run_document(demo, run).train.kernels.values())


def test_unknown_kernel_key_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"kernels": {"liger_rope": True}}))
    assert "recipes.open-sci-ref-0.01.kernels" in msg and "'liger_rope'" in msg
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"kernels": {"sdpa_backends": ["fa3"]}}))
    assert "recipes.open-sci-ref-0.01.kernels.sdpa_backends" in msg and "'fa3'" in msg


# ---- issue 11: what the schema alone let through -----------------------------------------------------


@pytest.mark.parametrize("budget", [3.0e11, 250000.0])
def test_float_budget_is_a_config_error_naming_the_key(release_raw, budget):
    """YAML reads `3.0e+11` and `250000.0` as floats; they used to reach the budget parser as a bare
    TypeError naming nothing."""
    msg = bad(release_raw, lambda c: c["experiments"][1].update({"budgets": [budget]}))
    assert f"experiments[1].budgets[0]: {budget!r} is not valid" in msg and f"write {int(budget)}" in msg


def test_float_where_an_integer_belongs_is_named(release_raw):
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"save_interval": 2000.0}))
    assert "recipes.open-sci-ref-0.01.save_interval: 2000.0 is not of type 'integer' (write 2000" in msg


def test_patterns_match_the_whole_value(release_raw):
    """`$` also matches before a final newline: a dataset named "c4\\n" used to pass the schema."""

    def rename(c):
        c["datasets"]["c4\n"] = c["datasets"].pop("c4")
        for exp in c["experiments"]:
            exp["datasets"] = ["c4\n" if d == "c4" else d for d in exp["datasets"]]

    msg = bad(release_raw, rename)
    assert "datasets: bad name 'c4\\n'" in msg
    assert "experiments[0].suffix" in bad(release_raw, lambda c: c["experiments"][0].update({"suffix": "x\n"}))


@pytest.mark.parametrize("where", ["evaluation", "override"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_parity_tolerance_must_be_finite(release_raw, where, value):
    """`.inf` published an export with swapped gate/up weights; `.nan` refused every export."""
    if where == "evaluation":
        msg = bad(release_raw, lambda c: c["evaluation"].update({"parity_tolerance": value}))
        assert f"evaluation.parity_tolerance: {value!r} is not a finite number" in msg
    else:
        msg = bad(release_raw, lambda c: c["overrides"].update({"0.13b-c4-300B-4096": {"parity_tolerance": value}}))
        assert f"overrides.0.13b-c4-300B-4096.parity_tolerance: {value!r} is not a finite number" in msg


def test_tokenizer_path_pointing_nowhere_fails_at_config_time(release_raw):
    msg = bad(release_raw, lambda c: c["tokenizer"].update({"path": "assets/gpt-neox-20b-missing"}))
    assert "tokenizer.path: 'assets/gpt-neox-20b-missing': cannot read" in msg and "tokenizer.json" in msg


def test_tokenizer_with_the_wrong_sha256_fails_at_config_time(release_raw):
    msg = bad(release_raw, lambda c: c["tokenizer"].update({"sha256": "0" * 64}))
    assert "tokenizer.sha256:" in msg and "the config says " + "0" * 64 in msg
    assert "tokenizer.sha256" in bad(release_raw, lambda c: c["tokenizer"].update({"sha256": "not-a-hash"}))


def test_duplicate_yaml_keys_are_named_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a whole second `scales:` section
    silently replaced the first."""
    text = DEMO.read_text()
    first = text.splitlines().index("scales:") + 1
    path = tmp_path / "twice.yaml"
    path.write_text(
        text + "\nscales:\n  tiny: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 192, num_attention_heads: 4}\n"
    )
    second = path.read_text().splitlines().index("scales:", first) + 1
    with pytest.raises(ConfigError, match=f"twice.yaml: duplicate key 'scales' on lines {first} and {second}"):
        load_config(path)
    path.write_text("datasets:\n  a: {source: local, format: jsonl}\n  b:\n    source: local\n    source: hub\n")
    with pytest.raises(ConfigError, match="duplicate key 'source' on lines 4 and 5"):
        load_config(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")
    from osref.config import read_yaml

    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}


def test_warmup_longer_than_the_run_names_the_conflicting_keys(release_raw):
    """A seq length 16x the 0.01 one leaves 4542 iterations for the 300B budget, under the 25000
    warm-up: the message names warm-up, budget, batch and seq-length keys, not just the warm-up."""
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"seq_length": 65536}))
    assert "recipes.open-sci-ref-0.01.warmup_iters = 25000 >= its 4542 iterations" in msg
    assert "experiments[0].budgets[0] = 300B" in msg and "scales.0.13b.global_batch_size = 1008" in msg
    assert "recipes.open-sci-ref-0.01.seq_length = 65536" in msg
    override = bad(release_raw, lambda c: c["overrides"]["0.13b-c4-300B-4096"].update({"seq_length": 65536}))
    assert "overrides.0.13b-c4-300B-4096.seq_length = 65536" in override
    assert "overrides.0.13b-c4-300B-4096.global_batch_size = 1024" in override


def test_shell_reaching_names_are_restricted(release_raw):
    assert "cluster.nccl_env: bad name 'X;touch /tmp/pwned'" in bad(
        release_raw, lambda c: c["cluster"].update({"nccl_env": {"X;touch /tmp/pwned": "1"}})
    )
    assert "paths.results" in bad(release_raw, lambda c: c["paths"].update({"results": "out/{run_id}"}))


@pytest.mark.parametrize("split", ["0,10,1", "0,0,0"])
def test_a_split_without_a_training_share_is_named(release_raw, split):
    """Used to pass validation and end in a bare ZeroDivisionError when the shard groups were sized."""
    msg = bad(release_raw, lambda c: c["recipes"]["open-sci-ref-0.01"].update({"split": split}))
    assert f"recipes.open-sci-ref-0.01.split: '{split}' gives training no share" in msg
