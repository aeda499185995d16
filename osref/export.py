"""Export a megatron-core torch_dist checkpoint to a Hugging Face model directory, behind a parity gate.

Evaluation (lm-eval) and anyone downloading the models consume Hugging Face directories, so every
scheduled checkpoint is converted. A conversion that loads without error can still be wrong (a
contiguous instead of per-group QKV split, gate and up swapped, a wrong RoPE base or dropped biases
all load cleanly), so :func:`export_checkpoint` only publishes a directory after the exported model
reproduced the megatron model's logits on the same tokens (:class:`ParityError` otherwise).

Which Hugging Face class represents which flavour (``ModelSpec.family``):

* ``hy_v3`` (QK-norm + biases on every linear layer, the open-sci-ref 0.01 flavour):
  ``HYV3ForCausalLM`` used all-dense (``mlp_layer_types=["dense"] * L``) with ``attention_bias`` and
  ``mlp_bias``. It is the only class native to transformers 5.x that is exact for this block (Qwen3
  has no MLP bias, Llama has no QK-norm) and it needs no ``trust_remote_code``. The trade-off: it does
  not exist in transformers 4.x, so these exports need transformers >= 5 to load.
* ``qwen3`` (QK-norm, no linear biases): ``Qwen3ForCausalLM``.
* ``llama`` (no QK-norm, biases optional): ``LlamaForCausalLM``.

Megatron names are accepted in every form a checkpoint may use: per-layer ``decoder.layers.N.…`` keys
(``model.state_dict()``) and layer-stacked torch_dist keys ``decoder.layers.…`` with a leading
``[num_layers]`` dimension; local-spec norm names (``input_layernorm``) and Transformer Engine names
(``linear_qkv.layer_norm_weight``). ``_extra_state`` entries are skipped. The weight mapping and
the measurements behind it are in ``notes/export-and-eval.md`` §3-4.

The gate has a second half: the written ``config.json``, read back the way ``transformers`` reads
it, must carry the spec's architecture field by field (:func:`check_hf_config`). Logits alone miss
a wrong field that barely moves them: an RMSNorm eps of 1e-6 instead of 1e-5, or a
``max_position_embeddings`` that no parity sequence reaches.

An export holds a lock next to its target (``.iter_XXXXXXX.lock``, ``osref.locks``) while it writes
``.iter_XXXXXXX.tmp-PID`` (:func:`osref.files.atomic_directory`); so every temporary of that target
found while holding it was left by a killed export, and is removed (a full model's size each).
:func:`write_hf_directory` is the one writer of a Hugging Face directory: the released converter
(:mod:`osref.released`) and the benchmarks use it too.

The parity gate compares in fp32 on both sides. For a bf16 export the megatron reference's weights
are rounded through bf16 first, so the gate checks the file as saved (not a fp32 twin of it) while
keeping an fp32-sized tolerance. A checkpoint trained in bf16 stores bf16 model weights anyway, so
for it this rounding changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from osref import checkpointing
from osref.contracts import RunDocument
from osref.files import atomic_directory, write_json_atomic
from osref.model_spec import ModelSpec
from osref.paths import REPO_ROOT

log = logging.getLogger(__name__)


HF_CAUSAL_LM_CLASS = {"hy_v3": "HYV3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

# fp32 conversion noise is ~1e-7..1e-5 on test models and should stay well under 1e-4 at 1.7B;
# the structural faults the gate exists for move logits by >= 0.09 (RoPE base) up to ~9 (QKV split).
DEFAULT_TOLERANCE = 1e-3
DEFAULT_PARITY_TOKENS = 64

# A fixed English sample for the parity check, so it runs on real token statistics.
PARITY_TEXT = (
    "The open reference models were trained on public datasets with a fixed recipe, so that anyone "
    "can compare a new dataset against them. Each checkpoint is converted to the Hugging Face format "
    "and evaluated on the same benchmarks: questions about science, common sense and reading. "
    "Small models learn slowly, but the curves still separate the datasets clearly."
)

_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron per-layer suffix -> canonical role; TE (fused-norm) names and local-spec names both appear.
_LAYER_ROLES = {
    "input_layernorm.weight": "input_norm",
    "self_attention.linear_qkv.layer_norm_weight": "input_norm",
    "pre_mlp_layernorm.weight": "post_attention_norm",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_norm",
    "self_attention.linear_qkv.weight": "qkv.weight",
    "self_attention.linear_qkv.bias": "qkv.bias",
    "self_attention.q_layernorm.weight": "q_norm",
    "self_attention.k_layernorm.weight": "k_norm",
    "self_attention.linear_proj.weight": "o_proj.weight",
    "self_attention.linear_proj.bias": "o_proj.bias",
    "mlp.linear_fc1.weight": "fc1.weight",
    "mlp.linear_fc1.bias": "fc1.bias",
    "mlp.linear_fc2.weight": "down_proj.weight",
    "mlp.linear_fc2.bias": "down_proj.bias",
}


class ParityError(RuntimeError):
    """The exported model does not reproduce the megatron model (or does not load strictly)."""

    def __init__(self, message: str, max_abs_logit_diff: float | None = None):
        super().__init__(message)
        self.max_abs_logit_diff = max_abs_logit_diff


# ---- weight mapping --------------------------------------------------------------------------


def _check_supported(spec: ModelSpec) -> None:
    if not spec.swiglu:
        raise ValueError(f"{spec.name}: only SwiGLU models can be exported (every target class is gated SiLU)")
    if spec.num_attention_heads % spec.query_groups:
        raise ValueError(
            f"{spec.name}: {spec.num_attention_heads} heads do not divide into {spec.query_groups} query groups"
        )


def _split_qkv(fused: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split megatron's fused QKV (weight or bias), whose rows are grouped per query group:
    ``[q heads of group g | k_g | v_g]`` for each g — not a contiguous [Q; K; V]."""
    groups, head_dim = spec.query_groups, spec.head_dim
    heads_per_group = spec.num_attention_heads // groups
    expected_rows = groups * (heads_per_group + 2) * head_dim
    if fused.shape[0] != expected_rows:
        raise ValueError(
            f"linear_qkv has {fused.shape[0]} rows, spec {spec.name} implies {expected_rows} "
            f"({spec.num_attention_heads} heads, {groups} groups, head_dim {head_dim})"
        )
    trailing = fused.shape[1:]
    grouped = fused.reshape(groups, heads_per_group + 2, head_dim, *trailing)
    q = grouped[:, :heads_per_group].reshape(groups * heads_per_group * head_dim, *trailing)
    k = grouped[:, heads_per_group].reshape(groups * head_dim, *trailing)
    v = grouped[:, heads_per_group + 1].reshape(groups * head_dim, *trailing)
    return q, k, v


def _split_fc1(fused: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron ``linear_fc1`` rows are ``[gate (SiLU branch); up]``; returns (gate, up)."""
    gate, up = torch.chunk(fused, 2, dim=0)
    return gate, up


def _per_layer_tensors(
    megatron_sd: dict[str, torch.Tensor], num_layers: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group layer tensors by layer index and role; return (layers, non-layer tensors)."""
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    others: dict[str, torch.Tensor] = {}

    def put(layer: int, suffix: str, tensor: torch.Tensor, key: str) -> None:
        role = _LAYER_ROLES.get(suffix)
        if role is None:
            raise ValueError(f"unknown megatron layer tensor {key!r}: the export does not know where it goes")
        if not 0 <= layer < num_layers:
            raise ValueError(f"{key!r}: layer {layer} outside the model's {num_layers} layers")
        if role in layers[layer]:
            raise ValueError(f"layer {layer} has two tensors for {role} (local and TE names both present?)")
        layers[layer][role] = tensor

    for key, tensor in megatron_sd.items():
        if "_extra_state" in key:
            continue
        per_layer = _PER_LAYER_KEY.match(key)
        if per_layer:
            put(int(per_layer.group(1)), per_layer.group(2), tensor, key)
        elif key.startswith("decoder.layers."):
            suffix = key[len("decoder.layers.") :]
            if tensor.shape[0] != num_layers:
                raise ValueError(
                    f"stacked tensor {key!r} has leading dim {tensor.shape[0]}, expected {num_layers} layers"
                )
            for layer in range(num_layers):
                put(layer, suffix, tensor[layer], key)
        else:
            others[key] = tensor
    return layers, others


def megatron_to_hf_state_dict(megatron_sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Map megatron model tensors to the state dict of ``HF_CAUSAL_LM_CLASS[spec.family]``.

    Strict: an unknown or missing tensor raises ``ValueError``. Attention biases that megatron lacks
    but the target class has (QKV bias without ``linear_proj`` bias) are exported as zeros.
    """
    _check_supported(spec)
    layers, others = _per_layer_tensors(megatron_sd, spec.num_layers)
    has_attention_bias = spec.add_qkv_bias or spec.add_bias_linear
    hf: dict[str, torch.Tensor] = {}

    def take(source: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
        if name not in source:
            raise ValueError(
                f"{where}: megatron tensor for {name!r} is missing (spec {spec.name}, family {spec.family})"
            )
        return source.pop(name)

    for index, roles in enumerate(layers):
        where, prefix = f"layer {index}", f"model.layers.{index}."
        hf[prefix + "input_layernorm.weight"] = take(roles, "input_norm", where)
        hf[prefix + "post_attention_layernorm.weight"] = take(roles, "post_attention_norm", where)
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        q, k, v = _split_qkv(take(roles, "qkv.weight", where), spec)
        hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = q, k, v
        hf[attn + "o_proj.weight"] = take(roles, "o_proj.weight", where)
        if has_attention_bias:
            q, k, v = _split_qkv(take(roles, "qkv.bias", where), spec)
            hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"] = q, k, v
            o_bias = roles.pop("o_proj.bias", None)  # absent with add_qkv_bias but no add_bias_linear
            hf[attn + "o_proj.bias"] = o_bias if o_bias is not None else torch.zeros(spec.hidden_size, dtype=q.dtype)
        if spec.qk_layernorm:
            hf[attn + "q_norm.weight"] = take(roles, "q_norm", where)
            hf[attn + "k_norm.weight"] = take(roles, "k_norm", where)
        gate, up = _split_fc1(take(roles, "fc1.weight", where), spec)
        hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"] = gate, up
        hf[mlp + "down_proj.weight"] = take(roles, "down_proj.weight", where)
        if spec.add_bias_linear:
            gate, up = _split_fc1(take(roles, "fc1.bias", where), spec)
            hf[mlp + "gate_proj.bias"], hf[mlp + "up_proj.bias"] = gate, up
            hf[mlp + "down_proj.bias"] = take(roles, "down_proj.bias", where)
        if roles:
            raise ValueError(
                f"{where}: megatron tensors {sorted(roles)} have no place in "
                f"{HF_CAUSAL_LM_CLASS[spec.family]} for spec {spec.name} "
                "(check qk_layernorm / bias settings)"
            )

    hf["model.embed_tokens.weight"] = take(others, "embedding.word_embeddings.weight", "embedding")
    final_norm = others.pop("decoder.final_layernorm.weight", None)
    final_norm = final_norm if final_norm is not None else take(others, "decoder.final_norm.weight", "final norm")
    hf["model.norm.weight"] = final_norm
    output_layer = others.pop("output_layer.weight", None)
    if not spec.tie_embeddings:
        if output_layer is None:
            raise ValueError("untied model without 'output_layer.weight': HF would load a random lm_head")
        hf["lm_head.weight"] = output_layer
    elif output_layer is not None and not torch.equal(output_layer, hf["model.embed_tokens.weight"]):
        raise ValueError("spec says tied embeddings but the checkpoint has a different 'output_layer.weight'")
    if others:
        raise ValueError(f"unknown megatron tensors {sorted(others)}")
    return hf


# ---- Hugging Face config --------------------------------------------------------------------


def hf_config_for(spec: ModelSpec, tokenizer_info: dict[str, Any]):
    """The ``transformers`` config of the class that represents ``spec`` exactly.

    Every field whose class default differs from the megatron model is set explicitly (head_dim,
    KV heads, RoPE base, norm eps, tying, padded vocab), as are bos/eos (the tokenizer's EOD id).
    """
    import transformers

    _check_supported(spec)
    family = spec.family
    eod = int(tokenizer_info.get("eod_id", 0))
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.query_groups,
        head_dim=spec.head_dim,
        hidden_act="silu",
        max_position_embeddings=spec.seq_length,
        rms_norm_eps=spec.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rotary_base)},
        tie_word_embeddings=spec.tie_embeddings,
        attention_bias=spec.add_qkv_bias or spec.add_bias_linear,
        attention_dropout=0.0,
        initializer_range=spec.init_method_std,
        bos_token_id=eod,
        eos_token_id=eod,
        use_cache=True,
        architectures=[HF_CAUSAL_LM_CLASS[family]],
    )
    if family == "hy_v3":
        return transformers.HYV3Config(
            **common,
            mlp_bias=spec.add_bias_linear,
            mlp_layer_types=["dense"] * spec.num_layers,
            num_experts=None,
            num_experts_per_tok=None,
            num_shared_experts=None,
            output_router_logits=False,
        )
    if family == "qwen3":
        if spec.add_bias_linear:
            raise ValueError("Qwen3 has no MLP bias; a model with linear biases and QK-norm is family hy_v3")
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    if family == "llama":
        return transformers.LlamaConfig(**common, mlp_bias=spec.add_bias_linear)
    raise ValueError(f"no Hugging Face class for family {family!r}")


def expected_hf_config(spec: ModelSpec, tokenizer_info: dict[str, Any]) -> dict[str, Any]:
    """What ``config.json`` must say for ``spec``, written out independently of
    :func:`hf_config_for` (a check that reused it would agree with any mistake in it)."""
    eod = int(tokenizer_info.get("eod_id", 0))
    expected = {
        "architectures": [HF_CAUSAL_LM_CLASS[spec.family]],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.query_groups,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.norm_epsilon,
        "rope_theta": float(spec.rotary_base),
        "max_position_embeddings": spec.seq_length,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.add_qkv_bias or spec.add_bias_linear,
        "bos_token_id": eod,
        "eos_token_id": eod,
    }
    if spec.family in ("hy_v3", "llama"):
        expected["mlp_bias"] = spec.add_bias_linear
    if spec.family == "hy_v3":
        expected["mlp_layer_types"] = ["dense"] * spec.num_layers
    return expected


def check_hf_config(directory: Path, spec: ModelSpec, tokenizer_info: dict[str, Any]) -> None:
    """Read ``config.json`` back as ``transformers`` does and compare it with the spec, field by
    field; :class:`ParityError` naming every field that differs."""
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    problems = []
    for field, want in expected_hf_config(spec, tokenizer_info).items():
        if field == "rope_theta":
            got = (getattr(loaded, "rope_parameters", None) or {}).get("rope_theta")
            if raw.get("rope_theta") != want:  # what a transformers 4.x reader takes
                problems.append(
                    f"rope_theta (top level) = {raw.get('rope_theta')!r}, the spec's rotary_base is {want!r}"
                )
        else:
            got = getattr(loaded, field, None)
        if got != want:
            problems.append(f"{field} = {got!r}, the spec says {want!r}")
    if problems:
        raise ParityError(
            f"{directory / 'config.json'} does not describe the model ({spec.name}): " + "; ".join(problems)
        )


def _save_config(config, directory: Path) -> None:
    config.save_pretrained(directory)
    # transformers 5.x writes only rope_parameters; a 4.x reader would fall back to its default base.
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["rope_theta"] = data["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- reading torch_dist checkpoints ----------------------------------------------------------


def read_torch_dist_checkpoint(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Model tensors of a megatron torch_dist checkpoint, consolidated, under megatron names.

    Uses only ``torch.distributed.checkpoint`` in this process (no distributed job): the global
    tensors are reassembled from whatever TP/DP sharding they were saved with. Layer tensors keep
    megatron's stacked form (``decoder.layers.…`` with a leading ``[num_layers]`` dim); optimizer
    state, RNG state and ``_extra_state`` are skipped.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a torch_dist checkpoint (no .metadata file)")
    reader = dcp.FileSystemReader(str(ckpt_dir))
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
        and key.startswith(_MODEL_KEY_PREFIXES)  # not optimizer.*, rng_state, ...
        and "_extra_state" not in key
    }
    if not state:
        raise ValueError(f"{ckpt_dir}: no model tensors found")
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


# ---- parity gate -----------------------------------------------------------------------------


def parity_token_ids(
    tokenizer_path: str | Path | None, num_tokens: int, vocab_limit: int, seed: int = 0
) -> torch.Tensor:
    """Two rows of ``num_tokens`` ids: the fixed English sample (repeated as needed) and random ids."""
    generator = torch.Generator().manual_seed(seed)
    random_row = torch.randint(0, vocab_limit, (num_tokens,), generator=generator)
    text_row = random_row.clone()
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json")).encode(PARITY_TEXT).ids
        text_row = torch.tensor((ids * (num_tokens // len(ids) + 1))[:num_tokens])
    return torch.stack([text_row, random_row])


@torch.no_grad()
def megatron_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    batch, length = token_ids.shape
    position_ids = torch.arange(length, device=device).expand(batch, length)
    causal_mask = torch.triu(torch.ones(1, 1, length, length, dtype=torch.bool, device=device), diagonal=1)
    return model(token_ids.to(device), position_ids, causal_mask).float().cpu()


@torch.no_grad()
def hf_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=token_ids.to(device)).logits.float().cpu()


def load_hf_strict(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` that fails on any missing/unexpected/mismatched key."""
    from transformers import AutoModelForCausalLM

    # transformers types from_pretrained as returning the model; output_loading_info=True returns (model, info)
    loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    model, info = loaded
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    problems = {kind: sorted(map(str, info.get(kind) or [])) for kind in kinds}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise ParityError(f"exported model at {path} does not load strictly: {problems}")
    return model.to(device).eval()


def _round_parameters_through(model, dtype: torch.dtype) -> None:
    """Round weights to ``dtype`` and back (values as saved, storage and compute stay fp32)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(dtype).to(parameter.dtype))


# ---- the export ------------------------------------------------------------------------------


def spec_from_run(run: RunDocument | Mapping[str, Any]) -> ModelSpec:
    """The run's model at its training sequence length."""
    run = RunDocument.coerce(run)
    return dataclasses.replace(run.model, seq_length=run.train.seq_length)


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def write_hf_directory(
    directory: Path,
    hf_state: dict[str, torch.Tensor],
    spec: ModelSpec,
    *,
    eod_id: int,
    tokenizer_dir: str | Path,
    save_dtype: torch.dtype,
) -> None:
    """Everything a Hugging Face model directory holds, for our exports and the released converter
    alike: ``model.safetensors`` (in ``save_dtype``), ``config.json`` (:func:`hf_config_for`, with
    ``rope_theta`` for 4.x readers), ``generation_config.json`` (bos/eos/pad = ``eod_id``) and the
    tokenizer files of ``tokenizer_dir``."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    tensors = {name: t.to(save_dtype).contiguous() for name, t in hf_state.items()}
    # split views share storage, which safetensors refuses to save: those are copied
    storages: dict[int, int] = {}
    for t in tensors.values():
        storages[t.untyped_storage().data_ptr()] = storages.get(t.untyped_storage().data_ptr(), 0) + 1
    tensors = {name: t.clone() if storages[t.untyped_storage().data_ptr()] > 1 else t for name, t in tensors.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config = hf_config_for(spec, {"eod_id": eod_id})
    config.dtype = str(save_dtype).removeprefix("torch.")
    _save_config(config, directory)
    GenerationConfig(bos_token_id=eod_id, eos_token_id=eod_id, pad_token_id=eod_id).save_pretrained(directory)
    _copy_tokenizer(Path(tokenizer_dir), directory)


def software_versions() -> dict[str, Any]:
    """``code_version`` (``git describe`` of this checkout) and ``libraries`` for a provenance.json."""
    return {"code_version": _code_version(), "libraries": _library_versions()}


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    # Loadable by transformers 4.x and 5.x alike (5.x would write "TokenizersBackend", unknown to 4.x).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _code_version() -> str | None:
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "megatron-core", "safetensors", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def config_hash(run: RunDocument | Mapping[str, Any]) -> str:
    """Hash of the training-relevant run config (model + train blocks of run.json)."""
    document = RunDocument.coerce(run).to_json()
    payload = json.dumps({"model": document["model"], "train": document["train"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _write_hf_files(directory: Path, run: RunDocument, spec: ModelSpec, ckpt: Path, save_dtype: torch.dtype) -> None:
    """model.safetensors, config.json, generation_config.json and the tokenizer files."""
    hf_state = megatron_to_hf_state_dict(read_torch_dist_checkpoint(ckpt), spec)
    write_hf_directory(
        directory,
        hf_state,
        spec,
        eod_id=run.tokenizer.eod_id,
        tokenizer_dir=_resolve(run.tokenizer.path),
        save_dtype=save_dtype,
    )


def measure_parity(
    run: RunDocument | Mapping[str, Any],
    iteration: int,
    hf_dir: Path,
    token_ids: torch.Tensor,
    weight_dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """max |Δlogit| between the megatron checkpoint and the HF directory, both computed in fp32
    (``max_abs_logit_diff``), and the largest |logit| for scale (``max_abs_logit``).

    The megatron weights are first rounded through ``weight_dtype`` (the dtype the HF weights were
    saved in), so a bf16 export is checked exactly as saved, against a tolerance meant for fp32.
    """
    reference = checkpointing.load_model_for_inference(run, iteration)
    _round_parameters_through(reference, weight_dtype)
    expected = megatron_logits(reference, token_ids)
    device = next(reference.parameters()).device
    del reference  # peak memory: one model at a time
    exported = load_hf_strict(hf_dir, torch.float32, device)
    actual = hf_logits(exported, token_ids)
    return {"max_abs_logit_diff": float((expected - actual).abs().max()), "max_abs_logit": float(expected.abs().max())}


def export_checkpoint(
    run: RunDocument | Mapping[str, Any],
    iteration: int,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    tolerance: float = DEFAULT_TOLERANCE,
    parity_tokens: int = DEFAULT_PARITY_TOKENS,
) -> dict:
    """Convert ``iter_{iteration:07d}`` of ``run`` to a Hugging Face directory at ``out_dir``.

    Everything is written into a temporary sibling directory, which is renamed to ``out_dir`` only
    after the strict reload and the parity check passed and ``config.json`` matched the spec
    (:func:`check_hf_config`) (``ParityError`` otherwise, and nothing is left behind; an existing
    ``out_dir`` is replaced). ``tolerance`` must be finite and positive (``ValueError``). Parity: :func:`measure_parity` on two
    sequences of ``parity_tokens`` tokens (fixed English text and random ids). Returns the
    provenance dict, also written as ``provenance.json``.
    """
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(_EXPORT_DTYPES)}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"parity tolerance {tolerance!r}: must be a finite positive number")
    save_dtype = _EXPORT_DTYPES[dtype]
    run = RunDocument.coerce(run)
    spec = spec_from_run(run)
    ckpt = Path(run.layout.checkpoint(iteration))
    if not checkpointing.is_complete(ckpt):
        raise FileNotFoundError(f"{ckpt}: no {checkpointing.COMPLETE_MARKER}; not a complete checkpoint")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, "an export") as tmp:
        _write_hf_files(tmp, run, spec, ckpt, save_dtype)
        token_ids = parity_token_ids(
            _resolve(run.tokenizer.path),
            min(parity_tokens, spec.seq_length),
            vocab_limit=int(run.tokenizer.size),
        )
        parity = measure_parity(run, iteration, tmp, token_ids, save_dtype)
        max_diff = parity["max_abs_logit_diff"]
        hf_class = HF_CAUSAL_LM_CLASS[spec.family]
        log.info(
            "parity %s iter %d (%s): max |Δlogit| = %.3g, tolerance %.3g",
            run.run_id,
            iteration,
            hf_class,
            max_diff,
            tolerance,
        )
        if not max_diff <= tolerance:  # written this way round so that NaN fails too
            raise ParityError(
                f"{run.run_id} iter {iteration}: exported {hf_class} differs from megatron: "
                f"max |Δlogit| = {max_diff:.4g} > tolerance {tolerance:.4g}",
                max_diff,
            )
        check_hf_config(tmp, spec, {"eod_id": run.tokenizer.eod_id})  # what the logits cannot see

        provenance = {
            "run_id": run.run_id,
            "iteration": iteration,
            "tokens_seen": iteration * run.tokens_per_iteration,
            "checkpoint": str(ckpt),
            "config_hash": config_hash(run),
            **software_versions(),
            "hf_class": hf_class,
            "dtype": dtype,
            "parity": {
                **parity,
                "tolerance": tolerance,
                "compute_dtype": "float32",
                "reference_weights": f"megatron checkpoint rounded through {dtype}",
                "token_ids_shape": list(token_ids.shape),
            },
        }
        write_json_atomic(tmp / "provenance.json", provenance, indent=2)
    return provenance
