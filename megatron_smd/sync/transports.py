"""Transports: how one stage sender's buckets reach the rollout engine(s).

Every transport implements :class:`Transport` and runs on the stage senders only (``tp_rank 0`` of
the ``dp_rank 0 / cp_rank 0`` replica of each pipeline stage; stage 0's sender, global rank 0, is
the *coordinator*). :class:`~megatron_smd.sync.weight_sync.WeightSync` drives them:

    connect (once) -> begin -> send(bucket) ... -> finish(failed) -> CommitResult on the coordinator

``finish`` is always called, also after a failure, so that every party leaves the sync in step;
it returns the engine's :class:`~megatron_smd.sync.staging.CommitResult` on the coordinator.

=============  =================================================================================
``inprocess``  the :class:`ReferenceEngine` lives on the coordinator. Its own stage's tensors are
               converted straight into the engine's staging buffers (kept across syncs) and
               staged one by one, while in cache; the other stages' senders send theirs to it
               over the senders' pipeline group (header + flattened bucket, point to point),
               received into kept buffers too.
``broadcast``  one weight-update group per stage (:mod:`megatron_smd.sync.group`): the stage's
               sender is rank 0, every engine rank joins. Per bucket: a header (names, dtypes,
               shapes, checksums) then one broadcast of the flattened bucket: SGLang's
               ``update_weights_from_distributed`` with ``load_format="flattened_bucket"``, with
               the announcement carried in the group instead of over HTTP. The engine side is
               :class:`~megatron_smd.sync.receiver.BroadcastReceiver`.
``sglang``     the same broadcast data plane, announced through SGLang's HTTP API
               (``/init_weights_update_group``, ``/begin_weight_update``,
               ``/update_weights_from_distributed``, ``/end_weight_update``), or, colocated,
               ``/update_weights_from_tensor`` with CUDA-IPC handles.
``disk``       each sender writes its buckets as safetensors shards into ``.v{N}.partial/``; the
               coordinator adds ``model.safetensors.index.json`` (with per-tensor checksums) and
               ``config.json``, renames the directory to ``v{N}`` atomically, points ``LATEST`` at
               it, and has the engine reload it (staged, verified, committed).
=============  =================================================================================

Failure semantics: ``inprocess``, ``broadcast`` (to reference receivers) and ``disk`` stage the
whole sync and commit only when it is complete and verified, so a failure leaves the engine on its
previous weights (``staged = True``). SGLang loads in place; a failure after the first bucket leaves
it partially updated, which the error says (``engine_state == "partial"``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.hf import ModelArch
from ..rollout.faults import drill_point
from ..parallel.layout import ParallelLayout, free_port
from .bucket import CHECKSUM_ALGORITHM, Bucket, empty_bytes, fsync_dir, stage_bucket, write_safetensors
from .group import bcast_object, destroy_group, init_weight_update_group, recv_object, send_object
from .reshard import LiveBytes, PhaseTimer
from .staging import CommitResult, Probe, ShadowBuffers, StagedUpdate, WeightSyncError, stage_from_disk


@dataclass
class SenderContext:
    """What a transport knows about the sync in progress on this stage sender."""

    layout: ParallelLayout
    arch: ModelArch
    version: int
    verify: bool
    meter: LiveBytes
    probe: Probe | None = None  # the coordinator's only
    phases: PhaseTimer = field(default_factory=PhaseTimer)  # this sender's seconds per phase

    @property
    def stage(self) -> int:
        return self.layout.pp_rank

    @property
    def num_stages(self) -> int:
        return self.layout.pp

    @property
    def coordinator(self) -> bool:
        return self.layout.pp_rank == 0

    @property
    def senders_group(self):
        """The pipeline group of a sender = the senders of all stages (group rank = stage)."""
        return self.layout.pp_group


def _result_from_error(version: int, e: WeightSyncError, receiver: str) -> CommitResult:
    return CommitResult(ok=False, version=version, message=str(e), receiver=receiver, engine_state=e.engine_state)


class Transport(ABC):
    """One way of moving buckets to engines. Methods run on stage senders only."""

    name: str = ""
    #: True when the engine side stages the whole sync and commits atomically.
    staged: bool = True

    def connect(self, ctx: SenderContext) -> None:
        """One-time setup (process groups, servers). Called before the first ``begin``."""

    def packs(self, ctx: SenderContext) -> bool:
        """Whether this sender wants buckets packed in the wire layout (see ``Resharder(pack=...)``)."""
        return True

    def sink(self, ctx: SenderContext):
        """Where this sender's HF tensors should be written instead of a bucket (a
        :class:`~megatron_smd.sync.reshard.Sink`: the in-process engine's staging), or None."""
        return None

    def overlaps(self, ctx: SenderContext) -> bool:
        """Whether ``send`` may return while still sending the bucket (done with it at the latest
        when the next ``send`` or ``finish`` returns): the resharder then packs the next bucket
        meanwhile, into the other half of its buffer (``Resharder(overlap=True)``)."""
        return False

    @abstractmethod
    def begin(self, ctx: SenderContext) -> None:
        """Start sync ``ctx.version`` on this stage sender."""

    @abstractmethod
    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        """Deliver one bucket. Return only when done with it: its buffer is reused for the next."""

    @abstractmethod
    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        """End this stage's part; on the coordinator, wait for the engine's verdict and return it."""

    def close(self) -> None:
        """Release groups / tell receivers to stop."""


# ============================================================================================ inprocess
class InProcessTransport(Transport):
    """The reference engine in the coordinator's process (the CPU default).

    Args:
        engine: the :class:`~megatron_smd.rollout.engine.ReferenceEngine`, on global rank 0 (the
            coordinator); None on every other rank.
        keep_buffers: keep the staging memory (one model's worth, in the engine's dtype) across
            syncs, so that no sync after the first faults in fresh pages; False frees it after
            every sync.
    """

    name = "inprocess"

    def __init__(self, engine=None, *, keep_buffers: bool = True):
        self.engine = engine
        self.keep_buffers = keep_buffers
        self.buffers = ShadowBuffers()
        self.staging: StagedUpdate | None = None
        self._sent = 0
        self._sinking = False  # this sync's own tensors reach the staging through the sink

    def packs(self, ctx: SenderContext) -> bool:
        return not ctx.coordinator  # the coordinator's own tensors go straight into the staging (sink)

    def sink(self, ctx: SenderContext):
        if not ctx.coordinator or self.staging is None:
            return None
        self._sinking = True
        return _StagingSink(self.staging, self.buffers)

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
            return st.commit(ctx.probe)
        except WeightSyncError as e:
            return _result_from_error(ctx.version, e, self.name)
        finally:
            st.discard()
            self.staging = None
            if not self.keep_buffers:
                self.buffers.clear()


class _StagingSink:
    """The in-process engine's staging as a resharder sink: each HF tensor is converted into its
    kept slot (when the engine has that tensor, in that shape and dtype) and staged right away."""

    def __init__(self, staging: StagedUpdate, buffers: ShadowBuffers):
        self.staging, self.buffers = staging, buffers

    def slot(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor | None:
        st = self.staging
        p = st._params.get(name)
        if (p is None or name in st._staged or tuple(p.shape) != tuple(shape) or p.dtype != dtype
                or (name == "lm_head.weight" and st.engine.arch.tie_word_embeddings)):
            return None  # the staging casts, refuses or ignores the tensor in add()
        return self.buffers.slot(name, shape, dtype, p.device)

    def put(self, name: str, t: torch.Tensor, checksum: int | None) -> None:
        self.staging.add(name, t, checksum, copy=False)


# ============================================================================================ broadcast
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
        self._inflight = None  # (Work, flat) of the bucket still being broadcast

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

    def _wait(self) -> None:
        if self._inflight is not None:
            work, _ = self._inflight
            self._inflight = None
            work.wait()

    def _send(self, ctx: SenderContext, bucket: Bucket) -> None:
        self._wait()  # the previous bucket is out (its buffer is the one the resharder fills next)
        flat = bucket.flatten(self.device)
        bcast_object({"op": "bucket", "version": ctx.version, **bucket.header()}, 0, self.pg, self.device)
        self._inflight = (dist.broadcast(flat, group=self.pg, group_src=0, async_op=True), flat)

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


# ============================================================================================ disk
def latest_snapshot(root: str | os.PathLike) -> Path | None:
    """The newest complete snapshot under a ``disk`` transport root (``LATEST``), or None."""
    p = Path(root) / "LATEST"
    if not p.is_file():
        return None
    snap = Path(root) / p.read_text().strip()
    return snap if (snap / "model.safetensors.index.json").is_file() else None


class DiskTransport(Transport):
    """Safetensors shards + index, written atomically, then the engine reloads.

    Args:
        root: the directory (``sync.dir``), visible to every sender and to the engine.
        engine: a ReferenceEngine on the coordinator to reload into (staged and verified), or None.
        sglang_urls: SGLang servers to tell ``/update_weights_from_disk`` (they must see ``root``).
        keep: complete snapshots to keep (older ones are deleted after a successful sync, in the
            background: :meth:`wait` waits for that).
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, *, engine=None, sglang_urls: Sequence[str] = (), keep: int = 2,
                 timeout_s: float = 600.0):
        self.root = Path(root)
        self.engine, self.sglang_urls, self.keep, self.timeout_s = engine, list(sglang_urls), max(1, keep), timeout_s
        self._files: list[dict] = []
        self._fsyncs: list[_Fsync] = []
        self._pruning: threading.Thread | None = None

    def packs(self, ctx: SenderContext) -> bool:
        return False  # a shard is written tensor by tensor, mostly straight from the parameters

    @staticmethod
    def snapshot_name(version: int) -> str:
        return f"v{version:08d}"

    def _partial(self, version: int) -> Path:
        return self.root / f".{self.snapshot_name(version)}.partial"

    def wait(self) -> None:
        """Wait for the background deletion of snapshots older than ``keep`` (the next sync, and
        :meth:`close`, wait for it too)."""
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None

    def close(self) -> None:
        self.wait()

    def begin(self, ctx: SenderContext) -> None:
        self.wait()
        self._files, self._fsyncs = [], []
        part = self._partial(ctx.version)
        if ctx.coordinator:
            shutil.rmtree(part, ignore_errors=True)  # a leftover of an earlier failed attempt
            part.mkdir(parents=True)
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)  # the directory exists before anyone writes

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        fname = f"model-pp{ctx.stage:02d}-{bucket.index:05d}.safetensors"
        path = self._partial(ctx.version) / fname
        with ctx.phases("write"):
            write_safetensors(path, bucket, {"format": "pt", "smd_sync_version": str(ctx.version)}, fsync=False)
        # made durable in the background while the next shard is converted and written; finish()
        # waits for every shard before anything is published
        self._fsyncs.append(_Fsync(path))
        self._files.append({"file": fname, "names": list(bucket.names), "nbytes": bucket.nbytes,
                            "checksums": bucket.checksums})

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        with ctx.phases("fsync"):  # what is left of the shards' fsyncs
            for t in self._fsyncs:
                t.join()
        bad = [t.error for t in self._fsyncs if t.error]
        self._fsyncs = []
        if bad and not failed:
            failed = "; ".join(bad)
        mine = {"stage": ctx.stage, "failed": failed, "files": self._files}
        if ctx.num_stages > 1:
            got = [None] * ctx.num_stages if ctx.coordinator else None
            dist.gather_object(mine, got, group=ctx.senders_group, group_dst=0)
        else:
            got = [mine]
        if not ctx.coordinator:
            return None
        errs = [f"stage {g['stage']}: {g['failed']}" for g in got if g["failed"]]
        if errs:
            return CommitResult(ok=False, version=ctx.version, receiver=self.name,
                                message="not written: " + "; ".join(errs))
        with ctx.phases("publish"):
            snap = self._publish(ctx, got)
        return self._reload(ctx, snap)

    def _publish(self, ctx: SenderContext, got: list[dict]) -> Path:
        part = self._partial(ctx.version)
        weight_map, sums, total = {}, {}, 0
        for g in got:
            for f in g["files"]:
                total += f["nbytes"]
                for i, name in enumerate(f["names"]):
                    weight_map[name] = f["file"]
                    if f["checksums"] is not None:
                        sums[name] = str(f["checksums"][i])
        index = {"metadata": {"total_size": total, "smd_sync_version": ctx.version, "smd_checksums": sums,
                              "smd_checksum_algorithm": CHECKSUM_ALGORITHM},
                 "weight_map": dict(sorted(weight_map.items()))}
        (part / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        (part / "config.json").write_text(json.dumps(ctx.arch.to_hf_config(), indent=2) + "\n")
        for name in ("model.safetensors.index.json", "config.json"):
            with open(part / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(part)
        final = self.root / self.snapshot_name(ctx.version)
        if final.exists():  # re-sync of the same version: replace it
            old = self.root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        part.rename(final)
        tmp = self.root / ".LATEST.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.root / "LATEST")
        fsync_dir(self.root)
        return final

    def _prune(self, keep_name: str) -> None:
        snaps = sorted(p for p in self.root.glob("v[0-9]*") if p.is_dir())
        for p in snaps[:-self.keep]:
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)

    def _reload(self, ctx: SenderContext, snap: Path) -> CommitResult:
        if self.engine is not None:
            st = stage_from_disk(self.engine, snap, version=ctx.version, verify_checksums=ctx.verify)
            try:
                res = st.commit(ctx.probe)
            except WeightSyncError as e:
                return _result_from_error(ctx.version, e, self.name)
        elif self.sglang_urls:
            msgs = []
            for url in self.sglang_urls:
                ok, msg = _post(url, "/update_weights_from_disk",
                                {"model_path": str(snap.resolve()), "weight_version": str(ctx.version)}, self.timeout_s)
                if not ok:
                    return CommitResult(ok=False, version=ctx.version, receiver=self.name, engine_state="partial",
                                        message=f"{url}/update_weights_from_disk: {msg} (SGLang rolls back to its "
                                                f"previous weights when loading fails; servers before {url} in the "
                                                f"list took the new ones)")
                msgs.append(msg)
            res = CommitResult(ok=True, version=ctx.version, message="; ".join(msgs), receiver="sglang")
        else:
            res = CommitResult(ok=True, version=ctx.version, message=f"written to {snap} (no engine attached)",
                               receiver=self.name)
        res.message = f"{res.message} [{snap}]"
        # older snapshots are deleted in the background (the trainer's next step runs meanwhile)
        self._pruning = threading.Thread(target=self._prune, args=(snap.name,), daemon=True,
                                         name="smd-sync-prune")
        self._pruning.start()
        return res


class _Fsync(threading.Thread):
    """fsync one written shard in the background (the disk works while the sender converts)."""

    def __init__(self, path: Path):
        super().__init__(daemon=True, name=f"fsync {path.name}")
        self.path, self.error = path, None
        self.start()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.error = f"fsync of {self.path} failed ({e})"


# ============================================================================================ sglang
def _post(url: str, route: str, payload: dict | None, timeout_s: float,
          method: str = "POST") -> tuple[bool, str | dict]:
    """POST JSON to an SGLang server; returns ``(success, message or body)``. Never raises."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url.rstrip("/") + route, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read() or b"{}"
    except urllib.error.HTTPError as e:
        raw = e.read() or b""
        try:
            body = json.loads(raw)
            return False, str(body.get("message") or body) if isinstance(body, dict) else str(body)
        except ValueError:  # some routes (/flush_cache) answer plain text
            return False, f"HTTP {e.code}: {raw[:300].decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"cannot reach {url} ({e})"
    try:
        body = json.loads(raw)
    except ValueError:  # a 2xx plain-text answer (/flush_cache) is a success
        return True, raw[:300].decode(errors="replace").strip()
    if isinstance(body, dict) and "success" in body:
        return bool(body["success"]), str(body.get("message", ""))
    return True, body


LOOPBACK = "127.0.0.1"


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _own_address() -> str:
    """This host's address as other hosts see it (the rendezvous of a stage's weight-update group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class SGLangTransport(Transport):
    """SGLang servers through their weight-update HTTP API (SGLang 0.5.23).

    ``mode="distributed"`` (engines on other GPUs, or CPU servers with a gloo group): each stage
    sender creates group
    ``{group_prefix}-pp{stage}`` with every engine rank (``/init_weights_update_group``, rank offsets
    assigned server by server), and per bucket posts ``/update_weights_from_distributed``
    (``load_format="flattened_bucket"``) while broadcasting the flattened bucket from rank 0.
    ``mode="tensor"`` (engines colocated on the learner's GPUs): per bucket, posts
    ``/update_weights_from_tensor`` with the flattened bucket shared by CUDA-IPC handles (SGLang's
    ``MultiprocessingSerializer``), one payload per engine TP rank.

    A sync is one SGLang weight-update session (``/begin_weight_update`` ... ``/end_weight_update``,
    opened and closed by the coordinator), then ``/flush_cache`` and ``/update_weight_version``.
    SGLang loads each bucket in place, so a failure mid-sync leaves the servers partially updated;
    the error says so (``engine_state="partial"``) and the next successful sync repairs it.

    Args:
        urls: server base URLs.
        mode: ``"distributed"`` or ``"tensor"``.
        master_address: this sender's address for the rendezvous (default: the outgoing interface).
        master_port: stage ``p`` uses ``master_port + p`` (None, the default: a port the OS has
            free at each connect, so runs sharing a host and a group rebuilt after a server
            failure never collide; set it where only chosen ports are open to the servers; a
            rebuilt group then uses a free port anyway).
        ranks_per_server: engine ranks per server (default: the server's ``tp_size`` from ``/server_info``).
    """

    name = "sglang"
    staged = False

    def __init__(self, urls: Sequence[str], *, mode: str = "distributed", master_address: str | None = None,
                 master_port: int | None = None, backend: str | None = None, ranks_per_server: int | None = None,
                 timeout_s: float = 600.0, group_prefix: str = "smd-sync"):
        if mode not in ("distributed", "tensor"):
            raise ValueError(f"sglang transport: mode must be 'distributed' or 'tensor', got {mode!r}")
        if not urls:
            raise ValueError("sglang transport: no server URL")
        self.urls = [u.rstrip("/") for u in urls]
        cuda = torch.cuda.is_available()
        if mode == "tensor" and not cuda:
            raise ValueError("sglang transport: mode 'tensor' shares CUDA buffers by IPC handle and needs a GPU; "
                             "on CPU use mode 'distributed' (a gloo group)")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        backend = backend or ("nccl" if cuda else "gloo")
        self.mode, self.master_address = mode, master_address
        self.master_port = None if master_port is None else int(master_port)
        self.backend, self.ranks_per_server, self.timeout_s = backend, ranks_per_server, timeout_s
        self.group_prefix = group_prefix
        self.pg = None
        self._ranks: list[int] = []
        self._sent = 0
        self._group_name: str | None = None

    # ------------------------------------------------------------------------------------------
    def _server_ranks(self) -> list[int]:
        if self.ranks_per_server is not None:
            return [self.ranks_per_server] * len(self.urls)
        out = []
        for u in self.urls:
            ok, body = _post(u, "/server_info", None, self.timeout_s, method="GET")
            if not ok or not isinstance(body, dict):
                raise WeightSyncError(f"sglang transport: {u}/server_info: {body}", "unknown")
            tp = body.get("tp_size") or (body.get("server_args") or {}).get("tp_size")
            if not tp:
                raise WeightSyncError(f"sglang transport: {u}/server_info has no tp_size; pass ranks_per_server",
                                      "unknown")
            out.append(int(tp))
        return out

    def _all(self, route: str, payloads: list[dict]) -> list[tuple[bool, str]]:
        """POST one payload per server concurrently; returns their ``(success, message)``."""
        res: list = [None] * len(self.urls)

        def run(i):
            res[i] = _post(self.urls[i], route, payloads[i], self.timeout_s)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.urls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return res

    def _check(self, what: str, results, state: str) -> None:
        bad = [f"{u}: {m}" for u, (ok, m) in zip(self.urls, results) if not ok]
        if bad:
            raise WeightSyncError(f"sglang transport: {what} failed: " + " | ".join(bad),
                                  state)  # type: ignore[arg-type]

    def connect(self, ctx: SenderContext) -> None:
        if not self._ranks:
            self._ranks = self._server_ranks()
        if self.mode != "distributed" or self.pg is not None:
            return
        world = 1 + sum(self._ranks)
        addr = self.master_address or (LOOPBACK if all(_is_loopback(u) for u in self.urls) else _own_address())
        # unique per connection: a long-lived server keeps the groups of earlier runs (a trainer that
        # crashed never destroyed its own) and refuses a name it already has
        name = f"{self.group_prefix}-pp{ctx.stage}-{secrets.token_hex(4)}"
        port = free_port("") if self.master_port is None else self.master_port + ctx.stage  # store: every interface
        offsets = [1 + sum(self._ranks[:i]) for i in range(len(self.urls))]
        payloads = [{"master_address": addr, "master_port": port, "rank_offset": off, "world_size": world,
                     "group_name": name, "backend": self.backend} for off in offsets]
        joined: dict = {}

        def join():  # this sender hosts the rendezvous while the servers join over HTTP
            try:
                joined["pg"] = init_weight_update_group(addr, port, 0, world, name, backend=self.backend,
                                                        timeout_s=self.timeout_s)
            except Exception as e:
                joined["error"] = e

        t = threading.Thread(target=join, daemon=True, name="smd-sync-join")
        t.start()
        # a server that refuses to join answers at once: fail now, not at the rendezvous timeout (the
        # abandoned rendezvous thread ends at its own timeout)
        self._check("/init_weights_update_group", self._all("/init_weights_update_group", payloads), "unknown")
        t.join()
        if "error" in joined:
            raise WeightSyncError(f"sglang transport: weight-update group {name} at {addr}:{port}: "
                                  f"{joined['error']}", "unknown")
        self.pg, self._group_name = joined["pg"], name

    def begin(self, ctx: SenderContext) -> None:
        self._sent = 0
        if ctx.coordinator:
            self._check("/begin_weight_update", self._all("/begin_weight_update", [{}] * len(self.urls)), "previous")
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)  # no stage sends before the session is open

    def send(self, ctx: SenderContext, bucket: Bucket) -> None:
        flat = bucket.flatten(self.device)
        state = "partial"  # from here on, a server may have loaded part of this sync
        try:
            if self.mode == "distributed":
                h = bucket.header()
                payload = {"names": h["names"], "dtypes": h["dtypes"], "shapes": h["shapes"],
                           "group_name": self._group_name, "flush_cache": False,
                           "load_format": "flattened_bucket"}
                out: dict = {}
                t = threading.Thread(target=lambda: out.update(
                    r=self._all("/update_weights_from_distributed", [payload] * len(self.urls))), daemon=True)
                t.start()
                try:
                    work = dist.broadcast(flat, group=self.pg, group_src=0, async_op=True)
                    while not work.is_completed():
                        # a server that refused the bucket never joins the broadcast: do not wait
                        # for the group's timeout, fail now (the group is rebuilt before a retry)
                        if not t.is_alive() and any(not ok for ok, _ in out.get("r", [])):
                            self._check(f"/update_weights_from_distributed (bucket {bucket.index}, stage "
                                        f"{ctx.stage}; the broadcast is abandoned)", out["r"], state)
                        time.sleep(0.002)
                    work.wait()
                except WeightSyncError:
                    raise
                except Exception as e:
                    raise WeightSyncError(f"sglang transport: broadcast of bucket {bucket.index} of stage "
                                          f"{ctx.stage} failed ({e}); the servers hold partially updated "
                                          f"weights: re-sync before sampling", state) from None
                t.join()
                self._check(f"/update_weights_from_distributed (bucket {bucket.index}, stage {ctx.stage})",
                            out["r"], state)
                if bucket.index == 0 and ctx.coordinator:
                    drill_point("sync")  # a fault drill kills a server between loaded buckets and the commit
            else:
                from sglang.srt.utils import MultiprocessingSerializer
                from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
                from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

                monkey_patch_torch_reductions()
                metas = [FlattenedTensorMetadata(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype,
                                                 start_idx=m.offset, end_idx=m.offset + m.nbytes, numel=m.nbytes)
                         for m in bucket.metas()]
                ser = MultiprocessingSerializer.serialize({"flattened_tensor": flat, "metadata": metas},
                                                          output_str=True)
                payloads = [{"serialized_named_tensors": [ser] * n, "load_format": "flattened_bucket",
                             "flush_cache": False} for n in self._ranks]
                self._check(f"/update_weights_from_tensor (bucket {bucket.index}, stage {ctx.stage})",
                            self._all("/update_weights_from_tensor", payloads), state)
                torch.cuda.synchronize()  # the servers finished reading the shared buffer
        finally:
            del flat
        self._sent += 1

    def finish(self, ctx: SenderContext, failed: str | None) -> CommitResult | None:
        if ctx.num_stages > 1:
            dist.barrier(group=ctx.senders_group)
        if not ctx.coordinator:
            return None
        end = self._all("/end_weight_update", [{}] * len(self.urls))
        if failed:
            return CommitResult(ok=False, version=ctx.version, receiver=self.name, engine_state="partial",
                                message=f"{failed}; the servers may hold partially updated weights: re-sync")
        self._check("/end_weight_update", end, "partial")
        # the radix cache holds prompt K/V (and the patch its prompt scores) of the old weights
        self._check("/flush_cache", self._all("/flush_cache", [{}] * len(self.urls)), "partial")
        self._check("/update_weight_version", self._all(
            "/update_weight_version", [{"new_version": str(ctx.version), "abort_all_requests": False}]
            * len(self.urls)), "partial")
        return CommitResult(ok=True, version=ctx.version, message=f"updated {len(self.urls)} server(s)",
                            receiver=self.name)

    def retarget(self, urls: Sequence[str]) -> None:
        """Point the next sync at ``urls`` (after a server failed or came back): the weight-update
        group is rebuilt, under a new name and port, at the next :meth:`connect`. Servers of the old
        group that are still up are asked to close any open weight-update session and to drop the
        old group (best effort: a server that cannot is restarted by its supervisor when it hangs)."""
        keep = [u.rstrip("/") for u in urls]
        self._release([u for u in keep if u in self.urls], end_session=True)
        self.urls = keep
        self._ranks = []
        self.master_port = None  # the old group's store may still hold its port: a rebuilt group takes a free one

    def _release(self, urls: Sequence[str], *, end_session: bool = False) -> None:
        name, self._group_name = self._group_name, None
        if self.pg is not None:
            destroy_group(self.pg)
            self.pg = None
        if name:  # this rank built a group with the servers (a stage sender)
            for u in urls:
                if end_session:
                    _post(u, "/end_weight_update", {}, 30)  # "no session is open" is the normal answer
                _post(u, "/destroy_weights_update_group", {"group_name": name}, 30)

    def close(self) -> None:
        """Drop this run's weight-update group, here and on the servers (which outlive the run)."""
        self._release(self.urls)
