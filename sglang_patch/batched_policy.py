"""The eviction decision of :mod:`megatron_smd.policies`, batched over requests, as tensor ops.

:meth:`megatron_smd.policies.EvictionPolicy.select` decides for one sequence in one layer. The
SGLang decode hook decides for every request of a batch at once, inside the forward, without a
host round trip: the functions here take a leading request dimension ``n`` and run the same
formulas in the same order (same reductions, same tie rule: ``topk_recent_wins``), so on the same
inputs they keep the same positions. Granularity ``layer`` only (the SGLang pool keeps one slot
table per layer): scores are reduced over heads and one keep list per request is returned.

Shapes: ``n`` requests, ``C`` live slots each (the same ``C`` for the whole call: every request
that compresses in a decode step holds exactly ``B + 1`` (streaming, h2o) or ``B + buffer`` (rkv)
slots), ``H_kv`` / ``H_q`` heads (GQA groups contiguous), ``d`` head dim, ``w`` observation queries.
"""

from __future__ import annotations

import math

import torch

from megatron_smd.policies import (
    EvictionPolicy,
    _compute_dtype,
    keep_window_plus_top,
    key_redundancy,
    pool_scores,
    streaming_keep,
    topk_recent_wins,
)


def obs_attention_batched(keys: torch.Tensor, positions: torch.Tensor, obs_queries: torch.Tensor,
                          obs_positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`megatron_smd.policies.obs_attention` for ``n`` requests.

    Args:
        keys ``[n, H_kv, C, d]``; positions ``[n, C]``; obs_queries ``[n, H_q, w, d]``;
        obs_positions ``[n, w]``; valid ``[n, C]`` bool (padding slots of shorter requests: False).
    Returns ``[n, H_q, w, C]`` probabilities (0 on slots a query cannot see or padding).
    """
    n, H_kv, C, d = keys.shape
    H_q, w = obs_queries.shape[1], obs_queries.shape[2]
    g = H_q // H_kv
    dt = _compute_dtype(keys)
    q = obs_queries.to(dt).reshape(n, H_kv, g * w, d)
    logits = torch.matmul(q, keys.to(dt).transpose(-1, -2)) / math.sqrt(d)  # [n, H_kv, g*w, C]
    logits = logits.view(n, H_kv, g, w, C)
    visible = positions.view(n, 1, 1, 1, C) <= obs_positions.view(n, 1, 1, w, 1)
    if valid is not None:
        visible = visible & valid.view(n, 1, 1, 1, C)
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    return probs.reshape(n, H_q, w, C)


def _obs_window_vote(keys, positions, obs_queries, obs_positions) -> torch.Tensor:
    n, H_kv, C, _ = keys.shape
    probs = obs_attention_batched(keys, positions, obs_queries, obs_positions)  # [n, H_q, w, C]
    H_q = probs.shape[1]
    return probs.sum(dim=2).view(n, H_kv, H_q // H_kv, C).sum(dim=2)


def select_batched(policy: EvictionPolicy, *, keys: torch.Tensor | None, positions: torch.Tensor,
                   acc: torch.Tensor | None = None, obs_queries: torch.Tensor | None = None,
                   obs_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Slot indices each of ``n`` requests keeps: int64 ``[n, budget]``, ascending per row.

    ``C > budget`` is required (the caller compresses only requests that overflow). ``keys``
    ``[n, H_kv, C, d]`` (fp32, as the reference engine scores), ``positions`` ``[n, C]``, ``acc``
    ``[n, H_kv, C]`` (h2o), ``obs_queries`` ``[n, H_q, w, d]`` and ``obs_positions`` ``[n, w]`` (rkv).
    """
    cfg = policy.cfg
    if cfg.granularity != "layer":
        raise ValueError("select_batched: granularity 'layer' only")
    n, C = positions.shape
    B = cfg.budget
    if not C > B:
        raise ValueError(f"select_batched: {C} slots do not exceed the budget {B}")
    if policy.name == "streaming":
        return streaming_keep(n, C, B, cfg.sinks, device=positions.device)
    if policy.name == "h2o":
        s = acc.to(_compute_dtype(acc))[:, :, : C - cfg.window].mean(dim=1)  # [n, M]
        return keep_window_plus_top(s, C, B, cfg.window)
    if policy.name == "rkv":
        H_kv = keys.shape[1]
        M = C - cfg.window
        v = _obs_window_vote(keys, positions, obs_queries, obs_positions)[:, :, :M]  # [n, H_kv, M]
        p = pool_scores(v.reshape(n * H_kv, M), cfg.pool_kernel, cfg.pooling).view(n, H_kv, M)
        importance = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        red = key_redundancy(keys.reshape(n * H_kv, C, keys.shape[-1])).view(n, H_kv, C)
        redundancy = torch.softmax(red[:, :, :M], dim=-1)
        score = cfg.rkv_lambda * importance - (1.0 - cfg.rkv_lambda) * redundancy
        return keep_window_plus_top(score.mean(dim=1), C, B, cfg.window)
    if policy.name == "snapkv":
        raise ValueError("select_batched: snapkv compresses the prompt only (at prefill)")
    raise ValueError(f"select_batched: policy {policy.name!r} does not evict")


def _keep_and_drop(scores: torch.Tensor, C: int, B: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`keep_window_plus_top` and its complement from one ranking of the candidates: keep
    ``[n, B]`` ascending (identical to ``keep_window_plus_top``), dropped ``[n, C - B]`` (rank order)."""
    n, M = scores.shape
    order = topk_recent_wins(scores, M)  # every candidate, best first
    recent = torch.arange(M, C, device=scores.device).expand(n, window)
    keep = torch.sort(torch.cat([order[:, : B - window], recent], dim=-1), dim=-1).values
    return keep, order[:, B - window:]


_STREAMING: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def select_and_drop_batched(policy: EvictionPolicy, *, keys: torch.Tensor | None, positions: torch.Tensor,
                            acc: torch.Tensor | None = None, obs_queries: torch.Tensor | None = None,
                            obs_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_batched` and the slots it drops (``[n, C - B]``, any order), from one ranking."""
    cfg = policy.cfg
    n, C = positions.shape
    B = cfg.budget
    if policy.name == "streaming":
        key = (C, B, cfg.sinks, positions.device)
        if key not in _STREAMING:
            keep = streaming_keep(1, C, B, cfg.sinks, device=positions.device)[0]
            _STREAMING[key] = (keep, torch.arange(cfg.sinks, C - (B - cfg.sinks), device=positions.device))
        keep, drop = _STREAMING[key]
        return keep.expand(n, B), drop.expand(n, C - B)
    if policy.name == "h2o" and C > B:
        s = acc.to(_compute_dtype(acc))[:, :, : C - cfg.window].mean(dim=1)  # [n, M]
        return _keep_and_drop(s, C, B, cfg.window)
    keep = select_batched(policy, keys=keys, positions=positions, acc=acc, obs_queries=obs_queries,
                          obs_positions=obs_positions)
    return keep, dropped_batched(keep, C)


def dropped_batched(keep: torch.Tensor, C: int) -> torch.Tensor:
    """Slot indices not in ``keep`` (``[n, B]``): int64 ``[n, C - B]``, ascending, with no host sync."""
    n, B = keep.shape
    mask = torch.ones(n, C, dtype=torch.int8, device=keep.device)
    mask.scatter_(1, keep, 0)
    return torch.sort(mask, dim=1, descending=True, stable=True).indices[:, : C - B]


__all__ = ["dropped_batched", "obs_attention_batched", "select_and_drop_batched", "select_batched"]

