"""Benchmark: shadow-masked attention vs plain causal attention of the same shape, per backend.

    from megatron_smd.bench.attention import run_attention_bench
    report = run_attention_bench(seq_lens=(1024, 4096))   # JSON-able dict

(``smd bench attention --json`` prints it.) For every sequence length and backend it times the
real :class:`~megatron_smd.learner.attention.ShadowCoreAttention` forward + backward under a
realistic eviction schedule, and plain causal SDPA (``is_causal=True``, no mask tensor) on the
same ``q, k, v`` in the same run, and reports the median of ``repeats`` timed iterations after
``warmup`` untimed ones and their ratio (masked / causal; 1.0 = the mask is free). It also reports
what the mask costs to store: the int32 ``evict`` against a dense boolean mask and a dense bit mask.

The eviction schedule (one layer, one sequence, ``budget`` = fraction of the sequence the cache
holds) is synthetic but has the structure of the real policies:

* ``"streaming"`` (StreamingLLM): 4 sink tokens never evicted, every other key evicted
  ``window = budget * T - 4`` steps after it was written (``evict[j] = j + window``) -- a band.
* ``"h2o_like"`` (H2O-shaped): half the budget is a recent window, the other half "heavy hitters":
  keys chosen at random (H2O picks them by accumulated attention) that are never evicted --
  scattered long columns plus a band, the harder case for block skipping.

Departures from a GPU benchmark, stated in the output's ``notes``: on CPU FlexAttention runs
eager (an unfused reference that materialises the scores) and has no backward, so flex is timed
forward-only there, against a forward-only causal baseline; CPU numbers say nothing about GPU
kernels. The flex BlockMask is built once per micro-batch per layer and cached, so the timed
iterations exclude it; its build time is reported separately (``block_mask_build_ms``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..learner.attention import BACKENDS, ShadowCoreAttention, block_mask_from_intervals, effective_evict
from ..mask import EVICT_DTYPE, kept_fraction, nbytes_dense, nbytes_evict

POLICIES = ("streaming", "h2o_like")
SINK_TOKENS = 4


def available_backends(device: Optional[torch.device] = None) -> dict[str, Optional[str]]:
    """``{backend: None if usable here else the reason}``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Optional[str]] = {"sdpa": None, "flex": None}
    if device.type != "cuda":
        out["te"] = "Transformer Engine needs a CUDA device"
    else:
        try:
            import transformer_engine.pytorch  # noqa: F401, PLC0415

            out["te"] = None
        except ImportError as exc:
            out["te"] = f"transformer_engine is not importable: {exc}"
    return out


def synthetic_evict(seq_len: int, budget: float, policy: str = "h2o_like", seed: int = 0) -> torch.Tensor:
    """One layer's eviction steps ``[seq_len]`` (int32) for a cache of ``budget * seq_len`` tokens."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"budget must be in (0, 1], got {budget}")
    cache = max(SINK_TOKENS + 1, int(round(budget * seq_len)))
    j = torch.arange(seq_len)
    end = torch.full((seq_len,), seq_len)
    if policy == "streaming":
        window = cache - SINK_TOKENS
        evict = torch.where(j < SINK_TOKENS, end, torch.minimum(j + window, end))
    else:
        window = max(1, cache // 2)
        gen = torch.Generator().manual_seed(seed)
        heavy = torch.rand(seq_len, generator=gen) < (cache - window) / seq_len
        evict = torch.where(heavy, end, torch.minimum(j + window, end))
    return evict.to(EVICT_DTYPE)


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_attention_bench(
    seq_lens: Sequence[int] = (1024, 4096),
    backends: Optional[Sequence[str]] = None,
    *,
    batch: int = 1,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    budget: float = 0.25,
    policy: str = "h2o_like",
    repeats: int = 5,
    warmup: int = 1,
    bytes_num_layers: int = 28,
    device: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time masked vs causal attention; return a JSON-able report.

    Args:
        seq_lens: sequence lengths ``T`` to measure.
        backends: subset of ``("sdpa", "flex", "te")``; default: those usable on ``device``.
            Naming an unusable one raises ConfigError with the reason.
        batch, num_heads, num_kv_heads, head_dim: attention shape (GQA when heads differ).
        budget / policy: the eviction schedule (see the module docstring); per-layer mask.
        repeats / warmup: timed and untimed iterations; the median is reported.
        bytes_num_layers: layers assumed in the per-trajectory mask sizes (28 = Qwen2.5-7B).
        device / dtype: default CUDA + bf16 when available, else CPU + fp32.
    Returns:
        ``{"config": ..., "mask_bytes": [...], "results": [...], "notes": [...], "unavailable": {...}}``;
        each result has ``backend, seq_len, mode ("fwd+bwd" | "forward"), masked_ms, causal_ms,
        ratio`` (and ``block_mask_build_ms`` for flex).
    """
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    avail = available_backends(dev)
    if backends is None:
        chosen = [b for b in BACKENDS if avail[b] is None]
    else:
        chosen = list(backends)
        for b in chosen:
            if b not in BACKENDS:
                raise ConfigError(f"bench: unknown backend {b!r}; choose from {list(BACKENDS)}")
            if avail[b] is not None:
                raise ConfigError(f"bench: backend {b!r} is not usable here: {avail[b]}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"bench: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if num_heads % num_kv_heads:
        raise ConfigError(f"bench: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")

    from megatron.core.transformer.enums import AttnMaskType  # noqa: PLC0415
    from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: PLC0415

    config = TransformerConfig(
        num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
        num_query_groups=num_kv_heads, kv_channels=head_dim, attention_dropout=0.0, hidden_dropout=0.0,
    )
    notes = [
        "masked = ShadowCoreAttention with a per-layer shadow mask; causal = torch SDPA is_causal (no mask "
        "tensor) on the same q, k, v; ratio = masked_ms / causal_ms; medians over the timed repeats",
        "flex BlockMask is cached per micro-batch and layer, so timed iterations exclude its build "
        "(block_mask_build_ms)",
    ]
    if dev.type == "cpu" and "flex" in chosen:
        notes.append(
            f"flex on CPU is forward-only (torch {torch.__version__} FlexAttention has no CPU backward) and eager "
            "(unfused, materialises the scores): its ratio is against a forward-only causal baseline and says "
            "nothing about GPU kernels"
        )

    gen = torch.Generator().manual_seed(seed)
    results: list[dict[str, Any]] = []
    mask_bytes: list[dict[str, Any]] = []
    for T in seq_lens:
        T = int(T)
        e_row = synthetic_evict(T, budget, policy, seed)
        evict = e_row.view(1, 1, T).expand(batch, 1, T).contiguous().to(dev)  # [b, L=1, T]
        mask_bytes.append({
            "seq_len": T,
            "kept_fraction": round(float(kept_fraction(e_row.view(1, T))[0]), 4),
            "evict_bytes_per_layer": nbytes_evict(1, T),
            "dense_bool_bytes_per_layer": T * T,
            "dense_bit_bytes_per_layer": nbytes_dense(1, T),
            f"evict_bytes_{bytes_num_layers}_layers": nbytes_evict(bytes_num_layers, T),
            f"dense_bit_bytes_{bytes_num_layers}_layers": nbytes_dense(bytes_num_layers, T),
        })
        q0 = torch.randn(T, batch, num_heads, head_dim, generator=gen).to(dev, dt)
        k0 = torch.randn(T, batch, num_kv_heads, head_dim, generator=gen).to(dev, dt)
        v0 = torch.randn(T, batch, num_kv_heads, head_dim, generator=gen).to(dev, dt)
        dout = torch.randn(T, batch, num_heads * head_dim, generator=gen).to(dev, dt)

        for backend in chosen:
            forward_only = backend == "flex" and dev.type == "cpu"
            attn = ShadowCoreAttention(config, 1, AttnMaskType.causal, "self", backend=backend)
            q, k, v = (t.detach().clone().requires_grad_(not forward_only) for t in (q0, k0, v0))

            def masked() -> None:
                if forward_only:
                    with torch.no_grad():
                        attn(q, k, v, evict)
                    return
                attn(q, k, v, evict).backward(dout)

            def causal() -> None:
                qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))
                if forward_only:
                    with torch.no_grad():
                        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
                    return
                out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True)
                out.permute(2, 0, 1, 3).reshape(T, batch, -1).backward(dout)

            entry: dict[str, Any] = {"backend": backend, "seq_len": T, "mode": "forward" if forward_only else "fwd+bwd"}
            if backend == "flex":
                e_eff = effective_evict(evict[:, 0])
                t0 = time.perf_counter()
                block_mask_from_intervals(e_eff, None, T, num_q_heads=num_heads)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                entry["block_mask_build_ms"] = (time.perf_counter() - t0) * 1e3
            entry["masked_ms"] = _median_ms(masked, repeats, warmup, dev)
            entry["causal_ms"] = _median_ms(causal, repeats, warmup, dev)
            entry["ratio"] = entry["masked_ms"] / entry["causal_ms"]
            results.append(entry)

    return {
        "config": {
            "device": str(dev), "dtype": str(dt).replace("torch.", ""), "torch": torch.__version__,
            "batch": batch, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
            "budget": budget, "policy": policy, "mask": "per-layer", "repeats": repeats, "warmup": warmup,
            "backends": chosen,
        },
        "mask_bytes": mask_bytes,
        "results": results,
        "unavailable": {b: r for b, r in avail.items() if r is not None},
        "notes": notes,
    }
