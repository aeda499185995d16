"""Convert a released open-sci-ref 0.01 checkpoint (``open-sci/open-sci-ref-v0.01-*``) to our export format.

The published 0.01 models are the targets our reproduction is compared against, so they must be
evaluated by the same code path as our own exports. They cannot simply be loaded as published:
they are ``model_type: opensci`` with remote code (``OpensciForCausalLM``) written for a transformers
4.x development snapshot, which breaks on transformers 5.x and, once patched to load, silently
zeroes the RoPE ``inv_freq`` buffer (logits off by about 0.66, no error). The architecture is the
one our exporter already targets exactly with ``HYV3ForCausalLM`` (see :mod:`osref.export`), so
this module renames the released tensors into that class and writes the same directory layout as
:func:`osref.export.export_checkpoint`: config from a :class:`~osref.model_spec.ModelSpec` via
:func:`osref.export.hf_config_for`, ``model.safetensors``, the GPT-NeoX tokenizer files and a
``provenance.json`` with ``"converted_from": "released"``.

Released tensor names (``LAION-AI/Open-Sci-hf``, ``modeling_opensci.py``: a Llama-style module tree
plus per-head QK norms kept under Megatron's names)::

    model.embed_tokens.weight                                   -> same
    model.layers.N.input_layernorm.weight                       -> same
    model.layers.N.post_attention_layernorm.weight              -> same
    model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}       -> same
    model.layers.N.self_attn.q_layernorm.weight   [head_dim]    -> model.layers.N.self_attn.q_norm.weight
    model.layers.N.self_attn.k_layernorm.weight   [head_dim]    -> model.layers.N.self_attn.k_norm.weight
    model.layers.N.mlp.{gate,up,down}_proj.{weight,bias}        -> same
    model.norm.weight                                           -> same
    lm_head.weight (tied; may be absent, must equal the embedding if present)   -> dropped
    model.rotary_emb.inv_freq (non-persistent; old files may hold it)           -> dropped

Assumption, not verified on real weights here: ``q_layernorm``/``k_layernorm`` hold the weights of
Megatron's per-head RMSNorm (the model was trained with ``--normalization RMSNorm --qk-layernorm``).
Drafts of the public remote code apply them as ``nn.LayerNorm(head_dim, bias=False)``, which also
subtracts the mean; ``HYV3`` applies RMSNorm, i.e. what training computed. Comparing one converted
model against the released remote code on real weights (transformers 4.48, network needed) settles it.

The KV-head count is taken from the tensors (``k_proj`` rows / head_dim), because the Megatron
checkpoints behind the release store ``num_query_groups=1`` for plain multi-head attention and a
config derived from that would claim multi-query attention. An explicit ``kv_heads`` must agree with
the tensors; a disagreeing ``num_key_value_heads`` in ``config.json`` is recorded, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from osref import export
from osref.model_spec import ModelSpec

log = logging.getLogger(__name__)

RELEASED_MODEL_TYPE = "opensci"
DEFAULT_TOKENIZER_DIR = export.REPO_ROOT / "assets" / "gpt-neox-20b"

# Every key a released config.json may carry. An unknown key may change the architecture, so it is
# an error until someone has read what it means and added it here (and, if it matters, to the mapping).
KNOWN_CONFIG_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "layer_norm_eps", "qk_layernorm", "rope_theta", "rope_scaling", "attention_bias",
    "attention_dropout", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "pretraining_tp", "use_cache",
})
REQUIRED_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings")

_RELEASED_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMED_LAYER_SUFFIXES = {"self_attn.q_layernorm.weight": "self_attn.q_norm.weight",
                           "self_attn.k_layernorm.weight": "self_attn.k_norm.weight"}
_DROPPED_KEY_SUFFIX = "rotary_emb.inv_freq"
_ITERATION_NAME = re.compile(r"iter_(\d{7})")


class ReleasedFormatError(ValueError):
    """The directory is not a released open-sci-ref checkpoint this converter understands."""


# ---- config -> ModelSpec -----------------------------------------------------------------------


def _check_config_values(config: dict[str, Any]) -> None:
    unknown = sorted(set(config) - KNOWN_CONFIG_KEYS)
    if unknown:
        raise ReleasedFormatError(f"released config has unknown key(s) {unknown}: check what they change "
                                  "and add them to osref.released.KNOWN_CONFIG_KEYS")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ReleasedFormatError(f"released config lacks key(s) {missing}")

    def require(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ReleasedFormatError(f"released config key {key!r} = {config.get(key)!r}: expected {expected}")

    require("model_type", config["model_type"] == RELEASED_MODEL_TYPE, repr(RELEASED_MODEL_TYPE))
    require("hidden_act", config.get("hidden_act", "silu") == "silu", "'silu' (SwiGLU)")
    require("qk_layernorm", config.get("qk_layernorm", True) is True, "true (the 0.01 block has QK-norm)")
    require("rope_scaling", config.get("rope_scaling") is None, "null (plain RoPE)")
    require("pretraining_tp", config.get("pretraining_tp", 1) == 1, "1")
    require("mlp_bias", config.get("mlp_bias", False) == config.get("attention_bias", False),
            f"equal to attention_bias = {config.get('attention_bias')!r} (biases on all linears or none)")
    # The released code gives the QK norms layer_norm_eps and the block norms rms_norm_eps; HYV3 has one eps.
    require("layer_norm_eps", config.get("layer_norm_eps", config["rms_norm_eps"]) == config["rms_norm_eps"],
            f"equal to rms_norm_eps = {config['rms_norm_eps']!r}")
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    require("num_attention_heads", hidden % heads == 0, f"a divisor of hidden_size {hidden}")
    # The released code sizes the QK norms hidden // heads, whatever head_dim says.
    require("head_dim", config.get("head_dim") in (None, hidden // heads), f"null or {hidden // heads}")


def spec_from_released_config(config: dict[str, Any], kv_heads: int, name: str = "released") -> ModelSpec:
    """The :class:`ModelSpec` of a released checkpoint with ``kv_heads`` key/value heads."""
    _check_config_values(config)
    heads = int(config["num_attention_heads"])
    if kv_heads < 1 or heads % kv_heads:
        raise ReleasedFormatError(f"{kv_heads} KV heads do not divide {heads} attention heads")
    bias = bool(config.get("attention_bias", False))
    dropout = float(config.get("attention_dropout", 0.0))
    return ModelSpec(
        name=name,
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        kv_channels=int(config["hidden_size"]) // heads,
        seq_length=int(config.get("max_position_embeddings", 4096)),
        vocab_size=int(config["vocab_size"]),
        rotary_base=float(config["rope_theta"]),
        norm_epsilon=float(config["rms_norm_eps"]),
        qk_layernorm=True,
        add_bias_linear=bias,
        add_qkv_bias=bias,
        tie_embeddings=bool(config["tie_word_embeddings"]),
        swiglu=True,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        init_method_std=float(config.get("initializer_range", 0.02)),
    )


# ---- tensors -------------------------------------------------------------------------------------


def safetensors_files(src: Path) -> list[Path]:
    """The weight files of ``src``: those listed in ``model.safetensors.index.json``, else ``*.safetensors``."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [src / name for name in names]
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ReleasedFormatError(f"{src}: no safetensors weights (pytorch_model.bin is not supported)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ReleasedFormatError(f"{src}: weight files {missing} listed in the index are missing")
    return files


def read_released_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(src):
        for key, tensor in load_file(str(path)).items():
            if key in tensors:
                raise ReleasedFormatError(f"tensor {key!r} appears in two weight files")
            tensors[key] = tensor
    return tensors


def kv_heads_from_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> int:
    key = "model.layers.0.self_attn.k_proj.weight"
    if key not in tensors:
        raise ReleasedFormatError(f"released checkpoint has no {key!r}")
    head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
    rows = tensors[key].shape[0]
    if rows % head_dim:
        raise ReleasedFormatError(f"{key} has {rows} rows, not a multiple of head_dim {head_dim}")
    return rows // head_dim


def expected_hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors an exported ``HF_CAUSAL_LM_CLASS[spec.family]`` file holds."""
    h, f, hd = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q_rows, kv_rows = spec.num_attention_heads * hd, spec.query_groups * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h), "self_attn.k_proj.weight": (kv_rows, h),
            "self_attn.v_proj.weight": (kv_rows, h), "self_attn.o_proj.weight": (h, q_rows),
            "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
        }
        if spec.add_bias_linear:
            layer.update({
                "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
                "self_attn.v_proj.bias": (kv_rows,), "self_attn.o_proj.bias": (h,),
                "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (h,),
            })
        shapes.update({p + suffix: shape for suffix, shape in layer.items()})
    return shapes


def released_to_hf_state_dict(released: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Rename released tensors to ``HYV3ForCausalLM`` names; strict on names and shapes."""
    hf: dict[str, torch.Tensor] = {}
    for key, tensor in released.items():
        if key.endswith(_DROPPED_KEY_SUFFIX):
            continue
        if key == "lm_head.weight" and spec.tie_embeddings:
            embedding = released.get("model.embed_tokens.weight")
            if embedding is None or not torch.equal(tensor, embedding):
                raise ReleasedFormatError("config says tied embeddings but 'lm_head.weight' differs from the embedding")
            continue
        layer = _RELEASED_LAYER_KEY.match(key)
        if layer and layer.group(2) in _RENAMED_LAYER_SUFFIXES:
            key = f"model.layers.{layer.group(1)}.{_RENAMED_LAYER_SUFFIXES[layer.group(2)]}"
        hf[key] = tensor
    expected = expected_hf_shapes(spec)
    unknown, missing = sorted(set(hf) - set(expected)), sorted(set(expected) - set(hf))
    if unknown or missing:
        raise ReleasedFormatError(f"released tensors do not match the {spec.family} layout of spec {spec.name}: "
                                  f"unknown {unknown[:8]}{' …' if len(unknown) > 8 else ''}, "
                                  f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}")
    wrong = {k: (tuple(hf[k].shape), shape) for k, shape in expected.items() if tuple(hf[k].shape) != shape}
    if wrong:
        raise ReleasedFormatError(f"tensor shapes (found, expected) disagree with the config: {dict(list(wrong.items())[:8])}")
    return hf


# ---- the conversion ------------------------------------------------------------------------------


def iteration_of(revision: str | None, config: dict[str, Any]) -> int | None:
    """Training iteration: from an ``iter_XXXXXXX`` revision, else from ``_name_or_path`` (``…/hf/iter_0072661`` on main)."""
    for text in (revision, config.get("_name_or_path")):
        match = _ITERATION_NAME.search(text or "")
        if match:
            return int(match.group(1))
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_released(
    src: str | Path,
    out: str | Path,
    *,
    source_repo: str | None = None,
    revision: str | None = None,
    kv_heads: int | None = None,
    dtype: str | None = None,
    tokenizer_dir: str | Path = DEFAULT_TOKENIZER_DIR,
) -> dict[str, Any]:
    """Write ``out`` (replacing it) from the released checkpoint directory ``src``; return the provenance.

    ``dtype`` None keeps the stored dtype (bf16 for the release). The directory is assembled next to
    ``out`` and renamed only after a strict reload (no missing/unexpected/mismatched key) and a
    finite forward pass.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ReleasedFormatError(f"{src}: no config.json")
    config = json.loads(config_path.read_text())
    _check_config_values(config)
    released = read_released_tensors(src)
    kv_heads_in_tensors = kv_heads_from_tensors(released, config)
    if kv_heads is not None and kv_heads != kv_heads_in_tensors:
        raise ReleasedFormatError(f"--kv-heads {kv_heads} disagrees with the tensors, whose k_proj holds "
                                  f"{kv_heads_in_tensors} heads")
    config_kv_heads = config.get("num_key_value_heads")
    if config_kv_heads is not None and int(config_kv_heads) != kv_heads_in_tensors:
        log.warning("config.json says num_key_value_heads=%s but the tensors hold %d KV heads; using the tensors",
                    config_kv_heads, kv_heads_in_tensors)
    spec = spec_from_released_config(config, kv_heads_in_tensors, name=source_repo or src.name)
    hf_state = released_to_hf_state_dict(released, spec)
    stored_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in hf_state.values()})
    if dtype is None:
        if len(stored_dtypes) != 1:
            raise ReleasedFormatError(f"mixed stored dtypes {stored_dtypes}: pass dtype explicitly")
        dtype = stored_dtypes[0]
    save_dtype = getattr(torch, dtype)

    eod = int(config.get("eos_token_id", 0))
    tokenizer_info = {"eod_id": eod}
    with export.atomic_directory(out) as tmp:
        save_file({name: t.to(save_dtype).contiguous() for name, t in hf_state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config = export.hf_config_for(spec, tokenizer_info)
        hf_config.dtype = dtype
        export._save_config(hf_config, tmp)
        GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod).save_pretrained(tmp)
        export._copy_tokenizer(Path(tokenizer_dir), tmp)

        model = export.load_hf_strict(tmp, torch.float32)
        logits = export.hf_logits(model, torch.arange(min(8, spec.vocab_size)).unsqueeze(0))
        del model
        if not torch.isfinite(logits).all():
            raise export.ParityError(f"converted model at {tmp} gives non-finite logits")

        provenance = {
            "converted_from": "released",
            "source_repo": source_repo,
            "revision": revision,
            "iteration": iteration_of(revision, config),
            "source_dir": str(src.resolve()),
            "source_config_sha256": _sha256(config_path),
            "source_weight_files": {p.name: p.stat().st_size for p in safetensors_files(src)},
            "source_config_num_key_value_heads": config_kv_heads,
            "kv_heads": kv_heads_in_tensors,
            "hf_class": export.HF_CAUSAL_LM_CLASS[spec.family],
            "dtype": dtype,
            "spec": spec.as_dict(),
            "tensor_renames": dict(_RENAMED_LAYER_SUFFIXES),
            "assumption": "q_layernorm/k_layernorm are per-head RMSNorm weights (as trained in megatron)",
            "code_version": export._code_version(),
            "libraries": export._library_versions(),
        }
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance
