"""The in-process engine's staging as one flat buffer, filled and checked by one plan of chunks.

A sync into the in-process engine copies every HF tensor once into the engine's kept staging memory
and checks it while it is in cache (NaN / inf; with ``verify`` the sender's checksum and the
engine's own). Done tensor by tensor that is hundreds of small jobs per sync (Qwen2.5-0.5B: 290 HF
tensors, most of them under 2 MiB), each paying Python overhead three or four times, and only the
large ones shared between two threads. Here the whole stage is one job:

* :func:`arena_layout`: the engine's staging for all its tensors is one buffer (an *arena*), each
  tensor at an offset that is a multiple of the checksum's 4 KiB row, the gaps zero
  (:meth:`~megatron_smd.sync.staging.ShadowBuffers.arena`);
* :class:`ArenaPlan`: the conversion's copies into the arena (:func:`~.pieces.hf_pieces`, cut by
  :func:`~.pieces.plan_chunks`) grouped into chunks of about :data:`ARENA_CHUNK_BYTES` of the arena,
  in arena order: a few rows of a large tensor, or several small tensors back to back (one dtype per
  chunk); the plan is kept with the arena and reused while the learner's tensors stay where they are;
* :meth:`ArenaPlan.run`: the sender's thread and the helper thread (:mod:`.share`) take the next
  chunk from one counter for the whole stage (nobody waits per tensor); a chunk is copied, then
  checked with one call per check whatever number of tensors it holds: NaN / inf over its bytes
  (the zero gaps are finite) and, with ``verify``, the checksum as row sums (one ``torch.sum``)
  plus column sums (one ``np.add.reduce`` per tensor in the chunk), taken once: the arena is the
  engine's memory, so the sender's checksum is the engine's record too (see :class:`Sink`);
* :class:`FlatChecksums`: every tensor's :func:`~.checks.tensor_checksum` from those sums,
  vectorised, at the end. A tensor's gap is the zero padding of its last row in the checksum's
  definition, so the values are the same (a test compares them tensor by tensor).

Which chunk failed the NaN / inf test is settled per tensor afterwards (exactly, on the tensor), so
a refusal still names the tensor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .checks import _A, _MASK, _MV, _ROW, ROW_BYTES, _np_col_weights, all_finite, all_finite_cached
from .pieces import Piece, plan_chunks


class Sink(Protocol):
    """Where a consumer that keeps the tensors (the in-process engine's staging) wants them written.

    ``slot`` returns the destination for one HF tensor (memory the consumer owns), or None when it
    has none for it (an unknown name or shape: the resharder then writes a temporary and ``put``
    decides what to do with it). ``put`` receives the written tensor and its checksum (None
    without ``checksums``), right after it was written.

    Optionally, ``verifier(name, nbytes)`` returns the consumer's own
    :class:`~megatron_smd.sync.checks.Checksum` for a tensor written into its slot (or None): the
    resharder feeds it every piece of the tensor right after writing it, while the piece is in
    cache, and hands its value to ``put`` as ``received`` (what the consumer compares the sender's
    checksum with).

    Optionally, ``arena(specs)`` offers slots for a whole stage as one arena (see the module
    docstring): for ``[(name, shape, dtype)]`` it returns the arena and a slot (or None) per tensor,
    or None to be served tensor by tensor; and ``arena_plan(key, build)`` keeps the arena's plan
    (``build()``) for the next sync while ``key`` (the arena and the learner tensors read) is the
    same. The arena's tensors are checksummed once, by the sender as it writes them, and that value
    is ``put`` as both the sender's and the consumer's (``received``): the bytes are the consumer's
    own, so its own checksum of them could only repeat the computation. (Tensor by tensor,
    ``verifier`` repeated it.)
    """

    def slot(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None: ...

    def put(self, name: str, t: torch.Tensor, checksum: int | None, received: int | None = None) -> None: ...


#: Bytes per chunk of an arena plan: larger than the resharder's pieces (``CHUNK_BYTES``, 2 MiB),
#: because a chunk's checks cost a fixed ~40 us of calls besides their bytes, and a plan's chunks
#: have no per-tensor work to amortise them. Measured on Qwen2.5-0.5B (verify, both threads):
#: 1 / 2 / 4 / 8 MiB -> 105 / 89 / 80 / 87 ms.
ARENA_CHUNK_BYTES = 4 << 20


def row_padded(nbytes: int) -> int:
    """``nbytes`` rounded up to whole checksum rows (4 KiB)."""
    return -(-nbytes // ROW_BYTES) * ROW_BYTES


def arena_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of tensors of ``sizes`` bytes laid out back to back, each starting on a checksum
    row (4 KiB), and the arena's total size."""
    offsets, off = [], 0
    for nb in sizes:
        offsets.append(off)
        off += row_padded(nb)
    return offsets, off


@dataclass
class _Chunk:
    """One job of the plan: arena bytes ``[lo, hi)`` (whole 4 KiB rows), written by ``copies`` and
    checked as ``dtype``; the tensors it holds (``tensors``, plan indices) start at rows ``seg_rows``
    relative to ``lo``, their column sums go to segments ``seg0, seg0 + 1, ...``."""

    lo: int
    hi: int
    copies: list[tuple[torch.Tensor, torch.Tensor]]
    dtype: torch.dtype
    tensors: list[int]
    seg_rows: list[int]
    seg0: int

    @property
    def seg_ends(self) -> list[int]:
        return self.seg_rows[1:] + [(self.hi - self.lo) // ROW_BYTES]


class FlatChecksums:
    """:func:`~.checks.tensor_checksum` of every tensor of an arena, fed chunk by chunk (in any order,
    from any thread: each chunk writes only its own rows of the sums) by :meth:`ArenaPlan.run`."""

    def __init__(self, plan: "ArenaPlan", on_time: Callable[[float], None] | None = None):
        self.plan = plan
        self.rsum = torch.zeros(plan.rows, dtype=torch.int64)
        self.cseg = np.zeros((plan.segments, _ROW), dtype=np.uint64)
        self.on_time = on_time

    def update(self, c: _Chunk, rows: torch.Tensor) -> None:
        """Sums of chunk ``c``'s rows (``rows``: its bytes as int64 ``[n, 512]``)."""
        r0, n = c.lo // ROW_BYTES, rows.shape[0]
        torch.sum(rows, 1, out=self.rsum[r0:r0 + n])
        x = rows.numpy().view(np.uint64)
        ends = c.seg_ends
        for s, (a, b) in enumerate(zip(c.seg_rows, ends)):  # np.add.reduceat is ~10x slower along axis 0
            np.add.reduce(x[a:b], axis=0, out=self.cseg[c.seg0 + s])

    def values(self) -> list[int]:
        """Every tensor's checksum, in plan order."""
        t0 = time.perf_counter()
        p = self.plan
        r = self.rsum.numpy().view(np.uint64)
        v = p.rel_rows * np.uint64((2 * _MV) & _MASK) + np.uint64(1)
        rowterm = np.add.reduceat(r * v, p.first_row)
        colterm = np.add.reduce(np.add.reduceat(self.cseg, p.first_seg, axis=0) * _np_col_weights(), axis=1)
        total = p.nbytes_u64 * np.uint64(_A) + rowterm + colterm
        out = [int(x) for x in total]
        if self.on_time is not None:
            self.on_time(time.perf_counter() - t0)
        return out


class ArenaPlan:
    """The copies that fill an arena, as chunks (see the module docstring).

    Args:
        slots: per tensor, its slot (a view of ``arena`` at the offset :func:`arena_layout` gives).
        pieces: per tensor, the conversion's pieces (:func:`~.pieces.hf_pieces`) that fill it.
        arena: the arena (``uint8``, contiguous), its gaps zero.
        chunk_bytes: about how many bytes a chunk holds.
    """

    def __init__(self, slots: list[torch.Tensor], pieces: list[list[Piece]], arena: torch.Tensor, chunk_bytes: int):
        self.arena, self.slots = arena, slots
        base = arena.data_ptr()
        self.offsets = [s.data_ptr() - base for s in slots]
        self.sizes = [s.numel() * s.element_size() for s in slots]
        if any(o % ROW_BYTES for o in self.offsets) or any(s.numel() == 0 for s in slots):
            raise ValueError("arena plan: every slot must start on a 4 KiB row and hold at least one element")
        self.rows = arena.numel() // ROW_BYTES
        self.chunks: list[_Chunk] = []
        self.first_seg = np.empty(len(slots), dtype=np.intp)
        nseg = 0
        group: list = []  # small tensors gathered into one chunk: [lo, hi, copies, dtype, tensors, seg_rows]

        def close() -> None:
            nonlocal group, nseg
            if group:
                lo, hi, copies, dt, ts, segs = group
                self.chunks.append(_Chunk(lo, hi, copies, dt, ts, segs, nseg))
                nseg += len(segs)
                group = []

        for k, (slot, pcs, off, nb) in enumerate(zip(slots, pieces, self.offsets, self.sizes)):
            end = off + row_padded(nb)
            parts = plan_chunks(slot, pcs, chunk_bytes)
            if len(parts) == 1 and group and group[3] == slot.dtype and end - group[0] <= chunk_bytes:
                self.first_seg[k] = nseg + len(group[5])  # joins the open group
                group[1] = end
                group[2].extend(parts[0][2])
                group[4].append(k)
                group[5].append((off - group[0]) // ROW_BYTES)
                continue
            close()
            self.first_seg[k] = nseg
            if len(parts) == 1:  # opens a group
                group = [off, end, list(parts[0][2]), slot.dtype, [k], [0]]
                continue
            for i, (lo, hi, copies) in enumerate(parts):  # a large tensor: a chunk per part (rows)
                group = [off + lo, end if i == len(parts) - 1 else off + hi, list(copies), slot.dtype, [k], [0]]
                close()
        close()
        self.segments = nseg
        first_row = [o // ROW_BYTES for o in self.offsets]
        nrows = [row_padded(nb) // ROW_BYTES for nb in self.sizes]
        if any(a + n != b for a, n, b in zip(first_row, nrows, first_row[1:])) or \
                (first_row and first_row[-1] + nrows[-1] != self.rows):
            raise ValueError("arena plan: the slots must tile the arena in order")
        self.first_row = np.asarray(first_row, dtype=np.intp)
        self.rel_rows = np.concatenate([np.arange(n, dtype=np.uint64) for n in nrows]) if nrows else \
            np.zeros(0, dtype=np.uint64)
        self.nbytes_u64 = np.asarray(self.sizes, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.chunks)

    def run(self, share: Callable[[int, Callable[[int], bool]], bool] | None, *, check_finite: bool,
            checksums: FlatChecksums | None = None, phases=None) -> list[bool]:
        """Write and check every chunk (``share(n, fn)`` runs ``fn(i)`` for ``i < n`` on two threads,
        :meth:`~.share.Helper.run`; None: on this thread). Returns, per tensor, whether it is finite
        (True without ``check_finite``). ``phases``: a :class:`~.meters.PhaseTimer` for ``convert``,
        ``finite`` and ``checksum``."""
        chunks, arena = self.chunks, self.arena
        bad: list[int] = []
        per_thread: dict[int, list[float]] = {}  # thread -> seconds of convert, finite, checksum

        def do(i: int) -> bool:
            c = chunks[i]
            times = per_thread.setdefault(threading.get_ident(), [0.0, 0.0, 0.0])
            t0 = time.perf_counter()
            for dst, src in c.copies:
                dst.copy_(src)
            t1 = time.perf_counter()
            ok = True
            if check_finite:
                ok = all_finite_cached(arena[c.lo:c.hi].view(c.dtype))
                if not ok:
                    bad.append(i)
            t2 = time.perf_counter()
            if checksums is not None:
                checksums.update(c, arena[c.lo:c.hi].view(torch.int64).view(-1, _ROW))
            t3 = time.perf_counter()
            times[0] += t1 - t0
            times[1] += t2 - t1
            times[2] += t3 - t2
            return ok

        if share is None or len(chunks) < 2:
            for i in range(len(chunks)):
                do(i)
        else:
            share(len(chunks), do)
        times = [sum(t[j] for t in per_thread.values()) for j in range(3)]
        if phases is not None:
            phases.add("convert", times[0])
            if check_finite:
                phases.add("finite", times[1])
            if checksums is not None:
                phases.add("checksum", times[2])
        finite = [True] * len(self.slots)
        for i in bad:  # which tensors: settled exactly, tensor by tensor
            for k in chunks[i].tensors:
                finite[k] = finite[k] and all_finite(self.slots[k])
        return finite
