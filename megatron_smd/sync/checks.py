"""The exact checks of a weight sync (pure torch and numpy): the checksum and the NaN / inf test.

Checksums (:func:`tensor_checksum`, :class:`Checksum` for a tensor fed in pieces) are exact integer
functions of a tensor's bytes (sums modulo 2^64, torch and numpy on the CPU, torch elsewhere), so
they give the same value on CPU and GPU and for any reduction order; they are what ``sync.verify``
compares between the sender and the engine. :func:`all_finite` is the sender's NaN / inf test
(:func:`all_finite_cached` for a piece just written).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

# --------------------------------------------------------------------------------------- checksums
#: Name of the checksum below, recorded next to checksums that outlive a sync (the disk index).
CHECKSUM_ALGORITHM = "smd-rowcol64"
_ROW = 512  # int64 words per row: 4 KiB
_CHUNK_ROWS = 1024  # rows per reduction chunk (4 MiB): the second reduction reads the chunk from cache
_MASK = (1 << 64) - 1
_A = 0x9E3779B97F4A7C15  # odd: the byte length's weight
_MV = 0xBF58476D1CE4E5B9  # row weights v_j = 2 * j * _MV + 1 (odd, distinct for j < 2^63)
_MU = 0x94D049BB133111EB  # column weights u_k = 2 * (k * _MU + _CU) (even, distinct for k < 2^63)
_CU = 0xD6E8FEB86659FD93
_col_weights_cache: dict[torch.device, torch.Tensor] = {}


def _i64(x: int) -> int:
    """``x mod 2^64`` as a signed 64-bit value (what a torch int64 tensor holds)."""
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def _col_weights(device: torch.device) -> torch.Tensor:
    u = _col_weights_cache.get(device)
    if u is None:
        k = torch.arange(_ROW, dtype=torch.int64, device=device)
        u = (k * _i64(_MU) + _i64(_CU)) * 2
        _col_weights_cache[device] = u
    return u


def _row_weights(rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(rows, dtype=torch.int64, device=device) * _i64(_MV) * 2 + 1


def tensor_checksum(t: torch.Tensor) -> int:
    """A 64-bit checksum of the tensor's bytes, exact and device-independent.

    The bytes (``n`` of them) are read as little-endian 64-bit words laid out in rows of 512 words
    (4 KiB; the last row zero-padded), ``x[j, k]``. With every row sum ``r_j = sum_k x[j, k]`` and
    every column sum ``c_k = sum_j x[j, k]``, the checksum is::

        (n * A + sum_j v_j r_j + sum_k u_k c_k) mod 2^64

    i.e. a weighted sum of the words with weight ``v_j + u_k`` for word ``(j, k)``: odd row weights
    ``v_j`` and even column weights ``u_k``, distinct by position. Arithmetic is integer arithmetic
    modulo ``2^64`` (integer arrays wrap), which is associative, so the value does not depend on
    the reduction order, the library (torch and numpy on the CPU, torch elsewhere) or the device. A
    change of any single word changes it (its weight is odd, so ``weight * delta != 0 mod 2^64``); a
    swap of two words in one row or in one column changes it by ``(x_a - x_b)(u_a - u_b)`` resp.
    ``(x_a - x_b)(v_a - v_b)``; a truncation changes ``n``. A corruption check, not a cryptographic
    hash.

    Cost: two integer sums over the bytes and no multiplication per word, done per 4 MiB chunk so
    that the second sum reads the chunk from cache (:class:`Checksum`, which also takes the bytes
    in pieces: the resharder feeds it each cache-sized piece of a tensor right after writing it).
    """
    b = t.detach()
    if not b.is_contiguous():
        b = b.contiguous()
    b = b.reshape(-1).view(torch.uint8)
    if b.device.type == "cpu":
        ck = Checksum(b.numel())
        ck.update(b, 0)
        return ck.value()
    return _checksum_torch(b)


#: Bytes per row of the checksum: :meth:`Checksum.update` takes pieces that start on a row.
ROW_BYTES = 8 * _ROW


class Checksum:
    """:func:`tensor_checksum` of ``nbytes`` bytes on the CPU, fed in pieces (:meth:`update`).

    Pieces may come in any order and from several threads at once (each writes its own row sums;
    the column sums are added under a lock); every byte must be fed exactly once before
    :meth:`value`. Row sums are taken with torch (an integer sum along contiguous rows, vectorised),
    column sums with numpy (which adds rows into one 4 KiB accumulator), both wrapping modulo 2^64.
    """

    __slots__ = ("nbytes", "_rsum", "_csum", "_lock")

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self._rsum = torch.zeros(-(-self.nbytes // ROW_BYTES), dtype=torch.int64)
        self._csum = np.zeros(_ROW, dtype=np.uint64)
        self._lock = threading.Lock()

    def update(self, piece: torch.Tensor, offset: int) -> None:
        """Add the bytes ``[offset, offset + len)`` (``piece``: a contiguous CPU tensor). ``offset``
        is a multiple of :data:`ROW_BYTES`, and so is the length unless the piece ends the bytes."""
        b = piece.reshape(-1).view(torch.uint8)
        n, end = b.numel(), offset + b.numel()
        if offset % ROW_BYTES or end > self.nbytes or (n % ROW_BYTES and end != self.nbytes):
            raise ValueError(f"checksum: piece [{offset}, {end}) of {self.nbytes} bytes is not row-aligned")
        full, j0 = n // ROW_BYTES, offset // ROW_BYTES
        acc = None
        part = np.empty(_ROW, dtype=np.uint64)
        for r0 in range(0, full, _CHUNK_ROWS):
            r1 = min(r0 + _CHUNK_ROWS, full)
            x = b[r0 * ROW_BYTES:r1 * ROW_BYTES].view(torch.int64).view(r1 - r0, _ROW)
            torch.sum(x, 1, out=self._rsum[j0 + r0:j0 + r1])
            np.add.reduce(x.numpy().view(np.uint64), axis=0, out=part)
            if acc is None:
                acc, part = part, np.empty(_ROW, dtype=np.uint64)
            else:
                acc += part
        if n % ROW_BYTES:  # the last, partial row: zero-padded
            tail = torch.zeros(ROW_BYTES, dtype=torch.uint8)
            tail[:n - full * ROW_BYTES] = b[full * ROW_BYTES:]
            tw = tail.view(torch.int64)
            torch.sum(tw, 0, keepdim=True, out=self._rsum[j0 + full:j0 + full + 1])
            tw = tw.numpy().view(np.uint64)
            if acc is None:
                acc = tw
            else:
                acc += tw
        if acc is not None:
            with self._lock:
                self._csum += acc

    def value(self) -> int:
        rows = self._rsum.numel()
        if rows == 0:
            return (self.nbytes * _A) & _MASK
        r = self._rsum.numpy().view(np.uint64)
        v = np.arange(rows, dtype=np.uint64) * np.uint64((2 * _MV) & _MASK) + np.uint64(1)
        total = int(np.add.reduce(r * v)) + int(np.add.reduce(self._csum * _np_col_weights()))
        return (self.nbytes * _A + total) & _MASK


_np_u: np.ndarray | None = None


def _np_col_weights() -> np.ndarray:
    global _np_u
    if _np_u is None:
        _np_u = _col_weights(torch.device("cpu")).numpy().view(np.uint64).copy()
    return _np_u


def _checksum_torch(b: torch.Tensor) -> int:
    n = b.numel()
    dev = b.device
    row_bytes = 8 * _ROW
    full = n // row_bytes
    rows = full + (1 if n % row_bytes else 0)
    if rows == 0:
        return (n * _A) & _MASK
    rsum = torch.empty(rows, dtype=torch.int64, device=dev)
    n_chunks = (full + _CHUNK_ROWS - 1) // _CHUNK_ROWS + (1 if n % row_bytes else 0)
    csum = torch.empty(n_chunks, _ROW, dtype=torch.int64, device=dev)
    c = 0
    for r0 in range(0, full, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, full)
        x = b[r0 * row_bytes:r1 * row_bytes].view(torch.int64).view(r1 - r0, _ROW)
        torch.sum(x, 1, out=rsum[r0:r1])
        torch.sum(x, 0, out=csum[c])
        c += 1
    if n % row_bytes:  # the last, partial row: zero-padded
        tail = torch.zeros(row_bytes, dtype=torch.uint8, device=dev)
        tail[:n - full * row_bytes] = b[full * row_bytes:]
        x = tail.view(torch.int64)
        torch.sum(x, 0, keepdim=True, out=rsum[full:])
        csum[c] = x
    total = int((rsum * _row_weights(rows, dev)).sum()) + int((csum.sum(0) * _col_weights(dev)).sum())
    return (n * _A + total) & _MASK


# ------------------------------------------------------------------------------------ finiteness
#: float dtype -> (signed int view, unsigned numpy view, exponent mask): a value is NaN or inf
#: exactly when its exponent bits are all ones, i.e. ``bits & ~sign >= mask``.
_FLOAT_BITS = {torch.bfloat16: (torch.int16, np.uint16, 0x7F80), torch.float16: (torch.int16, np.uint16, 0x7C00),
               torch.float32: (torch.int32, np.uint32, 0x7F800000),
               torch.float64: (torch.int64, np.uint64, 0x7FF0000000000000)}
_FINITE_CHUNK = 4 << 20  # bytes per step: the second pass reads the chunk from cache


def all_finite(t: torch.Tensor) -> bool:
    """No NaN / inf in ``t`` (True for integer tensors).

    One pass in the common case: ``t.sum()`` (accumulated in at least fp32) is finite. A NaN or an
    inf anywhere makes the sum NaN or inf (``inf + finite = inf``, ``inf - inf = NaN``, NaN
    propagates), so a finite sum proves every element finite. A non-finite sum may also come from
    finite values overflowing, so it is settled exactly: on the CPU on the bits, with two integer
    maxima per 4 MiB chunk (numpy, which has the unsigned reduction torch lacks): the largest
    value read as a signed integer finds a positive NaN / inf (``bits >= mask``), the largest read as
    unsigned a negative one (``bits >= sign | mask``); elsewhere with ``aminmax``.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return _all_finite_exact(t)


def all_finite_cached(t: torch.Tensor) -> bool:
    """:func:`all_finite` for a tensor just written, still in cache (a piece of at most a few MB): a
    2-byte float on the CPU is settled on its bits at once (two integer maxima, exact; in cache they
    cost less than the fp32-accumulated sum, from memory more), anything else by :func:`all_finite`."""
    if t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" and t.numel():
        return _all_finite_exact(t)
    return all_finite(t)


def _all_finite_exact(t: torch.Tensor) -> bool:
    spec = _FLOAT_BITS.get(t.dtype)
    if t.device.type != "cpu" or spec is None:
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    sint, uint, mask = spec
    x = t.detach()
    if not x.is_contiguous():
        x = x.contiguous()
    a = x.reshape(-1).view(sint).numpy()
    neg = np.array(mask | (1 << (8 * a.itemsize - 1)), dtype=uint)
    step = max(1, _FINITE_CHUNK // a.itemsize)
    for i in range(0, a.size, step):
        c = a[i:i + step]
        if c.max() >= mask or c.view(uint).max() >= neg:
            return False
    return True
