"""A run started with Transformer Engine (e.g. in an NGC container) can be exported and resumed
without it: the local layer spec checkpoints under TE's names, and what only TE writes is ignored.

TE cannot be installed here, so TE's side is written down from megatron-core 0.16.1's
``extensions/transformer_engine.py``: ``TELayerNormColumnParallelLinear`` (linear_qkv, linear_fc1)
is TE's ``LayerNormLinear`` and saves ``layer_norm_weight``, ``weight``, ``bias``, ``_extra_state``;
``TERowParallelLinear`` (linear_proj, linear_fc2) saves ``weight``, ``bias``, ``_extra_state``;
``TENorm`` (q/k layernorm, final layernorm) saves ``weight``; ``TEDotProductAttention`` saves only
``_extra_state``. Every one of them goes through ``make_sharded_tensors_for_checkpoint``, which
stores ``*_extra_state`` as a ``ShardedObject`` and the rest as ``ShardedTensor`` per layer stack.
The local spec gets the fused-norm names from its ``sharded_state_dict_keys_map``
(``input_layernorm.`` → ``self_attention.linear_qkv.layer_norm_``, ``pre_mlp_layernorm.`` →
``mlp.linear_fc1.layer_norm_``).
"""

from __future__ import annotations

import io

import torch
from conftest import make_run

torch.set_num_threads(1)

# per layer: key -> shape from (h, ffn, heads, head_dim, query groups)
TE_LAYER_TENSORS = {
    "self_attention.linear_qkv.layer_norm_weight": lambda h, f, n, d, g: (h,),
    "self_attention.linear_qkv.weight": lambda h, f, n, d, g: ((n + 2 * g) * d, h),
    "self_attention.linear_qkv.bias": lambda h, f, n, d, g: ((n + 2 * g) * d,),
    "self_attention.q_layernorm.weight": lambda h, f, n, d, g: (d,),
    "self_attention.k_layernorm.weight": lambda h, f, n, d, g: (d,),
    "self_attention.linear_proj.weight": lambda h, f, n, d, g: (h, n * d),
    "self_attention.linear_proj.bias": lambda h, f, n, d, g: (h,),
    "mlp.linear_fc1.layer_norm_weight": lambda h, f, n, d, g: (h,),
    "mlp.linear_fc1.weight": lambda h, f, n, d, g: (2 * f, h),
    "mlp.linear_fc1.bias": lambda h, f, n, d, g: (2 * f,),
    "mlp.linear_fc2.weight": lambda h, f, n, d, g: (h, f),
    "mlp.linear_fc2.bias": lambda h, f, n, d, g: (h,),
}
TE_LAYER_EXTRA_STATE = [
    f"{module}._extra_state"
    for module in (
        "self_attention.linear_qkv",
        "self_attention.core_attention",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    )
]
TE_ONLY = {"decoder.layers.self_attention.core_attention._extra_state"}  # local attention has no extra state


def _split(sharded: dict):
    """({checkpoint key: per-layer shape} of the tensors, {checkpoint key} of the objects).

    The dict is per layer ("decoder.layers.0. …"); the checkpoint key stacks the layers (a leading
    layer dimension). SwiGLU's fc1 is a factory (megatron splits it into gate and up shards on
    save, the same for TE and local); its data is the per-layer tensor."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    tensors = {}
    for value in sharded.values():
        if isinstance(value, ShardedTensor):
            stacked = value.key.startswith("decoder.layers.")
            tensors[value.key] = tuple(value.global_shape[1:] if stacked else value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            tensors[value.key] = tuple(value.data.shape)
    objects = {v.key for v in sharded.values() if isinstance(v, ShardedObject)}
    return tensors, objects


def _moments(optimizer) -> list[torch.Tensor]:
    from osref.kernels import _torch_optimizers

    return [
        state[name].clone()
        for inner in _torch_optimizers(optimizer)
        for group in inner.param_groups
        for p in group["params"]
        for state in [inner.state[p]]
        for name in ("exp_avg", "exp_avg_sq")
    ]


def test_local_spec_checkpoint_keys_are_te_keys(data_root, tmp_path):
    from osref.contracts import RunDocument
    from osref.training import _build_trainer

    run = make_run(data_root, tmp_path)
    spec = RunDocument.from_json(run).model
    module = _build_trainer(run).model.module
    tensors, objects = _split(module.sharded_state_dict())
    h, f, n, d, g, layers = (
        spec.hidden_size,
        spec.ffn_hidden_size,
        spec.num_attention_heads,
        spec.head_dim,
        spec.query_groups,
        spec.num_layers,
    )
    expected = {f"decoder.layers.{key}": shape(h, f, n, d, g) for key, shape in TE_LAYER_TENSORS.items()}
    expected |= {"embedding.word_embeddings.weight": (spec.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    assert tensors == expected
    assert layers == 2 and all(  # one entry per layer, stacked under one key
        sum(1 for k in module.sharded_state_dict() if k.startswith(f"decoder.layers.{i}.")) > 0 for i in range(layers)
    )
    te_objects = {f"decoder.layers.{key}" for key in TE_LAYER_EXTRA_STATE}  # output_layer: tied, not saved
    assert objects == te_objects - TE_ONLY


def test_a_te_layout_checkpoint_resumes_and_loads_for_export_without_te(data_root, tmp_path):
    """Write a checkpoint as TE would (TE names, TE's extra states filled, the attention's extra
    state that only TE has), then resume training from it and load it the way export does."""
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

    from osref import checkpointing
    from osref.files import write_json_atomic
    from osref.training import _build_trainer

    run = make_run(data_root, tmp_path / "run")
    trainer = _build_trainer(run)
    for iteration in (1, 2):
        trainer.step(iteration)
    module = trainer.model.module
    layers = module.config.num_layers
    state = checkpointing._sharded_state_dict(
        module, trainer.optimizer, trainer.scheduler, is_loading=False, dist_optimizer=False
    )
    fp8_meta = io.BytesIO(b"te fp8 metadata")
    for key, obj in list(state["model"].items()):
        if key.endswith("_extra_state"):
            obj.data = fp8_meta  # TE fills its extra states; the local spec leaves them None
    for layer in range(layers):
        key = "decoder.layers.self_attention.core_attention._extra_state"
        state["model"][f"{key}/{layer}"] = make_sharded_object_for_checkpoint(
            fp8_meta, key, sharded_offsets=((0, layer, layers),), replica_id=(0, 0, 0)
        )
    target = checkpointing.checkpoint_dir(run["paths"]["run_dir"], 2)
    target.mkdir(parents=True)
    dist_checkpointing.save(state, str(target))
    write_json_atomic(target / checkpointing.COMPLETE_MARKER, {"iteration": 2, "consumed_tokens": 0})
    saved = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    saved_moments = _moments(trainer.optimizer)

    resumed = _build_trainer(run)
    checkpointing.load_checkpoint(target, resumed.model.module, resumed.optimizer, resumed.scheduler)
    for key, tensor in resumed.model.module.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, saved[key]), key
    moments = _moments(resumed.optimizer)
    assert len(moments) == len(saved_moments) > 0
    assert all(torch.equal(a, b) for a, b in zip(moments, saved_moments, strict=False))
    assert resumed.scheduler.num_steps == trainer.scheduler.num_steps

    exported = checkpointing.load_model_for_inference(run, 2)  # what osref.export reads
    for key, tensor in exported.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, saved[key].float()), key
