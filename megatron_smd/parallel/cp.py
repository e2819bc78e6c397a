"""Context parallelism (CP) for the shadow-mask core attention.

Megatron's CP layout (``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence of length
``s`` is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2*cp - 1 - r``,
concatenated (chunk ``r`` first). Pairing an early chunk with a late one balances causal work.
Every per-token tensor the model sees (tokens, labels, position ids, activations, Q/K/V) is in
that local layout; the shadow mask ``evict`` is *not*: it stays global (``[b, L, (H,) s]``,
absolute positions), because one rank's queries need the eviction steps of every key.

How the attention uses CP (see :class:`megatron_smd.learner.attention.ShadowCoreAttention`):

1. :func:`all_gather_cp` gathers K and V of all ranks and undoes the chunk permutation, so each
   rank holds the **global-order** K/V ``[s, b, ng, hn]``.
2. Each rank computes exact attention for its own ``s/cp`` query rows, whose global positions
   are :func:`local_positions`, against every key, with the global ``evict``.
3. Backward: each rank produces ``dL/dK_global`` for the part of the loss its queries touch; the
   gradient of a rank's own K rows is the **sum over ranks** of those, restricted to its two
   chunks. :class:`_AllGatherCP` does this with a reduce-scatter (NCCL, and gloo in recent torch)
   or with all-reduce + slice (gloo of older torch has no reduce-scatter; the all-reduce moves
   twice the bytes but is correct on every backend).

Why an all-gather of K/V rather than Ulysses all-to-all over heads or a ring (p2p):

* **Exact for any column-interval mask.** ``evict`` may hide arbitrary keys from arbitrary
  queries; with the full K/V present, a rank's attention is one ordinary masked softmax over all
  keys, no online-softmax merging of partial results and no per-step mask slicing.
* **The O(s) mask is never sliced or sent.** Ring attention would need, per step, the block of
  the mask for (local queries x the visiting key chunk); a2a would need every rank to see all
  queries. Here a rank only needs its query positions and the global ``evict``.
* **Works with every head count.** a2a needs ``ng_local`` (KV heads per TP rank) divisible by
  ``cp``, which small GQA models (2-8 KV heads) often are not after TP.
* **Cost.** Memory: the gathered K and V, ``2 * s * b * ng_local * hn`` elements per rank (the
  same as one unsharded layer's K/V); communication: ``(cp-1)/cp`` of that per layer forward and
  the same again (reduce-scatter) or twice (all-reduce) in backward. Not overlapped with compute.
  For the sequence lengths of RL post-training (<= 64K) and GQA, K/V is small next to the
  activations that CP does shard (MLP, Q, the attention output), so this is the simple, exact
  choice; a ring with FlashMask-style per-step column bounds would be the next step if K/V
  gathering ever dominates.

Only this module imports ``torch.distributed``; the attention math stays in
:mod:`megatron_smd.learner.attention`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from ..errors import ConfigError

GradReduce = Literal["auto", "reduce_scatter", "all_reduce"]


def _check_divisible(seq_len: int, cp_size: int, what: str) -> None:
    if cp_size < 1:
        raise ConfigError(f"{what}: context-parallel size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size) != 0:
        raise ConfigError(
            f"{what}: sequence length {seq_len} is not divisible by 2 * cp = {2 * cp_size} "
            f"(Megatron's load-balanced CP layout cuts the sequence into 2*cp equal chunks); "
            f"pad the batch to a multiple of {2 * cp_size}"
        )


def _check_rank(cp_rank: int, cp_size: int) -> None:
    if not 0 <= cp_rank < cp_size:
        raise ConfigError(f"context-parallel rank {cp_rank} is outside [0, {cp_size})")


def local_positions(seq_len: int, cp_rank: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of the rows a CP rank holds, in its local order.

    Args:
        seq_len: global sequence length ``s`` (divisible by ``2 * cp_size``).
        cp_rank / cp_size: this rank's position in the CP group and the group size.
    Returns:
        int64 ``[s / cp]``: ``[r*c, (r+1)*c) ++ [(2cp-1-r)*c, (2cp-r)*c)`` with ``c = s / (2cp)``.
        Strictly increasing (chunk ``r`` precedes chunk ``2cp-1-r``).
    """
    _check_rank(cp_rank, cp_size)
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    _check_divisible(seq_len, cp_size, "local_positions")
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def split_for_cp(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's slice of a per-token tensor, as Megatron's ``get_batch_on_this_cp_rank`` cuts it.

    For tokens, labels, loss masks and position ids (``seq_dim=1`` for ``[b, s]``) or activations
    (``seq_dim=0`` for ``[s, b, ...]``). Never apply it to ``evict``: the shadow mask stays
    global. Returns a new tensor with ``s / cp`` rows along ``seq_dim``.
    """
    _check_rank(cp_rank, cp_size)
    if cp_size == 1:
        return tensor
    seq_dim = seq_dim % tensor.dim()
    s = tensor.shape[seq_dim]
    _check_divisible(s, cp_size, f"split_for_cp (tensor of shape {list(tensor.shape)}, seq_dim {seq_dim})")
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def _global_from_rank_parts(parts: list[torch.Tensor], seq_dim: int) -> torch.Tensor:
    """``parts[r]`` is rank r's local tensor (chunks r, 2cp-1-r); returns the global order."""
    cp = len(parts)
    ordered: list[torch.Tensor | None] = [None] * (2 * cp)
    for r, part in enumerate(parts):
        first, second = part.chunk(2, dim=seq_dim)
        ordered[r] = first
        ordered[2 * cp - 1 - r] = second
    return torch.cat(ordered, dim=seq_dim)  # type: ignore[arg-type]


def _rank_parts_from_global(full: torch.Tensor, seq_dim: int, cp: int) -> list[torch.Tensor]:
    """Inverse of :func:`_global_from_rank_parts`: the local tensor of every rank."""
    chunks = full.chunk(2 * cp, dim=seq_dim)
    return [torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=seq_dim) for r in range(cp)]


class _AllGatherCP(torch.autograd.Function):
    """Forward: all-gather + un-permute to global order. Backward: sum over ranks, keep own chunks."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, seq_dim: int, group: dist.ProcessGroup, grad_reduce: str
    ) -> torch.Tensor:
        cp = dist.get_world_size(group)
        ctx.seq_dim, ctx.group, ctx.grad_reduce = seq_dim, group, grad_reduce
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x, group=group)
        return _global_from_rank_parts(parts, seq_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        group, seq_dim = ctx.group, ctx.seq_dim
        cp = dist.get_world_size(group)
        rank = dist.get_rank(group)
        # Each rank holds dL_r/dK_global for its own queries; the gradient of rank r's K rows is
        # sum_r' dL_r'/dK_global restricted to rank r's two chunks.
        per_rank = [p.contiguous() for p in _rank_parts_from_global(grad, seq_dim, cp)]
        if ctx.grad_reduce == "reduce_scatter":
            out = torch.empty_like(per_rank[rank])
            dist.reduce_scatter(out, per_rank, op=dist.ReduceOp.SUM, group=group)
        else:
            total = grad.contiguous().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            out = _rank_parts_from_global(total, seq_dim, cp)[rank]
        return out, None, None, None


def _resolve_grad_reduce(group: dist.ProcessGroup, grad_reduce: GradReduce) -> str:
    if grad_reduce not in ("auto", "reduce_scatter", "all_reduce"):
        raise ConfigError(f"grad_reduce must be 'auto', 'reduce_scatter' or 'all_reduce', got {grad_reduce!r}")
    if grad_reduce != "auto":
        return grad_reduce
    # gloo gained reduce_scatter only in recent torch; all_reduce + slice works everywhere.
    return "all_reduce" if dist.get_backend(group) == "gloo" else "reduce_scatter"


def all_gather_cp(
    x: torch.Tensor, seq_dim: int, group: dist.ProcessGroup, grad_reduce: GradReduce = "auto"
) -> torch.Tensor:
    """Gather a CP-sharded tensor (e.g. K or V ``[s/cp, b, ng, hn]``) into global sequence order.

    Args:
        x: this rank's local tensor in Megatron's CP layout (chunks ``r`` and ``2cp-1-r``).
        seq_dim: the sequence dimension of ``x``.
        group: the context-parallel process group.
        grad_reduce: how backward sums the gradient over ranks: ``"reduce_scatter"`` (half the
            bytes), ``"all_reduce"`` (all-reduce then keep the own chunks; every backend), or
            ``"auto"`` (all-reduce on gloo, reduce-scatter otherwise).
    Returns:
        ``x`` of every rank, reassembled so that index ``i`` along ``seq_dim`` is global position
        ``i`` (``s`` rows). Differentiable: the gradient reaching rank r's ``x`` is the sum over
        ranks of the gradients of its rows.
    """
    cp = dist.get_world_size(group)
    if cp == 1:
        return x
    return _AllGatherCP.apply(x, seq_dim % x.dim(), group, _resolve_grad_reduce(group, grad_reduce))
