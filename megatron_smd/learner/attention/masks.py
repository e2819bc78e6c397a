"""Shadow-mask math for the learner's attention: ``evict`` -> dense masks, FlexAttention block
masks from column intervals, and the padding rules. Only torch (no Megatron-Core).

**The mask.** The core attention's ``attention_mask`` carries the shadow mask itself, the int32
``evict`` tensor of :mod:`megatron_smd.mask`, for the whole micro-batch and every layer:

* ``[b, L, s]`` (one eviction schedule per layer) or ``[b, L, H_kv, s]`` (per KV head; ``H_kv``
  is the model's *global* KV-head count, or 1 to broadcast);
* ``L`` = ``config.num_layers`` (the whole model, also under pipeline parallelism), indexed with
  the global 1-based ``layer_number`` (row ``layer_number - 1``);
* ``s`` = the *global* sequence length, never sliced for context parallelism;
* query ``i`` sees key ``j`` iff ``j <= i < evict[j]``: causal, document (packed rows store
  absolute positions and "never evicted" = end of the key's own document) and eviction masks in
  one ``O(s)`` vector per layer.
* ``None`` means plain causal attention (with THD: causal within each ``cu_seqlens`` document).

The functions here take one layer's rows of it (``evict_eff``: ``None`` | ``[b, s]`` |
``[b, h_kv, s]``) and the global positions of the local query rows (``q_pos``: ``None`` for
``0..s-1`` | ``[sq]``).

**Padding rows.** Rows with no visible key at all (padding positions, where ``evict = 0``) are
given their own diagonal, i.e. every backend uses ``max(evict[j], j + 1)``
(:func:`effective_evict`): real rows are unchanged (a real key already has ``evict[j] >= j + 1``,
and no real query sees a padding key), but no softmax is taken over an empty row, so padded rows
stay finite on every kernel (an empty row is NaN for a plain softmax and kernel-defined
elsewhere). The flex kernel additionally runs at a bucketed row length
(:func:`flex_bucket_length`), padding with keys that are their own document
(:func:`pad_rows_for_flex`).

**Block masks.** FlexAttention's ``BlockMask`` is built directly from the per-block min/max of
the column intervals (:func:`block_mask_from_intervals`, ``O(b * h * (s + (sq/B) * (s/B)))``
time and memory, ``B`` = block size), not by evaluating ``mask_mod`` on all ``sq * s`` pairs as
``create_block_mask`` does (:func:`block_mask_by_enumeration`, kept as the independent
construction it is tested against).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from ...errors import MaskError
from ...mask import EVICT_DTYPE, layer_dense

DEFAULT_FLEX_BLOCK = 128


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


# ---- padding rows for the flex kernel ------------------------------------------------------------


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
