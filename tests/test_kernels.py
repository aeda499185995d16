"""The training speed variants (osref/kernels.py) on the CPU: each one that can run here trains the
tiny model to the plain path's losses, they are really in effect when asked for, GPU-only ones are
off with a reason, and bad keys are named.

Tolerance. Every run starts from the same weights and sees the same batches and dropout masks
(compiled dropout draws from the eager RNG on the CPU), so a variant can only differ by fp32
rounding (sums reassociated in fused kernels) and, for megatron's native fused cross-entropy, by
its logit gradient, which megatron rounds to bf16. Measured over 24 steps (the test runs 20; warm-up
into the 4e-3 peak; 1 thread, deterministic): fused AdamW, megatron's fusions and compiled layers differ
from the plain losses by at most 1.1e-7 relative, the fused cross-entropy by 3.3e-6. The
tolerances, 1e-6 and 1e-5 relative per step, sit 10x and 3x above those and below the smallest
real change we could make: a run that differs from the plain one only in its hidden-dropout masks
moves each of its first 8 losses by 2.7e-5 … 2.5e-4 relative (test_tolerance_separates_a_real_change).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_run

torch.set_num_threads(1)

STEPS = 20
RTOL = 1e-6  # fp32 rounding only
RTOL_BF16_LOGIT_GRAD = 1e-5  # with megatron's native fused cross-entropy
CPU_VARIANTS = {  # name: (train.kernels, tolerance)
    "fused_adamw": ({"fused_adamw": True}, RTOL),
    "megatron_fusions": ({"megatron_fusions": True}, RTOL),
    "compile_layers": ({"compile_layers": True}, RTOL),
    "all": (
        {"megatron_fusions": True, "fused_cross_entropy": True, "fused_adamw": True, "compile_layers": True},
        RTOL_BF16_LOGIT_GRAD,
    ),
}


def _trainer(data_root, run_dir, request):
    from osref.training import _build_trainer

    run = make_run(data_root, run_dir)
    run["train"]["kernels"] = request
    return _build_trainer(run)


def _losses(trainer, steps: int = STEPS) -> np.ndarray:
    return np.array([trainer.step(iteration)["loss"] for iteration in range(1, steps + 1)])


@pytest.fixture(scope="module")
def plain_losses(data_root, tmp_path_factory):
    return _losses(_trainer(data_root, tmp_path_factory.mktemp("plain"), None))


@pytest.mark.parametrize("name", list(CPU_VARIANTS))
def test_cpu_variant_gives_the_plain_losses(name, plain_losses, data_root, tmp_path):
    request, tolerance = CPU_VARIANTS[name]
    trainer = _trainer(data_root, tmp_path, request)
    assert trainer.variants.record() | request == trainer.variants.record(), trainer.variants
    losses = _losses(trainer)
    relative = np.abs(losses - plain_losses) / plain_losses
    assert relative.max() < tolerance, (
        f"{name}: max relative loss difference {relative.max():.2e} at step {relative.argmax() + 1}"
    )
    assert losses[-1] < losses[0] - 0.5  # it trains


def test_tolerance_separates_a_real_change(plain_losses, data_root, tmp_path):
    """Same weights and data, other hidden-dropout masks: the comparison above must catch that."""
    trainer = _trainer(data_root, tmp_path, None)
    torch.manual_seed(4321)  # the default generator drives hidden dropout (attention's has its own tracker)
    relative = np.abs(_losses(trainer, 8) - plain_losses[:8]) / plain_losses[:8]
    assert relative.min() > 10 * RTOL and relative.max() > 10 * RTOL_BF16_LOGIT_GRAD, relative


def test_requested_variants_are_in_effect(data_root, tmp_path):
    from osref.kernels import compiled_layer_class

    trainer = _trainer(data_root, tmp_path, CPU_VARIANTS["all"][0])
    module = trainer.model.module
    assert all(isinstance(layer, compiled_layer_class()) for layer in module.decoder.layers)
    config = module.config
    assert config.bias_activation_fusion and config.bias_dropout_fusion and config.cross_entropy_loss_fusion
    assert config.cross_entropy_fusion_impl == "native" and not config.masked_softmax_fusion
    from osref.kernels import _torch_optimizers

    groups = [g for inner in _torch_optimizers(trainer.optimizer) for g in inner.param_groups]
    assert groups and all(g["fused"] and not g["foreach"] for g in groups)
    # compiling changes no checkpoint key: the state dict is the plain model's
    plain = _trainer(data_root, tmp_path / "plain", None).model.module
    assert module.state_dict().keys() == plain.state_dict().keys()
    assert module.sharded_state_dict().keys() == plain.sharded_state_dict().keys()


def test_plain_by_default_on_cpu(data_root, tmp_path):
    from osref.kernels import compiled_layer_class

    trainer = _trainer(data_root, tmp_path, None)
    assert trainer.variants.label() == "plain"
    assert not any(isinstance(layer, compiled_layer_class()) for layer in trainer.model.module.decoder.layers)
    assert not trainer.model.module.config.bias_activation_fusion


def test_gpu_only_variants_are_off_with_a_reason():
    from osref.kernels import Kernels, default_request, resolve

    cpu = resolve({"sdpa_backends": ["cudnn", "flash"], "fused_adamw": True}, on_gpu=False, attention="local")
    assert cpu.sdpa_backends is None and cpu.fused_adamw
    assert any("sdpa_backends not applied" in note for note in cpu.notes)
    te = resolve(None, on_gpu=True, attention="transformer_engine", bf16=True)
    assert not te.compile_layers and te.megatron_fusions and te.fused_adamw and te.sdpa_backends is None
    assert any("Transformer Engine" in note for note in te.notes)
    gpu = resolve(None, on_gpu=True, attention="sdpa", bf16=True)
    assert gpu == Kernels.all_on() and gpu.sdpa_backends[0] == "cudnn"
    # megatron's native fused cross-entropy returns a bf16 logit gradient: not a default for fp32
    assert default_request(on_gpu=True, bf16=False)["fused_cross_entropy"] is False
    assert resolve(None, on_gpu=False, attention="local") == Kernels()


def test_fused_adamw_is_left_to_te_or_apex_when_megatron_uses_theirs(monkeypatch):
    """In a TE/apex image megatron builds their FusedAdam, which is fused already."""
    from megatron.core import optimizer

    from osref.kernels import resolve

    monkeypatch.setattr(optimizer, "USING_PYTORCH_OPTIMIZER", False)
    chosen = resolve({"fused_adamw": True}, on_gpu=False, attention="local")
    assert not chosen.fused_adamw and any("fused Adam of Transformer Engine or apex" in n for n in chosen.notes)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"compile_layer": True}, "train.kernels.compile_layer: unknown kernel option"),
        ({"fused_adamw": "yes"}, "train.kernels.fused_adamw: expected true or false"),
        ({"sdpa_backends": ["cudnn", "flash3"]}, r"train.kernels.sdpa_backends: unknown \['flash3'\]"),
    ],
)
def test_bad_kernel_request_names_the_key(request_, message):
    from osref.kernels import resolve

    with pytest.raises(ValueError, match=message):
        resolve(request_, on_gpu=False, attention="local")


def test_sdpa_priority_puts_cudnn_first_and_restores():
    from torch.nn.attention import SDPBackend

    from osref.kernels import sdpa_priority

    before = torch._C._get_sdp_priority_order()
    with sdpa_priority(("cudnn", "flash", "efficient", "math")):
        order = torch._C._get_sdp_priority_order()
        assert order[:2] == [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]
    assert torch._C._get_sdp_priority_order() == before
