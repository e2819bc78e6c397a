"""SGLang rollout-engine patch: per-layer KV eviction compatible with RadixAttention, shadow-mask export.

Pinned to SGLang 0.5.23 (:mod:`sglang_patch.version`). Modules:

* :mod:`sglang_patch.kv_pool` — per-layer KV storage: logical token ids for the radix tree and
  ``req_to_token``, one physical slot pool per layer (each layer stores only the tokens it keeps),
  and the admission budget that reserves what each policy holds (:mod:`megatron_smd.kv_budget`).
* :mod:`sglang_patch.eviction` — the bookkeeping: per-request per-layer live positions (a table
  plus a contiguous tail; positions and ``req_to_token`` stay logical), the policy decisions of
  :mod:`megatron_smd.policies` (batched on the device at decode: :mod:`sglang_patch.batched_policy`),
  per-layer frees of evicted tokens, shared-prompt groups (a prompt stored once per layer; detach
  from the tree when a layer keeps a token nowhere), the prompt state computed once per prompt,
  and the ``evict[l, j]`` export.
* :mod:`sglang_patch.memory_hooks` — the radix-cache hooks that make SGLang's release consistent
  with what eviction already freed (CPU-tested on SGLang's real classes).
* :mod:`sglang_patch.patch` — the scheduler / Triton-backend / output hooks, applied through
  SGLang's plugin entry point when the launcher sets the policy.
* :mod:`sglang_patch.launch_server` — ``python -m sglang_patch.launch_server <sglang args>
  --smd-policy h2o --smd-budget 1024``; refuses settings it cannot honour.
* :mod:`sglang_patch.bench` — ``bench_rollout_sglang``: memory, concurrency and speed of the
  patched server against the unpatched one.
* :mod:`sglang_patch.cpu_import` — test helper: imports SGLang's memory modules on a CPU machine.

Nothing here imports SGLang at package import time.
"""

from .version import SGLANG_VERSION, check_sglang_version

__all__ = ["SGLANG_VERSION", "check_sglang_version"]
