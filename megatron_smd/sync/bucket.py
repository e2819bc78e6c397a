"""Buckets of HF-named tensors, their wire layout, checksums and safetensors shards (pure torch).

A :class:`Bucket` is what the resharder yields and every transport moves: an ordered list of
``(hf_name, tensor)`` whose bytes add up to at most the bucket size (a single tensor larger than
the bucket travels alone). Its *wire layout* (:meth:`Bucket.flatten`) is SGLang's
``FlattenedTensorBucket`` (``sglang/srt/weight_sync/tensor_bucket.py``, the ``flattened_bucket``
load format): one ``uint8`` tensor holding every tensor's bytes back to back, in bucket order, no
padding, each tensor starting at a byte offset that is a multiple of its element size. The same
bytes, preceded by a JSON header, are a valid safetensors file (:func:`write_safetensors`), so the
``disk`` transport writes a bucket without re-packing it.

Checksums (:func:`tensor_checksum`) are exact integer functions of a tensor's bytes (sums modulo
2^64, with numpy on the CPU and torch elsewhere), so they give the same value on CPU and GPU and for
any reduction order; they are what ``sync.verify`` compares between the sender and the engine.
:func:`all_finite` is the sender's NaN / inf test, and :func:`empty_bytes` the huge-page-backed
buffer that large packing and receive buffers are allocated with.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# ------------------------------------------------------------------------------------------ dtypes
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``: the spelling SGLang's weight-update API expects
    (it resolves it with ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dt


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


# ----------------------------------------------------------------------------------------- bucket
@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flattened bucket: bytes ``[offset, offset + nbytes)``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Bucket:
    """One bucket of HF tensors from one pipeline stage.

    Attributes:
        stage: the pipeline stage (``pp_rank``) whose layers these are.
        index: the bucket's sequence number within its stage (0, 1, ...).
        names / tensors: the HF names and full tensors, in send order. Tensors are contiguous; they
            may alias learner parameters (a replicated tensor at TP=1 is the parameter itself), so
            a transport must be done with a bucket before the learner's next optimizer step.
        checksums: :func:`tensor_checksum` per tensor, when verification is on.
        flat: when the bucket was packed in place (by :class:`~megatron_smd.sync.reshard.Resharder`),
            its bytes in wire layout; ``tensors`` are then views of it. The packing buffer is reused
            for the next bucket, so a consumer must be done with a bucket before asking for the next.
        nonfinite: the tensors found to hold NaN or inf when the resharder checked them.
    """

    stage: int
    index: int
    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    checksums: list[int] | None = None
    flat: torch.Tensor | None = None
    nonfinite: list[str] = field(default_factory=list)  # names holding NaN / inf (``check_finite``)

    _added: int = field(default=0, repr=False)  # bytes added through add() (O(1) nbytes)

    @property
    def nbytes(self) -> int:
        if self.flat is not None:
            return self.flat.numel()
        if self._added:
            return self._added
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def aligned_for(self, t: torch.Tensor) -> bool:
        """Whether ``t`` can be appended at the current byte offset (offset % itemsize == 0)."""
        return self.nbytes % t.element_size() == 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError(f"bucket: tensor {name} is not contiguous")
        if not self.aligned_for(t):
            raise ValueError(f"bucket: {name} ({t.dtype}) would start at byte {self.nbytes}, "
                             f"not a multiple of its element size")
        self.names.append(name)
        self.tensors.append(t)
        self._added += t.numel() * t.element_size()

    def reserve(self, name: str, shape, dtype: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
        """Add ``name`` as a view of ``buffer`` (``uint8``) right after this bucket's bytes, to be
        written by the caller (the resharder converts straight into it); returns the view.

        All tensors of a bucket must be reserved in the same buffer, from offset 0.
        """
        off, nb = self.nbytes, _numel(shape) * dtype.itemsize
        if off % dtype.itemsize:
            raise ValueError(f"bucket: {name} ({dtype}) would start at byte {off}, "
                             f"not a multiple of its element size")
        if off + nb > buffer.numel():
            raise ValueError(f"bucket: {name} needs bytes [{off}, {off + nb}) of a {buffer.numel()}-byte buffer")
        view = buffer[off:off + nb].view(dtype).view(tuple(shape))
        self.names.append(name)
        self.tensors.append(view)
        self.flat = buffer[:off + nb]
        return view

    def metas(self) -> list[TensorMeta]:
        out, off = [], 0
        for name, t in zip(self.names, self.tensors):
            nb = t.numel() * t.element_size()
            out.append(TensorMeta(name, t.dtype, tuple(t.shape), off, nb))
            off += nb
        return out

    def header(self) -> dict:
        """Names, dtypes (SGLang spelling), shapes and checksums: the announcement before the bytes."""
        return {"stage": self.stage, "index": self.index, "names": list(self.names),
                "dtypes": [dtype_name(t.dtype) for t in self.tensors],
                "shapes": [list(t.shape) for t in self.tensors],
                "checksums": None if self.checksums is None else list(self.checksums),
                "nbytes": self.nbytes}

    def compute_checksums(self) -> None:
        self.checksums = [tensor_checksum(t) for t in self.tensors]

    def flatten(self, device: torch.device | None = None) -> torch.Tensor:
        """The wire layout: ``uint8 [nbytes]``, tensors back to back (SGLang ``flattened_bucket``).

        A bucket packed by the resharder already lives in that layout (:attr:`flat`), which is
        returned as is (no copy) when it is on ``device``.
        """
        if device is not None:
            dev = torch.device(device)
        elif self.flat is not None:
            dev = self.flat.device
        else:
            dev = self.tensors[0].device if self.tensors else torch.device("cpu")
        if self.flat is not None and self.flat.device == dev:
            return self.flat
        flat = torch.empty(self.nbytes, dtype=torch.uint8, device=dev)
        for m, t in zip(self.metas(), self.tensors):
            flat[m.offset:m.offset + m.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        return flat


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------ memory
_HUGE = 1 << 21  # a transparent huge page (x86-64, aarch64 with 4 KiB base pages)
_madvise = None


def _hugepage_advice(t: torch.Tensor) -> None:
    """Ask Linux to back ``t``'s (untouched) memory with transparent huge pages, best effort.

    A fresh multi-hundred-MB buffer otherwise costs one page fault per 4 KiB on its first touch,
    which on a VM costs several times the copy that follows it; with 2 MiB pages the faults are
    512x fewer. Only the 2 MiB-aligned interior of the tensor's own memory is advised (advice, not
    a remap: the memory stays the tensor's). No-op where ``madvise`` is unavailable or refused.
    """
    global _madvise
    if _madvise is None:
        try:
            import ctypes
            import sys

            if not sys.platform.startswith("linux"):
                raise OSError
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    start = t.data_ptr()
    lo = (start + _HUGE - 1) & ~(_HUGE - 1)
    hi = (start + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if hi > lo:
        _madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; a refusal leaves ordinary pages


def empty_bytes(nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised ``uint8 [nbytes]`` buffer; on the CPU, a large one is backed by huge pages."""
    t = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
    if t.device.type == "cpu" and nbytes >= 4 * _HUGE:
        _hugepage_advice(t)
    return t


#: A CPU tensor at least this large is written (and checked) in two halves on two threads, and a
#: commit at least twice this large runs as two halves: see ``Resharder._write``.
SPLIT_BYTES = 8 << 20
#: The resharder writes a CPU tensor in pieces of about this many bytes and checks each piece (NaN /
#: inf, checksum, the in-process engine's verification) right after writing it, while it is in cache.
CHUNK_BYTES = 2 << 20


def unflatten(flat: torch.Tensor, names, dtypes, shapes) -> list[tuple[str, torch.Tensor]]:
    """Views of the tensors in a flattened bucket (the inverse of :meth:`Bucket.flatten`).

    Raises ``ValueError`` when the announced sizes do not add up to ``flat``'s length or a tensor is
    misaligned (the same checks as SGLang's ``FlattenedTensorBucket.empty``).
    """
    out, off = [], 0
    for name, dt, shape in zip(names, dtypes, shapes, strict=True):
        dt = dt if isinstance(dt, torch.dtype) else dtype_from_name(dt)
        n = 1
        for s in shape:
            n *= int(s)
        nb = n * dt.itemsize
        if off % dt.itemsize:
            raise ValueError(f"flattened bucket: {name} starts at byte {off}, misaligned for {dt}")
        if off + nb > flat.numel():
            raise ValueError(f"flattened bucket: {name} needs bytes [{off}, {off + nb}) of {flat.numel()}")
        out.append((name, flat[off:off + nb].view(dt).view(tuple(int(s) for s in shape))))
        off += nb
    if off != flat.numel():
        raise ValueError(f"flattened bucket: tensors cover {off} bytes of {flat.numel()}")
    return out


def flat_size(dtypes, shapes) -> int:
    total = 0
    for dt, shape in zip(dtypes, shapes, strict=True):
        dt = dt if isinstance(dt, torch.dtype) else dtype_from_name(dt)
        n = 1
        for s in shape:
            n *= int(s)
        total += n * dt.itemsize
    return total


# ------------------------------------------------------------------------------------ safetensors
def write_safetensors(path: str | os.PathLike, bucket: Bucket, metadata: dict[str, str] | None = None, *,
                      fsync: bool = True) -> int:
    """Write ``bucket`` as one safetensors file and fsync it (unless ``fsync=False``: the caller
    does); returns the bytes written.

    The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
    header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
    {...}}`` padded with spaces to a multiple of 8 bytes, then the data buffer, which must be covered
    exactly by the offsets. That buffer is :meth:`Bucket.flatten`'s layout, so each tensor's bytes
    are written straight from the tensor, with no flat copy. Tensors must be on the CPU.

    An existing file is overwritten in place (then truncated to its new length): its disk blocks
    are reused, so the file system allocates nothing and frees nothing (on a file system mounted
    with ``discard``, freeing a gigabyte costs the next writer its trim). The kernel is asked to
    start writing the data back every :data:`WRITEBACK_BYTES` (``sync_file_range``, Linux), so that
    the data reaches the disk while the rest is written and the final fsync waits for little.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    for m in bucket.metas():
        if m.dtype not in _ST_DTYPES:
            raise ValueError(f"safetensors: dtype {m.dtype} of {m.name} is not supported")
        header[m.name] = {"dtype": _ST_DTYPES[m.dtype], "shape": list(m.shape),
                          "data_offsets": [m.offset, m.offset + m.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written, flushed = 0, 0
    with open(path, "r+b" if os.path.isfile(path) else "wb") as f:
        written += f.write(struct.pack("<Q", len(raw)))
        written += f.write(raw)
        chunks = [bucket.flat] if bucket.flat is not None else bucket.tensors
        for t in chunks:
            if t.device.type != "cpu":
                t = t.cpu()
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            for lo in range(0, len(data), WRITEBACK_BYTES):
                written += f.write(data[lo:lo + WRITEBACK_BYTES])
                if written - flushed >= WRITEBACK_BYTES:
                    f.flush()
                    _start_writeback(f.fileno(), flushed, written - flushed)
                    flushed = written
        f.truncate()
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return written


#: ``write_safetensors`` starts the write-back of its file every this many bytes.
WRITEBACK_BYTES = 64 << 20
_sync_file_range = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``: start writing those dirty
    pages back without waiting (best effort; a no-op where the call does not exist)."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes
            import sys

            if not sys.platform.startswith("linux"):
                raise OSError
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure shows in the fsync


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename / file creation inside ``path`` durable."""
    fd = os.open(str(Path(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_bucket(staging, flat: torch.Tensor, hdr: dict, stage: int) -> None:
    """Unpack one received bucket (its header ``hdr``: names, dtypes, shapes, checksums) into a
    staged update; a malformed bucket is recorded as a problem of the update, not raised, so the
    receiving loop stays in step with the senders."""
    try:
        views = unflatten(flat, hdr["names"], hdr["dtypes"], hdr["shapes"])
    except ValueError as e:
        staging.problem(f"stage {stage} bucket {hdr['index']}: {e}")
        return
    sums = hdr["checksums"] or [None] * len(views)
    for (name, t), cs in zip(views, sums):
        staging.add(name, t, cs, copy=False)
