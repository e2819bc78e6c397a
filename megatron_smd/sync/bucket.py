"""Buckets of HF-named tensors, their wire layout, checksums and safetensors shards (pure torch).

A :class:`Bucket` is what the resharder yields and every transport moves: an ordered list of
``(hf_name, tensor)`` whose bytes add up to at most the bucket size (a single tensor larger than
the bucket travels alone). Its *wire layout* (:meth:`Bucket.flatten`) is SGLang's
``FlattenedTensorBucket`` (``sglang/srt/weight_sync/tensor_bucket.py``, the ``flattened_bucket``
load format): one ``uint8`` tensor holding every tensor's bytes back to back, in bucket order, no
padding, each tensor starting at a byte offset that is a multiple of its element size. The same
bytes, preceded by a JSON header, are a valid safetensors file (:func:`write_safetensors`), so the
``disk`` transport writes a bucket without re-packing it.

The checksum (:func:`tensor_checksum`, what ``sync.verify`` compares between the sender and the
engine) and the sender's NaN / inf test (:func:`all_finite`) live in :mod:`.checks` and are
re-exported here; :func:`empty_bytes` is the huge-page-backed buffer that large packing and
receive buffers are allocated with.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import CHECKSUM_ALGORITHM, ROW_BYTES, Checksum, all_finite, all_finite_cached, tensor_checksum

__all__ = ["CHECKSUM_ALGORITHM", "CHUNK_BYTES", "ROW_BYTES", "SPLIT_BYTES", "Bucket", "Checksum", "NonFiniteError",
           "TensorMeta", "all_finite", "all_finite_cached", "dtype_from_name", "dtype_name", "empty_bytes", "flat_size",
           "fsync_dir", "stage_bucket", "tensor_checksum", "unflatten", "write_safetensors"]

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
        segments: (built with :meth:`place` / :meth:`append_view`) the wire layout as consecutive
            ``uint8`` pieces, each contiguous memory: slices of a packing buffer and views of
            learner parameters, adjacent ones merged. Their concatenation is :meth:`flatten`'s
            result; a transport can send them one after the other instead of packing.
    """

    stage: int
    index: int
    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    checksums: list[int] | None = None
    flat: torch.Tensor | None = None
    nonfinite: list[str] = field(default_factory=list)  # names holding NaN / inf (``check_finite``)

    segments: list[torch.Tensor] | None = None
    packed: int = 0  # bytes of the packing buffer that place() used (alignment padding included)
    #: every tensor is a view of the learner's parameters (no buffer or temporary of the resharder):
    #: a transport may keep the bucket until its ``finish`` rather than until the next ``send``
    borrows_only: bool = False

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
        off, nb = self.nbytes, numel(shape) * dtype.itemsize
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

    def place(self, name: str, shape, dtype: torch.dtype, buffer: torch.Tensor) -> torch.Tensor:
        """Add ``name`` as a view of the packing ``buffer`` (``uint8``) after the bytes earlier
        :meth:`place` calls used, to be written by the caller; returns the view. Unlike
        :meth:`reserve`, the bucket may also hold tensors elsewhere (:meth:`append_view`): its
        wire layout is then :attr:`segments`."""
        nb = numel(shape) * dtype.itemsize
        pos = -(-self.packed // dtype.itemsize) * dtype.itemsize
        if self.nbytes % dtype.itemsize:
            raise ValueError(f"bucket: {name} ({dtype}) would start at byte {self.nbytes}, "
                             f"not a multiple of its element size")
        if pos + nb > buffer.numel():
            raise ValueError(f"bucket: {name} needs bytes [{pos}, {pos + nb}) of a {buffer.numel()}-byte buffer")
        view = buffer[pos:pos + nb].view(dtype).view(tuple(shape))
        self.add(name, view)
        self.packed = pos + nb
        self._extend(buffer[pos:pos + nb])
        return view

    def append_view(self, name: str, t: torch.Tensor) -> None:
        """Add ``t`` itself (contiguous memory anywhere, e.g. a learner parameter) to the wire
        layout (:attr:`segments`)."""
        self.add(name, t)
        self._extend(t.reshape(-1).view(torch.uint8))

    def _extend(self, raw: torch.Tensor) -> None:
        segs = self.segments if self.segments is not None else []
        self.segments = segs
        if raw.numel() == 0:
            return
        if segs:
            last = segs[-1]
            if (last.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
                    and last.data_ptr() + last.numel() == raw.data_ptr()):  # adjacent: one segment
                segs[-1] = torch.empty(0, dtype=torch.uint8, device=raw.device).set_(
                    last.untyped_storage(), last.storage_offset(), (last.numel() + raw.numel(),))
                return
        segs.append(raw)

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
        if self.segments is not None and len(self.segments) == 1 and self.segments[0].device == dev:
            return self.segments[0]
        flat = torch.empty(self.nbytes, dtype=torch.uint8, device=dev)
        for m, t in zip(self.metas(), self.tensors):
            flat[m.offset:m.offset + m.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        return flat


def numel(shape) -> int:
    """Elements of a tensor of ``shape`` (any sequence of ints)."""
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
class NonFiniteError(ValueError):
    """:func:`write_safetensors` (``check_finite``) met NaN or inf in tensor ``name``."""

    def __init__(self, name: str):
        super().__init__(f"non-finite values (NaN or inf) in {name}")
        self.name = name


def write_safetensors(path: str | os.PathLike, bucket: Bucket, metadata: dict[str, str] | None = None, *,
                      fsync: bool = True, check_finite: bool = False) -> int:
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

    ``check_finite``: test each piece of a float tensor (``CHUNK_BYTES``) for NaN / inf right before
    writing it (the test brings it into cache, the write copies it from there) and raise
    :class:`NonFiniteError` at the first one (the file is then incomplete).
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
        if check_finite and bucket.flat is not None:  # a packed bucket: its tensors are views of it
            bad = next((n for n, t in zip(bucket.names, bucket.tensors) if not all_finite(t)), None)
            if bad is not None:
                raise NonFiniteError(bad)
        chunks = [bucket.flat] if bucket.flat is not None else bucket.tensors
        names = [None] if bucket.flat is not None else bucket.names
        for name, t in zip(names, chunks):
            if t.device.type != "cpu":
                t = t.cpu()
            flat = t.reshape(-1)
            data = memoryview(flat.view(torch.uint8).numpy())
            step = CHUNK_BYTES if check_finite and name is not None and t.is_floating_point() else WRITEBACK_BYTES
            for lo in range(0, len(data), step):
                if step == CHUNK_BYTES and not all_finite_cached(flat[lo // t.element_size():
                                                                      (lo + step) // t.element_size()]):
                    raise NonFiniteError(name)
                written += f.write(data[lo:lo + step])
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
