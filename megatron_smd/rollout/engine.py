"""The reference rollout engine: pure torch, physical KV eviction, shadow-mask export.

How it runs (one call of :meth:`ReferenceEngine.generate`):

1. **Prefill once per prompt.** Each distinct prompt is prefilled densely (causal) in one pass; its
   per-layer K/V (RoPE applied at original positions), the H2O attention sums and the last
   ``obs_window`` queries are kept. If the policy compresses after prefill (SnapKV, or any policy
   whose budget is smaller than the prompt), each layer's cache is cut to the budget here and the
   dropped prompt keys get ``evict = P`` (the prompt itself was prefilled densely).
2. **GRPO groups share that prefill.** The prompt's cache is copied into ``n`` rows, one per
   sample; they diverge from the first sampled token on.
3. **Decode in lock step.** All live rows decode one token per step. A row's new K/V is appended to
   its own compacted cache; attention runs over the slots the row still holds. After the step, each
   layer asks the policy whether to compress (per row); evicted slots are removed from the cache
   tensors (compaction), and ``evict[l, (h,) j] = i + 1`` where ``i`` is the position of the query
   that just ran: it was the last query to see key ``j``.
4. **Finished rows leave the batch** (EOS, a stop token, or ``max_new_tokens``): their cache rows
   are dropped at once.

**FP8 KV cache** (``kv_cache=``, a :class:`~megatron_smd.quant.cache.RolloutKV`; ``rollout.kv_cache_dtype``
and ``rollout.kv_scales``): every layer's K and V are stored as FP8 bytes (``uint8`` tensors
holding ``float8_e4m3fn`` / ``float8_e5m2`` values, as SGLang's ``MHATokenToKVPool`` does), written
the way SGLang 0.5.23 stores them (divide by the layer's scale in the compute dtype, then cast;
:func:`~megatron_smd.quant.kv.quantize_kv`) and read back as ``fp8 * scale`` in the compute dtype
(:func:`~megatron_smd.quant.kv.dequantize_kv`; exact for the power-of-two scales calibration
writes, where it equals SGLang's kernels that fold the scale into the softmax scale and the
output). Attention always reads the cache after storing, prefill included: every key and value a
query sees is the rounded one (SGLang's ``torch_native`` read path; its Triton extend kernel
instead attends to the chunk's own unrounded K/V and rounds ``q`` and the softmax weights to FP8
on GQA decode, which this engine does not model). The eviction policies score the rounded keys
too. The reported KV bytes are those of the FP8 tensors: half of bf16, a quarter of fp32. Every
trajectory carries the engine's :class:`~megatron_smd.quant.cache.RolloutKV` (``kv_cache``), which
the rollout directory keeps in ``meta.json`` and the learner replays.

Memory is accounted from the cache tensors actually allocated (``K`` and ``V`` of every layer,
``[B, H_kv, capacity, head_dim]``), sampled after every change; capacity grows in
``kv_growth``-token steps and shrinks back after compaction, so the reported peak is what the
engine really held, padding included.

Log-probs: ``sampler_logprobs[t]`` is ``log softmax(logits_{t-1} / temperature)[tokens[t]]``: the
temperature-scaled full-vocabulary distribution, *before* top-k / top-p truncation (the learner
divides its logits by the same temperature; truncation is a sampling device, not part of the policy
being optimised). With ``temperature == 0`` (greedy) it is the plain ``log softmax(logits)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..mask import EVICT_DTYPE
from ..model.transformer import RefTransformer, masked_attention
from ..policies import EvictionPolicy, PolicyConfig, make_policy
from ..quant.cache import RolloutKV, load_rollout_kv
from ..quant.kv import KVQuantConfig, dequantize_kv, quantize_kv


@dataclass
class SamplingParams:
    """How tokens are drawn. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0


@dataclass
class Trajectory:
    """One sampled sequence. ``tokens[:prompt_len]`` is the prompt."""

    tokens: list[int]
    prompt_len: int
    sampler_logprobs: torch.Tensor  # [T] float32, 0 on prompt positions
    evict: torch.Tensor  # [L, T] or [L, H_kv, T] int32, relative to the sequence start
    prompt_index: int
    sample_index: int
    finish_reason: str  # "stop" | "length"
    kv_cache: RolloutKV | None = None  # the FP8 KV cache it was sampled with (None: the model dtype)

    @property
    def seq_len(self) -> int:
        return len(self.tokens)


@dataclass
class RolloutStats:
    peak_kv_bytes: int = 0  # allocated K/V tensors, padding included
    peak_kv_bytes_used: int = 0  # live slots only
    generated_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    evictions: int = 0  # number of (row, layer) compressions

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"peak_kv_bytes": self.peak_kv_bytes, "peak_kv_bytes_used": self.peak_kv_bytes_used,
                "generated_tokens": self.generated_tokens, "tokens_per_s": self.tokens_per_s,
                "seconds": self.seconds, "evictions": self.evictions}


@dataclass
class _LayerCache:
    """Compacted cache of one layer for the live rows.

    k, v: [B, H_kv, cap, hd]; pos: [B, H_kv, cap] int64 (-1 = empty); acc: [B, H_kv, cap] (H2O).
    Slots ``[:length[b]]`` of row b are live and ordered by position per head.
    """

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    acc: torch.Tensor | None


@dataclass
class _Rows:
    """Book-keeping of the live rows (one per sample)."""

    traj_ids: list[int]
    length: torch.Tensor  # [B] live slots per row (equal across layers and heads)
    next_pos: torch.Tensor  # [B] position of the next input token
    obs_q: list[torch.Tensor] = field(default_factory=list)  # per layer [B, H, w, hd]
    obs_pos: torch.Tensor | None = None  # [B, w] (-1 = empty)


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` (config spelling) or a torch dtype -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r} (float32 | bfloat16)")
    return names[dtype]


class ReferenceEngine:
    """Batched sampling from an HF-format Qwen2/Llama model with per-layer KV eviction."""

    def __init__(self, model: RefTransformer, policy: PolicyConfig | None = None, *, kv_growth: int = 16,
                 kv_cache: RolloutKV | KVQuantConfig | None = None):
        """``kv_cache``: store K/V in FP8 with these per-layer scales (module docstring); None keeps
        them in the model's dtype."""
        self.model = model.eval()
        self.arch = model.arch
        self.policy_cfg = policy or PolicyConfig()
        self.policy: EvictionPolicy = make_policy(self.policy_cfg)
        self.kv_growth = kv_growth
        if isinstance(kv_cache, KVQuantConfig):
            kv_cache = RolloutKV(kv_cache)
        if kv_cache is not None and kv_cache.num_layers != self.arch.num_layers:
            raise ValueError(f"kv_cache has scales for {kv_cache.num_layers} layers, the model has "
                             f"{self.arch.num_layers}")
        self.kv_cache: RolloutKV | None = kv_cache
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device

    @classmethod
    def from_pretrained(cls, model_dir, policy: PolicyConfig | None = None, *,
                        dtype: torch.dtype | str = torch.float32, **kw) -> "ReferenceEngine":
        """``dtype``: the compute dtype (weights, activations and KV cache; ``"bfloat16"`` or
        ``"float32"`` as in ``model.dtype``). Sampling and log-probs are taken in fp32 from the
        model-dtype logits. ``kw``: ``kv_growth``, ``kv_cache``."""
        return cls(RefTransformer.from_pretrained(model_dir, dtype=torch_dtype(dtype)), policy, **kw)

    @torch.no_grad()
    def load_weights(self, named: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors into the model (weight sync, in-process transport)."""
        params = dict(self.model.named_parameters())
        for name, t in named.items():
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if name not in params:
                raise KeyError(f"weight sync: unknown parameter {name}")
            if params[name].shape != t.shape:
                raise ValueError(f"weight sync: {name} has shape {list(t.shape)}, engine expects {list(params[name].shape)}")
            params[name].copy_(t)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int = 1, sampling: SamplingParams | None = None
                 ) -> tuple[list[Trajectory], RolloutStats]:
        """Sample ``n`` completions for every prompt. Returns trajectories ordered prompt-major."""
        sp = sampling or SamplingParams()
        if n < 1:
            raise ValueError("n must be >= 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        stats = RolloutStats()
        self._held, self._used = 0, 0  # bytes of the live batch's caches
        t0 = time.perf_counter()
        L, Hkv = self.arch.num_layers, self.arch.num_kv_heads
        max_T = max(len(p) for p in prompts) + sp.max_new_tokens
        # per trajectory: tokens, logprobs, evict[L, H_kv, T_max] (clamped to T at the end)
        trajs: list[dict] = []
        caches: list[_LayerCache] | None = None
        rows: _Rows | None = None
        first_logits = []
        for pi, prompt in enumerate(prompts):
            lc, obs_q, obs_pos, logits = self._prefill(prompt, stats)
            for s in range(n):
                evict = torch.full((L, Hkv, max_T), max_T + 1, dtype=torch.int64)
                trajs.append(dict(tokens=list(prompt), lp=[0.0] * len(prompt), evict=evict,
                                  prompt_len=len(prompt), pi=pi, si=s, finish="length",
                                  gen=self._row_generator(sp.seed, pi, s)))
                first_logits.append(logits)
            lc = [self._apply_prefill_evictions(trajs[-n:], li, lc[li], len(prompt),
                                                obs_q[li], obs_pos) for li in range(L)]
            caches, rows = self._append_rows(caches, rows, lc, obs_q, obs_pos, len(prompt), n,
                                             list(range(len(trajs) - n, len(trajs))), stats)
        stats.prefill_seconds = time.perf_counter() - t0

        logits = torch.cat(first_logits, dim=0)  # [B, V]
        for step in range(sp.max_new_tokens):
            tok, lp = self._sample(logits, [trajs[t]["gen"] for t in rows.traj_ids], sp)
            done = []
            for b, t in enumerate(rows.traj_ids):
                tr = trajs[t]
                tr["tokens"].append(int(tok[b]))
                tr["lp"].append(float(lp[b]))
                stats.generated_tokens += 1
                if int(tok[b]) in sp.stop_token_ids:
                    tr["finish"] = "stop"
                    done.append(b)
                elif step == sp.max_new_tokens - 1:
                    done.append(b)
            if len(done) == len(rows.traj_ids):
                break
            if done:
                keep = torch.tensor([b for b in range(len(rows.traj_ids)) if b not in done])
                caches, rows, tok = self._select_rows(caches, rows, keep), self._rows_subset(rows, keep), tok[keep]
                self._account(caches, rows, stats)
            logits = self._decode(tok, caches, rows, trajs, stats)
        stats.seconds = time.perf_counter() - t0
        return [self._finish(tr) for tr in trajs], stats

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _row_generator(seed: int, pi: int, si: int) -> torch.Generator:
        # Per-row generators make a sample independent of how rows are batched.
        g = torch.Generator()
        g.manual_seed((seed * 1_000_003 + pi * 7919 + si * 104_729) % (2**63 - 1))
        return g

    @staticmethod
    def _sample(logits: torch.Tensor, gens: list[torch.Generator], sp: SamplingParams):
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            from ..errors import SMDError

            raise SMDError("rollout engine: the model produced non-finite logits (are its weights finite?)")
        if sp.temperature == 0:
            lp_full = torch.log_softmax(logits, -1)
            tok = logits.argmax(-1)
            return tok, lp_full.gather(-1, tok[:, None])[:, 0]
        scaled = logits / sp.temperature
        lp_full = torch.log_softmax(scaled, -1)
        probs = lp_full.exp()
        if sp.top_k and sp.top_k < probs.shape[-1]:
            kth = probs.topk(sp.top_k, -1).values[:, -1:]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if sp.top_p < 1.0:
            sp_probs, idx = probs.sort(-1, descending=True)
            cum = sp_probs.cumsum(-1)
            drop = (cum - sp_probs) > sp.top_p * cum[:, -1:]  # keep the smallest prefix reaching top_p
            sp_probs = sp_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sp_probs)
        tok = torch.stack([torch.multinomial(probs[b], 1, generator=g)[0] for b, g in enumerate(gens)])
        return tok, lp_full.gather(-1, tok[:, None])[:, 0]

    # ------------------------------------------------------------------ prefill
    def _prefill(self, prompt: list[int], stats: RolloutStats):
        """Dense prefill of one prompt. Returns per-layer caches (B=1), obs queries, last logits."""
        m, a = self.model, self.arch
        P = len(prompt)
        tokens = torch.tensor([prompt], device=self.device)
        pos = torch.arange(P, device=self.device)
        cos, sin = m.rope(pos.unsqueeze(0))
        h = m.model.embed_tokens(tokens)
        causal = (pos.view(1, -1) <= pos.view(-1, 1)).view(1, 1, 1, P, P)
        w = self.policy.obs_window
        caches, obs_q = [], []
        for layer in m.model.layers:
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, cos, sin)
            li = len(caches)
            k, v = self._store(li, 0, k), self._store(li, 1, v)  # stored first, then read back (FP8)
            o, probs = masked_attention(q, self._load(li, 0, k), self._load(li, 1, v), causal, return_probs=True)
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, P, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            acc = None
            if self.policy.needs_attention:
                acc = self.policy.accumulate(torch.zeros(a.num_kv_heads, P), probs[0].float())[None]
            posb = pos.view(1, 1, P).expand(1, a.num_kv_heads, P).clone()
            caches.append(_LayerCache(k.contiguous(), v.contiguous(), posb, acc))
            obs_q.append(q[:, :, max(0, P - w):, :].clone() if w else None)
        obs_pos = pos[max(0, P - w):].view(1, -1).clone() if w else None
        esz = caches[0].k.element_size()
        # the prompt's dense cache exists on top of every row already live
        self._note_bytes(self._held + sum(c.k.numel() + c.v.numel() for c in caches) * esz, stats,
                         self._used + P * a.num_layers * a.kv_bytes_per_token(esz))
        logits = m.logits(h[:, -1])
        return caches, obs_q, obs_pos, logits

    def _apply_prefill_evictions(self, trajs: list[dict], li: int, cache: _LayerCache, P: int,
                                 obs_q: torch.Tensor | None, obs_pos: torch.Tensor | None) -> _LayerCache:
        """Compress one layer's prompt cache once (shared by the group) and record ``evict = P``."""
        if not self.policy.should_compress(cache.k.shape[2], "prefill"):
            return cache
        obs = None if obs_q is None else (obs_q[0], obs_pos[0])
        keep = self._select(cache, 0, cache.k.shape[2], obs, li)  # [H_kv, budget]
        idx = keep.unsqueeze(-1).expand(-1, -1, cache.k.shape[-1])
        new = _LayerCache(cache.k[0].gather(1, idx)[None], cache.v[0].gather(1, idx)[None],
                          cache.pos[0].gather(1, keep)[None],
                          None if cache.acc is None else cache.acc[0].gather(1, keep)[None])
        dropped = torch.ones(self.arch.num_kv_heads, P, dtype=torch.bool)
        dropped.scatter_(1, new.pos[0], False)
        for tr in trajs:
            tr["evict"][li, :, :P][dropped] = P
        return new

    def _append_rows(self, caches, rows, lc, obs_q, obs_pos, P, n, traj_ids, stats):
        """Replicate a prompt's cache ``n`` times and add the rows to the live batch."""
        rep = [
            _LayerCache(c.k.expand(n, -1, -1, -1), c.v.expand(n, -1, -1, -1), c.pos.expand(n, -1, -1),
                        None if c.acc is None else c.acc.expand(n, -1, -1))
            for c in lc
        ]
        length = torch.full((n,), rep[0].k.shape[2], dtype=torch.int64)
        new_rows = _Rows(traj_ids=traj_ids, length=length, next_pos=torch.full((n,), P, dtype=torch.int64))
        w = self.policy.obs_window
        if w:
            padw = w - obs_pos.shape[1]
            new_rows.obs_pos = torch.cat([torch.full((1, padw), -1, dtype=torch.int64), obs_pos], 1).expand(n, -1)
            new_rows.obs_q = [torch.cat([q.new_zeros(1, q.shape[1], padw, q.shape[3]), q], 2).expand(n, -1, -1, -1)
                              for q in obs_q]
        if caches is None:
            caches = [self._realloc(c, int(length.max())) for c in rep]
            rows = new_rows
        else:
            cap = max(caches[0].k.shape[2], int(length.max()))
            caches = [self._cat_caches(self._realloc(c, cap), self._realloc(r, cap)) for c, r in zip(caches, rep)]
            rows = _Rows(traj_ids=rows.traj_ids + traj_ids, length=torch.cat([rows.length, new_rows.length]),
                         next_pos=torch.cat([rows.next_pos, new_rows.next_pos]),
                         obs_q=[torch.cat([x, y]) for x, y in zip(rows.obs_q, new_rows.obs_q)] if w else [],
                         obs_pos=torch.cat([rows.obs_pos, new_rows.obs_pos]) if w else None)
        self._account(caches, rows, stats)
        return caches, rows

    # ------------------------------------------------------------------ decode
    def _decode(self, tok: torch.Tensor, caches: list[_LayerCache], rows: _Rows, trajs: list[dict],
                stats: RolloutStats) -> torch.Tensor:
        """Run one token per live row through every layer, then let the policy evict. -> logits [B, V]."""
        m = self.model
        B = tok.shape[0]
        pos = rows.next_pos  # [B]
        cos, sin = m.rope(pos.view(B, 1))
        h = m.model.embed_tokens(tok.view(B, 1))
        # grow every layer's capacity once if some row is full
        need = int(rows.length.max()) + 1
        if need > caches[0].k.shape[2]:
            caches[:] = [self._realloc(c, need + self.kv_growth - 1) for c in caches]
            self._account(caches, rows, stats)
        ar = torch.arange(B)
        w = self.policy.obs_window
        for li, layer in enumerate(m.model.layers):
            c = caches[li]
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, cos, sin)  # q [B,H,1,hd], k/v [B,Hkv,1,hd]
            slot = rows.length  # [B]
            c.k[ar, :, slot] = self._store(li, 0, k)[:, :, 0]
            c.v[ar, :, slot] = self._store(li, 1, v)[:, :, 0]
            c.pos[ar, :, slot] = pos.view(B, 1)
            cap = c.k.shape[2]
            valid = torch.arange(cap).view(1, cap) <= slot.view(B, 1)  # [B, cap]
            o, probs = masked_attention(q, self._load(li, 0, c.k), self._load(li, 1, c.v), valid.view(B, 1, 1, 1, cap),
                                        return_probs=True)
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if c.acc is not None:
                # GQA groups are contiguous, so flattening (row, head) keeps every query head in
                # its own row's KV group: one policy call covers the whole batch.
                Bc, Hkv, cap_ = c.acc.shape
                c.acc = self.policy.accumulate(c.acc.reshape(Bc * Hkv, cap_),
                                               probs.float().reshape(B * probs.shape[1], 1, cap_)).view(Bc, Hkv, cap_)
            if w:
                rows.obs_q[li] = torch.cat([rows.obs_q[li][:, :, 1:], q], 2)
        if w:
            rows.obs_pos = torch.cat([rows.obs_pos[:, 1:], pos.view(B, 1)], 1)
        rows.length = rows.length + 1
        rows.next_pos = rows.next_pos + 1
        self._account(caches, rows, stats)
        self._evict_after_decode(caches, rows, trajs, stats)
        return m.logits(h[:, 0])

    def _evict_after_decode(self, caches, rows: _Rows, trajs, stats: RolloutStats) -> None:
        # Live-slot counts are equal across layers, so the decision is per row.
        rows_to_cut = [b for b in range(len(rows.traj_ids))
                       if self.policy.should_compress(int(rows.length[b]), "decode")]
        if not rows_to_cut:
            return
        for li, c in enumerate(caches):
            for b in rows_to_cut:
                n_live = int(rows.length[b])
                obs = None
                if self.policy.obs_window:
                    ok = rows.obs_pos[b] >= 0
                    obs = (rows.obs_q[li][b][:, ok], rows.obs_pos[b][ok])
                keep = self._select(c, b, n_live, obs, li)  # [H_kv, budget]
                q_pos = int(rows.next_pos[b]) - 1  # the query that just ran was the last to see them
                live_pos = c.pos[b, :, :n_live]
                dropped = torch.ones_like(live_pos, dtype=torch.bool)
                dropped.scatter_(1, keep, False)
                ev = trajs[rows.traj_ids[b]]["evict"][li]  # [H_kv, T_max]
                hh, jj = dropped.nonzero(as_tuple=True)
                ev[hh, live_pos[hh, jj]] = q_pos + 1
                self._compact_row(c, b, keep)
                stats.evictions += 1
        for b in rows_to_cut:
            rows.length[b] = keep.shape[1]
        cap = int(rows.length.max()) + self.kv_growth
        if cap < caches[0].k.shape[2]:
            caches[:] = [self._realloc(c, cap) for c in caches]
        self._account(caches, rows, stats)

    # ------------------------------------------------------------------ cache ops
    def _store(self, li: int, which: int, x: torch.Tensor) -> torch.Tensor:
        """K (``which`` 0) or V (1) of layer ``li`` as the cache holds it: ``x`` itself, or its FP8
        bytes (``uint8``, SGLang's store: divide in the compute dtype, cast)."""
        if self.kv_cache is None:
            return x
        c = self.kv_cache.config
        return quantize_kv(x, c.scales(li)[which], c.dtype, division=c.division).view(torch.uint8)

    def _load(self, li: int, which: int, stored: torch.Tensor) -> torch.Tensor:
        """What attention reads from the cache: ``fp8 * scale`` in the compute dtype (or ``stored``)."""
        if self.kv_cache is None:
            return stored
        c = self.kv_cache.config
        return dequantize_kv(stored.view(c.torch_dtype), c.scales(li)[which], self.dtype)

    def _select(self, c: _LayerCache, b: int, n_live: int, obs, li: int) -> torch.Tensor:
        obs_q, obs_pos = (obs if obs is not None else (None, None))
        return self.policy.select(
            keys=self._load(li, 0, c.k[b, :, :n_live]).float(), positions=c.pos[b, :, :n_live],
            acc=None if c.acc is None else c.acc[b, :, :n_live],
            obs_queries=None if obs_q is None else obs_q.float(), obs_positions=obs_pos,
        )

    @staticmethod
    def _compact_row(c: _LayerCache, b: int, keep: torch.Tensor) -> None:
        nk = keep.shape[1]
        idx = keep.unsqueeze(-1).expand(-1, -1, c.k.shape[-1])
        c.k[b, :, :nk] = c.k[b].gather(1, idx)
        c.v[b, :, :nk] = c.v[b].gather(1, idx)
        c.pos[b, :, :nk] = c.pos[b].gather(1, keep)
        c.pos[b, :, nk:] = -1
        if c.acc is not None:
            c.acc[b, :, :nk] = c.acc[b].gather(1, keep)
            c.acc[b, :, nk:] = 0

    @staticmethod
    def _realloc(c: _LayerCache, cap: int) -> _LayerCache:
        """New tensors of capacity ``cap`` holding the first ``min(cap, old)`` slots."""
        B, H, old, hd = c.k.shape
        n = min(cap, old)
        k = c.k.new_zeros(B, H, cap, hd)
        v = c.v.new_zeros(B, H, cap, hd)
        pos = torch.full((B, H, cap), -1, dtype=torch.int64)
        k[:, :, :n], v[:, :, :n], pos[:, :, :n] = c.k[:, :, :n], c.v[:, :, :n], c.pos[:, :, :n]
        acc = None
        if c.acc is not None:
            acc = torch.zeros(B, H, cap)
            acc[:, :, :n] = c.acc[:, :, :n]
        return _LayerCache(k, v, pos, acc)

    @staticmethod
    def _cat_caches(x: _LayerCache, y: _LayerCache) -> _LayerCache:
        return _LayerCache(torch.cat([x.k, y.k]), torch.cat([x.v, y.v]), torch.cat([x.pos, y.pos]),
                           None if x.acc is None else torch.cat([x.acc, y.acc]))

    @staticmethod
    def _select_rows(caches, rows: _Rows, keep: torch.Tensor):
        return [_LayerCache(c.k[keep], c.v[keep], c.pos[keep], None if c.acc is None else c.acc[keep])
                for c in caches]

    def _rows_subset(self, rows: _Rows, keep: torch.Tensor) -> _Rows:
        return _Rows(traj_ids=[rows.traj_ids[i] for i in keep.tolist()], length=rows.length[keep],
                     next_pos=rows.next_pos[keep], obs_q=[q[keep] for q in rows.obs_q],
                     obs_pos=None if rows.obs_pos is None else rows.obs_pos[keep])

    def _account(self, caches, rows: _Rows, stats: RolloutStats) -> None:
        esz = caches[0].k.element_size()
        self._held = sum(c.k.numel() + c.v.numel() for c in caches) * esz
        self._used = int(rows.length.sum()) * self.arch.num_layers * self.arch.kv_bytes_per_token(esz)
        self._note_bytes(self._held, stats, self._used)

    @staticmethod
    def _note_bytes(held: int, stats: RolloutStats, used: int) -> None:
        stats.peak_kv_bytes = max(stats.peak_kv_bytes, held)
        stats.peak_kv_bytes_used = max(stats.peak_kv_bytes_used, used)

    # ------------------------------------------------------------------ output
    def _finish(self, tr: dict) -> Trajectory:
        T = len(tr["tokens"])
        ev = tr["evict"][..., :T].clamp(max=T).to(EVICT_DTYPE)
        if self.policy_cfg.granularity == "layer":
            ev = ev[:, 0]  # all heads identical
        return Trajectory(tokens=tr["tokens"], prompt_len=tr["prompt_len"],
                          sampler_logprobs=torch.tensor(tr["lp"], dtype=torch.float32), evict=ev.contiguous(),
                          prompt_index=tr["pi"], sample_index=tr["si"], finish_reason=tr["finish"],
                          kv_cache=self.kv_cache)


def kv_cache_of(cfg, num_layers: int, weights_dir=None) -> RolloutKV | None:
    """The FP8 KV cache ``cfg`` configures (``rollout.kv_cache_dtype``, ``rollout.kv_scales``) for a
    model of ``num_layers`` layers; None for ``auto``. With ``weights_dir`` the scales file must have
    been calibrated on those weights (:func:`~megatron_smd.quant.cache.load_rollout_kv`)."""
    r = cfg.rollout
    return load_rollout_kv(r.kv_cache_dtype, r.kv_scales, num_layers, weights_dir)
