"""Per-request, per-layer KV eviction bookkeeping on SGLang's memory classes.

This module is the part of the patch that decides and frees; :mod:`sglang_patch.patch` only calls
it from SGLang's attention backend (per layer) and scheduler (per step). It imports nothing from
SGLang: it works on the objects SGLang hands it — ``ReqToTokenPool`` (``req_to_token``),
``TokenToKVPoolAllocator`` (``free``, ``free_group_begin/end``), ``MHATokenToKVPool``
(``get_key_buffer``), ``RadixCache`` (``match_prefix``, ``lock``/``unlock``, ``_delete_leaf``) and
``Req`` (``rid``, ``kv.req_pool_idx``, ``kv.cache_protected_len``, ``lock``, ``last_node``) — so the
CPU tests drive it with the real classes on ``device="cpu"``.

Decisions are :mod:`megatron_smd.policies`' (``should_compress`` / ``accumulate`` / ``select``),
called exactly as the reference engine (:mod:`megatron_smd.rollout.engine`) calls them, so on the
same attention inputs SGLang evicts the same positions and exports the same mask.

Model of one request (page size 1, one KV slot per logical position, shared by all layers)
---------------------------------------------------------------------------------------------
* **Positions stay logical.** ``req_to_token[row, j]`` keeps mapping position ``j`` to its slot and
  ``seq_lens`` is untouched, so RoPE positions are the original ones. What changes is the list of
  positions each layer still attends: ``live[l]`` (int64, ascending). The attention backend gets
  ``req_to_token[row, live[l]]`` as that layer's compacted KV index list
  (:meth:`EvictionManager.kv_indices`).
* **The mask.** ``evict[l, j]``: SnapKV-style prefill compression of a prompt of length ``P`` sets
  ``evict = P`` for dropped prompt keys; a decode eviction decided after the query at position
  ``i`` ran sets ``evict = i + 1``; never evicted = the sequence length (at export). Exported as
  base64 int32 ``[L, T]`` (:func:`encode_mask`).
* **Private (decode) positions** ``j >= cache_protected_len``: the request owns the slot. Once ``j``
  is evicted in *every* layer its slot goes back to the allocator at once (at the scheduler's
  synced point, inside ``free_group_begin/end``) and ``req_to_token[row, j]`` is pointed at the
  dummy slot 0, so a stale read can never see another request's K/V.
* **The shared prompt** ``j < cache_protected_len`` is owned by the radix tree and shared by every
  sample of the GRPO group (``RadixCache.checkpoint`` de-duplicates each sample's prompt onto the
  same slots). Evicting a prompt position is per request and only a mask entry. Only when *every*
  sharer has evicted position ``p`` in every layer, no request outside the group holds the
  prompt's tree lock, and the prompt's tree path below ``p`` is a plain chain, does the group
  *detach* ``[p, P)`` from the tree (:meth:`EvictionManager._maybe_detach`): the tree keeps the
  intact prefix ``[0, p)`` (still matchable by later requests, which re-prefill the rest densely),
  every sharer's lock moves to the node ending at ``p`` and its ``cache_protected_len`` becomes
  ``p``; the group then owns ``[p, P)``, frees the positions every sharer dropped at once and the
  rest when the last sharer finishes.
* **Prompt work is shared.** The prompt's dense prefill state — per layer the kept positions after
  prefill compression (SnapKV, or any policy whose budget is below ``P``), the H2O attention sums
  and the last ``window`` post-RoPE queries — is computed once per prompt
  (:class:`PromptState`, cached by token ids) from the request that prefilled the whole prompt,
  and copied by every later sample, which only re-extends the last prompt token (SGLang matches
  at most ``input_len - 1`` tokens). A sample whose prefill saw fewer queries than the policy
  needs and finds no cached state is scored on the queries it has and flagged
  ``prompt_state="partial"`` in its export (its mask is still exact for replay: it records what
  the sampler did).

Per-layer *freeing* (a slot dead in some layers only) would need per-layer slot tables: one
allocator and one translation table ``logical slot -> layer slot`` per layer (or per group of
layers), as SGLang's hybrid sliding-window pools do with two pools (``SWAKVPool``,
``SWATokenToKVPoolAllocator.free_swa``, ``full_to_swa_index_mapping``), generalised to ``L`` pools
and read by the backend when it builds each layer's index list. It is not built: a slot is freed
when its position is dead in every layer, and per-layer eviction is otherwise a mask plus a
shorter attention index list.
"""

from __future__ import annotations

import base64
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from megatron_smd.errors import ConfigError
from megatron_smd.mask import EVICT_DTYPE
from megatron_smd.policies import EvictionPolicy, PolicyConfig, accumulate_attention, make_policy, obs_attention

#: ``evict`` value of a position nobody has evicted yet (clamped to the sequence length at export).
NEVER = 2**62
#: The dummy KV slot padded tokens write to (SGLang's allocator never hands it out).
DUMMY_SLOT = 0


class EvictionConfigError(ConfigError):
    """Settings under which per-layer eviction cannot be honoured; raised before anything runs."""


def check_policy_supported(cfg: PolicyConfig) -> None:
    """Refuse policy settings the SGLang path cannot honour.

    The KV pool has one slot table per layer, so scores are reduced over heads and every KV head
    keeps the same positions (``granularity="layer"``; the exported mask is ``[L, T]``).
    """
    if cfg.granularity != "layer":
        raise EvictionConfigError(
            f"smd policy granularity={cfg.granularity!r} is not supported by the SGLang rollout "
            f"engine: its KV pool keeps one slot table per layer, so use granularity='layer' "
            f"(per-head eviction runs on the reference engine)"
        )


# ---------------------------------------------------------------------------------------------
# Mask export
# ---------------------------------------------------------------------------------------------


def encode_mask(evict: torch.Tensor) -> dict:
    """``evict`` int32 ``[L, T]`` -> ``{"b64", "shape", "dtype"}`` (little-endian int32 bytes)."""
    if evict.dtype != EVICT_DTYPE or evict.dim() != 2:
        raise ValueError(f"encode_mask: expected int32 [L, T], got {evict.dtype} {list(evict.shape)}")
    raw = evict.contiguous().cpu().numpy().astype("<i4").tobytes()
    return {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(evict.shape), "dtype": "int32"}


def decode_mask(obj: dict, *, name: str = "smd_evict") -> torch.Tensor:
    """Inverse of :func:`encode_mask`. Raises ``FormatError`` naming ``name`` on a malformed object."""
    import numpy as np

    from megatron_smd.errors import FormatError

    try:
        shape = [int(s) for s in obj["shape"]]
        if obj.get("dtype", "int32") != "int32" or len(shape) != 2:
            raise ValueError(f"dtype {obj.get('dtype')!r}, shape {shape}")
        raw = base64.b64decode(obj["b64"], validate=True)
        arr = np.frombuffer(raw, dtype="<i4")
        if arr.size != shape[0] * shape[1]:
            raise ValueError(f"{arr.size} int32 values for shape {shape}")
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{name}: not a base64 int32 [L, T] mask ({e})") from None
    return torch.from_numpy(arr.copy()).view(*shape).to(EVICT_DTYPE)


# ---------------------------------------------------------------------------------------------
# Per-prompt shared state
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptState:
    """What the dense prefill of one prompt leaves behind, shared by every sample of it.

    Attributes (``L`` layers, ``P`` prompt tokens, ``C_l`` kept positions of layer ``l``):
        keep: per layer int64 ``[C_l]`` ascending positions kept after prefill compression
            (``arange(P)`` when the policy does not compress at prefill).
        acc: per layer float32 ``[H_kv, C_l]`` H2O attention sums of the kept positions (h2o only).
        obs_q: per layer float32 ``[H_q, w', d]`` post-RoPE queries of the last ``w' <= window``
            prompt positions (snapkv/rkv only); obs_pos int64 ``[w']``.
        partial: True if the prefill that built it saw fewer queries than the policy needs.
    """

    prompt_len: int
    keep: list[torch.Tensor]
    acc: list[torch.Tensor | None]
    obs_q: list[torch.Tensor | None]
    obs_pos: torch.Tensor | None
    partial: bool


def build_prompt_state(policy: EvictionPolicy, keys: list[torch.Tensor], queries: list[torch.Tensor],
                       q_start: int) -> PromptState:
    """Run the policy's prefill step on one prompt, exactly as the reference engine's ``_prefill``.

    Args:
        keys: per layer ``[H_kv, P, d]`` post-RoPE keys of the whole prompt (read from the KV pool).
        queries: per layer ``[H_q, n, d]`` post-RoPE queries of positions ``[q_start, P)`` that this
            prefill computed (``q_start = 0`` for the request that prefilled the whole prompt).
        q_start: first position with a query.
    Returns:
        the :class:`PromptState`; dropped positions of layer ``l`` are ``arange(P) \\ keep[l]``.
    """
    L = len(keys)
    H_kv, P, _ = keys[0].shape
    n = queries[0].shape[1]
    if q_start + n != P:
        raise ValueError(f"prefill queries cover [{q_start}, {q_start + n}), the prompt has {P} tokens")
    w = policy.obs_window
    partial = (policy.needs_attention and q_start > 0) or (w > 0 and n < min(w, P))
    pos = torch.arange(P)
    keep, accs, obs, obs_pos = [], [], [], None
    if w:
        o0 = max(q_start, P - w)
        obs_pos = pos[o0:].clone()
    for li in range(L):
        k = keys[li]
        acc = None
        if policy.needs_attention:
            probs = obs_attention(k, pos.expand(H_kv, P), queries[li], pos[q_start:])  # [H_q, n, P]
            acc = accumulate_attention(torch.zeros(H_kv, P), probs)
        oq = None
        if w:
            oq = queries[li][:, max(0, P - w - q_start):].to(torch.float32).clone()
        kept = pos
        if policy.should_compress(P, "prefill"):
            sel = policy.select(keys=k.float(), positions=pos.expand(H_kv, P).clone(), acc=acc,
                                obs_queries=oq, obs_positions=obs_pos)
            kept = sel[0].clone()
            if acc is not None:
                acc = acc[:, kept]
        keep.append(kept)
        accs.append(acc)
        obs.append(oq)
    return PromptState(P, keep, accs, obs, obs_pos, bool(partial))


# ---------------------------------------------------------------------------------------------
# Per-request state and the prompt groups
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestEviction:
    """Eviction state of one running request (all tensors on the bookkeeping device, CPU here).

    ``live[l]`` int64 ``[C_l]`` ascending positions layer ``l`` still attends; ``acc[l]`` float32
    ``[H_kv, C_l]`` (h2o); ``obs_q[l]`` float32 ``[H_q, <=w, d]`` and ``obs_pos`` ``[<=w]`` (snapkv/
    rkv); ``evict`` int64 ``[L, cap]`` (:data:`NEVER` = not evicted); ``dead`` int32 ``[cap]``
    number of layers that evicted each position; ``freed`` bool ``[cap]`` private slots already
    returned to the allocator. ``next_pos`` is the position of the next token fed to the model.
    """

    req: Any
    rid: str
    row: int
    prompt_len: int
    group: "PromptGroup"
    live: list[torch.Tensor]
    acc: list[torch.Tensor | None]
    obs_q: list[torch.Tensor | None]
    obs_pos: torch.Tensor | None
    evict: torch.Tensor
    dead: torch.Tensor
    freed: torch.Tensor
    next_pos: int
    prompt_state: str = "shared"
    replayable: bool = True
    not_replayable_reason: str = ""
    evictions: int = 0
    private_held: int = 0  # private (decode) slots currently allocated to this request
    peak_private_held: int = 0  # their peak over the run: the request's own token-pool usage
    step_open: list[bool] = field(default_factory=list)

    def ensure_capacity(self, n: int) -> None:
        cap = self.evict.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        ev = torch.full((self.evict.shape[0], new), NEVER, dtype=torch.int64)
        ev[:, :cap] = self.evict
        dead = torch.zeros(new, dtype=torch.int32)
        dead[:cap] = self.dead
        freed = torch.zeros(new, dtype=torch.bool)
        freed[:cap] = self.freed
        self.evict, self.dead, self.freed = ev, dead, freed


@dataclass
class PromptGroup:
    """The running requests that share one tree-owned prompt (a GRPO group, plus any latecomer).

    ``protected`` is the tree-owned prefix length (``P``, or ``p`` after a detach); ``owned_slots``
    int64 ``[P - protected]`` are the slots of the detached positions ``[protected, P)``, owned by
    the group; ``owned_freed`` marks those already returned to the allocator.
    """

    key: tuple
    prompt_len: int
    members: dict[str, RequestEviction] = field(default_factory=dict)
    protected: int = 0
    owned_slots: torch.Tensor | None = None
    owned_freed: torch.Tensor | None = None


class EvictionManager:
    """All eviction state of one SGLang scheduler (one TP rank; page size 1).

    Args:
        policy: a validated :class:`PolicyConfig` with ``granularity="layer"``.
        num_layers / num_q_heads / num_kv_heads / head_dim: the model's attention shape on this rank.
        req_to_token_pool, allocator, kv_pool, tree_cache: SGLang's ``ReqToTokenPool``,
            ``TokenToKVPoolAllocator`` (page size 1), ``MHATokenToKVPool`` and ``RadixCache``.
        prompt_cache_size: how many :class:`PromptState` are kept (LRU), keyed by prompt tokens;
            cleared by :meth:`clear_prompt_cache` whenever the weights change.
    """

    def __init__(self, policy: PolicyConfig, *, num_layers: int, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, req_to_token_pool, allocator, kv_pool, tree_cache,
                 prompt_cache_size: int = 256):
        check_policy_supported(policy)
        page = getattr(allocator, "page_size", 1)
        if page != 1:
            raise EvictionConfigError(
                f"smd eviction needs --page-size 1 (got page size {page}): a paged allocator frees "
                f"whole pages, so one evicted token could not return its slot"
            )
        if getattr(tree_cache, "disable", False) is False and getattr(tree_cache, "page_size", 1) != 1:
            raise EvictionConfigError(f"radix cache page size {tree_cache.page_size} != 1")
        self.cfg = policy
        self.policy = make_policy(policy)
        self.L, self.H_q, self.H_kv, self.d = num_layers, num_q_heads, num_kv_heads, head_dim
        self.rtp, self.allocator, self.kv_pool, self.tree = req_to_token_pool, allocator, kv_pool, tree_cache
        self.prompt_cache_size = prompt_cache_size
        self._prompt_cache: dict[tuple, PromptState] = {}
        self._reqs: dict[str, RequestEviction] = {}
        self._by_row: dict[int, RequestEviction] = {}
        self._groups: dict[tuple, PromptGroup] = {}
        self._exports: dict[str, dict] = {}
        self._released_early: set[str] = set()
        self.stats = {"private_slots_freed": 0, "prompt_slots_freed": 0, "detaches": 0, "released_early": 0}

    # ------------------------------------------------------------------ lookups
    def state(self, rid: str) -> RequestEviction:
        return self._reqs[rid]

    def state_for_row(self, row: int) -> RequestEviction | None:
        return self._by_row.get(int(row))

    def managing(self) -> bool:
        """Whether any request is under eviction (the decode hooks' per-layer fast exit)."""
        return bool(self._by_row)

    def is_managed(self, req) -> bool:
        return getattr(req, "rid", None) in self._reqs

    def clear_prompt_cache(self) -> None:
        """Drop every shared :class:`PromptState` (call on weight update / cache flush)."""
        self._prompt_cache.clear()

    # ------------------------------------------------------------------ pool access
    def _row_slots(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        return self.rtp.req_to_token[row, positions.to(self.rtp.req_to_token.device)].to(torch.int64)

    def _keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[H_kv, C, d]`` keys of ``slots`` in ``layer``, read from the KV pool."""
        kb = self.kv_pool.get_key_buffer(layer)  # [size + 1, H_kv, d]
        return kb[slots.to(kb.device)].transpose(0, 1).cpu()

    # ------------------------------------------------------------------ prefill
    def prepare_prompt(self, req, queries: list[torch.Tensor]) -> PromptState:
        """The shared :class:`PromptState` of ``req``'s prompt: cached, or built now from the pool.

        Needs the prompt's K/V in the pool (``req_to_token[row, :P]``) and this prefill's queries
        (per layer ``[n, H_q, d]`` for positions ``[P - n, P)``). Called for every request whose
        prefill completed, including SGLang's ``max_new_tokens=0`` prefix-caching request of a
        parallel-sampling group, so the group's samples (which re-extend one token) find it.
        """
        prompt = tuple(int(t) for t in req.origin_input_ids)
        P = len(prompt)
        if len(queries) != self.L:
            raise ValueError(f"prepare_prompt: {len(queries)} layers of queries, the model has {self.L}")
        n = queries[0].shape[0]
        ps = self._prompt_cache.get(prompt)
        if ps is None or (ps.partial and n == P):
            slots = self._row_slots(int(req.kv.req_pool_idx), torch.arange(P))
            keys = [self._keys(li, slots) for li in range(self.L)]
            dt = keys[0].dtype if keys[0].dtype == torch.float64 else torch.float32
            qs = [q.reshape(n, self.H_q, self.d).transpose(0, 1).to(dt) for q in queries]  # [H_q, n, d]
            ps = build_prompt_state(self.policy, keys, qs, P - n)
            self._prompt_cache[prompt] = ps
            while len(self._prompt_cache) > self.prompt_cache_size:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
        else:  # LRU touch
            self._prompt_cache[prompt] = self._prompt_cache.pop(prompt)
        return ps

    def start_request(self, req, queries: list[torch.Tensor]) -> RequestEviction:
        """Register a request whose prompt has just been prefilled and checkpointed into the tree.

        Call after SGLang's prefill checkpoint (``req.kv.cache_protected_len == P``: the whole
        prompt is tree-owned) and before its first decode step.

        Args:
            req: SGLang ``Req`` (``rid``, ``origin_input_ids``, ``kv.req_pool_idx``, ``lock``,
                ``last_node``, ``kv.cache_protected_len``).
            queries: per layer ``[n, H_q, d]`` post-RoPE queries of the last ``n`` prompt positions
                this request's prefill computed (token-major, as SGLang's attention receives them).
        """
        rid = req.rid
        if rid in self._reqs:
            raise ValueError(f"request {rid} is already registered")
        prompt = tuple(int(t) for t in req.origin_input_ids)
        P = len(prompt)
        row = int(req.kv.req_pool_idx)
        if int(req.kv.cache_protected_len) != P:
            raise ValueError(f"request {rid}: the tree owns {req.kv.cache_protected_len} of {P} prompt "
                             f"tokens after prefill (expected the whole prompt: page size 1, radix on)")
        ps = self.prepare_prompt(req, queries)
        gkey = (prompt, getattr(req, "extra_key", None), getattr(req, "cache_salt", None), id(req.last_node))
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = PromptGroup(key=gkey, prompt_len=P, protected=P)
        cap = max(2 * P, P + 64)
        st = RequestEviction(
            req=req, rid=rid, row=row, prompt_len=P, group=group,
            live=[k.clone() for k in ps.keep],
            acc=[None if a is None else a.clone() for a in ps.acc],
            obs_q=[None if q is None else q.clone() for q in ps.obs_q],
            obs_pos=None if ps.obs_pos is None else ps.obs_pos.clone(),
            evict=torch.full((self.L, cap), NEVER, dtype=torch.int64),
            dead=torch.zeros(cap, dtype=torch.int32), freed=torch.zeros(cap, dtype=torch.bool),
            next_pos=P, prompt_state="partial" if ps.partial else "shared",
            step_open=[False] * self.L,
        )
        dropped = _prefill_dropped(ps)
        st.evict[:, :P][dropped] = P
        st.dead[:P] += dropped.sum(0, dtype=torch.int32)
        group.members[rid] = st
        self._reqs[rid] = st
        self._by_row[row] = st
        return st

    @property
    def dense(self) -> bool:
        """Policy ``none``: nothing is ever evicted, so requests are not managed at all (SGLang's
        own paths run untouched) and every export is the dense mask (:meth:`dense_export`)."""
        return self.cfg.name == "none"

    def dense_export(self, req) -> dict:
        """The export of a request under policy ``none``: every key seen by every later query."""
        P, T = len(req.origin_input_ids), len(req.origin_input_ids) + len(req.output_ids)
        return {"evict": encode_mask(torch.full((self.L, T), T, dtype=EVICT_DTYPE)), "prompt_state": "shared",
                "replayable": True, "not_replayable_reason": "", "evictions": 0,
                "peak_private_slots": T - P, "prompt_len": P, "policy": self.cfg.model_dump(mode="json")}

    def finish_in_prefill(self, req, ps: PromptState) -> dict:
        """The export of a request that finished in its prefill (its first sampled token was a
        stop token, or SGLang's ``max_new_tokens=0`` prefix request): it never decoded, so its mask
        is the prefill compression alone (dropped prompt keys ``evict = P``). Nothing is kept."""
        P = ps.prompt_len
        T = len(req.origin_input_ids) + len(req.output_ids)
        ev = torch.full((self.L, max(T, P)), max(T, P), dtype=torch.int64)
        ev[:, :P][_prefill_dropped(ps)] = P
        export = {"evict": encode_mask(ev[:, :T].clamp(max=T).to(EVICT_DTYPE)),
                  "prompt_state": "partial" if ps.partial else "shared", "replayable": True,
                  "not_replayable_reason": "", "evictions": 0, "peak_private_slots": 0, "prompt_len": P,
                  "policy": self.cfg.model_dump(mode="json")}
        return export

    # ------------------------------------------------------------------ decode (per layer)
    def decode_layer(self, rid: str, layer: int, q: torch.Tensor) -> torch.Tensor:
        """One decode query of ``rid`` in ``layer``: add its own position, score, return KV slots.

        Call from the attention backend after the new token's K/V was written to the pool
        (``set_kv_buffer``) and before attention. Args: ``q`` ``[H_q, d]`` post-RoPE query of the
        token at position ``i = next_pos``. Returns the int64 slots ``[C]`` this layer attends
        (ascending positions, the new token last): the compacted KV index list for the backend.
        For H2O the attention probabilities over those slots are computed here (explicit
        softmax in fp32, as the policy accumulates them) and added to the accumulator.
        """
        st = self._reqs[rid]
        i = st.next_pos
        if st.step_open[layer]:
            raise RuntimeError(f"request {rid}: layer {layer} already ran position {i} this step")
        st.ensure_capacity(i + 1)
        if layer == 0:
            st.private_held += 1
            st.peak_private_held = max(st.peak_private_held, st.private_held)
        pos_i = torch.tensor([i], dtype=torch.int64)
        st.live[layer] = torch.cat([st.live[layer], pos_i])
        slots = self._row_slots(st.row, st.live[layer])
        qf = q.reshape(self.H_q, 1, self.d)
        if self.policy.needs_attention:
            C = st.live[layer].numel()
            keys = self._keys(layer, slots)
            probs = obs_attention(keys, st.live[layer].expand(self.H_kv, C), qf.to(keys.dtype), pos_i)
            acc = torch.cat([st.acc[layer], torch.zeros(self.H_kv, 1)], dim=1)
            st.acc[layer] = self.policy.accumulate(acc, probs)
        if self.policy.obs_window:
            w = self.policy.obs_window
            st.obs_q[layer] = torch.cat([st.obs_q[layer], qf.to(torch.float32).cpu()], dim=1)[:, -w:]
            if layer == 0:
                st.obs_pos = torch.cat([st.obs_pos, pos_i])[-w:]
        st.step_open[layer] = True
        return slots

    def next_kv_indices(self, row: int, layer: int) -> torch.Tensor:
        """Slots ``layer`` of the request in ``row`` attends in the decode step about to run:
        its live positions plus the new token at ``next_pos`` (whose slot SGLang wrote into
        ``req_to_token`` before the forward). Read-only; :meth:`decode_layer` commits the step."""
        st = self._by_row[int(row)]
        pos = torch.cat([st.live[layer], torch.tensor([st.next_pos], dtype=torch.int64)])
        return self._row_slots(st.row, pos)

    def kv_indices(self, rid: str, layer: int) -> torch.Tensor:
        """The slots ``layer`` of ``rid`` currently attends (``req_to_token[row, live[layer]]``)."""
        st = self._reqs[rid]
        return self._row_slots(st.row, st.live[layer])

    # ------------------------------------------------------------------ decode (per step, synced)
    def end_decode_step(self, rids: Iterable[str]) -> None:
        """After a decode forward finished (a synced point): evict, free dead slots, detach.

        For every request, every layer must have run :meth:`decode_layer` for this step. Frees go
        through ``allocator.free_group_begin/end`` so the batch's frees land together.
        """
        rids = list(rids)
        self.allocator.free_group_begin()
        try:
            touched = []
            for rid in rids:
                st = self._reqs[rid]
                if not all(st.step_open):
                    missing = [li for li, o in enumerate(st.step_open) if not o]
                    raise RuntimeError(f"request {rid}: layers {missing} did not run position {st.next_pos}")
                st.step_open = [False] * self.L
                i = st.next_pos
                st.next_pos += 1
                self._evict_after_decode(st, i)
                touched.append(st.group)
            for g in {id(g): g for g in touched}.values():
                self._maybe_detach(g)
        finally:
            self.allocator.free_group_end()

    def _evict_after_decode(self, st: RequestEviction, i: int) -> None:
        n_live = st.live[0].numel()  # equal across layers (same budget everywhere)
        if not self.policy.should_compress(n_live, "decode"):
            return
        newly_dead = []
        for li in range(self.L):
            live = st.live[li]
            C = live.numel()
            slots = self._row_slots(st.row, live)
            keys = self._keys(li, slots).float()
            obs_q = obs_pos = None
            if self.policy.obs_window:
                obs_q, obs_pos = st.obs_q[li], st.obs_pos
            keep = self.policy.select(keys=keys, positions=live.expand(self.H_kv, C).clone(),
                                      acc=st.acc[li], obs_queries=obs_q, obs_positions=obs_pos)[0]
            dropped = torch.ones(C, dtype=torch.bool)
            dropped[keep] = False
            gone = live[dropped]
            st.evict[li, gone] = i + 1
            st.dead[gone] += 1
            newly_dead.append(gone[st.dead[gone] == self.L])
            st.live[li] = live[keep]
            if st.acc[li] is not None:
                st.acc[li] = st.acc[li][:, keep]
            st.evictions += 1
        dead = torch.cat(newly_dead)
        private = dead[dead >= st.group.prompt_len]
        if private.numel():
            self._free_private(st, private)

    def _free_private(self, st: RequestEviction, positions: torch.Tensor) -> None:
        """Return the slots of private positions evicted in every layer to the allocator."""
        positions = positions[~st.freed[positions]]
        if positions.numel() == 0:
            return
        slots = self._row_slots(st.row, positions)
        if bool((slots == DUMMY_SLOT).any()):
            raise RuntimeError(f"request {st.rid}: private positions {positions.tolist()} map to the dummy slot")
        self.allocator.free(slots.to(self.allocator.device))
        st.freed[positions] = True
        st.private_held -= int(positions.numel())
        self.rtp.req_to_token[st.row, positions.to(self.rtp.req_to_token.device)] = DUMMY_SLOT
        self.stats["private_slots_freed"] += int(positions.numel())

    # ------------------------------------------------------------------ shared prompt
    def _dead_for_all(self, g: PromptGroup, upto: int) -> torch.Tensor:
        """bool ``[upto]``: prompt positions every current member evicted in every layer."""
        out = torch.ones(upto, dtype=torch.bool)
        for m in g.members.values():
            out &= m.dead[:upto] == self.L
        return out

    def _maybe_detach(self, g: PromptGroup) -> None:
        """Free shared-prompt slots every sharer dropped (see the module docstring)."""
        if not g.members:
            return
        P = g.prompt_len
        if g.protected < P and g.owned_slots is not None:  # already detached: free newly all-dead
            dead = self._dead_for_all(g, P)[g.protected:] & ~g.owned_freed
            if dead.any():
                self.allocator.free(g.owned_slots[dead].to(self.allocator.device))
                g.owned_freed |= dead
                self.stats["prompt_slots_freed"] += int(dead.sum())
        dead = self._dead_for_all(g, g.protected)
        if not dead.any():
            return
        p = int(dead.nonzero()[0])
        members = list(g.members.values())
        last = members[0].req.last_node
        if any(m.req.last_node is not last for m in members) or last.lock_ref != len(members):
            return  # a request outside the group holds the prompt: mask only
        r0 = members[0].req
        RadixKey = type(self.tree.root_node.key)
        ids = array("q", [int(t) for t in r0.origin_input_ids[:p]])
        node_p = self.tree.match_prefix(_match_params(self.tree, RadixKey(ids, r0.extra_key, cache_salt=r0.cache_salt))).last_device_node if p > 0 else self.tree.root_node
        chain, node = [], last
        while node is not node_p:
            if node is self.tree.root_node or node is None:
                return  # not on one path (cannot happen for a prefix of the prompt)
            chain.append(node)
            node = node.parent
        for k, nd in enumerate(chain):
            children = list(nd.children.values())
            if (k == 0 and children) or (k > 0 and children != [chain[k - 1]]) or nd.lock_ref != len(members):
                return  # another branch hangs below p, or a foreign lock: keep the prompt in the tree
        for m in members:
            self.tree.unlock(m.req.lock)
            m.req.lock = self.tree.lock(node_p)
            m.req.last_node = node_p
            m.req.kv.cache_protected_len = p
            m.req.kv.cache_inserted_len = min(m.req.kv.cache_inserted_len, p)
        for nd in chain:  # bottom-up: each is an unlocked leaf once its child is gone
            self.tree._delete_leaf(nd)
            self.tree.kv_events.record_remove(nd)
        old = g.protected
        slots = self._row_slots(members[0].row, torch.arange(p, P))
        if g.owned_slots is None:
            g.owned_slots, g.owned_freed = slots, torch.zeros(P - p, dtype=torch.bool)
        else:
            g.owned_slots = torch.cat([slots[: old - p], g.owned_slots])
            g.owned_freed = torch.cat([torch.zeros(old - p, dtype=torch.bool), g.owned_freed])
        g.protected = p
        self.stats["detaches"] += 1
        # re-key the group on its new tree anchor, then free what everybody dropped
        self._groups.pop(g.key, None)
        g.key = g.key[:3] + (id(node_p), p)
        self._groups[g.key] = g
        dead = self._dead_for_all(g, P)[p:] & ~g.owned_freed
        if dead.any():
            self.allocator.free(g.owned_slots[dead].to(self.allocator.device))
            g.owned_freed |= dead
            self.stats["prompt_slots_freed"] += int(dead.sum())

    # ------------------------------------------------------------------ release
    def filter_release_ranges(self, row: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Row-position ranges SGLang may still free for ``row``: drop freed and group-owned ones.

        SGLang's ``release_kv_cache`` frees ``[cache_protected_len, owned_kv_len)`` of the row;
        for a managed request some of those slots were already returned (private positions
        evicted in every layer) and the detached prompt positions belong to the group.
        """
        st = self._by_row.get(int(row))
        if st is None:
            return ranges
        out = []
        for a, b in ranges:
            if b <= a:
                continue
            st.ensure_capacity(b)
            keep = ~st.freed[a:b]
            g = st.group
            lo, hi = max(a, g.protected), min(b, g.prompt_len)
            if hi > lo:
                keep[lo - a: hi - a] = False  # the group frees these
            idx = keep.nonzero().flatten()
            if idx.numel() == 0:
                continue
            # split into maximal runs
            breaks = (idx[1:] != idx[:-1] + 1).nonzero().flatten().tolist()
            start = 0
            for br in breaks + [idx.numel() - 1]:
                out.append((a + int(idx[start]), a + int(idx[br]) + 1))
                start = br + 1
        return out

    def finish(self, req, seq_len: int | None = None, *, early: bool = False) -> dict:
        """Forget ``req`` (SGLang released its row) and return its export (also kept for pickup).

        Args:
            seq_len: the trajectory length ``T`` (prompt + output tokens, the last sampled token
                included); default ``len(origin_input_ids) + len(output_ids)``.
            early: SGLang released the row before the request finished (retraction, or an abort
                mid-generation). A retracted request is re-prefilled densely from its tokens, so
                no mask can describe what its later tokens saw: the export is ``evict=None``,
                ``replayable=False``, and the request is never managed again
                (:meth:`released_early`).
        Returns ``{"evict": encode_mask(...) | None, "prompt_state", "replayable", ...}``.
        """
        st = self._reqs.pop(req.rid)
        self._by_row.pop(st.row, None)
        T = seq_len if seq_len is not None else len(req.origin_input_ids) + len(req.output_ids)
        if early:
            export = {"evict": None, "replayable": False,
                      "not_replayable_reason": f"released at position {st.next_pos} before finishing "
                                               f"(retraction or abort): its K/V would be recomputed densely",
                      "prompt_len": st.prompt_len, "evictions": st.evictions,
                      "peak_private_slots": st.peak_private_held, "policy": self.cfg.model_dump(mode="json")}
            self._released_early.add(st.rid)
            self.stats["released_early"] += 1
        else:
            export = self.export(st, T)
        g = st.group
        g.members.pop(st.rid, None)
        if not g.members:
            if g.owned_slots is not None:
                rest = ~g.owned_freed
                if rest.any():
                    self.allocator.free(g.owned_slots[rest].to(self.allocator.device))
                    self.stats["prompt_slots_freed"] += int(rest.sum())
                    g.owned_freed |= rest
            self._groups.pop(g.key, None)
        else:
            self._maybe_detach(g)
        self._exports[st.rid] = export
        return export

    def pop_export(self, rid: str) -> dict | None:
        """The export of a released request, once (the output streamer attaches it to the reply)."""
        self._released_early.discard(rid)
        return self._exports.pop(rid, None)

    def released_early(self, rid: str) -> bool:
        """Whether ``rid`` was released before finishing: it runs dense from then on, unmanaged."""
        return rid in self._released_early

    def drop_export(self, rid: str) -> None:
        """Forget a request's export without returning it (its reply will never be built)."""
        self._released_early.discard(rid)
        self._exports.pop(rid, None)

    def counts(self) -> dict:
        """Bookkeeping sizes, for leak checks: all zero when the server is idle."""
        return {"managed_requests": len(self._reqs), "rows": len(self._by_row),
                "prompt_groups": len(self._groups), "pending_exports": len(self._exports),
                "released_early_pending": len(self._released_early),
                "prompt_states_cached": len(self._prompt_cache)}

    def mark_not_replayable(self, rid: str, reason: str) -> None:
        """Record that K/V of ``rid`` were (or will be) recomputed: its mask no longer replays."""
        st = self._reqs.get(rid)
        if st is not None:
            st.replayable, st.not_replayable_reason = False, reason

    def export(self, st: RequestEviction, seq_len: int) -> dict:
        """The request's mask as int32 ``[L, T]`` (never evicted -> ``T``), base64-encoded."""
        st.ensure_capacity(seq_len)
        ev = st.evict[:, :seq_len].clamp(max=seq_len).to(EVICT_DTYPE)
        return {"evict": encode_mask(ev), "prompt_state": st.prompt_state, "replayable": st.replayable,
                "not_replayable_reason": st.not_replayable_reason, "evictions": st.evictions,
                "peak_private_slots": st.peak_private_held, "prompt_len": st.prompt_len,
                "policy": self.cfg.model_dump(mode="json")}

    def evict_tensor(self, rid: str, seq_len: int) -> torch.Tensor:
        """int32 ``[L, T]`` mask of a running request (tests / debugging)."""
        st = self._reqs[rid]
        st.ensure_capacity(seq_len)
        return st.evict[:, :seq_len].clamp(max=seq_len).to(EVICT_DTYPE)


def _prefill_dropped(ps: PromptState) -> torch.Tensor:
    """bool ``[L, P]``: the prompt positions each layer dropped at prefill (not in ``keep``)."""
    dropped = torch.ones(len(ps.keep), ps.prompt_len, dtype=torch.bool)
    for li, keep in enumerate(ps.keep):
        dropped[li, keep] = False
    return dropped


def _match_params(tree, key):
    """``MatchPrefixParams(key=key)`` of the tree's own module (no SGLang import here)."""
    import sys

    mod = sys.modules[type(tree).__module__]
    return mod.MatchPrefixParams(key=key)


def min_budget(cfg: PolicyConfig) -> int:
    """The smallest budget the policy accepts (validated again by :class:`PolicyConfig`)."""
    if cfg.name == "streaming":
        return cfg.sinks + 1
    if cfg.name in ("h2o", "snapkv", "rkv"):
        return cfg.window + 1
    return 1


__all__ = [
    "DUMMY_SLOT", "NEVER", "EvictionConfigError", "EvictionManager", "PromptGroup", "PromptState",
    "RequestEviction", "build_prompt_state", "check_policy_supported", "decode_mask", "encode_mask",
    "min_budget",
]
