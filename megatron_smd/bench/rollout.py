"""``smd bench rollout``: the reference engine's peak KV bytes and tokens/s per eviction policy, against
policy ``none`` on the same prompts in the same run (:func:`bench_rollout`), and the FP8 KV cache
alone and with eviction against a bf16 dense cache (its ``kv_cache`` section)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

POLICIES = ("streaming", "h2o", "snapkv", "rkv")


def _policy_cfg(name: str, budget: int):
    from ..policies import PolicyConfig

    if name == "none":
        return PolicyConfig()
    window = max(4, budget // 4)
    return PolicyConfig(name=name, budget=budget, sinks=4, window=window, buffer=max(8, budget // 8))


def bench_rollout(*, model_dir: str | Path | None = None, prompt_tokens: int = 64, new_tokens: int = 448,
                  num_prompts: int = 2, group_size: int = 2, budget_frac: float = 0.25,
                  policies=POLICIES, seed: int = 0, kv_cache_dtype: str = "fp8_e4m3",
                  fp8_policies=("h2o",)) -> dict:
    """Peak KV bytes and tokens/s per policy at a budget of ``budget_frac`` of the sequence, vs ``none``.

    Long generations (no stop token) so that decode-time eviction dominates; SnapKV compresses only
    the prompt, so its decode cache grows like ``none`` (shown, not hidden).

    ``kv_cache``: the same prompts and lengths with bf16 compute, the KV cache in bf16 without
    eviction (the baseline, ``bf16:none``), in ``kv_cache_dtype`` (unit scales) without eviction
    (``fp8:none``) and with each of ``fp8_policies`` (``fp8:<policy>``), peak KV bytes and their
    ratio to the baseline. Every sequence decodes ``new_tokens`` (no stop token), so the runs hold
    the same number of tokens whatever they sample.
    """
    from ..model.tiny import init_model_dir
    from ..rollout.engine import ReferenceEngine, SamplingParams

    tmp = None
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="smd-bench-")
        model_dir = init_model_dir(Path(tmp.name) / "tiny", "qwen2", seed=seed)
    g = torch.Generator().manual_seed(seed)
    from ..model.hf import read_arch

    vocab = read_arch(model_dir).vocab_size
    prompts = [torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(num_prompts)]
    T = prompt_tokens + new_tokens
    budget = max(16, int(budget_frac * T))
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=seed)
    rows = {}
    for name in ("none", *policies):
        eng = ReferenceEngine.from_pretrained(model_dir, _policy_cfg(name, budget))
        _, st = eng.generate(prompts, n=group_size, sampling=sp)
        rows[name] = {"peak_kv_bytes": st.peak_kv_bytes, "peak_kv_bytes_used": st.peak_kv_bytes_used,
                      "tokens_per_s": st.tokens_per_s, "seconds": st.seconds}
    base = rows["none"]
    for name, r in rows.items():
        r["kv_bytes_ratio_vs_none"] = r["peak_kv_bytes"] / base["peak_kv_bytes"]
        r["tokens_per_s_ratio_vs_none"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
    kv_rows = {}
    if fp8_policies is not None:
        from ..quant.cache import RolloutKV

        fp8 = RolloutKV.unit(read_arch(model_dir).num_layers, kv_cache_dtype)
        for label, name, kv in [("bf16:none", "none", None), ("fp8:none", "none", fp8),
                                *[(f"fp8:{p}", p, fp8) for p in fp8_policies]]:
            eng = ReferenceEngine.from_pretrained(model_dir, _policy_cfg(name, budget), dtype="bfloat16", kv_cache=kv)
            _, st = eng.generate(prompts, n=group_size, sampling=sp)
            kv_rows[label] = {"policy": name, "kv_cache_dtype": kv_cache_dtype if kv else "bfloat16",
                              "peak_kv_bytes": st.peak_kv_bytes, "peak_kv_bytes_used": st.peak_kv_bytes_used,
                              "generated_tokens": st.generated_tokens, "tokens_per_s": st.tokens_per_s}
        for r in kv_rows.values():
            r["kv_bytes_ratio_vs_bf16_none"] = r["peak_kv_bytes"] / kv_rows["bf16:none"]["peak_kv_bytes"]
    if tmp is not None:
        tmp.cleanup()
    out = {"benchmark": "rollout", "seq_len": T, "budget_tokens": budget, "budget_frac": budget / T,
           "num_sequences": num_prompts * group_size, "policies": rows}
    if kv_rows:
        out["kv_cache"] = {"compute_dtype": "bfloat16", "baseline": "bf16:none", "kv_cache_dtype": kv_cache_dtype,
                           "rows": kv_rows}
    return out
