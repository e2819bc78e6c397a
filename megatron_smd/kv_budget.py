"""Per-layer KV arithmetic: what one request holds, what the SGLang per-layer pools allocate, what
admission reserves. One place, used by the patched SGLang server (``sglang_patch.kv_pool``: pool
sizing and admission) and by ``smd plan`` (rollout KV figures), so the two agree by construction.

Units. A *slot* is one token's K and V in one layer (``slot_layer_bytes``: ``2 * H_kv * d * dtype``
bytes per GPU of an engine with TP ``t``, ``ceil(H_kv / t)`` KV heads). Every count below is *slots
per layer*: under per-layer eviction every layer holds the same number of tokens for a request
(the budget is the same in every layer; which tokens differs), so a request's K/V bytes are
``slots * num_layers * slot_layer_bytes``.

What one request holds per layer at its peak, prompt length ``P``, ``N`` new tokens, budget ``B``
(the sampled last token is never written to the cache; eviction runs right after the step that
overflows; the prompt is prefilled densely, then compressed if ``P > B``)::

    r0 = B if the policy compresses after prefill (P > B) else P
    none, snapkv:    r0 + N - 1              (snapkv compresses the prompt once)
    streaming, h2o:  min(r0 + N - 1, B + 1)  (evict every step once full)
    rkv:             min(r0 + N - 1, B + buffer)
    and at least P (the dense prefill)

This is exactly what the reference engine holds, and what the SGLang per-layer pool holds for a
request whose prompt nobody else shares (measured: ``tests/test_sglang_live.py``). A GRPO group
stores its shared prompt once per layer, so a group holds less than ``n`` times this.

*Generated* slots a request can hold per layer (its private slots; the shared prompt aside) are
bounded by the policy, not by ``N``: ``private_peak_tokens``; so is what it keeps alive,
``live_peak_tokens``. Admission in the patched server reserves, per new request, its own peak
(``admission_tokens``), and for a running GRPO group what it may still grow
(``group_reserve_tokens``), so a request that cannot fit waits instead of being retracted later.

The per-layer pool keeps ``S`` physical slots in every layer (the same K/V bytes as SGLang's dense
pool of ``S`` tokens) and ``logical_slots(S, L, policy)`` logical token ids for the radix tree and
``req_to_token``; each logical id maps to a physical slot per layer through an int32 ``[L, logical
+ 1]`` table (``translation_table_bytes``).
"""

from __future__ import annotations

import math

from .policies import PolicyConfig

#: Bytes of one entry of the logical -> physical translation table and of the free stacks (int32).
TABLE_ENTRY_BYTES = 4


def _compresses_prefill(policy: PolicyConfig, prompt_len: int) -> bool:
    return policy.name != "none" and policy.budget is not None and prompt_len > policy.budget


def prefill_kept_tokens(policy: PolicyConfig, prompt_len: int) -> int:
    """Slots a request holds per layer right after its prompt (``r0``)."""
    return policy.budget if _compresses_prefill(policy, prompt_len) else prompt_len


def decode_peak_tokens(policy: PolicyConfig, prompt_len: int, new_tokens: int) -> int:
    """Most slots a request holds per layer during decoding (the last sampled token is never cached)."""
    r0 = prefill_kept_tokens(policy, prompt_len)
    grown = r0 + max(0, new_tokens - 1)
    if policy.name in ("streaming", "h2o"):
        return min(grown, policy.budget + 1)
    if policy.name == "rkv":
        return min(grown, policy.budget + policy.buffer)
    return grown  # none, snapkv (compresses the prompt only)


def request_peak_tokens(policy: PolicyConfig, prompt_len: int, new_tokens: int) -> int:
    """Peak slots per layer of one request, prefill included (the prompt is prefilled densely)."""
    return max(prompt_len, decode_peak_tokens(policy, prompt_len, new_tokens))


def batch_peak_tokens(policy: PolicyConfig, prompt_len: int, new_tokens: int, num_prompts: int,
                      group_size: int) -> int:
    """Peak live slots per layer of a reference-engine batch (every row the same length, no EOS).

    The reference engine prefills prompts one after another (the dense prompt cache sits on top of
    the rows already admitted), replicates each into ``group_size`` rows, then decodes all rows in
    lock step.
    """
    r0 = prefill_kept_tokens(policy, prompt_len)
    B = num_prompts * group_size
    return max((num_prompts - 1) * group_size * r0 + prompt_len, B * r0,
               B * decode_peak_tokens(policy, prompt_len, new_tokens))


def private_peak_tokens(policy: PolicyConfig, new_tokens: int) -> int:
    """Most *generated* slots one request holds per layer (its private slots, prompt aside).

    A request's live set per layer never exceeds ``B + 1`` (streaming, h2o) or ``B + buffer`` (rkv),
    and its generated tokens are a subset of it; none and snapkv keep every generated token but the
    last sampled one.
    """
    grown = max(0, new_tokens - 1)
    if policy.name in ("streaming", "h2o"):
        return min(grown, policy.budget + 1)
    if policy.name == "rkv":
        return min(grown, policy.budget + policy.buffer)
    return grown


def live_peak_tokens(policy: PolicyConfig) -> int | None:
    """Most tokens one request keeps alive per layer at any time (None: not bounded by the policy).
    A GRPO group of ``m`` members therefore keeps at most ``m`` times this per layer."""
    if policy.name in ("streaming", "h2o"):
        return policy.budget + 1
    if policy.name == "rkv":
        return policy.budget + policy.buffer
    return None


def admission_tokens(policy: PolicyConfig, extend_len: int, new_tokens: int, prompt_len: int | None = None) -> int:
    """Slots per layer admission reserves for a new request.

    Nothing of its prompt cached (``extend_len == prompt_len``): its own peak,
    ``request_peak_tokens`` (the dense prefill of ``P`` tokens, then what the policy keeps).
    Otherwise (a GRPO sample re-extending the last token of a shared prompt, or a partly cached
    prompt) the ``extend_len`` tokens it prefills plus the generated slots it can add:
    ``min(private_peak_tokens, live_peak_tokens)``.
    """
    if prompt_len is not None and extend_len == prompt_len:
        return request_peak_tokens(policy, prompt_len, new_tokens)
    grow = private_peak_tokens(policy, new_tokens)
    live = live_peak_tokens(policy)
    return extend_len + (grow if live is None else min(grow, live))


def running_reserve_tokens(policy: PolicyConfig, new_tokens: int, generated_held: int, remaining: int) -> int:
    """Slots per layer a running request may still add through its own generated tokens: up to its
    private peak, and no more than the ``remaining`` tokens it may still generate.
    ``generated_held``: private slots it holds now in the layer considered."""
    return max(0, min(remaining, private_peak_tokens(policy, new_tokens) - generated_held))


def group_reserve_tokens(policy: PolicyConfig, new_tokens: list[int], generated_held, remaining: list[int],
                         owned_kept) -> int:
    """Slots per layer a running GRPO group (``m`` members sharing a prompt) may still add.

    Two bounds, per layer ``l``, the smaller taken, then the largest over layers:

    * generated: ``sum_m running_reserve_tokens(...)`` (each member's own tokens);
    * live: every member keeps at most ``live_peak_tokens`` alive, and what the group stores beyond
      the radix tree's (pinned) prompt tokens is live, so it can grow by at most
      ``m * live_peak_tokens - owned_kept[l] - sum_m generated_held[m][l]`` (``owned_kept[l]``: the
      detached prompt tokens some member keeps in layer ``l``).

    ``generated_held``: per member, per layer generated slots held now (``[m][L]``).
    """
    import numpy as np

    held = np.asarray(generated_held, dtype=np.int64).reshape(len(new_tokens), -1)  # [m, L]
    own = np.stack([np.maximum(0, np.minimum(r, private_peak_tokens(policy, n) - h))
                    for n, h, r in zip(new_tokens, held, remaining)]).sum(axis=0)  # [L]
    live = live_peak_tokens(policy)
    if live is not None:
        cap = len(new_tokens) * live - np.asarray(owned_kept, dtype=np.int64) - held.sum(axis=0)
        own = np.minimum(own, np.maximum(cap, 0))
    return int(own.max()) if own.size else 0


def slot_layer_bytes(num_kv_heads: int, head_dim: int, dtype_bytes: int, tp: int = 1) -> int:
    """K and V bytes of one token in one layer on one GPU of a TP-``tp`` engine."""
    return 2 * math.ceil(num_kv_heads / tp) * head_dim * dtype_bytes


def kv_bytes_per_token(arch, dtype_bytes: int, tp: int = 1) -> int:
    """K and V bytes of one token over all layers on one GPU of a TP-``tp`` engine."""
    return arch.num_layers * slot_layer_bytes(arch.num_kv_heads, arch.head_dim, dtype_bytes, tp)


def request_kv_bytes(arch, policy: PolicyConfig, prompt_len: int, new_tokens: int, dtype_bytes: int,
                     tp: int = 1) -> int:
    """Peak K/V bytes of one request (all layers)."""
    return request_peak_tokens(policy, prompt_len, new_tokens) * kv_bytes_per_token(arch, dtype_bytes, tp)


def concurrent_requests(pool_slots_per_layer: int, policy: PolicyConfig, prompt_len: int,
                        new_tokens: int) -> int:
    """Requests (no shared prompt) a pool of ``pool_slots_per_layer`` slots per layer holds at their peak."""
    return max(0, pool_slots_per_layer) // request_peak_tokens(policy, prompt_len, new_tokens)


def evicts_per_layer(policy: PolicyConfig) -> bool:
    """Whether the policy drops tokens (so the per-layer pool is used); ``none`` keeps SGLang's pool."""
    return policy.name != "none"


def logical_slots(physical_slots: int, num_layers: int, policy: PolicyConfig) -> int:
    """Logical token ids of the per-layer pool. A logical id is held while *some* layer keeps its
    token, so per-layer choices can keep up to ``num_layers`` times more tokens alive than any one
    layer holds: ``L * S`` ids can never run out before the physical slots do. ``S`` for ``none``."""
    return physical_slots * (num_layers if evicts_per_layer(policy) else 1)


def translation_table_bytes(physical_slots: int, num_layers: int, policy: PolicyConfig) -> int:
    """Bytes of the per-layer pool's index structures: the logical -> physical table (int32
    ``[L, logical + 1]``) and the per-layer free stacks (int32 ``[L, S]``); 0 for ``none``. Not K/V:
    on a GPU they come out of the memory SGLang sizes the K/V pool from."""
    if not evicts_per_layer(policy):
        return 0
    return num_layers * (logical_slots(physical_slots, num_layers, policy) + 1 + physical_slots) * TABLE_ENTRY_BYTES


def pool_kv_bytes(physical_slots: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                  tp: int = 1) -> int:
    """K/V bytes of a pool of ``physical_slots`` per layer (slot 0, SGLang's dummy, not counted)."""
    return physical_slots * num_layers * slot_layer_bytes(num_kv_heads, head_dim, dtype_bytes, tp)


__all__ = [
    "admission_tokens", "batch_peak_tokens", "concurrent_requests", "decode_peak_tokens", "evicts_per_layer",
    "group_reserve_tokens", "kv_bytes_per_token", "live_peak_tokens", "logical_slots", "pool_kv_bytes",
    "prefill_kept_tokens", "private_peak_tokens", "request_kv_bytes", "request_peak_tokens",
    "running_reserve_tokens", "slot_layer_bytes", "translation_table_bytes",
]
