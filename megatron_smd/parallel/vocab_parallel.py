"""Token log-probabilities from vocab-parallel logits (each TP rank holds a contiguous block of columns).

The parallel counterpart of :func:`megatron_smd.learner.logprobs.token_logprobs`: same result
(log-softmax over the first ``vocab_size`` columns of the full, padded vocabulary, divided by the
temperature, gathered at the target) without ever materializing the full ``[..., Vp]`` logits on
one rank. Three small all-reduces over the TP group (max, sum of exponentials, target logit), and
an autograd backward that needs none: ``d logp / d x_v = [v == target] - softmax(x)_v`` is local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..losses import DIRECTIONS, full_kl, teacher_student


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int,
                inv_temperature: float, group) -> torch.Tensor:
        x = logits.float() * inv_temperature  # [N, v] fresh tensor
        v_local = x.shape[-1]
        col = torch.arange(vocab_start, vocab_start + v_local, device=x.device)
        x = x.masked_fill(col >= vocab_size, float("-inf"))  # padded vocabulary is not a token

        m = x.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - m.unsqueeze(-1))
        s = e.sum(dim=-1)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        lse = torch.log(s) + m

        local_t = targets.long() - vocab_start
        here = (local_t >= 0) & (local_t < v_local)
        idx = local_t.clamp(0, v_local - 1)
        tgt = torch.where(here, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(m))
        dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)

        ctx.save_for_backward(e, s, idx, here)
        ctx.inv_temperature = inv_temperature
        ctx.in_dtype = logits.dtype
        return tgt - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        e, s, idx, here = ctx.saved_tensors
        softmax = e / s.unsqueeze(-1)  # the full-vocabulary softmax restricted to this rank's columns
        onehot = torch.zeros_like(softmax).scatter_(-1, idx.unsqueeze(-1), here.unsqueeze(-1).to(softmax.dtype))
        grad = (onehot - softmax) * (grad_out.unsqueeze(-1) * ctx.inv_temperature)
        return grad.to(ctx.in_dtype), None, None, None, None, None


def vocab_parallel_token_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                                  temperature: float = 1.0, group=None) -> torch.Tensor:
    """Per-token log-probs when the vocabulary is split over the TP ``group``.

    Args:
        logits_shard: ``[..., Vp / tp]``: this rank's contiguous block of the padded vocabulary
            (rank ``r`` holds columns ``[r * Vp/tp, (r+1) * Vp/tp)``, Megatron's
            ``VocabParallelEmbedding`` / ``ColumnParallelLinear`` layout).
        targets: ``[...]`` global token ids in ``[0, vocab_size)``, the same on every rank.
        vocab_size: the real (unpadded) vocabulary ``V``.
        temperature: > 0; logits are divided by it.
        group: the TP process group (default: Megatron's TP group).
    Returns:
        fp32 ``[...]``, identical on every rank of the group, differentiable w.r.t. ``logits_shard``.
    """
    if temperature <= 0:
        raise ValueError(f"vocab_parallel_token_logprobs: temperature must be > 0, got {temperature}")
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    v_local = logits_shard.shape[-1]
    if v_local * size < vocab_size:
        raise ValueError(f"vocab_parallel_token_logprobs: {size} shards of {v_local} columns cannot hold "
                         f"vocab_size={vocab_size}")
    lead = logits_shard.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"vocab_parallel_token_logprobs: targets {list(targets.shape)} do not match "
                         f"logits {list(logits_shard.shape)}")
    out = _VocabParallelLogprob.apply(logits_shard.reshape(-1, v_local), targets.reshape(-1), rank * v_local,
                                      vocab_size, 1.0 / temperature, group)
    return out.view(lead)


# ------------------------------------------------------------------------------ full-vocabulary KL
class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in the forward; identity in the backward. Every rank then holds the same
    total and computes the same loss from it, so ``d loss / d (this rank's part)`` is the gradient
    with respect to the total, which each rank already has (Megatron's ``reduce_from_tensor_model_
    parallel_region``, with an explicit group)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _AllReduceSumShared(torch.autograd.Function):
    """Sum over the group in the forward *and* the backward: for a total that every rank then uses
    in rank-local terms (the normaliser of a vocab-parallel softmax, which each rank's columns
    use), each rank's backward only sees its own terms' part of ``d loss / d total``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _group_sum(x: torch.Tensor, group, size: int, shared: bool = False) -> torch.Tensor:
    if size == 1:
        return x
    return (_AllReduceSumShared if shared else _AllReduceSum).apply(x, group)


def vocab_parallel_log_softmax(logits_shard: torch.Tensor, *, vocab_start: int, vocab_size: int,
                               temperature: float = 1.0, group=None, size: int = 1) -> torch.Tensor:
    """fp32 log-softmax over the real vocabulary of vocab-parallel logits, differentiable.

    Returns ``[..., n_valid]``: this rank's columns that are real tokens (``vocab_start + j <
    vocab_size``; padded columns are dropped, not set to ``-inf``, so nothing downstream multiplies
    ``0 * inf``). Two reductions over ``group``: the max (no gradient needed: it cancels) and the
    sum of exponentials (gradient through :class:`_AllReduceSumShared`: the normaliser is used by
    every rank's columns, so its gradient is summed over the group too). Meant to be reduced by a
    final :class:`_AllReduceSum` of per-rank terms (as :func:`vocab_parallel_distill_kl` does).
    """
    v_local = logits_shard.shape[-1]
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    x = logits_shard[..., :n_valid].float() / temperature
    lead = x.shape[:-1]
    with torch.no_grad():
        m = x.max(dim=-1).values if n_valid else torch.full(lead, float("-inf"), device=x.device)
        if size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    s = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
    lse = torch.log(_group_sum(s, group, size, shared=True)) + m
    return x - lse.unsqueeze(-1)


def vocab_parallel_distill_kl(logits_shadow: torch.Tensor, logits_dense: torch.Tensor, *, vocab_size: int,
                              direction: str = "sparse_to_dense", temperature: float = 1.0,
                              group=None) -> torch.Tensor:
    """Per-token exact full-vocabulary KL between the shadow-masked and the dense policy, with the
    vocabulary split over the TP ``group`` (no rank ever holds a ``[tokens, vocab]`` tensor of the
    whole vocabulary: each works on its ``Vp / tp`` columns; three ``[tokens]`` all-reduces).

    The same KL as :func:`megatron_smd.losses.distill_kl` with ``estimator="full"`` (the same
    teacher/student choice and formula, :func:`~megatron_smd.losses.teacher_student` and
    :func:`~megatron_smd.losses.full_kl`), the log-softmax taken vocabulary-parallel.

    ``direction`` (the distillation's student receives the gradient, the teacher is detached):

    * ``sparse_to_dense``: ``KL(shadow || dense)``, gradient to the dense logits;
    * ``dense_to_sparse``: ``KL(dense || shadow)``, gradient to the shadow logits;
    * ``both``: ``KL(shadow || dense)``, gradient to both.

    Args:
        logits_shadow / logits_dense: ``[..., Vp / tp]`` this rank's columns of the two forwards of
            the same tokens (Megatron's contiguous vocab-parallel layout); row ``t`` is the
            distribution of the next token.
        vocab_size: the real vocabulary ``V`` (padded columns are not tokens).
        temperature: the sampler's; the logits are divided by it.
        group: the TP group (default: Megatron's).
    Returns:
        fp32 ``[...]``, the same on every rank of the group.
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if logits_shadow.shape != logits_dense.shape:
        raise ValueError(f"vocab_parallel_distill_kl: shadow logits {list(logits_shadow.shape)} and dense "
                         f"logits {list(logits_dense.shape)} differ")
    v_local = logits_shadow.shape[-1]
    if v_local * size < vocab_size:
        raise ValueError(f"vocab_parallel_distill_kl: {size} shards of {v_local} columns cannot hold "
                         f"vocab_size={vocab_size}")
    if direction not in DIRECTIONS:
        raise ValueError(f"vocab_parallel_distill_kl: unknown direction {direction!r}")
    teacher, student = teacher_student(logits_shadow, logits_dense, direction)
    kw = dict(vocab_start=rank * v_local, vocab_size=vocab_size, temperature=temperature, group=group, size=size)
    lt = vocab_parallel_log_softmax(teacher, **kw)
    ls = vocab_parallel_log_softmax(student, **kw)
    return _group_sum(full_kl(lt, ls), group, size)
