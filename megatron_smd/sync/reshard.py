"""The streaming resharder: Megatron TP x PP shards -> buckets of full, HF-named tensors.

Who does what (ranks in Megatron's ``tp-cp-ep-dp-pp`` order, one :class:`ParallelLayout`):

* **Participants** are the ranks of one model replica: ``dp_rank == 0 and cp_rank == 0``. Other
  DP / CP ranks hold identical weights and take no part (their :class:`Resharder` yields nothing).
* In each pipeline stage the participants are one TP group. They walk this stage's parameters in
  one fixed order (:func:`param_order`: layer by layer in :data:`convert.RULES` order, then the
  final norm and the output layer, then the embedding; identical on every TP rank, so the messages
  line up) and **gather** each parameter's TP shards onto ``tp_rank 0`` (point-to-point: only the
  sender needs the full tensor, so the other TP ranks allocate nothing).
* ``tp_rank 0`` of the replica's stage ``p`` is that stage's **sender**. It converts the gathered
  shards to HF tensors following the project's one conversion table (:data:`convert.RULES`: QKV
  de-interleaved per query group, ``[gate_r; up_r]`` rechunked, vocabulary padding trimmed, the tied
  last-stage copy of the embedding skipped) *straight into their destination*: every HF tensor is
  a set of pieces (views of the shards, :func:`~megatron_smd.sync.pieces.hf_pieces`) copied once
  into place, so the conversion is the packing copy. Destinations, by mode:

  - ``pack=True`` (wire transports): the bucket's slice of one packing buffer, in SGLang's
    flattened wire layout, so sending the bucket copies nothing more;
  - a ``sink`` (the in-process engine): the engine's own staging slots, kept across syncs (its
    double-buffered commit adopts them); with a sink whose ``keep`` accepts it (``adopt=False``),
    a contiguous view of the learner's parameter in the engine's dtype is staged as it is instead
    (it stays valid until the sync returns, and the engine's commit copies it from there); at TP=1
    on the CPU, a sink that offers an *arena* (one buffer for the stage) gets the whole stage as
    one plan of chunks that both threads work through (:mod:`~megatron_smd.sync.arena`);
  - ``pack=False`` (a consumer done with each bucket before the next, e.g. a file writer): no copy
    at all where the HF tensor is a contiguous view of the parameter, else a temporary.

  On the CPU a tensor is written in pieces of about ``CHUNK_BYTES`` (2 MiB), and each piece is
  checked as soon as it is written, while it is in cache: non-finite values (``check_finite``),
  the checksum (``checksums``) and, for a sink's slot or view, the sink's own verification
  checksum (``Sink.verifier``: the in-process engine's check, compared in its ``put``). A view
  that is not written is checked the same way, piece by piece: the first check reads a piece from
  memory, the others from cache. A large tensor's pieces are shared between the sender's thread
  and one helper thread (numpy and torch release the GIL), each taking the next piece in turn, so
  the sender never waits for the helper to be scheduled (:mod:`~megatron_smd.sync.share`). Every
  stage sends its own layers; the senders of all stages form exactly one pipeline group
  (``layout.pp_group`` of a sender), which the transports use.

Memory bound (the point of streaming). Let ``B`` be the bucket size and ``P`` the HF bytes of one
Megatron parameter. A packing sender holds, for the whole sync, one packing buffer of ``B`` bytes
(the open bucket, already in wire layout) and one gather buffer of ``(tp - 1)/tp * P_max``; the
conversion writes into the packing buffer and allocates nothing. A bucket is flushed *before* a
parameter that would overflow it. Peak extra memory on a sender is therefore about
``B + P_max`` (more when one parameter alone exceeds a bucket, which then gets a buffer of its
size): within two buckets whatever the model size. With ``overlap`` (a transport that sends a
bucket while the next one is packed) the same ``B`` bytes are two buffers of ``B / 2`` used in
turn, and buckets are at most ``B / 2`` (the first one ``B / 32``, so that the wire starts while the
second is packed): the memory bound is unchanged; there, an HF tensor larger than ``B / 2`` that is
a contiguous view of the learner's parameter (the embedding at TP=1) is sent as a bucket of its
own straight from the parameter, with no buffer and no copy. The buffers are reused within a sync, not
reallocated (a backend may drop its reference to a sent tensor late: gloo keeps the last one, and
fresh buffers would then pile up); large ones are backed by transparent huge pages, which makes
their first touch several times cheaper than 4 KiB page faults. They are not kept *across* syncs:
a sender's extra memory exists only during a sync. (The engine side keeps its staging buffers
across syncs, see :class:`~megatron_smd.sync.staging.ShadowBuffers`.) :class:`LiveBytes` counts
what the resharder holds (by storage, learner parameters excluded); the tests measure the real
peak with the allocator's own record (``torch.profiler`` memory events) and compare.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model.hf import ModelArch
from ..parallel.layout import ParallelLayout
from . import bucket as _bucket
from .arena import ARENA_CHUNK_BYTES, ArenaPlan, FlatChecksums, Sink
from .bucket import Bucket, empty_bytes, numel
from .checks import ROW_BYTES, Checksum, all_finite, all_finite_cached, tensor_checksum
from .meters import LiveBytes, PhaseTimer
from .pieces import Chunk, Piece, hf_pieces, param_order, param_view, plan_chunks, view_chunks, write_pieces
from .probe import learner_logits, unwrap_model
from .share import Helper

__all__ = ["LiveBytes", "PhaseTimer", "Piece", "ReshardStats", "Resharder", "Sink", "hf_pieces", "learner_logits",
           "param_order", "unwrap_model", "write_pieces"]

#: With overlap, a view of the learner's parameter at least this large is sent as it is (a segment
#: of its own); smaller ones are packed (a broadcast per small tensor costs more than its copy).
MIN_SEGMENT_BYTES = 1 << 20


@dataclass
class ReshardStats:
    """What one pass of the resharder did on this rank."""

    buckets: int = 0
    tensors: int = 0
    bytes: int = 0  # HF bytes yielded (sender only)
    peak_live_bytes: int = 0  # LiveBytes.peak on the sender
    largest_tensor_bytes: int = 0  # largest single Megatron parameter, converted (P_max)


def _splits(t: torch.Tensor) -> bool:
    """Whether writing / checking ``t`` is split over two threads (a large CPU tensor)."""
    n = _bucket.SPLIT_BYTES
    return bool(n) and t.device.type == "cpu" and t.numel() * t.element_size() >= n


class Resharder:
    """Iterate over this stage's weights as HF-named buckets (see the module docstring).

    Every participant of the stage (its TP group, in the ``dp_rank 0 / cp_rank 0`` replica) must
    iterate the resharder to the end: the TP gathers are collective. Only the sender gets buckets;
    on other ranks the iteration yields nothing. Non-participants may iterate too (it is empty).

    Args:
        model: this rank's GPTModel (DDP / Float16Module wrappers are unwrapped).
        layout: the initialized layout.
        arch: the HF architecture (names, QKV layout, vocabulary trim).
        bucket_bytes: bucket size ``B``. A parameter whose HF tensors exceed ``B`` gets a bucket of
            its own.
        dtype: cast the HF tensors to this dtype (e.g. bf16 for a bf16 engine); None keeps the
            learner's dtype.
        checksums: compute :func:`~megatron_smd.sync.bucket.tensor_checksum` per tensor, right
            after it is written (``Bucket.checksums``).
        meter: a :class:`LiveBytes` to account into (one is created otherwise).
        pack: pack each bucket in place in the wire layout (a reused buffer; what a wire transport
            sends). ``False``: a bucket's tensors are views of the learner's parameters where the HF
            tensor is one (valid until the next optimizer step), else temporaries; a consumer must
            be done with a bucket before asking for the next.
        sink: write every HF tensor into ``sink.slot(...)`` and hand it to ``sink.put`` (see
            :class:`Sink`); buckets then list the sink's tensors. Overrides ``pack``.
        check_finite: record, per bucket, the tensors holding NaN or inf (``Bucket.nonfinite``).
        phases: a :class:`PhaseTimer` to account ``gather``, ``convert``, ``pack``, ``finite``,
            ``checksum`` and ``stage`` (the sink's ``put``) into.
        overlap: a transport may still be sending one bucket while the next is built (it must be
            done with a bucket by the time it returns from sending the next one, or from
            ``finish``): buckets are half the size, packed alternately into two buffers (or, not
            packed, their temporaries kept one bucket longer), so the memory bound holds.
        embedding_first: send the embedding first (:func:`~megatron_smd.sync.pieces.param_order`).

    Raises ``ValueError`` at construction when the model's parameters are not exactly the ones the
    conversion table expects for this stage (same names and TP-local shapes on every rank).
    """

    def __init__(self, model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch, *, bucket_bytes: int,
                 dtype: torch.dtype | None = None, checksums: bool = False, meter: LiveBytes | None = None,
                 pack: bool = True, sink: Sink | None = None, check_finite: bool = False,
                 phases: PhaseTimer | None = None, overlap: bool = False, embedding_first: bool = False):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.layout, self.arch = layout, arch
        self.bucket_bytes, self.dtype, self.checksums = int(bucket_bytes), dtype, checksums
        self.stage, self.num_stages = layout.pp_rank, layout.pp
        self.participant = layout.dp_rank == 0 and layout.cp_rank == 0
        self.is_sender = self.participant and layout.tp_rank == 0
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        order = param_order(arch, self.stage, self.num_stages, embedding_first=embedding_first)
        extra, missing = sorted(set(params) - set(order)), sorted(set(order) - set(params))
        if extra or missing:
            raise ValueError(f"weight sync: stage {self.stage} model parameters {extra[:3]} are not in the "
                             f"conversion table; table entries {missing[:3]} are not model parameters")
        self.params = [(n, params[n]) for n in order]
        self.sink = sink
        self.pack = pack and sink is None
        self.check_finite = check_finite
        self.phases = phases or PhaseTimer()
        self.meter = meter or LiveBytes([p for _, p in self.params])
        self.stats = ReshardStats()
        self.errors: list[str] = []  # recorded, not raised: the TP gathers must run to the end
        self._draining = False
        # Reused buffers (sender only): the bucket is packed in place in wire layout (``pack0``, and
        # ``pack1`` in turn with ``overlap``: one bucket, or the largest parameter if that is bigger),
        # and the TP shards of one parameter land in ``gather`` ((tp - 1) x the largest local parameter).
        self.overlap = overlap and sink is None
        self._limit = self.bucket_bytes // 2 if self.overlap else self.bucket_bytes  # bytes per bucket
        est = [self._hf_bytes_estimate(q) for _, q in self.params]
        if self.overlap and self.pack:  # what is sent as views of the learner's parameters takes no buffer space
            est = [e for (n, q), e in zip(self.params, est) if not self._sent_as_views(n, q)]
        self._pack_capacity = max(min(self._limit, sum(est)), max(est, default=0))
        self._max_local_bytes = max(q.numel() * q.element_size() for _, q in self.params)
        self._bufs: dict[str, torch.Tensor] = {}
        self._temps: list[torch.Tensor] = []  # unpacked mode: temporaries of the open bucket
        self._prev_temps: list[torch.Tensor] = []  # (overlap) the previous bucket's, still being sent
        self._copier: Helper | None = None  # shares the pieces of large tensors (share.py)
        self._sums: list[int | None] = []  # the open bucket's checksums, in tensor order

    # --------------------------------------------------------------------------------------
    def _sent_as_views(self, name: str, p: torch.Tensor) -> bool:
        """Whether every HF tensor of parameter ``name`` is a view of it (then an overlapping
        transport sends it from there, see :meth:`_iter`): not for a TP-split parameter at TP > 1
        (its shards are gathered), nor for a conversion that rearranges or casts it."""
        if self.layout.tp > 1 and getattr(p, "tensor_model_parallel", False):
            return False
        try:
            outs = hf_pieces(name, [p.detach()] * self.layout.tp, self.arch, pp_rank=self.stage,
                             pp_size=self.num_stages)
        except Exception:  # reported when the parameter is converted
            return False
        for _, shape, pieces in outs:
            dt = self.dtype or pieces[0][1].dtype
            nb = numel(shape) * dt.itemsize
            if param_view(pieces, shape, dt, None) is None or not (nb >= MIN_SEGMENT_BYTES or nb > self._limit):
                return False
        return True

    def _hf_bytes_estimate(self, p: torch.Tensor) -> int:
        """Upper bound of the HF bytes one parameter converts to (vocabulary padding included)."""
        itemsize = (self.dtype or p.dtype).itemsize
        tp = self.layout.tp if getattr(p, "tensor_model_parallel", False) else 1
        return p.numel() * tp * itemsize

    def _buffer(self, key: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """A reusable ``uint8`` buffer (``key`` = ``"pack0"``, ``"pack1"`` or ``"gather"``), grown on demand.

        Reused rather than allocated per bucket / per parameter: collectives may drop their
        reference to a tensor only later (gloo keeps the last one), so fresh buffers would linger
        beyond the two-bucket bound; a reused one costs its size once.
        """
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes or buf.device != device:
            with self.phases("pack"):
                if buf is not None:
                    self.meter.release(buf)
                self._bufs.pop(key, None)
                del buf
                buf = empty_bytes(nbytes, device)
                self.meter.hold(buf)
                self._bufs[key] = buf
        return buf

    def _pack_key(self, bucket: Bucket) -> str:
        return f"pack{bucket.index % 2}" if self.overlap else "pack0"

    def _gather(self, name: str, p: torch.Tensor) -> list[torch.Tensor] | None:
        """All TP shards of ``p`` (rank order) on the sender, None elsewhere.

        A gather by point-to-point messages to ``tp_rank 0``, received straight into the reusable
        gather buffer (shards ``1..tp-1`` are views of it, valid until the next gather). Not
        ``dist.gather`` / ``all_gather``: gloo stages those through a temporary as large as the whole
        gathered tensor, which would break the memory bound; point-to-point receives write in place.
        """
        local = p.detach()
        tp, g = self.layout.tp, self.layout.tp_group
        if tp == 1:
            return [local]
        with self.phases("gather"):
            if not self.is_sender:
                dist.send(local.contiguous(), group=g, group_dst=0)
                return None
            nb = local.numel() * local.element_size()
            buf = self._buffer("gather", (tp - 1) * self._max_local_bytes, local.device)
            shards = [local] + [buf[k * nb:(k + 1) * nb].view(local.dtype).view(local.shape) for k in range(tp - 1)]
            works = [dist.irecv(shards[r], group=g, group_src=r) for r in range(1, tp)]
            for w in works:
                w.wait()
            if not getattr(p, "tensor_model_parallel", False):
                # A replicated parameter (the norms) must be identical on every TP rank: the forward
                # uses each rank's own copy, while only tp_rank 0's is sent.
                bad = [r for r in range(1, tp) if not torch.equal(shards[r], local)]
                if bad:
                    self.errors.append(f"replicated parameter {name} of stage {self.stage} differs between "
                                       f"TP rank 0 and TP ranks {bad}")
        return shards

    def set_sink(self, sink: Sink | None) -> None:
        """Write into ``sink`` (see the constructor) from now on; call before iterating."""
        self.sink = sink
        if sink is not None:
            self.pack = self.overlap = False
            self._limit = self.bucket_bytes

    def drain(self) -> None:
        """Stop converting: the remaining parameters are still gathered (the TP group must stay in
        step) but produce no buckets. The sync calls this once a transport has failed."""
        self._draining = True

    def _flush(self, bucket: Bucket) -> Bucket:
        bucket.borrows_only = not self.pack and self.sink is None and not self._temps
        if self.checksums:
            bucket.checksums, self._sums = self._sums, []
        self.stats.buckets += 1
        self.stats.tensors += len(bucket)
        self.stats.bytes += bucket.nbytes
        return bucket

    def __iter__(self) -> Iterator[Bucket]:
        if not self.participant:
            return
        make = getattr(self.sink, "arena", None)
        arena = (make is not None and self.is_sender and self.layout.tp == 1
                 and all(p.device.type == "cpu" for _, p in self.params))
        try:
            yield from (self._iter_arena(make) if arena else self._iter())
        finally:
            self._sums = []
            if self._copier is not None:
                self._copier.close()
                self._copier = None
            for buf in self._bufs.values():
                self.meter.release(buf)
            self._bufs.clear()
            self._release_temps()
            self._release_temps()
            self.stats.peak_live_bytes = self.meter.peak

    def _release_temps(self) -> None:
        """Free the accounting of the oldest temporaries: the last bucket's, or, with overlap (the
        transport may still be writing the previous bucket), the one before."""
        if self.overlap:
            self.meter.release(*self._prev_temps)
            self._prev_temps, self._temps = self._temps, []
        else:
            self.meter.release(*self._temps)
            self._temps = []

    def _write(self, dest: torch.Tensor, pieces: list[Piece], verifier: Checksum | None = None
               ) -> tuple[bool, int | None]:
        """Write the pieces into ``dest``; returns whether it is finite (True without
        ``check_finite``) and its checksum (None without ``checksums``).

        On the CPU the tensor is written in pieces of about ``CHUNK_BYTES``
        (:func:`~megatron_smd.sync.pieces.plan_chunks`), and each piece is checked right after it
        was written, while it is in cache: NaN / inf, the sender's checksum and, for a sink's
        slot, the sink's own ``verifier``. A large tensor's
        pieces are shared between this thread and the copy helper thread, joined.
        """
        nb = dest.numel() * dest.element_size()
        if dest.device.type != "cpu":  # whole-tensor ops (a GPU resharder)
            copies = [((dest if r is None else r(dest)), src) for r, src in pieces]
            ok = self._run(dest, [(0, nb, copies)], None, None)
            cs = tensor_checksum(dest) if self.checksums else None
            return ok, cs
        split = self._split(dest)
        chunk = _bucket.CHUNK_BYTES
        if split:  # at least one piece for each thread
            chunk = min(chunk, max(ROW_BYTES, nb // 2))
        return self._checked(dest, plan_chunks(dest, pieces, chunk), split, verifier)

    def _check_view(self, t: torch.Tensor, verifier: Checksum | None = None) -> tuple[bool, int | None]:
        """Finiteness and checksum of a tensor that was not written (a view of the parameter),
        piece by piece like :meth:`_write` (each piece is read from memory once, by the first
        check, and from cache by the others)."""
        if not (self.check_finite or self.checksums or verifier is not None):
            return True, None
        if t.device.type != "cpu":
            ok = self._run(t, [(0, t.numel() * t.element_size(), [])], None, None)
            return ok, (tensor_checksum(t) if self.checksums else None)
        return self._checked(t, view_chunks(t, _bucket.CHUNK_BYTES), self._split(t), verifier)

    def _checked(self, dest: torch.Tensor, plan: list[Chunk], split: bool, verifier: Checksum | None
                 ) -> tuple[bool, int | None]:
        ck = Checksum(dest.numel() * dest.element_size()) if self.checksums else None
        if split and len(plan) >= 2:  # pieces shared with the helper thread, never waiting for it to start
            ok = self._helper().run(len(plan), lambda i: self._run(dest, plan[i:i + 1], ck, verifier))
        else:
            ok = self._run(dest, plan, ck, verifier)
        if ck is None:
            return ok, None
        t0 = time.perf_counter()
        cs = ck.value()
        self.phases.add("checksum", time.perf_counter() - t0)
        return ok, cs

    def _run(self, dest: torch.Tensor, plan: list[Chunk], ck: Checksum | None, verifier: Checksum | None) -> bool:
        """Write and check the given pieces of ``dest`` in order (on one thread)."""
        flat = dest.reshape(-1)
        raw = flat.view(torch.uint8) if (ck is not None or verifier is not None) else None
        isz = dest.element_size()
        ok, t_conv, t_fin, t_ck = True, 0.0, 0.0, 0.0
        for lo, hi, copies in plan:
            t0 = time.perf_counter()
            for dst, src in copies:
                dst.copy_(src)
            t1 = time.perf_counter()
            if self.check_finite and ok:  # just written: in cache; else read from memory (one pass)
                ok = (all_finite_cached if copies else all_finite)(flat[lo // isz:hi // isz])
            t2 = time.perf_counter()
            if ck is not None:
                ck.update(raw[lo:hi], lo)
            t3 = time.perf_counter()
            if verifier is not None:
                verifier.update(raw[lo:hi], lo)  # the sink's own check, timed by the sink
            t_conv, t_fin, t_ck = t_conv + t1 - t0, t_fin + t2 - t1, t_ck + t3 - t2
        self.phases.add("convert", t_conv)
        if self.check_finite:
            self.phases.add("finite", t_fin)
        if ck is not None:
            self.phases.add("checksum", t_ck)
        return ok

    def _split(self, t: torch.Tensor) -> bool:
        """Two threads for ``t``: a large CPU tensor, unless the transport overlaps (its wire then
        keeps the second core busy while this thread packs)."""
        return not self.overlap and _splits(t)

    def _finish_tensor(self, bucket: Bucket, hf_name: str, t: torch.Tensor, finite: bool, checksum: int | None,
                       received: int | None = None) -> None:
        """Record what the writer found (finiteness, checksum) and hand the tensor to the sink."""
        if not finite:
            bucket.nonfinite.append(hf_name)
        if self.checksums:
            self._sums.append(checksum)
        if self.sink is not None:
            with self.phases("stage"):
                if received is None:
                    self.sink.put(hf_name, t, checksum)
                else:
                    self.sink.put(hf_name, t, checksum, received)

    def _iter_arena(self, make) -> Iterator[Bucket]:
        """The whole stage written into the sink's arena by one plan (:mod:`.arena`: both threads,
        no per-tensor wait), then handed to the sink and yielded bucket by bucket as in
        :meth:`_iter` (the same buckets). For a sink with an ``arena`` at TP=1 on the CPU."""
        groups, specs, errors = [], [], []
        with self.phases("convert"):
            for name, p in self.params:
                try:
                    outs = hf_pieces(name, [p.detach()], self.arch, pp_rank=self.stage, pp_size=self.num_stages)
                except Exception as e:  # as in _iter: recorded, the others still go
                    errors.append(f"converting {name} of stage {self.stage}: {type(e).__name__}: {e}")
                    outs = []
                groups.append((p, [(h, tuple(sh), self.dtype or pcs[0][1].dtype, pcs) for h, sh, pcs in outs]))
                specs += [(h, sh, dt) for h, sh, dt, _ in groups[-1][1]]
        got = make(specs) if specs else None
        if got is None:
            yield from self._iter()
            return
        self.errors += errors
        arena, slots = got

        def build() -> ArenaPlan:
            kept = [(s, e[3]) for s, e in zip(slots, (e for _, es in groups for e in es)) if s is not None]
            return ArenaPlan([s for s, _ in kept], [pcs for _, pcs in kept], arena, ARENA_CHUNK_BYTES)

        # the same learner tensors into the same arena: an earlier plan holds
        key = (arena.data_ptr(), self.dtype, ARENA_CHUNK_BYTES,
               tuple((p.data_ptr(), tuple(p.shape), p.stride(), p.dtype) for _, p in self.params))
        keep = getattr(self.sink, "arena_plan", None)
        plan = build() if keep is None else keep(key, build)
        ck = FlatChecksums(plan, lambda sec: self.phases.add("checksum", sec)) if self.checksums else None
        finite = plan.run(self._helper().run, check_finite=self.check_finite, checksums=ck, phases=self.phases)
        # The arena is the engine's own memory: the sender's checksum is taken on the engine's bytes,
        # so it is also the engine's record of them (a second pass over the same bytes, at the same
        # moment, could not differ). See arena.Sink.
        sums = received = ck.values() if ck else None
        bucket, j, it = Bucket(self.stage, 0), 0, iter(slots)
        for p, entries in groups:
            if self._draining:
                return
            if len(bucket) and bucket.nbytes + self._hf_bytes_estimate(p) > self._limit:
                yield self._flush(bucket)
                bucket = self._next(bucket)
            self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes,
                                                  sum(numel(sh) * dt.itemsize for _, sh, dt, _ in entries))
            for h, sh, dt, pcs in entries:
                if len(bucket) and bucket.nbytes % dt.itemsize:
                    yield self._flush(bucket)
                    bucket = self._next(bucket)
                slot = next(it)
                if slot is None:
                    t, fin, cs, rcv = self._unpacked(h, sh, dt, pcs, None)
                else:
                    t, fin, cs, rcv = slot, finite[j], sums and sums[j], received and received[j]
                    j += 1
                bucket.add(h, t)
                self._finish_tensor(bucket, h, t, fin, cs, rcv)
        if len(bucket) and not self._draining:
            yield self._flush(bucket)
            self._next(bucket)

    def _iter(self) -> Iterator[Bucket]:
        B, ph = self._limit, self.phases
        bucket = Bucket(self.stage, 0)
        gptr = None
        for name, p in self.params:
            if self._draining:
                self._gather(name, p)
                continue
            limit = B // 16 if self.overlap and bucket.index == 0 else B  # a small first bucket starts the wire early
            if self.is_sender and len(bucket) and bucket.nbytes + self._hf_bytes_estimate(p) > limit:
                yield self._flush(bucket)
                bucket = self._next(bucket)
            shards = self._gather(name, p)
            if shards is None:
                continue
            if gptr is None and "gather" in self._bufs:
                gptr = self._bufs["gather"].untyped_storage().data_ptr()
            try:
                with ph("convert"):
                    outs = hf_pieces(name, shards, self.arch, pp_rank=self.stage, pp_size=self.num_stages)
            except Exception as e:  # a conversion bug must not leave the TP group out of step
                self.errors.append(f"converting {name} of stage {self.stage}: {type(e).__name__}: {e}")
                outs = []
            if not outs:
                continue  # the tied output layer of the last stage (or a recorded error)
            dtypes = [self.dtype or pieces[0][1].dtype for _, _, pieces in outs]
            sizes = [numel(shape) * dt.itemsize for (_, shape, _), dt in zip(outs, dtypes)]
            self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes, sum(sizes))
            for (hf_name, shape, pieces), dt, nb in zip(outs, dtypes, sizes):
                view = param_view(pieces, shape, dt, gptr) if self.overlap and self.pack else None
                if view is not None and nb > B:  # a bucket of its own anyway
                    if len(bucket):
                        yield self._flush(bucket)
                        bucket = self._next(bucket)
                    bucket.append_view(hf_name, view)
                    self._finish_tensor(bucket, hf_name, view, *self._check_view(view))
                    yield self._flush(bucket)
                    bucket = self._next(bucket)
                    del view
                    continue
                if self.overlap and self.pack:  # the bucket in segments: views of the learner's memory as they are
                    if nb < MIN_SEGMENT_BYTES:
                        view = None
                    buf = self._buffer(self._pack_key(bucket), self._pack_capacity, p.device)
                    end = -(-bucket.packed // dt.itemsize) * dt.itemsize + nb
                    if len(bucket) and (bucket.nbytes % dt.itemsize or (view is None and end > buf.numel())):
                        yield self._flush(bucket)
                        bucket = self._next(bucket)
                        buf = self._buffer(self._pack_key(bucket), self._pack_capacity, p.device)
                    if view is not None:
                        t = view
                        bucket.append_view(hf_name, t)
                        finite, cs = self._check_view(t)
                    else:
                        if nb > buf.numel():
                            buf = self._buffer(self._pack_key(bucket), nb, p.device)
                        t = bucket.place(hf_name, shape, dt, buf)
                        finite, cs = self._write(t, pieces)
                    received = None
                elif self.pack:
                    buf = self._buffer(self._pack_key(bucket), self._pack_capacity, p.device)
                    if len(bucket) and (bucket.nbytes % dt.itemsize or bucket.nbytes + nb > buf.numel()):
                        yield self._flush(bucket)  # mixed dtypes (SGLang's alignment rule) or a low estimate
                        bucket = self._next(bucket)
                        buf = self._buffer(self._pack_key(bucket), self._pack_capacity, p.device)
                    if nb > buf.numel():
                        buf = self._buffer(self._pack_key(bucket), nb, p.device)
                    t = bucket.reserve(hf_name, shape, dt, buf)
                    finite, cs = self._write(t, pieces)
                    received = None
                else:
                    if len(bucket) and bucket.nbytes % dt.itemsize:
                        yield self._flush(bucket)
                        bucket = self._next(bucket)
                    t, finite, cs, received = self._unpacked(hf_name, shape, dt, pieces, gptr)
                    bucket.add(hf_name, t)
                self._finish_tensor(bucket, hf_name, t, finite, cs, received)
                del t
            del shards, outs
        if self.is_sender and len(bucket) and not self._draining:
            yield self._flush(bucket)
            self._next(bucket)

    def _unpacked(self, hf_name: str, shape: tuple[int, ...], dt: torch.dtype, pieces: list[Piece],
                  gptr: int | None) -> tuple[torch.Tensor, bool, int | None, int | None]:
        """An HF tensor outside a packing buffer (the parameter's own view, the sink's slot, or a
        temporary), whether it is finite, its checksum and the sink's own (``received``)."""
        view = param_view(pieces, shape, dt, gptr)
        if self.sink is not None:
            keep = getattr(self.sink, "keep", None)
            if view is not None and keep is not None and keep(hf_name, view):
                verifier = self._verifier(hf_name, view)  # the sink stages the view itself: no copy
                finite, cs = self._check_view(view, verifier)
                return view, finite, cs, (None if verifier is None else verifier.value())
            dest = self.sink.slot(hf_name, shape, dt)
            if dest is not None:
                verifier = self._verifier(hf_name, dest)
                finite, cs = self._write(dest, pieces, verifier)
                return dest, finite, cs, (None if verifier is None else verifier.value())
        elif view is not None:
            return (view, *self._check_view(view), None)  # a view of the learner's parameter: no copy
        t = torch.empty(shape, dtype=dt, device=pieces[0][1].device)
        finite, cs = self._write(t, pieces)
        if self.sink is None:
            self.meter.hold(t)
            self._temps.append(t)
        return t, finite, cs, None

    def _verifier(self, hf_name: str, dest: torch.Tensor) -> Checksum | None:
        """The sink's own checksum for ``dest`` (its slot), fed as the tensor is written."""
        make = getattr(self.sink, "verifier", None)
        if not self.checksums or make is None or dest.device.type != "cpu":
            return None
        return make(hf_name, dest.numel() * dest.element_size())

    def _helper(self) -> Helper:
        if self._copier is None:
            self._copier = Helper("smd-sync-copy")
        return self._copier

    def _next(self, bucket: Bucket) -> Bucket:
        """After a bucket was consumed: the next one (an unpacked bucket's temporaries are freed)."""
        self._release_temps()
        return Bucket(self.stage, bucket.index + 1)
