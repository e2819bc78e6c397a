"""Run Megatron-Core 0.16.x on a CPU-only machine (gloo): every CUDA-only call it makes, in one place.

Megatron-Core assumes a GPU in a handful of places that have nothing to do with the math: it asks
``torch.cuda`` for the current device, synchronizes, keeps RNG states for dropout on the GPU,
creates side streams, and hard-codes ``device="cuda"`` in a few bookkeeping tensors. With those
calls redirected, the whole of GPTModel / TP / PP / the 1F1B schedule / DDP / the distributed
optimizer runs on CPU over gloo, which is what lets the parallel layouts be tested on a laptop.

:func:`apply` installs the stubs below and :func:`undo` removes them again: every patched
attribute is recorded as it was (including "not set on this class", e.g. ``torch.Tensor.cuda``,
which ``Tensor`` inherits from its C base) and put back exactly; ``with active(): ...`` does both
around a block. :func:`apply` is idempotent (a second call changes nothing) and does nothing when
CUDA is available (``torch.cuda.is_available()``), so GPU runs never see it. Call it before
building a model; the layout (:meth:`megatron_smd.parallel.layout.ParallelLayout.initialize`)
does, for the life of the process.

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
* ``torch.Tensor.cuda`` -> returns the tensor unchanged, but only when the caller is
  megatron-core's own code (the module of the calling frame is ``megatron.core`` or below it):
  ``models/common/language_module/language_module.py:LanguageModule.setup_embeddings_and_output_layer``
  (``weight.data.cuda()`` before the tied-embedding all-reduce under PP > 1),
  ``optimizer/distrib_optimizer.py:DistributedOptimizer.get_parameter_state_dp_zero`` (checkpoint
  exchange), ``tensor_parallel/data.py:broadcast_data``, ``optimizer/optimizer.py:
  Float16OptimizerWithFloat16Params.restore_from_cpu``, ``optimizer/grad_scaler.py:
  DynamicGradScaler.load_state_dict``, ``utils.py:check_param_hashes_across_dp_replicas``. A
  ``.cuda()`` from anywhere else (this project's code included) raises a ``RuntimeError`` naming
  the caller, as it would fail without the shim: code outside megatron-core places tensors with
  ``.to(device)`` (``ParallelLayout.device``), never by assuming a GPU.

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
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_APPLIED = False
_MISSING = object()  # "the owner had no attribute of this name in its own __dict__"
#: What :func:`apply` changed, in order: ``(owner, name, previous value in vars(owner) or _MISSING)``.
_PATCHED: list[tuple[Any, str, Any]] = []
#: Callers (module ``__name__``) whose ``Tensor.cuda()`` the shim answers with the tensor itself.
_CUDA_CALLER_PACKAGE = "megatron.core"

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


def patched_attributes() -> list[tuple[Any, str]]:
    """``(owner, name)`` of every attribute the active shim replaced (empty when not applied)."""
    return [(owner, name) for owner, name, _ in _PATCHED]


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
        prev = vars(torch.Tensor).get("type", _MISSING)  # normally inherited from the C base class
        torch.Tensor.type = _cuda_named_type
        try:
            return fn(*args, **kwargs)
        finally:
            if prev is _MISSING:
                del torch.Tensor.type
            else:
                torch.Tensor.type = prev

    wrapper._smd_cpu_shim = True  # type: ignore[attr-defined]
    return wrapper


def _tensor_cuda(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``Tensor.cuda`` for megatron-core's own calls (the tensor stays where it is); any other
    caller gets an error naming it, since there is no CUDA device to move to."""
    frame = sys._getframe(1)
    module = frame.f_globals.get("__name__") or "?"
    if module == _CUDA_CALLER_PACKAGE or module.startswith(_CUDA_CALLER_PACKAGE + "."):
        return self
    code = frame.f_code
    raise RuntimeError(
        f"Tensor.cuda() called from {module} ({code.co_filename}:{frame.f_lineno}, in {code.co_name}) on a "
        "machine without CUDA. The CPU shim (megatron_smd.parallel.cpu_shim) keeps tensors on CPU only for "
        f"{_CUDA_CALLER_PACKAGE}'s own .cuda() calls; place tensors with .to(device) (ParallelLayout.device)"
    )


# ----------------------------------------------------------------------------------------------
# apply / undo
# ----------------------------------------------------------------------------------------------


def _patch(owner: Any, name: str, value: Any) -> None:
    """``setattr(owner, name, value)``, remembering what ``vars(owner)`` held for :func:`undo`."""
    if not any(o is owner and n == name for o, n, _ in _PATCHED):
        _PATCHED.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, value)


def apply() -> bool:
    """Install the CPU stand-ins if CUDA is absent. Idempotent. Returns True if the shim is active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not is_needed():
        return False

    # Import everything first: a failed import leaves nothing half-patched.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as tp_random

    device_modules = [importlib.import_module(name) for name in _CUDA_DEVICE_MODULES]
    rope_modules = [importlib.import_module(f"megatron.core.models.common.embeddings.{name}")
                    for name in ("rope_utils", "rotary_pos_embedding", "yarn_rotary_pos_embedding")]

    try:
        cuda = torch.cuda
        _patch(cuda, "current_device", lambda: "cpu")
        _patch(cuda, "synchronize", lambda device=None: None)
        _patch(cuda, "Stream", _NullStream)
        _patch(cuda, "stream", _stream_ctx)
        _patch(cuda, "current_stream", lambda device=None: _NullStream())
        _patch(cuda, "default_stream", lambda device=None: _NullStream())
        _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
        _patch(cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state))
        _patch(cuda, "manual_seed", lambda seed: torch.manual_seed(seed))
        _patch(torch.Tensor, "cuda", _tensor_cuda)

        _patch(tp_random, "_get_cuda_rng_state", _cpu_get_rng_state)
        _patch(tp_random, "_set_cuda_rng_state", _cpu_set_rng_state)

        proxy = _CpuTorchProxy()
        for mod in device_modules:
            _patch(mod, "torch", proxy)
        for mod in rope_modules:
            _patch(mod, "get_pos_emb_on_this_cp_rank", get_pos_emb_on_this_cp_rank)

        f16 = optimizer.Float16OptimizerWithFloat16Params
        _patch(f16, "__init__", _with_cuda_type_names(vars(f16)["__init__"]))
        dopt = distrib_optimizer.DistributedOptimizer
        build = vars(dopt)["_build_model_and_main_param_groups"]  # a classmethod object
        _patch(dopt, "_build_model_and_main_param_groups", classmethod(_with_cuda_type_names(build.__func__)))
        wrapped_clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        _patch(clip_grads, "clip_grad_by_total_norm_fp32", wrapped_clip)
        _patch(optimizer, "clip_grad_by_total_norm_fp32", wrapped_clip)
    except BaseException:
        _restore()
        raise

    _APPLIED = True
    return True


def _restore() -> None:
    """Put back every recorded attribute, newest first (an attribute absent from ``vars(owner)``
    before is deleted again, so the inherited one shows through as it did)."""
    while _PATCHED:
        owner, name, previous = _PATCHED.pop()
        if previous is _MISSING:
            if name in vars(owner):
                delattr(owner, name)
        else:
            setattr(owner, name, previous)


def undo() -> bool:
    """Remove the stand-ins :func:`apply` installed, restoring every patched attribute exactly
    (the same objects). Returns True if the shim was active. Megatron objects built under the
    shim keep the CPU tensors they were built with."""
    global _APPLIED
    if not _APPLIED:
        return False
    _restore()
    _APPLIED = False
    return True


@contextlib.contextmanager
def active() -> Iterator[bool]:
    """``with active() as on:`` the shim is applied inside the block (``on``: whether it is active)
    and undone on exit, unless it was already applied before the block (then it is left on)."""
    was_applied = _APPLIED
    on = apply()
    try:
        yield on
    finally:
        if on and not was_applied:
            undo()
