"""Advantages, policy losses, correction modes and the SMD distillation term: pure tensor functions.

Shapes: ``N`` trajectories, ``T`` padded positions. Per-token tensors are ``[N, T]`` aligned with the
rollout's ``tokens`` (entry ``t`` is about ``tokens[t]`` given ``tokens[<t]``); ``mask [N, T]`` is
True on completion tokens (the actions). Cross-rank reductions are *not* done here: every function
returns local sums or means and the caller reduces (STYLE.md practice 3).

Correction modes (DESIGN.md §4). Let ``lp`` be the learner's current log-prob (dense forward, or
shadow-masked forward in ``smd``), ``lp_s`` the sampler's, ``lp_do`` the learner's *dense* log-prob
under the parameters that produced the rollout (computed before the first update of the batch, no
grad):

============ ================================ =========================================================
mode         ratio in the PPO-clip surrogate  token weight / sequence filter
============ ================================ =========================================================
``dense``    ``exp(lp - lp_s)``               none (the rollout itself was uncompressed)
``naive``    ``exp(lp - lp_s)``               none — the off-policy failure the papers describe
``tis``      ``exp(lp - lp_do)``              ``min(exp(lp_do - lp_s), C)`` (truncated IS)
``sparse_rl`` ``exp(lp - lp_do)``             sequences whose consistency ratio
                                              ``xi_t = exp(lp_do - lp_s)`` falls below
                                              ``reject_min`` anywhere (or whose geometric mean leaves
                                              ``[1/reject_mean, reject_mean]``) are rejected; kept
                                              tokens weighted by ``clip(xi_t, w_min, w_max)``
``smd``      ``exp(lp_shadow - lp_s)``        none: ``lp_shadow == lp_s`` at the first step (to fp
                                              noise); plus the distillation term below
============ ================================ =========================================================

``sparse_rl`` follows our reading of Sparse-RL (arXiv 2601.10079): the importance weight
``pi_theta / pi_sparse`` is factored as ``(pi_theta / pi_old_dense) * (pi_old_dense / pi_sparse)``;
the first factor goes through PPO clipping, the second (the *sparsity consistency ratio*) drives a
sequence-level rejection of anomalous trajectories and a clipped token-level reweighting. Every
threshold is configurable.

Distillation (``smd``): the shadow-masked (sparse) and dense policies score the same tokens; the
term keeps the dense policy, which is what ships, consistent with the sparse one being optimised.
``direction`` says which side is the student (receives gradient); the other is detached:

* ``sparse_to_dense`` (default): teacher = shadow, student = dense. The RL gradient already moves
  the shadow policy; this carries the improvement into the dense model without pulling the RL
  policy back toward the (possibly worse) dense one.
* ``dense_to_sparse``: teacher = dense, student = shadow.
* ``both``: no detach; both sides move toward each other.

Estimators of ``KL(shadow || dense)`` on tokens drawn from the sampler (= the shadow policy), with
``log r = lp_dense - lp_shadow``: ``k1 = -log r``, ``k3 = r - 1 - log r`` (default: unbiased,
non-negative, low variance; Schulman's estimator), ``full``: the exact full-vocabulary KL
``sum_v p_teacher (log p_teacher - log p_student)`` (needs both logits; costs ``O(V)`` memory per
token). The trainer computes ``full`` on the vocab-parallel logits
(:func:`megatron_smd.parallel.vocab_parallel.vocab_parallel_distill_kl`); the dense form here is the
single-rank reference.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token_mean", "seq_mean", "sum"]
Direction = Literal["sparse_to_dense", "dense_to_sparse", "both"]
Estimator = Literal["k1", "k3", "full"]


# ------------------------------------------------------------------------------------- basics
def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean") -> torch.Tensor:
    """Reduce ``[N, T]`` to a scalar over ``mask``.

    ``token_mean``: every action token weighs the same (long answers dominate).
    ``seq_mean``: mean over each sequence's tokens, then over sequences with at least one token.
    ``sum``: plain masked sum, for callers that pre-normalise with per-token coefficients (the
    learner normalises over a whole mini-batch spread across micro-batches and DP ranks).
    """
    m = mask.to(per_token.dtype)
    if how == "sum":
        return (per_token * m).sum()
    if how == "token_mean":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if how == "seq_mean":
        n_tok = m.sum(-1)
        has = n_tok > 0
        per_seq = (per_token * m).sum(-1) / n_tok.clamp(min=1.0)
        return per_seq[has].sum() / has.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {how!r} (token_mean | seq_mean)")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: ``(r_i - mean_g) / (std_g + eps)`` within each group ``g`` (population std).

    ``normalize_std=False`` gives Dr. GRPO's ``r_i - mean_g``. A group whose rewards are all equal
    gets advantage 0 (no signal), never a division by ~0.

    rewards ``[N]`` float, group_ids ``[N]`` int -> ``[N]`` float32.
    """
    r = rewards.to(torch.float32)
    out = torch.zeros_like(r)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        rg = r[idx]
        centered = rg - rg.mean()
        if normalize_std:
            centered = centered / (rg.std(unbiased=False) + eps)
        out[idx] = centered
    return out


# ------------------------------------------------------------------------------------- PPO / GRPO
def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.2, weights: torch.Tensor | None = None,
                  aggregation: Aggregation = "token_mean") -> tuple[torch.Tensor, dict]:
    """PPO-clip surrogate ``-min(rho A, clip(rho, 1-eps_lo, 1+eps_hi) A)``, ``rho = exp(logp - logp_old)``.

    advantages ``[N]`` (broadcast over tokens) or ``[N, T]``; weights ``[N, T]`` (detached
    correction weights, e.g. truncated IS) multiply the per-token loss. Returns the scalar loss and
    detached statistics: ``clip_frac`` (fraction of action tokens where the clipped branch was
    taken), ``clip_count`` and ``tokens`` (its numerator and denominator, for callers that reduce
    over micro-batches and ranks), ``ratio_mean``, ``ratio_max``, ``ratio_min``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - logp_old)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    s1, s2 = ratio * advantages, clipped * advantages
    per_tok = -torch.minimum(s1, s2)
    if weights is not None:
        per_tok = per_tok * weights.detach()
    loss = aggregate(per_tok, mask, aggregation)
    with torch.no_grad():
        m = mask.bool()
        r = ratio[m]
        n_clip, n_tok = int(((s2 < s1) & m).sum()), int(m.sum())
        stats = {
            "clip_frac": n_clip / max(n_tok, 1),
            "clip_count": n_clip,
            "tokens": n_tok,
            "ratio_mean": float(r.mean()) if r.numel() else 1.0,
            "ratio_max": float(r.max()) if r.numel() else 1.0,
            "ratio_min": float(r.min()) if r.numel() else 1.0,
        }
    return loss, stats


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)`` on tokens from (approximately) pi_theta."""
    log_r = logp_ref - logp
    if kind == "k1":
        return -log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


# ------------------------------------------------------------------------------------- corrections
def truncated_is_weights(logp_dense_old: torch.Tensor, logp_sampler: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(pi_dense_old / pi_sampler, C)`` per token, detached."""
    return torch.exp(logp_dense_old - logp_sampler).clamp(max=cap).detach()


def sparse_rl_filter(logp_dense_old: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor, *,
                     reject_min: float = 1e-3, reject_mean: float = 2.0, weight_min: float = 0.0,
                     weight_max: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse-RL's sequence rejection and token reweighting (see module docstring).

    ``xi_t = exp(logp_dense_old - logp_sampler)``. A sequence is kept iff ``min_t xi_t >= reject_min``
    (no token the dense policy finds nearly impossible) and ``exp(mean_t log xi_t)`` lies in
    ``[1/reject_mean, reject_mean]``. Returns ``keep [N]`` bool and token weights ``[N, T]`` =
    ``clip(xi_t, weight_min, weight_max)`` on kept sequences' action tokens, 0 elsewhere.
    """
    m = mask.bool()
    log_xi = (logp_dense_old - logp_sampler).detach()
    big = torch.finfo(log_xi.dtype).max
    min_log_xi = torch.where(m, log_xi, torch.full_like(log_xi, big)).min(-1).values
    n = m.sum(-1).clamp(min=1)
    mean_log_xi = torch.where(m, log_xi, torch.zeros_like(log_xi)).sum(-1) / n
    import math

    keep = (min_log_xi >= math.log(reject_min)) & (mean_log_xi.abs() <= math.log(reject_mean)) & m.any(-1)
    w = log_xi.exp().clamp(weight_min, weight_max) * (m & keep.unsqueeze(-1))
    return keep, w


# ------------------------------------------------------------------------------------- distillation
def distill_kl(lp_shadow: torch.Tensor, lp_dense: torch.Tensor, mask: torch.Tensor, *,
               direction: Direction = "sparse_to_dense", estimator: Estimator = "k3",
               logits_shadow: torch.Tensor | None = None, logits_dense: torch.Tensor | None = None,
               aggregation: Aggregation = "token_mean", weights: torch.Tensor | None = None) -> torch.Tensor:
    """SMD's distillation term between the shadow-masked and the dense policy (module docstring).

    lp_* ``[N, T]`` log-probs of the sampled tokens; for ``estimator="full"`` pass the logits
    ``[N, T, V]`` whose row ``t`` is the distribution of ``tokens[t]`` (i.e. already shifted, at the
    model's temperature). ``weights [N, T]`` (detached) multiply the per-token term.
    """
    w = 1.0 if weights is None else weights.detach()
    if direction == "sparse_to_dense":
        s, d = lp_shadow.detach(), lp_dense
    elif direction == "dense_to_sparse":
        s, d = lp_shadow, lp_dense.detach()
    elif direction == "both":
        s, d = lp_shadow, lp_dense
    else:
        raise ValueError(f"unknown distillation direction {direction!r}")
    if estimator in ("k1", "k3"):
        log_r = d - s  # log pi_dense / pi_shadow on tokens drawn from pi_shadow
        per_tok = -log_r if estimator == "k1" else torch.expm1(log_r) - log_r
        return aggregate(per_tok * w, mask, aggregation)
    if estimator != "full":
        raise ValueError(f"unknown distillation estimator {estimator!r}")
    if logits_shadow is None or logits_dense is None:
        raise ValueError("estimator 'full' needs logits_shadow and logits_dense [N, T, V]")
    ls, ld = torch.log_softmax(logits_shadow.float(), -1), torch.log_softmax(logits_dense.float(), -1)
    if direction == "sparse_to_dense":  # teacher shadow: KL(shadow || dense)
        t, st = ls.detach(), ld
    elif direction == "dense_to_sparse":  # teacher dense: KL(dense || shadow)
        t, st = ld.detach(), ls
    else:  # symmetric pull: KL(shadow || dense), gradient to both
        t, st = ls, ld
    per_tok = (t.exp() * (t - st)).sum(-1)
    return aggregate(per_tok * w, mask, aggregation)


# ------------------------------------------------------------------------------------- mismatch metrics
def mismatch_metrics(logp_learner: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor) -> dict:
    """Sampler-vs-learner gap on action tokens: max and mean ``|d log p|``, KL k1 and k3 (sampler || learner)."""
    m = mask.bool()
    d = (logp_learner - logp_sampler).detach()[m].double()
    if d.numel() == 0:
        return {"max_abs_logprob_diff": 0.0, "mean_abs_logprob_diff": 0.0, "kl_k1": 0.0, "kl_k3": 0.0}
    return {
        "max_abs_logprob_diff": float(d.abs().max()),
        "mean_abs_logprob_diff": float(d.abs().mean()),
        "kl_k1": float((-d).mean()),
        "kl_k3": float((torch.expm1(d) - d).mean()),
    }
