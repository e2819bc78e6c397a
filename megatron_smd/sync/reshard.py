"""The streaming resharder: Megatron TP x PP shards -> buckets of full, HF-named tensors.

Who does what (ranks in Megatron's ``tp-cp-ep-dp-pp`` order, one :class:`ParallelLayout`):

* **Participants** are the ranks of one model replica: ``dp_rank == 0 and cp_rank == 0``. Other
  DP / CP ranks hold identical weights and take no part (their :class:`Resharder` yields nothing).
* In each pipeline stage the participants are one TP group. They walk this stage's parameters in
  one fixed order (:func:`param_order`: embedding, then layer by layer in :data:`convert.RULES`
  order, then the final norm and the output layer; identical on every TP rank, so the messages
  line up) and **gather** each parameter's TP shards onto ``tp_rank 0`` (point-to-point: only the
  sender needs the full tensor, so the other TP ranks allocate nothing).
* ``tp_rank 0`` of the replica's stage ``p`` is that stage's **sender**: it converts the gathered
  shards with :func:`megatron_smd.learner.convert.iter_hf_from_local` (QKV de-interleaved per
  query group, ``[gate_r; up_r]`` rechunked, vocabulary padding trimmed, the tied last-stage copy of
  the embedding skipped) and packs the HF tensors into :class:`~megatron_smd.sync.bucket.Bucket` s,
  in place, in the wire layout (or, for a consumer that keeps them anyway, the in-process engine's
  staging or a file, hands the converted tensors over as they are: ``pack=False``, one copy less).
  Every stage sends its own layers; the senders of all stages form exactly one pipeline group
  (``layout.pp_group`` of a sender), which the transports use.

Memory bound (the point of streaming). Let ``B`` be the bucket size and ``P`` the HF bytes of one
Megatron parameter. A sender holds, for the whole sync, one packing buffer of ``B`` bytes (the open
bucket, already in wire layout, so sending it copies nothing) and one gather buffer of
``(tp - 1)/tp * P_max``; per parameter, the converted tensors (``P``) until they are packed, plus
the conversion's own temporaries (the QKV split goes through one concatenated copy). A bucket is
flushed *before* a parameter that would overflow it. Peak extra memory on a sender is therefore
about ``B + 2 P_max`` (``2 P_max`` more when one parameter alone exceeds a bucket): within two
buckets whenever the largest parameter is at most half a bucket, whatever the model size (fc1 of
Qwen2.5-7B in bf16 is 259 MiB against the default 512 MiB). The buffers are reused, not
reallocated: a backend may drop its reference to a sent tensor late (gloo keeps the last one), and
fresh buffers would then pile up. :class:`LiveBytes` counts what the resharder holds (by storage,
learner parameters excluded; not the temporaries inside ``iter_hf_from_local``); the tests measure
the real peak with the allocator's own record (``torch.profiler`` memory events) and compare.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..learner.convert import iter_hf_from_local, local_param_names
from ..model.hf import ModelArch
from ..parallel.layout import ParallelLayout
from .bucket import Bucket

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def param_order(arch: ModelArch, pp_rank: int, pp_size: int) -> list[str]:
    """This stage's Megatron parameter names in send order: first-stage tensors, then layer by layer
    (each layer in :data:`~megatron_smd.learner.convert.RULES` order), then last-stage tensors."""
    names = local_param_names(arch, pp_rank, pp_size)

    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        pos, name = item
        m = _LAYER.match(name)
        if m:
            return (1, int(m.group(1)), pos)
        return (0 if name.startswith("embedding.") else 2, 0, pos)

    return [n for _, n in sorted(enumerate(names), key=key)]


class LiveBytes:
    """Bytes of the tensors the sync holds that are not learner parameters, and their peak.

    Tensors are counted per storage (views and aliases of one allocation count once; a tensor that
    *is* a learner parameter counts zero), with a reference count so that a storage is released
    when its last holder releases it.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()):  # type: ignore[assignment]
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, refs]
        self.current = 0
        self.peak = 0

    def hold(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr in self._excluded or s.nbytes() == 0:
                continue
            if ptr in self._live:
                self._live[ptr][1] += 1
            else:
                self._live[ptr] = [s.nbytes(), 1]
                self.current += s.nbytes()
                self.peak = max(self.peak, self.current)

    def release(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            entry = self._live.get(ptr)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[ptr]


@dataclass
class ReshardStats:
    """What one pass of the resharder did on this rank."""

    buckets: int = 0
    tensors: int = 0
    bytes: int = 0  # HF bytes yielded (sender only)
    peak_live_bytes: int = 0  # LiveBytes.peak on the sender
    largest_tensor_bytes: int = 0  # largest single Megatron parameter, converted (P_max)


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
        checksums: compute :func:`~megatron_smd.sync.bucket.tensor_checksum` per tensor.
        meter: a :class:`LiveBytes` to account into (one is created otherwise).
        pack: pack each bucket in place in the wire layout (a reused buffer; what a wire transport
            sends). ``False``: a bucket is the list of converted tensors themselves, which a consumer
            that copies them anyway (the in-process engine's staging, a file) may keep, saving a copy.

    Raises ``ValueError`` at construction when the model's parameters are not exactly the ones the
    conversion table expects for this stage (same names and TP-local shapes on every rank).
    """

    def __init__(self, model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch, *, bucket_bytes: int,
                 dtype: torch.dtype | None = None, checksums: bool = False, meter: LiveBytes | None = None,
                 pack: bool = True):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.layout, self.arch = layout, arch
        self.bucket_bytes, self.dtype, self.checksums = int(bucket_bytes), dtype, checksums
        self.stage, self.num_stages = layout.pp_rank, layout.pp
        self.participant = layout.dp_rank == 0 and layout.cp_rank == 0
        self.is_sender = self.participant and layout.tp_rank == 0
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        order = param_order(arch, self.stage, self.num_stages)
        extra, missing = sorted(set(params) - set(order)), sorted(set(order) - set(params))
        if extra or missing:
            raise ValueError(f"weight sync: stage {self.stage} model parameters {extra[:3]} are not in the "
                             f"conversion table; table entries {missing[:3]} are not model parameters")
        self.params = [(n, params[n]) for n in order]
        self.pack = pack
        self._param_ptrs = {q.untyped_storage().data_ptr() for _, q in self.params}
        self.meter = meter or LiveBytes([p for _, p in self.params])
        self.stats = ReshardStats()
        self.errors: list[str] = []  # recorded, not raised: the TP gathers must run to the end
        self._draining = False
        # Reused buffers (sender only): the bucket is packed in place in wire layout (``_pack_buf``,
        # one bucket, or the largest parameter if that is bigger), and the TP shards of one parameter
        # land in ``_gather_buf`` ((tp - 1) x the largest local parameter).
        est = [self._hf_bytes_estimate(q) for _, q in self.params]
        self._pack_capacity = max(min(self.bucket_bytes, sum(est)), max(est))
        self._max_local_bytes = max(q.numel() * q.element_size() for _, q in self.params)
        self._pack_buf: torch.Tensor | None = None
        self._gather_buf: torch.Tensor | None = None

    # --------------------------------------------------------------------------------------
    def _hf_bytes_estimate(self, p: torch.Tensor) -> int:
        """Upper bound of the HF bytes one parameter converts to (vocabulary padding included)."""
        itemsize = (self.dtype or p.dtype).itemsize
        tp = self.layout.tp if getattr(p, "tensor_model_parallel", False) else 1
        return p.numel() * tp * itemsize

    def _buffer(self, attr: str, nbytes: int, device: torch.device) -> torch.Tensor:
        """A reusable ``uint8`` buffer (``attr`` = ``"_pack_buf"`` or ``"_gather_buf"``), grown on demand.

        Reused rather than allocated per bucket / per parameter: collectives may drop their
        reference to a tensor only later (gloo keeps the last one), so fresh buffers would linger
        beyond the two-bucket bound; a reused one costs its size once.
        """
        buf = getattr(self, attr)
        if buf is None or buf.numel() < nbytes or buf.device != device:
            if buf is not None:
                self.meter.release(buf)
            setattr(self, attr, None)
            del buf
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self.meter.hold(buf)
            setattr(self, attr, buf)
        return buf

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
        if not self.is_sender:
            dist.send(local.contiguous(), group=g, group_dst=0)
            return None
        nb = local.numel() * local.element_size()
        buf = self._buffer("_gather_buf", (tp - 1) * self._max_local_bytes, local.device)
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

    def drain(self) -> None:
        """Stop converting: the remaining parameters are still gathered (the TP group must stay in
        step) but produce no buckets. The sync calls this once a transport has failed."""
        self._draining = True

    def _convert(self, name: str, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """HF tensors of one parameter: contiguous, in the target dtype, owning their memory (an
        output that still aliases the gather buffer, which the next gather overwrites, is copied)."""
        gbuf = self._gather_buf
        gptr = gbuf.untyped_storage().data_ptr() if gbuf is not None else None
        outs = []
        for hf_name, t in iter_hf_from_local(name, shards, self.arch, pp_rank=self.stage, pp_size=self.num_stages):
            ptr = t.untyped_storage().data_ptr()
            # Unpacked buckets hand their tensors to the consumer, which may keep them: never a learner
            # parameter (a replicated norm at TP=1 comes back as the parameter itself).
            aliased = ptr == gptr or (not self.pack and ptr in self._param_ptrs)
            if aliased or (self.dtype is not None and t.dtype != self.dtype) or not t.is_contiguous():
                t = t.to(dtype=self.dtype or t.dtype, memory_format=torch.contiguous_format, copy=True)
            self.meter.hold(t)
            outs.append((hf_name, t))
        return outs

    def _flush(self, bucket: Bucket) -> Bucket:
        if self.checksums:
            bucket.compute_checksums()
        self.stats.buckets += 1
        self.stats.tensors += len(bucket)
        self.stats.bytes += bucket.nbytes
        return bucket

    def __iter__(self) -> Iterator[Bucket]:
        if not self.participant:
            return
        try:
            yield from self._iter()
        finally:
            for attr in ("_pack_buf", "_gather_buf"):
                if getattr(self, attr) is not None:
                    self.meter.release(getattr(self, attr))
                    setattr(self, attr, None)
            self.stats.peak_live_bytes = self.meter.peak

    def _iter(self) -> Iterator[Bucket]:
        B = self.bucket_bytes
        bucket = Bucket(self.stage, 0)
        for name, p in self.params:
            if self._draining:
                self._gather(name, p)
                continue
            if self.is_sender and len(bucket) and bucket.nbytes + self._hf_bytes_estimate(p) > B:
                yield self._flush(bucket)
                bucket = Bucket(self.stage, bucket.index + 1) if self.pack else self._next_unpacked(bucket)
            shards = self._gather(name, p)
            if shards is None:
                continue
            try:
                outs = self._convert(name, shards)
            except Exception as e:  # a conversion bug must not leave the TP group out of step
                self.errors.append(f"converting {name} of stage {self.stage}: {type(e).__name__}: {e}")
                outs = []
            del shards
            if not outs:
                continue  # the tied output layer of the last stage (or a recorded error)
            self.stats.largest_tensor_bytes = max(self.stats.largest_tensor_bytes,
                                                  sum(t.numel() * t.element_size() for _, t in outs))
            if not self.pack:  # the bucket keeps the converted tensors themselves
                for hf_name, t in outs:
                    if len(bucket) and not bucket.aligned_for(t):
                        yield self._flush(bucket)
                        bucket = self._next_unpacked(bucket)
                    bucket.add(hf_name, t)
                del outs
                continue
            buf = self._buffer("_pack_buf", self._pack_capacity, p.device)
            while outs:
                hf_name, t = outs.pop(0)
                nb = t.numel() * t.element_size()
                if len(bucket) and (not bucket.aligned_for(t) or bucket.nbytes + nb > buf.numel()):
                    yield self._flush(bucket)  # mixed dtypes (SGLang's alignment rule) or a low estimate
                    bucket = Bucket(self.stage, bucket.index + 1)
                if nb > buf.numel():
                    buf = self._buffer("_pack_buf", nb, p.device)
                bucket.pack(hf_name, t, buf)
                self.meter.release(t)
                del t
        if self.is_sender and len(bucket) and not self._draining:
            yield self._flush(bucket)
            if not self.pack:
                self._next_unpacked(bucket)

    def _next_unpacked(self, bucket: Bucket) -> Bucket:
        """After an unpacked bucket was consumed: its tensors are the consumer's now (or freed)."""
        self.meter.release(*bucket.tensors)
        return Bucket(self.stage, bucket.index + 1)


# ------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def learner_logits(model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch,
                   tokens: torch.Tensor) -> torch.Tensor | None:
    """The learner's full-vocabulary logits ``[B, T, V]`` (fp32) on global rank 0; None elsewhere.

    A plain pipelined forward of the ``dp_rank 0 / cp_rank 0`` replica (causal attention,
    positions ``0..T-1``): stage ``p`` receives the hidden states ``[T, B, D]`` from stage ``p-1``
    over the pipeline group, the last stage all-gathers its vocabulary shards ``[B, T, Vp/tp]``
    over TP and trims the padding, and its ``tp_rank 0`` sends the result to global rank 0. Every
    rank of the world may call it (non-participants return at once); every participant must.
    Needs ``cp == 1`` and no sequence parallelism (a probe is a few short rows).
    """
    if layout.cp != 1:
        raise ValueError("learner_logits: context parallelism splits the sequence; run the probe with cp=1 "
                         "(or verify by checksums)")
    if not (layout.dp_rank == 0 and layout.cp_rank == 0):
        return None
    m = unwrap_model(model)
    if getattr(m.config, "sequence_parallel", False):
        raise ValueError("learner_logits: sequence parallelism is not supported by the probe forward")
    was_training = m.training
    m.eval()
    try:
        B, T = tokens.shape
        p = next(m.parameters())
        dev = p.device
        tok = tokens.to(dev)
        pos = torch.arange(T, device=dev).expand(B, T).contiguous()
        pp, stage = layout.pp, layout.pp_rank
        if stage > 0:
            h = torch.empty(T, B, arch.hidden_size, dtype=m.config.params_dtype, device=dev)
            dist.recv(h, group=layout.pp_group, group_src=stage - 1)
            m.set_input_tensor(h)
        out = m(tok, pos, None)
        if stage < pp - 1:
            dist.send(out.contiguous(), group=layout.pp_group, group_dst=stage + 1)
            if stage > 0 or layout.tp_rank != 0:
                return None
            full = torch.empty(B, T, arch.vocab_size, dtype=torch.float32, device=dev)
            dist.recv(full, group=layout.pp_group, group_src=pp - 1)
            return full.cpu()
        shard = out.float().contiguous()  # [B, T, Vp/tp]
        if layout.tp > 1:
            parts = [torch.empty_like(shard) for _ in range(layout.tp)]
            dist.all_gather(parts, shard, group=layout.tp_group)
            shard = torch.cat(parts, dim=-1)
        full = shard[..., :arch.vocab_size].contiguous()
        if layout.tp_rank != 0:
            return None
        if pp > 1:
            dist.send(full, group=layout.pp_group, group_dst=0)
            return None
        return full.cpu()
    finally:
        if layout.pp > 1 and layout.pp_rank > 0:
            m.set_input_tensor(None)
        m.train(was_training)
