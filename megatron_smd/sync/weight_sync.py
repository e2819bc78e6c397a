"""`WeightSync`: one call after each update puts the learner's weights into the rollout engine(s).

    ws = WeightSync.from_config(cfg.sync, learner.model, layout, arch, engine=engine_on_rank0)
    report = ws.sync(version=step)           # every learner rank calls it (collective)

What :meth:`WeightSync.sync` does, on every rank of the learner world:

1. optionally computes the learner's logits on a probe batch (``probe_tokens``; a collective
   forward of the ``dp 0 / cp 0`` replica, see :func:`~megatron_smd.sync.probe.learner_logits`);
2. streams the weights: the :class:`~megatron_smd.sync.reshard.Resharder` of each stage converts
   them on the stage's sender straight into the bucket (or, in process, into the engine's staging,
   or hands the engine views of the learner's parameters), checking each piece of a tensor for
   non-finite values (and taking its checksum) right after writing it, and
   yields buckets that the transport sends (other ranks of the replica take part in the TP
   gathers; other replicas idle);
3. ``finish``: the coordinator (global rank 0) gets the engine's verdict;
4. agreement: one ``all_gather_object`` over the learner world shares every rank's error and the
   verdict, so the sync returns the same :class:`SyncReport` on every rank or raises the same
   :class:`~megatron_smd.sync.staging.WeightSyncError` on every rank.

Every report carries a per-phase breakdown (:attr:`SyncReport.phases`): the coordinator's sender
phases (``gather``, ``convert`` = conversion written into the bucket, ``pack`` = packing buffers,
``finite``, ``checksum``, ``send``, ``finish``) and the engine's (``engine.recv``, ``engine.stage``,
``engine.verify``, ``engine.probe``, ``engine.commit``), which run inside the sender's ``send`` /
``finish`` when the engine is in process.

Failures never desynchronise the learner ranks: a sender whose transport fails stops converting
but keeps taking part in the TP gathers (``Resharder.drain``), and the transport's ``finish`` still
runs so that the engines leave the sync in step. With ``verify`` on, every tensor's checksum is
computed on the sender and compared by the engine before it commits.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..model.hf import ModelArch
from ..parallel.layout import ParallelLayout
from .probe import learner_logits, unwrap_model
from .reshard import LiveBytes, PhaseTimer, Resharder
from .staging import CommitResult, Probe, WeightSyncError
from .transports import (BroadcastTransport, DiskTransport, InProcessTransport, SenderContext, SGLangTransport,
                         Transport)

MiB = 1 << 20


@dataclass
class SyncReport:
    """One successful sync, identical on every learner rank.

    ``bytes`` are HF bytes sent (all stages), ``gb_per_s`` = ``bytes / seconds / 1e9``;
    ``peak_live_bytes`` is the largest :class:`~megatron_smd.sync.reshard.LiveBytes` peak of any
    sender (buckets, gathered shards, converted tensors, wire buffers).
    """

    version: int
    transport: str
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    bucket_bytes: int
    peak_live_bytes: int
    largest_tensor_bytes: int
    verified_checksums: int = 0
    probe_max_abs_diff: float | None = None
    message: str = ""
    stages: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (module docstring)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Scalars for the metrics logger (``sync/...``)."""
        return {"sync/seconds": self.seconds, "sync/gb_per_s": self.gb_per_s, "sync/bytes": float(self.bytes),
                "sync/buckets": float(self.buckets), "sync/peak_live_bytes": float(self.peak_live_bytes)}


class WeightSync:
    """Learner -> rollout engine weight sync with a chosen transport (see the module docstring).

    Args:
        model: this rank's GPTModel (or its DDP wrapper).
        layout: the initialized learner layout.
        arch: the HF architecture.
        transport: a :class:`~megatron_smd.sync.transports.Transport` (meaningful on stage senders;
            pass the same kind everywhere).
        bucket_bytes: bucket size (default 512 MiB, as slime's ``--update-weight-buffer-size``).
        verify: per-tensor checksums, compared by the engine before it commits.
        dtype: the dtype the engine wants (None: the learner's).
        check_finite: refuse to send non-finite weights (the engine keeps the last good policy).
        threads: torch intra-op threads while streaming (restored afterwards; None: leave them).
            A sync is hundreds of memory-bound copies and reductions of a few MB each; with
            several threads every one of them ends on a barrier, and on a busy CPU a barrier
            waits for a descheduled thread (measured on a loaded 2-core machine: 2.5-5x a plain
            copy with one thread, 3-60x with two), while one thread already streams close to the
            memory bandwidth. Irrelevant for GPU tensors.
    """

    def __init__(self, model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch, transport: Transport, *,
                 bucket_bytes: int = 512 * MiB, verify: bool = False, dtype: torch.dtype | None = None,
                 check_finite: bool = True, threads: int | None = 1):
        self.model, self.layout, self.arch, self.transport = model, layout, arch, transport
        self.bucket_bytes, self.verify, self.dtype, self.check_finite = int(bucket_bytes), verify, dtype, check_finite
        self.threads = threads
        self._connected = False

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, layout: ParallelLayout, arch: ModelArch, *, engine=None,
                    broadcast: dict | None = None, sglang: dict | None = None,
                    dtype: torch.dtype | None = None) -> "WeightSync":
        """Build from a :class:`~megatron_smd.config.SyncConfig`.

        ``engine``: the ReferenceEngine on global rank 0 (``inprocess``; ``disk`` reloads it).
        ``broadcast``: keyword arguments of :class:`BroadcastTransport` (``master_address``,
        ``master_port``, ``num_engine_ranks``, ...). ``sglang``: of :class:`SGLangTransport`
        (``urls``, ``mode``, ...).
        """
        from ..errors import ConfigError

        kind = cfg.transport
        if kind == "inprocess":
            transport: Transport = InProcessTransport(engine)
        elif kind == "broadcast":
            if not broadcast:
                raise ConfigError("sync.transport=broadcast needs the engines' group settings "
                                  "(master_address, master_port, num_engine_ranks)")
            transport = BroadcastTransport(**broadcast)
        elif kind == "sglang":
            if not sglang or not sglang.get("urls"):
                raise ConfigError("sync.transport=sglang needs the SGLang server URLs")
            transport = SGLangTransport(**sglang)
        elif kind == "disk":
            if not cfg.dir:
                raise ConfigError("sync.transport=disk needs sync.dir (a directory the engine can read)")
            transport = DiskTransport(cfg.dir, engine=engine, sglang_urls=(sglang or {}).get("urls", ()))
        else:
            raise ConfigError(f"sync.transport: unknown transport {kind!r}")
        return cls(model, layout, arch, transport, bucket_bytes=cfg.bucket_mb * MiB, verify=cfg.verify, dtype=dtype)

    # ------------------------------------------------------------------------------------------
    def _send_stage(self, res: Resharder, ctx: SenderContext) -> tuple[str | None, CommitResult | None]:
        """Stream this rank's part; never raises (errors are returned so the ranks stay in step)."""
        err: str | None = None
        tr = self.transport
        ph = ctx.phases
        if res.is_sender:
            try:
                with ph("begin"):
                    if not self._connected:
                        tr.connect(ctx)
                        self._connected = True
                    tr.begin(ctx)
                res.set_sink(tr.sink(ctx))
            except Exception as e:
                err = _describe(e)
                res.drain()
        for bucket in res:  # every participant iterates: the TP gathers are collective
            if err is not None:
                del bucket
                continue
            try:
                bad = bucket.nonfinite  # checked by the resharder as each tensor was written
                if bad:
                    raise WeightSyncError(f"non-finite learner weights ({bad[0]} and {len(bad) - 1} more in "
                                          f"bucket {bucket.index} of stage {bucket.stage}): the run diverged",
                                          "previous")
                with ph("send"):
                    tr.send(ctx, bucket)
            except Exception as e:
                err = _describe(e)
                res.drain()
            del bucket  # the resharder fills the next bucket now: do not keep this one alive meanwhile
        if res.errors and err is None:
            err = "; ".join(res.errors)
        result = None
        if res.is_sender:
            try:
                with ph("finish"):
                    result = tr.finish(ctx, err)
            except Exception as e:
                err = err or _describe(e)
        return err, result

    def sync(self, version: int, *, probe_tokens: torch.Tensor | None = None, probe_atol: float = 1e-5) -> SyncReport:
        """Sync the learner's current weights as ``version``. Collective over the learner world.

        ``probe_tokens [B, T]``: also compare the engine's logits (computed on the staged weights,
        before commit) with the learner's, within ``probe_atol``.

        Raises :class:`WeightSyncError` on every rank if any part failed; its ``engine_state`` says
        what the engine holds (``"previous"`` for the staged transports).
        """
        lay = self.layout
        t0 = time.perf_counter()
        probe = None
        if probe_tokens is not None:
            logits = learner_logits(self.model, lay, self.arch, probe_tokens)
            if logits is not None:
                probe = Probe(probe_tokens.cpu(), logits, probe_atol)
        params = [p for p in unwrap_model(self.model).parameters()]
        meter = LiveBytes(params)
        phases = PhaseTimer()
        if probe is not None:
            phases.add("probe_forward", time.perf_counter() - t0)
        ctx = SenderContext(layout=lay, arch=self.arch, version=version, verify=self.verify, meter=meter,
                            probe=probe, phases=phases, check_finite=self.check_finite)
        res = Resharder(self.model, lay, self.arch, bucket_bytes=self.bucket_bytes, dtype=self.dtype,
                        checksums=self.verify, meter=meter, pack=self.transport.packs(ctx),
                        check_finite=self.check_finite and not self.transport.checks_finite(ctx), phases=phases,
                        overlap=self.transport.overlaps(ctx), embedding_first=self.transport.embedding_first(ctx))
        err, result = None, None
        if res.participant:
            with _intra_op_threads(self.threads):
                err, result = self._send_stage(res, ctx)
        seconds = time.perf_counter() - t0
        mine = {"rank": lay.rank, "stage": lay.pp_rank, "sender": res.is_sender, "error": err,
                "result": asdict(result) if result is not None else None, "buckets": res.stats.buckets,
                "tensors": res.stats.tensors, "bytes": res.stats.bytes, "peak_live_bytes": meter.peak,
                "largest_tensor_bytes": res.stats.largest_tensor_bytes, "seconds": seconds,
                "phases": phases.as_dict()}
        every = [mine]
        if lay.world_size > 1:
            every = [None] * lay.world_size
            dist.all_gather_object(every, mine)
        senders = [e for e in every if e["sender"]]
        errors = [f"rank {e['rank']} (stage {e['stage']}): {e['error']}" for e in every if e["error"]]
        verdict = next((e["result"] for e in every if e["result"] is not None), None)
        if verdict is not None and not verdict["ok"]:
            errors.append(f"engine ({verdict['receiver']}): {verdict['message']}")
        if verdict is None and not errors:
            errors.append("no verdict from the coordinator (global rank 0 is not a sender?)")
        if errors:
            state = verdict["engine_state"] if verdict is not None and not verdict["ok"] else (
                "previous" if self.transport.staged else "partial")
            raise WeightSyncError(f"weight sync v{version} via {self.transport.name} failed: " + " | ".join(errors),
                                  state)  # type: ignore[arg-type]
        seconds = max(e["seconds"] for e in every)
        coord = next((e for e in senders if e["stage"] == 0), senders[0])
        all_phases = {**coord["phases"], **{f"engine.{k}": v for k, v in (verdict.get("phases") or {}).items()}}
        return SyncReport(version=version, transport=self.transport.name, seconds=seconds,
                          bytes=sum(e["bytes"] for e in senders), tensors=sum(e["tensors"] for e in senders),
                          buckets=sum(e["buckets"] for e in senders), bucket_bytes=self.bucket_bytes,
                          peak_live_bytes=max(e["peak_live_bytes"] for e in senders),
                          largest_tensor_bytes=max(e["largest_tensor_bytes"] for e in senders),
                          verified_checksums=verdict["checksums_verified"],
                          probe_max_abs_diff=verdict["probe_max_abs_diff"], message=verdict["message"],
                          stages=[{k: e[k] for k in ("stage", "rank", "buckets", "tensors", "bytes",
                                                     "peak_live_bytes", "seconds", "phases")} for e in senders],
                          phases=all_phases)

    def retarget(self, urls) -> None:
        """Point the transport at other engine URLs (rollout-server failover); the next :meth:`sync`
        connects afresh. Call on every rank with the same ``urls``."""
        if not hasattr(self.transport, "retarget"):
            raise ValueError(f"the {self.transport.name} transport cannot change its engines")
        self.transport.retarget(urls)
        self._connected = False

    def close(self) -> None:
        """Release the transport (stops broadcast receivers)."""
        self.transport.close()


@contextmanager
def _intra_op_threads(n: int | None):
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _describe(e: BaseException) -> str:
    if isinstance(e, WeightSyncError):
        return str(e)
    first = str(e).splitlines()[0][:400] if str(e) else ""
    return f"{type(e).__name__}: {first}"
