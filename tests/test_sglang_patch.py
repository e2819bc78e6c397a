"""CPU tests of the SGLang eviction patch on SGLang's real memory classes.

What runs for real: SGLang 0.5.23's ``ReqToTokenPool``, ``MHATokenToKVPool`` (``device="cpu"``),
``TokenToKVPoolAllocator`` (page size 1), ``RadixCache`` with its ``checkpoint`` (prefix insert +
de-duplication of each sample's prompt), ``Req`` objects, and our hooks on the tree
(:mod:`sglang_patch.memory_hooks`) and bookkeeping (:mod:`sglang_patch.eviction`).

What the test itself does in place of SGLang's GPU parts: the model forward. K/V and queries
come from megatron_smd's reference model run teacher-forced under the reference engine's exported
mask (the replay, exact by construction), and are written into the pool buffers at the slots the
allocator handed out (on GPU, ``set_kv_buffer`` does this with a Triton kernel). The scheduler
steps are called in SGLang's order: match (``Req.init_next_round_input``), row + slot allocation,
prefill ``checkpoint``, then per decode step slot allocation, per-layer attention, our synced
``end_decode_step``; release follows ``mem_cache/common.py::release_kv_cache`` step by step (that
function itself reads the server's published runtime config, which a CPU test does not have).

The reference: ``ReferenceEngine`` (megatron_smd) samples a GRPO group with each policy; the
SGLang-side bookkeeping, fed the same keys and queries, must export the identical ``evict`` mask
(exact integer equality), while the allocator / tree invariants hold after every step.

Install (CPU, torch untouched): see ``sglang_patch/version.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

# ``import sglang`` itself pulls triton (see sglang_patch/cpu_import.py), so look for the package
# without importing it; the fixture imports the memory modules through the import shim.
if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed: pip install --no-deps sglang==0.5.23 plus the small deps "
                "listed in sglang_patch/version.py (CPU; torch untouched)", allow_module_level=True)

from megatron_smd.model.transformer import RefTransformer, dense_allowed, masked_attention  # noqa: E402
from megatron_smd.policies import PolicyConfig  # noqa: E402
from megatron_smd.rollout.engine import ReferenceEngine, SamplingParams  # noqa: E402
from sglang_patch import memory_hooks  # noqa: E402
from sglang_patch.eviction import (  # noqa: E402
    DUMMY_SLOT, EvictionConfigError, EvictionManager, decode_mask, encode_mask,
)


@pytest.fixture(scope="module")
def sg():
    from sglang_patch.cpu_import import import_sglang_memory_modules
    from sglang_patch.version import check_sglang_version

    check_sglang_version()
    return import_sglang_memory_modules()


@pytest.fixture(scope="module")
def model64(tiny_qwen2_dir):
    return RefTransformer.from_pretrained(tiny_qwen2_dir, dtype=torch.float64)


@pytest.fixture()
def hooks(sg):
    rc = sg["sglang.srt.mem_cache.radix_cache"].RadixCache
    bpc = sg["sglang.srt.mem_cache.base_prefix_cache"].BasePrefixCache
    memory_hooks.install_memory_hooks(rc, bpc)
    yield
    memory_hooks.uninstall_memory_hooks()


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def replay_qkv(model: RefTransformer, tokens: list[int], evict: torch.Tensor):
    """Per layer q ``[T, H, d]``, k/v ``[T, H_kv, d]`` of the teacher-forced forward under ``evict``."""
    T = len(tokens)
    pos = torch.arange(T)
    cos, sin = model.rope(pos.view(1, T))
    h = model.model.embed_tokens(torch.tensor([tokens]))
    out = []
    for li, layer in enumerate(model.model.layers):
        allowed = dense_allowed(evict[None, li], pos, T)
        x = layer.input_layernorm(h)
        q, k, v = layer.self_attn.qkv(x, cos, sin)
        o = masked_attention(q, k, v, allowed)
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, T, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        out.append((q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)))
    return out


class Server:
    """SGLang's memory objects on CPU plus the scheduler steps, in SGLang's order.

    The pool is the patch's per-layer pool (``PerLayerKVPool``: ``size`` physical slots per layer)
    under its logical allocator (``PerLayerAllocator``, here with as many logical ids as physical
    slots, so the logical free list and the physical slots of every layer count alike)."""

    def __init__(self, sg, arch, policy: PolicyConfig, size: int = 400):
        from sglang_patch import kv_pool as KP

        MP = sg["sglang.srt.mem_cache.memory_pool"]
        RC = sg["sglang.srt.mem_cache.radix_cache"]
        CI = sg["sglang.srt.mem_cache.cache_init_params"]
        self.sg = sg
        self.size = size
        self.L = arch.num_layers
        self.kv = KP.PerLayerKVPool(size, 1, torch.float64, arch.num_kv_heads, arch.head_dim, self.L, "cpu", False,
                                    logical_size=size)
        self.alloc = KP.PerLayerAllocator(size, torch.float64, "cpu", self.kv, False, policy=policy)
        self.rtp = MP.ReqToTokenPool(16, 256, "cpu", False)
        self.tree = RC.RadixCache(CI.CacheInitParams(disable=False, req_to_token_pool=self.rtp,
                                                     token_to_kv_pool_allocator=self.alloc, page_size=1))
        self.mgr = EvictionManager(policy, num_layers=self.L, num_q_heads=arch.num_heads,
                                   num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                                   req_to_token_pool=self.rtp, allocator=self.alloc, kv_pool=self.kv,
                                   tree_cache=self.tree)
        memory_hooks.register_manager(self.tree, self.mgr)
        self._prefilled = []  # requests of the prefill "batch" whose results are not processed yet
        # instrumentation: catch a double free at the moment it happens (ids already free or
        # already queued in the open free group), then hand the call to the real allocator.
        self.n_freed = 0
        real_free = self.alloc.free

        def free(idx):
            ids = [int(x) for x in idx.tolist()]
            cur = set(self.alloc.free_pages.tolist())
            for pending in self.alloc.free_group or []:
                cur |= set(pending.tolist())
            assert len(set(ids)) == len(ids), f"slots freed twice in one call: {ids}"
            assert not (set(ids) & cur), f"double free of slots {sorted(set(ids) & cur)}"
            assert DUMMY_SLOT not in ids, "the dummy slot was freed"
            self.n_freed += len(ids)
            return real_free(idx)

        self.alloc.free = free

    def close(self):
        memory_hooks.unregister_manager(self.tree)

    def write_kv(self, slots: torch.Tensor, qkv, positions: range) -> None:
        """What ``set_kv_buffer`` does: each layer writes at its own physical slots."""
        for li, (_, k, v) in enumerate(qkv):
            kb, vb = self.kv.get_kv_buffer(li)
            phys = self.kv.translate(li, slots)
            kb[phys] = k[list(positions)]
            vb[phys] = v[list(positions)]

    def new_req(self, rid: str, prompt: list[int], max_new: int):
        from array import array

        SB = self.sg["sglang.srt.managers.schedule_batch"]
        SP = self.sg["sglang.srt.sampling.sampling_params"]
        return SB.Req(rid, "", array("q", prompt), SP.SamplingParams(max_new_tokens=max_new))

    def prefill(self, req, qkv) -> int:
        """Match, allocate, write K/V of the new prompt tokens, checkpoint, register. Returns n new.

        The requests prefilled before the next decode step form one prefill batch: its results
        (``after_prefill``: frees of what the groups dropped at prefill) are processed then."""
        req.init_next_round_input(self.tree)
        P = len(req.origin_input_ids)
        pre = req.prefix_len
        assert self.rtp.alloc([req]) is not None
        prefix = self.tree.prefix_device_indices(req) if pre else torch.empty(0, dtype=torch.int64)
        new = self.alloc.alloc(P - pre)
        self.rtp.write((req.kv.req_pool_idx, slice(0, P)), torch.cat([prefix, new]).to(torch.int32))
        self.write_kv(new, qkv, range(pre, P))
        req.kv.kv_allocated_len = req.kv.kv_committed_len = P
        self.tree.checkpoint(req, up_to=P)
        self.mgr.start_request(req, [q[pre:P] for q, _, _ in qkv])
        self._prefilled.append(req)
        return P - pre

    def end_prefill_batch(self) -> None:
        if self._prefilled:
            self.mgr.after_prefill(self._prefilled)
            self._prefilled = []

    def decode(self, reqs, qkvs, tokens_next) -> None:
        """One decode step: each req feeds the token at its next position through every layer."""
        self.end_prefill_batch()
        slots = []
        for req, qkv in zip(reqs, qkvs):
            i = req.kv.kv_allocated_len
            slot = self.alloc.alloc(1)
            self.rtp.write((req.kv.req_pool_idx, slice(i, i + 1)), slot.to(torch.int32))
            self.write_kv(slot, qkv, range(i, i + 1))
            req.kv.kv_allocated_len = req.kv.kv_committed_len = i + 1
            slots.append(slot)
        step = self.mgr.begin_decode([r.rid for r in reqs], [r.kv.req_pool_idx for r in reqs],
                                     [r.kv.kv_allocated_len for r in reqs])
        for li in range(self.L):
            phys, n_live = self.mgr.layer_tables(step, li)
            for b, slot in enumerate(slots):  # the new token attends itself, last
                assert int(phys[b, int(n_live[b]) - 1]) == int(self.kv.translate(li, slot)[0])
            q = torch.stack([qkv[li][0][r.kv.kv_allocated_len - 1] for r, qkv in zip(reqs, qkvs)])
            # the batched decode attention over each request's live slots == attention over its live keys
            out = torch.empty_like(q)
            self.mgr.attend(step, li, q, out, scaling=q.shape[-1] ** -0.5)
            for b, (r, qkv) in enumerate(zip(reqs, qkvs)):
                pos = self.mgr.live_positions(r.rid, li).tolist() + [r.kv.kv_allocated_len - 1]
                k, v = qkv[li][1][pos], qkv[li][2][pos]  # [C, H_kv, d]
                g = q.shape[1] // k.shape[1]
                kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
                w = torch.softmax(torch.einsum("hd,chd->hc", q[b], kk) / q.shape[-1] ** 0.5, dim=-1)
                torch.testing.assert_close(out[b], torch.einsum("hc,chd->hd", w, vv), atol=1e-5, rtol=1e-5)
            step.probs = None  # score in the pool's dtype (fp64 here), exactly as the reference engine
            self.mgr.layer_update(step, li, q.reshape(len(reqs), -1))
        self.mgr.end_decode_step()
        for req, t in zip(reqs, tokens_next):
            req.output_ids.append(t)

    def release(self, req, *, finished: bool = True) -> dict:
        """``release_kv_cache(req, tree, checkpoint=finished)``, step by step (see module docstring).

        ``finished``: the request finished (SGLang sets ``finished_reason`` first); otherwise this
        is a retraction's release of a running request, without a checkpoint."""
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH

        self.end_prefill_batch()
        if finished:
            req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        owned = req.kv.kv_committed_len
        if finished:
            self.tree.checkpoint(req, up_to=owned)
        self.tree.free_kv_row(req.kv, [(req.kv.cache_protected_len, owned)])
        self.tree.unlock(req.lock)
        req.lock = None
        self.tree.on_release(req, checkpointed=finished)
        self.rtp.free(req)
        req.kv.mark_kv_released()
        return self.mgr.pop_export(req.rid)

    # -------------------------------------------------------------- invariants
    def check(self, live_reqs) -> None:
        free = self.alloc.free_pages
        assert torch.unique(free).numel() == free.numel(), "a slot is in the free list twice"
        assert DUMMY_SLOT not in set(free.tolist())
        fset = set(free.tolist())
        tree_slots = set(self.tree.all_values_flatten().tolist()) if self.tree.total_size() else set()
        assert not (fset & tree_slots), "a tree-owned slot was freed"
        held = set()
        kept = [set() for _ in range(self.L)]  # tokens some request keeps, per layer
        for req in live_reqs:
            st = self.mgr.state(req.rid)
            for li in range(self.L):
                pos = self.mgr.live_positions(req.rid, li)
                toks = self.rtp.req_to_token[st.row, pos].to(torch.int64)
                assert not (set(toks.tolist()) & fset), f"{req.rid} layer {li} attends a freed token"
                assert bool((self.kv.translate(li, toks) != 0).all()), f"{req.rid} layer {li} attends a freed slot"
                kept[li] |= set(toks.tolist())
            n = req.kv.kv_allocated_len
            P = st.prompt_len
            row = self.rtp.req_to_token[st.row, :n].to(torch.int64)
            fr = torch.from_numpy(st.freed[P:n])
            priv = row[P:][~fr]
            held |= set(priv.tolist())
            assert bool((row[P:][fr] == DUMMY_SLOT).all())
        owned = set()
        for g in {id(s.group): s.group for s in (self.mgr.state(r.rid) for r in live_reqs)}.values():
            a = g.protected
            owned |= set(g.slots[a:][~g.logical_freed[a:]].tolist())
        assert not (held & fset) and not (owned & fset) and not (held & tree_slots) and not (owned & tree_slots)
        # conservation: every slot is exactly one of free / tree / private / group-owned
        assert len(fset) + len(tree_slots) + len(held) + len(owned) == self.size
        # per layer: a layer stores exactly the tree's tokens and the tokens some request keeps in it
        assert self.kv.check_consistent() == []
        for li in range(self.L):
            stored = set(torch.nonzero(self.kv.l2p[li]).flatten().tolist())
            assert stored == tree_slots | kept[li], (li, sorted(stored ^ (tree_slots | kept[li]))[:10])


def run_reference(model, policy: PolicyConfig, prompt, n, max_new, seed=0):
    eng = ReferenceEngine(model, policy)
    trajs, _ = eng.generate([prompt], n=n, sampling=SamplingParams(max_new_tokens=max_new, temperature=1.0,
                                                                   seed=seed))
    return trajs


def run_group(sg, model, policy: PolicyConfig, prompt, trajs, *, check_every_step=True):
    """Drive one GRPO group through the patched bookkeeping; returns (server, exports, reqs)."""
    srv = Server(sg, model.arch, policy)
    P = len(prompt)
    qkvs = [replay_qkv(model, t.tokens, t.evict) for t in trajs]
    reqs = [srv.new_req(f"s{k}", prompt, len(t.tokens) - P) for k, t in enumerate(trajs)]
    news = [srv.prefill(r, qkv) for r, qkv in zip(reqs, qkvs)]
    assert news[0] == P and all(x == 1 for x in news[1:])  # later samples re-extend one token
    slots0 = srv.rtp.req_to_token[reqs[0].kv.req_pool_idx, :P]
    for r in reqs[1:]:  # the prompt is one set of tree-owned slots
        assert torch.equal(srv.rtp.req_to_token[r.kv.req_pool_idx, :P], slots0)
    for r, t in zip(reqs, trajs):
        r.output_ids.append(t.tokens[P])
    srv.check(reqs)
    exports = {}
    live = list(zip(reqs, qkvs, trajs))
    while live:
        step = [(r, q, t) for r, q, t in live if r.kv.kv_allocated_len < len(t.tokens) - 1]
        for r, q, t in live:
            if (r, q, t) not in step:  # its last sampled token is never fed: finished
                exports[r.rid] = srv.release(r)
        live = step
        if not live:
            break
        srv.decode([r for r, _, _ in live], [q for _, q, _ in live],
                   [t.tokens[r.kv.kv_allocated_len + 1] for r, _, t in live])
        if check_every_step:
            srv.check([r for r, _, _ in live])
    return srv, exports, reqs


POLICIES = {
    "streaming": PolicyConfig(name="streaming", budget=16, sinks=4),
    "h2o": PolicyConfig(name="h2o", budget=16, window=4),
    "snapkv": PolicyConfig(name="snapkv", budget=14, window=4, pool_kernel=3),
    "rkv": PolicyConfig(name="rkv", budget=12, window=4, buffer=4, pool_kernel=3),
}


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_group_masks_equal_reference_and_memory_is_returned(sg, model64, hooks, name):
    policy = POLICIES[name]
    prompt = [5 + (7 * i) % 40 for i in range(24)]
    n, max_new = 3, 22
    trajs = run_reference(model64, policy, prompt, n, max_new, seed=3)
    srv, exports, reqs = run_group(sg, model64, policy, prompt, trajs)
    try:
        # 1. masks: exact equality with the reference engine's
        for k, t in enumerate(trajs):
            ex = exports[f"s{k}"]
            got = decode_mask(ex["evict"])
            assert got.shape == t.evict.shape
            assert torch.equal(got, t.evict), f"{name} sample {k}: mask differs at " \
                f"{(got != t.evict).nonzero()[:5].tolist()}"
            assert ex["prompt_state"] == "shared" and ex["replayable"]
        assert len(srv.mgr._prompt_cache) == 1  # prefill state computed once for the group
        # 2. memory: the tree still holds the (possibly detached-to-p) prompt prefix, intact. The
        # group detaches at the first position some layer dropped everywhere: streaming keeps its
        # sinks in every layer (a prefix stays); the per-layer policies may drop position 0 in some
        # layer, and then the whole prompt leaves the tree (each layer frees what it dropped).
        st = srv.mgr.stats
        print(f"{name}: {st}, freed {srv.n_freed} slots")
        _check_prefix_intact(srv, prompt, replay_qkv(model64, trajs[0].tokens, trajs[0].evict),
                             expect_len=None, min_len=1 if name == "streaming" else 0)
        # 3. everything the group held is back: free + tree == pool, then the tree empties fully
        assert srv.alloc.available_size() + srv.tree.total_size() == srv.size
        assert srv.tree.protected_size() == 0
        EP = sg["sglang.srt.mem_cache.base_prefix_cache"].EvictParams
        srv.tree.evict(EP(num_tokens=srv.size))
        assert srv.alloc.available_size() == srv.size
        assert torch.unique(srv.alloc.free_pages).numel() == srv.size
        if name == "streaming":  # same positions in every layer and sample: real frees
            assert st["private_slots_freed"] > 0 and st["detaches"] >= 1 and st["prompt_slots_freed"] > 0
    finally:
        srv.close()


def _check_prefix_intact(srv, prompt, qkv, expect_len=None, min_len=1) -> int:
    """The tree matches the prompt's prefix and its slots still hold the prompt's keys."""
    from array import array

    RC = srv.sg["sglang.srt.mem_cache.radix_cache"]
    BP = srv.sg["sglang.srt.mem_cache.base_prefix_cache"]
    m = srv.tree.match_prefix(BP.MatchPrefixParams(key=RC.RadixKey(array("q", prompt))))
    n = m.device_prefix_len
    if expect_len is not None:
        assert n == expect_len
    assert n >= min_len
    slots = srv.tree.path_device_indices(m.last_device_node)[:n]
    for li, (_, k, v) in enumerate(qkv):
        kb, vb = srv.kv.get_kv_buffer(li)
        phys = srv.kv.translate(li, slots)  # each layer's physical slots of the prefix tokens
        assert torch.equal(kb[phys], k[:n]) and torch.equal(vb[phys], v[:n])
    return n


def test_streaming_group_detaches_prompt_and_latecomers_match_the_prefix(sg, model64, hooks):
    """Streaming drops prompt positions [4, 12) in every layer of every sample at prefill and 12 at
    the first step: the group detaches [4, P) from the tree and frees [4, 13); a later request
    matches [0, 4) only."""
    policy = POLICIES["streaming"]
    prompt = [5 + (7 * i) % 40 for i in range(24)]
    trajs = run_reference(model64, policy, prompt, 2, 6, seed=1)
    srv = Server(sg, model64.arch, policy)
    try:
        qkvs = [replay_qkv(model64, t.tokens, t.evict) for t in trajs]
        reqs = [srv.new_req(f"s{k}", prompt, 6) for k in range(2)]
        for r, q in zip(reqs, qkvs):
            srv.prefill(r, q)
        before = srv.alloc.available_size()
        srv.decode(reqs, qkvs, [t.tokens[25] for t in trajs])
        srv.check(reqs)
        g = srv.mgr.state("s0").group
        assert g.protected == 4 and all(r.kv.cache_protected_len == 4 for r in reqs)
        # prefill dropped [4, 12) (budget 16 of 24), the first decode step (17 > 16 live) dropped 12,
        # in both samples and every layer: 9 prompt slots back, no private slot yet
        assert srv.mgr.stats["prompt_slots_freed"] == 9 and srv.mgr.stats["private_slots_freed"] == 0
        assert srv.alloc.available_size() == before - 2 + 9  # 2 decode slots taken, 9 prompt freed
        _check_prefix_intact(srv, prompt, qkvs[0], expect_len=4)
        late = srv.new_req("late", prompt, 2)
        late.init_next_round_input(srv.tree)
        assert late.prefix_len == 4
    finally:
        srv.close()


def test_foreign_sharer_keeps_prompt_in_tree(sg, model64, hooks):
    """A request outside the group that holds the prompt's tree lock (here: an unmanaged one)
    forbids the detach: prompt eviction stays a mask, the tree keeps the whole prompt."""
    policy = POLICIES["streaming"]
    prompt = [3 + (5 * i) % 31 for i in range(24)]
    trajs = run_reference(model64, policy, prompt, 2, 5, seed=2)
    srv = Server(sg, model64.arch, policy)
    try:
        qkvs = [replay_qkv(model64, t.tokens, t.evict) for t in trajs]
        reqs = [srv.new_req(f"s{k}", prompt, 5) for k in range(2)]
        for r, q in zip(reqs, qkvs):
            srv.prefill(r, q)
        foreign = srv.new_req("foreign", prompt, 1)
        foreign.init_next_round_input(srv.tree)
        srv.rtp.alloc([foreign])
        pre = srv.tree.prefix_device_indices(foreign)
        new = srv.alloc.alloc(1)
        srv.rtp.write((foreign.kv.req_pool_idx, slice(0, 24)), torch.cat([pre, new]).to(torch.int32))
        srv.write_kv(new, qkvs[0], range(23, 24))
        foreign.kv.kv_allocated_len = foreign.kv.kv_committed_len = 24
        srv.tree.checkpoint(foreign, up_to=24)  # holds the prompt node's lock; not managed
        for step in range(3):
            srv.decode(reqs, qkvs, [t.tokens[25 + step] for t in trajs])
        assert srv.mgr.stats["detaches"] == 0 and srv.mgr.stats["prompt_slots_freed"] == 0
        _check_prefix_intact(srv, prompt, qkvs[0], expect_len=24)
        ev = srv.mgr.evict_tensor("s0", 27)
        # the mask still records the prompt evictions: [4, 12) at prefill, 12, 13, 14 by steps 24-26
        assert bool((ev[:, 4:12] == 24).all()) and ev[:, 12:15].tolist() == [[25, 26, 27]] * srv.L
        # the foreign request releases through the unhooked path (it is not managed)
        srv.tree.checkpoint(foreign, up_to=24)
        srv.tree.free_kv_row(foreign.kv, [(foreign.kv.cache_protected_len, 24)])
        srv.tree.unlock(foreign.lock)
        srv.rtp.free(foreign)
    finally:
        srv.close()


def test_per_layer_pool_stores_each_layer_separately(sg):
    """``PerLayerKVPool`` + ``PerLayerAllocator``: a logical id takes a slot in every layer, a layer
    frees its own slot of a token, freeing the id frees what is left; writes and reads translate."""
    from types import SimpleNamespace

    from sglang_patch.kv_pool import PerLayerAllocator, PerLayerKVPool

    L, S = 3, 8
    kv = PerLayerKVPool(S, 1, torch.float32, 2, 4, L, "cpu", False, logical_size=L * S)
    alloc = PerLayerAllocator(L * S, torch.float32, "cpu", kv, False, policy=POLICIES["h2o"])
    ids = alloc.alloc(5)
    assert alloc.available_size() == 3 and kv.n_free.tolist() == [3, 3, 3] and kv.check_consistent() == []
    for li in range(L):  # set_kv_buffer with logical ids writes each layer's own slots
        kv.set_kv_buffer(SimpleNamespace(layer_id=li), ids, torch.full((5, 2, 4), float(li + 1)),
                         torch.full((5, 2, 4), -float(li + 1)))
        assert bool((kv.get_key_buffer(li)[kv.translate(li, ids)] == li + 1).all())
    kv.free_physical(np.array([1, 1]), ids[:2].numpy())  # layer 1 evicted two tokens
    assert kv.n_free.tolist() == [3, 5, 3] and alloc.available_size() == 3
    assert kv.translate(1, ids[:2]).tolist() == [0, 0] and bool((kv.translate(0, ids[:2]) != 0).all())
    with pytest.raises(RuntimeError, match="double free"):
        kv.free_physical(np.array([1]), ids[:1].numpy())
    alloc.free(ids[:3])  # the ids: whatever layers still hold them
    assert kv.n_free.tolist() == [6, 6, 6] and kv.check_consistent() == []
    assert alloc.alloc(7) is None  # 6 free in every layer
    alloc.free(ids[3:])
    assert kv.n_free.tolist() == [S] * L and alloc.available_size() == S
    assert alloc.logical_available() == L * S and kv.check_consistent() == []


def test_admission_reserves_what_the_policy_holds(sg):
    """The per-layer allocator's prefill budget charges a new request its peak under its policy
    (``kv_budget.admission_tokens``), not prompt + ``max_new_tokens``: a 200-token generation of a
    24-token prompt under H2O at budget 16 is admitted into a 100-slot pool and charged its peak,
    the dense prefill (24, +1 page); a GRPO sample re-extending one token of a cached prompt is
    charged 1 + 17 (its generated tokens alive at once); SGLang's dense budget refuses the first."""
    from megatron_smd import kv_budget
    from sglang_patch.kv_pool import PerLayerAllocator, PerLayerKVPool

    AL = sg["sglang.srt.mem_cache.allocator"]
    MP = sg["sglang.srt.mem_cache.memory_pool"]
    RC = sg["sglang.srt.mem_cache.radix_cache"]
    CI = sg["sglang.srt.mem_cache.cache_init_params"]
    L, S, P, N = 4, 100, 24, 200
    pol = POLICIES["h2o"]
    kv = PerLayerKVPool(S, 1, torch.float32, 2, 8, L, "cpu", False, logical_size=L * S)
    alloc = PerLayerAllocator(L * S, torch.float32, "cpu", kv, False, policy=pol)
    rtp = MP.ReqToTokenPool(4, 512, "cpu", False)
    tree = RC.RadixCache(CI.CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=alloc,
                                            page_size=1))
    kw = dict(extend_input_len=P, total_tokens=P + N + 1, max_new_tokens=N, input_tokens=P, swa_host_hit_length=0,
              chunk_limit=None)
    budget = alloc.create_prefill_budget(tree)
    assert budget.check_prefill(**kw)[0]
    budget.reserve(P, N)
    assert kv_budget.admission_tokens(pol, P, N, P) == kv_budget.request_peak_tokens(pol, P, N) == P
    assert budget.remaining_total == S - (P + 1)
    sample = dict(kw, extend_input_len=1, total_tokens=1 + N + 1)
    assert budget.check_prefill(**sample)[0]
    budget.reserve(1, N)
    assert budget.remaining_total == S - (P + 1) - (1 + 1 + 17)
    dense_kv = MP.MHATokenToKVPool(S, 1, torch.float32, 2, 8, L, "cpu", False, enable_alt_stream=False)
    dense = AL.TokenToKVPoolAllocator(S, torch.float32, "cpu", dense_kv, False)
    assert not dense.create_prefill_budget(tree).check_prefill(**kw)[0]
    # and SGLang's request validation does not cut the generation to the pool size
    assert alloc.max_new_tokens_for_memory(P, N, token_capacity=S, sliding_window_size=None, chunk_size=None) == N
    assert dense.max_new_tokens_for_memory(P, N, token_capacity=S, sliding_window_size=None, chunk_size=None) < N


def test_grpo_prompt_stored_once_per_layer_and_dropped_per_layer(sg, model64, hooks):
    """After a group's prefill every layer stores the prompt once (not once per sample); once the
    prefill batch is processed each layer keeps only the prompt tokens some sample keeps in it."""
    policy = POLICIES["h2o"]
    prompt = [5 + (7 * i) % 40 for i in range(24)]
    trajs = run_reference(model64, policy, prompt, 3, 4, seed=4)
    srv = Server(sg, model64.arch, policy)
    try:
        qkvs = [replay_qkv(model64, t.tokens, t.evict) for t in trajs]
        reqs = [srv.new_req(f"s{k}", prompt, 4) for k in range(3)]
        for r, q in zip(reqs, qkvs):
            srv.prefill(r, q)
        assert srv.kv.used_per_layer().tolist() == [24] * srv.L
        srv.end_prefill_batch()
        g = srv.mgr.state("s0").group
        kept = (g.keep_count > 0).sum(axis=1)  # prompt tokens some sample keeps, per layer
        assert srv.kv.used_per_layer().tolist() == kept.tolist() == [policy.budget] * srv.L
        srv.check(reqs)
    finally:
        srv.close()


def test_mask_codec_roundtrip_and_errors():
    from megatron_smd.errors import FormatError

    ev = torch.tensor([[3, 3, 2], [1, 3, 3]], dtype=torch.int32)
    obj = encode_mask(ev)
    assert obj["shape"] == [2, 3] and torch.equal(decode_mask(obj), ev)
    with pytest.raises(FormatError, match="smd_evict"):
        decode_mask({"b64": obj["b64"], "shape": [2, 4], "dtype": "int32"})
    with pytest.raises(FormatError, match="smd_evict"):
        decode_mask({"b64": "!!", "shape": [2, 3]})


def test_refuses_paged_allocator_and_per_head_policy(sg):
    MP = sg["sglang.srt.mem_cache.memory_pool"]
    AL = sg["sglang.srt.mem_cache.allocator"]
    RC = sg["sglang.srt.mem_cache.radix_cache"]
    CI = sg["sglang.srt.mem_cache.cache_init_params"]
    kv = MP.MHATokenToKVPool(64, 4, torch.float32, 2, 8, 2, "cpu", False, enable_alt_stream=False)
    paged = AL.PagedTokenToKVPoolAllocator(64, 4, torch.float32, "cpu", kv, False)
    rtp = MP.ReqToTokenPool(4, 64, "cpu", False)
    tree = RC.RadixCache(CI.CacheInitParams(disable=False, req_to_token_pool=rtp,
                                            token_to_kv_pool_allocator=paged, page_size=4))
    kw = dict(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8, req_to_token_pool=rtp,
              kv_pool=kv, tree_cache=tree)
    with pytest.raises(EvictionConfigError, match="--page-size 1"):
        EvictionManager(POLICIES["h2o"], allocator=paged, **kw)
    alloc = AL.TokenToKVPoolAllocator(64, torch.float32, "cpu", kv, False)
    with pytest.raises(EvictionConfigError, match="granularity"):
        EvictionManager(PolicyConfig(name="h2o", budget=16, window=4, granularity="head"), allocator=alloc, **kw)


# ----------------------------------------------------------------------------------------------
# launcher, version pin, patch targets, client (no SGLang process needed)
# ----------------------------------------------------------------------------------------------

GOOD = ["--model-path", "m", "--attention-backend", "triton", "--page-size", "1",
        "--disable-overlap-schedule", "--disable-decode-cuda-graph", "--smd-policy", "h2o",
        "--smd-budget", "64", "--smd-window", "8"]


def test_launcher_accepts_supported_settings_and_passes_the_rest_through():
    from sglang_patch.launch_server import parse_args

    policy, rest = parse_args(GOOD + ["--port", "30001"], env={})
    assert (policy.name, policy.budget, policy.window) == ("h2o", 64, 8)
    # SGLang's flags unchanged, in order, plus the patch's own radix-cache backend
    assert rest == GOOD[:-6] + ["--port", "30001", "--radix-cache-backend", "smd"]


def test_launcher_fills_in_the_cpu_settings_and_keeps_the_users_own():
    from sglang_patch.launch_server import CPU_MAX_TOTAL_TOKENS, parse_args

    _, rest = parse_args(["--model-path", "m", "--device", "cpu", "--smd-policy", "streaming", "--smd-budget", "32"],
                         env={})
    flags = dict(zip(rest, rest[1:]))
    assert flags["--attention-backend"] == "torch_native" and flags["--page-size"] == "1"
    assert flags["--cuda-graph-backend-decode"] == "disabled" and flags["--dtype"] == "float32"
    assert flags["--max-total-tokens"] == str(CPU_MAX_TOTAL_TOKENS) and "--disable-overlap-schedule" in rest
    assert flags["--radix-cache-backend"] == "smd" and "--sleep-on-idle" in rest  # an idle server must not spin
    _, rest = parse_args(["--model-path", "m", "--device", "cpu", "--max-total-tokens", "4096", "--dtype", "bfloat16",
                          "--smd-policy", "none"], env={})
    assert rest.count("--max-total-tokens") == 1 and rest[rest.index("--max-total-tokens") + 1] == "4096"
    assert rest.count("--dtype") == 1 and rest[rest.index("--dtype") + 1] == "bfloat16"


def test_failing_patch_stops_the_process_instead_of_running_dense(monkeypatch):
    """SGLang's plugin loader swallows every Exception; the entry point turns a failure into an exit."""
    from sglang_patch import patch

    def boom():
        raise RuntimeError("target moved")

    monkeypatch.setattr(patch, "apply", boom)
    with pytest.raises(SystemExit, match="target moved"):
        try:
            patch.plugin_entry()
        except Exception:  # what SGLang's loader catches: must not catch this
            pytest.fail("plugin_entry raised an Exception the plugin loader would swallow")


@pytest.mark.parametrize("change, message", [
    ({"--attention-backend": "fa3"}, "--attention-backend fa3 is not supported"),
    ({"--attention-backend": "flashinfer"}, "--attention-backend flashinfer is not supported"),
    ({"--attention-backend": None}, "--attention-backend must be given explicitly"),
    ({"--page-size": "16"}, "--page-size must be 1"),
    ({"--disable-overlap-schedule": None}, "--disable-overlap-schedule is required"),
    ({"--disable-decode-cuda-graph": None}, "CUDA graph decode is not supported"),
    ({"--smd-budget": "8"}, "window must be < budget"),
    ({"--smd-granularity": "head"}, "granularity='head' is not supported"),
    ({"--tp-size": "2"}, "--tp-size 2 is not supported"),
    ({"--disable-radix-cache": ""}, "--disable-radix-cache is not supported"),
    ({"--radix-cache-backend": "flexkv"}, "--radix-cache-backend flexkv is not supported"),
    ({"--enable-mixed-chunk": ""}, "--enable-mixed-chunk is not supported"),
    ({"--enable-deterministic-inference": ""}, "--enable-deterministic-inference is not supported"),
    ({"--decode-attention-backend": "flashinfer"}, "--decode-attention-backend flashinfer is not supported"),
])
def test_launcher_refuses_unsupported_settings(change, message):
    from sglang_patch.launch_server import parse_args

    argv = list(GOOD)
    for flag, val in change.items():
        if flag in argv:
            i = argv.index(flag)
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            del argv[i: i + (2 if takes_value else 1)]
        if val is not None:
            argv += [flag] + ([val] if val else [])
    with pytest.raises(EvictionConfigError, match=__import__("re").escape(message)):
        parse_args(argv, env={})


def test_launcher_refuses_original_logprob_env_and_reports_every_problem():
    from sglang_patch.launch_server import parse_args

    with pytest.raises(EvictionConfigError) as e:
        parse_args(["--smd-policy", "streaming", "--smd-budget", "32", "--page-size", "4"],
                   env={"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"})
    msg = str(e.value)
    for part in ("--page-size must be 1", "--disable-overlap-schedule", "CUDA graph",
                 "--attention-backend must be given", "SGLANG_RETURN_ORIGINAL_LOGPROB"):
        assert part in msg


def test_launcher_main_exits_2_with_the_reason(capsys):
    from sglang_patch.launch_server import main

    assert main(GOOD[:-6] + ["--smd-policy", "h2o"]) == 2  # budget missing
    assert "budget is required" in capsys.readouterr().err


def test_version_pin_is_loud():
    from sglang_patch.version import SGLANG_VERSION, SGLangVersionError, check_sglang_version

    assert check_sglang_version(SGLANG_VERSION) == SGLANG_VERSION
    with pytest.raises(SGLangVersionError, match="0.5.5.*targets sglang==0.5.23"):
        check_sglang_version("0.5.5")
    assert check_sglang_version() == "0.5.23"  # the installed one


def test_patch_targets_exist_in_installed_sglang():
    from sglang_patch.patch import TARGETS, verify_targets

    assert len(TARGETS) >= 10 and verify_targets() == []


def test_client_converts_server_output_to_reference_trajectories(model64):
    """A loopback HTTP server answers /generate in SGLang's format with a reference engine's group;
    the client must return the very same trajectories (tokens, log-probs, masks)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from megatron_smd.rollout.io import RolloutBatch
    from megatron_smd.rollout.sglang_client import SGLangClient

    policy = POLICIES["h2o"]
    prompts = [[5 + (3 * i) % 20 for i in range(20)], [7 + (5 * i) % 30 for i in range(18)]]
    ref = {tuple(p): run_reference(model64, policy, p, 2, 10, seed=k) for k, p in enumerate(prompts)}
    seen = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            out = []
            for t in ref[tuple(body["input_ids"])]:
                P = t.prompt_len
                out.append({"output_ids": t.tokens[P:], "meta_info": {
                    "finish_reason": {"type": "length", "length": len(t.tokens) - P},
                    "output_token_logprobs": [[float(t.sampler_logprobs[j]), t.tokens[j], None]
                                              for j in range(P, len(t.tokens))],
                    "smd_evict": [{"evict": encode_mask(t.evict), "replayable": True}]}})
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        client = SGLangClient([url, url], num_layers=model64.arch.num_layers, timeout_s=30)
        trajs, stats = client.generate(prompts, n=2, sampling=SamplingParams(max_new_tokens=10, seed=4))
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(b["return_logprob"] and b["sampling_params"]["n"] == 2 for b in seen)
    expected = [t for p in prompts for t in ref[tuple(p)]]
    assert len(trajs) == 4 and stats.generated_tokens == 40
    for k, (got, exp) in enumerate(zip(trajs, expected)):
        assert got.tokens == exp.tokens and got.prompt_len == exp.prompt_len
        assert (got.prompt_index, got.sample_index) == (k // 2, k % 2)
        assert torch.equal(got.evict, exp.evict)
        assert torch.allclose(got.sampler_logprobs, exp.sampler_logprobs, atol=1e-6, rtol=0)
    batch = RolloutBatch.from_trajectories(trajs, {"num_layers": model64.arch.num_layers})
    assert batch.evict.shape == (4, model64.arch.num_layers, 30)


def test_client_rejects_unpatched_server_output():
    from megatron_smd.errors import FormatError
    from megatron_smd.rollout.sglang_client import SGLangClient

    c = SGLangClient(["http://127.0.0.1:9"], num_layers=2)
    item = {"output_ids": [4], "meta_info": {"output_token_logprobs": [[-1.0, 4, None]],
                                             "finish_reason": {"type": "length"}}}
    with pytest.raises(FormatError, match="sglang_patch.launch_server"):
        c.to_trajectory([1, 2], item, 0, 0)
    item["meta_info"]["smd_evict"] = [{"evict": encode_mask(torch.full((2, 3), 4, dtype=torch.int32)),
                                       "replayable": True}]
    with pytest.raises(Exception, match="past the end"):
        c.to_trajectory([1, 2], item, 0, 0)


def test_release_before_finishing_exports_no_mask_and_frees_exactly(sg, model64, hooks):
    """SGLang's retraction releases a running request (``release_kv_cache(checkpoint=False)``)
    and later re-prefills it densely: its export must be marked not replayable, with no mask
    (never a stale one), its slots freed exactly once, and the other sample unaffected."""
    policy = POLICIES["h2o"]
    prompt = [5 + (7 * i) % 40 for i in range(24)]
    trajs = run_reference(model64, policy, prompt, 2, 12, seed=5)
    srv = Server(sg, model64.arch, policy)
    try:
        P = len(prompt)
        qkvs = [replay_qkv(model64, t.tokens, t.evict) for t in trajs]
        reqs = [srv.new_req(f"s{k}", prompt, len(t.tokens) - P) for k, t in enumerate(trajs)]
        for r, q in zip(reqs, qkvs):
            srv.prefill(r, q)
        for r, t in zip(reqs, trajs):
            r.output_ids.append(t.tokens[P])
        for _ in range(4):  # a few decode steps under eviction, both samples
            srv.decode(reqs, qkvs, [t.tokens[r.kv.kv_allocated_len + 1] for r, t in zip(reqs, trajs)])
        r0 = reqs[0]
        assert not r0.finished() and srv.mgr.is_managed(r0)
        ex = srv.release(r0, finished=False)
        assert ex["evict"] is None and ex["replayable"] is False
        assert "before finishing" in ex["not_replayable_reason"]
        assert not srv.mgr.is_managed(r0) and srv.mgr.pop_export(r0.rid) is None
        srv.check([reqs[1]])  # no double free, the survivor's slots intact
        ex1 = srv.release(reqs[1])
        assert ex1["replayable"] and decode_mask(ex1["evict"]).shape[0] == model64.arch.num_layers
        assert srv.alloc.available_size() + srv.tree.total_size() == srv.size
        assert srv.mgr.counts()["managed_requests"] == 0 and srv.mgr.counts()["pending_exports"] == 0
    finally:
        srv.close()
