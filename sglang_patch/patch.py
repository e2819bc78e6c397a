"""The SGLang 0.5.23 patch: hooks that run :mod:`sglang_patch.eviction` inside a live server.

Applied by SGLang's own plugin mechanism, never by editing the installed package: SGLang calls
``load_plugins()`` in every process it spawns (engine, scheduler, detokenizer) and runs the
callables registered under the ``sglang.srt.plugins`` entry-point group. Ours is
:func:`plugin_entry` (registered in ``pyproject.toml``::

    [project.entry-points."sglang.srt.plugins"]
    smd_eviction = "sglang_patch.patch:plugin_entry"

). It does nothing unless the launcher (:mod:`sglang_patch.launch_server`) put the policy in the
environment variable :data:`ENV_CONFIG`, and it refuses any SGLang version but
:data:`~sglang_patch.version.SGLANG_VERSION` before touching anything.

What is wrapped, and why (``sglang/srt/...`` paths):

=============================================================  ====================================
target                                                          hook
=============================================================  ====================================
``mem_cache/registry.py::register_radix_cache_backend``          register backend ``smd``: SGLang's
                                                                ``RadixCache`` (the server's default
                                                                ``UnifiedRadixCache`` is not hooked;
                                                                the launcher selects ``smd``)
``mem_cache/kv_cache_configurator.py::KVCacheConfigurator``      evicting policies: the per-layer
(``_build_mha_kv_pool``, ``_build_token_to_kv_pool_allocator``)  pool and its logical allocator
                                                                (:mod:`sglang_patch.kv_pool`);
                                                                ``none``: SGLang's pool, counted
``managers/scheduler.py::Scheduler.__init__``                   build the :class:`EvictionManager`
                                                                on the scheduler's pools; re-check
                                                                the resolved settings (refuse)
``managers/schedule_policy.py::PrefillAdder.                    a running request under eviction
_get_running_request_total_token_offset``                       reserves what its policy may still
                                                                add per layer (the allocator's
                                                                prefill budget does it for new ones)
``mem_cache/radix_cache.py::RadixCache.checkpoint``,             :mod:`sglang_patch.memory_hooks`
``mem_cache/base_prefix_cache.py::BasePrefixCache.free_kv_row``,  (release frees only what the
``...::BasePrefixCache.on_release``                              request still owns; export; an
                                                                unfinished release = not replayable)
``layers/attention/triton_backend.py::TritonAttnBackend``        GPU: plan the decode step once per
(``init_forward_metadata``, ``forward_extend``,                  forward; extend reads translated
``forward_decode``)                                             ``kv_indices``; decode per layer
                                                                swaps in the live physical
                                                                ``kv_indptr`` / ``kv_indices``, then
                                                                the device eviction step
``layers/attention/torch_native_backend.py::                    CPU: the same, handing each layer a
TorchNativeAttnBackend`` (``init_forward_metadata``,             table of physical slots (extend:
``forward_extend``, ``forward_decode``,                          the batch's rows translated;
``_run_sdpa_forward_extend``, ``_run_sdpa_forward_decode``)       decode: one row of live slots per
                                                                request)
``managers/scheduler_components/batch_result_processor.py::     prefill done: shared prompt state
SchedulerBatchResultProcessor.process_batch_result_prefill``    + register (or export, if it
                                                                finished in prefill), free what the
                                                                groups dropped at prefill; decode
``...::process_batch_result_decode``                            done (synced, overlap off): record
                                                                the step's evictions, free per layer
``managers/schedule_batch.py::ScheduleBatch.retract_decode``    log and count the retraction
``managers/scheduler.py::Scheduler.flush_cache``                weights changed: drop prompt states
``managers/scheduler_components/output_streamer.py::            ``meta_info["smd_evict"]``: the
SchedulerOutputStreamer`` (``has_additional_customized_info``,   request-level base64 int32 mask
``build_additional_customized_info``)                           (SGLang's customized-info channel)
``managers/scheduler_components/internal_state.py::             ``/server_info`` →
SchedulerInternalStateController.get_internal_state``           ``internal_states[i]["smd"]``: pool
                                                                counters and bookkeeping sizes
=============================================================  ====================================

Memory (evicting policies): every layer stores only the tokens it keeps. The radix tree and
``req_to_token`` hold logical token ids; layer ``l`` keeps token ``t`` in its own physical slot
(:class:`sglang_patch.kv_pool.PerLayerKVPool`), freed as soon as no request keeps the token in that
layer; a GRPO group's shared prompt is stored once per layer. ``--max-total-tokens`` is the
physical slots per layer (the same K/V bytes as SGLang's dense pool), admission reserves what
each policy holds (:mod:`megatron_smd.kv_budget`), so more requests run at once and a request that
cannot fit waits instead of being retracted.

Decode step: every shape is known on the host before the forward (:meth:`EvictionManager.begin_decode`).
Per layer, inside the forward, only tensor ops run: the layer's table of physical slots
(:meth:`EvictionManager.layer_tables`), one padded attention over it for the whole batch on CPU
(:meth:`EvictionManager.attend`; Triton gets the compacted ``kv_indptr`` / ``kv_indices``), and what
the decision needs is kept (:meth:`EvictionManager.layer_update`). After the forward the decision
runs once for all layers, requests and heads on the device (:meth:`EvictionManager.decide`: H2O
sums, scores, top-k, compaction of the tables), and the dropped positions reach the host in one
read (:meth:`EvictionManager.end_decode_step`), where the per-layer frees happen.

Supported: attention backends ``triton`` (GPU) and ``torch_native`` (CPU; prefill is dense in
both), page size 1, eager decode (CUDA graphs off: a captured graph bakes the index
buffers' shapes), overlap scheduler off (frees happen in ``process_batch_result_decode`` after the
forward finished: a synced point), no mixed chunks (decode tokens in an extend batch would skip
the decode hook), tensor parallel size 1 (each TP rank sees only its heads, so per-rank scores would
disagree; an all-reduce of scores is not built), no speculative decoding, no hierarchical cache
(host copies would resurrect freed slots), Lean attention off (it reads ``seq_lens``, not the index
lists), the plain MHA pool only (no page-major layout, FP4/MXFP8 KV, KV sharding). FA3 (rewrite
``metadata.page_table`` / ``cache_seqlens_int32`` / ``cu_seqlens_k`` per layer, as SGLang's
``mem_cache/sparsity/backend/backend_adaptor.py::FlashAttentionAdaptor`` does) and FlashInfer
(one plan per layer) are not built and are refused by the launcher.

Replay safety: positions stay logical; no K/V is recomputed for a managed request. A request
released before it finished (retraction, which re-prefills it densely from its tokens, or an
abort) is exported ``replayable=False`` with no mask and is not managed again; size the pool
(``--max-total-tokens``, ``--max-running-requests``) so retraction does not happen. Chunked prefill
is dense, so it is allowed; the prompt's eviction state is built once the last chunk ran.

The CPU path runs for real in the default test run (``tests/test_sglang_live.py``: live servers
on loopback); ``tests/test_sglang_gpu.py`` drives the Triton path on a GPU, and
:func:`verify_targets` (reads the source with ``ast``) checks that every target exists in the
installed SGLang.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_smd.policies import PolicyConfig

from . import fp8_kv, memory_hooks
from .eviction import EvictionConfigError, EvictionManager
from .version import check_sglang_version

logger = logging.getLogger("sglang_patch")

#: Environment variable carrying the policy (JSON of :class:`PolicyConfig`) to every SGLang process.
ENV_CONFIG = "SMD_EVICTION_POLICY"
#: ``meta_info`` key of the exported mask.
META_KEY = "smd_evict"

#: (module, class, method) wrapped by :func:`apply`, checked by :func:`verify_targets`.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("sglang.srt.managers.scheduler", "Scheduler", "__init__"),
    ("sglang.srt.managers.scheduler", "Scheduler", "flush_cache"),
    ("sglang.srt.mem_cache.radix_cache", "RadixCache", "checkpoint"),
    ("sglang.srt.mem_cache.base_prefix_cache", "BasePrefixCache", "on_release"),
    ("sglang.srt.mem_cache.kv_cache_configurator", "KVCacheConfigurator", "_build_mha_kv_pool"),
    ("sglang.srt.mem_cache.kv_cache_configurator", "KVCacheConfigurator", "_build_token_to_kv_pool_allocator"),
    ("sglang.srt.managers.schedule_policy", "PrefillAdder", "_get_running_request_total_token_offset"),
    ("sglang.srt.layers.attention.triton_backend", "TritonAttnBackend", "init_forward_metadata"),
    ("sglang.srt.layers.attention.triton_backend", "TritonAttnBackend", "forward_extend"),
    ("sglang.srt.layers.attention.triton_backend", "TritonAttnBackend", "forward_decode"),
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend", "init_forward_metadata"),
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend", "forward_extend"),
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend", "_run_sdpa_forward_extend"),
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend", "forward_decode"),
    ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend", "_run_sdpa_forward_decode"),
    ("sglang.srt.mem_cache.base_prefix_cache", "BasePrefixCache", "free_kv_row"),
    ("sglang.srt.managers.scheduler_components.batch_result_processor", "SchedulerBatchResultProcessor",
     "process_batch_result_prefill"),
    ("sglang.srt.managers.scheduler_components.batch_result_processor", "SchedulerBatchResultProcessor",
     "process_batch_result_decode"),
    ("sglang.srt.managers.schedule_batch", "ScheduleBatch", "retract_decode"),
    ("sglang.srt.managers.scheduler_components.output_streamer", "SchedulerOutputStreamer",
     "build_additional_customized_info"),
    ("sglang.srt.managers.scheduler_components.output_streamer", "SchedulerOutputStreamer",
     "is_request_level_customized_info_key"),
    ("sglang.srt.managers.scheduler_components.internal_state", "SchedulerInternalStateController",
     "get_internal_state"),
    ("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool", "set_kv_buffer"),
)
#: Module-level functions the patch uses by name (checked by :func:`verify_targets`).
FUNCTION_TARGETS: tuple[tuple[str, str], ...] = (
    ("sglang.srt.mem_cache.registry", "register_radix_cache_backend"),
    ("sglang.srt.mem_cache.kv_cache_dtype", "configure_kv_cache_dtype"),  # wrapped by fp8_kv.install_cpu_dtype
)
#: The name our radix-cache backend is registered under (``--radix-cache-backend``).
RADIX_BACKEND = "smd"
#: Attention backends the hooks cover: Triton (GPU) and torch_native (CPU).
SUPPORTED_BACKENDS = ("triton", "torch_native")


def verify_targets() -> list[str]:
    """Names of :data:`TARGETS` / :data:`FUNCTION_TARGETS` missing from the installed SGLang.

    Parses the source files with ``ast`` (imports nothing, so it runs anywhere). Empty = all there.
    """
    missing = []
    top = importlib.util.find_spec("sglang")  # the top package only
    if top is None or not top.submodule_search_locations:
        return [f"{m}.{c}.{f}" for m, c, f in TARGETS] + [f"{m}.{f}" for m, f in FUNCTION_TARGETS]
    root = top.submodule_search_locations[0]

    def tree_of(mod):
        path = os.path.join(root, *mod.split(".")[1:]) + ".py"
        return ast.parse(open(path, encoding="utf-8").read()) if os.path.isfile(path) else None

    def has_def(body, name):
        return any(isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name for f in body)

    for mod, cls, meth in TARGETS:
        tree = tree_of(mod)
        if tree is None:
            missing.append(f"{mod} (module)")
        elif not any(isinstance(n, ast.ClassDef) and n.name == cls and has_def(n.body, meth) for n in tree.body):
            missing.append(f"{mod}.{cls}.{meth}")
    for mod, fn in FUNCTION_TARGETS:
        tree = tree_of(mod)
        if tree is None or not has_def(tree.body, fn):
            missing.append(f"{mod}.{fn}")
    return missing


# ---------------------------------------------------------------------------------------------
# Per-process state
# ---------------------------------------------------------------------------------------------


@dataclass
class _PrefillCapture:
    """The post-RoPE queries one request's prefill computed so far, per layer (host copies).

    ``start``/``end``: the positions ``[start, end)`` covered (chunked prefill appends chunk by
    chunk). A chunk that does not start at ``end`` belongs to another request that reused the row,
    so the capture is restarted rather than mixed.
    """

    start: int
    end: int
    q: list[list[torch.Tensor]]  # per layer: chunks of [n, H_q * d]

    def layers(self) -> list[torch.Tensor]:
        return [torch.cat(chunks) if chunks else torch.empty(0) for chunks in self.q]


_MANAGER: EvictionManager | None = None
_PREFILL: dict[int, _PrefillCapture] = {}  # req_pool_idx -> capture of the request prefilling there
_PREFILL_DONE: dict[str, Any] = {}  # rid -> PromptState, while its prefill's results are processed
_TABLE: dict[str, Any] | None = None  # per-layer physical slot table for torch_native extend / decode
_KV: fp8_kv.ServerKV | None = None  # the FP8 KV cache this server stores (None: the model's dtype)
_LAYER: list[int] = [0]  # the layer torch_native is running (its _run_sdpa_* are not told)
_APPLIED = False


def policy_from_env() -> PolicyConfig | None:
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        return None
    return PolicyConfig.model_validate(json.loads(raw))


def _arg(server_args: Any, name: str, default=None):
    """A resolved server argument by name (0.5.23 keeps them on ``ServerArgs`` attributes)."""
    return getattr(server_args, name, default)


def check_resolved_server_args(server_args: Any) -> None:
    """Refuse, in the scheduler process, settings SGLang resolved to something we cannot honour.

    The launcher refuses the flags before SGLang starts; this re-checks what SGLang resolved them
    to (defaults included), so a path that bypasses the launcher cannot run unsupported settings.
    """
    errs = []
    for name in ("attention_backend", "decode_attention_backend", "prefill_attention_backend"):
        v = _arg(server_args, name)
        if v is not None and v not in SUPPORTED_BACKENDS:
            errs.append(f"{name}={v!r} (supported: {', '.join(SUPPORTED_BACKENDS)})")
    if _arg(server_args, "page_size", 1) not in (None, 1):
        errs.append(f"page_size={_arg(server_args, 'page_size')} (need 1)")
    if not _arg(server_args, "disable_overlap_schedule", False):
        errs.append("overlap scheduler on (need --disable-overlap-schedule)")
    graph_off = (_arg(server_args, "disable_cuda_graph", False) or _arg(server_args, "disable_decode_cuda_graph", False)
                 or _arg(server_args, "cuda_graph_backend_decode") == "disabled")
    if not graph_off and _arg(server_args, "device") != "cpu":
        errs.append("decode CUDA graph on (need --cuda-graph-backend-decode disabled)")
    if _arg(server_args, "disable_radix_cache", False):
        errs.append("radix cache disabled (the patch keeps prompts tree-owned; run with the radix cache)")
    if _arg(server_args, "radix_cache_backend") != RADIX_BACKEND:
        errs.append(f"radix_cache_backend={_arg(server_args, 'radix_cache_backend')!r} (need {RADIX_BACKEND!r}: "
                    f"the hooks act on SGLang's RadixCache, which only that backend builds)")
    if _arg(server_args, "enable_mixed_chunk", False):
        errs.append("mixed chunks on (decode tokens in an extend batch would skip the eviction hook)")
    if (_arg(server_args, "tp_size", 1) or 1) > 1:
        errs.append(f"tp_size={_arg(server_args, 'tp_size')} (need 1)")
    if _arg(server_args, "speculative_algorithm") not in (None, "", "NONE"):
        errs.append("speculative decoding")
    if _arg(server_args, "enable_hierarchical_cache", False):
        errs.append("hierarchical cache")
    if errs:
        raise EvictionConfigError("smd eviction cannot run with the resolved SGLang settings: " + "; ".join(errs))


# ---------------------------------------------------------------------------------------------
# The radix cache backend: SGLang's RadixCache, which the memory hooks know
# ---------------------------------------------------------------------------------------------


def radix_cache_factory(ctx: Any):
    """``--radix-cache-backend smd``: build SGLang's plain :class:`RadixCache` (page size 1).

    The server's default chain builds ``UnifiedRadixCache`` (integer node ids, its own release
    path), which the memory hooks do not cover; this backend builds the cache they do, and refuses
    the model/cache kinds it cannot serve instead of silently building something else.
    """
    from sglang.srt.mem_cache.radix_cache import RadixCache

    errs = []
    if ctx.disable_radix_cache:
        errs.append("the radix cache is disabled")
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm or getattr(ctx, "is_dsa", False):
        errs.append("hybrid (sliding-window / SSM / DSA) models need SGLang's hybrid pools")
    if ctx.enable_hierarchical_cache:
        errs.append("the hierarchical cache is on")
    if errs:
        raise EvictionConfigError(f"radix cache backend {RADIX_BACKEND!r}: " + "; ".join(errs))
    return RadixCache(ctx.params)


def _register_radix_backend() -> None:
    from sglang.srt.mem_cache import registry

    if RADIX_BACKEND not in registry.registered_radix_cache_backends():
        registry.register_radix_cache_backend(RADIX_BACKEND, radix_cache_factory)


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def _wrap(cls, name, make):
    orig = getattr(cls, name)
    new = make(orig)
    functools.update_wrapper(new, orig)
    setattr(cls, name, new)


def _per_layer() -> bool:
    """Whether this process serves an evicting policy on the per-layer pool (its reads translate)."""
    return _MANAGER is not None and not _MANAGER.dense


def _hook_pools(Configurator) -> None:
    """Build the per-layer pool and its logical allocator (evicting policies), or SGLang's dense
    pool with the counting allocator (``none``), where SGLang builds its plain MHA pool."""
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from megatron_smd import kv_budget

    from .kv_pool import CountingAllocator, PerLayerAllocator, PerLayerKVPool

    def make_pool(orig):
        def _build_mha_kv_pool(self, *, max_total_num_tokens, mha_pool_class, quant_method=None):
            policy = policy_from_env()
            if policy is None or self.is_draft_worker or not kv_budget.evicts_per_layer(policy):
                return orig(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                            quant_method=quant_method)
            errs = []
            if mha_pool_class is not MHATokenToKVPool:
                errs.append(f"KV pool class {mha_pool_class.__name__} (page-major / platform pools)")
            if quant_method is not None:
                errs.append("a quantized KV cache layout (fp4 / mxfp8)")
            if getattr(self, "post_capture_kv_active", False):
                errs.append("post-capture KV backing")
            if getattr(self, "kv_shard_rank", None) is not None:
                errs.append("KV cache sharding")
            if errs:
                raise EvictionConfigError("smd eviction: the per-layer KV pool cannot be built with "
                                          + "; ".join(errs))
            L = self.layer_info.num_effective_layers
            logical = kv_budget.logical_slots(max_total_num_tokens, L, policy)
            pool = orig(self, max_total_num_tokens=max_total_num_tokens,
                        mha_pool_class=functools.partial(PerLayerKVPool, logical_size=logical), quant_method=None)
            logger.info("smd: per-layer KV pool, %d physical slots per layer x %d layers, %d logical token ids",
                        max_total_num_tokens, L, logical)
            return pool
        return _build_mha_kv_pool

    def make_alloc(orig):
        def _build_token_to_kv_pool_allocator(self, *, sizes, token_to_kv_pool, **kwargs):
            policy = policy_from_env()
            if policy is not None and isinstance(token_to_kv_pool, PerLayerKVPool) \
                    and kwargs.get("token_to_kv_pool_allocator") is None:
                return PerLayerAllocator(token_to_kv_pool.logical_size, dtype=self.kv_cache_dtype, device=self.device,
                                         kvcache=token_to_kv_pool, need_sort=False, policy=policy)
            alloc = orig(self, sizes=sizes, token_to_kv_pool=token_to_kv_pool, **kwargs)
            if policy is not None and type(alloc) is TokenToKVPoolAllocator and not self.is_draft_worker:
                alloc = CountingAllocator(alloc.size, alloc.dtype, alloc.device, alloc._kvcache, alloc.need_sort)
            return alloc
        return _build_token_to_kv_pool_allocator

    _wrap(Configurator, "_build_mha_kv_pool", make_pool)
    _wrap(Configurator, "_build_token_to_kv_pool_allocator", make_alloc)


#: Scheduler-side counters every patched server reports (``none`` included).
_COUNTERS = {"peak_running_requests": 0, "retractions": 0, "decode_batches": 0}


def _hook_scheduler(Scheduler) -> None:
    from .kv_pool import PerLayerKVPool

    def make_init(orig):
        def __init__(self, *args, **kwargs):
            global _MANAGER, _KV
            orig(self, *args, **kwargs)
            policy = policy_from_env()
            if policy is None:
                return
            check_resolved_server_args(self.server_args)
            if type(self.tree_cache).__name__ != "RadixCache":
                raise EvictionConfigError(f"smd eviction: the scheduler built {type(self.tree_cache).__name__}, "
                                          f"not RadixCache (need --radix-cache-backend {RADIX_BACKEND})")
            kv_pool = self.token_to_kv_pool_allocator.get_kvcache()
            if policy.name != "none" and not isinstance(kv_pool, PerLayerKVPool):
                raise EvictionConfigError(f"smd eviction: the scheduler's KV pool is {type(kv_pool).__name__}, not "
                                          f"the per-layer pool (SGLang built another pool family for this model)")
            mc = self.model_config
            _KV = _server_kv(kv_pool, mc.dtype)
            tp = 1
            _MANAGER = EvictionManager(
                policy, num_layers=mc.num_hidden_layers, num_q_heads=mc.num_attention_heads // tp,
                num_kv_heads=mc.get_num_kv_heads(tp), head_dim=mc.head_dim,
                req_to_token_pool=self.req_to_token_pool, allocator=self.token_to_kv_pool_allocator,
                kv_pool=kv_pool, tree_cache=self.tree_cache, kv=_KV)
            _MANAGER.waiting_requests = lambda: self.waiting_queue  # prompt groups wait for their samples
            memory_hooks.register_manager(self.tree_cache, _MANAGER)
            logger.info("smd eviction active: %s", policy.model_dump())
        return __init__

    def make_flush(orig):
        def flush_cache(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            if _MANAGER is not None:
                _MANAGER.clear_prompt_cache()  # new weights: prompt K/V and scores change
            return out
        return flush_cache

    _wrap(Scheduler, "__init__", make_init)
    _wrap(Scheduler, "flush_cache", make_flush)


def _hook_admission(PrefillAdder) -> None:
    """A running request under eviction reserves what its GRPO group may still add per layer
    (``kv_budget.group_reserve_tokens``), not its remaining ``max_new_tokens``."""
    def make(orig):
        def _get_running_request_total_token_offset(self, req):
            if _per_layer():
                r = _MANAGER.running_reserve(req)
                if r is not None:
                    return r
            return orig(self, req)
        return _get_running_request_total_token_offset

    _wrap(PrefillAdder, "_get_running_request_total_token_offset", make)


def _server_kv(kv_pool, compute_dtype: torch.dtype) -> fp8_kv.ServerKV | None:
    """The scheduler's FP8 cache (:mod:`sglang_patch.fp8_kv`): what the launcher put in
    :data:`fp8_kv.ENV_KV`, checked against the pool SGLang built (an FP8 pool without a cache
    description, or the reverse, would round K/V the learner does not know about)."""
    kv = fp8_kv.kv_from_env()
    pool_fp8 = getattr(kv_pool, "dtype", None) in (torch.float8_e4m3fn, torch.float8_e5m2)
    if kv is None:
        if pool_fp8:
            raise EvictionConfigError(f"smd: SGLang built an FP8 KV pool ({kv_pool.dtype}) but the launcher set no "
                                      f"${fp8_kv.ENV_KV}: start the server with python -m sglang_patch.launch_server "
                                      f"--kv-cache-dtype ... so the rollouts carry the rounding")
        return None
    if kv_pool.dtype != kv.config.torch_dtype:
        raise EvictionConfigError(f"smd: ${fp8_kv.ENV_KV} says {kv.dtype}, SGLang built a {kv_pool.dtype} KV pool "
                                  f"(--kv-cache-dtype must be {kv.dtype})")
    if kv.num_layers != kv_pool.layer_num:
        raise EvictionConfigError(f"smd: ${fp8_kv.ENV_KV} has scales for {kv.num_layers} layers, the KV pool "
                                  f"has {kv_pool.layer_num}")
    return fp8_kv.ServerKV(kv, compute_dtype)


def _rows_cpu(forward_batch) -> list[int]:
    cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
    return (cpu if cpu is not None else forward_batch.req_pool_indices).tolist()


def _seq_lens_cpu(forward_batch) -> list[int]:
    cpu = getattr(forward_batch, "seq_lens_cpu", None)
    return (cpu if cpu is not None else forward_batch.seq_lens).tolist()


def _begin_forward(forward_batch) -> None:
    """Once per forward, before its first layer: plan the decode step (host-known shapes)."""
    if not _per_layer():
        return
    if _MANAGER._step is not None:  # a decode forward whose results were never processed
        raise RuntimeError("smd: a decode step is still open at the next forward")
    if forward_batch.forward_mode.is_decode():
        _MANAGER.begin_decode(list(forward_batch.rids), _rows_cpu(forward_batch), _seq_lens_cpu(forward_batch),
                              rows_dev=forward_batch.req_pool_indices)


def _capture_extend(q, layer, forward_batch) -> None:
    """Keep each request's prefill queries (token-major, split by extend lengths) for the shared
    prompt state: SnapKV / R-KV observation window, H2O column sums. Device tensors; no host copy."""
    if not _per_layer() or q is None:
        return
    lens = forward_batch.extend_seq_lens_cpu
    starts = forward_batch.extend_prefix_lens_cpu
    li = layer.layer_id
    if li == 0:
        _EXTEND_ROWS[0] = _rows_cpu(forward_batch)
    rows = _EXTEND_ROWS[0]
    qs = q.reshape(q.shape[0], -1).split(list(lens))
    for row, a, n, qq in zip(rows, starts, lens, qs):
        cap = _PREFILL.get(row)
        if li == 0 and (cap is None or cap.end != a):
            cap = _PREFILL[row] = _PrefillCapture(start=a, end=a, q=[[] for _ in range(_MANAGER.L)])
        if cap is None:
            continue
        cap.q[li].append(qq.detach().float().clone())
        if li == _MANAGER.L - 1:
            cap.end = a + n


_EXTEND_ROWS: list = [None]


def _extend_table(layer, forward_batch) -> torch.Tensor:
    """``req_to_token`` rows of an extend batch translated to ``layer``'s physical slots
    ``[bs, max seq len]`` (the batch's requests attend every stored prefix token, densely)."""
    n = max(_seq_lens_cpu(forward_batch))
    slots = _MANAGER.rtp.req_to_token[forward_batch.req_pool_indices.long(), :n].long()
    return _MANAGER.kv_pool.translate(layer.layer_id, slots)


def _init_then_begin(orig):
    """A backend's ``init_forward_metadata`` followed by the patch's per-step setup (both backends)."""
    def init_forward_metadata(self, forward_batch, *args, **kwargs):
        out = orig(self, forward_batch, *args, **kwargs)
        _begin_forward(forward_batch)
        return out
    return init_forward_metadata


def _hook_triton(TritonAttnBackend) -> None:
    """GPU backend: each layer reads its physical slots (``kv_indices`` translated, and compacted to
    the live positions in decode)."""
    def make_extend(orig):
        def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
            if not _per_layer():
                return orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            md = self.forward_metadata
            indices = md.kv_indices
            md.kv_indices = _MANAGER.kv_pool.translate(layer.layer_id, indices).to(indices.dtype)
            try:
                out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                md.kv_indices = indices
            _capture_extend(q, layer, forward_batch)
            return out
        return forward_extend

    def make_decode(orig):
        def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
            step = _MANAGER._step if _per_layer() else None
            if step is None:
                return orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            md = self.forward_metadata
            indptr, indices = md.kv_indptr, md.kv_indices
            phys, n_live = _MANAGER.layer_tables(step, layer.layer_id)
            flat = getattr(step, "flat", None)
            if flat is None:  # once per step: (row, column) of every live entry, from host-known counts
                lens = torch.tensor(step.n_live_host, dtype=torch.int64)
                r = torch.repeat_interleave(torch.arange(step.bs), lens)
                c = torch.cat([torch.arange(x) for x in step.n_live_host])
                step.flat = flat = (r.to(phys.device), c.to(phys.device),
                                    torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(indptr.device, indptr.dtype))
            md.kv_indptr, md.kv_indices = flat[2], phys[flat[0], flat[1]].to(indices.dtype)
            try:
                out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                md.kv_indptr, md.kv_indices = indptr, indices
            _MANAGER.layer_update(step, layer.layer_id, q)
            return out
        return forward_decode

    _wrap(TritonAttnBackend, "init_forward_metadata", _init_then_begin)
    _wrap(TritonAttnBackend, "forward_extend", make_extend)
    _wrap(TritonAttnBackend, "forward_decode", make_decode)


def _hook_torch_native(TorchNativeAttnBackend) -> None:
    """CPU backend: its extend and decode read ``req_to_token[row, :seq_len]`` per request, so each
    layer gets a table of physical slots in place of the pool's (decode: one row per batch entry,
    its live slots)."""
    def make_extend(orig):
        def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
            global _TABLE
            _LAYER[0] = layer.layer_id
            if not _per_layer():
                return orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            t = _extend_table(layer, forward_batch)
            _TABLE = {"req_to_token": t, "req_pool_indices": torch.arange(t.shape[0], device=t.device)}
            try:
                out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                _TABLE = None
            _capture_extend(q, layer, forward_batch)
            return out
        return forward_extend

    def make_decode(orig):
        def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
            global _TABLE
            _LAYER[0] = layer.layer_id
            step = _MANAGER._step if _per_layer() else None
            if step is None:
                return orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            phys, n_live = _MANAGER.layer_tables(step, layer.layer_id)
            _TABLE = {"req_to_token": phys, "req_pool_indices": torch.arange(step.bs, device=phys.device),
                      "seq_lens": n_live, "step": step, "layer": layer.layer_id}
            try:
                out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                _TABLE = None
            _MANAGER.layer_update(step, layer.layer_id, q)
            return out
        return forward_decode

    def make_run_extend(orig):
        def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                     seq_lens, *args, **kwargs):
            if _TABLE is not None:
                req_to_token, req_pool_indices = _TABLE["req_to_token"], _TABLE["req_pool_indices"]
            if _KV is not None and _KV.scaled:  # SGLang's read would drop the scales
                k_cache, v_cache, req_to_token, req_pool_indices = _KV.compact(
                    _LAYER[0], k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, query.dtype)
            return orig(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        *args, **kwargs)
        return _run_sdpa_forward_extend

    def make_run_decode(orig):
        def _run_sdpa_forward_decode(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                     seq_lens, encoder_lens=None, scaling=None, enable_gqa=False, causal=False,
                                     is_cross_attn=False, sliding_window_size=None):
            t = _TABLE
            if t is not None:
                if encoder_lens is None and not is_cross_attn and sliding_window_size is None and scaling is not None:
                    # one padded batch over every request's live physical slots (SGLang loops per request)
                    _MANAGER.attend(t["step"], t["layer"], query, output, scaling)
                    return output
                req_to_token, req_pool_indices, seq_lens = t["req_to_token"], t["req_pool_indices"], t["seq_lens"]
            if _KV is not None and _KV.scaled:  # SGLang's read would drop the scales
                k_cache, v_cache, req_to_token, req_pool_indices = _KV.compact(
                    _LAYER[0], k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, query.dtype)
            return orig(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                        encoder_lens, scaling, enable_gqa, causal, is_cross_attn, sliding_window_size)
        return _run_sdpa_forward_decode

    _wrap(TorchNativeAttnBackend, "init_forward_metadata", _init_then_begin)
    _wrap(TorchNativeAttnBackend, "forward_extend", make_extend)
    _wrap(TorchNativeAttnBackend, "forward_decode", make_decode)
    _wrap(TorchNativeAttnBackend, "_run_sdpa_forward_extend", make_run_extend)
    _wrap(TorchNativeAttnBackend, "_run_sdpa_forward_decode", make_run_decode)


def _hook_results(Processor) -> None:
    def make_prefill(orig):
        def process_batch_result_prefill(self, batch, result, *args, **kwargs):
            chunked = getattr(batch, "chunked_req", None)
            rows = {id(req): req.kv.req_pool_idx for req in batch.reqs}  # before release clears them
            done = []
            if _per_layer():
                for req in batch.reqs:
                    row = rows[id(req)]
                    cap = _PREFILL.get(row) if row is not None else None
                    P = len(req.origin_input_ids)
                    if cap is None or req is chunked or cap.end != P or len(req.full_untruncated_fill_ids) != P:
                        continue  # prompt not complete yet (chunked prefill), or not a prompt prefill
                    if _MANAGER.released_early(req.rid):
                        continue  # retracted once: re-prefilled densely, runs unmanaged
                    queries = cap.layers()
                    if any(x.numel() == 0 for x in queries):
                        continue
                    ps = _MANAGER.prepare_prompt(req, queries)  # K/V are in the pool
                    done.append((req, queries))
                    # a request that finishes in this prefill (first token a stop token, or the n>1
                    # prefix request) is streamed out inside orig(): its export is built there
                    _PREFILL_DONE[req.rid] = ps
            try:
                out = orig(self, batch, result, *args, **kwargs)  # checkpoints prompts, streams outputs
            finally:
                for req in batch.reqs:  # the row's capture ends with this prefill (unless still chunking)
                    if req is not chunked and rows[id(req)] is not None:
                        _PREFILL.pop(rows[id(req)], None)
                for req, _ in done:
                    _PREFILL_DONE.pop(req.rid, None)
            started = []
            for req, queries in done:
                if not req.finished() and req.kv.req_pool_idx is not None:
                    _MANAGER.start_request(req, queries)
                    started.append(req)
            if started:
                _MANAGER.after_prefill(started)  # free what the new groups dropped at prefill
            return out
        return process_batch_result_prefill

    def make_decode(orig):
        def process_batch_result_decode(self, batch, result, *args, **kwargs):
            _COUNTERS["decode_batches"] += 1
            _COUNTERS["peak_running_requests"] = max(_COUNTERS["peak_running_requests"], len(batch.reqs))
            if _per_layer():
                # the forward finished (overlap scheduler off): a synced point to record and free
                _MANAGER.end_decode_step()
            return orig(self, batch, result, *args, **kwargs)
        return process_batch_result_decode

    _wrap(Processor, "process_batch_result_prefill", make_prefill)
    _wrap(Processor, "process_batch_result_decode", make_decode)


def _hook_retract(ScheduleBatch) -> None:
    def make_retract(orig):
        def retract_decode(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            retracted = out[0] if isinstance(out, tuple) else out
            _COUNTERS["retractions"] += len(retracted or [])
            for req in retracted or []:  # already exported as not replayable by on_release
                logger.warning("smd: request %s retracted; it is re-prefilled densely and its trajectory "
                               "is returned as not replayable (enlarge --max-total-tokens to avoid this)", req.rid)
            return out
        return retract_decode

    _wrap(ScheduleBatch, "retract_decode", make_retract)


def _hook_output(Streamer) -> None:
    def build_additional_customized_info(self, reqs):
        vals = []
        for req in reqs:
            ex = None
            if req.finished() and _MANAGER is not None and _MANAGER.dense:
                ex = _MANAGER.dense_export(req)
            elif req.finished() and _MANAGER is not None:
                ex = _MANAGER.pop_export(req.rid)
                ps = _PREFILL_DONE.pop(req.rid, None)
                if ex is None and ps is not None:  # finished in its prefill: never decoded
                    ex = _MANAGER.finish_in_prefill(req, ps)
            vals.append([ex] if ex is not None else [])
        return {META_KEY: vals}

    def is_request_level_customized_info_key(self, key):
        return key == META_KEY

    Streamer.has_additional_customized_info = True
    Streamer.build_additional_customized_info = build_additional_customized_info
    Streamer.is_request_level_customized_info_key = is_request_level_customized_info_key


def pool_state(scheduler) -> dict:
    """The scheduler's pool counters and the patch's bookkeeping sizes (``/server_info`` →
    ``internal_states[i]["smd"]``).

    Idle and leak-free: ``free_slots + evictable_slots == total_slots`` (tokens allocatable in every
    layer), every layer's ``free_per_layer`` equal to ``total_slots - evictable_slots`` (each layer
    holds exactly the radix tree's tokens), ``free_rows == total_rows``, ``pool_errors`` empty and
    every bookkeeping count 0. K/V counters (``kv_layout``, ``peak_kv_bytes``: the most physical K/V
    bytes held across layers at once, ``pool_kv_bytes``...) come from the allocator / pool; the
    ``window_peak_*`` counters cover the time since the previous read (and restart with it)."""
    from .kv_pool import PerLayerAllocator, window_peaks

    alloc, rtp, tree = scheduler.token_to_kv_pool_allocator, scheduler.req_to_token_pool, scheduler.tree_cache
    out = {"policy": _MANAGER.cfg.model_dump(mode="json") if _MANAGER else None,
           fp8_kv.KV_META_KEY: _KV.meta() if _KV is not None else None,
           "free_slots": int(alloc.available_size()), "total_slots": int(scheduler.max_total_num_tokens),
           "evictable_slots": int(tree.evictable_size()), "protected_slots": int(tree.protected_size()),
           "free_rows": int(rtp.available_size()), "total_rows": int(rtp.size),
           "prefill_captures": len(_PREFILL) + len(_PREFILL_DONE), **_COUNTERS}
    counters = getattr(alloc, "counters", None) or getattr(alloc.get_kvcache(), "counters", None)
    if counters is not None:
        out.update(counters())
        out.update(window_peaks(alloc))
    if isinstance(alloc, PerLayerAllocator):
        out["logical_free"] = int(alloc.logical_available())
        out["pool_errors"] = alloc.get_kvcache().check_consistent()
    if _MANAGER is not None:
        out.update(_MANAGER.counts())
        out.update(_MANAGER.stats)
    return out


def _hook_internal_state(Controller) -> None:
    def make(orig):
        def get_internal_state(self, recv_req):
            res = orig(self, recv_req)
            try:
                res.internal_state["smd"] = pool_state(self.scheduler)
            except Exception as e:  # a readback must never take the scheduler down
                res.internal_state["smd"] = {"error": repr(e)}
            return res
        return get_internal_state

    _wrap(Controller, "get_internal_state", make)


def apply() -> bool:
    """Install every hook in this process (idempotent). Returns False when no policy is set."""
    global _APPLIED
    if _APPLIED:
        return True
    if policy_from_env() is None:
        return False
    check_sglang_version()
    missing = verify_targets()
    if missing:
        raise EvictionConfigError(f"sglang_patch: targets missing from the installed SGLang: {missing}")
    m = {name: importlib.import_module(name) for name in {t[0] for t in TARGETS}}
    _register_radix_backend()
    _hook_pools(m["sglang.srt.mem_cache.kv_cache_configurator"].KVCacheConfigurator)
    _hook_admission(m["sglang.srt.managers.schedule_policy"].PrefillAdder)
    memory_hooks.install_memory_hooks(m["sglang.srt.mem_cache.radix_cache"].RadixCache,
                                      m["sglang.srt.mem_cache.base_prefix_cache"].BasePrefixCache)
    _hook_scheduler(m["sglang.srt.managers.scheduler"].Scheduler)
    _hook_triton(m["sglang.srt.layers.attention.triton_backend"].TritonAttnBackend)
    _hook_torch_native(m["sglang.srt.layers.attention.torch_native_backend"].TorchNativeAttnBackend)
    _hook_results(m["sglang.srt.managers.scheduler_components.batch_result_processor"].SchedulerBatchResultProcessor)
    _hook_retract(m["sglang.srt.managers.schedule_batch"].ScheduleBatch)
    _hook_output(m["sglang.srt.managers.scheduler_components.output_streamer"].SchedulerOutputStreamer)
    _hook_internal_state(m["sglang.srt.managers.scheduler_components.internal_state"].SchedulerInternalStateController)
    fp8_kv.install_store(m["sglang.srt.mem_cache.memory_pool"].MHATokenToKVPool, lambda: _KV)
    fp8_kv.install_cpu_dtype(importlib.import_module("sglang.srt.mem_cache.kv_cache_dtype"), fp8_kv.kv_from_env)
    _APPLIED = True
    return True


class PatchFailed(SystemExit):
    """The patch could not be applied in an SGLang process. A ``SystemExit``: SGLang's plugin loader
    logs and swallows every ``Exception`` (the server would then run dense), not this."""


def plugin_entry() -> None:
    """SGLang plugin entry point (``sglang.srt.plugins`` group): apply when the launcher asked.

    A failure stops the process with the reason instead of letting the server run dense."""
    try:
        apply()
    except Exception as e:
        logger.error("smd eviction patch failed to apply: %s", e, exc_info=True)
        raise PatchFailed(f"sglang_patch: the smd eviction patch failed to apply in process {os.getpid()}: "
                          f"{type(e).__name__}: {e}") from e
