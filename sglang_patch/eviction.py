"""Per-request, per-layer KV eviction on SGLang's memory classes and the per-layer pool.

This module is the part of the patch that decides and frees; :mod:`sglang_patch.patch` only calls
it from SGLang's attention backend (per layer, inside the forward) and scheduler (per step). It
imports nothing from SGLang: it works on the objects SGLang hands it -- ``ReqToTokenPool``
(``req_to_token``), the per-layer pool of :mod:`sglang_patch.kv_pool` (``PerLayerKVPool``: K/V
buffers, the logical -> physical table ``l2p``, per-layer ``free_physical``; ``PerLayerAllocator``:
logical ids), ``RadixCache`` (``match_prefix``, ``lock``/``unlock``, ``_delete_leaf``) and ``Req``
(``rid``, ``kv.req_pool_idx``, ``kv.cache_protected_len``, ``lock``, ``last_node``) -- so the CPU
tests drive it with the real classes on ``device="cpu"``.

Decisions are :mod:`megatron_smd.policies`' (``should_compress`` / ``select`` at prefill, the same
formulas batched over requests by :mod:`sglang_patch.batched_policy` at decode), so on the same
attention inputs SGLang evicts the same positions as the reference engine and exports the same mask.

Model of one request (page size 1)
----------------------------------
* **Positions and ``req_to_token`` stay logical.** ``req_to_token[row, j]`` maps position ``j`` to
  its logical token id, ``seq_lens`` is untouched, RoPE positions are the original ones. Layer
  ``l`` stores token ``t`` in physical slot ``l2p[l, t]``.
* **What each layer attends.** Per request and layer the live positions are a *table* of
  ``n_tab`` positions (what the last compression kept, device tensor ``tab[l, row, :n_tab]``)
  followed by the contiguous *tail* ``[tail_start, next_pos]`` of tokens appended since. ``n_tab``,
  ``tail_start`` and ``next_pos`` are the same in every layer and known on the host without
  reading the device: they follow from the prompt length, the policy and the step count
  (``should_compress`` only looks at the live count). So every shape of a decode step is known on
  the host before the forward; the per-layer work (index tables, H2O attention sums, observation
  queries, the policy's scores, top-k, compaction of the table) is tensor ops with no host sync.
* **The mask.** ``evict[l, j]``: prefill compression of a prompt of length ``P`` sets
  ``evict = P`` for dropped prompt keys; a decode eviction decided after the query at position
  ``i`` ran sets ``evict = i + 1``; never evicted = the sequence length (at export). The dropped
  positions of a step reach the host once, after the forward (:meth:`EvictionManager.end_decode_step`).
* **Private (generated) positions** ``j >= P``: the request owns the token. When layer ``l``
  evicts it, layer ``l``'s physical slot is freed at once (at the scheduler's synced point); when
  every layer has, its logical id is freed too and ``req_to_token[row, j]`` points at the dummy 0.
* **The shared prompt** ``j < P`` is owned by the radix tree and shared by every sample of the
  GRPO group (``RadixCache.checkpoint`` de-duplicates each sample's prompt onto the same tokens),
  so it is stored once per layer. ``keep_count[l, p]`` counts the group members that still keep
  prompt position ``p`` in layer ``l``. A tree-owned position must stay complete in every layer (a
  later request may match it); so when some layer is no longer kept by anyone at a position ``p``,
  the group *detaches* ``[p, P)`` from the tree (:meth:`EvictionManager._maybe_detach`) if no
  request outside the group holds that part of the tree: the tree keeps the intact prefix ``[0,
  p)``, every member's lock moves to the node ending at ``p``; the group then owns ``[p, P)`` and
  frees each layer's slot of a position as soon as no member keeps it in that layer, its logical
  id when no layer does (and the rest when its last member finishes). A prompt whose samples are
  still on their way (SGLang's parallel sampling caches the prompt with a ``max_new_tokens=0``
  request, then sends the ``n`` samples; or a request with the same prompt waits in the queue) is
  *held* whole in the tree until the group has run a decode step with no such request waiting,
  so every sample shares it.
* **Prompt work is shared.** The prompt's dense prefill state -- per layer the kept positions after
  prefill compression (SnapKV, or any policy whose budget is below ``P``), the H2O attention sums
  and the last ``window`` post-RoPE queries -- is computed once per prompt (:class:`PromptState`,
  cached by token ids) from the request that prefilled the whole prompt, and copied by every later
  sample, which only re-extends the last prompt token (SGLang matches at most ``input_len - 1``
  tokens). A sample whose prefill saw fewer queries than the policy needs and finds no cached
  state is scored on the queries it has and flagged ``prompt_state="partial"`` in its export (its
  mask is still exact for replay: it records what the sampler did).
"""

from __future__ import annotations

import base64
import math
from array import array
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from megatron_smd import kv_budget
from megatron_smd.errors import ConfigError
from megatron_smd.mask import EVICT_DTYPE
from megatron_smd.policies import EvictionPolicy, PolicyConfig, accumulate_attention, make_policy, obs_attention

from .batched_policy import obs_attention_batched, select_and_drop_batched

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
    dev = keys[0].device
    pos = torch.arange(P, device=dev)
    keep, accs, obs, obs_pos = [], [], [], None
    if w:
        o0 = max(q_start, P - w)
        obs_pos = pos[o0:].clone()
    for li in range(L):
        k = keys[li]
        acc = None
        if policy.needs_attention:
            probs = obs_attention(k, pos.expand(H_kv, P), queries[li], pos[q_start:])  # [H_q, n, P]
            acc = accumulate_attention(torch.zeros(H_kv, P, device=dev), probs)
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
# Per-request state, prompt groups, decode steps
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestEviction:
    """Eviction state of one running request (host side; its tables live in the manager's tensors).

    ``n_tab`` / ``tail_start`` / ``next_pos``: live positions of every layer are ``tab[l, row,
    :n_tab]`` then ``[tail_start, next_pos]`` (``next_pos`` is the position of the next token fed to
    the model). ``n_obs``: observation queries held (snapkv/rkv). ``evict`` int64 ``[L, cap]``
    (:data:`NEVER` = not evicted); ``dead`` int16 ``[cap]`` number of layers that evicted each
    private position; ``freed`` bool ``[cap]`` private positions whose logical id was returned;
    ``keeps_prompt`` bool ``[L, P]`` prompt positions this request keeps per layer;
    ``private_held`` int64 ``[L]`` generated tokens it holds per layer (a view of the manager's
    per-row array, so a step updates every row at once).
    """

    req: Any
    rid: str
    row: int
    prompt_len: int
    group: "PromptGroup"
    n_tab: int
    tail_start: int
    next_pos: int
    n_obs: int
    evict: np.ndarray
    dead: np.ndarray
    freed: np.ndarray
    keeps_prompt: np.ndarray
    private_held: np.ndarray
    prompt_state: str = "shared"
    replayable: bool = True
    not_replayable_reason: str = ""
    evictions: int = 0
    peak_private_held: int = 0  # most generated tokens held in a layer over the run

    def n_live(self) -> int:
        """Live positions per layer once the token at ``next_pos`` is appended."""
        return self.n_tab + self.next_pos - self.tail_start + 1

    def ensure_capacity(self, n: int) -> None:
        cap = self.evict.shape[1]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        ev = np.full((self.evict.shape[0], new), NEVER, dtype=np.int64)
        ev[:, :cap] = self.evict
        dead = np.zeros(new, dtype=np.int16)
        dead[:cap] = self.dead
        freed = np.zeros(new, dtype=bool)
        freed[:cap] = self.freed
        self.evict, self.dead, self.freed = ev, dead, freed


@dataclass
class PromptGroup:
    """The running requests that share one tree-owned prompt (a GRPO group, plus any latecomer).

    ``protected``: the tree-owned prefix length (``P``, or ``p`` after a detach); positions
    ``[protected, P)`` are owned by the group. ``slots`` int64 ``[P]``: the prompt's logical ids
    (the same in every member's row). ``keep_count`` int32 ``[L, P]``: members keeping each position
    per layer. ``phys_freed`` bool ``[L, P]`` / ``logical_freed`` bool ``[P]``: owned positions
    already returned.
    """

    key: tuple
    prompt_len: int
    slots: np.ndarray
    keep_count: np.ndarray
    phys_freed: np.ndarray
    logical_freed: np.ndarray
    members: dict[str, RequestEviction] = field(default_factory=dict)
    protected: int = 0
    hold: bool = False  # more samples of the prompt are on their way: keep it whole in the tree


@dataclass
class DecodeStep:
    """Host-known plan of one decode forward (built once, before layer 0; see
    :meth:`EvictionManager.begin_decode`). Device tensors are ``[bs]`` unless noted."""

    bs: int
    rows: torch.Tensor
    n_tab: torch.Tensor
    tail: torch.Tensor
    n_live: torch.Tensor
    W: int  # widest live list in the batch
    n_live_host: list[int]  # the same counts as n_live, on the host
    managed: list[tuple[int, RequestEviction]]
    man_idx: torch.Tensor | None  # batch indices of the managed rows (None: none managed)
    man_rows: torch.Tensor | None
    man_rows_host: np.ndarray
    man_qpos: torch.Tensor | None  # [m, 1] position of each managed row's query
    Wm: int  # widest live list among managed rows
    comp: list[list[tuple[int, RequestEviction]]]  # compressing rows, grouped by (C, n_obs)
    comp_meta: list[dict]
    drops: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per comp group: "all" -> [L, 2, n, D]
    stash: dict = field(default_factory=dict)  # layer -> (pos, slots, phys, probs, q) of that layer
    layers_done: set = field(default_factory=set)
    cur: tuple | None = None  # (layer, pos, slots, phys, valid) of the layer being run
    probs: torch.Tensor | None = None  # [bs, H_q, 1, W] attention of the layer being run (attend())
    kcol: torch.Tensor | None = None  # [1, W] column index
    valid: torch.Tensor | None = None  # [bs, W] live entries


class EvictionManager:
    """All eviction state of one SGLang scheduler (one TP rank; page size 1).

    Args:
        policy: a validated :class:`PolicyConfig` with ``granularity="layer"``.
        num_layers / num_q_heads / num_kv_heads / head_dim: the model's attention shape on this rank.
        req_to_token_pool, allocator, kv_pool, tree_cache: SGLang's ``ReqToTokenPool``, the
            :class:`~sglang_patch.kv_pool.PerLayerAllocator` and
            :class:`~sglang_patch.kv_pool.PerLayerKVPool` (any pool for policy ``none``, which
            manages nothing), and ``RadixCache``.
        prompt_cache_size: how many :class:`PromptState` are kept (LRU), keyed by prompt tokens;
            cleared by :meth:`clear_prompt_cache` whenever the weights change.
        kv: the server's FP8 cache (:class:`sglang_patch.fp8_kv.ServerKV`) or None: every K/V this
            class reads from the pool (attention, the policies' keys) is dequantised with it.
    """

    def __init__(self, policy: PolicyConfig, *, num_layers: int, num_q_heads: int, num_kv_heads: int,
                 head_dim: int, req_to_token_pool, allocator, kv_pool, tree_cache,
                 prompt_cache_size: int = 256, kv=None):
        check_policy_supported(policy)
        page = getattr(allocator, "page_size", 1)
        if page != 1:
            raise EvictionConfigError(
                f"smd eviction needs --page-size 1 (got page size {page}): a paged allocator frees "
                f"whole pages, so one evicted token could not return its slot"
            )
        if getattr(tree_cache, "disable", False) is False and getattr(tree_cache, "page_size", 1) != 1:
            raise EvictionConfigError(f"radix cache page size {tree_cache.page_size} != 1")
        if policy.name != "none" and not hasattr(kv_pool, "l2p"):
            raise EvictionConfigError(
                f"smd eviction policy {policy.name!r} needs the per-layer KV pool "
                f"(sglang_patch.kv_pool.PerLayerKVPool), got {type(kv_pool).__name__}")
        self.cfg = policy
        self.policy = make_policy(policy)
        self.L, self.H_q, self.H_kv, self.d = num_layers, num_q_heads, num_kv_heads, head_dim
        self.rtp, self.allocator, self.kv_pool, self.tree = req_to_token_pool, allocator, kv_pool, tree_cache
        self.kv = kv
        self.prompt_cache_size = prompt_cache_size
        self._prompt_cache: dict[tuple, PromptState] = {}
        self._reqs: dict[str, RequestEviction] = {}
        self._by_row: dict[int, RequestEviction] = {}
        self._groups: dict[tuple, PromptGroup] = {}
        self._exports: dict[str, dict] = {}
        self._released_early: set[str] = set()
        self._step: DecodeStep | None = None
        #: prompts whose samples are expected (a parallel-sampling warmup just cached them)
        self._expect_samples: dict[tuple, bool] = {}
        #: the scheduler's waiting requests (set by the patch; None: no scheduler, e.g. CPU tests)
        self.waiting_requests = None
        self.stats = {"private_slots_freed": 0, "prompt_slots_freed": 0, "detaches": 0, "released_early": 0,
                      "physical_slots_freed": 0, "decode_steps": 0, "compressions": 0}
        self.B = policy.budget or 0
        self.w = self.policy.obs_window
        dev = self.rtp.req_to_token.device
        self.device = dev
        R = self.rtp.req_to_token.shape[0]
        # per-layer device tables of every request row (see RequestEviction)
        self.tab = torch.zeros((self.L, R, max(1, self.B)), dtype=torch.int64, device=dev) if self.B else None
        self.acc = (torch.zeros((self.L, R, num_kv_heads, self.B + 1), dtype=torch.float32, device=dev)
                    if self.policy.needs_attention else None)
        self.obs = (torch.zeros((self.L, R, num_q_heads, self.w, head_dim), dtype=torch.float32, device=dev)
                    if policy.name == "rkv" else None)
        # host: generated tokens each request row holds per layer (RequestEviction.private_held is a view)
        self._priv_held = np.zeros((R, num_layers), dtype=np.int64)

    # ------------------------------------------------------------------ lookups
    def state(self, rid: str) -> RequestEviction:
        return self._reqs[rid]

    def state_for_row(self, row: int) -> RequestEviction | None:
        return self._by_row.get(int(row))

    def managing(self) -> bool:
        """Whether any request is under eviction (the decode hooks' fast exit)."""
        return bool(self._by_row)

    def is_managed(self, req) -> bool:
        return getattr(req, "rid", None) in self._reqs

    def clear_prompt_cache(self) -> None:
        """Drop every shared :class:`PromptState` (call on weight update / cache flush)."""
        self._prompt_cache.clear()

    @property
    def dense(self) -> bool:
        """Policy ``none``: nothing is ever evicted, so requests are not managed at all (SGLang's
        own paths and pool run untouched) and every export is the dense mask (:meth:`dense_export`)."""
        return self.cfg.name == "none"

    # ------------------------------------------------------------------ pool access
    def _row_slots(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        return self.rtp.req_to_token[row, positions.to(self.rtp.req_to_token.device)].to(torch.int64)

    def _read(self, layer: int, which: int, stored: torch.Tensor) -> torch.Tensor:
        """K (``which`` 0) or V (1) rows read from ``layer``'s pool as attention sees them (FP8:
        dequantised with the layer's scale into the compute dtype)."""
        return stored if self.kv is None else self.kv.load(layer, which, stored)

    def _keys(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """``[H_kv, C, d]`` keys of logical ``slots`` in ``layer``, read from that layer's pool."""
        kb = self.kv_pool.get_key_buffer(layer)
        return self._read(layer, 0, kb[self.kv_pool.translate(layer, slots)]).transpose(0, 1)

    def live_positions(self, rid: str, layer: int) -> torch.Tensor:
        """Positions ``layer`` of ``rid`` attends now (table, then tail up to ``next_pos - 1``)."""
        st = self._reqs[rid]
        tab = self.tab[layer, st.row, : st.n_tab].cpu() if st.n_tab else torch.empty(0, dtype=torch.int64)
        return torch.cat([tab, torch.arange(st.tail_start, st.next_pos)])

    def running_reserve(self, req) -> int | None:
        """Slots per layer admission keeps free for a managed running request: its GRPO group's
        growth bound (:func:`megatron_smd.kv_budget.group_reserve_tokens`), charged to one member
        of the group (the one in the lowest row; the others 0). None if not managed."""
        st = self._reqs.get(getattr(req, "rid", None))
        if st is None:
            return None
        g = st.group
        members = list(g.members.values())
        if min(m.row for m in members) != st.row:
            return 0
        N = [int(m.req.sampling_params.max_new_tokens) for m in members]
        rem = [max(0, n - len(m.req.output_ids)) for n, m in zip(N, members)]
        owned_kept = (g.keep_count[:, g.protected:] > 0).sum(axis=1)
        return kv_budget.group_reserve_tokens(self.cfg, N, [m.private_held for m in members], rem, owned_kept)

    # ------------------------------------------------------------------ prefill
    def prepare_prompt(self, req, queries: list[torch.Tensor]) -> PromptState:
        """The shared :class:`PromptState` of ``req``'s prompt: cached, or built now from the pool.

        Needs the prompt's K/V in the pool (``req_to_token[row, :P]``) and this prefill's queries
        (per layer ``[n, H_q * d]`` for positions ``[P - n, P)``). Called for every request whose
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
            qs = [q.reshape(n, self.H_q, self.d).transpose(0, 1).to(keys[0].device, dt) for q in queries]
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
        prompt is tree-owned) and before its first decode step; then :meth:`after_prefill` once the
        prefill batch's requests are registered (it frees what the group dropped at prefill).

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
        slots = self._row_slots(row, torch.arange(P)).cpu().numpy()
        gkey = (prompt, getattr(req, "extra_key", None), getattr(req, "cache_salt", None), id(req.last_node))
        group = self._groups.get(gkey)
        if group is None:
            group = self._groups[gkey] = PromptGroup(
                key=gkey, prompt_len=P, slots=slots, keep_count=np.zeros((self.L, P), dtype=np.int32),
                phys_freed=np.zeros((self.L, P), dtype=bool), logical_freed=np.zeros(P, dtype=bool), protected=P,
                hold=self._expect_samples.pop(prompt, False) or self._siblings_waiting(prompt))
        elif not np.array_equal(group.slots, slots):
            raise RuntimeError(f"request {rid}: its prompt tokens differ from its group's (tree de-duplication)")
        keeps = np.zeros((self.L, P), dtype=bool)
        for li, keep in enumerate(ps.keep):
            keeps[li, keep.cpu().numpy()] = True
        compressed = not bool(keeps.all())
        n_tab = int(ps.keep[0].numel()) if compressed else 0
        if compressed and any(int(k.numel()) != n_tab for k in ps.keep):
            raise RuntimeError("prefill compression kept different counts per layer (granularity 'layer')")
        cap = max(2 * P, P + 64)
        st = RequestEviction(
            req=req, rid=rid, row=row, prompt_len=P, group=group, n_tab=n_tab,
            tail_start=P if compressed else 0, next_pos=P, n_obs=0,
            evict=np.full((self.L, cap), NEVER, dtype=np.int64), dead=np.zeros(cap, dtype=np.int16),
            freed=np.zeros(cap, dtype=bool), keeps_prompt=keeps, private_held=self._priv_held[row],
            prompt_state="partial" if ps.partial else "shared")
        st.evict[:, :P][~keeps] = P
        self._priv_held[row] = 0
        for li in range(self.L):
            if compressed:
                self.tab[li, row, :n_tab] = ps.keep[li].to(self.device)
            if self.acc is not None:
                a = ps.acc[li]
                self.acc[li, row].zero_()
                self.acc[li, row, :, : a.shape[1]] = a.to(self.device)
            if self.obs is not None:
                q = ps.obs_q[li]
                st.n_obs = int(q.shape[1])
                self.obs[li, row].zero_()
                if st.n_obs:
                    self.obs[li, row, :, self.w - st.n_obs:] = q.to(self.device, torch.float32)
        group.keep_count += keeps
        group.members[rid] = st
        self._reqs[rid] = st
        self._by_row[row] = st
        return st

    def after_prefill(self, reqs: Iterable | None = None) -> None:
        """After a prefill batch's requests were registered: free what their groups dropped at
        prefill (detaching the prompt's tail from the tree where a layer keeps nothing)."""
        groups = {}
        for r in (reqs if reqs is not None else [s.req for s in self._reqs.values()]):
            st = self._reqs.get(getattr(r, "rid", None))
            if st is not None:
                groups[id(st.group)] = st.group
        if not groups:
            return
        with _free_group(self.allocator):
            for g in groups.values():
                if not g.hold:
                    self._maybe_detach(g)
                    self._release_owned(g)

    def _siblings_waiting(self, prompt: tuple) -> bool:
        """Whether a request with this prompt waits in the scheduler's queue (it would join the
        group if the prompt is still in the tree)."""
        if self.waiting_requests is None:
            return False
        P = len(prompt)
        return any(len(r.origin_input_ids) == P and tuple(r.origin_input_ids) == prompt
                   for r in self.waiting_requests())

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
        if int(getattr(req.sampling_params, "max_new_tokens", 1) or 0) == 0:
            # SGLang's parallel-sampling warmup: it caches the prompt, the n samples follow at once
            self._expect_samples[tuple(int(t) for t in req.origin_input_ids)] = True
            while len(self._expect_samples) > self.prompt_cache_size:
                self._expect_samples.pop(next(iter(self._expect_samples)))
        ev = torch.full((self.L, max(T, P)), max(T, P), dtype=torch.int64)
        ev[:, :P][_prefill_dropped(ps)] = P
        return {"evict": encode_mask(ev[:, :T].clamp(max=T).to(EVICT_DTYPE)),
                "prompt_state": "partial" if ps.partial else "shared", "replayable": True,
                "not_replayable_reason": "", "evictions": 0, "peak_private_slots": 0, "prompt_len": P,
                "policy": self.cfg.model_dump(mode="json")}

    # ------------------------------------------------------------------ decode: the step plan
    def begin_decode(self, rids: list[str], rows: list[int], seq_lens: list[int],
                     rows_dev: torch.Tensor | None = None) -> DecodeStep | None:
        """Plan one decode forward of a batch (host only; called once, before its first layer).

        ``rows`` / ``seq_lens``: each batch entry's ``req_pool_idx`` and sequence length *including*
        the token being fed. Rows not under eviction attend their whole ``req_to_token`` prefix.
        Returns None (and plans nothing) when no row is managed.
        """
        if self._step is not None:
            raise RuntimeError("begin_decode: the previous decode step was not ended (end_decode_step)")
        managed, n_tab, tail, n_live = [], [], [], []
        for b, (rid, row, n) in enumerate(zip(rids, rows, seq_lens)):
            st = self._by_row.get(int(row))
            if st is not None and st.rid == rid:
                if st.next_pos != int(n) - 1:
                    raise RuntimeError(f"request {rid}: decode feeds position {int(n) - 1}, the eviction "
                                       f"state expects {st.next_pos} (a step was skipped)")
                managed.append((b, st))
                n_tab.append(st.n_tab)
                tail.append(st.tail_start)
                n_live.append(st.n_live())
            else:
                n_tab.append(0)
                tail.append(0)
                n_live.append(int(n))
        if not managed:
            return None
        dev = self.device
        bs = len(rows)
        comp_groups: dict[tuple, list] = {}
        for b, st in managed:
            if self.policy.should_compress(st.n_live(), "decode"):
                comp_groups.setdefault((st.n_live(), st.n_obs), []).append((b, st))
        comp, meta = [], []
        for (C, n_obs), members in comp_groups.items():
            comp.append(members)
            nxt = torch.tensor([st.next_pos for _, st in members], dtype=torch.int64)
            m = {"C": C, "n_obs": n_obs, "idx": torch.tensor([b for b, _ in members], device=dev),
                 "rows": torch.tensor([st.row for _, st in members], device=dev),
                 "all": [b for b, _ in members] == list(range(len(rows)))}
            if self.obs is not None:
                k = min(n_obs + 1, self.w)  # this step's query is appended before the decision
                m["obs_k"] = k
                m["obs_pos"] = (nxt.view(-1, 1) - k + 1 + torch.arange(k).view(1, -1)).to(dev)
            meta.append(m)
        all_managed = len(managed) == bs
        step = DecodeStep(
            bs=bs, rows=(rows_dev if rows_dev is not None else torch.tensor(rows)).to(dev, torch.int64),
            n_tab=torch.tensor(n_tab, dtype=torch.int64, device=dev),
            tail=torch.tensor(tail, dtype=torch.int64, device=dev),
            n_live=torch.tensor(n_live, dtype=torch.int64, device=dev), W=max(n_live), n_live_host=n_live,
            managed=managed,
            man_idx=None if all_managed else torch.tensor([b for b, _ in managed], device=dev),
            man_rows=torch.tensor([st.row for _, st in managed], device=dev),
            man_rows_host=np.array([st.row for _, st in managed], dtype=np.int64),
            man_qpos=torch.tensor([[st.next_pos] for _, st in managed], dtype=torch.int64, device=dev),
            Wm=max(st.n_live() for _, st in managed), comp=comp, comp_meta=meta,
            drops=[{} for _ in comp])
        step.kcol = torch.arange(step.W, device=dev).view(1, step.W)
        step.valid = step.kcol < step.n_live.view(bs, 1)
        self._step = step
        return step

    def layer_tables(self, step: DecodeStep, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s attention inputs for the step: physical slots ``[bs, W]`` (0 = padding; each
        row its live positions in order, the new token last) and live counts ``[bs]``. Tensor ops."""
        bs, W = step.bs, step.W
        k, valid = step.kcol, step.valid
        nt = step.n_tab.view(bs, 1)
        pos = step.tail.view(bs, 1) + k - nt
        if self.tab is not None:
            tab = self.tab[layer].index_select(0, step.rows)  # [bs, B]
            tv = tab.gather(1, k.clamp(max=tab.shape[1] - 1).expand(bs, W))
            pos = torch.where(k < nt, tv, pos)
        pos = pos.masked_fill(~valid, 0)
        slots = self.rtp.req_to_token[step.rows.view(bs, 1), pos].to(torch.int64)
        phys = self.kv_pool.l2p[layer - self.kv_pool.start_layer][slots].masked_fill(~valid, 0)
        step.cur = (layer, pos, slots, phys, valid)
        step.probs = None
        return phys, step.n_live

    def attend(self, step: DecodeStep, layer: int, q: torch.Tensor, out: torch.Tensor, scaling: float) -> None:
        """``layer``'s decode attention for the whole batch over its live physical slots, in one
        padded batch (after :meth:`layer_tables`; the new token's K/V already written): ``q``
        ``[bs, H_q, d]``, writes ``out`` ``[bs, H_q, d_v]``. Computed in fp32; when ``scaling`` is
        ``1/sqrt(d)`` the attention probabilities are kept for the H2O sums of :meth:`layer_update`
        (the scores the policy uses), so they are not computed twice."""
        _, _, _, phys, valid = step.cur
        bs, W = phys.shape
        kb, vb = self.kv_pool.get_kv_buffer(layer)
        g = self.H_q // self.H_kv
        keys = self._read(layer, 0, kb[phys]).float().permute(0, 2, 3, 1)  # [bs, H_kv, d, W]
        vals = self._read(layer, 1, vb[phys]).float().permute(0, 2, 1, 3)  # [bs, H_kv, W, d_v]
        qv = q.reshape(bs, self.H_kv, g, self.d).float()
        exact = abs(scaling * math.sqrt(self.d) - 1.0) < 1e-12
        logits = torch.matmul(qv, keys)  # [bs, H_kv, g, W]
        logits = logits / math.sqrt(self.d) if exact else logits * scaling
        probs = torch.softmax(logits.masked_fill(~valid.view(bs, 1, 1, W), float("-inf")), dim=-1)
        o = torch.matmul(probs, vals)  # [bs, H_kv, g, d_v]
        out.copy_(o.reshape(bs, self.H_q, -1).to(out.dtype))
        step.probs = probs.reshape(bs, self.H_q, 1, W) if exact else None

    def layer_update(self, step: DecodeStep, layer: int, q: torch.Tensor) -> None:
        """After ``layer``'s attention ran: keep what the eviction decision needs from this layer
        (its live positions / token ids / slots, the H2O attention of its managed rows, its queries
        for the observation window). Tensor ops, no host sync; the decision itself runs once for all
        layers after the forward (:meth:`decide`). ``q``: the batch's post-RoPE queries
        ``[bs, H_q * d]``."""
        cur = step.cur
        if cur is None or cur[0] != layer:
            raise RuntimeError(f"layer_update({layer}) without layer_tables({layer})")
        if layer in step.layers_done:
            raise RuntimeError(f"layer {layer} ran twice in one decode step")
        _, pos, slots, phys, valid = cur
        probs = None
        if self.acc is not None:
            if step.probs is not None:  # computed by attend()
                probs = step.probs
            else:  # the scores in the pool's dtype, as the reference engine
                kb = self.kv_pool.get_key_buffer(layer)
                keys = self._read(layer, 0, kb[phys]).permute(0, 2, 1, 3)  # [bs, H_kv, W, d]
                qb = q.reshape(step.bs, self.H_q, 1, self.d).to(keys.dtype)
                qpos = step.tail.view(-1, 1) + step.n_live.view(-1, 1) - step.n_tab.view(-1, 1) - 1
                probs = obs_attention_batched(keys, pos, qb, qpos, valid=valid)
        step.stash[layer] = (pos, slots, phys, probs, q.reshape(step.bs, self.H_q, self.d))
        step.layers_done.add(layer)
        step.cur, step.probs = None, None

    def decide(self, step: DecodeStep) -> None:
        """The eviction decision of the step for every layer and managed row at once (tensor ops,
        batched over layers, requests and heads; no host sync): H2O sums, observation queries,
        then for the rows that overflow the policy's keep / drop lists, the compacted tables and
        the dropped positions (left in ``step.drops`` for :meth:`end_decode_step`)."""
        if len(step.layers_done) != self.L:
            missing = sorted(set(range(self.L)) - step.layers_done)
            raise RuntimeError(f"decode step: layers {missing} did not run the eviction hook")
        if not step.managed:
            return
        L = self.L
        mi, mr, Wm = step.man_idx, step.man_rows, step.Wm

        def rows(t, idx):  # [L, bs, ...] -> selected batch rows
            return t if idx is None else t.index_select(1, idx)

        if self.acc is not None:
            probs = rows(torch.stack([step.stash[li][3] for li in range(L)]), mi)[..., :Wm]  # [L, m, H_q, 1, Wm]
            g = self.H_q // self.H_kv
            delta = probs.to(torch.float32).sum(dim=3).view(L, -1, self.H_kv, g, Wm).sum(dim=3)
            self.acc[:, :, :, :Wm].index_add_(1, mr, delta)  # every key's attention, summed per KV group
        if self.obs is not None:
            qs = rows(torch.stack([step.stash[li][4] for li in range(L)]), mi).to(torch.float32)  # [L, m, H_q, d]
            self.obs[:, mr] = torch.cat([self.obs[:, mr][:, :, :, 1:], qs.unsqueeze(3)], dim=3)
        for meta, drops in zip(step.comp_meta, step.drops):
            C, ci, cr = meta["C"], meta["idx"], meta["rows"]
            n = int(ci.numel())
            sel = None if meta["all"] else ci
            POS = rows(torch.stack([step.stash[li][0] for li in range(L)]), sel)[..., :C]  # [L, n, C]
            SLOT = rows(torch.stack([step.stash[li][1] for li in range(L)]), sel)[..., :C]
            keys = acc_c = obs_q = obs_pos = None
            if self.policy.name == "rkv":
                PHYS = rows(torch.stack([step.stash[li][2] for li in range(L)]), sel)[..., :C]
                keys = torch.stack([self._read(li, 0, self.kv_pool.get_key_buffer(li)[PHYS[li]]) for li in range(L)])
                keys = keys.permute(0, 1, 3, 2, 4).reshape(L * n, self.H_kv, C, self.d).float()
                kq = meta["obs_k"]
                obs_q = self.obs[:, cr][:, :, :, self.w - kq:].reshape(L * n, self.H_q, kq, self.d)
                obs_pos = meta["obs_pos"].repeat(L, 1)
            if self.acc is not None:
                acc_c = self.acc[:, cr, :, :C].reshape(L * n, self.H_kv, C)
            keep, dr = select_and_drop_batched(self.policy, keys=keys, positions=POS.reshape(L * n, C), acc=acc_c,
                                               obs_queries=obs_q, obs_positions=obs_pos)
            B = keep.shape[1]
            keep, dr = keep.reshape(L, n, B), dr.reshape(L, n, C - B)
            self.tab[:, cr, :B] = POS.gather(2, keep)
            if acc_c is not None:
                kept = acc_c.view(L, n, self.H_kv, C).gather(3, keep.unsqueeze(2).expand(-1, -1, self.H_kv, -1))
                self.acc[:, cr, :, :B] = kept
                self.acc[:, cr, :, B:] = 0.0
            drops["all"] = torch.stack([POS.gather(2, dr), SLOT.gather(2, dr)], dim=1)  # [L, 2, n, C - B]
        step.stash.clear()

    # ------------------------------------------------------------------ decode: the synced point
    def end_decode_step(self, step: DecodeStep | None = None) -> None:
        """After a decode forward finished (a synced point): record evictions, free, detach.

        Reads the step's dropped positions to the host once (one transfer for every layer and
        row), frees each layer's physical slot of a private token it dropped, the logical id once
        every layer has, and the group-owned prompt tokens no member keeps; then tries to detach
        prompts a layer no longer keeps.
        """
        step = step if step is not None else self._step
        self._step = None
        if step is None:
            return
        self.decide(step)
        host = [d["all"].cpu().numpy() if d else None for d in step.drops]
        self.stats["decode_steps"] += 1
        rows = step.man_rows_host
        self._priv_held[rows] += 1  # every managed row fed one token in every layer
        peaks = self._priv_held[rows].max(axis=1)
        for (_, st), pk in zip(step.managed, peaks.tolist()):
            st.next_pos += 1
            if pk > st.peak_private_held:
                st.peak_private_held = pk
            if self.obs is not None:
                st.n_obs = min(self.w, st.n_obs + 1)
        with _free_group(self.allocator):
            lay_free, slot_free, logical_free, zero_rows, zero_pos = [], [], [], [], []
            groups = {}  # the groups whose prompt a member dropped tokens of (in some layer)
            for members, D in zip(step.comp, host):
                self._record_drops([st for _, st in members], D, lay_free, slot_free, logical_free,
                                   zero_rows, zero_pos, groups)
            for _, st in step.managed:  # a held prompt is released once its samples have all joined
                g = st.group
                if g.hold and not self._siblings_waiting(g.key[0]):
                    g.hold = False
                    groups[id(g)] = g
            if lay_free:
                lay = np.concatenate(lay_free)
                self.kv_pool.free_physical(lay, np.concatenate(slot_free))
                self.stats["physical_slots_freed"] += int(lay.size)
            if logical_free:
                ids = np.concatenate(logical_free)
                self.allocator.free(torch.from_numpy(ids).to(self.allocator.device))
                self.stats["private_slots_freed"] += int(ids.size)
                dev = self.rtp.req_to_token.device  # their positions now point at the dummy slot
                self.rtp.req_to_token[torch.from_numpy(np.concatenate(zero_rows)).to(dev),
                                      torch.from_numpy(np.concatenate(zero_pos)).to(dev)] = DUMMY_SLOT
            for g in groups.values():
                if not g.hold:
                    self._maybe_detach(g)
                    self._release_owned(g)

    def _record_drops(self, members: list[RequestEviction], D: np.ndarray, lay_free: list, slot_free: list,
                      logical_free: list, zero_rows: list, zero_pos: list, groups: dict) -> None:
        """The compressions of this step of ``n`` requests, every layer: ``D`` ``[L, 2, n, k]``
        (dropped positions, their logical ids). Records the mask, queues the frees."""
        L, _, n, k = D.shape
        pos, slot = D[:, 0], D[:, 1]  # [L, n, k]
        P = np.array([st.group.prompt_len for st in members]).reshape(1, n, 1)
        priv = pos >= P
        lay3 = np.broadcast_to(np.arange(L).reshape(L, 1, 1), pos.shape)
        lay_free.append(lay3[priv])
        slot_free.append(slot[priv])
        n_priv = priv.sum(axis=2)  # [L, n]
        lay_flat = np.repeat(np.arange(L), k)
        self.stats["compressions"] += L * n
        for j, st in enumerate(members):
            i = st.next_pos - 1  # the query that just ran was the last to see them
            st.ensure_capacity(i + 1)
            pj, sj, vj = pos[:, j].reshape(-1), slot[:, j].reshape(-1), priv[:, j].reshape(-1)
            st.evict[lay_flat, pj] = i + 1
            st.n_tab, st.tail_start = self.B, i + 1
            st.evictions += L
            if n_priv[:, j].any():
                st.private_held -= n_priv[:, j]
                pp = pj[vj]
                np.add.at(st.dead, pp, 1)
                up, first = np.unique(pp, return_index=True)
                done = st.dead[up] == L
                if done.any():  # dropped by every layer now: the logical id goes back
                    st.freed[up[done]] = True
                    logical_free.append(sj[vj][first[done]].astype(np.int64))
                    zero_rows.append(np.full(int(done.sum()), st.row, dtype=np.int64))
                    zero_pos.append(up[done].astype(np.int64))
            if not vj.all():
                gl, gp = lay_flat[~vj], pj[~vj]
                st.keeps_prompt[gl, gp] = False
                np.subtract.at(st.group.keep_count, (gl, gp), 1)
                groups[id(st.group)] = st.group

    # ------------------------------------------------------------------ shared prompt
    def _release_owned(self, g: PromptGroup) -> None:
        """Free group-owned prompt tokens (``[protected, P)``): each layer's slot once no member
        keeps the token in that layer, the logical id once no layer does."""
        a = g.protected
        if a >= g.prompt_len:
            return
        unkept = g.keep_count[:, a:] == 0  # [L, P - a]
        phys = unkept & ~g.phys_freed[:, a:]
        if phys.any():
            lay, k = np.nonzero(phys)
            self.kv_pool.free_physical(lay.astype(np.int64), g.slots[a + k])
            g.phys_freed[lay, a + k] = True
            self.stats["physical_slots_freed"] += int(lay.size)
        logical = unkept.all(axis=0) & ~g.logical_freed[a:]
        if logical.any():
            k = np.nonzero(logical)[0]
            self.allocator.free(torch.from_numpy(g.slots[a + k]).to(self.allocator.device))
            g.logical_freed[a + k] = True
            self.stats["prompt_slots_freed"] += int(k.size)

    def _maybe_detach(self, g: PromptGroup) -> None:
        """Detach the prompt's tail ``[p, P)`` from the tree when some layer keeps position ``p``
        nowhere in the group (see the module docstring). ``p`` is the first such position, or the
        start of the part of the tree path only this group holds, whichever is later."""
        if not g.members or g.protected == 0:
            return
        dead = (g.keep_count[:, : g.protected] == 0).any(axis=0)
        if not dead.any():
            return
        p0 = int(np.argmax(dead))
        members = list(g.members.values())
        last = members[0].req.last_node
        if any(m.req.last_node is not last for m in members):
            return
        # walk up from the prompt's last node while only this group holds the path
        root = self.tree.root_node
        node, prev, end, excl_start = last, None, g.protected, None
        while node is not root and node is not None:
            children = list(node.children.values())
            own = (not children) if prev is None else (children == [prev])
            if not own or node.lock_ref != len(members):
                break
            end -= len(node.key)
            excl_start = end
            prev, node = node, node.parent
        if excl_start is None:
            return  # the prompt's own node is shared: mask only for now
        p = max(p0, excl_start)
        if p >= g.protected:
            return
        r0 = members[0].req
        RadixKey = type(self.tree.root_node.key)
        if p > 0:
            ids = array("q", [int(t) for t in r0.origin_input_ids[:p]])
            key = RadixKey(ids, r0.extra_key, cache_salt=r0.cache_salt)
            node_p = self.tree.match_prefix(_match_params(self.tree, key)).last_device_node
        else:
            node_p = root
        chain, node = [], last
        while node is not node_p:
            if node is root or node is None:
                return  # not on one path (cannot happen for a prefix of the prompt)
            chain.append(node)
            node = node.parent
        for k, nd in enumerate(chain):
            children = list(nd.children.values())
            if (k == 0 and children) or (k > 0 and children != [chain[k - 1]]) or nd.lock_ref != len(members):
                return
        for m in members:
            self.tree.unlock(m.req.lock)
            m.req.lock = self.tree.lock(node_p)
            m.req.last_node = node_p
            m.req.kv.cache_protected_len = p
            m.req.kv.cache_inserted_len = min(m.req.kv.cache_inserted_len, p)
        for nd in chain:  # bottom-up: each is an unlocked leaf once its child is gone
            self.tree._delete_leaf(nd)
            self.tree.kv_events.record_remove(nd)
        g.protected = p
        self.stats["detaches"] += 1
        # re-key the group on its new tree anchor
        self._groups.pop(g.key, None)
        g.key = g.key[:3] + (id(node_p), p)
        self._groups[g.key] = g

    # ------------------------------------------------------------------ release
    def filter_release_ranges(self, row: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Row-position ranges SGLang may still free for ``row``: drop freed and group-owned ones.

        SGLang's ``release_kv_cache`` frees ``[cache_protected_len, owned_kv_len)`` of the row;
        for a managed request some of those logical ids were already returned (private tokens
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
            idx = np.nonzero(keep)[0]
            if idx.size == 0:
                continue
            breaks = np.nonzero(idx[1:] != idx[:-1] + 1)[0].tolist()
            start = 0
            for br in breaks + [idx.size - 1]:
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
        if self._step is not None and any(s.rid == req.rid for _, s in self._step.managed):
            raise RuntimeError(f"request {req.rid} released inside an open decode step")
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
        g.keep_count -= st.keeps_prompt
        with _free_group(self.allocator):
            if not g.members:
                g.keep_count[:] = 0
                self._release_owned(g)
                self._groups.pop(g.key, None)
            elif not g.hold:
                self._maybe_detach(g)
                self._release_owned(g)
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
                "prompt_states_cached": len(self._prompt_cache), "open_decode_step": int(self._step is not None)}

    def mark_not_replayable(self, rid: str, reason: str) -> None:
        """Record that K/V of ``rid`` were (or will be) recomputed: its mask no longer replays."""
        st = self._reqs.get(rid)
        if st is not None:
            st.replayable, st.not_replayable_reason = False, reason

    def export(self, st: RequestEviction, seq_len: int) -> dict:
        """The request's mask as int32 ``[L, T]`` (never evicted -> ``T``), base64-encoded."""
        return {"evict": encode_mask(self._evict_of(st, seq_len)), "prompt_state": st.prompt_state,
                "replayable": st.replayable, "not_replayable_reason": st.not_replayable_reason,
                "evictions": st.evictions, "peak_private_slots": st.peak_private_held, "prompt_len": st.prompt_len,
                "policy": self.cfg.model_dump(mode="json")}

    def _evict_of(self, st: RequestEviction, seq_len: int) -> torch.Tensor:
        st.ensure_capacity(seq_len)
        return torch.from_numpy(np.minimum(st.evict[:, :seq_len], seq_len)).to(EVICT_DTYPE)

    def evict_tensor(self, rid: str, seq_len: int) -> torch.Tensor:
        """int32 ``[L, T]`` mask of a running request (tests / debugging)."""
        return self._evict_of(self._reqs[rid], seq_len)


def _prefill_dropped(ps: PromptState) -> torch.Tensor:
    """bool ``[L, P]``: the prompt positions each layer dropped at prefill (not in ``keep``)."""
    dropped = torch.ones(len(ps.keep), ps.prompt_len, dtype=torch.bool)
    for li, keep in enumerate(ps.keep):
        dropped[li, keep] = False
    return dropped


class _free_group:
    """``allocator.free_group_begin/end`` around a block, unless a group is already open (SGLang's
    own release paths may run inside one): frees of the block then land in that group."""

    def __init__(self, allocator):
        self.allocator = allocator
        self.opened = False

    def __enter__(self):
        if getattr(self.allocator, "free_group", None) is None:
            self.allocator.free_group_begin()
            self.opened = True
        return self

    def __exit__(self, *exc):
        if self.opened:
            self.allocator.free_group_end()


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
