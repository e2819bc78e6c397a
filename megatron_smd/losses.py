"""Advantages, policy losses, correction modes and the SMD distillation term: pure tensor functions.

Shapes: ``N`` trajectories, ``T`` padded positions. Per-token tensors are ``[N, T]``, all of one
alignment (the trainer passes the learner's, :mod:`megatron_smd.learner.batch`: entry ``t`` is the
prediction of ``tokens[t + 1]``); ``mask [N, T]`` is True on completion tokens (the actions).
Cross-rank reductions are *not* done here: every function returns local sums or means and the
caller reduces.

The trainer's whole loss path is :func:`apply_correction` (once per rollout, before the update: the
PPO ratio's old log-probs, the correction weights, Sparse-RL's rejection) and :func:`correction_loss`
(per micro-batch: PPO-clip with those weights, the KL to the reference model, SMD's distillation),
with :func:`minibatch_coefficients` normalising over a mini-batch split across micro-batches and ranks.

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

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from .config import AlgorithmConfig

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


def kl_estimate(log_r: torch.Tensor, kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(p || q)`` on tokens drawn from ``p``, with ``log_r = log q - log p``:
    ``k1 = -log r``, ``k3 = r - 1 - log r`` (Schulman's: unbiased, non-negative). The one estimator
    behind :func:`kl_penalty`, :func:`distill_kl` and :func:`mismatch_metrics`."""
    if kind == "k1":
        return -log_r
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, kind: Literal["k1", "k3"] = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi_theta || pi_ref)`` on tokens from (approximately) pi_theta."""
    return kl_estimate(logp_ref - logp, kind)


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
    keep = (min_log_xi >= math.log(reject_min)) & (mean_log_xi.abs() <= math.log(reject_mean)) & m.any(-1)
    w = log_xi.exp().clamp(weight_min, weight_max) * (m & keep.unsqueeze(-1))
    return keep, w


def learner_mode(correction: str) -> str:
    """The learner forward a correction mode trains: ``shadow`` (the rollout's mask replayed) for
    ``smd``, ``dense`` for every other mode."""
    return "shadow" if correction == "smd" else "dense"


@dataclass
class Correction:
    """A correction mode applied to one rollout (:func:`apply_correction`); ``[N, T]`` tensors.

    Attributes:
        lp_old: the PPO ratio's denominator.
        weights: detached per-token weights of the PPO term (1 where the mode has none).
        mask: the action tokens that train (Sparse-RL's rejected sequences removed).
        stats: ``correction/*`` statistics.
    """

    lp_old: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    stats: dict = field(default_factory=dict)


def apply_correction(alg: "AlgorithmConfig", *, lp_sampler: torch.Tensor, lp_dense_old: torch.Tensor,
                     mask: torch.Tensor) -> Correction:
    """The correction mode ``alg.correction`` (module docstring's table) before the update: which old
    log-probs the PPO ratio uses, the TIS weights, Sparse-RL's rejection and reweighting. ``lp_dense_old``
    is the learner's dense log-prob at the parameters that sampled (used by ``tis`` and
    ``sparse_rl``). SMD's distillation term is per micro-batch, in :func:`correction_loss`."""
    mode = alg.correction
    weights = torch.ones_like(lp_sampler)
    lp_old = lp_sampler
    stats = {}
    if mode == "tis":
        lp_old, weights = lp_dense_old, truncated_is_weights(lp_dense_old, lp_sampler, alg.tis_cap)
    elif mode == "sparse_rl":
        sr = alg.sparse_rl
        keep, weights = sparse_rl_filter(lp_dense_old, lp_sampler, mask, reject_min=sr.reject_min,
                                         reject_mean=sr.reject_mean, weight_min=sr.weight_min,
                                         weight_max=sr.weight_max)
        lp_old, mask = lp_dense_old, mask & keep.view(-1, 1)
        stats["correction/rejection_rate"] = 1.0 - float(keep.float().mean())
    elif mode not in ("dense", "naive", "smd"):
        raise ValueError(f"unknown correction mode {mode!r}")
    if mode in ("tis", "sparse_rl"):
        w = weights[mask]
        stats["correction/weight_mean"] = float(w.mean()) if w.numel() else 0.0
    return Correction(lp_old=lp_old, weights=weights, mask=mask, stats=stats)


def distills(alg: "AlgorithmConfig") -> bool:
    """Whether the update carries SMD's distillation term (then every micro-batch holds the shadow
    and the dense forward of the same tokens)."""
    return alg.correction == "smd" and alg.distill.coef > 0


# Opt-in view of correction_loss's terms (see capture_terms); None = nobody is looking.
_TERMS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("smd_loss_terms", default=None)


@contextlib.contextmanager
def capture_terms():
    """Within the context, :func:`correction_loss` also puts the terms it adds into the yielded dict:
    ``ppo`` (the clipped surrogate), ``kl_ref`` and ``distill`` (each with its coefficient), as the
    tensors it sums, still attached to the graph. What it returns is unchanged. Used by
    :meth:`megatron_smd.learner.learner.Learner.step` to measure each term's gradient norm."""
    d: dict[str, torch.Tensor] = {}
    tok = _TERMS.set(d)
    try:
        yield d
    finally:
        _TERMS.reset(tok)


def correction_loss(alg: "AlgorithmConfig", lp: torch.Tensor, *, lp_old: torch.Tensor, adv: torch.Tensor,
                    coef: torch.Tensor, weights: torch.Tensor, lp_ref: torch.Tensor | None = None,
                    lp_dense: torch.Tensor | None = None, full_kl_per_token: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict, int]:
    """One micro-batch's loss, a plain sum with the mini-batch's coefficients ``coef``
    (:func:`minibatch_coefficients`; > 0 exactly on the action tokens):

    PPO-clip of ``lp`` against ``lp_old`` with the correction ``weights``, plus ``alg.kl_coef`` times
    the KL to the reference model (``lp_ref``, when given and ``kl_coef > 0``), plus, when
    distilling (``lp_dense``: the dense forward of the same tokens), ``alg.distill.coef`` times the
    distillation KL between ``lp`` (shadow) and ``lp_dense``; for ``estimator: full`` its per-token
    value is ``full_kl_per_token`` (computed by the caller on the vocabulary-parallel logits).

    Returns ``(loss, sums, action_tokens)``; ``sums`` holds this micro-batch's ``clip_count``,
    ``action_tokens``, ``coef_sum`` and, when present, ``kl_ref_sum`` and ``distill_sum``.
    """
    c, m = coef, coef > 0
    loss, st = ppo_clip_loss(lp, lp_old, adv, m, clip_low=alg.clip_low, clip_high=alg.clip_high,
                             weights=c * weights, aggregation="sum")
    sums = {"clip_count": st["clip_count"], "action_tokens": st["tokens"], "coef_sum": float(c.sum())}
    terms = _TERMS.get()
    if terms is not None:
        terms["ppo"] = loss
    if lp_ref is not None and alg.kl_coef > 0:
        kl = ((kl_penalty(lp, lp_ref, alg.kl_estimator)) * c).sum()
        sums["kl_ref_sum"] = float(kl.detach())
        if terms is not None:
            terms["kl_ref"] = alg.kl_coef * kl
        loss = loss + alg.kl_coef * kl
    if lp_dense is not None:
        d = alg.distill
        if d.estimator == "full":
            dk = (full_kl_per_token * c * m).sum()
        else:
            dk = distill_kl(lp, lp_dense, m, direction=d.direction, estimator=d.estimator, weights=c,
                            aggregation="sum")
        sums["distill_sum"] = float(dk.detach())
        if terms is not None:
            terms["distill"] = d.coef * dk
        loss = loss + d.coef * dk
    return loss, sums, int(m.sum())


def minibatch_coefficients(mask: torch.Tensor, ids: list[int], how: str) -> torch.Tensor:
    """Per-token loss coefficients ``[N, T]`` over the mini-batch ``ids`` (0 elsewhere), so that
    their plain sum over any split of the mini-batch is its ``token_mean`` or ``seq_mean``."""
    c = torch.zeros(mask.shape)
    m = mask[ids].float()
    if how == "token_mean":
        c[ids] = m / m.sum().clamp(min=1.0)
    else:  # seq_mean
        n_tok = m.sum(-1, keepdim=True)
        n_seq = (n_tok > 0).sum().clamp(min=1)
        c[ids] = m / n_tok.clamp(min=1.0) / n_seq
    return c


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
    s, d = detach_teacher(lp_shadow, lp_dense, direction)
    if estimator in ("k1", "k3"):
        # log pi_dense / pi_shadow on tokens drawn from pi_shadow
        return aggregate(kl_estimate(d - s, estimator) * w, mask, aggregation)
    if estimator != "full":
        raise ValueError(f"unknown distillation estimator {estimator!r}")
    if logits_shadow is None or logits_dense is None:
        raise ValueError("estimator 'full' needs logits_shadow and logits_dense [N, T, V]")
    ls, ld = torch.log_softmax(logits_shadow.float(), -1), torch.log_softmax(logits_dense.float(), -1)
    t, st = teacher_student(ls, ld, direction)
    return aggregate(full_kl(t, st) * w, mask, aggregation)


DIRECTIONS = ("sparse_to_dense", "dense_to_sparse", "both")


def detach_teacher(shadow: torch.Tensor, dense: torch.Tensor, direction: Direction
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shadow, dense)`` with the side that only teaches detached (module docstring)."""
    if direction == "sparse_to_dense":
        return shadow.detach(), dense
    if direction == "dense_to_sparse":
        return shadow, dense.detach()
    if direction == "both":
        return shadow, dense
    raise ValueError(f"unknown distillation direction {direction!r}")


def teacher_student(shadow: torch.Tensor, dense: torch.Tensor, direction: Direction
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-vocabulary KL's ``(teacher, student)``: ``KL(shadow || dense)`` for
    ``sparse_to_dense`` and ``both``, ``KL(dense || shadow)`` for ``dense_to_sparse``; the teacher
    is detached except for ``both``."""
    s, d = detach_teacher(shadow, dense, direction)
    return (d, s) if direction == "dense_to_sparse" else (s, d)


def full_kl(logp_teacher: torch.Tensor, logp_student: torch.Tensor) -> torch.Tensor:
    """``sum_v p_teacher (log p_teacher - log p_student)`` over the last axis (log-softmaxed inputs;
    under TP a rank's columns, summed over the group by the caller)."""
    return (logp_teacher.exp() * (logp_teacher - logp_student)).sum(-1)


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
        "kl_k1": float(kl_estimate(d, "k1").mean()),
        "kl_k3": float(kl_estimate(d, "k3").mean()),
    }
