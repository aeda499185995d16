"""Build the megatron-core ``GPTModel`` for a :class:`~osref.model_spec.ModelSpec`.

Training, checkpoint loading and the export parity check must construct exactly the same
module tree, so they all call :func:`build_gpt_model`. It uses the Transformer Engine layer spec
when TE is importable (GPU nodes) and megatron's local spec otherwise (with PyTorch SDPA as the
core attention on a GPU without TE); all save under the same torch_dist keys, so checkpoints move
between them.

Seeding follows ``notes/megatron-core.md`` §3: ``torch.manual_seed`` on every rank before the
weights are drawn (megatron DDP does not broadcast parameters) and
``model_parallel_cuda_manual_seed`` even at TP=1 (attention forks the tracker).
"""

from __future__ import annotations

import importlib.util

import torch

from osref.megatron_compat import enable_cpu_guards
from osref.model_spec import ModelSpec


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_transformer_config(
    spec: ModelSpec,
    *,
    tensor_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
):
    """``TransformerConfig`` for ``spec``; ``overrides`` go straight to the config."""
    from megatron.core.transformer import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kwargs = spec.transformer_config_kwargs()
    kwargs.update(
        tensor_model_parallel_size=tensor_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


ATTENTION_BACKENDS = ("transformer_engine", "sdpa", "local")


def attention_backend() -> str:
    """The default: ``transformer_engine`` when TE is importable and CUDA is up, else ``sdpa`` on a
    GPU without TE (see :mod:`osref.sdpa_attention`), else megatron's ``local`` attention."""
    if transformer_engine_available():
        return "transformer_engine"
    return "sdpa" if torch.cuda.is_available() else "local"


def layer_spec(spec: ModelSpec, backend: str | None = None, compile_layers: bool = False):
    """TE layer spec (default when TE is importable and CUDA is up), else the local spec — with
    SDPA core attention on a GPU. All three save the same checkpoint keys. ``compile_layers``
    makes each local-spec layer a :func:`osref.kernels.compiled_layer_class` (same keys)."""
    from megatron.core.models.gpt import gpt_layer_specs

    backend = backend or attention_backend()
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
    if backend == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    local = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization="RMSNorm")
    if backend == "sdpa":
        from osref.sdpa_attention import SDPACoreAttention

        local.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if compile_layers:
        from osref.kernels import compiled_layer_class

        local.module = compiled_layer_class()
    return local


def build_gpt_model(
    spec: ModelSpec,
    *,
    tensor_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    attention: str | None = None,
    device: str | torch.device | None = None,
    compile_layers: bool = False,
    **config_overrides,
):
    """Seed, then construct the megatron ``GPTModel`` for ``spec`` on this rank.

    Needs megatron's parallel state (``osref.megatron_compat.init_single_process_parallel`` for a
    single process). On CPU the guards are enabled. ``device`` defaults to the current CUDA device
    when CUDA is available, else the CPU; ``attention`` (one of :data:`ATTENTION_BACKENDS`)
    defaults to :func:`attention_backend`; ``compile_layers`` compiles each transformer layer
    (local spec, see :mod:`osref.kernels`).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    enable_cpu_guards()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = build_transformer_config(
        spec, tensor_parallel=tensor_parallel, params_dtype=params_dtype, **config_overrides
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, attention, compile_layers=compile_layers),
        **spec.gpt_model_kwargs(),
    )
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return model.to(device) if device is not None else model
