# A stand-in for the remote code shipped with the released open-sci-ref 0.01 checkpoints, written
# for the tests in the shape of a transformers 4.49 Llama-style model file (not a copy of the
# release's). The pipeline must parse it with `ast` and never import or run it: the first statement
# below records any execution in the file named by OSREF_TEST_EXECUTED_MARKER (the tests point it at
# a path and assert that nothing ever wrote there).
import os as _os

open(_os.environ.get("OSREF_TEST_EXECUTED_MARKER", "/tmp/osref-remote-code-was-executed"), "a").write(__file__ + "\n")

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel

from .configuration_opensci import OpensciConfig


class OpensciRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class OpensciAttention(nn.Module):
    def __init__(self, config: OpensciConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        if config.qk_layernorm:
            self.q_layernorm = OpensciRMSNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = OpensciRMSNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_layernorm = nn.Identity()
            self.k_layernorm = nn.Identity()


class OpensciPreTrainedModel(PreTrainedModel):
    config_class = OpensciConfig
    base_model_prefix = "model"
