"""Run megatron-core on machines without CUDA (tests, CPU demo runs, the export parity check).

megatron-core is written for GPUs: a few call sites read CUDA RNG state, allocate on
``torch.cuda.current_device()``, create CUDA streams or assert ``torch.cuda.FloatTensor`` type
strings. :func:`enable_cpu_guards` redirects exactly those to the CPU, in this one module, and does
nothing when CUDA is available, so GPU runs execute megatron-core unmodified.

The three guards (numbering as in ``notes/megatron-core.md``):

1. RNG tracker: megatron's ``CudaRNGStatesTracker`` (used by dropout inside attention, even at
   TP=1) is backed by the CPU default generator instead of the CUDA one.
3. ``torch.cuda`` shim: ``current_device`` returns ``"cpu"`` so buffers land on the CPU; stream
   APIs return null objects; ``synchronize``/``empty_cache`` become no-ops (dist_checkpointing
   save, DDP and the optimizer call them).
4. A process-wide ``TorchFunctionMode`` that maps ``device="cuda"``, ``.to("cuda")`` and
   ``.cuda()`` to the CPU and makes ``Tensor.type()`` report ``torch.cuda.*`` so megatron's
   optimizer type asserts pass. It also covers rotary ``inv_freq`` moves and the default causal
   mask, so no per-module model patch is needed.

:func:`init_single_process_parallel` sets up a world-size-1 gloo group and megatron's model
parallel state for in-process use (export, parity checks, tests).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_GUARDS_ENABLED = False


def enable_cpu_guards() -> bool:
    """Install the CPU guards once per process; returns True when they are active.

    A no-op (returns False) when CUDA is available.
    """
    global _GUARDS_ENABLED
    if torch.cuda.is_available():
        return False
    if not _GUARDS_ENABLED:
        _install_cpu_rng_tracker()
        _install_cuda_shim()
        _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
        _GUARDS_ENABLED = True
        log.debug("megatron-core CPU guards enabled")
    return True


def cpu_guards_enabled() -> bool:
    return _GUARDS_ENABLED


# ---- guard 1: RNG tracker on the CPU generator ---------------------------------------------


def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # Same as megatron's fork minus its "CPU RNG state changed" check, which always fires here
        # because the tracked state *is* the CPU state.
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state, outer_name = torch.get_rng_state(), self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork


# ---- guard 3: torch.cuda shim ---------------------------------------------------------------


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


def _install_cuda_shim() -> None:
    cuda: Any = torch.cuda  # Any: the shim replaces the module's own classes and functions
    # not traced by torch.compile (compiled layers on the CPU): dynamo cannot put a str-returning
    # "torch.cuda" call into a graph, and would otherwise split the layer there
    untraced = torch.compiler.disable
    cuda.current_device = untraced(lambda: "cpu")
    cuda.synchronize = untraced(lambda *args, **kwargs: None)
    cuda.empty_cache = untraced(lambda: None)
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = untraced(lambda *args, **kwargs: _NullStream())
    cuda.default_stream = untraced(lambda *args, **kwargs: _NullStream())
    cuda.stream = untraced(lambda *args, **kwargs: contextlib.nullcontext())
    cuda.set_stream = untraced(lambda *args, **kwargs: None)


# ---- guard 4: CUDA device requests → CPU ----------------------------------------------------


def _cpu_if_cuda(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            return self._type(func, args, kwargs)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) for a in args)
        return func(*args, **kwargs)

    @staticmethod
    def _type(func, args, kwargs):
        if len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        target = args[1] if len(args) > 1 else kwargs.pop("dtype")
        if isinstance(target, str):
            target = target.replace("torch.cuda.", "torch.")
        return func(args[0], target, **{k: v for k, v in kwargs.items() if k != "dtype"})


# ---- single-process parallel state ----------------------------------------------------------


def init_single_process_parallel(tensor_parallel: int = 1) -> None:
    """Idempotently create a world-size-1 gloo process group and megatron's parallel state.

    For in-process use of megatron-core (export, parity checks, tests). Leaves an existing
    process group and parallel state untouched.
    """
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
