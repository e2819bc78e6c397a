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
``managers/scheduler.py::Scheduler.__init__``                   build the :class:`EvictionManager`
                                                                on the scheduler's pools; re-check
                                                                the resolved settings (refuse)
``mem_cache/radix_cache.py::RadixCache.checkpoint``,             :mod:`sglang_patch.memory_hooks`
``mem_cache/base_prefix_cache.py::BasePrefixCache.free_kv_row``,  (release frees only what the
``...::BasePrefixCache.on_release``                              request still owns; export)
``layers/attention/triton_backend.py::TritonAttnBackend          capture the prefill queries of
.forward_extend``                                               each request (per layer, CPU)
``...::TritonAttnBackend.forward_decode``                       per layer: swap in the compacted
                                                                ``kv_indptr`` / ``kv_indices``,
                                                                then score (H2O probs, obs queries)
``managers/scheduler_components/batch_result_processor.py::     prefill done: shared prompt state
SchedulerBatchResultProcessor.process_batch_result_prefill``    + register; decode done (synced,
``...::process_batch_result_decode``                            overlap off): evict + free
``managers/schedule_batch.py::ScheduleBatch.retract_decode``    retracted = re-prefilled later:
                                                                mark not replayable, stop managing
``managers/scheduler.py::Scheduler.flush_cache``                weights changed: drop prompt states
``managers/scheduler_components/output_streamer.py::            ``meta_info["smd_evict"]``: the
SchedulerOutputStreamer`` (``has_additional_customized_info``,   request-level base64 int32 mask
``build_additional_customized_info``)                           (SGLang's customized-info channel)
=============================================================  ====================================

Supported: attention backend ``triton`` (decode reads ``forward_metadata.kv_indptr/kv_indices``,
which we replace per layer; prefill is dense and unchanged), page size 1, eager decode (CUDA graphs
off: a captured graph bakes the index buffers' shapes), overlap scheduler off (frees happen in
``process_batch_result_decode`` after the forward finished: a synced point), tensor parallel size 1
(each TP rank sees only its heads, so per-rank scores would disagree; an all-reduce of scores is
not built), no speculative decoding, no hierarchical cache (host copies would resurrect freed
slots), Lean attention off (it reads ``seq_lens``, not the index lists). FA3 (rewrite
``metadata.page_table`` / ``cache_seqlens_int32`` / ``cu_seqlens_k`` per layer, as SGLang's
``mem_cache/sparsity/backend/backend_adaptor.py::FlashAttentionAdaptor`` does) and FlashInfer (one
plan per layer) are not built and are refused by the launcher.

Replay safety: positions stay logical; no K/V is recomputed for a managed request. Retraction
(``retract_decode``) would re-prefill it densely from its tokens, so a retracted request is marked
``replayable=False`` in its export and is not managed again; size the pool (``--mem-fraction-
static``, ``--max-running-requests``) so it does not happen. Chunked prefill is dense, so it is
allowed; the prompt's eviction state is built once the last chunk ran.

Nothing here runs on a CPU machine (the backend needs CUDA); ``tests/test_sglang_gpu.py`` drives a
patched server, and :func:`verify_targets` (CPU-testable, reads the source with ``ast``) checks that
every target exists in the installed SGLang.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import logging
import os
from typing import Any

import torch

from megatron_smd.policies import PolicyConfig

from . import memory_hooks
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
    ("sglang.srt.mem_cache.base_prefix_cache", "BasePrefixCache", "free_kv_row"),
    ("sglang.srt.mem_cache.base_prefix_cache", "BasePrefixCache", "on_release"),
    ("sglang.srt.layers.attention.triton_backend", "TritonAttnBackend", "forward_extend"),
    ("sglang.srt.layers.attention.triton_backend", "TritonAttnBackend", "forward_decode"),
    ("sglang.srt.managers.scheduler_components.batch_result_processor", "SchedulerBatchResultProcessor",
     "process_batch_result_prefill"),
    ("sglang.srt.managers.scheduler_components.batch_result_processor", "SchedulerBatchResultProcessor",
     "process_batch_result_decode"),
    ("sglang.srt.managers.schedule_batch", "ScheduleBatch", "retract_decode"),
    ("sglang.srt.managers.scheduler_components.output_streamer", "SchedulerOutputStreamer",
     "build_additional_customized_info"),
    ("sglang.srt.managers.scheduler_components.output_streamer", "SchedulerOutputStreamer",
     "is_request_level_customized_info_key"),
)


def verify_targets() -> list[str]:
    """Names of :data:`TARGETS` missing from the installed SGLang (empty = all present).

    Parses the source files with ``ast`` (imports nothing, so it runs on CPU).
    """
    missing = []
    top = importlib.util.find_spec("sglang")  # the top package only: importing it needs triton
    if top is None or not top.submodule_search_locations:
        return [f"{m}.{c}.{f}" for m, c, f in TARGETS]
    root = top.submodule_search_locations[0]
    for mod, cls, meth in TARGETS:
        path = os.path.join(root, *mod.split(".")[1:]) + ".py"
        if not os.path.isfile(path):
            missing.append(f"{mod} (module)")
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        found = any(isinstance(n, ast.ClassDef) and n.name == cls and any(
            isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == meth for f in n.body)
            for n in tree.body)
        if not found:
            missing.append(f"{mod}.{cls}.{meth}")
    return missing


# ---------------------------------------------------------------------------------------------
# Per-process state
# ---------------------------------------------------------------------------------------------

_MANAGER: EvictionManager | None = None
_PREFILL_Q: dict[int, list[torch.Tensor | None]] = {}  # req_pool_idx -> per layer [n, H_q*d] (CPU)
_UNMANAGED: set[str] = set()  # rids retracted once: run dense, exported as not replayable
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
    """Refuse, in the scheduler process, settings SGLang resolved to something we cannot honour."""
    errs = []
    for name in ("attention_backend", "decode_attention_backend"):
        v = _arg(server_args, name)
        if v not in (None, "triton"):
            errs.append(f"{name}={v!r} (only 'triton' is supported)")
    if _arg(server_args, "page_size", 1) not in (None, 1):
        errs.append(f"page_size={_arg(server_args, 'page_size')} (need 1)")
    if not _arg(server_args, "disable_overlap_schedule", False):
        errs.append("overlap scheduler on (need --disable-overlap-schedule)")
    if not (_arg(server_args, "disable_cuda_graph", False) or _arg(server_args, "disable_decode_cuda_graph", False)):
        errs.append("decode CUDA graph on (need --disable-decode-cuda-graph)")
    if _arg(server_args, "disable_radix_cache", False):
        errs.append("radix cache disabled (the patch keeps prompts tree-owned; run with the radix cache)")
    if (_arg(server_args, "tp_size", 1) or 1) > 1:
        errs.append(f"tp_size={_arg(server_args, 'tp_size')} (need 1)")
    if _arg(server_args, "speculative_algorithm") not in (None, "", "NONE"):
        errs.append("speculative decoding")
    if _arg(server_args, "enable_hierarchical_cache", False):
        errs.append("hierarchical cache")
    if errs:
        raise EvictionConfigError("smd eviction cannot run with the resolved SGLang settings: " + "; ".join(errs))


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------


def _wrap(cls, name, make):
    orig = getattr(cls, name)
    new = make(orig)
    functools.update_wrapper(new, orig)
    setattr(cls, name, new)


def _managed_rows(forward_batch) -> list[tuple[int, int]]:
    """(batch index, req_pool_idx) of the managed requests in a decode batch."""
    if _MANAGER is None:
        return []
    rows = forward_batch.req_pool_indices.tolist()
    return [(b, r) for b, r in enumerate(rows) if _MANAGER.state_for_row(r) is not None]


def _hook_scheduler(Scheduler) -> None:
    def make_init(orig):
        def __init__(self, *args, **kwargs):
            global _MANAGER
            orig(self, *args, **kwargs)
            policy = policy_from_env()
            if policy is None:
                return
            check_resolved_server_args(self.server_args)
            mc = self.model_config
            tp = 1
            _MANAGER = EvictionManager(
                policy, num_layers=mc.num_hidden_layers, num_q_heads=mc.num_attention_heads // tp,
                num_kv_heads=mc.get_num_kv_heads(tp), head_dim=mc.head_dim,
                req_to_token_pool=self.req_to_token_pool, allocator=self.token_to_kv_pool_allocator,
                kv_pool=self.token_to_kv_pool_allocator.get_kvcache(), tree_cache=self.tree_cache)
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


def _hook_triton(TritonAttnBackend) -> None:
    def make_extend(orig):
        def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
            out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            if _MANAGER is not None and q is not None:
                # keep each request's prefill queries for the shared prompt state (SnapKV / R-KV
                # observation window, H2O column sums); token-major, split by extend lengths
                lens = forward_batch.extend_seq_lens_cpu
                rows = forward_batch.req_pool_indices.tolist()
                qs = q.reshape(q.shape[0], -1).split(list(lens))
                for row, qq in zip(rows, qs):
                    buf = _PREFILL_Q.setdefault(row, [None] * _MANAGER.L)
                    prev = buf[layer.layer_id]
                    qc = qq.detach().float().cpu()
                    buf[layer.layer_id] = qc if prev is None else torch.cat([prev, qc])
            return out
        return forward_extend

    def make_decode(orig):
        def forward_decode(self, q, k, v, layer, forward_batch, *args, **kwargs):
            managed = _managed_rows(forward_batch)
            if not managed:
                return orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            md = self.forward_metadata
            indptr, indices = md.kv_indptr, md.kv_indices
            li = layer.layer_id
            # per layer: managed rows attend their live positions + the new token; others as is
            per_row = []
            for b in range(forward_batch.batch_size):
                a, e = int(indptr[b]), int(indptr[b + 1])
                per_row.append(indices[a:e])
            for b, row in managed:
                per_row[b] = _MANAGER.next_kv_indices(row, li).to(indices.device, indices.dtype)
            lens = torch.tensor([0] + [len(x) for x in per_row], device=indptr.device, dtype=indptr.dtype)
            md.kv_indptr, md.kv_indices = torch.cumsum(lens, 0).to(indptr.dtype), torch.cat(per_row)
            try:
                out = orig(self, q, k, v, layer, forward_batch, *args, **kwargs)
            finally:
                md.kv_indptr, md.kv_indices = indptr, indices
            qv = q.reshape(q.shape[0], layer.tp_q_head_num, layer.qk_head_dim)
            for b, row in managed:
                st = _MANAGER.state_for_row(row)
                _MANAGER.decode_layer(st.rid, li, qv[b].float().cpu())
            return out
        return forward_decode

    _wrap(TritonAttnBackend, "forward_extend", make_extend)
    _wrap(TritonAttnBackend, "forward_decode", make_decode)


def _hook_results(Processor, ScheduleBatch) -> None:
    def make_prefill(orig):
        def process_batch_result_prefill(self, batch, result, *args, **kwargs):
            done = []
            if _MANAGER is not None:
                for req in batch.reqs:
                    row = req.kv.req_pool_idx
                    buf = _PREFILL_Q.get(row) if row is not None else None
                    full = row is not None and len(req.full_untruncated_fill_ids) == len(req.origin_input_ids)
                    if buf is None or not full or getattr(batch, "chunked_req", None) is req:
                        continue  # prompt not complete yet (chunked prefill) or not ours
                    if req.rid in _UNMANAGED or any(x is None for x in buf):
                        continue
                    _MANAGER.prepare_prompt(req, [x.to(torch.float32) for x in buf])  # K/V are in the pool
                    done.append((req, buf))
            out = orig(self, batch, result, *args, **kwargs)  # checkpoints prompts, finishes 0-token reqs
            for req, buf in done:
                _PREFILL_Q.pop(req.kv.req_pool_idx, None) if req.kv.req_pool_idx is not None else None
                if not req.finished() and req.kv.req_pool_idx is not None:
                    _MANAGER.start_request(req, buf)
            return out
        return process_batch_result_prefill

    def make_decode(orig):
        def process_batch_result_decode(self, batch, result, *args, **kwargs):
            if _MANAGER is not None:
                rids = [r.rid for r in batch.reqs if _MANAGER.is_managed(r)]
                if rids:
                    # the forward finished (overlap scheduler off): a synced point to free slots
                    _MANAGER.end_decode_step(rids)
            return orig(self, batch, result, *args, **kwargs)
        return process_batch_result_decode

    def make_retract(orig):
        def retract_decode(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            retracted = out[0] if isinstance(out, tuple) else out
            for req in retracted or []:
                _UNMANAGED.add(req.rid)
                logger.warning("smd: request %s retracted; it will be re-prefilled densely and its "
                               "trajectory is marked not replayable", req.rid)
            return out
        return retract_decode

    _wrap(Processor, "process_batch_result_prefill", make_prefill)
    _wrap(Processor, "process_batch_result_decode", make_decode)
    _wrap(ScheduleBatch, "retract_decode", make_retract)


def _hook_output(Streamer) -> None:
    def build_additional_customized_info(self, reqs):
        vals = []
        for req in reqs:
            ex = None
            if req.finished() and _MANAGER is not None:
                ex = _MANAGER.pop_export(req.rid)
                if ex is None and req.rid in _UNMANAGED:
                    ex = {"evict": None, "replayable": False, "not_replayable_reason": "retracted"}
                    _UNMANAGED.discard(req.rid)
            vals.append([ex] if ex is not None else [])
        return {META_KEY: vals}

    def is_request_level_customized_info_key(self, key):
        return key == META_KEY

    Streamer.has_additional_customized_info = True
    Streamer.build_additional_customized_info = build_additional_customized_info
    Streamer.is_request_level_customized_info_key = is_request_level_customized_info_key


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
    memory_hooks.install_memory_hooks(m["sglang.srt.mem_cache.radix_cache"].RadixCache,
                                      m["sglang.srt.mem_cache.base_prefix_cache"].BasePrefixCache)
    _hook_scheduler(m["sglang.srt.managers.scheduler"].Scheduler)
    _hook_triton(m["sglang.srt.layers.attention.triton_backend"].TritonAttnBackend)
    _hook_results(m["sglang.srt.managers.scheduler_components.batch_result_processor"].SchedulerBatchResultProcessor,
                  m["sglang.srt.managers.schedule_batch"].ScheduleBatch)
    _hook_output(m["sglang.srt.managers.scheduler_components.output_streamer"].SchedulerOutputStreamer)
    _APPLIED = True
    return True


def plugin_entry() -> None:
    """SGLang plugin entry point (``sglang.srt.plugins`` group): apply when the launcher asked."""
    apply()
