"""Moved: the attention benchmark is :mod:`megatron_smd.bench.attention` (names re-exported here for old imports)."""

from ..bench.attention import available_backends, run_attention_bench, synthetic_evict

__all__ = ["available_backends", "run_attention_bench", "synthetic_evict"]
