"""The training stage: train one run's megatron-core GPT model up to a given iteration.

``train(run, until_iteration)`` is the whole stage, driven only by the resolved run
(:class:`osref.contracts.RunDocument`, ``run.json``; a ``run.json`` dict is read into one). It resumes from the newest complete
checkpoint, so a resubmitted or preempted job continues where the last one stopped, and on the
CPU a resumed run is bit-identical to an uninterrupted one (weights and logged losses).

Everything that megatron-core already does is taken from it: ``GPTDataset`` through
``BlendedMegatronDatasetBuilder``, megatron DDP + ``finalize_model_grads``,
``get_megatron_optimizer`` (AdamW; distributed optimizer / bf16 on GPU), ``OptimizerParamScheduler``
(WSD or cosine, counted in iterations), ``get_forward_backward_func`` and torch_dist checkpoints.

Iteration semantics: iteration ``i`` is the state after ``i`` optimizer updates. The update that
produces iteration ``i`` uses the micro-batches of global batch ``i - 1`` and the learning rate
``lr(i - 1)``; the metrics line for iteration ``i`` reports that update.

Divergence: a non-finite loss or gradient norm stops the segment at once with
:class:`NonFiniteLoss` naming the iteration (Megatron-LM's ``check_for_nan_in_loss_and_grad``; with
bf16 or fp32 there is no loss scaler to skip the step), before the update is saved; a model holding
NaN/inf is never saved or marked complete, and resume takes the newest checkpoint whose weights are
finite (see ``osref.checkpointing``).

Exclusivity: a segment holds ``{run_dir}/train.lock`` (:func:`segment_lock`, ``osref.locks``)
from before it picks its checkpoint until its marker is written.

Observability: every ``train.log_interval`` iterations (and at a segment's end) rank 0 appends one
JSON line to ``{run_dir}/logs/train_metrics.jsonl`` — iteration, consumed_tokens, loss, lr,
grad_norm, step_s, tokens_per_s, tflops_per_gpu (6·N + attention FLOPs per token), mfu (against
``train.peak_tflops`` or the GPU's bf16 peak; null on the CPU), mem_gb, elapsed_s, eta_s, kernels
(the fused kernels in effect, :mod:`osref.kernels`) — and logs the same as one console line. A
resumed run first drops the lines past its checkpoint, so the file holds each iteration once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from osref import checkpointing, kernels
from osref.contracts import BranchSettings, DataSettings, RunDocument, TrainSettings
from osref.files import write_text_atomic
from osref.locks import LockHeld, LockUnsupported, exclusive_lock
from osref.megatron_compat import enable_cpu_guards
from osref.megatron_model import attention_backend, build_gpt_model
from osref.paths import RunLayout

log = logging.getLogger(__name__)


# ---- configuration helpers ----------------------------------------------------------------------


def scheduled_lr(train_cfg: TrainSettings | Mapping[str, Any], step: int) -> float:
    """Closed-form learning rate for the update after ``step`` completed iterations."""
    train_cfg = TrainSettings.coerce(train_cfg)
    peak, floor = train_cfg.lr, train_cfg.min_lr
    warmup, total = train_cfg.warmup_iters, train_cfg.train_iters
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if train_cfg.schedule == "wsd":
        cooldown = train_cfg.cooldown_iters
        if step <= total - cooldown:
            return peak
        return floor + (peak - floor) * (total - step) / cooldown
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- distributed setup ----------------------------------------------------------------------------


def init_distributed(tensor_parallel: int) -> None:
    """Idempotently initialise torch.distributed (env:// under torchrun/srun, else world size 1)
    and megatron's model parallel state."""
    from megatron.core import parallel_state

    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            if on_gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if on_gpu else "gloo", init_method="env://")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    elif parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
        raise RuntimeError(
            f"model parallel state already initialised with TP="
            f"{parallel_state.get_tensor_model_parallel_world_size()}, run asks train.tensor_parallel={tensor_parallel}"
        )


def is_rank0() -> bool:
    return dist.get_rank() == 0


@contextlib.contextmanager
def segment_lock(run: RunDocument | Mapping[str, Any], until_iteration: int):
    """Rank 0 holds ``{run_dir}/train.lock`` for the block; collective. Every rank raises
    :class:`osref.locks.LockHeld` (naming the holder) when another job already trains this run,
    :class:`osref.locks.LockUnsupported` when the filesystem refuses locks."""
    run = RunDocument.coerce(run)
    what = f"the training segment of run {run.run_id} up to iteration {until_iteration}"
    with contextlib.ExitStack() as stack:
        refusal: list[str | None] = [None]
        if is_rank0():
            try:
                stack.enter_context(exclusive_lock(run.layout.train_lock, what))
            except (LockHeld, OSError, RuntimeError) as exc:
                refusal[0] = f"{type(exc).__name__}: {exc}"
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(refusal, src=0)
        if refusal[0]:
            kind, _, message = refusal[0].partition(": ")
            if kind == "LockHeld":
                raise LockHeld(
                    f"run {run.run_id}: another job trains this run: {message}; this job changes "
                    "nothing (it resumes when started again after that job has ended)"
                )
            raise LockUnsupported(message) if kind == "LockUnsupported" else RuntimeError(message)
        yield


# ---- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EodTokenizer:
    """What ``GPTDataset`` needs from a tokenizer: ids of EOD/pad and a cache identity."""

    vocab_size: int
    eod: int
    path: str

    @property
    def pad(self) -> int:
        return -1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "osref-eod-tokenizer", "path": self.path, "eod": self.eod}


def _blend(data: DataSettings) -> tuple[list[str], list[float] | None]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = list(data.prefixes)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"data.prefixes: {prefix}{suffix} does not exist")
    weights = None if data.weights is None else list(data.weights)
    if weights is None and len(prefixes) > 1:
        weights = [float(IndexedDataset(p).sequence_lengths.sum()) for p in prefixes]
    return prefixes, weights


def valid_batches(train_cfg: TrainSettings) -> int:
    return train_cfg.validation_batches


def build_datasets(run: RunDocument | Mapping[str, Any]):
    """(train, valid) ``GPTDataset``/``BlendedDataset`` of the run, built collectively."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    run = RunDocument.coerce(run)
    train_cfg = run.train
    tokenizer = _EodTokenizer(vocab_size=run.tokenizer.size, eod=run.tokenizer.eod_id, path=str(run.tokenizer.path))
    config = GPTDatasetConfig(
        random_seed=train_cfg.seed,
        sequence_length=train_cfg.seq_length,
        blend=_blend(run.data),
        split=train_cfg.split,
        path_to_cache=run.data.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # The test share stays held out but is never built: on small corpora it can hold no
    # document, and megatron then loops forever looking for tokens.
    config.split_matrix[2] = None
    gbs = train_cfg.global_batch_size
    # a cool-down branch builds its parent's dataset: same size, hence the same sample order
    data_iters = run.branch.parent_train_iters if run.branch else train_cfg.train_iters
    sizes = [data_iters * gbs, valid_batches(train_cfg) * gbs, 0]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return train_ds, valid_ds


def micro_batches(dataset, batch_index: int, train_cfg: TrainSettings, device):
    """This rank's micro-batches of global batch ``batch_index`` (samples are laid out per
    micro-batch step as ``[dp rank 0 | dp rank 1 | ...]``, megatron's pretraining sampler order)."""
    from megatron.core import parallel_state

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    mbs, gbs = train_cfg.micro_batch_size, train_cfg.global_batch_size
    for micro in range(gbs // (mbs * dp_size)):
        start = batch_index * gbs + (micro * dp_size + dp_rank) * mbs
        samples = [dataset[i] for i in range(start, start + mbs)]
        yield {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_masked_mean_loss, batch["loss_mask"])


def _masked_mean_loss(loss_mask, per_token_loss):
    mask = loss_mask.view(-1).float()
    loss = torch.sum(per_token_loss.float().view(-1) * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


# ---- optimizer and schedule -----------------------------------------------------------------------


def build_optimizer(model, train_cfg: TrainSettings, params_dtype: torch.dtype):
    """Megatron's AdamW (no weight decay on biases and norms; bf16 with fp32 main weights when
    ``params_dtype`` is bf16) and its learning-rate scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer(train_cfg),
    )
    optimizer = get_megatron_optimizer(config, [model])
    return optimizer, build_scheduler(optimizer, train_cfg)


def build_scheduler(optimizer, train_cfg: TrainSettings | Mapping[str, Any]):
    """Megatron's ``OptimizerParamScheduler`` for ``train.schedule`` (wsd or cosine), in iterations.

    Its constructor already applies step 0, so the first update uses ``lr(0) = 0``.
    """
    train_cfg = TrainSettings.coerce(train_cfg)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = train_cfg.train_iters
    wsd = train_cfg.schedule == "wsd"
    if train_cfg.schedule not in ("wsd", "cosine"):
        raise ValueError(f"train.schedule={train_cfg.schedule!r}: expected 'wsd' or 'cosine'")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.warmup_iters,
        lr_decay_steps=total,
        lr_decay_style="WSD" if wsd else "cosine",
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=train_cfg.cooldown_iters if wsd else None,
        lr_wsd_decay_style="linear" if wsd else None,
    )


def use_distributed_optimizer(train_cfg: TrainSettings) -> bool:
    # On the CPU the distributed optimizer needs extra resume work (notes §6): plain optimizer there.
    return train_cfg.distributed_optimizer and torch.cuda.is_available()


def training_dtype(train_cfg: TrainSettings) -> torch.dtype:
    if train_cfg.precision == "bf16" and torch.cuda.is_available():
        return torch.bfloat16
    return torch.float32


# ---- metrics -------------------------------------------------------------------------------------


def truncate_metrics(path: Path, keep_up_to: int) -> None:
    """Drop lines with ``iteration > keep_up_to`` (a resumed run re-logs them), and a last line
    torn by a kill in the middle of its write."""
    if not path.is_file():
        return
    kept = []
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: dropping unreadable line %r", path, line[:80])
            continue
        if record["iteration"] <= keep_up_to:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _append_json_line(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


# Dense bf16 peak TFLOP/s per device, matched against ``torch.cuda.get_device_name()``; the first
# matching fragment wins, so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops_per_device(peak_tflops: float | None = None) -> float | None:
    """The peak that MFU is measured against: ``peak_tflops`` (``train.peak_tflops``) when the run
    sets it, else the bf16 peak of this GPU from :data:`BF16_PEAK_TFLOPS`; None on the CPU or an
    unknown GPU."""
    if peak_tflops:
        return float(peak_tflops)
    if not torch.cuda.is_available():
        return None
    name = device_name()
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in name:
            return tflops
    log.warning("no bf16 peak known for %r: MFU not reported (set train.peak_tflops)", name)
    return None


def _mean_loss_across_dp(losses_reduced: list[dict], device) -> float:
    from megatron.core import parallel_state

    loss = torch.stack([d["lm loss"].float() for d in losses_reduced]).mean().to(device)
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


# ---- the loop ------------------------------------------------------------------------------------


class NonFiniteLoss(RuntimeError):
    """Training diverged: a NaN/inf loss or gradient norm at ``iteration``; nothing after the
    last saved checkpoint is kept."""

    def __init__(self, iteration: int, what: str, lr: float):
        super().__init__(
            f"iteration {iteration}: {what} at learning rate {lr:.4g}; training diverged, the segment stops "
            "without saving this update (the checkpoints before it are kept)"
        )
        self.iteration = iteration


@dataclasses.dataclass
class Trainer:
    """One rank's model, optimizer and data, and the optimizer update (also driven by
    ``scripts/bench_train.py`` on random tokens)."""

    run: RunDocument
    # megatron-core objects: megatron ships no type information, so these are Any
    model: Any  # megatron DDP wrapper
    optimizer: Any
    scheduler: Any
    train_ds: Any
    valid_ds: Any
    device: torch.device

    @property
    def cfg(self) -> TrainSettings:
        return self.run.train

    @functools.cached_property
    def variants(self) -> kernels.Kernels:
        """The kernel variants in effect (:func:`resolve_kernels`)."""
        return resolve_kernels(self.cfg)

    @property
    def tokens_per_iteration(self) -> int:
        return self.cfg.tokens_per_iteration

    def _run_batches(self, batches, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        batches = list(batches)
        with kernels.sdpa_priority(self.variants.sdpa_backends):
            return get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size,
                forward_only=forward_only,
            )

    def step(self, iteration: int) -> dict:
        """One optimizer update producing ``iteration`` (uses global batch ``iteration - 1``).

        Raises :class:`NonFiniteLoss` on every rank when the loss or the gradient norm is NaN/inf
        (both are reduced over the ranks, so all of them agree); the update it made in memory is
        never saved. Checked after the optimizer step, where the loss was read before: no extra sync.
        """
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]
        losses = self._run_batches(micro_batches(self.train_ds, iteration - 1, self.cfg, self.device), False)
        update_ok, grad_norm, _ = self.optimizer.step()
        loss = _mean_loss_across_dp(losses, self.device)
        grad_norm = float(grad_norm)
        if not (update_ok and math.isfinite(loss) and math.isfinite(grad_norm)):
            skipped = "" if update_ok else ", the optimizer skipped the step"
            raise NonFiniteLoss(
                iteration,
                f"the loss or the gradient norm is not finite (loss {loss:.6g}, "
                f"gradient norm {grad_norm:.6g}{skipped})",
                lr,
            )
        self.scheduler.step(increment=1)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def validation_loss(self) -> float:
        self.model.eval()
        with torch.no_grad():
            losses = []
            for batch_index in range(valid_batches(self.cfg)):
                batches = micro_batches(self.valid_ds, batch_index, self.cfg, self.device)
                losses += self._run_batches(batches, True)
        self.model.train()
        return _mean_loss_across_dp(losses, self.device)


def _build_trainer(run: RunDocument | Mapping[str, Any]) -> Trainer:
    run = RunDocument.coerce(run)
    model, optimizer, scheduler, device = build_model_and_optimizer(run)
    train_ds, valid_ds = build_datasets(run)
    return Trainer(run, model, optimizer, scheduler, train_ds, valid_ds, device)


def build_model_and_optimizer(run: RunDocument | Mapping[str, Any]):
    """(megatron DDP model, optimizer, scheduler, device) of ``run``, as training uses them.

    Shared with ``scripts/bench_train.py`` so that the benchmark measures the training stack.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    run = RunDocument.coerce(run)
    cfg = run.train
    enable_cpu_guards()
    init_distributed(cfg.tensor_parallel)
    _check_batch_sizes(cfg)
    dtype = training_dtype(cfg)
    chosen = resolve_kernels(cfg)
    for note in chosen.notes:
        log.warning("train.kernels: %s", note)
    if chosen.compile_layers or chosen.megatron_fusions or chosen.fused_cross_entropy:
        kernels.prepare_compile(torch.cuda.is_available())
    module = build_gpt_model(
        run.model,
        tensor_parallel=cfg.tensor_parallel,
        params_dtype=dtype,
        seed=cfg.seed,
        attention=cfg.attention,
        compile_layers=chosen.compile_layers,
        **recompute_overrides(cfg.recompute),
        **chosen.transformer_config_overrides(),
    )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # buckets are reduced as the backward pass fills them (finished in finalize_model_grads)
        overlap_grad_reduce=bool(cfg.overlap_grad_reduce),
        use_distributed_optimizer=use_distributed_optimizer(cfg),
    )
    model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.no_sync_func = model.no_sync
    optimizer, scheduler = build_optimizer(model, cfg, dtype)
    if chosen.fused_adamw:
        kernels.use_fused_adamw(optimizer)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model, optimizer, scheduler, device


def resolve_kernels(cfg: TrainSettings) -> kernels.Kernels:
    """The kernel variants this process trains with: ``train.kernels`` (missing: all on a GPU, none
    on the CPU) minus what this device and attention backend cannot run; see :mod:`osref.kernels`."""
    return kernels.resolve(
        cfg.kernels,
        on_gpu=torch.cuda.is_available(),
        attention=cfg.attention or attention_backend(),
        bf16=training_dtype(cfg) == torch.bfloat16,
    )


def recompute_overrides(recompute: str) -> dict:
    """``TransformerConfig`` activation-recompute settings for ``train.recompute``."""
    choices: dict[str, dict[str, Any]] = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }
    if recompute not in choices:
        raise ValueError(f"train.recompute={recompute!r}: expected one of {sorted(choices)}")
    return choices[recompute]


def _check_batch_sizes(cfg: TrainSettings) -> None:
    from megatron.core import parallel_state

    dp_size = parallel_state.get_data_parallel_world_size()
    per_step = cfg.micro_batch_size * dp_size
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={cfg.global_batch_size} is not divisible by "
            f"train.micro_batch_size × data-parallel size = {cfg.micro_batch_size} × {dp_size}"
        )


def save_iterations(cfg: TrainSettings, start: int, until: int) -> set[int]:
    return {i for i in cfg.checkpoint_iters if start < i <= until} | {until}


def train(run: RunDocument | Mapping[str, Any], until_iteration: int) -> dict:
    """Train ``run`` up to ``until_iteration``; see :func:`train_and_return_model`."""
    return train_and_return_model(run, until_iteration)[0]


def train_and_return_model(run: RunDocument | Mapping[str, Any], until_iteration: int) -> tuple[dict, object]:
    """Train ``run`` from its newest complete checkpoint (``<= until_iteration``) up to
    ``until_iteration``, saving at the scheduled ``train.checkpoint_iters`` and at the end.

    Collective: every rank calls it. Returns (on every rank) ``{"iteration", "consumed_tokens",
    "checkpoint", "resumed_from", "valid_loss", "kernels"}`` and the trained megatron module (None when
    the checkpoint at ``until_iteration`` already existed).
    """
    run = RunDocument.coerce(run)
    cfg = run.train
    if not 0 < until_iteration <= cfg.train_iters:
        raise ValueError(f"until_iteration={until_iteration} outside 1..train.train_iters={cfg.train_iters}")
    run_dir = Path(run.run_dir)
    complete = [
        i for i in checkpointing.complete_iterations(checkpointing.checkpoint_root(run_dir)) if i <= until_iteration
    ]
    if complete and complete[-1] == until_iteration and _checked_finite(run_dir, until_iteration):
        log.info("checkpoint for iteration %d is already complete: nothing to train", until_iteration)
        return _summary(cfg, run_dir, until_iteration, until_iteration, valid_loss=None), None
    branch = run.branch
    trainer = _build_trainer(run)
    start = _resume_from_latest_finite(trainer, run_dir, complete)
    if start is None and complete:  # every checkpoint was non-finite and has been loaded: start afresh
        del trainer  # (one model in memory at a time)
        trainer = _build_trainer(run)
    if start == until_iteration:
        return _summary(cfg, run_dir, until_iteration, start, valid_loss=None), None
    if start is None and branch:
        start = _start_branch(trainer, branch, until_iteration)
    start = start or 0

    metrics = MetricsLog(run.layout, start, tensorboard=cfg.tensorboard) if is_rank0() else None
    try:
        _train_segment(trainer, run_dir, start, until_iteration, metrics)
        valid_loss = trainer.validation_loss()
        if metrics:
            consumed = until_iteration * trainer.tokens_per_iteration
            metrics.valid({"iteration": until_iteration, "consumed_tokens": consumed, "valid_loss": valid_loss})
            log.info("iteration %d | validation loss %.4f", until_iteration, valid_loss)
    finally:
        if metrics:
            metrics.close()
    return _summary(cfg, run_dir, until_iteration, start, valid_loss), trainer.model.module


class MetricsLog:
    """Rank 0's training log: JSONL records (always, the report reads them) and, with
    ``train.tensorboard``, the same numbers as TensorBoard scalars under ``{run_dir}/tensorboard``.
    A resumed job first drops what the lost job logged after the checkpoint, in both."""

    SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gb")

    def __init__(self, layout: RunLayout, start: int, tensorboard: bool = False):
        self.train_file = Path(layout.train_metrics)
        self.valid_file = Path(layout.valid_metrics)
        self.train_file.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.train_file, start)
        truncate_metrics(self.valid_file, start)
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError(
                    "train.tensorboard is true but the tensorboard package is not installed (pip install tensorboard)"
                ) from err
            self.tensorboard = SummaryWriter(layout.tensorboard, purge_step=start + 1)

    def train(self, record: dict) -> None:
        _append_json_line(self.train_file, record)
        if self.tensorboard:
            for key in self.SCALARS:
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], record["iteration"])

    def valid(self, record: dict) -> None:
        _append_json_line(self.valid_file, record)
        if self.tensorboard:
            self.tensorboard.add_scalar("valid/loss", record["valid_loss"], record["iteration"])

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def _checked_finite(run_dir: Path, iteration: int) -> bool:
    """Whether ``complete.json`` says the weights were checked finite when saved (checkpoints
    from before that check have to be loaded to know)."""
    return bool(checkpointing.read_complete_marker(checkpointing.checkpoint_dir(run_dir, iteration)).get("finite"))


def _resume_from_latest_finite(trainer: Trainer, run_dir: Path, complete: list[int]) -> int | None:
    """Load the newest of the ``complete`` checkpoints whose weights are finite; one that is not
    (saved before the finiteness check existed) is demoted (``nonfinite.json``) and the next older
    one tried. Returns its iteration, or None when there is none."""
    for iteration in reversed(complete):
        ckpt = checkpointing.checkpoint_dir(run_dir, iteration)
        checkpointing.load_checkpoint(
            ckpt,
            trainer.model.module,
            trainer.optimizer,
            trainer.scheduler,
            dist_optimizer=use_distributed_optimizer(trainer.cfg),
        )
        if checkpointing.model_is_finite(trainer.model.module):
            log.info("resumed from %s", ckpt)
            return iteration
        log.error(
            "%s holds NaN/inf weights although marked complete: skipped (now %s), trying an older one",
            ckpt,
            checkpointing.NON_FINITE_MARKER,
        )
        checkpointing.mark_non_finite(ckpt, "NaN/inf weights found when resuming")
    return None


def _start_branch(trainer: Trainer, branch: BranchSettings, until_iteration: int) -> int:
    """Load the parent's checkpoint at the branch point into a cool-down branch's first job.

    Weights, optimizer moments and RNG come from the parent; the scheduler is the branch's own
    (its WSD total and cool-down differ from the parent's), advanced to the branch point — where
    both schedules are still at the constant peak, so the first branch step equals the parent's.
    """
    iteration = branch.iteration
    if until_iteration <= iteration:
        raise ValueError(f"until_iteration={until_iteration}: a branch trains after its branch point {iteration}")
    source = checkpointing.checkpoint_dir(branch.parent_run_dir, iteration)
    if not checkpointing.is_complete(source):
        raise FileNotFoundError(
            f"{source}: the parent run {branch.parent_run_id} has no complete checkpoint at the branch "
            f"point {iteration}; train the parent past it first"
        )
    checkpointing.load_checkpoint(
        source,
        trainer.model.module,
        trainer.optimizer,
        None,
        dist_optimizer=use_distributed_optimizer(trainer.cfg),
    )
    if not checkpointing.model_is_finite(trainer.model.module):
        raise checkpointing.NonFiniteCheckpoint(f"{source}: the parent's checkpoint at the branch point holds NaN/inf")
    trainer.scheduler.step(increment=iteration)
    log.info("branched from %s (run %s)", source, branch.parent_run_id)
    return iteration


def _train_segment(trainer: Trainer, run_dir: Path, start: int, until: int, metrics: MetricsLog | None) -> None:
    cfg = trainer.cfg
    to_save = save_iterations(cfg, start, until)
    log_interval = max(1, cfg.log_interval)
    flops_per_token = trainer.run.model.flops_per_token(with_attention=True)
    peak_tflops = peak_tflops_per_device(cfg.peak_tflops)
    segment_start = interval_start = time.perf_counter()
    interval_steps = 0
    for iteration in range(start + 1, until + 1):
        stats = trainer.step(iteration)
        interval_steps += 1
        if iteration % log_interval == 0 or iteration == until:
            now = time.perf_counter()
            step_s = (now - interval_start) / interval_steps
            record = _metrics_record(
                trainer, iteration, stats, step_s, now - segment_start, flops_per_token, peak_tflops
            )
            if metrics:
                metrics.train(record)
                log.info(_console_line(record, cfg.train_iters))
            interval_start, interval_steps = time.perf_counter(), 0
        if iteration in to_save:
            checkpointing.save_checkpoint(
                run_dir,
                iteration,
                iteration * trainer.tokens_per_iteration,
                trainer.model.module,
                trainer.optimizer,
                trainer.scheduler,
                dist_optimizer=use_distributed_optimizer(cfg),
            )
            log.info("saved %s", checkpointing.checkpoint_dir(run_dir, iteration))
            interval_start = time.perf_counter()  # keep save time out of the step time


def _metrics_record(trainer, iteration, stats, step_s, elapsed_s, flops_per_token, peak_tflops) -> dict:
    tokens = trainer.tokens_per_iteration
    tflops_per_gpu = flops_per_token * tokens / step_s / dist.get_world_size() / 1e12
    return {
        "iteration": iteration,
        "consumed_tokens": iteration * tokens,
        "loss": stats["loss"],
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tflops_per_gpu": tflops_per_gpu,
        "mfu": tflops_per_gpu / peak_tflops if peak_tflops else None,
        "mem_gb": _memory_gb(),
        "elapsed_s": elapsed_s,
        "eta_s": step_s * (trainer.cfg.train_iters - iteration),
        "kernels": trainer.variants.record(),
    }


def _console_line(record: dict, train_iters: int) -> str:
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    return (
        f"iteration {record['iteration']:>7d}/{train_iters} | tokens {format_count(record['consumed_tokens'])} "
        f"| loss {record['loss']:.4f} | lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} "
        f"| {record['step_s']:.3f} s/it | {format_count(record['tokens_per_s'])} tok/s "
        f"| {record['tflops_per_gpu']:.2f} TFLOP/s/GPU | MFU {mfu} | mem {record['mem_gb']:.2f} GiB "
        f"| elapsed {format_duration(record['elapsed_s'])} | ETA {format_duration(record['eta_s'])}"
    )


def format_count(value: float) -> str:
    """1234567 -> '1.23M' (tokens, tokens/s)."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05'; days are kept in the hours field ('50:00:00')."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _summary(cfg: TrainSettings, run_dir: Path, iteration: int, resumed_from: int, valid_loss) -> dict:
    return {
        "iteration": iteration,
        "consumed_tokens": iteration * cfg.global_batch_size * cfg.seq_length,
        "checkpoint": str(checkpointing.checkpoint_dir(run_dir, iteration)),
        "resumed_from": resumed_from,
        "valid_loss": valid_loss,
        "kernels": resolve_kernels(cfg).record(),
    }
