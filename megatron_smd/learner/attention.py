"""The learner's core attention: Megatron-Core attention that replays the rollout's shadow mask.

``ShadowCoreAttention`` drops into a Megatron GPT layer spec in place of the local
``DotProductAttention`` (or TE's ``TEDotProductAttention``)::

    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=ShadowCoreAttention, params={"backend": "flex"})

Megatron builds it with the same keyword arguments it gives its own core attention and calls
``forward(query, key, value, attention_mask, attn_mask_type=..., attention_bias=...,
packed_seq_params=...)`` with RoPE already applied and GQA heads not expanded.

**The mask.** ``attention_mask`` carries the shadow mask itself, the int32 ``evict`` tensor of
:mod:`megatron_smd.mask`, for the whole micro-batch and every layer:

* ``[b, L, s]`` (one eviction schedule per layer) or ``[b, L, H_kv, s]`` (per KV head; ``H_kv``
  is the model's *global* KV-head count, or 1 to broadcast);
* ``L`` = ``config.num_layers`` (the whole model, also under pipeline parallelism), indexed with
  the global 1-based ``layer_number`` (row ``layer_number - 1``);
* ``s`` = the *global* sequence length, never sliced for context parallelism;
* query ``i`` sees key ``j`` iff ``j <= i < evict[j]``: causal, document (packed rows store
  absolute positions and "never evicted" = end of the key's own document) and eviction masks in
  one ``O(s)`` vector per layer.
* ``None`` means plain causal attention (with THD: causal within each ``cu_seqlens`` document).

Rows with no visible key at all (padding positions, where ``evict = 0``) are given their own
diagonal, i.e. every backend uses ``max(evict[j], j + 1)``: real rows are unchanged (a real key
already has ``evict[j] >= j + 1``, and no real query sees a padding key), but no softmax is
taken over an empty row, so padded rows stay finite on every kernel (an empty row is NaN for a
plain softmax and kernel-defined elsewhere).

**Backends** (``backend=``), with their memory per layer and micro-batch (``sq`` local query
rows, ``s`` keys, ``hq`` local query heads):

* ``"sdpa"`` - the reference and the CPU training path. Builds a dense boolean mask from
  ``evict`` (``megatron_smd.mask.layer_dense``) and calls ``torch.nn.functional.
  scaled_dot_product_attention`` (GQA via ``enable_gqa``). Mask memory ``b * sq * s`` bytes for
  per-layer masks, ``b * hq * sq * s`` for per-head masks (expanded to query heads), kept alive
  for backward. Plain causal (``attention_mask=None``, no CP) takes SDPA's ``is_causal`` path
  with no mask tensor.
* ``"flex"`` - the GPU path. ``torch.nn.attention.flex_attention`` with a ``mask_mod`` that
  reads ``evict`` (``kv <= q < evict[b, (h,) kv]``) and a ``BlockMask`` built once per layer and
  micro-batch (cached on the ``evict`` tensor's memory and version, so activation recompute
  reuses it). The BlockMask is built directly from the per-block min/max of the column intervals
  (:func:`block_mask_from_intervals`, ``O(b * h * (s + (sq/B) * (s/B)))`` time and memory,
  ``B`` = block size), not by evaluating ``mask_mod`` on all ``sq * s`` pairs as
  ``create_block_mask`` does. Kernel memory is
  ``O(sq * hq * hn)``: no score or mask matrix. Compiled with ``torch.compile`` on CUDA. On CPU
  torch runs FlexAttention forward only (eager, unfused math: it materialises the scores) and
  refuses backward; under autograd on CPU this backend raises unless ``flex_cpu_grad_fallback=
  True`` was given, in which case it computes the identical mask with ``"sdpa"``.
* ``"te"`` - Transformer Engine ``DotProductAttention`` on GPU (imported lazily; refused with a
  clear message when TE or CUDA is missing). Mask forms (``te_mask_form=``), most compact first:

  - ``"score_mod"`` (TE >= 2.17 with ``nvidia-cudnn-frontend``, fp16/bf16 only): cuDNN score
    modifier evaluating ``kv <= q_pos[q] < evict[kv]`` from ``O(s)`` runtime tensors
    (``evict [b, 1|hq, 1, s]``, ``q_pos [1, 1, sq, 1]``). No mask matrix, but no tile skipping
    either (full ``sq * s`` compute).
  - ``"bias"``: post-scale bias ``[b, 1|hq, sq, s]`` (0 or the dtype's minimum), with TE's
    ``causal`` mask type when the local rows are ``0..s-1`` (no CP) so cuDNN skips the upper
    triangle, ``no_mask`` otherwise. ``2 * b * (1|hq) * sq * s`` bytes (bf16), freed after the
    layer's backward.
  - ``"arbitrary"``: boolean mask of the same shape (1 byte per entry); TE runs it only on its
    unfused backend (``O(sq * s)`` scores in memory).

  ``"auto"`` chooses once, on the first call for a dtype / head / mask layout, by trying what TE
  accepts for these inputs: ``score_mod`` (fp16/bf16 and a TE that has it), then ``bias``, then
  ``arbitrary``; every form left out or refused is logged with TE's reason
  (:func:`te_select_form`), and a :class:`ConfigError` lists them all if TE refuses every one.
  fp32 has no fused TE kernel: it runs TE's unfused attention (``O(sq * s)`` scores), logged.
  ``attention_mask=None`` without CP uses TE's own ``causal`` mask type (no mask tensor).

**Tensor parallelism.** Each TP rank holds ``hq = np / tp`` query heads and ``ng / tp`` KV groups;
rank ``r`` uses KV heads ``[r * ng/tp, (r+1) * ng/tp)`` of a per-head mask. When
``num_query_groups < tp`` Megatron replicates KV groups and hands the core attention a config
with ``num_query_groups = tp``; then a per-head mask with ``H_kv`` heads (``H_kv`` dividing
``tp``) is read as the model's true head count and rank ``r`` uses head ``r // (tp / H_kv)``,
exactly the group Megatron gave it.

**Context parallelism.** With a CP group of size ``cp > 1`` (from ``pg_collection.cp``, else
``megatron.core.parallel_state``), K and V are all-gathered in global order
(:func:`megatron_smd.parallel.cp.all_gather_cp`) and each rank computes exact attention for its
``s / cp`` local query rows (global positions :func:`megatron_smd.parallel.cp.local_positions`)
against all ``s`` keys with the global ``evict``. All-gather rather than a ring or Ulysses a2a
(details in :mod:`megatron_smd.parallel.cp`): one exact masked softmax per rank for any
column-interval mask, the ``O(s)`` mask is never sliced or sent, any KV-head count works; the
cost is the gathered K/V, ``2 * s * b * ng_local * hn`` elements per rank per layer. The
``cp_comm_type`` argument is accepted for interface compatibility; the exchange is always this
all-gather. THD with CP is refused (Megatron's THD CP layout partitions each document separately).

**THD.** With ``packed_seq_params.qkv_format == "thd"`` Megatron squeezes the batch dim and
passes ``[t, heads, hn]``; this module treats it as one packed row (``b = 1``; ``evict`` is
``[1, L, t]`` / ``[1, L, H_kv, t]`` with absolute positions, or ``None`` for causal-per-document
from ``cu_seqlens_q(_padded)``) and returns ``[t, hq * hn]``.

Numerics: no dropout (replay must be deterministic; a non-zero ``attention_dropout`` is refused),
vanilla softmax only, ``softmax_scale`` default ``1/sqrt(hn)``. ``apply_query_key_layer_scaling``
is ignored: Megatron divides the scale by ``layer_number`` and multiplies the scores back by it
inside its fused softmax, so the product is the same.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import get_pg_rank, get_pg_size

from ..errors import ConfigError, MaskError, SMDError
from ..mask import EVICT_DTYPE, layer_dense, seq_end_from_cu
from ..parallel import cp as cp_utils

_log = logging.getLogger(__name__)

Backend = Literal["sdpa", "flex", "te"]
TEMaskForm = Literal["auto", "score_mod", "bias", "arbitrary"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "te")
DEFAULT_FLEX_BLOCK = 128


# ================================================================================================
# Mask helpers (pure tensor functions)
# ================================================================================================


def effective_evict(evict_layer: Tensor) -> Tensor:
    """``max(evict[..., j], j + 1)``: give rows with no visible key their own diagonal.

    ``evict_layer`` is ``[..., s]`` (any leading batch/head dims); returns int32 of the same shape.
    Real keys already satisfy ``evict[j] >= j + 1`` (``megatron_smd.mask.validate_evict``), so only
    padding keys (``evict = 0``) change, and they become visible to their own row only.
    """
    s = evict_layer.shape[-1]
    diag = torch.arange(1, s + 1, device=evict_layer.device, dtype=evict_layer.dtype)
    return torch.maximum(evict_layer, diag).to(EVICT_DTYPE)


def visible_dense(evict_eff: Optional[Tensor], q_pos: Optional[Tensor], kv_len: int, device: torch.device) -> Tensor:
    """Dense "may attend" mask.

    Args:
        evict_eff: ``None`` (causal) or ``[b, s]`` / ``[b, h, s]`` effective eviction steps.
        q_pos: ``[sq]`` global positions of the query rows (``None``: ``0..s-1``).
    Returns:
        bool ``[1, 1, sq, s]`` (causal), ``[b, 1, sq, s]`` (per-layer) or ``[b, h, sq, s]``.
    """
    if q_pos is None:
        q_pos = torch.arange(kv_len, device=device)
    if evict_eff is None:
        j = torch.arange(kv_len, device=device)
        return (j.view(1, -1) <= q_pos.view(-1, 1)).view(1, 1, q_pos.numel(), kv_len)
    vis = layer_dense(evict_eff, q_pos)  # [b, (h,) sq, s]
    return vis.unsqueeze(1) if evict_eff.dim() == 2 else vis


def _expand_heads(t: Tensor, group: int, dim: int = 1) -> Tensor:
    """Repeat each KV-head slice ``group`` times along ``dim`` (KV heads -> query heads)."""
    if group == 1:
        return t
    shape = list(t.shape)
    t = t.unsqueeze(dim + 1).expand(*shape[: dim + 1], group, *shape[dim + 1 :])
    shape[dim] *= group
    return t.reshape(shape)


def shadow_mask_mod(evict_eff: Optional[Tensor], q_pos: Optional[Tensor], group: int = 1) -> Callable:
    """FlexAttention ``mask_mod`` for the shadow mask.

    ``mask_mod(b, h, q, kv) = kv <= q_pos[q] < evict_eff[b, (h // group,) kv]``; ``h`` is the query
    head, ``group = hq / h_kv`` maps it to its KV head. ``q_pos=None`` means ``q_pos[q] = q``.
    ``evict_eff=None`` gives plain causal (it never reads ``b``, so a B=1 BlockMask broadcasts).
    """
    if evict_eff is None:
        if q_pos is None:
            def causal(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx
            return causal

        def causal_cp(b, h, q_idx, kv_idx):
            return kv_idx <= q_pos[q_idx]
        return causal_cp

    per_head = evict_eff.dim() == 3
    if q_pos is None:
        if per_head:
            def mm_head(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx < evict_eff[b, h // group, kv_idx])
            return mm_head

        def mm_layer(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < evict_eff[b, kv_idx])
        return mm_layer

    if per_head:
        def mm_head_cp(b, h, q_idx, kv_idx):
            qg = q_pos[q_idx]
            return (kv_idx <= qg) & (qg < evict_eff[b, h // group, kv_idx])
        return mm_head_cp

    def mm_layer_cp(b, h, q_idx, kv_idx):
        qg = q_pos[q_idx]
        return (kv_idx <= qg) & (qg < evict_eff[b, kv_idx])
    return mm_layer_cp


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Dense block table ``[B, H, nq, nk]`` (bool) -> (count, indices) in FlexAttention's order."""
    as_int = blocks.to(torch.int32)
    num = as_int.sum(-1, dtype=torch.int32)
    idx = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def interval_block_tables(
    evict_eff: Tensor, q_pos: Tensor, kv_len: int, block: int = DEFAULT_FLEX_BLOCK
) -> tuple[Tensor, Tensor]:
    """Partial and full block tables of the shadow mask from its column intervals.

    Column ``k`` is visible to the global query rows ``[k, evict_eff[k])``. For a tile of query
    rows ``Q`` (its global positions: one or two contiguous runs) and keys ``K``:

    * some pair visible <=> some run ``[lo, hi]`` and key ``k`` in ``K`` with ``k <= hi`` and
      ``evict_eff[k] > lo``. The keys ``<= hi`` are whole tiles before ``hi``'s tile (use the tile
      max of ``evict``) plus a prefix of ``hi``'s tile (use the within-tile running max at ``hi``);
    * all pairs visible <=> ``max K <= min Q`` and ``min_K evict > max Q`` and the tile lies
      inside both lengths (``create_block_mask`` pads with masked entries, so edge tiles are
      never "full").

    Args:
        evict_eff: ``[B, H, s]`` effective eviction steps (``H`` = 1 or KV heads).
        q_pos: ``[sq]`` global positions of the local query rows (increasing within each run).
        kv_len: ``s``.
        block: tile size (same for queries and keys).
    Returns:
        ``(partial, full)`` bool ``[B, H, ceil(sq/block), ceil(s/block)]``, disjoint.
        ``O(B*H*(s + nq*nk))`` time and memory instead of ``O(B*H*sq*s)``.
    """
    B, H, S = evict_eff.shape
    if S != kv_len:
        raise MaskError(f"interval_block_tables: evict has length {S}, keys have length {kv_len}")
    dev = evict_eff.device
    sq = q_pos.numel()
    nqb, nkb = -(-sq // block), -(-S // block)
    pad = nkb * block - S
    big = torch.iinfo(torch.int64).max
    e = evict_eff.to(torch.int64)
    e_blocks = F.pad(e, (0, pad), value=0).view(B, H, nkb, block)  # padded keys: seen by nobody
    e_tile_max = e_blocks.amax(-1)  # [B, H, nkb]
    e_run_max = e_blocks.cummax(-1).values.reshape(B, H, nkb * block)
    e_tile_min = F.pad(e, (0, pad), value=big).view(B, H, nkb, block).amin(-1)

    # Runs of consecutive global positions inside each query tile.
    q_pos = q_pos.to(device=dev, dtype=torch.int64)
    rows = torch.arange(sq, device=dev)
    starts = rows % block == 0
    starts[1:] |= q_pos[1:] != q_pos[:-1] + 1
    s_idx = starts.nonzero().squeeze(1)
    e_idx = torch.cat([s_idx[1:] - 1, torch.tensor([sq - 1], device=dev)])
    lo, hi, seg_tile = q_pos[s_idx], q_pos[e_idx], s_idx // block  # [nseg]

    tiles = torch.arange(nkb, device=dev)
    hi_tile = hi // block
    before = tiles.view(1, -1) < hi_tile.view(-1, 1)  # [nseg, nkb]: whole tile at or below hi
    at = tiles.view(1, -1) == hi_tile.view(-1, 1)  # [nseg, nkb]: tile containing hi
    run_max_at_hi = e_run_max[..., hi.clamp(max=nkb * block - 1)]  # [B, H, nseg]
    seg_any = (before & (e_tile_max.unsqueeze(-2) > lo.view(-1, 1))) | (
        at & (run_max_at_hi > lo).unsqueeze(-1)
    )  # [B, H, nseg, nkb]
    any_tile = torch.zeros(B, H, nqb, nkb, dtype=torch.int32, device=dev)
    any_tile.index_add_(2, seg_tile, seg_any.to(torch.int32))

    q_min = torch.full((nqb,), big, dtype=torch.int64, device=dev).scatter_reduce(0, seg_tile, lo, "amin")
    q_max = torch.full((nqb,), -1, dtype=torch.int64, device=dev).scatter_reduce(0, seg_tile, hi, "amax")
    k_max = (tiles + 1) * block - 1
    q_complete = (torch.arange(nqb, device=dev) + 1) * block <= sq
    k_complete = (tiles + 1) * block <= S
    full = (
        (k_max.view(1, -1) <= q_min.view(-1, 1))
        & (e_tile_min.unsqueeze(-2) > q_max.view(-1, 1))
        & q_complete.view(-1, 1)
        & k_complete.view(1, -1)
    )  # [B, H, nqb, nkb]
    partial = (any_tile > 0) & ~full
    return partial, full


def block_mask_from_intervals(
    evict_eff: Optional[Tensor],
    q_pos: Optional[Tensor],
    kv_len: int,
    *,
    num_q_heads: int,
    block: int = DEFAULT_FLEX_BLOCK,
) -> BlockMask:
    """FlexAttention ``BlockMask`` of the shadow mask, built from column intervals.

    Args:
        evict_eff: ``None`` (causal), ``[b, s]`` or ``[b, h_kv, s]``.
        q_pos: ``[sq]`` global query positions (``None``: ``0..s-1``).
        num_q_heads: query heads of the attention call (per-head masks are expanded to them).
    Returns:
        A BlockMask equal to ``create_block_mask(shadow_mask_mod(...), B, H, sq, s,
        BLOCK_SIZE=block)`` (``B, H`` = 1 where the mask broadcasts), at ``O(s)`` cost per
        query tile instead of ``O(block * s)``.
    """
    device = evict_eff.device if evict_eff is not None else (q_pos.device if q_pos is not None else None)
    qp = q_pos if q_pos is not None else torch.arange(kv_len, device=device)
    group = 1
    if evict_eff is None:
        e3 = torch.full((1, 1, kv_len), kv_len, dtype=torch.int64, device=device)
    elif evict_eff.dim() == 2:
        e3 = evict_eff.unsqueeze(1)
    else:
        e3 = evict_eff
        group = num_q_heads // evict_eff.shape[1]
    partial, full = interval_block_tables(e3, qp, kv_len, block)
    if group > 1:
        partial, full = _expand_heads(partial, group), _expand_heads(full, group)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(block, block),
        mask_mod=shadow_mask_mod(evict_eff, q_pos, group),
        seq_lengths=(qp.numel(), kv_len),
    )


def block_mask_by_enumeration(
    evict_eff: Optional[Tensor],
    q_pos: Optional[Tensor],
    kv_len: int,
    *,
    num_q_heads: int,
    block: int = DEFAULT_FLEX_BLOCK,
) -> BlockMask:
    """The same BlockMask through torch's ``create_block_mask`` (evaluates all ``sq * s`` pairs).

    Kept as the independent construction that :func:`block_mask_from_intervals` is tested against.
    """
    sq = q_pos.numel() if q_pos is not None else kv_len
    if evict_eff is None:
        B, H, group, dev = 1, 1, 1, (q_pos.device if q_pos is not None else None)
    elif evict_eff.dim() == 2:
        B, H, group, dev = evict_eff.shape[0], 1, 1, evict_eff.device
    else:
        B, H, dev = evict_eff.shape[0], num_q_heads, evict_eff.device
        group = num_q_heads // evict_eff.shape[1]
    return create_block_mask(
        shadow_mask_mod(evict_eff, q_pos, group), B, H, sq, kv_len, device=dev, BLOCK_SIZE=block
    )


# ================================================================================================
# Backend kernels. q: [sq, b, hq, hn]; k, v: [s, b, hkv, hn] in global key order.
# evict_eff: None | [b, s] | [b, hkv_local, s]; q_pos: None (rows are 0..s-1) | [sq].
# All return [sq, b, hq * hn].
# ================================================================================================


def _to_bhsd(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0, 3)


def _from_bhsd(o: Tensor) -> Tensor:
    b, h, sq, d = o.shape
    return o.permute(2, 0, 1, 3).reshape(sq, b, h * d)


def sdpa_shadow_attention(
    q: Tensor, k: Tensor, v: Tensor, evict_eff: Optional[Tensor], q_pos: Optional[Tensor], scale: float
) -> Tensor:
    """Dense-mask SDPA (the reference path). Mask memory: see the module docstring."""
    hq, hkv, s = q.shape[2], k.shape[2], k.shape[0]
    qb, kb, vb = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
    gqa = hq != hkv
    if evict_eff is None and q_pos is None:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return _from_bhsd(out)
    mask = visible_dense(evict_eff, q_pos, s, q.device)
    if mask.shape[1] > 1:
        mask = _expand_heads(mask, hq // mask.shape[1])
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return _from_bhsd(out)


_COMPILED_FLEX: Optional[Callable] = None
#: ``torch.compile`` backend of the flex kernel (tests swap in a graph-counting backend).
FLEX_COMPILE_BACKEND: Any = "inductor"


def _flex_kernel(device: torch.device, compile_flex: Optional[bool]) -> Callable:
    """Compiled ``flex_attention`` on CUDA (the eager version is an unfused reference).

    Static shapes (``dynamic=False``: fixed-size kernels, no symbolic-shape guards), fed only
    bucketed row lengths (:func:`flex_bucket_length`), so a run compiles one graph per bucket and
    batch shape instead of one per row length (past dynamo's recompile limit torch would fall back
    to eager flex, which materialises the whole score matrix)."""
    global _COMPILED_FLEX
    use_compile = (device.type == "cuda") if compile_flex is None else compile_flex
    if not use_compile:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False, backend=FLEX_COMPILE_BACKEND)
    return _COMPILED_FLEX


def flex_bucket_length(seq_len: int, block: int) -> int:
    """The padded row length flex runs at: the smallest ``2^k`` or ``3 * 2^(k-1)`` that holds
    ``seq_len``, rounded up to a multiple of the block size. At most 1.5x the row (a third of
    the work padding in the worst case, under a quarter on average) and two buckets per octave:
    rows from 100 to 4000 tokens compile 10 graphs at block 128, whatever their lengths."""
    b = max(1, int(block))
    p = 1
    while p < seq_len:
        p *= 2
    target = p if p // 4 * 3 < seq_len or p < 4 else p // 4 * 3
    return -(-max(target, seq_len) // b) * b


def pad_rows_for_flex(q: Tensor, k: Tensor, v: Tensor, evict_eff: Optional[Tensor], padded: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pad ``[s, b, h, hn]`` q/k/v with zero rows to ``padded`` and the effective mask with padded
    keys that are their own document (``evict = padded``): a real query ``i < s`` never sees a
    padded key (causal), a padded query sees only padded keys (a real key's ``evict <= s``), so
    the real rows' outputs are unchanged and the padded ones finite."""
    s = q.shape[0]
    extra = padded - s
    pad = lambda t: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], 0)  # noqa: E731
    if evict_eff is None:  # causal: every key stays visible to all later rows
        evict_eff = torch.full((q.shape[1], s), s, dtype=EVICT_DTYPE, device=q.device)
    tail = torch.full((*evict_eff.shape[:-1], extra), padded, dtype=evict_eff.dtype, device=evict_eff.device)
    return pad(q), pad(k), pad(v), torch.cat([evict_eff, tail], -1)


def flex_shadow_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float, compile_flex: Optional[bool] = None
) -> Tensor:
    """FlexAttention with a prebuilt shadow BlockMask (its ``mask_mod`` reads ``evict``)."""
    qb, kb, vb = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
    kernel = _flex_kernel(q.device, compile_flex)
    out = kernel(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return _from_bhsd(out)


# ---- Transformer Engine ------------------------------------------------------------------------


def _import_te() -> Any:
    """``transformer_engine.pytorch``, or a clear refusal."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "backend='te' needs a CUDA device (Transformer Engine has no CPU kernels); "
            "use backend='sdpa' on CPU"
        )
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 (optional GPU dependency)
    except ImportError as exc:
        raise ConfigError(
            "backend='te' needs Transformer Engine: pip install 'megatron-smd[gpu]' "
            f"(transformer-engine[pytorch]); import failed: {exc}"
        ) from exc
    return te


def _import_cudnn_frontend() -> Any:
    import cudnn  # noqa: PLC0415 (nvidia-cudnn-frontend; needed only by the score_mod path)

    return cudnn


def _te_keep(graph: Any, like: Any, tensors: dict) -> Any:
    """cuDNN graph ops for ``kv <= q_pos[q] < evict[kv]`` over the score tile ``like``."""
    cudnn = _import_cudnn_frontend()
    col = graph.gen_index(input=like, axis=3)
    col.set_data_type(cudnn.data_type.INT32)
    seen = graph.cmp_ge(input=tensors["q_pos"], comparison=col, compute_data_type=cudnn.data_type.BOOLEAN)
    seen.set_data_type(cudnn.data_type.BOOLEAN)
    alive = graph.cmp_gt(input=tensors["evict"], comparison=tensors["q_pos"], compute_data_type=cudnn.data_type.BOOLEAN)
    alive.set_data_type(cudnn.data_type.BOOLEAN)
    keep = graph.logical_and(a=seen, b=alive, compute_data_type=cudnn.data_type.BOOLEAN)
    keep.set_data_type(cudnn.data_type.BOOLEAN)
    return keep


def te_shadow_score_mod(graph: Any, score: Any, tensors: dict) -> Any:
    """TE/cuDNN ``score_mod``: the score where the shadow mask keeps it, else ``neg_inf``.

    A module-level function (no closure), so TE caches the cuDNN graph by its qualified name;
    ``evict`` and ``q_pos`` are runtime tensors and may change every call.
    """
    return graph.binary_select(input0=score, input1=tensors["neg_inf"], mask=_te_keep(graph, score, tensors))


def te_shadow_score_mod_bprop(graph: Any, d_score: Any, tensors: dict) -> Any:
    """Derivative of :func:`te_shadow_score_mod`: pass ``dP`` where kept, 0 where masked."""
    return graph.binary_select(input0=d_score, input1=tensors["zero"], mask=_te_keep(graph, d_score, tensors))


def te_supports_score_mod(te_attention: Any) -> bool:
    """Whether this TE build has the cuDNN score_mod path (TE >= 2.17 + cudnn frontend)."""
    if "score_mod" not in inspect.signature(te_attention.forward).parameters:
        return False
    try:
        _import_cudnn_frontend()
    except ImportError:
        return False
    return True


#: ``te_mask_form: auto``'s choice per (dtype, heads, head dim, mask shape, row layout), made once
#: by :func:`te_select_form` on the first call and reused by every layer after.
_TE_FORM_CHOICE: dict = {}
TE_FALLBACK_ORDER = ("score_mod", "bias", "arbitrary")


def te_form_candidates(dtype: torch.dtype, has_score_mod: bool) -> tuple[list[str], dict[str, str]]:
    """The forms ``auto`` tries, in order, and why any of :data:`TE_FALLBACK_ORDER` is left out."""
    skipped = {}
    if dtype not in (torch.float16, torch.bfloat16):
        skipped["score_mod"] = (f"cuDNN score_mod needs fp16/bf16, tensors are {dtype} (TE has no fused "
                                f"{dtype} attention: what it accepts runs unfused, O(sq * s) scores)")
    elif not has_score_mod:
        skipped["score_mod"] = "this Transformer Engine has no score_mod (needs TE >= 2.17 + nvidia-cudnn-frontend)"
    return [f for f in TE_FALLBACK_ORDER if f not in skipped], skipped


def te_select_form(run: Callable[[str], Tensor], candidates: Sequence[str], skipped: Optional[dict] = None
                   ) -> tuple[str, Tensor]:
    """Try ``run(form)`` for each candidate in order (score_mod -> post-scale bias -> arbitrary
    mask); the first one Transformer Engine accepts wins. Every refusal (TE raises when no backend
    takes the inputs: "No dot product attention backend is available ...") is logged with its
    reason; if none is accepted, a :class:`ConfigError` lists them all."""
    reasons = dict(skipped or {})
    for form in candidates:
        try:
            out = run(form)
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError) as e:
            reasons[form] = f"{type(e).__name__}: {e}"
            continue
        for f, why in reasons.items():
            _log.warning("shadow attention (te): mask form %r not used: %s", f, why)
        _log.warning("shadow attention (te): using mask form %r", form)
        return form, out
    raise ConfigError("Transformer Engine accepted none of the shadow-mask forms for these inputs: "
                      + "; ".join(f"{f}: {why}" for f, why in reasons.items())
                      + " (use backend 'flex' or 'sdpa')")


def te_shadow_attention(
    te_attention: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    evict_eff: Optional[Tensor],
    q_pos: Optional[Tensor],
    mask_form: TEMaskForm,
) -> Tensor:
    """Call a TE ``DotProductAttention`` (sbhd, no TE-side CP) with the most compact mask form."""
    hq, s, sq = q.shape[2], k.shape[0], q.shape[0]
    rows_are_causal = q_pos is None and sq == s
    if evict_eff is None and rows_are_causal:
        return te_attention(q, k, v, qkv_format="sbhd", attn_mask_type="causal")
    form = mask_form
    if form == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        form = "score_mod" if half and te_supports_score_mod(te_attention) else "bias"
    if form == "score_mod":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"te_mask_form='score_mod' needs fp16/bf16 tensors, got {q.dtype}")
        if not te_supports_score_mod(te_attention):
            raise ConfigError(
                "te_mask_form='score_mod' needs Transformer Engine >= 2.17 with nvidia-cudnn-frontend; "
                "use te_mask_form='bias'"
            )
        qp = q_pos if q_pos is not None else torch.arange(sq, device=q.device)
        if evict_eff is None:
            e4 = torch.full((1, 1, 1, s), s, dtype=torch.int32, device=q.device)
        elif evict_eff.dim() == 2:
            e4 = evict_eff.view(evict_eff.shape[0], 1, 1, s)
        else:
            e4 = _expand_heads(evict_eff, hq // evict_eff.shape[1]).unsqueeze(2)
        common = {"evict": e4.to(torch.int32).contiguous(), "q_pos": qp.to(torch.int32).view(1, 1, sq, 1).contiguous()}
        return te_attention(
            q,
            k,
            v,
            qkv_format="sbhd",
            attn_mask_type="no_mask",
            score_mod=te_shadow_score_mod,
            score_mod_bprop=te_shadow_score_mod_bprop,
            score_mod_tensors={**common, "neg_inf": torch.full((1, 1, 1, 1), -1e9)},
            score_mod_bprop_tensors={**common, "zero": torch.zeros((1, 1, 1, 1))},
        )
    vis = visible_dense(evict_eff, q_pos, s, q.device)  # [b|1, 1|h, sq, s]
    if vis.shape[1] > 1:
        vis = _expand_heads(vis, hq // vis.shape[1])
    if form == "bias":
        bias = torch.zeros(vis.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~vis, torch.finfo(q.dtype).min)
        return te_attention(
            q,
            k,
            v,
            qkv_format="sbhd",
            attn_mask_type="causal" if rows_are_causal else "no_mask",
            core_attention_bias_type="post_scale_bias",
            core_attention_bias=bias,
        )
    if form == "arbitrary":
        return te_attention(q, k, v, qkv_format="sbhd", attention_mask=~vis, attn_mask_type="arbitrary")
    raise ConfigError(f"te_mask_form must be one of auto/score_mod/bias/arbitrary, got {mask_form!r}")


# ================================================================================================
# The Megatron module
# ================================================================================================


class ShadowCoreAttention(MegatronModule):
    """Megatron core attention that applies the shadow mask ``evict`` (see the module docstring).

    Constructor arguments are those of Megatron's ``DotProductAttention`` plus:

    Args:
        backend: ``"sdpa"`` (reference, CPU), ``"flex"`` (GPU) or ``"te"`` (GPU, Transformer Engine).
        flex_block_size: FlexAttention tile size (query and key).
        flex_compile: compile ``flex_attention`` (default: on CUDA only).
        flex_cpu_grad_fallback: on CPU under autograd, compute the same mask with SDPA instead of
            raising (FlexAttention has no CPU backward). Off by default: no silent fallback.
        te_mask_form: how the mask reaches TE (``"auto"``, ``"score_mod"``, ``"bias"``,
            ``"arbitrary"``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        backend: Backend = "sdpa",
        flex_block_size: int = DEFAULT_FLEX_BLOCK,
        flex_compile: Optional[bool] = None,
        flex_cpu_grad_fallback: bool = False,
        te_mask_form: TEMaskForm = "auto",
        **kwargs: Any,
    ):
        super().__init__(config=config)
        if kwargs:
            raise ConfigError(f"ShadowCoreAttention: unknown arguments {sorted(kwargs)}")
        if backend not in BACKENDS:
            raise ConfigError(f"ShadowCoreAttention: backend must be one of {list(BACKENDS)}, got {backend!r}")
        if te_mask_form not in ("auto", "score_mod", "bias", "arbitrary"):
            raise ConfigError(
                f"ShadowCoreAttention: te_mask_form must be auto/score_mod/bias/arbitrary, got {te_mask_form!r}"
            )
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.backend: str = backend
        self.flex_block_size = int(flex_block_size)
        self.flex_compile = flex_compile
        self.flex_cpu_grad_fallback = bool(flex_cpu_grad_fallback)
        self.te_mask_form: str = te_mask_form
        self.cp_comm_type = cp_comm_type  # accepted for interface compatibility; CP is always all-gather

        if attention_type != "self":
            raise ConfigError(
                "ShadowCoreAttention: attention_type must be 'self' (a shadow mask is causal self-attention), "
                f"got {attention_type!r}"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ConfigError(
                "ShadowCoreAttention: attn_mask_type must be causal (the shadow mask is causal by construction), "
                f"got {attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConfigError(
                f"ShadowCoreAttention: attention_dropout={dropout}; replaying the rollout needs deterministic "
                "attention, set TransformerConfig.attention_dropout=0.0"
            )
        if config.softmax_type != "vanilla":
            raise ConfigError(
                f"ShadowCoreAttention: softmax_type={config.softmax_type!r} is not supported (only 'vanilla')"
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ConfigError(
                f"ShadowCoreAttention: window_size={config.window_size} on layer {layer_number}; encode sliding "
                "windows in the shadow mask (evict[j] = j + window) instead"
            )

        # Process groups: pg_collection if given, else Megatron's parallel_state when initialized,
        # else a single process.
        if pg_collection is not None:
            self.tp_group = getattr(pg_collection, "tp", None)
            self.cp_group = getattr(pg_collection, "cp", None)
        elif parallel_state.model_parallel_is_initialized():
            self.tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        else:
            self.tp_group = None
            self.cp_group = None
        self.pg_collection = pg_collection
        self.tp_size, self.tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        self.cp_size, self.cp_rank = get_pg_size(self.cp_group), get_pg_rank(self.cp_group)

        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if heads % self.tp_size or groups % self.tp_size:
            raise ConfigError(
                f"ShadowCoreAttention: num_attention_heads={heads} and num_query_groups={groups} must be divisible "
                f"by the tensor-parallel size {self.tp_size}"
            )
        self.num_heads_local = heads // self.tp_size
        self.num_groups_global = groups  # == tp when Megatron replicated KV groups (num_query_groups < tp)
        self.num_groups_local = groups // self.tp_size
        self.head_dim = config.kv_channels or config.hidden_size // heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

        self._block_mask_cache: Optional[tuple[tuple, Tensor, BlockMask]] = None
        self._q_pos_cache: Optional[Tensor] = None
        self._te_attention: Any = None
        if backend == "te":
            te = _import_te()
            # Kept out of the nn.Module tree on purpose: it has no parameters, and registering it
            # would add TE's "_extra_state" to checkpoints, tying them to the backend.
            object.__setattr__(
                self,
                "_te_attention",
                te.DotProductAttention(
                    num_attention_heads=self.num_heads_local,
                    kv_channels=self.head_dim,
                    num_gqa_groups=self.num_groups_local,
                    attention_dropout=0.0,
                    qkv_format="sbhd",
                    attn_mask_type="causal",
                    layer_number=self.layer_number,
                    attention_type="self",
                    softmax_scale=self.softmax_scale,
                ),
            )

    # ---- input handling ------------------------------------------------------------------------

    def _kv_head_slice(self, h_mask: int) -> tuple[int, int]:
        """(first head, count) of a per-head mask with ``h_mask`` global KV heads on this TP rank."""
        if h_mask == self.num_groups_global:
            return self.tp_rank * self.num_groups_local, self.num_groups_local
        if self.num_groups_global == self.tp_size and h_mask < self.tp_size and self.tp_size % h_mask == 0:
            # Megatron replicated KV groups (num_query_groups < tp): rank r holds group r // (tp / ng).
            return self.tp_rank // (self.tp_size // h_mask), 1
        raise MaskError(
            f"attention_mask (evict) has {h_mask} KV heads; layer {self.layer_number} has {self.num_groups_global} "
            f"KV heads (num_query_groups) over tensor-parallel size {self.tp_size}; "
            f"expected 1 or {self.num_groups_global}"
        )

    def _layer_evict(self, evict: Tensor, batch: int, seq_len: int, device: torch.device) -> Tensor:
        """Validate the micro-batch mask and return this layer's effective rows.

        Returns ``[b, s]`` (per-layer, or per-head with one head) or ``[b, ng_local, s]``.
        """
        if not isinstance(evict, Tensor):
            raise MaskError(f"attention_mask must be the int32 shadow mask tensor or None, got {type(evict).__name__}")
        if evict.dtype != EVICT_DTYPE or evict.dim() not in (3, 4):
            raise MaskError(
                f"attention_mask must be the int32 shadow mask evict [b, L, s] or [b, L, H_kv, s], got dtype "
                f"{evict.dtype} shape {list(evict.shape)} (a Megatron boolean [b, 1, s, s] mask is not a shadow mask)"
            )
        b, L, s = evict.shape[0], evict.shape[1], evict.shape[-1]
        if b != batch:
            raise MaskError(f"attention_mask (evict) has batch {b}, the query has batch {batch}")
        if L != self.config.num_layers:
            raise MaskError(f"attention_mask (evict) has {L} layers, the model has num_layers={self.config.num_layers}")
        if self.layer_number > L:
            raise MaskError(f"attention_mask (evict) has {L} layers, cannot index layer_number={self.layer_number}")
        if s != seq_len:
            cp_note = ""
            if self.cp_size > 1:
                cp_note = f" (= {seq_len // self.cp_size} local rows x cp {self.cp_size}; evict must stay global)"
            raise MaskError(f"attention_mask (evict) has length {s}, the sequence has length {seq_len}{cp_note}")
        row = evict[:, self.layer_number - 1]
        if row.dim() == 3:
            h = row.shape[1]
            if h == 1:
                row = row[:, 0]
            else:
                first, count = self._kv_head_slice(h)
                row = row[:, first : first + count]
        return effective_evict(row.to(device, non_blocking=True))

    def _local_q_pos(self, seq_len: int, device: torch.device) -> Optional[Tensor]:
        if self.cp_size == 1:
            return None
        q = self._q_pos_cache
        if q is None or q.numel() != seq_len // self.cp_size or q.device != device:
            q = cp_utils.local_positions(seq_len, self.cp_rank, self.cp_size, device=device)
            self._q_pos_cache = q
        return q

    def _block_mask(
        self, mask_source: Optional[Tensor], evict_eff: Optional[Tensor], q_pos: Optional[Tensor], seq_len: int, hq: int
    ) -> BlockMask:
        """BlockMask of this layer and micro-batch, cached on the memory of ``mask_source``.

        ``mask_source`` is the tensor the mask came from (the micro-batch ``evict``, or THD
        ``cu_seqlens``; ``None`` for plain causal). The key is its storage address, offset, shape,
        strides and version counter, not its Python identity, so the detached copy that
        activation recompute (``tensor_parallel.checkpoint``) passes back in still hits; the cache
        holds a reference to the tensor, so its memory cannot be reused by another tensor while
        cached, and an in-place write bumps the (shared) version counter. Inference-mode tensors
        have no version counter and are never cached.
        """
        if mask_source is not None and mask_source.is_inference():
            return block_mask_from_intervals(evict_eff, q_pos, seq_len, num_q_heads=hq, block=self.flex_block_size)
        src = None
        if mask_source is not None:
            src = (
                mask_source.untyped_storage().data_ptr(),
                mask_source.storage_offset(),
                tuple(mask_source.shape),
                mask_source.stride(),
                mask_source.dtype,
                mask_source.device,
                mask_source._version,
            )
        key = (src, seq_len, q_pos.numel() if q_pos is not None else None, hq,
               evict_eff.device if evict_eff is not None else None)
        cached = self._block_mask_cache
        if cached is not None and cached[0] == key:
            return cached[2]
        bm = block_mask_from_intervals(evict_eff, q_pos, seq_len, num_q_heads=hq, block=self.flex_block_size)
        self._block_mask_cache = (key, mask_source, bm)  # the reference pins mask_source's memory
        return bm

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Masked attention.

        Args:
            query: ``[sq, b, hq, hn]`` (THD: ``[t, hq, hn]``), RoPE applied.
            key, value: ``[sk, b, hkv, hn]`` (THD: ``[t, hkv, hn]``), GQA not expanded. Under CP,
                ``sq = sk = s / cp`` local rows in Megatron's chunk layout.
            attention_mask: int32 ``evict`` ``[b, L, s]`` / ``[b, L, H_kv, s]`` (global ``s``), or
                ``None`` for causal.
        Returns:
            ``[sq, b, hq * hn]`` (THD: ``[t, hq * hn]``).
        """
        if attention_bias is not None:
            raise SMDError("ShadowCoreAttention: attention_bias is not supported; the shadow mask is the only mask")
        if attn_mask_type not in (None, AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ConfigError(f"ShadowCoreAttention: attn_mask_type must be causal, got {attn_mask_type}")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise SMDError(
                f"ShadowCoreAttention: packed_seq_params with qkv_format={packed_seq_params.qkv_format!r} is not "
                "supported; pack documents into the absolute evict (megatron_smd.mask.pack) instead"
            )
        if thd:
            if self.cp_size > 1:
                raise SMDError(
                    "ShadowCoreAttention: THD with context parallelism is not supported (Megatron's THD CP layout "
                    "partitions each document); use sbhd rows with an absolute evict"
                )
            if query.dim() != 3:
                raise SMDError(f"ShadowCoreAttention: THD query must be [t, heads, hn], got {list(query.shape)}")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
            raise SMDError(
                f"ShadowCoreAttention: expected query [sq, b, hq, hn] and key/value [sk, b, hkv, hn], got "
                f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
            )
        sq, b, hq, hn = query.shape
        if hq != self.num_heads_local or key.shape[2] != self.num_groups_local or hn != self.head_dim:
            raise SMDError(
                f"ShadowCoreAttention (layer {self.layer_number}): got {hq} query heads, {key.shape[2]} KV heads, "
                f"head dim {hn}; expected {self.num_heads_local}, {self.num_groups_local}, {self.head_dim} "
                "per tensor-parallel rank"
            )
        seq_len = key.shape[0] * self.cp_size
        if sq * self.cp_size != seq_len:
            raise SMDError(
                f"ShadowCoreAttention: {sq} query rows but {key.shape[0]} key rows; self-attention needs equal lengths"
            )

        mask_source = attention_mask  # the tensor the flex BlockMask cache is keyed on
        if attention_mask is not None:
            evict_eff = self._layer_evict(attention_mask, b, seq_len, query.device)
        elif thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = cu if cu is not None else packed_seq_params.cu_seqlens_q
            if cu is None or int(cu[-1]) != seq_len:
                raise SMDError(f"ShadowCoreAttention: THD cu_seqlens must end at the packed length {seq_len}, got {cu}")
            evict_eff = seq_end_from_cu(cu).to(device=query.device, dtype=EVICT_DTYPE).view(1, seq_len)
            mask_source = cu
        else:
            evict_eff = None

        q_pos = self._local_q_pos(seq_len, query.device)
        if self.cp_size > 1:
            key = cp_utils.all_gather_cp(key, 0, self.cp_group)
            value = cp_utils.all_gather_cp(value, 0, self.cp_group)

        out = self._attend(query, key, value, mask_source, evict_eff, q_pos, seq_len)
        return out.squeeze(1) if thd else out

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask_source: Optional[Tensor],
        evict_eff: Optional[Tensor],
        q_pos: Optional[Tensor],
        seq_len: int,
    ) -> Tensor:
        if self.backend == "sdpa":
            return sdpa_shadow_attention(q, k, v, evict_eff, q_pos, self.softmax_scale)
        if self.backend == "te":
            te = self._te_attention
            if self.te_mask_form != "auto" or (evict_eff is None and q_pos is None):
                return te_shadow_attention(te, q, k, v, evict_eff, q_pos, self.te_mask_form)  # type: ignore[arg-type]
            key = (q.dtype, q.device.type, tuple(q.shape[2:]), k.shape[2], tuple(evict_eff.shape[1:-1])
                   if evict_eff is not None else None, q_pos is None)
            if key in _TE_FORM_CHOICE:
                return te_shadow_attention(te, q, k, v, evict_eff, q_pos, _TE_FORM_CHOICE[key])
            candidates, skipped = te_form_candidates(q.dtype, te_supports_score_mod(te))
            form, out = te_select_form(lambda f: te_shadow_attention(te, q, k, v, evict_eff, q_pos, f),
                                       candidates, skipped)
            _TE_FORM_CHOICE[key] = form
            return out
        # flex
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu":
            if needs_grad:
                if not self.flex_cpu_grad_fallback:
                    raise ConfigError(
                        f"backend='flex' cannot run backward on CPU (torch {torch.__version__} FlexAttention has "
                        "no CPU backward); use backend='sdpa' for CPU training, run forward under torch.no_grad(), "
                        "or pass flex_cpu_grad_fallback=True to compute the same mask with SDPA"
                    )
                return sdpa_shadow_attention(q, k, v, evict_eff, q_pos, self.softmax_scale)
            # torch refuses CPU inputs that require grad even under no_grad; nothing needs grad here.
            q, k, v = q.detach(), k.detach(), v.detach()
        if q_pos is None:  # no CP: run at a bucketed length (a handful of compiled kernels per run)
            padded = flex_bucket_length(seq_len, self.flex_block_size)
            if padded != seq_len:
                q, k, v, evict_eff = pad_rows_for_flex(q, k, v, evict_eff, padded)
                block_mask = self._block_mask(mask_source, evict_eff, None, padded, q.shape[2])
                return flex_shadow_attention(q, k, v, block_mask, self.softmax_scale, self.flex_compile)[:seq_len]
        block_mask = self._block_mask(mask_source, evict_eff, q_pos, seq_len, q.shape[2])
        return flex_shadow_attention(q, k, v, block_mask, self.softmax_scale, self.flex_compile)
