"""Megatron core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Without Transformer Engine, megatron's local layer spec computes attention with
``DotProductAttention``: it materialises the full ``[b·heads, s, s]`` score matrix (1 GiB per
layer for 16 heads × 4096² in bf16) and runs softmax as separate kernels, which costs a GPU most of
its throughput at sequence length 4096. PyTorch's SDPA dispatches to flash / cuDNN / memory-
efficient kernels instead. This module is the small bridge for GPU nodes without TE (a bare
PyTorch install, our benchmark machines): the same inputs, outputs and parameters as
``DotProductAttention`` (it has none of its own, so checkpoints are unchanged), only the kernel
differs. The CPU keeps megatron's own class, so CPU runs and their bit-for-bit tests are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    """``DotProductAttention`` with the score/softmax/context part done by one SDPA call."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        unsupported = {
            "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
            "window_size": config.window_size is not None,
            "softmax_type != vanilla": config.softmax_type != "vanilla",
        }
        if any(unsupported.values()):
            names = ", ".join(name for name, used in unsupported.items() if used)
            raise ValueError(f"SDPA core attention does not support {names}; install Transformer Engine")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPA core attention: packed sequences and attention bias are not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # megatron's masks are True where attention is *not* allowed; SDPA's boolean masks the opposite
        sdpa_mask = None if causal or attention_mask is None else ~attention_mask
        seq_q, batch = query.shape[0], query.shape[1]
        # [s, b, heads, head_dim] -> [b, heads, s, head_dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=sdpa_mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, s, head_dim] -> [s, b, heads · head_dim]
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, self.hidden_size_per_partition)
