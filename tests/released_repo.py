"""A synthetic released open-sci-ref checkpoint repo, in the release's layout, for the local hub.

What the real ``open-sci/open-sci-ref-v0.01-*`` repos hold (shared notes §5): ``main`` = the final
checkpoint, one branch ``iter_XXXXXXX`` per saved iteration; each commit has a ``config.json`` with
``model_type: opensci``, ``auto_map`` into the remote code, ``num_key_value_heads`` as Megatron's
``num_query_groups=1`` (wrong for multi-head attention), bf16 safetensors with the released tensor
names, the remote-code files (here the stand-ins of tests/data/released/, which record any execution
of themselves), the GPT-NeoX tokenizer files, a README and ``.gitattributes``. Weights are random
(seeded by iteration), sized so the demo's tokenizer and local tasks work with them.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from hub_server import Repo

ROOT = Path(__file__).resolve().parent.parent
REMOTE_CODE = Path(__file__).resolve().parent / "data" / "released"
TOKENIZER = ROOT / "assets" / "gpt-neox-20b"
SHAPE = {"hidden": 64, "heads": 4, "layers": 2, "ffn": 96, "vocab": 50304}


def released_config(hidden: int, heads: int, layers: int, ffn: int, vocab: int, iteration: int, **overrides) -> dict:
    """A released config.json (keys and values as in the release; num_key_value_heads = 1 as megatron stores it)."""
    config = {
        "_name_or_path": f"/leonardo_work/opensci/checkpoints/hf/iter_{iteration:07d}",
        "architectures": ["OpensciForCausalLM"],
        "model_type": "opensci",
        "auto_map": {
            "AutoConfig": "configuration_opensci.OpensciConfig",
            "AutoModelForCausalLM": "modeling_opensci.OpensciForCausalLM",
        },
        "attention_bias": True,
        "mlp_bias": True,
        "attention_dropout": 0.1,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": 1,
        "pretraining_tp": 1,
        "qk_layernorm": True,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    config.update(overrides)
    return config


def released_tensors(
    hidden: int, heads: int, layers: int, ffn: int, vocab: int, kv_heads: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights under the released tensor names (biases on every linear, per-head QK norm weights)."""
    g = torch.Generator().manual_seed(seed)
    head_dim, kv = hidden // heads, (kv_heads or heads) * (hidden // heads)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1.0 + rand(n, scale=0.3)

    t = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0), "model.norm.weight": norm(hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        for name, rows, cols in (
            ("self_attn.q_proj", hidden, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, hidden),
            ("mlp.gate_proj", ffn, hidden),
            ("mlp.up_proj", ffn, hidden),
            ("mlp.down_proj", hidden, ffn),
        ):
            t[p + name + ".weight"] = rand(rows, cols)
            t[p + name + ".bias"] = rand(rows)
        t[p + "input_layernorm.weight"] = norm(hidden)
        t[p + "post_attention_layernorm.weight"] = norm(hidden)
        t[p + "self_attn.q_layernorm.weight"] = norm(head_dim)
        t[p + "self_attn.k_layernorm.weight"] = norm(head_dim)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()  # tied copy, as some exports store it
    return t


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def commit_files(iteration: int, modeling: str | None = None) -> dict[str, bytes]:
    """The files of one released commit (the checkpoint at ``iteration``)."""
    files = {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlicense: apache-2.0\n---\n# open-sci-ref 0.01 (synthetic test repo)\n",
        "config.json": json.dumps(released_config(**SHAPE, iteration=iteration), indent=2).encode(),
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 0}).encode(),
        "model.safetensors": _safetensors_bytes(released_tensors(**SHAPE, seed=iteration)),
        "modeling_opensci.py": (modeling or (REMOTE_CODE / "modeling_opensci.py").read_text()).encode(),
        "configuration_opensci.py": (REMOTE_CODE / "configuration_opensci.py").read_bytes(),
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (TOKENIZER / name).is_file():
            files[name] = (TOKENIZER / name).read_bytes()
    return files


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # a fake commit id


@functools.cache
def _cached_commit(iteration: int) -> tuple[tuple[str, bytes], ...]:
    return tuple(commit_files(iteration).items())


def released_repo(iterations: tuple[int, ...], final: int, modeling: str | None = None) -> Repo:
    """A model repo: branch ``iter_XXXXXXX`` for each of ``iterations``, ``main`` = ``final``."""
    commits, refs = {}, {}
    for iteration in (*iterations, final):
        files = dict(_cached_commit(iteration)) if modeling is None else commit_files(iteration, modeling)
        sha = _sha(f"{iteration}-{modeling is not None}")
        commits[sha] = files
        refs["main" if iteration == final else f"iter_{iteration:07d}"] = sha
    return Repo(commits=commits, refs=refs, lfs_suffixes=(".safetensors",))


def other_repo() -> Repo:
    """Any small model repo (another run of the same owner): only its name matters to the tests."""
    sha = _sha("other")
    return Repo(commits={sha: {"config.json": b"{}"}}, refs={"main": sha}, lfs_suffixes=(".safetensors",))
