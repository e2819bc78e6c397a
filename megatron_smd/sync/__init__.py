"""Weight sync: the learner's Megatron shards (TP x PP) -> full HF-named tensors -> rollout engines.

Streaming and bucketed: each pipeline stage's sender gathers one parameter at a time over its TP
group, converts it with the project's one conversion table (:mod:`megatron_smd.learner.convert`)
and packs buckets of ``sync.bucket_mb``; no rank ever holds the whole model. The pieces:

=====================  ==========================================================================
:mod:`.reshard`        :class:`Resharder` (TP gather, conversion straight into the bucket, memory
                       accounting, per-phase timing)
:mod:`.pieces`         one parameter's TP shards -> its HF tensors, as pieces to copy (grouped
                       in cache-sized byte ranges); the send order
:mod:`.arena`          the in-process engine's staging as one buffer, filled and checked by one
                       plan of chunks that two threads share
:mod:`.probe`          :func:`learner_logits` (the learner's probe forward)
:mod:`.meters`         :class:`PhaseTimer`, :class:`LiveBytes` (seconds per phase, bytes held)
:mod:`.checks`         the exact checksum (whole or in pieces) and the NaN / inf test
:mod:`.bucket`         :class:`Bucket`, SGLang's flattened wire layout, safetensors shards
:mod:`.transports`     ``inprocess``, ``broadcast``, ``sglang``, ``disk`` behind :class:`Transport`, one
                       module each
:mod:`.receiver`       :class:`BroadcastReceiver`: a reference engine receiving in another process
:mod:`.staging`        engine side: stage in a shadow copy (kept across syncs), verify, commit atomically
:mod:`.group`          the learner <-> engine weight-update process group
:mod:`.weight_sync`    :class:`WeightSync`: the collective ``sync(version)`` the trainer calls
=====================  ==========================================================================
"""

from .bucket import Bucket
from .checks import all_finite, tensor_checksum
from .probe import learner_logits
from .receiver import BroadcastReceiver
from .reshard import LiveBytes, PhaseTimer, Resharder, param_order
from .staging import CommitResult, Probe, ShadowBuffers, StagedUpdate, WeightSyncError, stage_from_disk
from .transports import (BroadcastTransport, DiskTransport, InProcessTransport, SGLangTransport, Transport,
                         latest_snapshot)
from .weight_sync import SyncReport, WeightSync

__all__ = [
    "Bucket", "BroadcastReceiver", "BroadcastTransport", "CommitResult", "DiskTransport", "InProcessTransport",
    "LiveBytes", "PhaseTimer", "Probe", "Resharder", "SGLangTransport", "ShadowBuffers", "StagedUpdate",
    "SyncReport", "Transport", "WeightSync", "WeightSyncError", "all_finite", "latest_snapshot", "learner_logits",
    "param_order", "stage_from_disk", "tensor_checksum",
]
