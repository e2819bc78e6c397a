"""Rollout benchmark of the patched SGLang server: memory, concurrency and speed of per-layer eviction.

:func:`bench_rollout_sglang` starts, on one model and with one set of requests:

* the unpatched server (``python -m sglang.launch_server``, SGLang's own pools),
* the patched server with policy ``none`` (SGLang's own pools, the patch's counters),
* the patched server with each evicting policy (``streaming``, ``h2o``, ``snapkv``, ``rkv``) at a
  budget of ``budget_frac`` of the prompt (per-layer pools),

every one with the same KV byte capacity (``--max-total-tokens``: physical slots per layer, the same
K/V buffers as SGLang's dense pool of that many tokens) and one torch / OpenMP thread (``threads``).
Generations are long: ``gen_factor`` times the budget, fixed length (``ignore_eos``). Then:

1. **Speed and memory** (``rounds`` rounds; in each, every server in turn gets the same batch of
   ``batch`` requests, few enough that the dense pool holds them all at once, after a
   ``/flush_cache``): generated tokens/s per server; ``throughput_ratio_vs_unpatched`` is the
   median over rounds of its tokens/s divided by the unpatched server's in the same round (they
   run next to each other, the order alternating, so a machine shared with other jobs disturbs
   both alike); the best-round and median-of-speeds ratios and the tokens per CPU second of the
   server's processes are reported too; and the peak physical K/V bytes the pool held across
   layers during the batch (the pool's own counters, ``/server_info``).
2. **Concurrency** (each patched server gets ``concurrency_requests`` requests at once): the most
   requests its scheduler ran in one decode batch, and the retractions it made (must be 0: admission
   reserves what each policy holds).

Per policy it returns ``kv_bytes_ratio_vs_none``, ``max_running_requests_ratio_vs_none`` and
``throughput_ratio_vs_unpatched`` with the raw figures. Servers listen on 127.0.0.1 and are stopped
by their own PIDs; every wait and request is bounded in time.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_smd import kv_budget
from megatron_smd.errors import SMDError
from megatron_smd.policies import PolicyConfig

from .server_process import PatchedServer, start_all, stop_all

EVICTING = ("streaming", "h2o", "snapkv", "rkv")


def bench_policies(budget: int, *, window: int | None = None, sinks: int | None = None,
                   buffer: int | None = None) -> dict[str, PolicyConfig]:
    """The evicting policies at ``budget`` tokens per layer; window, sinks and R-KV's buffer default
    to a quarter of the budget."""
    q = max(1, budget // 4)
    w, s, b = window or q, sinks or q, buffer or q
    return {"streaming": PolicyConfig(name="streaming", budget=budget, sinks=s),
            "h2o": PolicyConfig(name="h2o", budget=budget, window=w),
            "snapkv": PolicyConfig(name="snapkv", budget=budget, window=w),
            "rkv": PolicyConfig(name="rkv", budget=budget, window=w, buffer=b)}


def policy_args(cfg: PolicyConfig) -> list[str]:
    """``cfg`` as ``sglang_patch.launch_server`` flags."""
    out = ["--smd-policy", cfg.name]
    if cfg.name == "none":
        return out
    out += ["--smd-budget", str(cfg.budget)]
    if cfg.name == "streaming":
        out += ["--smd-sinks", str(cfg.sinks)]
    else:
        out += ["--smd-window", str(cfg.window)]
    if cfg.name == "rkv":
        out += ["--smd-buffer", str(cfg.buffer)]
    return out


def _generate(url: str, prompts: list[list[int]], new_tokens: int, timeout_s: float) -> tuple[int, float]:
    """One ``/generate`` call with a batch of prompts; returns (generated tokens, seconds)."""
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        out = json.loads(r.read())
    dt = time.monotonic() - t0
    out = out if isinstance(out, list) else [out]
    if len(out) != len(prompts):
        raise SMDError(f"{url}: {len(out)} replies for {len(prompts)} prompts")
    return sum(len(o["output_ids"]) for o in out), dt


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group ``pgid``
    (a server started by :class:`PatchedServer` leads its own group: launcher, scheduler, detokenizer)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _flush(url: str) -> None:
    """``/flush_cache``: drop the radix cache (the server is idle between batches)."""
    req = urllib.request.Request(url + "/flush_cache", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def _prompts(vocab: int, k: int, length: int, seed: int) -> list[list[int]]:
    """``k`` random prompts with distinct first tokens (no two share a radix-tree prefix, so every
    request's K/V is its own, as the per-request plan figures assume)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(k)]
    firsts = torch.randperm(vocab - 3, generator=g)[:k] + 3
    for p, f in zip(out, firsts.tolist()):
        p[0] = f
    return out


def bench_rollout_sglang(model_dir: str | Path | None = None, *, prompt_len: int = 64, budget_frac: float = 0.25,
                         gen_factor: int = 16, batch: int = 8, concurrency_requests: int = 64, rounds: int = 5,
                         kv_slots: int | None = None, policies: tuple[str, ...] = EVICTING,
                         workdir: str | Path | None = None, start_timeout_s: float = 900.0,
                         request_timeout_s: float = 900.0, seed: int = 0, threads: int = 1, log=print) -> dict:
    """Run the benchmark (see the module docstring) and return its figures (JSON-serializable).

    Args:
        model_dir: a Hugging Face model directory; None writes the tiny random Qwen2 into ``workdir``.
        prompt_len: prompt tokens ``P``; the budget is ``B = budget_frac * P`` tokens per layer and
            every request generates ``N = gen_factor * B`` tokens.
        batch: requests of the speed/memory batch (all of them fit the dense pool at once).
        concurrency_requests: requests sent at once in the concurrency phase.
        kv_slots: ``--max-total-tokens`` of every server (physical slots per layer); default: what the
            dense pool needs for ``batch`` requests at their peak, plus one request of slack.
        policies: the evicting policies to run.
        threads: torch / OpenMP threads of every server process.
    """
    from megatron_smd.model.hf import read_arch

    t_start = time.monotonic()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="smd-bench-sglang-"))
    work.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        from megatron_smd.model.tiny import init_model_dir

        model_dir = init_model_dir(work / "tiny-qwen2", "qwen2", seed=seed)
    arch = read_arch(model_dir)
    B = max(2, int(round(budget_frac * prompt_len)))
    N = gen_factor * B
    dense = PolicyConfig()
    dense_peak = kv_budget.request_peak_tokens(dense, prompt_len, N)
    # SGLang's dense admission reserves prompt + max_new_tokens + 1 per request
    S = kv_slots or (batch + 1) * (prompt_len + N + 2)
    cfgs = {"none": dense, **{k: v for k, v in bench_policies(B).items() if k in policies}}
    common = ["--skip-tokenizer-init", "--max-total-tokens", str(S), "--max-running-requests", "256",
              "--max-prefill-tokens", str(max(16384, concurrency_requests * prompt_len))]
    import os

    # every server single-threaded (torch / OpenMP), so six of them do not oversubscribe the cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    servers = {"unpatched": PatchedServer(model_dir, common, patched=False, log_path=work / "unpatched.log",
                                          start_timeout_s=start_timeout_s, env=env)}
    for name, cfg in cfgs.items():
        servers[name] = PatchedServer(model_dir, policy_args(cfg) + common, log_path=work / f"{name}.log",
                                      start_timeout_s=start_timeout_s, env=env)
    log(f"bench sglang: model {model_dir} (L={arch.num_layers}), P={prompt_len}, B={B}, N={N}, "
        f"{S} KV slots per layer on every server; starting {len(servers)} servers")
    res: dict = {"model": str(model_dir), "prompt_len": prompt_len, "budget": B, "new_tokens": N,
                 "kv_slots_per_layer": S, "batch": batch, "concurrency_requests": concurrency_requests,
                 "rounds": rounds, "policies": {}, "servers": {}}
    try:
        start_all(servers.values())
        res["startup_s"] = {k: round(s.startup_s, 1) for k, s in servers.items()}
        prompts = _prompts(arch.vocab_size, batch, prompt_len, seed + 1)
        patched = [k for k in servers if k != "unpatched"]
        # 1. speed and memory: the same batch on every server, interleaved over rounds
        speed = {k: [] for k in servers}
        cpu_speed = {k: [] for k in servers}
        peak_bytes = {k: 0 for k in patched}
        peak_layer = {k: 0 for k in patched}
        _generate(servers["unpatched"].url, prompts[:1], 4, request_timeout_s)  # warm-up
        for k in patched:
            _generate(servers[k].url, prompts[:1], 4, request_timeout_s)
        for rnd in range(rounds):
            order = list(servers.items()) if rnd % 2 == 0 else list(servers.items())[::-1]
            for k, s in order:
                _flush(s.url)  # the radix cache of earlier batches would count as held K/V
                if k != "unpatched":
                    s.pool_state()  # starts a new peak window
                c0 = group_cpu_seconds(s.proc.pid)
                toks, dt = _generate(s.url, prompts, N, request_timeout_s)
                speed[k].append(toks / dt)
                cpu_speed[k].append(toks / max(1e-9, group_cpu_seconds(s.proc.pid) - c0))
                if k != "unpatched":
                    st = s.pool_state()
                    peak_bytes[k] = max(peak_bytes[k], st["window_peak_used_slots_total"] * st["slot_bytes"])
                    peak_layer[k] = max(peak_layer[k], st["window_peak_used_slots_layer"])
            log(f"  round {rnd}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s ({cpu_speed[k][-1]:.1f} per CPU s)"
                                               for k, v in speed.items()))
        # the machine may be shared: a server's speed is compared with the unpatched server's in the
        # same round (run next to each other), and the median of those paired ratios taken
        paired = {k: statistics.median(a / b for a, b in zip(v, speed["unpatched"])) for k, v in speed.items()}
        tps = {k: max(v) for k, v in speed.items()}
        tps_median = {k: statistics.median(v) for k, v in speed.items()}
        tpc = {k: statistics.median(v) for k, v in cpu_speed.items()}
        # 2. concurrency: many requests at once on each patched server (same pool for all)
        many = _prompts(arch.vocab_size, concurrency_requests, prompt_len, seed + 2)
        running, retract, conc_s = {}, {}, {}
        for k in patched:
            s = servers[k]
            before = s.pool_state()
            t0 = time.monotonic()
            with ThreadPoolExecutor(len(many)) as ex:  # one HTTP request each, all in flight at once
                futs = [ex.submit(_generate, s.url, [p], N, request_timeout_s) for p in many]
                for f in futs:
                    f.result(timeout=request_timeout_s)
            conc_s[k] = time.monotonic() - t0
            after = s.pool_state()
            running[k] = after["peak_running_requests"]
            retract[k] = after["retractions"] - before["retractions"]
            log(f"  concurrency {k}: at most {running[k]} requests at once, {retract[k]} retractions, "
                f"{conc_s[k]:.0f} s")
        for k in patched:
            res["servers"][k] = {"tokens_per_s": tps[k], "tokens_per_s_median": tps_median[k],
                                 "tokens_per_s_rounds": speed[k], "tokens_per_cpu_s": tpc[k],
                                 "peak_kv_bytes": peak_bytes[k], "peak_slots_per_layer": peak_layer[k],
                                 "max_running_requests": running[k], "retractions": retract[k],
                                 "concurrency_seconds": conc_s[k]}
        res["servers"]["unpatched"] = {"tokens_per_s": tps["unpatched"], "tokens_per_s_median": tps_median["unpatched"],
                                       "tokens_per_s_rounds": speed["unpatched"], "tokens_per_cpu_s": tpc["unpatched"]}
        for k in patched:
            cfg = cfgs[k]
            res["policies"][k] = {
                "policy": cfg.model_dump(mode="json"),
                "kv_bytes_ratio_vs_none": peak_bytes[k] / max(1, peak_bytes["none"]),
                "max_running_requests_ratio_vs_none": running[k] / max(1, running["none"]),
                "throughput_ratio_vs_unpatched": paired[k],
                "throughput_ratio_vs_unpatched_best": tps[k] / tps["unpatched"],
                "throughput_ratio_vs_unpatched_median": tps_median[k] / tps_median["unpatched"],
                "cpu_throughput_ratio_vs_unpatched": tpc[k] / tpc["unpatched"],
                "retractions": retract[k],
                "planned_peak_slots_per_request": kv_budget.request_peak_tokens(cfg, prompt_len, N),
                "planned_concurrent_requests": kv_budget.concurrent_requests(S, cfg, prompt_len, N),
            }
        res["dense_peak_slots_per_request"] = dense_peak
    finally:
        stop_all(servers.values())
    res["seconds"] = time.monotonic() - t_start
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--budget-frac", type=float, default=0.25)
    p.add_argument("--gen-factor", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--concurrency-requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = bench_rollout_sglang(a.model_path, prompt_len=a.prompt_len, budget_frac=a.budget_frac,
                               gen_factor=a.gen_factor, batch=a.batch, concurrency_requests=a.concurrency_requests,
                               rounds=a.rounds, workdir=a.workdir, log=(lambda *x: None) if a.json else print)
    print(json.dumps(res, indent=None if a.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
