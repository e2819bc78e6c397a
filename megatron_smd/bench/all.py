"""``smd bench all``: every benchmark in one run, each figure next to its baseline from the same run.

    smd bench all --json            # full sizes: < 10 minutes on a 2-core CPU
    smd bench all --quick           # seconds; what the test suite runs

Sections (DESIGN.md section 5):

* ``rollout``: peak KV bytes actually allocated and tokens/s of the reference engine, per eviction
  policy at a budget of 1/4 of the sequence, against policy ``none`` on the same prompts
  (:func:`megatron_smd.bench.rollout.bench_rollout`).
* ``attention``: the learner's shadow-masked core attention forward + backward against plain causal
  SDPA of the same shape, per backend usable here
  (:func:`megatron_smd.bench.attention.run_attention_bench`; on CPU flex is forward-only,
  see its notes).
* ``mask_bytes``: the int32 ``evict`` mask of one trajectory against a dense boolean mask and a
  dense bit mask of the same attention pattern (measured tensors where they fit in memory,
  marked ``measured``; the 28-layer figures scale the per-layer measurement by the layer count).
* ``sync``: weight sync per transport against its own floor and a plain copy
  (:func:`megatron_smd.bench.sync.bench_sync`, its quick form under ``--quick``).

The result's ``figures`` list is the summary: every entry has ``value``, ``baseline`` (what it is
compared with), ``baseline_value`` and ``ratio = value / baseline_value`` (or, for figures taken
from the sync benchmark, the ``ratio`` it reported and the numbers it reported beside it).
Timings are CPU wall-clock medians on whatever else the machine is doing; the ratios, measured side
by side, are the meaningful part. ``torch.get_num_threads()`` is reported with them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

LIMIT_S = 600.0  # the bound for the full run on CPU

# Sizes. Full: a 384-token rollout (128 prompt + 256 generated, 4 sequences, 5 policies, 3 rounds), attention
# at 1K/2K/4K tokens, mask bytes up to 32K tokens. Quick: the same code paths at toy sizes.
FULL: dict[str, Any] = {
    "rollout": dict(prompt_tokens=128, new_tokens=256, num_prompts=2, group_size=2, budget_frac=0.25),
    "rollout_rounds": 3,
    "attention": dict(seq_lens=(1024, 2048, 4096), repeats=3, warmup=1),
    "mask_seq_lens": (1024, 4096, 32768),
}
QUICK: dict[str, Any] = {
    "rollout": dict(prompt_tokens=24, new_tokens=40, num_prompts=1, group_size=2, budget_frac=0.25),
    "rollout_rounds": 1,
    "attention": dict(seq_lens=(128,), repeats=2, warmup=1),
    "mask_seq_lens": (128, 1024),
}
MASK_LAYERS = 28  # Qwen2.5-7B: the per-trajectory mask sizes quoted in DESIGN.md
DENSE_MEASURE_MAX_T = 4096  # materialise the dense boolean mask up to this length (T*T bytes)


def _fig(section: str, name: str, value: float, unit: str, baseline: str, baseline_value: float, **extra) -> dict:
    return {"section": section, "name": name, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": value / baseline_value if baseline_value else None, **extra}


def _timed(fn: Callable[[], dict]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ sections
def bench_rollout_rounds(rounds: int, **kw) -> dict:
    """:func:`~megatron_smd.bench.rollout.bench_rollout` ``rounds`` times after an untimed warm-up; tokens/s
    is the median over rounds per policy.

    Each round runs ``none`` and every policy back to back, so a burst of load from elsewhere on a
    shared CPU hits one round of all of them rather than one policy, and the median discards it.
    Peak KV bytes are a property of the run (same prompts, same seeds), identical in every round.
    """
    from .rollout import bench_rollout

    bench_rollout(prompt_tokens=16, new_tokens=8, num_prompts=1, group_size=2)  # warm-up: lazy inits, kernels
    runs = [bench_rollout(**kw) for _ in range(rounds)]
    out = json.loads(json.dumps(runs[0]))
    for name, r in out["policies"].items():
        per = [run["policies"][name] for run in runs]
        if len({p["peak_kv_bytes"] for p in per}) != 1:
            raise RuntimeError(f"bench rollout: peak KV bytes of {name} differ between rounds: a nondeterministic engine")
        r["tokens_per_s_rounds"] = [p["tokens_per_s"] for p in per]
        r["tokens_per_s"] = statistics.median(r["tokens_per_s_rounds"])
        r["seconds"] = statistics.median(p["seconds"] for p in per)
    base = out["policies"]["none"]
    for r in out["policies"].values():
        r["tokens_per_s_ratio_vs_none"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
    out["rounds"] = rounds
    return out


def rollout_figures(res: dict) -> list[dict]:
    base = res["policies"]["none"]
    out = []
    for name, r in res["policies"].items():
        if name == "none":
            continue
        ctx = dict(seq_len=res["seq_len"], budget_tokens=res["budget_tokens"], num_sequences=res["num_sequences"])
        out.append(_fig("rollout", f"peak_kv_bytes[{name}]", r["peak_kv_bytes"], "bytes",
                        "policy none, same prompts and lengths", base["peak_kv_bytes"], **ctx))
        out.append(_fig("rollout", f"tokens_per_s[{name}]", r["tokens_per_s"], "tokens/s",
                        "policy none, same prompts and lengths", base["tokens_per_s"], **ctx))
    return out


def attention_figures(res: dict) -> list[dict]:
    return [_fig("attention", f"{r['backend']}_{r['mode']}_ms[T={r['seq_len']}]", r["masked_ms"], "ms",
                 f"plain causal SDPA {r['mode']}, same q/k/v", r["causal_ms"], backend=r["backend"], seq_len=r["seq_len"])
            for r in res["results"]]


def bench_mask_bytes(seq_lens: tuple[int, ...], *, budget: float = 0.25, num_layers: int = MASK_LAYERS) -> dict:
    """Bytes of one trajectory's shadow mask (int32 ``evict``) vs dense masks of the same pattern.

    Per layer, measured on real tensors: ``evict`` ``[T]`` int32 from a synthetic H2O-shaped schedule
    (:func:`~megatron_smd.bench.attention.synthetic_evict`) and its dense boolean form
    ``[T, T]`` from :func:`megatron_smd.mask.to_dense` (which is also checked against ``evict`` on
    one row: the two must describe the same pattern). Beyond ``DENSE_MEASURE_MAX_T`` the boolean
    size is ``T*T`` bytes, marked ``measured: false``. The dense *bit* mask is ``ceil(T*T/8)``.
    """
    from .attention import synthetic_evict
    from ..mask import to_dense

    rows = []
    for T in seq_lens:
        e = synthetic_evict(T, budget, "h2o_like")
        evict_b = e.numel() * e.element_size()
        measured = T <= DENSE_MEASURE_MAX_T
        if measured:
            dense = to_dense(e.view(1, T))[0]  # [T, T] bool
            i = T - 1  # last query row: sees exactly the keys with evict > T - 1
            assert int(dense[i].sum()) == int((e > i).sum()), "dense mask and evict disagree"
            bool_b = dense.numel() * dense.element_size()
            del dense
        else:
            bool_b = T * T
        bit_b = -(-T * T // 8)
        rows.append({"seq_len": T, "evict_bytes_per_layer": evict_b, "dense_bool_bytes_per_layer": bool_b,
                     "dense_bit_bytes_per_layer": bit_b, "dense_bool_measured": measured,
                     f"evict_bytes_{num_layers}_layers": evict_b * num_layers,
                     f"dense_bit_bytes_{num_layers}_layers": bit_b * num_layers})
    return {"benchmark": "mask_bytes", "num_layers": num_layers, "budget": budget, "rows": rows}


def mask_figures(res: dict) -> list[dict]:
    out = []
    L = res["num_layers"]
    for r in res["rows"]:
        T = r["seq_len"]
        out.append(_fig("mask_bytes", f"evict_bytes[T={T}]", r["evict_bytes_per_layer"], "bytes/layer",
                        "dense boolean mask, same pattern", r["dense_bool_bytes_per_layer"], seq_len=T,
                        measured=r["dense_bool_measured"]))
        out.append(_fig("mask_bytes", f"evict_bytes_{L}_layers[T={T}]", r[f"evict_bytes_{L}_layers"], "bytes/trajectory",
                        "dense bit mask (1 bit per query-key pair)", r[f"dense_bit_bytes_{L}_layers"], seq_len=T))
    return out


def run_sync(quick: bool) -> dict:
    """:func:`megatron_smd.bench.sync.bench_sync` (its quick form when ``quick``), under ``result``."""
    from .sync import bench_sync

    return {"status": "ok", "quick_supported": True, "result": bench_sync(quick=quick)}


def sync_figures(res: dict) -> list[dict]:
    """Every dict inside the sync result that reports a ``ratio`` becomes a figure; the numbers
    reported beside it (its baseline among them) travel with it as ``context``."""
    out: list[dict] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            # bench_sync names its figure ``ratio_vs_copy`` (sync seconds / plain-copy seconds)
            key = next((k for k in ("ratio", "ratio_vs_copy") if isinstance(x.get(k), (int, float))), None)
            if key is not None:
                ctx = {k: v for k, v in x.items() if k != key and isinstance(v, (int, float, str))}
                out.append({"section": "sync", "name": path or "sync", "ratio": float(x[key]),
                            "baseline": "plain tensor copy of the same bytes, same run (bench_sync)",
                            "context": ctx})
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(res["result"], "")
    return out


# ------------------------------------------------------------------------------------------ all
def bench_all(quick: bool = False, *, threads: int | None = None) -> dict:
    """Run every benchmark; return a JSON-able report (see the module docstring).

    ``threads``: run with ``torch.set_num_threads(threads)`` (restored afterwards); default: leave
    torch's setting. On a small shared CPU the tiny rollout model's many small ops are dominated by
    intra-op thread synchronisation, and one thread can be an order of magnitude faster.

    Keys: ``figures`` (the flat summary), ``sections`` (each benchmark's full output),
    ``seconds`` (per section and ``total``), ``limit_s``/``within_limit`` (the 10-minute bound,
    meaningful for the full sizes), ``missing`` (empty: every section always runs; the key keeps
    the report's shape), ``problems`` (anything that makes a figure unusable), ``environment``.
    """
    from .attention import run_attention_bench

    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_all(quick)
        finally:
            torch.set_num_threads(old)
    sizes = QUICK if quick else FULL
    t_all = time.perf_counter()
    sections: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    sections["rollout"], seconds["rollout"] = _timed(lambda: bench_rollout_rounds(sizes["rollout_rounds"],
                                                                                 **sizes["rollout"]))
    sections["attention"], seconds["attention"] = _timed(lambda: run_attention_bench(**sizes["attention"]))
    sections["mask_bytes"], seconds["mask_bytes"] = _timed(lambda: bench_mask_bytes(tuple(sizes["mask_seq_lens"])))
    sections["sync"], seconds["sync"] = _timed(lambda: run_sync(quick))
    seconds["total"] = time.perf_counter() - t_all

    figures = (rollout_figures(sections["rollout"]) + attention_figures(sections["attention"])
               + mask_figures(sections["mask_bytes"]) + sync_figures(sections["sync"]))
    problems = [f"{f['section']}/{f['name']}: ratio is {f['ratio']}" for f in figures
                if not (isinstance(f.get("ratio"), float) and math.isfinite(f["ratio"]))]
    if not any(f["section"] == "sync" for f in figures):
        problems.append("sync: bench_sync() returned no entry with a 'ratio' next to its baseline")
    return {
        "benchmark": "all", "quick": quick,
        "figures": figures, "sections": sections, "seconds": seconds,
        "limit_s": LIMIT_S, "within_limit": seconds["total"] < LIMIT_S,
        "missing": {}, "problems": problems,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": "cuda" if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
                        "machine": f"{platform.system()} {platform.machine()}", "python": platform.python_version()},
    }


def format_table(rep: dict) -> str:
    """Human-readable summary of :func:`bench_all`'s report."""
    lines = [f"smd bench all ({'quick' if rep['quick'] else 'full'}): {rep['seconds']['total']:.0f} s "
             f"(limit {rep['limit_s']:.0f} s), torch {rep['environment']['torch']}, {rep['environment']['threads']} threads"]
    for f in rep["figures"]:
        if "value" in f:
            lines.append(f"  {f['section']:>10}  {f['name']:<34} {f['value']:>14.4g} {f['unit']:<16} "
                         f"ratio {f['ratio']:.3g} vs {f['baseline']} ({f['baseline_value']:.4g})")
        else:
            lines.append(f"  {f['section']:>10}  {f['name']:<34} ratio {f['ratio']:.3g}  {f['context']}")
    for p in rep["problems"]:
        lines.append(f"  PROBLEM {p}")
    return "\n".join(lines)

