"""The engine side of the ``broadcast`` transport: a reference engine in its own process.

Run one :class:`BroadcastReceiver` per engine rank (a rollout engine replica, or one rank of a
tensor-parallel engine that receives every tensor). It joins the weight-update group of every
pipeline stage (``{group_prefix}-pp{p}``, rank ``rank``, as SGLang joins them on
``/init_weights_update_group``) and then, per sync, reads stage 0's messages, then stage 1's, ...:

    begin -> (header, flattened bucket) ... -> end | abort        (per stage, from that stage's sender)

Each bucket is received the way SGLang's ``update_weights_from_distributed`` receives a
``flattened_bucket`` (a ``uint8`` broadcast from group rank 0, unpacked by the announced names,
dtypes and shapes; a bucket the sender did not pack, sent in the segments its header announces,
arrives as consecutive broadcasts into the same buffer) and staged in a :class:`~megatron_smd.sync.staging.StagedUpdate`. When every
stage has ended, the staging is verified and committed, or discarded; the verdict
(:class:`~megatron_smd.sync.staging.CommitResult`) is broadcast back on stage 0's group (engine ranks
in turn), which is how the learner learns that the engine did or did not take the weights.

Buckets are received into buffers the receiver keeps across syncs
(:class:`~megatron_smd.sync.staging.ShadowBuffers`): after the first sync, receiving faults in no
fresh page. The commit is double-buffered (``adopt``, the default): the engine's parameters become
views of the buffers the sync was received into (nothing is copied), and the buffers they
replace, which nothing refers to any more, receive the next sync; a sync that is refused leaves
the parameters where they were and its buffers free. So the engine side holds the same memory as
with a copying commit (the parameters plus one set of receive buffers), and the buffers a sync is
received into never back the live weights while it is staged. Between syncs a sender may also
send ``wire`` (a raw broadcast of a given size, the floor ``smd bench sync`` measures a sync
against), which is received and dropped.

If a sender dies or the group breaks mid-sync, :meth:`BroadcastReceiver.receive` discards the
staging and raises :class:`~megatron_smd.sync.staging.WeightSyncError` with the engine on its previous
weights.

Run it as a module (CPU, gloo)::

    python -m megatron_smd.sync.receiver MODEL_DIR --master-address 10.0.0.1 --master-port 29650 \\
        --num-stages 2 --rank 1 --world-size 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .bucket import stage_bucket
from .group import bcast_object, destroy_group, init_weight_update_group
from .staging import CommitResult, ShadowBuffers, StagedUpdate, WeightSyncError


class BroadcastReceiver:
    """Receive syncs for ``engine`` (a ``ReferenceEngine``) over the per-stage weight-update groups.

    Args:
        engine: the engine to update.
        master_address: each stage sender's rendezvous address (one string, or one per stage).
        master_port: stage ``p``'s group rendezvous is at ``master_port + p``.
        num_stages: the learner's pipeline size.
        rank / world_size: this receiver's rank in every group (``1..world_size-1``) and the group
            size (1 sender + all engine ranks).
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout_s: collective timeout (how long a hung sender is waited for).
        on_bucket: called with each bucket header after its bytes arrived (progress, logging).
        name: how this receiver signs its verdicts.
        keep_buffers: keep the receive buffers (one model's worth) across syncs; False frees them
            after every sync.
        adopt: commit by making the engine's parameters views of the received buffers (the
            parameter objects stay; see the module docstring) instead of copying into them. False
            for an engine whose parameter memory something else refers to (e.g. captured graphs).
        threads: torch intra-op threads while receiving and committing (restored afterwards; None:
            leave them), as :class:`~megatron_smd.sync.weight_sync.WeightSync` ``threads``: the commit
            is hundreds of per-tensor copies, each ending on a barrier with several threads.
    """

    def __init__(self, engine, *, master_address: str | Sequence[str], master_port: int, num_stages: int,
                 rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0,
                 group_prefix: str = "smd-sync", on_bucket: Callable[[dict], None] | None = None,
                 name: str | None = None, keep_buffers: bool = True, threads: int | None = 1,
                 adopt: bool = True):
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank {rank} must be in [1, {world_size})")
        self.engine, self.num_stages, self.rank, self.world_size = engine, num_stages, rank, world_size
        self.master_address, self.master_port = master_address, int(master_port)
        self.backend, self.timeout_s, self.group_prefix = backend, timeout_s, group_prefix
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.on_bucket = on_bucket
        self.name = name or f"receiver{rank}"
        self.groups: list = []
        self.last_result: CommitResult | None = None
        self.keep_buffers = keep_buffers
        self.threads = threads
        self.adopt = adopt
        self.buffers = ShadowBuffers()  # what the next sync is received into
        self._live: ShadowBuffers | None = None  # (adopt) the buffers the engine's parameters are views of
        self._wire_buf = ShadowBuffers()
        self._phases: dict[str, float] = {}

    def _address(self, stage: int) -> str:
        a = self.master_address
        return a if isinstance(a, str) else a[stage]

    def connect(self) -> None:
        """Join every stage's group (blocks until that stage's sender and all engine ranks joined)."""
        for p in range(self.num_stages):
            self.groups.append(init_weight_update_group(self._address(p), self.master_port + p, self.rank,
                                                        self.world_size, f"{self.group_prefix}-pp{p}",
                                                        backend=self.backend, timeout_s=self.timeout_s))

    def close(self) -> None:
        for g in self.groups:
            destroy_group(g)
        self.groups = []

    # ------------------------------------------------------------------------------------------
    def _read_stage(self, p: int, staging: StagedUpdate | None, version: int | None):
        """Read stage ``p`` up to its end marker. Returns ``(staging, version, probe)``, or None on shutdown."""
        g, n, probe = self.groups[p], 0, None
        while True:
            hdr = bcast_object(None, 0, g, self.device)
            op = hdr["op"]
            if op == "shutdown":
                return None
            if op == "wire" and staging is None:
                self._wire(g, hdr)
                continue
            if op == "begin":
                if p == 0:
                    version = hdr["version"]
                    staging = StagedUpdate(self.engine, version, verify_checksums=True)
                if hdr["version"] != version or hdr["stage"] != p or hdr["num_stages"] != self.num_stages:
                    staging.problem(f"stage {p} began version {hdr['version']} (stage {hdr['stage']} of "
                                    f"{hdr['num_stages']}); expected version {version}, stage {p} of {self.num_stages}")
                continue
            if staging is None:
                raise WeightSyncError(f"{self.name}: stage {p} sent {op!r} before 'begin'", "previous")
            if op == "bucket":
                flat = self.buffers.recv((p, n), hdr["nbytes"], self.device)
                t0 = time.perf_counter()
                off, works = 0, []
                for k in hdr.get("segments") or [hdr["nbytes"]]:  # the sender's segments, back to back,
                    works.append(dist.broadcast(flat[off:off + k], group=g, group_src=0, async_op=True))
                    off += k  # all posted at once: the sender streams them without waiting for this loop
                for w in works:
                    w.wait()
                t1 = time.perf_counter()
                n += 1
                if self.on_bucket is not None:
                    self.on_bucket(hdr)
                stage_bucket(staging, flat, hdr, p)
                self._add("recv", t1 - t0)
                self._add("stage", time.perf_counter() - t1)
            elif op == "end":
                if hdr["buckets"] != n:
                    staging.problem(f"stage {p} announced {hdr['buckets']} buckets, {n} arrived")
                probe = hdr.get("probe")
                return staging, version, probe
            elif op == "abort":
                staging.problem(f"stage {p} sender failed: {hdr['reason']}")
                return staging, version, None
            else:
                staging.problem(f"stage {p}: unknown message {op!r}")

    def _add(self, phase: str, seconds: float) -> None:
        self._phases[phase] = self._phases.get(phase, 0.0) + seconds

    def _wire(self, g, hdr: dict) -> None:
        """A raw broadcast of ``hdr['nbytes']`` bytes (``repeats`` times), then this rank's ack in
        turn: the sender's floor measurement (:meth:`BroadcastTransport.wire_seconds`)."""
        buf = self._wire_buf.recv("wire", hdr["nbytes"], self.device)
        ack = torch.zeros(1, dtype=torch.uint8, device=self.device)
        for _ in range(hdr["repeats"]):
            dist.broadcast(buf, group=g, group_src=0)
            dist.broadcast(ack, group=g, group_src=self.world_size - 1)

    def receive(self) -> CommitResult | None:
        """Receive, verify and commit (or discard) one sync; None when the learner said shutdown.

        Returns the verdict also when the sync was refused (``ok=False``; the engine keeps its
        previous weights). Raises :class:`WeightSyncError` when the connection to a sender broke.
        """
        old = torch.get_num_threads()
        if self.threads is not None and self.threads != old:
            torch.set_num_threads(self.threads)
        try:
            return self._receive()
        finally:
            if torch.get_num_threads() != old:
                torch.set_num_threads(old)

    def _receive(self) -> CommitResult | None:
        if not self.groups:
            self.connect()
        staging, version, probe = None, None, None
        self._phases = {}
        try:
            for p in range(self.num_stages):
                got = self._read_stage(p, staging, version)
                if got is None:
                    return None
                staging, version, stage_probe = got
                probe = probe or stage_probe
            try:
                result = staging.commit(probe, adopt=self.adopt)
                if self.adopt:  # the parameters now live in these buffers; the ones they left are free
                    self._live, self.buffers = self.buffers, (self._live or ShadowBuffers())
            except WeightSyncError as e:
                result = CommitResult(ok=False, version=version, message=str(e), engine_state=e.engine_state)
            result.receiver = self.name
            result.phases = {**self._phases, **staging.phases}
            for r in range(1, self.world_size):  # verdicts in turn, on stage 0's group
                bcast_object(result if r == self.rank else None, r, self.groups[0], self.device)
        except WeightSyncError:
            if staging is not None:
                staging.discard()
            raise
        except Exception as e:  # the group broke: a sender died or timed out
            if staging is not None:
                staging.discard()
            self.close()  # a broken group is useless; closing it also unblocks the learner side
            raise WeightSyncError(f"{self.name}: lost the learner during sync v{version} "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); the engine keeps "
                                  f"its previous weights", "previous") from None
        finally:
            if not self.keep_buffers:
                self.buffers.clear()
                self._live = None  # the parameters keep what they are views of
                self._wire_buf.clear()
        self.last_result = result
        return result

    def serve(self) -> int:
        """Receive syncs until shutdown; returns how many were committed."""
        n = 0
        while (res := self.receive()) is not None:
            n += int(res.ok)
        return n


def main(argv: list[str] | None = None) -> None:
    from ..model.transformer import RefTransformer
    from ..rollout.engine import ReferenceEngine

    ap = argparse.ArgumentParser(description="Reference-engine receiver of the broadcast weight-sync transport.")
    ap.add_argument("model_dir")
    ap.add_argument("--master-address", required=True, nargs="+")
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--num-stages", type=int, default=1)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--backend", default="gloo")
    a = ap.parse_args(argv)
    engine = ReferenceEngine(RefTransformer.from_pretrained(a.model_dir))
    addr = a.master_address[0] if len(a.master_address) == 1 else a.master_address
    rx = BroadcastReceiver(engine, master_address=addr, master_port=a.master_port, num_stages=a.num_stages,
                           rank=a.rank, world_size=a.world_size, backend=a.backend,
                           on_bucket=lambda h: print(f"stage {h['stage']} bucket {h['index']}: {h['nbytes']} bytes",
                                                     flush=True))
    try:
        print(f"committed {rx.serve()} syncs", flush=True)
    finally:
        rx.close()


if __name__ == "__main__":
    main()
