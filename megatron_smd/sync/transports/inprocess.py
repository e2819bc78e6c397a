"""``inprocess``: the reference engine in the coordinator's process (see the package docstring)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..bucket import Bucket, stage_bucket
from ..group import recv_object, send_object
from ..staging import CommitResult, ShadowBuffers, StagedUpdate, WeightSyncError
from .base import SenderContext, Transport, result_from_error


class InProcessTransport(Transport):
    """The reference engine in the coordinator's process (the CPU default).

    Args:
        engine: the :class:`~megatron_smd.rollout.engine.ReferenceEngine`, on global rank 0 (the
            coordinator); None on every other rank.
        keep_buffers: keep the staging memory (in the engine's dtype) across syncs, so that no
            sync after the first faults in fresh pages; False frees it after every sync.
        adopt: commit double-buffered (the default): every tensor is written (and checked, piece
            by piece while it is in cache) into the engine's staging slots, and the commit makes
            the engine's parameters views of those slots (no copy); the memory they leave is
            where the next sync is written (never the live weights; a refused sync leaves the
            parameters where they were). The learner's memory is then read once, by the copy
            that is also the check. Engine side: the parameters plus one set of slots, as the
            broadcast receiver. False: the learner's tensors that are views of its parameters in
            the engine's dtype are staged as they are, checked where they lie (one read of the
            learner's memory) and copied into the parameters by the commit (a second read);
            slots only for the others.
    """

    name = "inprocess"

    def __init__(self, engine=None, *, keep_buffers: bool = True, adopt: bool = True):
        self.engine = engine
        self.keep_buffers = keep_buffers
        self.adopt = adopt
        self.buffers = ShadowBuffers()  # what the next sync is written into
        self._live: ShadowBuffers | None = None  # (adopt) what the engine's parameters are views of
        self.staging: StagedUpdate | None = None
        self._sent = 0
        self._sinking = False  # this sync's own tensors reach the staging through the sink

    def packs(self, ctx: SenderContext) -> bool:
        return not ctx.coordinator  # the coordinator's own tensors go straight into the staging (sink)

    def sink(self, ctx: SenderContext):
        if not ctx.coordinator or self.staging is None:
            return None
        self._sinking = True
        return _StagingSink(self.staging, self.buffers, views=not self.adopt)

    def begin(self, ctx: SenderContext) -> None:
        self._sent, self._sinking = 0, False
        if ctx.coordinator:
            if self.engine is None:
                raise WeightSyncError("inprocess transport: no engine on the coordinator (global rank 0)", "unknown")
            self.staging = StagedUpdate(self.engine, ctx.version, verify_checksums=ctx.verify)

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        if ctx.coordinator:
            if not self._sinking:  # a resharder that was not given the sink: stage the bucket here
                sums = bucket.checksums or [None] * len(bucket)
                for name, t, cs in zip(bucket.names, bucket.tensors, sums):
                    self.staging.add(name, t, cs, copy=True)
            return  # else the sink staged every tensor as it was written
        flat = bucket.flatten()
        send_object({"op": "bucket", "version": ctx.version, **bucket.header()}, 0, ctx.senders_group)
        dist.send(flat, group=ctx.senders_group, group_dst=0)
        self._sent += 1

    def _drain_stage(self, stage: int, ctx: SenderContext) -> None:
        """Receive stage ``stage``'s messages until its end marker, staging them."""
        st, g, n = self.staging, ctx.senders_group, 0
        while True:
            hdr = recv_object(stage, g)
            if hdr["op"] == "bucket":
                flat = self.buffers.recv((stage, n), hdr["nbytes"], torch.device("cpu"))
                t0 = time.perf_counter()
                dist.recv(flat, group=g, group_src=stage)
                ctx.phases.add("recv", time.perf_counter() - t0)
                n += 1
                if hdr["version"] != ctx.version:
                    st.problem(f"stage {stage} sent a bucket of version {hdr['version']}")
                    continue
                with ctx.phases("stage"):
                    stage_bucket(st, flat, hdr, stage)
            elif hdr["op"] == "end":
                if hdr["buckets"] != n:
                    st.problem(f"stage {stage} announced {hdr['buckets']} buckets, {n} arrived")
                return
            else:  # abort
                st.problem(f"stage {stage} sender failed: {hdr['reason']}")
                return

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        if not ctx.coordinator:
            msg = {"op": "abort", "reason": failed} if failed else {"op": "end", "buckets": self._sent}
            send_object(msg, 0, ctx.senders_group)
            return None
        st = self.staging
        if st is None:  # begin itself failed
            return CommitResult(ok=False, version=ctx.version, message=failed or "not started", receiver=self.name)
        if failed:
            st.problem(f"stage 0 sender failed: {failed}")
        for stage in range(1, ctx.num_stages):
            self._drain_stage(stage, ctx)
        try:
            res = st.commit(ctx.probe, adopt=self.adopt)
            if self.adopt:  # the parameters now live in these buffers; the ones they left are free
                self._live, self.buffers = self.buffers, (self._live or ShadowBuffers())
            return res
        except WeightSyncError as e:
            return result_from_error(ctx.version, e, self.name)
        finally:
            st.discard()
            self.staging = None
            if not self.keep_buffers:
                self.buffers.clear()
                self._live = None  # the parameters keep what they are views of


class _StagingSink:
    """The in-process engine's staging as a resharder sink: each HF tensor is converted into its
    kept slot (when the engine has that tensor, in that shape and dtype; with ``views``, a view of
    the learner's parameter is staged as it is instead) and staged right away."""

    def __init__(self, staging: StagedUpdate, buffers: ShadowBuffers, *, views: bool = True):
        self.staging, self.buffers, self.views = staging, buffers, views

    def _fits(self, name: str, shape, dtype: torch.dtype, device: torch.device | None = None) -> bool:
        """Whether the staging takes ``name`` as is (else it casts, refuses or ignores it in add())."""
        st = self.staging
        p = st._params.get(name)
        return not (p is None or name in st._staged or tuple(p.shape) != tuple(shape) or p.dtype != dtype
                    or (device is not None and p.device != device)
                    or (name == "lm_head.weight" and st.engine.arch.tie_word_embeddings))

    def keep(self, name: str, t: torch.Tensor) -> bool:
        """Stage ``t`` itself, a view of the learner's parameter: it stays valid until the sync ends
        (the learner is inside the sync; the staging is committed or discarded before it returns),
        so the commit copies it into the engine straight from the learner's memory. Not when the
        commit adopts its slots (``views=False``): the tensor is then copied into its slot."""
        return self.views and self._fits(name, t.shape, t.dtype, t.device)

    def slot(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor | None:
        if not self._fits(name, shape, dtype):
            return None
        return self.buffers.slot(name, shape, dtype, self.staging._params[name].device)

    def arena(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]]
              ) -> tuple[torch.Tensor, list[torch.Tensor | None]] | None:
        """The engine's slots for a whole stage as one arena (:meth:`ShadowBuffers.arena`): the
        arena and, per ``(name, shape, dtype)`` of ``specs``, its slot, or None for a tensor the
        engine does not take as it is (``add`` then casts, refuses or ignores it). None when this
        sink stages views (``adopt=False``), a name repeats, or the engine is not on the CPU."""
        if self.views or len({n for n, _, _ in specs}) != len(specs):
            return None
        fits = [self._fits(n, s, dt) for n, s, dt in specs]
        if {self.staging._params[n].device for (n, _, _), f in zip(specs, fits) if f} != {torch.device("cpu")}:
            return None
        arena, slots = self.buffers.arena([sp for sp, f in zip(specs, fits) if f], torch.device("cpu"))
        it = iter(slots)
        return arena, [next(it) if f else None for f in fits]

    def arena_plan(self, key, build):
        """The arena's plan (:meth:`ShadowBuffers.plan`): reused while ``key`` is the same."""
        return self.buffers.plan(key, build)

    def verifier(self, name: str, nbytes: int):
        """The engine's own checksum of a tensor written into its slot, fed piece by piece as it is
        written (the engine's verification, while the bytes are in cache)."""
        return self.staging.verifier(nbytes)

    def put(self, name: str, t: torch.Tensor, checksum: int | None, received: int | None = None) -> None:
        self.staging.add(name, t, checksum, copy=False, received=received)
