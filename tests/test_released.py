"""Released open-sci-ref checkpoints → our HYV3 export: numeric parity against an independent forward.

The released format is rebuilt here with random weights (names and config keys as published by
``LAION-AI/Open-Sci-hf``) plus a stand-in for its remote code (tests/data/released/*.py, which
records any execution of itself), converted, loaded with plain ``AutoModelForCausalLM.from_pretrained``
and compared with a forward pass written from the architecture description, not from either model class.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import released_repo  # tests/ is on sys.path under pytest
import torch

from osref import released, remote_code

HIDDEN, HEADS, LAYERS, FFN, VOCAB, THETA, EPS = 64, 4, 2, 96, 256, 10000.0, 1e-5
HEAD_DIM = HIDDEN // HEADS
REMOTE_CODE = Path(__file__).resolve().parent / "data" / "released"
MODELING = (REMOTE_CODE / "modeling_opensci.py").read_text()
RMS_DECLARATION = "OpensciRMSNorm(self.head_dim, eps=config.layer_norm_eps)"


@pytest.fixture(autouse=True)
def executed_marker(tmp_path, monkeypatch) -> Path:
    """Where the stand-in remote code would record its own execution; every test asserts it never ran."""
    marker = tmp_path / "REMOTE_CODE_WAS_EXECUTED"
    monkeypatch.setenv("OSREF_TEST_EXECUTED_MARKER", str(marker))
    yield marker
    assert not marker.exists(), marker.read_text()


def released_config(**overrides) -> dict:
    """A released config.json of the test shape (fp32, 128 positions); tests/released_repo.py has the layout."""
    return released_repo.released_config(
        HIDDEN,
        HEADS,
        LAYERS,
        FFN,
        VOCAB,
        iteration=72661,
        **{
            "max_position_embeddings": 128,
            "torch_dtype": "float32",
            "rope_theta": THETA,
            "rms_norm_eps": EPS,
            "layer_norm_eps": EPS,
            **overrides,
        },
    )


def random_released_tensors(kv_heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return released_repo.released_tensors(HIDDEN, HEADS, LAYERS, FFN, VOCAB, kv_heads=kv_heads, seed=seed)


def write_released(
    directory: Path, config: dict, tensors: dict[str, torch.Tensor], modeling: str | None = MODELING
) -> Path:
    """A released checkpoint directory: config, weights and (unless ``modeling`` is None) the remote code."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    if modeling is not None:
        (directory / "modeling_opensci.py").write_text(modeling)
        (directory / "configuration_opensci.py").write_text((REMOTE_CODE / "configuration_opensci.py").read_text())
    return directory


def modeling_with(declaration: str, extra_class: str = "") -> str:
    """The stand-in remote code with the two QK norm constructors replaced by ``declaration``."""
    assert MODELING.count(RMS_DECLARATION) == 2
    return MODELING.replace(RMS_DECLARATION, declaration) + extra_class


# ---- independent reference forward of the opensci block ------------------------------------------


def rms_norm(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rotate_half_rope(x, positions):
    """x: [batch, heads, seq, head_dim]; non-interleaved RoPE (first half / second half pairs)."""
    inv_freq = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    first, second = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return x * cos + torch.cat([-second, first], -1) * sin


def reference_logits(t: dict[str, torch.Tensor], ids: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, seq = ids.shape
    positions = torch.arange(seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    x = t["model.embed_tokens.weight"][ids]
    for n in range(LAYERS):
        p = f"model.layers.{n}."

        def linear(name, inp, p=p):
            return inp @ t[p + name + ".weight"].T + t[p + name + ".bias"]

        h = rms_norm(x, t[p + "input_layernorm.weight"])
        q = linear("self_attn.q_proj", h).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = linear("self_attn.k_proj", h).view(batch, seq, kv_heads, HEAD_DIM).transpose(1, 2)
        v = linear("self_attn.v_proj", h).view(batch, seq, kv_heads, HEAD_DIM).transpose(1, 2)
        q = rotate_half_rope(rms_norm(q, t[p + "self_attn.q_layernorm.weight"]), positions)
        k = rotate_half_rope(rms_norm(k, t[p + "self_attn.k_layernorm.weight"]), positions)
        k = k.repeat_interleave(HEADS // kv_heads, dim=1)
        v = v.repeat_interleave(HEADS // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + linear("self_attn.o_proj", attention.transpose(1, 2).reshape(batch, seq, HIDDEN))
        h = rms_norm(x, t[p + "post_attention_layernorm.weight"])
        x = x + linear("mlp.down_proj", torch.nn.functional.silu(linear("mlp.gate_proj", h)) * linear("mlp.up_proj", h))
    return rms_norm(x, t["model.norm.weight"]) @ t["model.embed_tokens.weight"].T


# ---- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_converted_release_matches_reference_forward(tmp_path, kv_heads):
    from transformers import AutoModelForCausalLM

    tensors = random_released_tensors(kv_heads)
    src = write_released(tmp_path / "released", released_config(), tensors)
    provenance = released.convert_released(
        src, tmp_path / "hf", source_repo="open-sci/open-sci-ref-v0.01-test", revision="iter_0002000"
    )

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == "HYV3ForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = model(input_ids=ids).logits
    expected = reference_logits(tensors, ids, kv_heads)
    max_diff = (actual - expected).abs().max().item()
    assert max_diff < 1e-4, max_diff
    # the check has teeth: dropping the QK norms moves logits far beyond the tolerance
    no_qk_norm = {k: (torch.ones_like(v) if "_layernorm" in k and "self_attn" in k else v) for k, v in tensors.items()}
    assert (actual - reference_logits(no_qk_norm, ids, kv_heads)).abs().max().item() > 1e-2

    assert provenance["converted_from"] == "released"
    assert provenance["source_repo"] == "open-sci/open-sci-ref-v0.01-test"
    assert (provenance["revision"], provenance["iteration"]) == ("iter_0002000", 2000)
    assert provenance["kv_heads"] == kv_heads and provenance["source_config_num_key_value_heads"] == 1
    on_disk = json.loads((tmp_path / "hf" / "provenance.json").read_text())
    assert on_disk["hf_class"] == "HYV3ForCausalLM"
    assert on_disk["qk_norm"] == {
        "kind": "rmsnorm",
        "eps": EPS,
        "per_head": True,
        "declared": RMS_DECLARATION,
        "attributes": ["q_layernorm", "k_layernorm"],
    }
    assert on_disk["reference_forward"]["max_abs_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_theta"] == THETA and config["num_key_value_heads"] == kv_heads
    assert "auto_map" not in config  # nothing points transformers at the release's code
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    kept = tmp_path / "hf" / released.REMOTE_CODE_DIR / "modeling_opensci.py"
    assert kept.read_text() == MODELING  # kept for provenance, with its hash
    assert on_disk["remote_code"]["modeling_opensci.py"] == released._sha256(src / "modeling_opensci.py")
    assert not list((tmp_path / "hf").glob("*.py"))


def test_unknown_config_key_is_named(tmp_path):
    src = write_released(
        tmp_path / "released", released_config(use_sliding_window=True), random_released_tensors(HEADS)
    )
    with pytest.raises(released.ReleasedFormatError, match="use_sliding_window"):
        released.convert_released(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "key, value",
    [
        ("model_type", "llama"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("layer_norm_eps", 1e-6),
        ("hidden_act", "gelu"),
    ],
)
def test_wrong_config_value_is_named(key, value):
    with pytest.raises(released.ReleasedFormatError, match=key):
        released.spec_from_released_config(released_config(**{key: value}), kv_heads=HEADS)


def test_explicit_kv_heads_must_match_tensors(tmp_path):
    src = write_released(tmp_path / "released", released_config(), random_released_tensors(HEADS))
    with pytest.raises(released.ReleasedFormatError, match="kv-heads 2"):
        released.convert_released(src, tmp_path / "hf", kv_heads=2)


def test_unexpected_tensor_is_named():
    spec = released.spec_from_released_config(released_config(), kv_heads=HEADS)
    tensors = random_released_tensors(HEADS)
    tensors["model.layers.0.self_attn.extra_scale"] = torch.ones(1)
    with pytest.raises(released.ReleasedFormatError, match="extra_scale"):
        released.released_to_hf_state_dict(tensors, spec)


def test_spec_from_release_like_1p7b_config():
    config = released_config(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_hidden_layers=24,
        vocab_size=50304,
        max_position_embeddings=4096,
    )
    spec = released.spec_from_released_config(config, kv_heads=32)
    assert (spec.family, spec.head_dim, spec.query_groups, spec.seq_length) == ("hy_v3", 64, 32, 4096)
    assert abs(spec.parameter_count() / 1e6 - 1714.4) < 0.1  # notes §1, 1.7B total


def test_cli_converts_and_rejects(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_released", released.export.REPO_ROOT / "scripts" / "convert_released.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = write_released(tmp_path / "released", released_config(), random_released_tensors(HEADS))
    assert (
        cli.main(
            [
                "--src",
                str(src),
                "--out",
                str(tmp_path / "hf"),
                "--revision",
                "iter_0072661",
                "--kv-heads",
                str(HEADS),
                "--dtype",
                "bfloat16",
                "--iteration",
                "72661",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["iteration"] == 72661
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    bad = write_released(tmp_path / "bad", released_config(foo_bar=1), random_released_tensors(HEADS))
    assert cli.main(["--src", str(bad), "--out", str(tmp_path / "hf2")]) == 2
    assert "foo_bar" in capsys.readouterr().err


# ---- the QK norm, read from the release's remote code (never run) --------------------------------------


def test_qk_norm_is_read_from_the_remote_code_without_running_it():
    config = released_config(layer_norm_eps=1e-5)
    norm = remote_code.read_qk_norm(MODELING, config)
    assert (norm.kind, norm.eps, norm.per_head, norm.attributes) == (
        "rmsnorm",
        1e-5,
        True,
        ("q_layernorm", "k_layernorm"),
    )
    # transformers' own RMSNorm classes and an explicit number are read too
    norm = remote_code.read_qk_norm(modeling_with("Qwen3RMSNorm(self.head_dim, eps=1e-05)"), config)
    assert (norm.kind, norm.eps) == ("rmsnorm", 1e-5)
    # the class default when no eps is given (OpensciRMSNorm's eps=1e-6)
    assert remote_code.read_qk_norm(modeling_with("OpensciRMSNorm(self.head_dim)"), config).eps == 1e-6


BAD_QK_NORMS = {
    "layernorm": ("nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps, bias=False)", "", "is a layernorm"),
    "across heads": ("OpensciRMSNorm(config.hidden_size, eps=config.layer_norm_eps)", "", "across all heads"),
    "other eps": ("OpensciRMSNorm(self.head_dim, eps=1e-6)", "", "has eps 1e-06 but rms_norm_eps is 1e-05"),
    "unknown class": ("FancyNorm(self.head_dim, eps=config.layer_norm_eps)", "", "'FancyNorm' is unknown"),
    "local class, not RMS": (
        "OpensciScaleNorm(self.head_dim, eps=config.layer_norm_eps)",
        "\n\nclass OpensciScaleNorm(nn.Module):\n    def forward(self, x):\n"
        "        return self.weight * x / x.norm(dim=-1, keepdim=True)\n",
        "OpensciScaleNorm (defined in the file) is neither an RMSNorm",
    ),
    "local class subtracting the mean": (
        "OpensciCenteredNorm(self.head_dim, eps=config.layer_norm_eps)",
        "\n\nclass OpensciCenteredNorm(nn.Module):\n    def forward(self, x):\n        mu = x.mean(-1, keepdim=True)\n"
        "        x = x - mu\n        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)\n",
        "OpensciCenteredNorm (defined in the file) is neither an RMSNorm",
    ),
    "eps from a missing config key": (
        "OpensciRMSNorm(self.head_dim, eps=config.qk_norm_eps)",
        "",
        "config.qk_norm_eps, which the checkpoint's config.json lacks",
    ),
}


@pytest.mark.parametrize("kind", BAD_QK_NORMS)
def test_qk_norm_the_converter_does_not_know_is_refused_naming_it(tmp_path, kind):
    declaration, extra, expected = BAD_QK_NORMS[kind]
    src = write_released(
        tmp_path / "released",
        released_config(),
        random_released_tensors(HEADS),
        modeling=modeling_with(declaration, extra),
    )
    with pytest.raises(released.ReleasedFormatError, match="modeling_opensci.py") as error:
        released.convert_released(src, tmp_path / "hf")
    assert expected in str(error.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_remote_code_named_by_auto_map_must_be_there(tmp_path):
    src = write_released(tmp_path / "released", released_config(), random_released_tensors(HEADS), modeling=None)
    with pytest.raises(released.ReleasedFormatError, match="auto_map names 'modeling_opensci.OpensciForCausalLM'"):
        released.convert_released(src, tmp_path / "hf")
    config = released_config()
    del config["auto_map"]
    src = write_released(tmp_path / "plain", config, random_released_tensors(HEADS), modeling=None)
    with pytest.raises(released.ReleasedFormatError, match="assume_qk_norm"):
        released.convert_released(src, tmp_path / "hf")
    provenance = released.convert_released(src, tmp_path / "hf", assume_qk_norm="rmsnorm")
    assert provenance["qk_norm"]["declared"] == "assumed (no remote code)" and provenance["remote_code"] == {}


def test_reference_forward_gate_has_teeth(tmp_path):
    """The gate compares against a forward that would differ had the norm been a LayerNorm, and it blocks
    the output when the export does not reproduce the released tensors within the tolerance."""
    from transformers import AutoModelForCausalLM

    tensors = random_released_tensors(HEADS)
    src = write_released(tmp_path / "released", released_config(), tensors)
    released.convert_released(src, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = released.gate_tokens(VOCAB)
    with torch.no_grad():
        actual = model(input_ids=ids).logits
    norm = remote_code.read_qk_norm(MODELING, released_config())
    assert (actual - released.reference_logits(tensors, released_config(), ids, HEADS, norm)).abs().max() < 1e-4
    layernorm = remote_code.QKNorm("layernorm", EPS, True, "nn.LayerNorm(...)", ())
    assert (actual - released.reference_logits(tensors, released_config(), ids, HEADS, layernorm)).abs().max() > 1e-2
    with pytest.raises(released.export.ParityError, match="differs from the reference forward"):
        released.convert_released(src, tmp_path / "strict", tolerance=1e-12)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict.tmp-*"))


def test_iteration_must_match_the_planned_one(tmp_path):
    src = write_released(tmp_path / "released", released_config(), random_released_tensors(HEADS))
    with pytest.raises(
        released.ReleasedFormatError,
        match=r"revision .main. is training iteration 72661 \(from its name / config.json _name_or_path\), expected 70000",
    ):
        released.convert_released(src, tmp_path / "hf", revision="main", expected_iteration=70000)
    assert (
        released.convert_released(src, tmp_path / "hf", revision="main", expected_iteration=72661)["iteration"] == 72661
    )


# ---- scripts/prefetch_eval_data.py (kept here: it ships with the released-model evaluation path) ------

PREFETCH = released.export.REPO_ROOT / "scripts" / "prefetch_eval_data.py"
PROTOCOL = [{"task": "copa", "shots": 0, "metric": "acc"}, {"task": "mmlu", "shots": 5, "metric": "acc"}]


def run_prefetch(args, env_overrides, timeout=60):
    import os
    import subprocess
    import sys
    import time

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")
    }
    env.update(env_overrides)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(PREFETCH), *args], check=False, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    "env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["offline-switch", "unreachable-hub"]
)
def test_prefetch_fails_fast_naming_the_task(tmp_path, env):
    result, seconds = run_prefetch(
        [
            "--tasks-json",
            json.dumps(PROTOCOL),
            "--hf-home",
            str(tmp_path / "hf_home"),
            "--out",
            str(tmp_path / "marker.json"),
            "--connect-timeout",
            "3",
        ],
        env,
    )
    assert result.returncode == 2, result.stderr
    assert "'copa'" in result.stderr and "mmlu" in result.stderr
    assert seconds < 10, seconds
    assert not (tmp_path / "marker.json").exists()


def test_prefetch_local_task_writes_marker(tmp_path):
    import yaml

    data = tmp_path / "tasks" / "tiny_test.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"text": f"one two three {word}"}) + "\n" for word in ("four", "five")))
    (tmp_path / "tasks" / "tiny_local.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "tiny_local",
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity"}],
                "metadata": {"version": 1.0},
            }
        )
    )
    result, _ = run_prefetch(
        [
            "--tasks-json",
            json.dumps(
                [
                    {"task": "tiny_local", "shots": 0, "metric": "word_perplexity"},
                    {"task": "demo_lastword", "shots": 0, "metric": "acc"},
                ]
            ),
            "--hf-home",
            str(tmp_path / "hf_home"),
            "--out",
            str(tmp_path / "marker.json"),
            "--include-path",
            str(tmp_path / "tasks"),
            "--no-network-check",
        ],
        {"HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    marker = json.loads((tmp_path / "marker.json").read_text())
    entry = marker["tasks"]["tiny_local"]["datasets"][0]
    assert (entry["dataset_path"], entry["splits"]) == ("json", {"test": 2})
    assert marker["dataset_ids"] == ["json"]
