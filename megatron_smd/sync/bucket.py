"""Buckets of HF-named tensors, their wire layout, checksums and safetensors shards (pure torch).

A :class:`Bucket` is what the resharder yields and every transport moves: an ordered list of
``(hf_name, tensor)`` whose bytes add up to at most the bucket size (a single tensor larger than
the bucket travels alone). Its *wire layout* (:meth:`Bucket.flatten`) is SGLang's
``FlattenedTensorBucket`` (``sglang/srt/weight_sync/tensor_bucket.py``, the ``flattened_bucket``
load format): one ``uint8`` tensor holding every tensor's bytes back to back, in bucket order, no
padding, each tensor starting at a byte offset that is a multiple of its element size. The same
bytes, preceded by a JSON header, are a valid safetensors file (:func:`write_safetensors`), so the
``disk`` transport writes a bucket without re-packing it.

Checksums (:func:`tensor_checksum`) are exact integer functions of a tensor's bytes, computed with
torch integer ops so they give the same value on CPU and GPU and for any reduction order; they are
what ``sync.verify`` compares between the sender and the engine.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

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
_CHUNK = 1 << 16  # int16 words per chunk
_GROUP = 32  # chunks per matrix-vector product: float64 temporaries of 32 * 2^16 * 8 B = 16 MiB
_MOD = (1 << 61) - 1  # Mersenne prime for combining chunk sums
_W_MULT = 0x9E3779B1  # odd: i -> i * _W_MULT mod 2^16 is a bijection, so the weights are distinct
_weights_cache: dict[torch.device, torch.Tensor] = {}


def _chunk_weights(device: torch.device) -> torch.Tensor:
    w = _weights_cache.get(device)
    if w is None:
        i = torch.arange(_CHUNK, dtype=torch.int64)
        w = ((((i * _W_MULT) & 0xFFFF) * 2) + 1).to(torch.float64).to(device)  # distinct odd, < 2^17
        _weights_cache[device] = w
    return w


def _chunk_multiplier(c: int) -> int:
    return (c * 0x2545F4914F6CDD1D + 0x632BE59BD9B4E019) % _MOD or 1


def tensor_checksum(t: torch.Tensor) -> int:
    """A 61-bit checksum of the tensor's bytes, exact and device-independent.

    The bytes are read as little-endian int16 words (a trailing odd byte zero-padded), cut into
    chunks of 2^16 words, and combined as ``(nbytes + sum_c M_c * S_c) mod (2^61 - 1)`` with
    ``S_c = sum_i w_i x_{c,i}``: distinct odd weights ``w_i < 2^17`` by position in the chunk, a
    multiplier ``M_c`` per chunk. ``S_c`` is computed as a float64 matrix-vector product, which is
    exact: every product is an integer below ``2^32`` and every partial sum below ``2^48 < 2^53``, so
    the result does not depend on the summation order, the BLAS or the device. A change of any
    single word changes ``S_c`` (``w_i`` is odd), so it is always detected; a swap of two words within
    a chunk changes it by ``(x_a - x_b)(w_a - w_b) != 0``. A corruption check, not a cryptographic hash.
    Temporaries are bounded (16 MiB) whatever the tensor size.
    """
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    n = b.numel()
    if n % 2:
        b = torch.cat([b, b.new_zeros(1)])
    words = b.view(torch.int16)
    nw = words.numel()
    w = _chunk_weights(words.device)
    total = n  # the byte length is part of the checksum
    n_chunks = (nw + _CHUNK - 1) // _CHUNK
    for g0 in range(0, n_chunks, _GROUP):
        seg = words[g0 * _CHUNK:min((g0 + _GROUP) * _CHUNK, nw)]
        if seg.numel() % _CHUNK:  # the last chunk: zero words add nothing
            seg = torch.cat([seg, seg.new_zeros(_CHUNK - seg.numel() % _CHUNK)])
        sums = seg.view(-1, _CHUNK).to(torch.float64) @ w
        for k, sval in enumerate(sums.tolist()):
            total = (total + (int(sval) % _MOD) * _chunk_multiplier(g0 + k)) % _MOD
    return total


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
    """

    stage: int
    index: int
    names: list[str] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    checksums: list[int] | None = None
    flat: torch.Tensor | None = None

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

    def pack(self, name: str, t: torch.Tensor, buffer: torch.Tensor) -> None:
        """Copy ``t`` into ``buffer`` (``uint8``) right after this bucket's bytes and add the view.

        All tensors of a bucket must be packed into the same buffer, from offset 0.
        """
        off, nb = self.nbytes, t.numel() * t.element_size()
        if off % t.element_size():
            raise ValueError(f"bucket: {name} ({t.dtype}) would start at byte {off}, "
                             f"not a multiple of its element size")
        if off + nb > buffer.numel():
            raise ValueError(f"bucket: {name} needs bytes [{off}, {off + nb}) of a {buffer.numel()}-byte buffer")
        view = buffer[off:off + nb].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.names.append(name)
        self.tensors.append(view)
        self.flat = buffer[:off + nb]

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
def write_safetensors(path: str | os.PathLike, bucket: Bucket, metadata: dict[str, str] | None = None) -> int:
    """Write ``bucket`` as one safetensors file and fsync it; returns the bytes written.

    The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian
    header length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
    {...}}`` padded with spaces to a multiple of 8 bytes, then the data buffer, which must be covered
    exactly by the offsets. That buffer is :meth:`Bucket.flatten`'s layout, so each tensor's bytes
    are written straight from the tensor, with no flat copy. Tensors must be on the CPU.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    for m in bucket.metas():
        if m.dtype not in _ST_DTYPES:
            raise ValueError(f"safetensors: dtype {m.dtype} of {m.name} is not supported")
        header[m.name] = {"dtype": _ST_DTYPES[m.dtype], "shape": list(m.shape),
                          "data_offsets": [m.offset, m.offset + m.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    written = 0
    with open(path, "wb") as f:
        written += f.write(struct.pack("<Q", len(raw)))
        written += f.write(raw)
        chunks = [bucket.flat] if bucket.flat is not None else bucket.tensors
        for t in chunks:
            if t.device.type != "cpu":
                t = t.cpu()
            if t.numel():
                written += f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return written


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
