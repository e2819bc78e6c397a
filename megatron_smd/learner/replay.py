"""Moved: the Megatron replay is :mod:`megatron_smd.replay.megatron` (names re-exported here for old imports)."""

from ..replay.megatron import replay_megatron, rollout_precision

__all__ = ["replay_megatron", "rollout_precision"]
