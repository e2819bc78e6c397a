"""Transports: how one stage sender's buckets reach the rollout engine(s).

Every transport implements :class:`Transport` and runs on the stage senders only (``tp_rank 0`` of
the ``dp_rank 0 / cp_rank 0`` replica of each pipeline stage; stage 0's sender, global rank 0, is
the *coordinator*). :class:`~megatron_smd.sync.weight_sync.WeightSync` drives them:

    connect (once) -> begin -> send(bucket) ... -> finish(failed) -> CommitResult on the coordinator

``finish`` is always called, also after a failure, so that every party leaves the sync in step;
it returns the engine's :class:`~megatron_smd.sync.staging.CommitResult` on the coordinator.

=============  =================================================================================
``inprocess``  the :class:`ReferenceEngine` lives on the coordinator. Its own stage's tensors are
               staged one by one: as they are where they are views of the learner's parameters
               in the engine's dtype (the commit copies them from there), else converted straight
               into the engine's staging buffers (kept across syncs); the other stages' senders
               send theirs to it over the senders' pipeline group (header + flattened bucket,
               point to point), received into kept buffers too.
``broadcast``  one weight-update group per stage (:mod:`megatron_smd.sync.group`): the stage's
               sender is rank 0, every engine rank joins. Per bucket: a header (names, dtypes,
               shapes, checksums) then one broadcast of the flattened bucket: SGLang's
               ``update_weights_from_distributed`` with ``load_format="flattened_bucket"``, with
               the announcement carried in the group instead of over HTTP. The engine side is
               :class:`~megatron_smd.sync.receiver.BroadcastReceiver` (its commit is
               double-buffered: the engine's parameters become views of the receive buffers).
``sglang``     the same broadcast data plane, announced through SGLang's HTTP API
               (``/init_weights_update_group``, ``/begin_weight_update``,
               ``/update_weights_from_distributed``, ``/end_weight_update``), or, colocated,
               ``/update_weights_from_tensor`` with CUDA-IPC handles.
``disk``       each sender writes its buckets as safetensors shards into ``.v{N}.partial/`` (a
               recycled older snapshot, its files overwritten in place); the
               coordinator adds ``model.safetensors.index.json`` (with per-tensor checksums) and
               ``config.json``, renames the directory to ``v{N}`` atomically, points ``LATEST`` at
               it, and has the engine reload it (staged, verified, committed).
=============  =================================================================================

Failure semantics: ``inprocess``, ``broadcast`` (to reference receivers) and ``disk`` stage the
whole sync and commit only when it is complete and verified, so a failure leaves the engine on its
previous weights (``staged = True``). SGLang loads in place; a failure after the first bucket leaves
it partially updated, which the error says (``engine_state == "partial"``).

One module per transport:

==============  ================================================================================
``.base``       :class:`SenderContext`, :class:`Transport`
``.inprocess``  :class:`InProcessTransport`
``.broadcast``  :class:`BroadcastTransport`
``.sglang``     :class:`SGLangTransport`, the SGLang HTTP client (:func:`post_sglang`)
``.disk``       :class:`DiskTransport`, :func:`latest_snapshot`
==============  ================================================================================
"""

from .base import SenderContext, Transport, result_from_error
from .broadcast import BroadcastTransport
from .disk import DiskTransport, latest_snapshot
from .inprocess import InProcessTransport
from .sglang import SGLangTransport, post_sglang

__all__ = ["BroadcastTransport", "DiskTransport", "InProcessTransport", "SGLangTransport", "SenderContext",
           "Transport", "latest_snapshot", "post_sglang", "result_from_error"]
