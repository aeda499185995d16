"""Training speed without Transformer Engine: the kernel variants, requested, resolved, applied.

Transformer Engine is practical only inside prepared containers (its torch extension is built
against the exact torch), so a pip-installed GPU run uses megatron-core's local layer spec. Out of
the box that path is slow: megatron falls back to the unfused for-each AdamW, leaves its own
compiled fusions off, and runs RoPE, QK-norm and the bias/residual chains as many small kernels.
Each speed-up here is one key of ``recipes.<name>.kernels`` (``train.kernels`` in a run JSON):

``megatron_fusions``
    megatron's ``bias_activation_fusion`` (compiled bias + SwiGLU) and ``bias_dropout_fusion``
    (compiled bias + dropout + residual add); ``megatron.core.jit.jit_fuser`` is ``torch.compile``.
``fused_cross_entropy``
    ``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl="native"`` (compiled, no TE).
    Its logit gradient is cast to bf16 (``fusions/fused_cross_entropy.py``), so the grid turns it
    on only for bf16 runs.
``fused_adamw``
    ``torch.optim.AdamW(fused=True)``: one kernel per parameter group instead of for-each loops.
``compile_layers``
    ``torch.compile`` of each transformer layer through the layer spec (:class:`CompiledTransformerLayer`):
    RMSNorm, QK-norm, RoPE and the bias/residual chains fuse; the core attention stays eager
    (``torch.compiler.disable``), as do the loss and the model around the layers (megatron's custom
    autograd functions break whole-model compile, pytorch/pytorch#141783). Not with TE, which fuses
    these itself.
``sdpa_backends``
    the priority order of PyTorch's SDPA kernels for :mod:`osref.sdpa_attention` (GPU only); the
    default puts cuDNN attention first, then Flash (PyTorch's own default order is Flash,
    memory-efficient, math, cuDNN).

``masked_softmax_fusion`` is deliberately absent: it only concerns megatron's local attention
(SDPA replaces its softmax), and its CUDA extensions (``scaled_masked_softmax_cuda``) are not in
the megatron-core wheel, so turning it on fails at the first bf16 forward. It stays False.

:func:`resolve` turns the request into what can run on this device (a GPU-only key on the CPU is
off, with the reason in ``Kernels.notes``); the result is logged with every metrics line and in the
segment marker. All CPU-runnable variants give the plain path's losses (tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

BOOL_KEYS = ("megatron_fusions", "fused_cross_entropy", "fused_adamw", "compile_layers")
SDPA_BACKEND_NAMES = ("cudnn", "flash", "efficient", "math")
DEFAULT_SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernel variants in effect for one training process."""

    megatron_fusions: bool = False
    fused_cross_entropy: bool = False
    fused_adamw: bool = False
    compile_layers: bool = False
    sdpa_backends: tuple[str, ...] | None = None  # None: PyTorch's default order
    notes: tuple[str, ...] = ()  # why a requested variant is off here

    @classmethod
    def all_on(cls) -> Kernels:
        return cls(True, True, True, True, DEFAULT_SDPA_BACKENDS)

    def record(self) -> dict[str, Any]:
        """JSON-ready form for the metrics lines and the segment marker."""
        out: dict[str, Any] = {key: getattr(self, key) for key in BOOL_KEYS}
        out["sdpa_backends"] = list(self.sdpa_backends) if self.sdpa_backends else None
        return out

    def label(self) -> str:
        """Short human name: ``plain`` or the keys that are on, joined by ``+``."""
        on = [key for key in BOOL_KEYS if getattr(self, key)]
        if self.sdpa_backends:
            on.append("sdpa:" + ">".join(self.sdpa_backends))
        return "+".join(on) or "plain"

    def transformer_config_overrides(self) -> dict[str, Any]:
        """``TransformerConfig`` fields for megatron's own fusions."""
        return {
            "bias_activation_fusion": self.megatron_fusions,
            "bias_dropout_fusion": self.megatron_fusions,
            "cross_entropy_loss_fusion": self.fused_cross_entropy,
            "cross_entropy_fusion_impl": "native",
            "masked_softmax_fusion": False,
        }


def check_request(requested: dict[str, Any], where: str = "train.kernels") -> None:
    """Raise ``ValueError`` naming the key for an unknown key or a bad value."""
    for key, value in requested.items():
        if key in BOOL_KEYS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
        elif key == "sdpa_backends":
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{where}.sdpa_backends: expected a non-empty list of {SDPA_BACKEND_NAMES}")
            unknown = [name for name in value if name not in SDPA_BACKEND_NAMES]
            if unknown:
                raise ValueError(f"{where}.sdpa_backends: unknown {unknown} (known: {', '.join(SDPA_BACKEND_NAMES)})")
        else:
            raise ValueError(f"{where}.{key}: unknown kernel option (known: {', '.join(BOOL_KEYS)}, sdpa_backends)")


def default_request(on_gpu: bool, bf16: bool) -> dict[str, Any]:
    """What a run JSON without ``train.kernels`` asks for: everything on a GPU (the fused
    cross-entropy only in bf16), nothing on the CPU."""
    if not on_gpu:
        return {key: False for key in BOOL_KEYS} | {"sdpa_backends": None}
    return Kernels.all_on().record() | {"fused_cross_entropy": bf16}


def _compiler_available() -> bool:
    """inductor's CPU backend needs a C++ compiler (CUDA builds use Triton)."""
    return bool(shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++"))


def resolve(
    requested: dict[str, Any] | None,
    *,
    on_gpu: bool,
    attention: str,
    bf16: bool = False,
) -> Kernels:
    """The variants that run here: ``requested`` (``train.kernels``; None = :func:`default_request`)
    minus what this device or attention backend cannot run, each with its reason in ``notes``."""
    request = default_request(on_gpu, bf16) if requested is None else dict(requested)
    check_request(request)
    chosen = {key: bool(request.get(key, False)) for key in BOOL_KEYS}
    notes = []
    compiled = [key for key in ("megatron_fusions", "fused_cross_entropy", "compile_layers") if chosen[key]]
    if compiled and not on_gpu and not _compiler_available():
        for key in compiled:
            chosen[key] = False
        notes.append(f"{', '.join(compiled)} off: torch.compile on the CPU needs a C++ compiler (g++)")
    if chosen["compile_layers"] and attention == "transformer_engine":
        chosen["compile_layers"] = False
        notes.append("compile_layers off: Transformer Engine layers fuse these kernels themselves")
    if chosen["fused_adamw"]:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        device = "cuda" if on_gpu else "cpu"
        if not megatron_uses_torch_adamw():
            chosen["fused_adamw"] = False
            notes.append("fused_adamw off: megatron already uses the fused Adam of Transformer Engine or apex")
        elif device not in _get_fused_kernels_supported_devices():
            chosen["fused_adamw"] = False
            notes.append(f"fused_adamw off: this torch has no fused AdamW for {device}")
    backends = request.get("sdpa_backends")
    if backends and not (on_gpu and attention == "sdpa"):
        where = "the CPU" if not on_gpu else f"attention {attention!r}"
        notes.append(f"sdpa_backends not applied: no SDPA kernel choice on {where}")
        backends = None
    return Kernels(**chosen, sdpa_backends=tuple(backends) if backends else None, notes=tuple(notes))


def megatron_uses_torch_adamw() -> bool:
    """True when megatron's optimizer falls back to ``torch.optim.AdamW`` (no TE, no apex)."""
    from megatron.core import optimizer

    return bool(optimizer.USING_PYTORCH_OPTIMIZER)


# ---- applying them --------------------------------------------------------------------------------


@contextlib.contextmanager
def sdpa_priority(backends: tuple[str, ...] | None) -> Iterator[None]:
    """Within the block, PyTorch SDPA tries ``backends`` in this order (None: leave it as is)."""
    if not backends:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    with sdpa_kernel([names[name] for name in backends], set_priority=True):
        yield


def use_fused_adamw(optimizer) -> int:
    """Switch the torch AdamW instances inside a megatron optimizer to ``fused=True``.

    Without TE/apex, ``get_megatron_optimizer`` builds ``torch.optim.AdamW`` with the default
    for-each implementation; ``step`` reads ``fused``/``foreach`` from each parameter group, so
    setting them after construction is the whole change. Returns how many groups were switched;
    raises ``TypeError`` when the inner optimizer is not torch's AdamW (e.g. TE's FusedAdam).
    """
    switched = 0
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.AdamW):
            raise TypeError(f"fused_adamw: the inner optimizer is {type(inner).__name__}, not torch.optim.AdamW")
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)
            switched += 1
        inner._step_supports_amp_scaling = True  # as AdamW.__init__ sets it for fused=True
    return switched


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's ChainedOptimizer / mixed-precision wrappers."""
    return [inner for _, inner in _wrapped_optimizers(optimizer)]


def _wrapped_optimizers(optimizer, wrapper=None) -> list[tuple[Any, Any]]:
    """(innermost megatron wrapper, torch optimizer) pairs."""
    if hasattr(optimizer, "chained_optimizers"):
        return [pair for chained in optimizer.chained_optimizers for pair in _wrapped_optimizers(chained)]
    inner = getattr(optimizer, "optimizer", None)
    if inner is None:
        return [(wrapper, optimizer)]
    return _wrapped_optimizers(inner, optimizer)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state on this rank: the Adam moments, plus the fp32 main parameters that
    megatron's mixed-precision optimizers keep (bf16 runs): what the distributed optimizer shards."""
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    total = 0
    for wrapper, inner in _wrapped_optimizers(optimizer):
        params = [p for group in inner.param_groups for p in group["params"]]
        states = [t for p in params for t in inner.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in states if t.dim() > 0)  # moments, not `step`
        if isinstance(wrapper, MixedPrecisionOptimizer):  # its torch optimizer updates fp32 main copies
            total += sum(p.numel() * p.element_size() for p in params)
    return total


def prepare_compile(on_gpu: bool) -> None:
    """Process-wide torch.compile settings for the compiled variants.

    megatron warns from inside layer code (deprecations, rank 0 only); ``warnings.warn`` would
    split every compiled layer into pieces, so it is ignored inside compiled regions. On the CPU
    (tests, demo) compiled dropout draws from the eager RNG (``fallback_random``), so compiled and
    plain runs see the same masks and a resumed run stays bit-identical.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    dynamo_config.ignore_logging_functions.add(warnings.warn)
    if not on_gpu:
        inductor_config.fallback_random = True


@functools.cache
def compiled_layer_class():
    """:class:`megatron.core.transformer.transformer_layer.TransformerLayer` that compiles itself.

    ``nn.Module.compile`` keeps the module tree (and so every state-dict and checkpoint key) as it
    is; the core attention is excluded with ``torch.compiler.disable`` (one clean graph break:
    SDPA is a single kernel, and megatron's attention forks the RNG tracker, which dynamo cannot
    trace). All layers share one compiled graph.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class CompiledTransformerLayer(TransformerLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            core = getattr(self.self_attention, "core_attention", None)
            if core is not None:
                core.forward = torch.compiler.disable(core.forward)
            self.compile(dynamic=False)

    return CompiledTransformerLayer
