"""One Megatron parameter's TP shards -> its HF tensors, as pieces to copy into place.

The resharder's conversion (:class:`~megatron_smd.sync.reshard.Resharder`): every HF tensor of a
parameter is a list of pieces, views of the TP shards each with the region of the destination it
fills, so that converting is the one copy into the destination (a packing buffer, an engine's
staging slot or a temporary). It follows the project's one conversion table
(:data:`megatron_smd.learner.convert.RULES`) rule by rule, with the same result as
:func:`megatron_smd.learner.convert.iter_hf_from_local` (the tests compare the two byte for byte).

:func:`plan_chunks` groups those copies by consecutive, cache-sized byte ranges of the destination,
which the resharder writes and checks one after the other (:func:`view_chunks`: the ranges of a
tensor that is only checked); :func:`param_view` finds an HF tensor that needs no copy at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from ..learner.convert import hf_names, local_param_names, resolve_rule
from ..model.hf import ModelArch
from .checks import ROW_BYTES

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def param_order(arch: ModelArch, pp_rank: int, pp_size: int, *, embedding_first: bool = False) -> list[str]:
    """This stage's Megatron parameter names in send order: layer by layer (each layer in
    :data:`~megatron_smd.learner.convert.RULES` order), then the last-stage tensors, then the
    first-stage ones (the embedding: often the largest tensor, so it goes last, and a transport
    that overlaps sending with packing starts on a small first bucket). ``embedding_first``: the
    embedding first instead (a transport that moves buckets on several threads starts its longest
    job first, see ``Transport.embedding_first``)."""
    names = local_param_names(arch, pp_rank, pp_size)

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        pos, name = item
        m = _LAYER.match(name)
        if m:
            return (0, int(m.group(1)), pos)
        if name.startswith("embedding."):
            return (-1 if embedding_first else 2, 0, pos)
        return (1, 0, pos)

    return [n for _, n in sorted(enumerate(names), key=key)]


#: One piece of an HF tensor: ``(region, source)``; ``region(dest)`` is the view of the destination
#: that ``source`` (a view of one shard) fills, or None for the whole destination.
Piece = tuple[Callable[[torch.Tensor], torch.Tensor] | None, torch.Tensor]


def _concat_rows(shards: list[torch.Tensor], start: int, length: int) -> list[tuple[int, torch.Tensor]]:
    """Rows ``[start, start + length)`` of ``cat(shards, 0)`` as ``(offset in the range, shard view)``."""
    out, base = [], 0
    for s in shards:
        n = s.shape[0]
        lo, hi = max(start, base), min(start + length, base + n)
        if lo < hi:
            out.append((lo - start, s[lo - base:hi - base]))
        base += n
    return out


def hf_pieces(name: str, shards: list[torch.Tensor], arch: ModelArch, *, pp_rank: int,
              pp_size: int) -> list[tuple[str, tuple[int, ...], list[Piece]]]:
    """One Megatron parameter's TP shards (rank order) -> its HF tensors as pieces to copy.

    Returns ``[(hf_name, hf_shape, pieces)]`` in the order of
    :func:`megatron_smd.learner.convert.iter_hf_from_local`, which this mirrors rule by rule
    (``replicated``, ``row``, ``vocab``, ``qkv`` / ``qkv_bias``, ``gate_up``), with the same result
    (the tests compare the two byte for byte): copying every piece's source into its region of an
    empty ``hf_shape`` tensor gives that function's tensor, with one copy and no temporary.
    """
    rule, glob = resolve_rule(name, arch, pp_rank, pp_size)
    if rule.mcore == "output_layer.weight" and arch.tie_word_embeddings:
        return []
    names = hf_names(rule, arch, glob)
    tp, s0 = len(shards), shards[0]
    rest = tuple(s0.shape[1:])
    kind = rule.kind
    if kind == "replicated":
        return [(names[0], tuple(s0.shape), [(None, s0)])]
    if kind == "row":
        if tp == 1:
            return [(names[0], tuple(s0.shape), [(None, s0)])]
        w = s0.shape[1]
        return [(names[0], (s0.shape[0], w * tp, *s0.shape[2:]),
                 [(lambda d, a=r * w, b=(r + 1) * w: d[:, a:b], s) for r, s in enumerate(shards)])]
    if kind == "vocab":
        v = arch.vocab_size
        return [(names[0], (v, *rest), [((None if off == 0 and len(src) == v else
                                          (lambda d, a=off, n=len(src): d[a:a + n])), src)
                                        for off, src in _concat_rows(shards, 0, v)])]
    if kind in ("qkv", "qkv_bias"):
        ng, hn = arch.num_kv_heads, arch.head_dim
        qpg = arch.num_heads // ng
        G = (qpg + 2) * hn  # rows of one query group in the interleaved layout
        parts = [(names[0], qpg * hn, 0), (names[1], hn, qpg * hn), (names[2], hn, (qpg + 1) * hn)]
        out = []
        if ng % tp == 0 and all(s.shape[0] == ng // tp * G for s in shards):  # whole groups per rank
            gr = ng // tp
            for hf_name, rows, at in parts:
                pieces: list[Piece] = []
                for r, s in enumerate(shards):
                    src = s.view(gr, G, *rest)[:, at:at + rows]
                    if tp == 1:
                        pieces.append((lambda d, rows=rows: d.view(ng, rows, *rest), src))
                    else:
                        pieces.append((lambda d, rows=rows, a=r * gr: d.view(ng, rows, *rest)[a:a + gr], src))
                out.append((hf_name, (ng * rows, *rest), pieces))
            return out
        for hf_name, rows, at in parts:  # groups split across ranks (ng < tp): row ranges
            pieces = []
            for g in range(ng):
                for off, src in _concat_rows(shards, g * G + at, rows):
                    pieces.append((lambda d, a=g * rows + off, n=len(src): d[a:a + n], src))
            out.append((hf_name, (ng * rows, *rest), pieces))
        return out
    if kind == "gate_up":
        f = s0.shape[0] // 2
        out = []
        for i, hf_name in enumerate(names):
            if tp == 1:
                out.append((hf_name, (f, *rest), [(None, s0[i * f:(i + 1) * f])]))
            else:
                out.append((hf_name, (f * tp, *rest),
                            [(lambda d, a=r * f: d[a:a + f], s[i * f:(i + 1) * f]) for r, s in enumerate(shards)]))
        return out
    raise AssertionError(kind)


def write_pieces(dest: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
    """Copy every piece into its region of ``dest`` (casting to ``dest``'s dtype); returns ``dest``."""
    for region, src in pieces:
        (dest if region is None else region(dest)).copy_(src)
    return dest


def param_view(pieces: list[Piece], shape, dt: torch.dtype, gptr: int | None) -> torch.Tensor | None:
    """The HF tensor itself when it is a contiguous view of the learner's parameter in dtype ``dt``
    (one piece covering it; not a view of the gather buffer, whose storage is ``gptr``), else None."""
    if len(pieces) != 1 or pieces[0][0] is not None:
        return None
    src = pieces[0][1]
    if (src.dtype == dt and src.is_contiguous() and tuple(src.shape) == tuple(shape)
            and src.untyped_storage().data_ptr() != gptr):
        return src
    return None


def row_span(dest: torch.Tensor, view: torch.Tensor) -> tuple[int, int] | None:
    """``(base, k)`` when ``view[i]`` (a view of the contiguous ``dest``) lies within rows
    ``[base + i * k, base + (i + 1) * k)`` of ``dest`` (along its first dimension) for every ``i``,
    with ``base`` a multiple of ``k``; None when the view is not of that form."""
    if view.dim() == 0 or dest.dim() == 0 or view.shape[0] == 0 or min(view.stride()) < 0:
        return None
    ds, s0 = dest.stride(0), view.stride(0)
    off = view.storage_offset() - dest.storage_offset()
    if ds <= 0 or off < 0 or s0 <= 0 or s0 % ds:
        return None
    k, base = s0 // ds, off // ds
    extent = off - base * ds + sum((n - 1) * st for n, st in zip(view.shape[1:], view.stride()[1:])) + 1
    if base % k or extent > k * ds:
        return None
    return base, k


#: One piece of a tensor to write and check: its bytes ``[lo, hi)`` and the copies that write them.
Chunk = tuple[int, int, list[tuple[torch.Tensor, torch.Tensor]]]


def plan_chunks(dest: torch.Tensor, pieces: list[Piece], chunk_bytes: int) -> list[Chunk]:
    """The pieces' copies into ``dest`` grouped by consecutive byte ranges of ``dest`` of about
    ``chunk_bytes`` (cut along its first dimension, at multiples of the checksum's 4 KiB rows), each
    range written entirely by its own copies; one range for the whole tensor when it is small or its
    pieces do not map onto rows of ``dest`` (then they are written whole, as before)."""
    copies = [((dest if region is None else region(dest)), src) for region, src in pieces]
    nb = dest.numel() * dest.element_size()
    whole = [(0, nb, copies)]
    if nb <= chunk_bytes or dest.dim() == 0 or not dest.is_contiguous():
        return whole
    rb = dest.stride(0) * dest.element_size()  # bytes per row of dest
    align = ROW_BYTES // math.gcd(ROW_BYTES, rb)  # rows: a cut at a multiple of it is on a checksum row
    spans = []
    for dst, src in copies:
        span = row_span(dest, dst) if tuple(src.shape) == tuple(dst.shape) else None
        if span is None:
            return whole
        spans.append(span)
        align = math.lcm(align, span[1])
    rows = dest.shape[0]
    step = (chunk_bytes // rb) // align * align
    if step == 0 or step >= rows:
        return whole
    out = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        part = []
        for (dst, src), (base, k) in zip(copies, spans):
            n = dst.shape[0]
            i0 = min(max((r0 - base) // k, 0), n)
            i1 = min(max(-(-(r1 - base) // k), 0), n)
            if i1 > i0:
                part.append((dst[i0:i1], src[i0:i1]))
        out.append((r0 * rb, min(r1 * rb, nb), part))
    return out


def view_chunks(t: torch.Tensor, chunk_bytes: int) -> list[Chunk]:
    """Byte ranges of the contiguous ``t`` to check (nothing to write)."""
    nb = t.numel() * t.element_size()
    step = max(ROW_BYTES, chunk_bytes // ROW_BYTES * ROW_BYTES)
    return [(lo, min(lo + step, nb), []) for lo in range(0, nb, step)] or [(0, 0, [])]
