"""What every transport implements (:class:`Transport`) and what it is told about the sync in
progress on its stage sender (:class:`SenderContext`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ...model.hf import ModelArch
from ...parallel.layout import ParallelLayout
from ..bucket import Bucket
from ..reshard import LiveBytes, PhaseTimer
from ..staging import CommitResult, Probe, WeightSyncError


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
    check_finite: bool = True  # refuse non-finite weights (the resharder, or the transport: checks_finite)

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


def result_from_error(version: int, e: WeightSyncError, receiver: str) -> CommitResult:
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

    def embedding_first(self, ctx: SenderContext) -> bool:
        """Whether the stage's embedding (often its largest tensor) goes first rather than last
        (:func:`~megatron_smd.sync.pieces.param_order`); the same on every rank."""
        return False

    def checks_finite(self, ctx: SenderContext) -> bool:
        """Whether this transport tests every tensor for NaN / inf itself as it moves it (when
        ``ctx.check_finite``), refusing the sync before anything is published: the resharder then
        does not (one read of the weights fewer)."""
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
