"""``broadcast``: one weight-update group per stage, engines receive with
:class:`~megatron_smd.sync.receiver.BroadcastReceiver` (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..bucket import Bucket, empty_bytes
from ..group import bcast_object, bcast_object_async, destroy_group, init_weight_update_group
from ..staging import CommitResult, WeightSyncError
from .base import SenderContext, Transport


class BroadcastTransport(Transport):
    """Senders broadcast buckets into one weight-update group per stage; engines receive them.

    Args:
        master_address: the address each stage's sender hosts its group's rendezvous on; one string
            (all senders on that host, e.g. a single node) or one per stage.
        master_port: stage ``p`` uses ``master_port + p``.
        num_engine_ranks: engine ranks in every group (ranks ``1..num_engine_ranks``).
        backend: ``"nccl"`` (GPU tensors) or ``"gloo"`` (CPU); default by CUDA availability.
        timeout_s: collective timeout of the groups (a hung engine is reported after this).
        group_prefix: groups are named ``{group_prefix}-pp{stage}``.
    """

    name = "broadcast"

    def __init__(self, master_address: str | Sequence[str], master_port: int, num_engine_ranks: int, *,
                 backend: str | None = None, timeout_s: float = 300.0, group_prefix: str = "smd-sync"):
        self.master_address = master_address
        self.master_port, self.num_engine_ranks = int(master_port), int(num_engine_ranks)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))
        self.timeout_s, self.group_prefix = timeout_s, group_prefix
        self.pg = None
        self.broken: str | None = None
        self._sent = 0
        self._stage = -1
        self._inflight: tuple | None = None  # (works, flat) of the bucket still being broadcast

    def _address(self, stage: int) -> str:
        a = self.master_address
        return a if isinstance(a, str) else a[stage]

    def connect(self, ctx: SenderContext) -> None:
        self._stage = ctx.stage
        if self.pg is None:
            self.pg = init_weight_update_group(self._address(ctx.stage), self.master_port + ctx.stage, 0,
                                               1 + self.num_engine_ranks, f"{self.group_prefix}-pp{ctx.stage}",
                                               backend=self.backend, timeout_s=self.timeout_s)

    def _guard(self, what: str, fn, *a):
        if self.broken:
            raise WeightSyncError(f"broadcast transport: the weight-update group is broken ({self.broken}); "
                                  f"restart the engines and build a new transport", "unknown")
        try:
            return fn(*a)
        except WeightSyncError:
            raise
        except Exception as e:  # gloo: "Connection closed by peer"; nccl / hung peer: timeout
            self._inflight = None
            self.broken = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            # Tear the group down at once: the surviving engines, blocked on this group, then see
            # the connection close and give up now instead of after the timeout.
            destroy_group(self.pg)
            self.pg = None
            raise WeightSyncError(f"broadcast transport: an engine receiver failed or died during {what} "
                                  f"({self.broken})", "previous") from None

    def begin(self, ctx: SenderContext) -> None:
        self._sent = 0
        self._guard(f"begin of stage {ctx.stage}", bcast_object,
                    {"op": "begin", "version": ctx.version, "stage": ctx.stage, "num_stages": ctx.num_stages},
                    0, self.pg, self.device)

    def overlaps(self, ctx: SenderContext) -> bool:
        return True  # a bucket's broadcast runs while the next bucket is packed

    def _wait(self, inflight=None) -> None:
        """Wait for ``inflight`` (by default: everything still being broadcast)."""
        if inflight is None:
            inflight, self._inflight = self._inflight, None
        if inflight is not None:
            works, _ = inflight
            for w in works:
                w.wait()

    def _send(self, ctx: SenderContext, bucket: Bucket) -> None:
        """Queue the bucket's header and bytes behind the previous bucket (gloo / NCCL run a group's
        collectives in order), so that the wire never waits for this thread, then wait for the
        previous bucket: its buffer is the one the resharder fills next.

        A bucket the resharder built in segments (views of the learner's parameters between packed
        tensors, :attr:`Bucket.segments`) goes as one broadcast per segment, their sizes announced
        in the header (``segments``): the receiver gets them back to back into one buffer, the
        same flattened bucket, with no packing copy on this side."""
        segs = bucket.segments
        if not segs or any(s.device != self.device for s in segs):
            segs = [bucket.flatten(self.device)]
        hdr = {"op": "bucket", "version": ctx.version, **bucket.header()}
        if len(segs) > 1:
            hdr["segments"] = [s.numel() for s in segs]
        works = bcast_object_async(hdr, self.pg, self.device)
        works += [dist.broadcast(s, group=self.pg, group_src=0, async_op=True) for s in segs]
        previous, self._inflight = self._inflight, (works, segs)
        self._wait(previous)

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        self._guard(f"bucket {bucket.index} of stage {ctx.stage}", self._send, ctx, bucket)
        self._sent += 1

    def wire_seconds(self, nbytes: int, repeats: int = 3) -> list[float]:
        """The wire's own speed: seconds of ``repeats`` raw ``torch.distributed.broadcast`` s of
        ``nbytes`` bytes over this transport's group (after :meth:`connect`, between syncs).

        Each one is a plain broadcast of one ``uint8`` tensor from a buffer allocated and touched
        beforehand, into a buffer the receivers keep (no header, conversion, staging or commit),
        followed by a one-element broadcast from the last engine rank so that it counts until
        every receiver has the bytes. :class:`~megatron_smd.sync.receiver.BroadcastReceiver`
        answers the ``wire`` message this sends first. The floor a sync is measured against.
        """
        if self.pg is None:
            raise WeightSyncError("broadcast transport: wire_seconds() before connect()", "unknown")
        buf = empty_bytes(nbytes, self.device)
        buf.fill_(1)
        ack = torch.zeros(1, dtype=torch.uint8, device=self.device)
        bcast_object({"op": "wire", "nbytes": int(nbytes), "repeats": int(repeats)}, 0, self.pg, self.device)
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dist.broadcast(buf, group=self.pg, group_src=0)
            dist.broadcast(ack, group=self.pg, group_src=self.num_engine_ranks)
            out.append(time.perf_counter() - t0)
        return out

    def _finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        self._wait()
        if failed:
            msg = {"op": "abort", "version": ctx.version, "stage": ctx.stage, "reason": failed}
        else:
            msg = {"op": "end", "version": ctx.version, "stage": ctx.stage, "buckets": self._sent,
                   "probe": ctx.probe if ctx.coordinator else None}
        bcast_object(msg, 0, self.pg, self.device)
        if not ctx.coordinator:
            return None
        # every engine rank reports its verdict in turn, on stage 0's group
        results = [bcast_object(None, r, self.pg, self.device) for r in range(1, 1 + self.num_engine_ranks)]
        bad = [r for r in results if not r.ok]
        if bad:
            good = [r.receiver for r in results if r.ok]
            mixed = f"; {', '.join(good)} committed it, so the engines now differ" if good else ""
            return CommitResult(ok=False, version=ctx.version, receiver=self.name,
                                engine_state="partial" if good else "previous",
                                message=f"{len(bad)} of {len(results)} engine receivers refused: " +
                                        " | ".join(f"{r.receiver}: {r.message}" for r in bad) + mixed)
        r0 = results[0]
        return CommitResult(ok=True, version=ctx.version, message=f"committed on {len(results)} engine(s)",
                            tensors=r0.tensors, bytes=r0.bytes, checksums_verified=r0.checksums_verified,
                            probe_max_abs_diff=max((r.probe_max_abs_diff or 0.0) for r in results)
                            if r0.probe_max_abs_diff is not None else None, receiver=self.name,
                            phases=dict(r0.phases))

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        return self._guard(f"the end of stage {ctx.stage}", self._finish, ctx, failed)

    def close(self) -> None:
        """Stage 0's sender tells the receivers to stop; every sender destroys its group."""
        if self.pg is None:
            return
        if not self.broken and self._stage == 0:
            try:
                bcast_object({"op": "shutdown"}, 0, self.pg, self.device)
            except Exception:  # receivers already gone: nothing to tell
                pass
        destroy_group(self.pg)
        self.pg = None
