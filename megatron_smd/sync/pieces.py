"""One Megatron parameter's TP shards -> its HF tensors, as pieces to copy into place.

The resharder's conversion (:class:`~megatron_smd.sync.reshard.Resharder`): every HF tensor of a
parameter is a list of pieces, views of the TP shards each with the region of the destination it
fills, so that converting is the one copy into the destination (a packing buffer, an engine's
staging slot or a temporary). It follows the project's one conversion table
(:data:`megatron_smd.learner.convert.RULES`) rule by rule, with the same result as
:func:`megatron_smd.learner.convert.iter_hf_from_local` (the tests compare the two byte for byte).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..learner.convert import hf_names, resolve_rule
from ..model.hf import ModelArch

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
