"""KV-cache eviction policies: StreamingLLM, H2O, SnapKV, R-KV (and ``none``).

One implementation shared by the reference rollout engine and the SGLang patch. Everything here is
a pure function of the attention inputs of **one sequence in one layer**: the engine owns the cache
(keys, the H2O accumulator, the last queries); a policy only says which slots to keep. Eviction is
monotone (a dropped slot never returns), which is what lets the rollout describe its attention
pattern as one ``evict`` integer per key (:mod:`megatron_smd.mask`).

How the engine drives a policy (per layer, per sequence)::

    after prefill / after each decode step:
        if policy.needs_attention: acc = policy.accumulate(acc, probs)      # H2O only
        if policy.should_compress(cache_len, phase):
            keep = policy.select(keys=..., positions=..., acc=..., obs_queries=..., obs_positions=...)
            keys, values, positions, acc = (t.gather(1, keep...) for t in ...)   # engine side

Shapes used throughout (one sequence, one layer):

* ``C``: cached slots; ``H_kv`` KV heads; ``H_q`` query heads, ``g = H_q // H_kv`` per group
  (GQA groups are contiguous: query head ``hq`` reads KV head ``hq // g``); ``d`` head dim;
  ``w`` observation queries.
* ``keys [H_kv, C, d]`` with RoPE applied at the original positions; ``positions [H_kv, C]`` int64,
  strictly increasing along ``C`` in every row. Larger slot index == more recent token.

Conventions shared by every policy
----------------------------------
* **Budget.** After :meth:`EvictionPolicy.select` a layer holds exactly ``budget`` slots (per KV
  head with ``granularity="head"``). If ``C <= budget`` there is nothing to evict and all ``C``
  slots are returned.
* **Recent window.** H2O, SnapKV and R-KV always keep the ``window`` most recent slots (the last
  ``window`` slot indices of each row) and choose the remaining ``budget - window`` among the
  older *candidate* slots ``[0, C - window)``. For SnapKV / R-KV the same ``window`` is the number
  of most recent queries used to score (the observation window).
* **Sinks.** Only StreamingLLM protects attention sinks. H2O, SnapKV and R-KV do not (as in their
  papers); ``sinks`` is ignored by them.
* **Granularity.** ``"layer"``: per-head scores are reduced over KV heads (mean, or a sum over all
  query heads for SnapKV, which ranks the same) and every row of ``keep`` is identical — what the
  SGLang path needs, since its KV pool has one slot table per layer. ``"head"``: every KV head ranks
  its own slots.
* **Deterministic tie-breaking.** Candidates are ranked by score, descending; on exactly equal
  scores the **more recent slot (larger position) wins**. Implemented by a stable descending sort
  over the candidates in reverse slot order, so the result never depends on the sort kernel.
  (Max-pooling creates plateaus of exactly equal scores, so this rule is exercised in practice.)
* **Numerics.** Scores are computed in ``float32`` (``float64`` inputs stay ``float64``); scaled
  dot products use ``1/sqrt(d)``.

Departures from the papers are stated in each scoring function's docstring.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

PolicyName = Literal["none", "streaming", "h2o", "snapkv", "rkv"]
Phase = Literal["prefill", "decode"]

# Policies that need a budget and compress the cache.
_COMPRESSING = ("streaming", "h2o", "snapkv", "rkv")
# Policies that keep a recent window and rank the older slots.
_WINDOWED = ("h2o", "snapkv", "rkv")
# Policies that score with the last `window` queries.
_OBSERVING = ("snapkv", "rkv")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class PolicyConfig(BaseModel):
    """Which KV-cache eviction policy the rollout uses, and its parameters.

    Fields that a policy does not use are ignored by it (but still range-checked).
    """

    model_config = ConfigDict(extra="forbid")

    name: PolicyName = Field(
        "none",
        description="Eviction policy: none (dense cache), streaming (StreamingLLM sinks + recent), "
        "h2o (heavy hitters by accumulated attention + recent), snapkv (one-shot prompt "
        "compression from an observation window), rkv (importance + redundancy, decode-time).",
    )
    budget: int | None = Field(
        None,
        description="Tokens kept per layer after a compression (per KV head with granularity "
        "'head'). Required (> 0) unless name is 'none'; ignored by 'none'.",
    )
    granularity: Literal["layer", "head"] = Field(
        "layer",
        description="layer: scores are reduced over heads and every KV head keeps the same "
        "positions (the SGLang path). head: each KV head keeps its own positions.",
    )
    sinks: int = Field(
        4,
        description="streaming only: number of oldest tokens (attention sinks) always kept. "
        "h2o/snapkv/rkv do not protect sinks and ignore this field.",
    )
    window: int = Field(
        32,
        description="h2o: most recent tokens always kept. snapkv/rkv: observation window, i.e. the "
        "number of most recent queries used for scoring; those tokens' keys are always kept. "
        "Must be < budget. Ignored by streaming, whose recent window is budget - sinks.",
    )
    pool_kernel: int = Field(
        7,
        description="snapkv/rkv: odd kernel of the 1-D pooling (stride 1, same length) of the "
        "observation-window attention along key slots; 1 disables pooling.",
    )
    pooling: Literal["max", "avg"] = Field(
        "max",
        description="snapkv/rkv: pooling type. avg divides by pool_kernel with zero padding at the "
        "edges (count_include_pad), as SnapKV's reference does.",
    )
    buffer: int = Field(
        64,
        description="rkv: during decode the cache grows to budget + buffer tokens, then is "
        "compressed back to budget (amortises the scoring cost).",
    )
    rkv_lambda: float = Field(
        0.1,
        description="rkv: score = rkv_lambda * importance - (1 - rkv_lambda) * redundancy; in [0, 1].",
    )

    @model_validator(mode="after")
    def _check_possible(self) -> PolicyConfig:
        """Reject parameter combinations that no policy run could satisfy.

        Collects every problem into one ``ValueError`` (pydantic turns it into a
        ``ValidationError``; the config loader adds the dotted key and file).
        """
        errs: list[str] = []
        n = self.name
        if n in _COMPRESSING:
            if self.budget is None:
                errs.append(f"budget is required for policy name={n!r} (tokens kept per layer)")
            elif self.budget <= 0:
                errs.append(f"budget must be > 0 for policy name={n!r}, got budget={self.budget}")
        elif self.budget is not None and self.budget <= 0:
            errs.append(f"budget must be > 0 when given, got budget={self.budget}")
        if self.sinks < 0:
            errs.append(f"sinks must be >= 0, got sinks={self.sinks}")
        if self.window < 0:
            errs.append(f"window must be >= 0, got window={self.window}")
        budget_ok = self.budget is not None and self.budget > 0
        if n == "streaming" and budget_ok and self.budget <= self.sinks:
            errs.append(
                f"streaming needs budget > sinks to leave room for the recent window "
                f"(window = budget - sinks), got budget={self.budget}, sinks={self.sinks}"
            )
        if n in _WINDOWED and budget_ok and self.window >= self.budget:
            errs.append(
                f"window must be < budget for policy name={n!r} (the window is always kept and "
                f"budget - window slots are chosen by score), got window={self.window}, "
                f"budget={self.budget}"
            )
        if n in _OBSERVING and self.window < 1:
            errs.append(
                f"window must be >= 1 for policy name={n!r} (it is the number of observation "
                f"queries), got window={self.window}"
            )
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            errs.append(
                f"pool_kernel must be a positive odd integer (same-length pooling), "
                f"got pool_kernel={self.pool_kernel}"
            )
        if self.buffer <= 0:
            errs.append(f"buffer must be > 0, got buffer={self.buffer}")
        if not (0.0 <= self.rkv_lambda <= 1.0) or math.isnan(self.rkv_lambda):
            errs.append(f"rkv_lambda must be in [0, 1], got rkv_lambda={self.rkv_lambda}")
        if errs:
            raise ValueError("; ".join(errs))
        return self


# ---------------------------------------------------------------------------------------------
# Pure scoring / selection functions (one sequence, one layer)
# ---------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is: scores never run in bf16/fp16."""
    return torch.promote_types(t.dtype, torch.float32)


def topk_recent_wins(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores per row, ties broken towards the larger index.

    Args:
        scores: ``[H, M]`` finite scores of ``M`` slots in increasing position order.
        k: ``0 <= k <= M``.
    Returns:
        int64 ``[H, k]`` slot indices (unsorted: in rank order).

    A stable descending sort keeps equal elements in input order; sorting the *reversed* row
    therefore puts the more recent of two equal scores first, independent of the sort kernel.
    """
    M = scores.shape[-1]
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :k]
    return (M - 1) - order


def keep_window_plus_top(candidate_scores: torch.Tensor, num_slots: int, budget: int,
                         window: int) -> torch.Tensor:
    """Keep the last ``window`` slots and the ``budget - window`` best-scoring older slots.

    Args:
        candidate_scores: ``[H, M]`` with ``M = num_slots - window``: scores of slots ``[0, M)``.
        num_slots: ``C``; must be ``> budget``.
    Returns:
        int64 ``[H, budget]`` slot indices, sorted ascending per row.
    """
    H, M = candidate_scores.shape
    assert M == num_slots - window and num_slots > budget > window >= 0
    top = topk_recent_wins(candidate_scores, budget - window)
    recent = torch.arange(M, num_slots, device=candidate_scores.device).expand(H, window)
    return torch.sort(torch.cat([top, recent], dim=-1), dim=-1).values


def streaming_keep(num_heads: int, num_slots: int, budget: int, sinks: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + a recent window.

    ``keep = {0, ..., sinks-1} ∪ {C-(budget-sinks), ..., C-1}`` (slot indices).

    The ``sinks`` oldest slots are the tokens at positions ``0 .. sinks-1``: StreamingLLM never
    evicts them, so after any number of compressions they are still the first slots. Unlike the
    paper's deployment we never re-assign positions (no rolling RoPE): the shadow-mask replay needs
    every key at its original position. Returns int64 ``[num_heads, budget]``, ascending.
    """
    assert num_slots > budget > sinks >= 0
    idx = torch.cat([torch.arange(sinks), torch.arange(num_slots - (budget - sinks), num_slots)])
    return idx.to(device=device).expand(num_heads, budget).clone()


def accumulate_attention(acc: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """H2O accumulator update: ``acc'[h, j] = acc[h, j] + Σ_{hq ∈ G(h)} Σ_q probs[hq, q, j]``.

    Args:
        acc: ``[H_kv, C]`` float32 attention mass received so far by each cached slot.
        probs: ``[H_q, n_q, C]`` softmax probabilities of the new queries (0 where not visible).
    Returns:
        new ``[H_kv, C]`` float32 tensor; ``G(h) = {h*g, ..., h*g + g - 1}``, ``g = H_q // H_kv``.
    """
    if acc.dim() != 2 or probs.dim() != 3:
        raise ValueError(f"accumulate: expected acc [H_kv, C] and probs [H_q, n_q, C], got "
                         f"{list(acc.shape)} and {list(probs.shape)}")
    H_kv, C = acc.shape
    H_q = probs.shape[0]
    if probs.shape[-1] != C or H_q % H_kv != 0:
        raise ValueError(f"accumulate: probs {list(probs.shape)} does not match acc "
                         f"{list(acc.shape)} (need the same C and H_q divisible by H_kv)")
    g = H_q // H_kv
    per_q_head = probs.to(torch.float32).sum(dim=1)  # [H_q, C]
    return acc.to(torch.float32) + per_q_head.view(H_kv, g, C).sum(dim=1)


def h2o_candidate_scores(acc: torch.Tensor, window: int, granularity: str) -> torch.Tensor:
    """H2O (Zhang et al., arXiv 2306.14048) heavy-hitter score of the candidate slots.

    ``score[h, j] = acc[h, j]`` for ``j < C - window`` (the running sum of attention every
    query so far gave slot ``j``, summed over the query heads of KV head ``h``); with
    ``granularity="layer"`` the mean over KV heads, broadcast to every row. Returns ``[H_kv, C-window]``.
    The paper keeps a recent window plus top heavy hitters, exactly as :func:`keep_window_plus_top`.
    """
    s = acc.to(_compute_dtype(acc))[:, : acc.shape[1] - window]
    if granularity == "layer":
        s = s.mean(dim=0, keepdim=True).expand_as(s)
    return s


def obs_attention(keys: torch.Tensor, positions: torch.Tensor, obs_queries: torch.Tensor,
                  obs_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of the observation queries over every cached slot.

    ``A[hq, i, j] = softmax_{j : pos[h, j] <= qpos[i]}(q[hq, i] · k[h, j] / sqrt(d))``, ``h = hq // g``,
    and ``A[hq, i, j] = 0`` for slots the query cannot see (later positions).

    Args:
        keys: ``[H_kv, C, d]``; positions: ``[H_kv, C]``; obs_queries: ``[H_q, w, d]``;
        obs_positions: ``[w]``.
    Returns:
        ``[H_q, w, C]`` probabilities (float32, or float64 for float64 inputs).
    """
    H_kv, C, d = keys.shape
    H_q, w, dq = obs_queries.shape
    if dq != d or H_q % H_kv != 0 or obs_positions.shape != (w,) or positions.shape != (H_kv, C):
        raise ValueError(
            f"obs_attention: incompatible shapes keys {list(keys.shape)}, positions "
            f"{list(positions.shape)}, obs_queries {list(obs_queries.shape)}, obs_positions "
            f"{list(obs_positions.shape)}"
        )
    g = H_q // H_kv
    dt = _compute_dtype(keys)
    q = obs_queries.to(dt).reshape(H_kv, g * w, d)  # contiguous groups: [H_kv, g*w, d]
    logits = torch.matmul(q, keys.to(dt).transpose(1, 2)) / math.sqrt(d)  # [H_kv, g*w, C]
    logits = logits.view(H_kv, g, w, C)
    visible = positions.view(H_kv, 1, 1, C) <= obs_positions.view(1, 1, w, 1)  # [H_kv, 1, w, C]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a query that sees no slot contributes nothing
    return probs.reshape(H_q, w, C)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along slots, stride 1, same length (padding ``kernel // 2``).

    ``max``: ``out[j] = max_{|i-j| <= r, 0 <= i < M} s[i]``; ``avg``: ``out[j] = (1/kernel)
    Σ_{|i-j| <= r, 0 <= i < M} s[i]`` (zero padding counted, SnapKV's ``avg_pool1d`` default).
    ``scores``: ``[H, M]``. Pooling is over slot adjacency, which after earlier evictions is not
    position adjacency, as in SnapKV / R-KV implementations.
    """
    if kernel == 1:
        return scores
    x = scores.unsqueeze(1)  # [H, 1, M]
    if pooling == "max":
        y = F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        y = F.avg_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return y.squeeze(1)


def obs_window_vote(keys: torch.Tensor, positions: torch.Tensor, obs_queries: torch.Tensor,
                    obs_positions: torch.Tensor) -> torch.Tensor:
    """Attention each cached slot receives from the observation window, per KV head.

    ``v[h, j] = Σ_{hq ∈ G(h)} Σ_{i < w} A[hq, i, j]`` with ``A`` from :func:`obs_attention`.
    Returns ``[H_kv, C]``.
    """
    H_kv, C, _ = keys.shape
    probs = obs_attention(keys, positions, obs_queries, obs_positions)  # [H_q, w, C]
    H_q = probs.shape[0]
    return probs.sum(dim=1).view(H_kv, H_q // H_kv, C).sum(dim=1)


def snapkv_candidate_scores(keys: torch.Tensor, positions: torch.Tensor, obs_queries: torch.Tensor,
                            obs_positions: torch.Tensor, window: int, kernel: int, pooling: str,
                            granularity: str) -> torch.Tensor:
    """SnapKV (Li et al., arXiv 2404.14469) score of the candidate slots ``j < C - window``.

    ``head``:  ``score[h, j] = pool_k( v[h, :C-window] )[j]``, ``v`` = :func:`obs_window_vote`
    ``layer``: ``score[j] = pool_k( Σ_h v[h, :C-window] )[j]`` — the vote of all query heads,
    reduced *before* pooling (max-pooling does not commute with the sum), broadcast to every row.

    ``A`` is the causal softmax over *all* cached slots (window included), as in SnapKV; the last
    ``window`` slots are kept unconditionally, and they are cut off *before* pooling so their large
    self-attention mass does not leak into the boundary candidates (also as in SnapKV). SnapKV
    compresses the prompt once; decode then grows the cache without further eviction. Departure:
    the paper scores each query head against its own KV (MHA); with GQA we sum the query heads of
    a group (``head``) or all heads (``layer``). Returns ``[H_kv, C - window]``.
    """
    H_kv, C, _ = keys.shape
    v = obs_window_vote(keys, positions, obs_queries, obs_positions)[:, : C - window]
    if granularity == "layer":
        return pool_scores(v.sum(dim=0, keepdim=True), kernel, pooling).expand(H_kv, -1)
    return pool_scores(v, kernel, pooling)


def key_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """R-KV's raw redundancy: mean cosine similarity of each key to the *other* cached keys.

    ``k̂_j = k_j / max(||k_j||, 1e-8)``; ``r[h, j] = (1/(C-1)) Σ_{j' != j} k̂[h, j] · k̂[h, j']``
    (the diagonal of the similarity matrix is zeroed). Computed in ``O(C·d)`` as
    ``(k̂_j · Σ_{j'} k̂_{j'} - k̂_j · k̂_j) / (C - 1)`` instead of materialising the ``[C, C]``
    similarity matrix (so prefill compression of a long prompt stays linear in ``C``).
    Args: keys ``[H_kv, C, d]``. Returns ``[H_kv, C]``.
    """
    H_kv, C, _ = keys.shape
    k = F.normalize(keys.to(_compute_dtype(keys)), dim=-1, eps=1e-8)
    total = k.sum(dim=1, keepdim=True)  # [H_kv, 1, d]
    row = (k * total).sum(-1) - (k * k).sum(-1)  # Σ_{j' != j} cos(j, j')
    return row / max(C - 1, 1)


def rkv_candidate_scores(keys: torch.Tensor, positions: torch.Tensor, obs_queries: torch.Tensor,
                         obs_positions: torch.Tensor, window: int, kernel: int, pooling: str,
                         lam: float, granularity: str) -> torch.Tensor:
    """R-KV (Cai et al., arXiv 2505.24133) score of the candidate slots ``j ∈ cand = [0, C - window)``.

    Per KV head ``h``:

    * importance ``I[h, j] = p[h, j] / Σ_{j' ∈ cand} p[h, j']`` with
      ``p[h] = pool_k(v[h, :C-window])`` the pooled observation-window vote
      (:func:`obs_window_vote`; the SnapKV ``head`` score);
    * redundancy ``R[h, j] = softmax_{j ∈ cand}( r[h, j] )`` with ``r`` the mean cosine similarity
      of key ``j`` to the other ``C - 1`` cached keys of head ``h`` (:func:`key_redundancy`; the
      similarity runs over *all* cached keys, window included, because a candidate that repeats a
      kept window token is redundant too);
    * ``score[h, j] = λ I[h, j] - (1 - λ) R[h, j]``.

    ``layer``: the mean of ``score`` over KV heads, broadcast to every row.

    Both terms are distributions over the candidates, so ``λ`` weighs quantities of the same scale.
    Departures from the paper / its reference code, stated precisely:

    1. The paper and its reference code also zero, for each key, its similarity to its most
       recent near-duplicate(s) (cosine above a threshold, 0.5 in the code) before averaging,
       which lowers the redundancy of the latest copy of repeated content so that one copy
       survives. That needs two more hyperparameters (threshold, copies retained) and the full
       ``[C, C]`` matrix; it is not applied here. Our redundancy is symmetric among exact
       duplicates, so among equally important duplicates the tie rule keeps the most recent.
    2. The mean divides by ``C - 1`` (the other keys); the reference code divides by ``C``
       (a constant factor inside the softmax).
    3. GQA: the query heads of a group are summed (reference: max of the logits over the group).
       The importance softmax runs over all visible slots (window included, as SnapKV) and is
       renormalised over the candidates after pooling (reference: softmax over the candidates
       only, mean over queries, no renormalisation after pooling).
    4. Both softmaxes (importance renormalisation, redundancy) are over the candidates; the
       reference takes the redundancy softmax over all slots and then drops the window.

    Returns ``[H_kv, C - window]``.
    """
    C = keys.shape[1]
    v = obs_window_vote(keys, positions, obs_queries, obs_positions)[:, : C - window]
    p = pool_scores(v, kernel, pooling)  # [H_kv, C - window], >= 0
    importance = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    redundancy = torch.softmax(key_redundancy(keys)[:, : C - window], dim=-1)
    score = lam * importance - (1.0 - lam) * redundancy
    if granularity == "layer":
        score = score.mean(dim=0, keepdim=True).expand_as(score)
    return score


# ---------------------------------------------------------------------------------------------
# Engine-facing object
# ---------------------------------------------------------------------------------------------


class EvictionPolicy:
    """The policy the rollout engine calls; holds only the validated config, no cache state.

    Attributes:
        name: the policy name (``cfg.name``).
        needs_attention: True for H2O: the engine passes every step's attention probabilities
            to :meth:`accumulate` and keeps the ``[H_kv, C]`` accumulator alongside the cache.
        obs_window: how many of the most recent post-RoPE queries the engine must keep for
            :meth:`select` (``window`` for snapkv/rkv, else 0).
    """

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.name: str = cfg.name
        self.needs_attention: bool = cfg.name == "h2o"
        self.obs_window: int = cfg.window if cfg.name in _OBSERVING else 0

    def __repr__(self) -> str:
        return f"EvictionPolicy({self.cfg!r})"

    def should_compress(self, cache_len: int, phase: Phase) -> bool:
        """Whether to compress one sequence's cache in one layer, holding ``cache_len`` tokens.

        Called after each prefill (chunk) and after each decode step.

        * none: never.
        * streaming / h2o: ``cache_len > budget`` (evicts every step once full).
        * snapkv: only in ``prefill`` and ``cache_len > budget``: SnapKV compresses the prompt
          once; decode then grows the cache without eviction.
        * rkv: decode: ``cache_len >= budget + buffer``; prefill: ``cache_len > budget``.
        """
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        n, b = self.name, self.cfg.budget
        if n == "none":
            return False
        assert b is not None
        if n in ("streaming", "h2o"):
            return cache_len > b
        if n == "snapkv":
            return phase == "prefill" and cache_len > b
        # rkv
        if phase == "decode":
            return cache_len >= b + self.cfg.buffer
        return cache_len > b

    def accumulate(self, acc: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """H2O accumulator update (see :func:`accumulate_attention`).

        acc ``[H_kv, C]`` float32, probs ``[H_q, n_q, C]`` → new acc ``[H_kv, C]`` float32 equal to
        ``acc`` plus ``probs`` summed over queries and over the query heads of each GQA group.
        """
        return accumulate_attention(acc, probs)

    def select(self, *, keys: torch.Tensor, positions: torch.Tensor, acc: torch.Tensor | None,
               obs_queries: torch.Tensor | None, obs_positions: torch.Tensor | None) -> torch.Tensor:
        """Choose the slots to keep in one layer of one sequence.

        Args:
            keys: ``[H_kv, C, d]`` cached keys, RoPE applied at their original positions.
            positions: ``[H_kv, C]`` int64 original positions, strictly increasing per row (all rows
                equal with granularity ``"layer"``).
            acc: ``[H_kv, C]`` H2O accumulator (h2o only).
            obs_queries: ``[H_q, w, d]`` the last ``w <= obs_window`` post-RoPE queries (snapkv/rkv).
            obs_positions: ``[w]`` their positions; query ``i`` sees slot ``j`` iff
                ``positions[h, j] <= obs_positions[i]``.
        Returns:
            int64 ``[H_kv, min(budget, C)]`` slot indices, ascending per row; identical rows with
            granularity ``"layer"``. ``C <= budget`` (or name ``none``) returns every slot.
        """
        cfg = self.cfg
        if keys.dim() != 3:
            raise ValueError(f"select: keys must be [H_kv, C, d], got {list(keys.shape)}")
        H_kv, C, _ = keys.shape
        if positions.shape != (H_kv, C):
            raise ValueError(f"select: positions {list(positions.shape)} must be [H_kv, C] = "
                             f"{[H_kv, C]}")
        if C > 1 and not bool((positions[:, 1:] > positions[:, :-1]).all()):
            raise ValueError("select: positions must be strictly increasing along each row")
        if cfg.granularity == "layer" and not bool((positions == positions[:1]).all()):
            raise ValueError("select: granularity 'layer' needs identical positions in every head")
        everything = torch.arange(C, device=keys.device).expand(H_kv, C).clone()
        if self.name == "none":
            return everything
        budget = cfg.budget
        assert budget is not None  # guaranteed by PolicyConfig for compressing policies
        if C <= budget:
            return everything

        if self.name == "streaming":
            return streaming_keep(H_kv, C, budget, cfg.sinks, device=keys.device)

        if self.name == "h2o":
            if acc is None or acc.shape != (H_kv, C):
                raise ValueError(f"select: h2o needs acc [H_kv, C] = {[H_kv, C]}, got "
                                 f"{None if acc is None else list(acc.shape)}")
            scores = h2o_candidate_scores(acc, cfg.window, cfg.granularity)
            return keep_window_plus_top(scores, C, budget, cfg.window)

        # snapkv / rkv
        if obs_queries is None or obs_positions is None or obs_queries.dim() != 3 \
                or obs_queries.shape[1] == 0:
            raise ValueError(f"select: {self.name} needs obs_queries [H_q, w >= 1, d] and "
                             f"obs_positions [w]")
        if obs_queries.shape[1] > self.obs_window:
            raise ValueError(f"select: got {obs_queries.shape[1]} observation queries, "
                             f"obs_window is {self.obs_window}")
        if self.name == "snapkv":
            scores = snapkv_candidate_scores(keys, positions, obs_queries, obs_positions, cfg.window,
                                             cfg.pool_kernel, cfg.pooling, cfg.granularity)
        else:
            scores = rkv_candidate_scores(keys, positions, obs_queries, obs_positions, cfg.window,
                                          cfg.pool_kernel, cfg.pooling, cfg.rkv_lambda,
                                          cfg.granularity)
        return keep_window_plus_top(scores, C, budget, cfg.window)


def make_policy(cfg: PolicyConfig) -> EvictionPolicy:
    """Build the policy object for a validated config."""
    return EvictionPolicy(cfg)
