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
