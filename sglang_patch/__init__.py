"""SGLang rollout-engine patch: per-layer KV eviction compatible with RadixAttention, shadow-mask export.

Not implemented yet (tracked as its own issue); importing the package is harmless.
"""
