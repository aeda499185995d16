"""Convert a released open-sci-ref 0.01 checkpoint (``open-sci/open-sci-ref-v0.01-*``) to our export format.

The published 0.01 models are the targets our reproduction is compared against, so they must be
evaluated by the same code path as our own exports. They cannot simply be loaded as published:
they are ``model_type: opensci`` with remote code (``OpensciForCausalLM``) written for a transformers
4.x development snapshot, which breaks on transformers 5.x and, once patched to load, silently
zeroes the RoPE ``inv_freq`` buffer (logits off by about 0.66, no error). The architecture is the
one our exporter already targets exactly with ``HYV3ForCausalLM`` (see :mod:`osref.export`), so
this module renames the released tensors into that class and writes the directory with the writer
:func:`osref.export.export_checkpoint` uses (:func:`osref.export.write_hf_directory`: config from a
:class:`~osref.model_spec.ModelSpec`, ``model.safetensors``, the GPT-NeoX tokenizer files), plus a
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

The QK norms: ``HYV3`` applies a per-head RMSNorm with the block's eps, which is what training
computed (``--normalization RMSNorm --qk-layernorm``). What the *released* code applies is read from
the checkpoint's own ``modeling_opensci.py`` by :func:`osref.remote_code.read_qk_norm` (parsed with
``ast``, never imported or run; drafts of that code used ``nn.LayerNorm(head_dim, bias=False)``,
which also subtracts the mean). The conversion goes ahead only for a per-head RMSNorm whose eps
equals ``rms_norm_eps``, and refuses anything else, naming the declaration. The remote-code files are
copied into the export's ``released_remote_code/`` (with their sha256 in ``provenance.json``) for
provenance; nothing loads them from there.

After conversion, a reference forward pass written from the architecture (with the declared QK norm,
in fp32, on the released tensors themselves) must reproduce the exported model's logits within
``tolerance``: the same kind of gate as our own exports' parity check.

The KV-head count is taken from the tensors (``k_proj`` rows / head_dim), because the Megatron
checkpoints behind the release store ``num_query_groups=1`` for plain multi-head attention and a
config derived from that would claim multi-query attention. An explicit ``kv_heads`` must agree with
the tensors; a disagreeing ``num_key_value_heads`` in ``config.json`` is recorded, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from osref import export
from osref.files import atomic_directory, write_json_atomic
from osref.model_spec import ModelSpec
from osref.paths import REPO_ROOT
from osref.remote_code import QKNorm, RemoteCodeError, modeling_file, read_qk_norm

log = logging.getLogger(__name__)

RELEASED_MODEL_TYPE = "opensci"
DEFAULT_TOKENIZER_DIR = REPO_ROOT / "assets" / "gpt-neox-20b"

# Every key a released config.json may carry. An unknown key may change the architecture, so it is
# an error until someone has read what it means and added it here (and, if it matters, to the mapping).
KNOWN_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "layer_norm_eps",
        "qk_layernorm",
        "rope_theta",
        "rope_scaling",
        "attention_bias",
        "attention_dropout",
        "mlp_bias",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "pretraining_tp",
        "use_cache",
    }
)
REQUIRED_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)

_RELEASED_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMED_LAYER_SUFFIXES = {
    "self_attn.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attn.k_layernorm.weight": "self_attn.k_norm.weight",
}
_DROPPED_KEY_SUFFIX = "rotary_emb.inv_freq"
_ITERATION_NAME = re.compile(r"iter_(\d{7})")
REMOTE_CODE_DIR = "released_remote_code"  # where the export keeps the release's .py files (never loaded)
DEFAULT_TOLERANCE = 1e-3  # max |Δlogit| between the export and the reference forward, fp32
_GATE_TOKENS = 16


class ReleasedFormatError(ValueError):
    """The directory is not a released open-sci-ref checkpoint this converter understands."""


# ---- config -> ModelSpec -----------------------------------------------------------------------


def _check_config_values(config: dict[str, Any]) -> None:
    unknown = sorted(set(config) - KNOWN_CONFIG_KEYS)
    if unknown:
        raise ReleasedFormatError(
            f"released config has unknown key(s) {unknown}: check what they change "
            "and add them to osref.released.KNOWN_CONFIG_KEYS"
        )
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
    require(
        "mlp_bias",
        config.get("mlp_bias", False) == config.get("attention_bias", False),
        f"equal to attention_bias = {config.get('attention_bias')!r} (biases on all linears or none)",
    )
    # The released code gives the QK norms layer_norm_eps and the block norms rms_norm_eps; HYV3 has one eps.
    require(
        "layer_norm_eps",
        config.get("layer_norm_eps", config["rms_norm_eps"]) == config["rms_norm_eps"],
        f"equal to rms_norm_eps = {config['rms_norm_eps']!r}",
    )
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
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h),
            "self_attn.k_proj.weight": (kv_rows, h),
            "self_attn.v_proj.weight": (kv_rows, h),
            "self_attn.o_proj.weight": (h, q_rows),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        if spec.add_bias_linear:
            layer.update(
                {
                    "self_attn.q_proj.bias": (q_rows,),
                    "self_attn.k_proj.bias": (kv_rows,),
                    "self_attn.v_proj.bias": (kv_rows,),
                    "self_attn.o_proj.bias": (h,),
                    "mlp.gate_proj.bias": (f,),
                    "mlp.up_proj.bias": (f,),
                    "mlp.down_proj.bias": (h,),
                }
            )
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
        raise ReleasedFormatError(
            f"released tensors do not match the {spec.family} layout of spec {spec.name}: "
            f"unknown {unknown[:8]}{' …' if len(unknown) > 8 else ''}, "
            f"missing {missing[:8]}{' …' if len(missing) > 8 else ''}"
        )
    wrong = {k: (tuple(hf[k].shape), shape) for k, shape in expected.items() if tuple(hf[k].shape) != shape}
    if wrong:
        raise ReleasedFormatError(
            f"tensor shapes (found, expected) disagree with the config: {dict(list(wrong.items())[:8])}"
        )
    return hf


# ---- the QK norm the release declares --------------------------------------------------------------


def declared_qk_norm(src: Path, config: dict[str, Any], assume: str | None = None) -> QKNorm:
    """The QK norm of the checkpoint in ``src``, read from its remote code; refuses what HYV3 cannot represent.

    Without a modelling file (a directory that is not a hub download) ``assume="rmsnorm"`` states the
    assumption explicitly; a config whose ``auto_map`` names a modelling file that is absent is refused.
    """
    path = modeling_file(src, config)
    if path is None:
        named = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
        if named:
            raise ReleasedFormatError(
                f"{src}: config.json's auto_map names {named!r}, but its modelling file is not "
                "there: the QK norm it declares cannot be read (fetch the .py files too)"
            )
        if assume != "rmsnorm":
            raise ReleasedFormatError(
                f"{src}: no remote code to read the QK norm from; pass assume_qk_norm='rmsnorm' "
                "(--assume-qk-norm rmsnorm) to convert under that assumption"
            )
        eps = float(config.get("layer_norm_eps", config["rms_norm_eps"]))
        return QKNorm(kind="rmsnorm", eps=eps, per_head=True, declared="assumed (no remote code)", attributes=())
    try:
        norm = read_qk_norm(path.read_text(encoding="utf-8"), config, name=path.name)
    except RemoteCodeError as error:
        raise ReleasedFormatError(str(error)) from None
    where = f"{path.name}: {' / '.join(norm.attributes)} = {norm.declared}"
    if norm.kind != "rmsnorm":
        raise ReleasedFormatError(
            f"{where} is a {norm.kind}; the converter maps QK norms onto a per-head RMSNorm only "
            "(a LayerNorm also subtracts the mean: converting would change the model)"
        )
    if not norm.per_head:
        raise ReleasedFormatError(
            f"{where} normalises across all heads (size hidden_size); the converter needs a per-head norm over head_dim"
        )
    if not math.isclose(norm.eps, float(config["rms_norm_eps"]), rel_tol=1e-9):
        raise ReleasedFormatError(
            f"{where} has eps {norm.eps:g} but rms_norm_eps is {config['rms_norm_eps']!r}: "
            "the export class has one eps for every norm"
        )
    return norm


# ---- reference forward: the gate after conversion -----------------------------------------------------


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str = "rmsnorm") -> torch.Tensor:
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; non-interleaved RoPE (pairs i, i + head_dim/2)."""
    head_dim, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    half = head_dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_logits(
    released: dict[str, torch.Tensor], config: dict[str, Any], ids: torch.Tensor, kv_heads: int, qk_norm: QKNorm
) -> torch.Tensor:
    """Logits of the opensci block computed from the released tensors as named in the release (fp32).

    Written from the architecture, not from either model class: pre-norm RMSNorm, QK norm (as
    declared) per head before rotate-half RoPE, causal softmax attention, SwiGLU, optional biases,
    tied embeddings. Tensors are cast to fp32 one at a time, so no second full copy is held.
    """
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim, eps, theta = hidden // heads, float(config["rms_norm_eps"]), float(config["rope_theta"])
    names = (
        {"q": "q_layernorm", "k": "k_layernorm"}
        if "model.layers.0.self_attn.q_layernorm.weight" in released
        else {"q": "q_norm", "k": "k_norm"}
    )

    def w(name: str) -> torch.Tensor:
        return released[name].float()

    def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
        out = x @ w(prefix + ".weight").T
        return out + w(prefix + ".bias") if prefix + ".bias" in released else out

    batch, seq = ids.shape
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    x = w("model.embed_tokens.weight")[ids]
    for n in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{n}."
        h = _norm(x, w(p + "input_layernorm.weight"), eps)
        q = linear(p + "self_attn.q_proj", h).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = linear(p + "self_attn.k_proj", h).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = linear(p + "self_attn.v_proj", h).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q = _rotate_half_rope(_norm(q, w(p + f"self_attn.{names['q']}.weight"), qk_norm.eps, qk_norm.kind), theta)
        k = _rotate_half_rope(_norm(k, w(p + f"self_attn.{names['k']}.weight"), qk_norm.eps, qk_norm.kind), theta)
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + linear(p + "self_attn.o_proj", attention.transpose(1, 2).reshape(batch, seq, heads * head_dim))
        h = _norm(x, w(p + "post_attention_layernorm.weight"), eps)
        gate, up = linear(p + "mlp.gate_proj", h), linear(p + "mlp.up_proj", h)
        x = x + linear(p + "mlp.down_proj", torch.nn.functional.silu(gate) * up)
    head = (
        "lm_head.weight"
        if "lm_head.weight" in released and not config["tie_word_embeddings"]
        else "model.embed_tokens.weight"
    )
    return _norm(x, w("model.norm.weight"), eps) @ w(head).T


def gate_tokens(vocab_size: int, n: int = _GATE_TOKENS) -> torch.Tensor:
    """A fixed pseudo-random token sequence (seed 0) for the reference-forward gate."""
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


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
    expected_iteration: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    assume_qk_norm: str | None = None,
    source_commit: str | None = None,
) -> dict[str, Any]:
    """Write ``out`` (replacing it) from the released checkpoint directory ``src``; return the provenance.

    ``dtype`` None keeps the stored dtype (bf16 for the release). The QK norm comes from the
    checkpoint's remote code (parsed, never run; see :func:`declared_qk_norm`). ``expected_iteration``,
    when given, must be the checkpoint's training iteration (from an ``iter_*`` revision or
    ``_name_or_path``). The directory is assembled next to ``out`` and renamed only after a strict
    reload (no missing/unexpected/mismatched key) and the reference-forward gate (max |Δlogit| ≤
    ``tolerance`` in fp32 against :func:`reference_logits`).
    """
    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ReleasedFormatError(f"{src}: no config.json")
    config = json.loads(config_path.read_text())
    _check_config_values(config)
    qk_norm = declared_qk_norm(src, config, assume_qk_norm)
    iteration = iteration_of(revision, config)
    if expected_iteration is not None and iteration is not None and iteration != expected_iteration:
        raise ReleasedFormatError(
            f"{src}: revision {revision!r} is training iteration {iteration} "
            f"(from its name / config.json _name_or_path), expected {expected_iteration}"
        )
    if iteration is None:
        iteration = expected_iteration
    released = read_released_tensors(src)
    kv_heads_in_tensors = kv_heads_from_tensors(released, config)
    if kv_heads is not None and kv_heads != kv_heads_in_tensors:
        raise ReleasedFormatError(
            f"--kv-heads {kv_heads} disagrees with the tensors, whose k_proj holds {kv_heads_in_tensors} heads"
        )
    config_kv_heads = config.get("num_key_value_heads")
    if config_kv_heads is not None and int(config_kv_heads) != kv_heads_in_tensors:
        log.warning(
            "config.json says num_key_value_heads=%s but the tensors hold %d KV heads; using the tensors",
            config_kv_heads,
            kv_heads_in_tensors,
        )
    spec = spec_from_released_config(config, kv_heads_in_tensors, name=source_repo or src.name)
    hf_state = released_to_hf_state_dict(released, spec)
    stored_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in hf_state.values()})
    if dtype is None:
        if len(stored_dtypes) != 1:
            raise ReleasedFormatError(f"mixed stored dtypes {stored_dtypes}: pass dtype explicitly")
        dtype = stored_dtypes[0]
    save_dtype = getattr(torch, dtype)
    remote_code = sorted(src.glob("*.py"))
    fetched = src / "manifest.json"  # written by the fetch job (osref.released_hub.fetch_revision)
    if source_commit is None and fetched.is_file():
        manifest = json.loads(fetched.read_text())
        if revision is not None and manifest.get("revision") not in (None, revision):
            raise ReleasedFormatError(
                f"{src}: fetched revision {manifest.get('revision')!r}, converting as {revision!r}"
            )
        source_commit = manifest.get("commit")

    eod = int(config.get("eos_token_id", 0))
    with atomic_directory(out, "a conversion") as tmp:
        export.write_hf_directory(tmp, hf_state, spec, eod_id=eod, tokenizer_dir=tokenizer_dir, save_dtype=save_dtype)
        del hf_state
        if remote_code:  # kept for provenance only: a subfolder transformers never looks into
            (tmp / REMOTE_CODE_DIR).mkdir()
            for path in remote_code:
                shutil.copy2(path, tmp / REMOTE_CODE_DIR / path.name)

        ids = gate_tokens(spec.vocab_size)
        model = export.load_hf_strict(tmp, torch.float32)
        with torch.no_grad():
            logits = export.hf_logits(model, ids)
        del model
        if not torch.isfinite(logits).all():
            raise export.ParityError(f"converted model at {tmp} gives non-finite logits")
        # the reference sees the weights as saved (a dtype cast included), like the loaded export
        stored = {k: (t.to(save_dtype) if t.is_floating_point() else t) for k, t in released.items()}
        with torch.no_grad():
            expected = reference_logits(stored, config, ids, kv_heads_in_tensors, qk_norm)
        del stored
        max_diff = float((logits - expected).abs().max())
        if not max_diff <= tolerance:
            raise export.ParityError(
                f"converted model at {tmp} differs from the reference forward of the released "
                f"tensors: max |Δlogit| {max_diff:.3g} > tolerance {tolerance:g}",
                max_diff,
            )
        log.info(
            "reference-forward gate: max |Δlogit| %.3g (tolerance %g, %d tokens)", max_diff, tolerance, ids.numel()
        )

        provenance = {
            "converted_from": "released",
            "source_repo": source_repo,
            "revision": revision,
            "source_commit": source_commit,
            "iteration": iteration,
            "source_dir": str(src.resolve()),
            "source_config_sha256": _sha256(config_path),
            "source_weight_files": {p.name: p.stat().st_size for p in safetensors_files(src)},
            "source_config_num_key_value_heads": config_kv_heads,
            "kv_heads": kv_heads_in_tensors,
            "hf_class": export.HF_CAUSAL_LM_CLASS[spec.family],
            "dtype": dtype,
            "spec": spec.as_dict(),
            "tensor_renames": dict(_RENAMED_LAYER_SUFFIXES),
            "qk_norm": qk_norm.as_dict(),
            "remote_code": {p.name: _sha256(p) for p in remote_code},
            "remote_code_dir": REMOTE_CODE_DIR if remote_code else None,
            "reference_forward": {
                "max_abs_logit_diff": max_diff,
                "tolerance": tolerance,
                "tokens": ids.numel(),
                "dtype": "float32",
            },
            **export.software_versions(),
        }
        write_json_atomic(tmp / "provenance.json", provenance, indent=2)
    return provenance
