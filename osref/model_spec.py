"""The model architecture, in one place.

Training (megatron-core ``GPTModel``), export (Hugging Face ``config.json``), the plan (parameter
counts, FLOPs) and the report all need the same facts about a model scale. They all build a
:class:`ModelSpec` from the ``scales.<name>`` block of the validated config and ask it, so a
change to the architecture is made once, in the config, and every stage sees it.

The defaults are the open-sci-ref 0.01 block design: pre-norm decoder, RMSNorm eps 1e-5,
per-head QK RMSNorm before RoPE, SwiGLU, RoPE base 10000 (rotate-half), biases on every linear
layer, tied embeddings, vocabulary padded to 50304, context 4096, dropout 0.1 left on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None  # None = full multi-head attention
    kv_channels: int = 64
    seq_length: int = 4096
    vocab_size: int = 50304  # padded embedding rows; the tokenizer has 50277 ids
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qk_layernorm: bool = True
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    tie_embeddings: bool = True
    swiglu: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02

    @classmethod
    def from_config(cls, name: str, scale: dict[str, Any], seq_length: int | None = None) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in scale.items() if k in fields}
        if seq_length is not None:
            kwargs["seq_length"] = seq_length
        return cls(name=name, **kwargs)

    # ---- derived shape facts -------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def family(self) -> str:
        """Which Hugging Face class represents this flavour exactly (see osref.export)."""
        if self.qk_layernorm and self.add_bias_linear:
            return "hy_v3"  # QK-norm + biases on every linear layer (the 0.01 flavour)
        if self.qk_layernorm:
            return "qwen3"
        return "llama"

    def parameter_count(self, include_embedding: bool = True) -> int:
        """Exact trainable parameters of the megatron model (biases and norm weights included)."""
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        np_, ng = self.num_attention_heads, self.query_groups
        qkv_rows = (np_ + 2 * ng) * hd
        fc1_rows = 2 * f if self.swiglu else f
        per_layer = qkv_rows * h + np_ * hd * h + fc1_rows * h + f * h + 2 * h  # weights + 2 norms
        if self.add_bias_linear:
            per_layer += h + fc1_rows + h  # proj, fc1, fc2 biases
        if self.add_qkv_bias or self.add_bias_linear:
            per_layer += qkv_rows
        if self.qk_layernorm:
            per_layer += 2 * hd
        body = self.num_layers * per_layer + h  # final norm
        if not include_embedding:
            return body
        emb = self.vocab_size * h
        return body + emb + (0 if self.tie_embeddings else emb)

    def flops_per_token(self, with_attention: bool = False, causal: bool = False) -> float:
        """Training FLOPs per token: 6·N (the authors' convention), optionally + attention.

        The attention term is PaLM's 12·L·s·(np·hd) (QKᵀ and AV over the full s×s square, forward
        and backward), the count Megatron-LM's TFLOP/s logs used; a causal kernel does about half
        of it (``causal=True``: 6·L·s·(np·hd), megatron-core 0.16's count), so MFU with the full
        term is the conventional, not the strictest, figure.
        """
        flops = 6.0 * self.parameter_count()
        if with_attention:
            square = 12.0 * self.num_layers * self.seq_length * self.num_attention_heads * self.head_dim
            flops += square / 2 if causal else square
        return flops

    # ---- megatron-core ---------------------------------------------------------------------
    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``megatron.core.transformer.TransformerConfig``."""
        import torch.nn.functional as F  # keep this module importable without torch

        return dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            qk_layernorm=self.qk_layernorm,
            gated_linear_unit=self.swiglu,
            # megatron's default activation is GELU: without this, a "gated" MLP is GeGLU, not SwiGLU
            activation_func=F.silu if self.swiglu else F.gelu,
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.add_qkv_bias or self.add_bias_linear,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            init_method_std=self.init_method_std,
        )

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``megatron.core.models.gpt.GPTModel`` (besides config and spec)."""
        return dict(
            vocab_size=self.vocab_size,
            max_sequence_length=self.seq_length,
            position_embedding_type="rope",
            rotary_base=int(self.rotary_base),
            rotary_percent=1.0,
            share_embeddings_and_output_weights=self.tie_embeddings,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def padded_vocab_size(tokenizer_size: int, multiple: int = 128, tensor_parallel: int = 1) -> int:
    """Megatron's embedding padding: round up to a multiple of ``multiple · TP``."""
    step = multiple * tensor_parallel
    return int(math.ceil(tokenizer_size / step) * step)
