"""Export parity: real megatron GPTModel → real torch_dist checkpoint → HF directory, per flavour.

Every model has randomised weights, norm weights and biases, so a wrong mapping cannot hide behind
ones and zeros. The negative controls inject one classic converter bug each (by monkeypatching a
small private function of ``osref.export`` or wrapping its mapping) and must be stopped by the gate.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from osref import export
from osref.export import ParityError, export_checkpoint, megatron_to_hf_state_dict, read_torch_dist_checkpoint
from osref.model_spec import ModelSpec

torch.set_num_threads(1)

TINY_RUN = Path(__file__).parent / "data" / "tiny_run.json"
# Measured values are appended here and printed at the end of the session (pytest -s shows them).
MEASURED: dict[str, float] = {}


def make_run(tmp_path: Path, **model_overrides) -> dict:
    run = json.loads(TINY_RUN.read_text())
    run["model"].update(num_query_groups=2, ffn_hidden_size=96, seq_length=32)
    run["model"].update(model_overrides)
    run["train"]["seq_length"] = run["model"]["seq_length"]
    run["paths"]["run_dir"] = str(tmp_path / "run")
    return run


def randomise(model, seed: int) -> None:
    """Non-trivial weights: norms around 1, biases around 0, matrices ~ 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name or "layer_norm_weight" in name:
                param.copy_(1.0 + 0.3 * noise)
            elif param.dim() == 1:
                param.copy_(0.2 * noise)
            elif "word_embeddings" in name or "output_layer" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)


def build_model(run: dict):
    from osref.megatron_compat import enable_cpu_guards, init_single_process_parallel
    from osref.megatron_model import build_gpt_model

    enable_cpu_guards()
    init_single_process_parallel()
    return build_gpt_model(ModelSpec(**run["model"]), seed=run["train"]["seed"], attention="local", device="cpu")


def save_torch_dist(model, run: dict, iteration: int) -> Path:
    """Save like training does (model under "model", torch_dist) and mark the checkpoint complete."""
    from megatron.core import dist_checkpointing

    from osref import checkpointing

    target = checkpointing.checkpoint_dir(run["paths"]["run_dir"], iteration)
    target.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(target))
    checkpointing.write_json_atomic(target / checkpointing.COMPLETE_MARKER, {"iteration": iteration})
    return target


def make_checkpoint(tmp_path: Path, iteration: int = 10, seed: int = 7, **model_overrides) -> tuple[dict, object]:
    run = make_run(tmp_path, **model_overrides)
    model = build_model(run)
    randomise(model, seed)
    save_torch_dist(model, run, iteration)
    return run, model


def assert_nothing_left(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]


FLAVOURS = {
    # the 0.01 flavour: QK-norm + all biases, MHA, tied
    "hy_v3-mha-tied": dict(num_query_groups=None),
    "hy_v3-gqa-untied": dict(tie_embeddings=False),
    "qwen3-gqa-untied": dict(add_bias_linear=False, add_qkv_bias=False, tie_embeddings=False),
    "qwen3-qkvbias-tied": dict(add_bias_linear=False, add_qkv_bias=True),
    "llama-gqa-biases-tied": dict(qk_layernorm=False),
    "llama-nobias-untied": dict(qk_layernorm=False, add_bias_linear=False, add_qkv_bias=False, tie_embeddings=False),
}
EXPECTED_CLASS = {"hy_v3": "HYV3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("case", list(FLAVOURS))
def test_parity_per_flavour(tmp_path, case):
    run, _ = make_checkpoint(tmp_path, **FLAVOURS[case])
    out = tmp_path / "hf"
    provenance = export_checkpoint(run, 10, out, dtype="float32")
    spec = ModelSpec(**run["model"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_CLASS[spec.family]]
    assert provenance["parity"]["max_abs_logit_diff"] < 1e-4
    MEASURED[f"parity {case} (fp32 export)"] = provenance["parity"]["max_abs_logit_diff"]


def test_read_torch_dist_matches_model_and_both_key_forms_map_equally(tmp_path):
    run, model = make_checkpoint(tmp_path, tie_embeddings=False)
    from osref import checkpointing

    stacked = read_torch_dist_checkpoint(checkpointing.checkpoint_dir(run["paths"]["run_dir"], 10))
    assert "decoder.layers.self_attention.linear_qkv.weight" in stacked  # layer-stacked form
    per_layer = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    spec = ModelSpec(**run["model"])
    from_stacked = megatron_to_hf_state_dict(stacked, spec)
    from_per_layer = megatron_to_hf_state_dict(per_layer, spec)
    assert from_stacked.keys() == from_per_layer.keys()
    for name in from_stacked:
        torch.testing.assert_close(from_stacked[name], from_per_layer[name], rtol=0, atol=0)


def test_unknown_megatron_tensor_is_rejected(tmp_path):
    run = make_run(tmp_path)
    model = build_model(run)
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    state["decoder.layers.0.self_attention.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="mystery"):
        megatron_to_hf_state_dict(state, ModelSpec(**run["model"]))


# ---- the 0.01 flavour end to end, and the negative controls on one shared checkpoint -----------


@pytest.fixture(scope="module")
def biased_gqa_run(tmp_path_factory):
    """hy_v3 flavour with GQA (4 heads, 2 groups) and untied output: every mapping path is exercised."""
    run, _ = make_checkpoint(tmp_path_factory.mktemp("biased"), tie_embeddings=False, seed=11)
    return run


def test_bf16_export_loads_generates_and_has_provenance(biased_gqa_run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    provenance = export_checkpoint(biased_gqa_run, 10, out)  # bf16 by default
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "provenance.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    MEASURED["parity hy_v3 bf16 export (reference rounded through bf16)"] = provenance["parity"]["max_abs_logit_diff"]
    MEASURED["max |logit| of that reference"] = provenance["parity"]["max_abs_logit"]
    assert provenance["parity"]["max_abs_logit_diff"] < 1e-4
    assert provenance["tokens_seen"] == 10 * 8 * 32
    assert provenance["dtype"] == "bfloat16" and provenance["hf_class"] == "HYV3ForCausalLM"
    assert json.loads((out / "provenance.json").read_text()) == provenance
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["head_dim"] == 16 and config["num_key_value_heads"] == 2 and config["vocab_size"] == 50304
    assert config["mlp_layer_types"] == ["dense", "dense"] and config["attention_bias"] and config["mlp_bias"]
    assert config["num_experts"] is None and config["tie_word_embeddings"] is False

    model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer("Hello world")["input_ids"] == [12092, 1533]
    prompt = tokenizer("Hello world", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 6)


def _swap_gate_up(fused, spec):
    gate, up = torch.chunk(fused, 2, dim=0)
    return up, gate


def _contiguous_qkv(fused, spec):
    q_rows, kv_rows = spec.num_attention_heads * spec.head_dim, spec.query_groups * spec.head_dim
    return tuple(torch.split(fused, [q_rows, kv_rows, kv_rows], dim=0))


def _wrap_mapping(monkeypatch, transform):
    original = export.megatron_to_hf_state_dict
    monkeypatch.setattr(export, "megatron_to_hf_state_dict", lambda sd, spec: transform(original(sd, spec)))


def _wrong_rope_base(monkeypatch):
    original = export.hf_config_for

    def with_wrong_base(spec, tokenizer_info):
        config = original(spec, tokenizer_info)
        config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
        return config

    monkeypatch.setattr(export, "hf_config_for", with_wrong_base)


NEGATIVE_CONTROLS = {
    "swapped-gate-up": lambda mp: mp.setattr(export, "_split_fc1", _swap_gate_up),
    "contiguous-qkv-split": lambda mp: mp.setattr(export, "_split_qkv", _contiguous_qkv),
    "rope-base-1e5-in-hf": _wrong_rope_base,
    "biases-zeroed": lambda mp: _wrap_mapping(
        mp, lambda sd: {k: (v * 0 if k.endswith(".bias") else v) for k, v in sd.items()}
    ),
    "mlp-biases-zeroed": lambda mp: _wrap_mapping(
        mp, lambda sd: {k: (v * 0 if ".mlp." in k and k.endswith(".bias") else v) for k, v in sd.items()}
    ),
}


@pytest.mark.parametrize("fault", list(NEGATIVE_CONTROLS))
def test_gate_catches_fault(biased_gqa_run, tmp_path, monkeypatch, fault):
    NEGATIVE_CONTROLS[fault](monkeypatch)
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match="max \\|Δlogit\\|") as caught:
        export_checkpoint(biased_gqa_run, 10, out, dtype="float32")
    MEASURED[f"negative control {fault}"] = caught.value.max_abs_logit_diff
    assert caught.value.max_abs_logit_diff > export.DEFAULT_TOLERANCE
    assert_nothing_left(out)


def test_gate_catches_dropped_biases_as_missing_keys(biased_gqa_run, tmp_path, monkeypatch):
    _wrap_mapping(monkeypatch, lambda sd: {k: v for k, v in sd.items() if not k.endswith(".bias")})
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match="missing_keys"):
        export_checkpoint(biased_gqa_run, 10, out, dtype="float32")
    assert_nothing_left(out)


def test_incomplete_checkpoint_is_refused(biased_gqa_run, tmp_path):
    run = copy.deepcopy(biased_gqa_run)
    with pytest.raises(FileNotFoundError, match="complete"):
        export_checkpoint(run, 20, tmp_path / "hf")


def test_cli_exit_codes(biased_gqa_run, tmp_path, capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "export_hf.py"
    module_spec = importlib.util.spec_from_file_location("export_hf_cli", script)
    cli = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(cli)
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(biased_gqa_run))
    common = ["--run-json", str(run_json), "--iteration", "10", "--dtype", "float32"]

    assert cli.main(common + ["--out", str(tmp_path / "strict"), "--tolerance", "1e-12"]) == 2
    assert "PARITY FAILURE" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "strict")
    assert cli.main(common + ["--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "provenance.json").is_file()


# ---- issue 11: config.json against the spec, the tolerance, killed and concurrent exports -------


def _config_field(monkeypatch, field: str, value) -> None:
    original = export.hf_config_for

    def with_wrong_field(spec, tokenizer_info):
        config = original(spec, tokenizer_info)
        setattr(config, field, value)
        return config

    monkeypatch.setattr(export, "hf_config_for", with_wrong_field)


@pytest.mark.parametrize(
    "field, value, spec_value", [("rms_norm_eps", 1e-6, 1e-5), ("max_position_embeddings", 4096, 32)]
)
def test_config_json_must_match_the_spec(biased_gqa_run, tmp_path, monkeypatch, field, value, spec_value):
    """A config.json field that barely moves the logits, or not at all on the parity tokens:
    refused by the field check, although the logit gate alone lets it through."""
    _config_field(monkeypatch, field, value)
    out = tmp_path / "hf"
    with pytest.raises(ParityError, match=f"{field} = {value!r}, the spec says {spec_value!r}"):
        export_checkpoint(biased_gqa_run, 10, out, dtype="float32")
    assert_nothing_left(out)
    monkeypatch.setattr(export, "check_hf_config", lambda *args: None)  # the logit gate alone
    provenance = export_checkpoint(biased_gqa_run, 10, out, dtype="float32")
    MEASURED[f"{field} {value} instead of {spec_value}, logits only"] = provenance["parity"]["max_abs_logit_diff"]
    assert provenance["parity"]["max_abs_logit_diff"] < export.DEFAULT_TOLERANCE


@pytest.mark.parametrize("tolerance", [float("inf"), float("nan"), 0.0, -1e-3])
def test_parity_tolerance_must_be_finite_and_positive(biased_gqa_run, tmp_path, tolerance):
    """An infinite tolerance published exports with swapped gate/up weights; NaN refused every one."""
    with pytest.raises(ValueError, match="must be a finite positive number"):
        export_checkpoint(biased_gqa_run, 10, tmp_path / "hf", dtype="float32", tolerance=tolerance)
    assert not (tmp_path / "hf").exists()
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(biased_gqa_run))
    proc = subprocess.run(
        [
            sys.executable,
            str(EXPORT_CLI),
            "--run-json",
            str(run_json),
            "--iteration",
            "10",
            "--out",
            str(tmp_path / "hf"),
            "--tolerance",
            str(tolerance),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "must be a finite positive number" in proc.stderr, proc.stderr[-2000:]


EXPORT_CLI = Path(__file__).resolve().parents[1] / "scripts" / "export_hf.py"


def _start_export(run: dict, tmp_path: Path, out: Path) -> subprocess.Popen:
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(run))
    return subprocess.Popen(
        [
            sys.executable,
            str(EXPORT_CLI),
            "--run-json",
            str(run_json),
            "--iteration",
            "10",
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the export ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_killed_export_leaves_a_temporary_that_the_next_attempt_removes(biased_gqa_run, tmp_path):
    """A real export CLI SIGKILLed after writing its weights leaves `.iter_0000010.tmp-PID` (at
    1.7B about 3.4 GB); the next export of the same target removes it, and succeeds."""
    out = tmp_path / "hf" / "iter_0000010"
    first = _start_export(biased_gqa_run, tmp_path, out)
    leftover = out.parent / f".{out.name}.tmp-{first.pid}"
    try:
        _wait_for(leftover / "model.safetensors", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert leftover.is_dir() and not out.exists()

    again = _start_export(biased_gqa_run, tmp_path, out)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert f"removing {leftover}, left behind by a killed export" in stderr
    assert (out / "provenance.json").is_file()
    assert not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_a_live_export_is_never_disturbed_by_a_second_one(biased_gqa_run, tmp_path):
    """Two exports of one target (two Snakemake instances): the second is refused naming the first
    (which is frozen with SIGSTOP mid-write, so surely alive), leaves its temporary alone; the first,
    continued, finishes."""
    import socket

    out = tmp_path / "hf" / "iter_0000010"
    first = _start_export(biased_gqa_run, tmp_path, out)
    live = out.parent / f".{out.name}.tmp-{first.pid}"
    try:
        _wait_for(live / "config.json", first)
        os.killpg(first.pid, signal.SIGSTOP)
        second = _start_export(biased_gqa_run, tmp_path, out)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 3, stderr[-3000:]
        assert f"on host {socket.gethostname()}, pid {first.pid}" in stderr
        assert live.is_dir() and not out.exists()
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert (out / "provenance.json").is_file() and not live.exists()


# ---- a TP=2 checkpoint consolidates to the same weights -----------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reshard_to_tp2(rank: int, world_size: int, port: int, run: dict, source: str, target: str) -> None:
    """Rank body (spawned): load the TP=1 checkpoint into a TP=2 model and save it as TP=2 torch_dist."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from osref.megatron_compat import enable_cpu_guards
    from osref.megatron_model import build_gpt_model

    torch.set_num_threads(1)
    enable_cpu_guards()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    model = build_gpt_model(
        ModelSpec(**run["model"]), tensor_parallel=2, seed=run["train"]["seed"], attention="local", device="cpu"
    )
    with torch.no_grad():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, source)
        model.load_state_dict(loaded["model"])
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] == 64  # half of 128 rows
    if rank == 0:
        Path(target).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, target)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_tp2_checkpoint_consolidates_and_exports(biased_gqa_run, tmp_path):
    import torch.multiprocessing as mp

    from osref import checkpointing

    source = checkpointing.checkpoint_dir(biased_gqa_run["paths"]["run_dir"], 10)
    tp2_run = copy.deepcopy(biased_gqa_run)
    tp2_run["paths"]["run_dir"] = str(tmp_path / "run_tp2")
    target = checkpointing.checkpoint_dir(tp2_run["paths"]["run_dir"], 10)
    mp.spawn(_reshard_to_tp2, args=(2, _free_port(), tp2_run, str(source), str(target)), nprocs=2, join=True)
    checkpointing.write_json_atomic(target / checkpointing.COMPLETE_MARKER, {"iteration": 10})
    assert {p.name for p in target.glob("__*_0.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    tp1, tp2 = read_torch_dist_checkpoint(source), read_torch_dist_checkpoint(target)
    assert tp1.keys() == tp2.keys()
    for key in tp1:
        torch.testing.assert_close(tp2[key], tp1[key], rtol=0, atol=0)
    provenance = export_checkpoint(tp2_run, 10, tmp_path / "hf", dtype="float32")
    MEASURED["parity hy_v3 from TP=2 checkpoint"] = provenance["parity"]["max_abs_logit_diff"]
    assert provenance["parity"]["max_abs_logit_diff"] < 1e-4


def teardown_module(module):
    if MEASURED:
        print("\nmeasured max |Δlogit|:")
        for name, value in MEASURED.items():
            print(f"  {name}: {value:.3g}")
