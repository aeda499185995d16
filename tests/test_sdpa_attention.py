"""The SDPA core attention (GPU nodes without Transformer Engine) computes what megatron's
``DotProductAttention`` computes: same parameters, same logits and gradients, on the CPU here."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from osref.model_spec import ModelSpec

TINY_RUN = Path(__file__).parent / "data/tiny_run.json"


def tiny_spec(**overrides) -> ModelSpec:
    spec = ModelSpec(**json.loads(TINY_RUN.read_text())["model"])
    return dataclasses.replace(spec, **overrides)


def build(spec: ModelSpec, attention: str):
    from osref.megatron_compat import enable_cpu_guards, init_single_process_parallel
    from osref.megatron_model import build_gpt_model

    enable_cpu_guards()
    init_single_process_parallel()
    return build_gpt_model(spec, seed=11, attention=attention, device="cpu")


def logits_and_grads(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    model.zero_grad()
    logits = model(tokens, positions, None)
    logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("query_groups", [None, 2], ids=["mha", "gqa"])
def test_sdpa_matches_megatron_local_attention(query_groups):
    from osref.sdpa_attention import SDPACoreAttention

    spec = tiny_spec(num_query_groups=query_groups, attention_dropout=0.0, hidden_dropout=0.0)
    local, sdpa = build(spec, "local"), build(spec, "sdpa")
    assert any(isinstance(m, SDPACoreAttention) for m in sdpa.modules())
    assert not any(isinstance(m, SDPACoreAttention) for m in local.modules())
    # no parameters of its own: the same state dict keys and, from the same seed, the same weights
    assert local.state_dict().keys() == sdpa.state_dict().keys()
    for name, tensor in local.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, sdpa.state_dict()[name]), name

    tokens = torch.randint(0, spec.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    local_logits, local_grads = logits_and_grads(local, tokens)
    sdpa_logits, sdpa_grads = logits_and_grads(sdpa, tokens)
    assert (local_logits - sdpa_logits).abs().max() < 1e-4
    assert local_grads.keys() == sdpa_grads.keys()
    for name, grad in local_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((grad - sdpa_grads[name]).abs().max() / scale) < 1e-3, name


def test_sdpa_attention_is_causal():
    """Changing a later token must not change the logits of earlier positions."""
    spec = tiny_spec(attention_dropout=0.0, hidden_dropout=0.0)
    model = build(spec, "sdpa").eval()
    tokens = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, 20] = (changed[0, 20] + 1) % spec.vocab_size
    positions = torch.arange(32).unsqueeze(0)
    with torch.no_grad():
        before, after = model(tokens, positions, None), model(changed, positions, None)
    assert torch.equal(before[:, :20], after[:, :20])
    assert not torch.equal(before[:, 20:], after[:, 20:])


def test_unknown_attention_backend_is_refused():
    with pytest.raises(ValueError, match="attention backend 'flash3'"):
        build(tiny_spec(), "flash3")
