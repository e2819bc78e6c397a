"""Run Megatron-Core 0.16.x on a CPU-only machine (gloo): every CUDA-only call it makes, in one place.

Megatron-Core assumes a GPU in a handful of places that have nothing to do with the math: it asks
``torch.cuda`` for the current device, synchronizes, keeps RNG states for dropout on the GPU,
creates side streams, and hard-codes ``device="cuda"`` in a few bookkeeping tensors. With those
calls redirected, the whole of GPTModel / TP / PP / the 1F1B schedule / DDP / the distributed
optimizer runs on CPU over gloo, which is what lets the parallel layouts be tested on a laptop.

:func:`apply` installs the stubs below. It is idempotent and does nothing when CUDA is available
(``torch.cuda.is_available()``), so GPU runs never see it. Call it before building a model; the
layout (:meth:`megatron_smd.parallel.layout.ParallelLayout.initialize`) does.

Stub -> the Megatron code (``megatron/core/...``, 0.16.1) it stands in for
------------------------------------------------------------------------------

Global ``torch.cuda`` entries (harmless on a CPU-only build, where the originals raise):

* ``torch.cuda.current_device() -> "cpu"``: the device argument of nearly every buffer,
  e.g. ``tensor_parallel/layers.py:LinearWithGradAccumulationAndAsyncCommunication.forward``,
  ``tensor_parallel/mappings.py:_gather_along_first_dim``, ``utils.py:GlobalMemoryBuffer.get_tensor``,
  ``pipeline_parallel/p2p_communication.py:P2PCommunicator._communicate`` (receive buffers).
* ``torch.cuda.synchronize`` -> no-op: ``pipeline_parallel/p2p_communication.py:
  P2PCommunicator._communicate`` (``batch_p2p_sync``), ``distributed/distributed_data_parallel.py:
  DistributedDataParallel.offload_grad_buffers``.
* ``torch.cuda.Stream / stream / current_stream / default_stream`` -> inert stand-ins:
  ``distributed/distributed_data_parallel.py:DistributedDataParallel.__init__``
  (``communication_stream``), ``distributed/param_and_grad_buffer.py:_ParamAndGradBucketGroup.
  start_grad_sync / finish_grad_sync``.
* ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` and
  ``tensor_parallel/random.py:_get_cuda_rng_state / _set_cuda_rng_state`` -> the CPU default
  generator: ``tensor_parallel/random.py:CudaRNGStatesTracker.add / fork`` and
  ``model_parallel_cuda_manual_seed`` (the dropout RNG tracker; ``fork`` swaps the CPU generator's
  state in and out exactly as it would the GPU's). Side effect: ``model_parallel_cuda_manual_seed
  (seed)`` (called by ``ParallelLayout.initialize``) seeds the CPU generator, as it would the GPU's.
* ``torch.Tensor.cuda`` -> returns the tensor unchanged:
  ``models/common/language_module/language_module.py:LanguageModule.setup_embeddings_and_output_layer``
  (``weight.data.cuda()`` before the tied-embedding all-reduce under PP > 1),
  ``optimizer/distrib_optimizer.py:DistributedOptimizer`` checkpoint exchange.

Module-scoped stand-ins (only the named module sees them):

* ``torch`` inside ``pipeline_parallel/schedules.py`` (``forward_backward_no_pipelining``,
  ``forward_backward_pipelining_with/without_interleaving``: ``total_num_tokens`` on
  ``device="cuda"``), ``optimizer/optimizer.py`` (``MixedPrecisionOptimizer.__init__``,
  ``FP32Optimizer.__init__``: ``found_inf`` / ``_scale`` on ``'cuda'``), ``optimizer/clip_grads.py``
  (``get_grad_norm_fp32``, ``clip_grad_by_total_norm_fp32``, ``count_zeros_fp32``),
  ``distributed/param_and_grad_buffer.py`` (``_ParamAndGradBuffer.__init__``),
  ``tensor_parallel/data.py`` (``broadcast_data``), ``transformer/utils.py``
  (``get_default_causal_mask`` / ``get_sliding_window_causal_mask``, used by the local
  ``DotProductAttention``'s softmax), ``optimizer/grad_scaler.py`` (loss scalers) and ``utils.py``
  (``local_multi_tensor_l2_norm``: the grad-norm result on ``device="cuda"`` when apex/TE are
  absent) is a proxy of ``torch`` whose tensor factories map ``device="cuda"`` to CPU.
  ``torch.zeros`` everywhere else is untouched.
* ``models/common/embeddings/rope_utils.py:get_pos_emb_on_this_cp_rank`` (and the copies imported
  by name into ``rotary_pos_embedding.py`` and ``yarn_rotary_pos_embedding.py``): the original
  builds its index with ``pin_memory=True`` and ``.cuda(non_blocking=True)``. The replacement
  selects the same two of the ``2 * cp`` sequence chunks (``cp_rank`` and ``2 * cp - 1 - cp_rank``,
  Megatron's causal load balance) on the tensor's own device.
* ``Tensor.type()`` with no argument reports ``torch.cuda.*Tensor`` names, but only *while* one of
  these runs (tests/test_learner_model.py runs a DDP + DistributedOptimizer step through them):
  ``optimizer/optimizer.py:Float16OptimizerWithFloat16Params.__init__``,
  ``optimizer/distrib_optimizer.py:DistributedOptimizer._build_model_and_main_param_groups``,
  ``optimizer/clip_grads.py:clip_grad_by_total_norm_fp32``. They reject any parameter whose
  ``type()`` is not a CUDA type name; outside those calls ``Tensor.type()`` is the original.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from collections.abc import Callable
from typing import Any

import torch

_APPLIED = False

# Megatron modules that hard-code device="cuda" in tensor factories.
_CUDA_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "rand", "randn")


def is_needed() -> bool:
    """True when CUDA is absent, i.e. when Megatron's CUDA-only calls must be redirected."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _APPLIED


# ----------------------------------------------------------------------------------------------
# stand-ins
# ----------------------------------------------------------------------------------------------


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, an int) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if str(torch.device(device).type) == "cuda":
        return "cpu"
    return device


def _wrap_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


class _CpuTorchProxy(types.ModuleType):
    """``torch`` as seen by one Megatron module: factories map ``device="cuda"`` to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _wrap_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:  # everything else is the real torch
        return getattr(torch, name)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: work is synchronous on CPU, so waits are no-ops."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _stream_ctx(stream=None):
    return contextlib.nullcontext()


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """CPU version of Megatron's ``rope_utils.get_pos_emb_on_this_cp_rank``.

    ``pos_emb`` ``[..., S, ...]`` (``S`` on ``seq_dim``) is viewed as ``2 * cp`` equal chunks; CP rank
    ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r`` (the causal load balance of
    ``utils.get_batch_on_this_cp_rank``), giving ``[..., S / cp, ...]``.
    """
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size = cp_group.size()
    cp_rank = cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_ORIG_TENSOR_TYPE = torch.Tensor.type
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
}


def _cuda_named_type(self: torch.Tensor, *args, **kwargs):
    """``Tensor.type()`` that names CPU float tensors as CUDA types; any call with arguments is the original."""
    if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
        return _CUDA_TYPE_NAMES[self.dtype]
    return _ORIG_TENSOR_TYPE(self, *args, **kwargs)


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Run ``fn`` with ``Tensor.type()`` reporting CUDA type names (Megatron's dtype checks)."""
    if getattr(fn, "_smd_cpu_shim", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = torch.Tensor.type
        torch.Tensor.type = _cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = prev

    wrapper._smd_cpu_shim = True  # type: ignore[attr-defined]
    return wrapper


# ----------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------


def apply() -> bool:
    """Install the CPU stand-ins if CUDA is absent. Idempotent. Returns True if the shim is active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not is_needed():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.stream = _stream_ctx
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _cpu_get_rng_state
    tp_random._set_cuda_rng_state = _cpu_set_rng_state

    proxy = _CpuTorchProxy()
    for name in _CUDA_DEVICE_MODULES:
        importlib.import_module(name).torch = proxy

    for name in ("rope_utils", "rotary_pos_embedding", "yarn_rotary_pos_embedding"):
        mod = importlib.import_module(f"megatron.core.models.common.embeddings.{name}")
        mod.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    optimizer.Float16OptimizerWithFloat16Params.__init__ = _with_cuda_type_names(
        optimizer.Float16OptimizerWithFloat16Params.__init__)
    dopt = distrib_optimizer.DistributedOptimizer
    build = dopt.__dict__["_build_model_and_main_param_groups"]  # a classmethod object
    dopt._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build.__func__))
    wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped_clip
    optimizer.clip_grad_by_total_norm_fp32 = wrapped_clip

    _APPLIED = True
    return True
