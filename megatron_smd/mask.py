"""The shadow mask: one integer per (layer, [kv-head,] key position).

Eviction in every supported policy is monotone (a cached position, once evicted, never returns), so
the whole attention pattern a rollout used in layer ``l`` is a vector ``evict[l, j]``: the first
query position that can no longer see key ``j``::

    query i may attend key j in layer l   <=>   j <= i < evict[l, j]

Invariants (checked by :func:`validate_evict`), for a sequence of length ``T``:

* ``evict`` is ``int32`` with shape ``[L, T]`` (per-layer) or ``[L, H_kv, T]`` (per-KV-head).
* ``j + 1 <= evict[..., j] <= T`` for every real position ``j < T``: a token always attends to
  itself in the step that creates it, and nothing is visible past the end of its own sequence.
* "never evicted" is ``evict = T`` (end of the key's own sequence).
* In a padded batch (``[N, L, T_max]`` as written to ``trajectories.safetensors``) positions at or
  past a sequence's length hold ``0`` (visible to nobody).

Packing (THD): several sequences laid end to end in one row keep ``evict`` as *absolute* positions
in the packed row. Since "never evicted" is the end of the key's own sequence, ``j <= i < evict[j]``
already forbids attention across sequences: causal, document and eviction masks are one ``O(T)``
vector per layer. A dense rollout is the special case ``evict[j] = sequence end``.

This is FlashMask's column-wise representation restricted to one interval per column; a dense
boolean mask (:func:`to_dense`) is only for tests and for the SDPA reference backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import MaskError

EVICT_DTYPE = torch.int32


def never_evicted(num_layers: int, seq_len: int, num_kv_heads: int | None = None) -> torch.Tensor:
    """The dense (uncompressed) mask of one sequence: ``evict[l, (h,) j] = seq_len``."""
    shape = (num_layers, seq_len) if num_kv_heads is None else (num_layers, num_kv_heads, seq_len)
    return torch.full(shape, seq_len, dtype=EVICT_DTYPE)


def validate_evict(
    evict: torch.Tensor,
    *,
    seq_end: torch.Tensor | int | None = None,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    name: str = "evict",
) -> None:
    """Check the invariants of one sequence's (or one packed row's) mask.

    Args:
        evict: ``[L, T]`` or ``[L, H_kv, T]`` int32.
        seq_end: the end of each key's own sequence: an int (unpacked: ``T``) or an int tensor
            ``[T]`` (packed rows: the end of the document each position belongs to). Defaults to
            ``T``.
        num_layers / num_kv_heads: when given, the shape must match the model.
        name: how the tensor is called in error messages (e.g. ``"trajectories.safetensors:evict[3]"``).

    Raises:
        MaskError naming the first layer/head/position that is wrong.
    """
    if not isinstance(evict, torch.Tensor):
        raise MaskError(f"{name}: expected a torch.Tensor, got {type(evict).__name__}")
    if evict.dtype != EVICT_DTYPE:
        raise MaskError(f"{name}: dtype must be int32, got {evict.dtype}")
    if evict.dim() not in (2, 3):
        raise MaskError(
            f"{name}: shape must be [L, T] (per-layer) or [L, H_kv, T] (per-head), got {list(evict.shape)}"
        )
    if num_layers is not None and evict.shape[0] != num_layers:
        raise MaskError(f"{name}: has {evict.shape[0]} layers, the model has {num_layers}")
    if evict.dim() == 3 and num_kv_heads is not None and evict.shape[1] not in (1, num_kv_heads):
        raise MaskError(f"{name}: has {evict.shape[1]} KV heads, the model has {num_kv_heads}")
    T = evict.shape[-1]
    if T == 0:
        raise MaskError(f"{name}: empty sequence (T = 0)")
    pos = torch.arange(T, dtype=torch.int64)
    if seq_end is None:
        end = torch.full((T,), T, dtype=torch.int64)
    elif isinstance(seq_end, int):
        if seq_end != T:
            raise MaskError(f"{name}: length {T} does not match the sequence length {seq_end}")
        end = torch.full((T,), T, dtype=torch.int64)
    else:
        end = seq_end.to(torch.int64)
        if end.shape != (T,):
            raise MaskError(f"{name}: seq_end has shape {list(end.shape)}, expected [{T}]")
    e = evict.to(torch.int64)
    low_bad = e <= pos  # broadcasts over [L, (H,)]
    high_bad = e > end
    for bad, what in ((low_bad, "<= its own position (a token must see itself)"),
                      (high_bad, "past the end of its sequence")):
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            where = _where(idx, evict.dim())
            j = idx[-1]
            raise MaskError(
                f"{name}: {where} has evict={int(e[tuple(idx)])}, which is {what} "
                f"(position {j}, sequence end {int(end[j])})"
            )


def _where(idx: list[int], dim: int) -> str:
    if dim == 2:
        return f"layer {idx[0]}, position {idx[1]}"
    return f"layer {idx[0]}, kv-head {idx[1]}, position {idx[2]}"


def to_dense(evict: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" mask: ``[L, (H,) T, T]`` with ``out[..., i, j] = j <= i < evict[..., j]``.

    ``O(T^2)`` memory per layer: for tests and the SDPA reference backend only.
    """
    T = evict.shape[-1]
    i = torch.arange(T, device=evict.device).view(T, 1)
    j = torch.arange(T, device=evict.device).view(1, T)
    e = evict.unsqueeze(-2)  # [..., 1, T]: broadcast over query rows
    return (j <= i) & (i < e)


def layer_dense(evict_layer: torch.Tensor, q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Dense mask of one layer for a subset of query rows.

    Args:
        evict_layer: ``[..., T]`` (any leading batch/head dims).
        q_pos: ``[Sq]`` absolute query positions (default: all ``T``). Used by context parallelism,
            where a rank holds only some query rows but every key.
    Returns:
        bool ``[..., Sq, T]``.
    """
    T = evict_layer.shape[-1]
    if q_pos is None:
        q_pos = torch.arange(T, device=evict_layer.device)
    i = q_pos.view(-1, 1)
    j = torch.arange(T, device=evict_layer.device).view(1, T)
    return (j <= i) & (i < evict_layer.unsqueeze(-2))


def pack(evicts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay several sequences' masks end to end in one row (THD packing).

    Args:
        evicts: per-sequence masks ``[L, (H,) T_k]`` relative to their own start.
    Returns:
        ``(evict_packed [L, (H,) sum T_k], cu_seqlens int32 [K+1])`` with absolute positions, so
        "never evicted" becomes the end of the key's own sequence inside the row.
    """
    if not evicts:
        raise MaskError("pack: no sequences given")
    lead = evicts[0].shape[:-1]
    parts, cu = [], [0]
    for k, e in enumerate(evicts):
        if e.shape[:-1] != lead:
            raise MaskError(f"pack: sequence {k} has mask shape {list(e.shape)}, sequence 0 has {list(evicts[0].shape)}")
        parts.append(e + cu[-1])
        cu.append(cu[-1] + e.shape[-1])
    return torch.cat(parts, dim=-1).to(EVICT_DTYPE), torch.tensor(cu, dtype=torch.int32)


def unpack(evict_packed: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pack`: per-sequence masks relative to their own start."""
    out = []
    for k in range(len(cu_seqlens) - 1):
        a, b = int(cu_seqlens[k]), int(cu_seqlens[k + 1])
        out.append((evict_packed[..., a:b] - a).to(EVICT_DTYPE))
    return out


def seq_end_from_cu(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[T_total]`` end of the sequence each packed position belongs to."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.repeat_interleave(cu_seqlens[1:].to(torch.int64), lens)


def pad_batch(evicts: Sequence[torch.Tensor], max_len: int | None = None) -> torch.Tensor:
    """Stack per-sequence masks into ``[N, L, (H,) T_max]``; padded positions hold 0."""
    T_max = max_len if max_len is not None else max(e.shape[-1] for e in evicts)
    lead = evicts[0].shape[:-1]
    out = torch.zeros((len(evicts), *lead, T_max), dtype=EVICT_DTYPE)
    for k, e in enumerate(evicts):
        out[k, ..., : e.shape[-1]] = e
    return out


def kept_fraction(evict: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
    """Per layer (and head): the mean over generated queries of the fraction of earlier keys visible.

    For query ``i`` in ``[prompt_len, T)`` the number of visible keys is
    ``#{j <= i : evict[j] > i}``; divided by ``i + 1`` (what a dense cache would hold). Returns
    ``[L]`` or ``[L, H]`` float; 1.0 everywhere for a dense mask. ``O(T^2)`` time, ``O(T)`` memory
    per query block.
    """
    T = evict.shape[-1]
    q = torch.arange(prompt_len, T)
    if len(q) == 0:
        return torch.ones(evict.shape[:-1])
    vis = layer_dense(evict, q).sum(-1).float()  # [..., Sq]
    return (vis / (q + 1).float()).mean(-1)


def nbytes_evict(num_layers: int, seq_len: int, num_kv_heads: int = 1) -> int:
    """Bytes of the int32 mask of one trajectory."""
    return 4 * num_layers * num_kv_heads * seq_len


def nbytes_dense(num_layers: int, seq_len: int, num_kv_heads: int = 1) -> int:
    """Bytes of the same mask as a dense bit mask (1 bit per (query, key) pair)."""
    return num_layers * num_kv_heads * seq_len * seq_len // 8
