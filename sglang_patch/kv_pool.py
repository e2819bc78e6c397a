"""Per-layer KV storage for SGLang: logical token ids for the radix tree, physical slots per layer.

SGLang's token pool gives a token one slot in every layer (``k_buffer[l][slot]``), so a token can
only be freed when every layer dropped it. Under per-layer eviction (H2O, SnapKV, R-KV choose per
layer) that is rarely the case. This module generalises SGLang's hybrid sliding-window pool (two
pools, a full -> SWA index mapping, ``free_swa``) to one physical pool per layer:

* **Logical ids** (:class:`PerLayerAllocator`, a ``TokenToKVPoolAllocator``): what the radix tree,
  ``req_to_token`` and ``out_cache_loc`` hold. Cheap indices: ``logical_slots(S, L)`` of them
  (:mod:`megatron_smd.kv_budget`), so they never run out before the physical slots do.
* **Physical slots** (:class:`PerLayerKVPool`, a ``MHATokenToKVPool`` with ``S`` slots per layer,
  the same K/V bytes as SGLang's dense pool of ``S`` tokens): layer ``l`` stores logical token
  ``t`` at ``l2p[l, t]`` (int32 ``[L, logical + 1]``; 0 = not stored, SGLang's dummy slot). One
  free stack per layer (``free_stack[l, :n_free[l]]``).
* Allocating ``n`` logical ids takes ``n`` physical slots in every layer (the new token's K/V is
  written in every layer); :meth:`PerLayerKVPool.free_physical` returns one layer's slot of a
  token that layer evicted; freeing a logical id returns whatever physical slots it still holds.
  ``set_kv_buffer`` translates ``loc`` per layer; the attention hooks
  (:mod:`sglang_patch.patch`) hand each layer physical indices.
* **Capacity** as SGLang's scheduler sees it (``available_size``) is the number of tokens that can
  still be allocated in every layer: ``min(min_l n_free[l], free logical ids)``. At idle every
  stored token is a radix-tree token held in every layer, so SGLang's own idle check
  ``available + evictable == max_total_num_tokens`` (``= S``) holds unchanged.
* **Admission** (:class:`PerLayerPrefillBudget`, via the allocator's ``create_prefill_budget``
  hook): a new request reserves its peak per layer under its policy (``kv_budget.admission_tokens``:
  the dense prefill of its prompt, then what the policy keeps), not prompt + ``max_new_tokens``;
  the scheduler's per-running-request reservation is replaced by the growth bound of the request's
  GRPO group (``kv_budget.group_reserve_tokens``, :mod:`sglang_patch.patch`).

Policy ``none`` keeps SGLang's own pool; :class:`CountingAllocator` only adds the peak counters.

Everything here runs on the device of the pool. Host reads happen at allocation / free (the
scheduler's synced points), never inside a forward.
"""

from __future__ import annotations

import numpy as np
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc
from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from megatron_smd import kv_budget
from megatron_smd.policies import PolicyConfig


class _Peaks:
    """Peak usage counters: since start, and since the last :meth:`window` read."""

    def __init__(self):
        self.total = self.layer = 0
        self.win_total = self.win_layer = 0

    def note(self, total: int, layer: int) -> None:
        self.total, self.layer = max(self.total, total), max(self.layer, layer)
        self.win_total, self.win_layer = max(self.win_total, total), max(self.win_layer, layer)

    def window(self, total_now: int, layer_now: int) -> tuple[int, int]:
        out = (self.win_total, self.win_layer)
        self.win_total, self.win_layer = total_now, layer_now
        return out


class PerLayerKVPool(MHATokenToKVPool):
    """``S`` physical K/V slots per layer plus the logical -> physical table (see module docstring).

    Constructed like ``MHATokenToKVPool`` with ``size = S`` (physical slots per layer, slot 0 the
    dummy) and ``logical_size`` (the allocator's id space).
    """

    def __init__(self, size: int, page_size: int, dtype, head_num: int, head_dim: int, layer_num: int, device,
                 enable_memory_saver: bool, *, logical_size: int, **kwargs):
        if page_size != 1:
            raise ValueError(f"PerLayerKVPool needs page size 1, got {page_size}")
        kwargs.setdefault("enable_alt_stream", False)
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver,
                         **kwargs)
        self.logical_size = int(logical_size)
        # int32 halves the table (logical ids and slots stay far below 2**31)
        self.l2p = torch.zeros((self.layer_num, self.logical_size + 1), dtype=torch.int32, device=self.device)
        self.slot_bytes = 2 * self.head_num * self.head_dim * self.store_dtype.itemsize
        self.peaks = _Peaks()
        self.clear_physical()

    # ------------------------------------------------------------------ state
    def clear_physical(self) -> None:
        """Every physical slot free, no logical id mapped (SGLang's ``flush_cache`` / start)."""
        S, L = self.size, self.layer_num
        self.free_stack = torch.arange(1, S + 1, dtype=torch.int32, device=self.device).repeat(L, 1)
        self.n_free = np.full(L, S, dtype=np.int64)
        self.l2p.zero_()

    def min_free(self) -> int:
        return int(self.n_free.min())

    def used_per_layer(self) -> np.ndarray:
        return self.size - self.n_free

    # ------------------------------------------------------------------ allocation
    def alloc_physical(self, logical: torch.Tensor) -> bool:
        """Give each of the ``n`` logical ids a physical slot in every layer. False if some layer
        has fewer than ``n`` free slots (nothing is changed then)."""
        n = int(logical.numel())
        if n == 0:
            return True
        if n > self.min_free():
            return False
        start = torch.from_numpy(self.n_free - n).to(self.device)
        idx = start.view(-1, 1) + torch.arange(n, device=self.device).view(1, -1)  # [L, n]
        self.l2p[:, logical.to(self.device, torch.int64)] = self.free_stack.gather(1, idx)
        self.n_free -= n
        used = self.used_per_layer()
        self.peaks.note(int(used.sum()), int(used.max()))
        return True

    def _push(self, layers: np.ndarray, phys: torch.Tensor) -> None:
        """Return physical slots ``phys[k]`` of layer ``layers[k]`` (host-known layers) to the stacks."""
        if layers.size == 0:
            return
        order = np.argsort(layers, kind="stable")
        lay = layers[order]
        counts = np.bincount(lay, minlength=self.layer_num)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(lay.size) - first[lay]
        dest = self.n_free[lay] + rank
        if int(dest.max()) >= self.size:
            raise RuntimeError("per-layer KV pool: more slots freed than allocated (double free)")
        o = torch.from_numpy(order).to(self.device)
        self.free_stack[torch.from_numpy(lay).to(self.device), torch.from_numpy(dest).to(self.device)] = phys[o]
        self.n_free += counts

    def free_physical(self, layers: np.ndarray, logical: np.ndarray) -> None:
        """Free layer ``layers[k]``'s slot of logical id ``logical[k]`` (a token that layer evicted)."""
        layers = np.asarray(layers, dtype=np.int64)
        if layers.size == 0:
            return
        lt = torch.from_numpy(layers).to(self.device)
        st = torch.from_numpy(np.asarray(logical, dtype=np.int64)).to(self.device)
        phys = self.l2p[lt, st]
        if bool((phys == 0).any()):
            bad = [(int(a), int(b)) for a, b, p in zip(layers, logical, phys.tolist()) if p == 0][:8]
            raise RuntimeError(f"per-layer KV pool: (layer, token) {bad} hold no physical slot (double free)")
        self._push(layers, phys)
        self.l2p[lt, st] = 0

    def free_logical(self, logical: torch.Tensor) -> None:
        """Free every physical slot the logical ids still hold (any layer)."""
        logical = logical.to(self.device, torch.int64)
        phys = self.l2p[:, logical]  # [L, n]
        held = (phys != 0).cpu().numpy()
        if held.any():
            lay, k = np.nonzero(held)
            self._push(lay.astype(np.int64), phys[torch.from_numpy(lay).to(self.device),
                                                  torch.from_numpy(k).to(self.device)])
            self.l2p[:, logical] = 0

    # ------------------------------------------------------------------ reads / writes
    def translate(self, layer_id: int, loc: torch.Tensor) -> torch.Tensor:
        """Physical slots of layer ``layer_id`` for logical ids ``loc``."""
        return self.l2p[layer_id - self.start_layer][loc.long()]

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        loc, _, _ = unwrap_write_loc(loc_info)
        lid = kwargs.get("layer_id_override")
        lid = layer.layer_id if lid is None else lid
        return super().set_kv_buffer(layer, self.translate(lid, loc), cache_k, cache_v, *args, **kwargs)

    def move_kv_cache(self, tgt_loc, src_loc):
        raise NotImplementedError("per-layer KV pool: move_kv_cache (speculative decoding) is not supported")

    def get_cpu_copy(self, *a, **k):
        raise NotImplementedError("per-layer KV pool: host copies (retraction backup, HiCache) are not supported")

    def load_cpu_copy(self, *a, **k):
        raise NotImplementedError("per-layer KV pool: host copies (retraction backup, HiCache) are not supported")

    # ------------------------------------------------------------------ checks / counters
    def check_consistent(self, full: bool | None = None) -> list[str]:
        """Violations of the pool invariants (empty = consistent): ``n_free[l] + #mapped[l] == S`` in
        every layer and, with ``full`` (default: pools up to 2**24 table entries), every layer's free
        and mapped slots distinct (no slot both free and mapped, none mapped twice)."""
        errs = []
        mapped = self.l2p[:, 1:]
        counts = (mapped != 0).sum(dim=1).tolist()
        for li in range(self.layer_num):
            if int(self.n_free[li]) + counts[li] != self.size:
                errs.append(f"layer {li}: {int(self.n_free[li])} free + {counts[li]} mapped != {self.size}")
        if full is None:
            full = mapped.numel() <= 2**24
        if full and not errs:
            for li in range(self.layer_num):
                both = torch.cat([self.free_stack[li, : self.n_free[li]], mapped[li][mapped[li] != 0]])
                if torch.unique(both).numel() != both.numel():
                    errs.append(f"layer {li}: a physical slot is free and mapped, or mapped twice")
        return errs

    def counters(self) -> dict:
        used = self.used_per_layer()
        return {"kv_layout": "per_layer", "physical_slots_per_layer": int(self.size),
                "logical_slots": int(self.logical_size), "slot_bytes": int(self.slot_bytes),
                "num_layers": int(self.layer_num), "free_per_layer": [int(x) for x in self.n_free],
                "used_slots_total": int(used.sum()), "kv_bytes_now": int(used.sum()) * self.slot_bytes,
                "peak_used_slots_total": self.peaks.total, "peak_used_slots_layer": self.peaks.layer,
                "peak_kv_bytes": self.peaks.total * self.slot_bytes,
                "pool_kv_bytes": int(self.size) * self.layer_num * self.slot_bytes,
                "translation_table_bytes": int(self.l2p.numel() * self.l2p.element_size()
                                               + self.free_stack.numel() * self.free_stack.element_size())}


class PerLayerPrefillBudget(PrefillBudget):
    """SGLang's prefill budget, with a new request's reservation bounded by its policy
    (``kv_budget.admission_tokens``: its own peak per layer) instead of prompt + ``max_new_tokens``."""

    def __init__(self, allocator, tree_cache, *, policy: PolicyConfig, num_mixed_decode_tokens: int = 0):
        super().__init__(allocator, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)
        self.policy = policy
        self._last: tuple[int, int, int] | None = None  # (extend, max_new, growth) of the last check

    def _growth(self, extend_input_len: int, max_new_tokens: int, prompt_len: int | None = None) -> int:
        return kv_budget.admission_tokens(self.policy, int(extend_input_len), int(max_new_tokens),
                                          prompt_len) - int(extend_input_len)

    def check_prefill(self, *, extend_input_len, total_tokens, max_new_tokens, input_tokens, swa_host_hit_length,
                      chunk_limit, auxiliary_swa_host_hit_length=0):
        grow = self._growth(extend_input_len, max_new_tokens, input_tokens)
        self._last = (int(extend_input_len), int(max_new_tokens), grow)
        return super().check_prefill(extend_input_len=extend_input_len,
                                     total_tokens=total_tokens - max_new_tokens + grow, max_new_tokens=grow, input_tokens=input_tokens,
                                     swa_host_hit_length=swa_host_hit_length, chunk_limit=chunk_limit,
                                     auxiliary_swa_host_hit_length=auxiliary_swa_host_hit_length)

    def reserve(self, extend_input_len, max_new_tokens, **kwargs):
        last, self._last = self._last, None
        if last is not None and last[:2] == (int(extend_input_len), int(max_new_tokens)):
            grow = last[2]  # the request just checked (SGLang commits right after the check)
        else:
            grow = self._growth(extend_input_len, max_new_tokens)
        return super().reserve(extend_input_len, grow, **kwargs)


class PerLayerAllocator(TokenToKVPoolAllocator):
    """Logical token ids over a :class:`PerLayerKVPool` (page size 1)."""

    def __init__(self, size: int, dtype, device, kvcache: PerLayerKVPool, need_sort: bool, *, policy: PolicyConfig):
        self.policy = policy
        super().__init__(size, dtype, device, kvcache, need_sort)

    def clear(self):
        super().clear()
        if getattr(self, "_kvcache", None) is not None:
            self._kvcache.clear_physical()

    def logical_available(self) -> int:
        return len(self.free_pages) + len(self.release_pages)

    def available_size(self):
        return min(self.logical_available(), self._kvcache.min_free())

    def alloc(self, need_size: int):
        if need_size > self._kvcache.min_free():
            return None
        sel = super().alloc(need_size)
        if sel is None:
            return None
        if not self._kvcache.alloc_physical(sel):  # cannot happen after the check above
            super().free(sel)
            return None
        return sel

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            return super().free(free_index)
        self._kvcache.free_logical(free_index)
        return super().free(free_index)

    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        return PerLayerPrefillBudget(self, tree_cache, policy=self.policy,
                                     num_mixed_decode_tokens=num_mixed_decode_tokens)

    def max_new_tokens_for_memory(self, input_tokens, max_new_tokens, *, token_capacity, sliding_window_size,
                                  chunk_size):
        if kv_budget.live_peak_tokens(self.policy) is not None:
            # the per-layer peak is bounded by the budget, not by the generation length
            if kv_budget.request_peak_tokens(self.policy, input_tokens, max_new_tokens) + 1 <= token_capacity:
                return max(0, max_new_tokens)
        return super().max_new_tokens_for_memory(input_tokens, max_new_tokens, token_capacity=token_capacity,
                                                 sliding_window_size=sliding_window_size, chunk_size=chunk_size)

    def verify_byte_accounting(self) -> list:
        """SGLang's idle check hook: the per-layer pool's slot counts (the cheap check)."""
        return self._kvcache.check_consistent(full=False)


class CountingAllocator(TokenToKVPoolAllocator):
    """SGLang's dense allocator (policy ``none``) with the same peak counters as the per-layer pool."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kv = self._kvcache
        self.slot_bytes = 2 * kv.head_num * kv.head_dim * kv.store_dtype.itemsize
        self.peaks = _Peaks()

    def alloc(self, need_size: int):
        sel = super().alloc(need_size)
        if sel is not None:
            used = self.size - self.available_size()
            self.peaks.note(used * self._kvcache.layer_num, used)
        return sel

    def counters(self) -> dict:
        L = self._kvcache.layer_num
        used = self.size - self.available_size()
        return {"kv_layout": "dense", "physical_slots_per_layer": int(self.size), "logical_slots": int(self.size),
                "slot_bytes": int(self.slot_bytes), "num_layers": int(L),
                "free_per_layer": [int(self.available_size())] * L, "used_slots_total": used * L,
                "kv_bytes_now": used * L * self.slot_bytes, "peak_used_slots_total": self.peaks.total,
                "peak_used_slots_layer": self.peaks.layer, "peak_kv_bytes": self.peaks.total * self.slot_bytes,
                "pool_kv_bytes": int(self.size) * L * self.slot_bytes, "translation_table_bytes": 0}


def window_peaks(allocator) -> dict:
    """Peak used slots since the previous call (and reset the window)."""
    pool = allocator.get_kvcache() if isinstance(allocator, PerLayerAllocator) else allocator
    if isinstance(allocator, PerLayerAllocator):
        used = pool.used_per_layer()
        tot, lay = pool.peaks.window(int(used.sum()), int(used.max()))
    else:
        used = allocator.size - allocator.available_size()
        tot, lay = allocator.peaks.window(used * allocator._kvcache.layer_num, used)
    return {"window_peak_used_slots_total": tot, "window_peak_used_slots_layer": lay}


__all__ = ["CountingAllocator", "PerLayerAllocator", "PerLayerKVPool", "PerLayerPrefillBudget", "window_peaks"]
