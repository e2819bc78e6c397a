"""The numbers of a comparison, from the runs' per-step histories: the per-mode table rows, the
per-step series and the findings, each decided with a stated criterion (:func:`summarize`)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from .common import MODES, _COSMETIC, _bytes, _environment, _flatten, _fmt, _now

# The project's stated fp32 replay tolerance (tests/test_train.py, tests/test_engine_replay.py):
# the floor criterion when no dense run is available to measure the floor.
REPLAY_TOL = 1e-5
# SMD "sits at the dense floor" at a step when its gap is at most this multiple of the largest gap
# the dense mode measured over its run (and never below REPLAY_TOL): both are fp32 summation-order
# noise of the same two code paths (cached decode vs parallel learner forward) and wander within an
# order of magnitude from batch to batch, while an off-policy gap is 3-5 orders above it.
FLOOR_FACTOR = 10.0


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in history if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pvar(xs: Sequence[float]) -> float | None:
    return statistics.pvariance(xs) if len(xs) >= 1 else None


SERIES_KEYS = ("reward/train", "reward/eval_dense", "reward/eval_compressed", "mismatch/max_abs_logprob_diff",
               "mismatch_dense/max_abs_logprob_diff", "mismatch/kl_k3", "train/grad_norm", "kv/peak_bytes",
               "correction/rejection_rate", "train/grad_norm_ppo", "train/grad_norm_distill")
# A step's gradient norm is a "spike" when it exceeds this multiple of the run's median.
SPIKE_FACTOR = 3.0


def grad_norm_stats(gn: Sequence[float], prefix: str = "grad_norm") -> dict:
    """Robust statistics of per-step gradient norms next to the variance (which one or two spikes
    dominate): median, interquartile range, share of steps above :data:`SPIKE_FACTOR` x the median,
    and the population variance of the natural log of the norms (a scale-free spread)."""
    if not gn:
        return {f"{prefix}_{k}": None for k in ("median", "iqr", "spike_share", "logvar")}
    q = statistics.quantiles(gn, n=4, method="inclusive") if len(gn) >= 2 else [gn[0]] * 3
    med = statistics.median(gn)
    logs = [math.log(max(g, 1e-30)) for g in gn]
    return {f"{prefix}_median": med, f"{prefix}_iqr": q[2] - q[0],
            f"{prefix}_spike_share": sum(g > SPIKE_FACTOR * med for g in gn) / len(gn),
            f"{prefix}_logvar": statistics.pvariance(logs)}


def summarize_mode(mode: str, history: list[dict], wall_s: float | None) -> dict:
    """The per-mode row of the results table, computed from the trainer's per-step history.

    - eval rewards: greedy eval on the fixed held-out set at eval steps, decoded with a dense cache
      (``dense``) and with the configured eviction policy (``compressed``); final = last eval, best =
      best eval including step 0 (the starting weights, when the trainer logged it).
    - replay gap: ``mismatch/max_abs_logprob_diff`` of every step (max |log p_learner - log
      p_sampler| on the rollout's actions, at the parameters that sampled them, in the learner's
      forward for this mode: shadow-masked for ``smd``, dense otherwise); max and mean over steps.
    - grad-norm variance: population variance over steps of the per-step mean gradient norm; with
      its robust companions (:func:`grad_norm_stats`): median, IQR, spike share, variance of log norm.
    - rejected: mean over steps of the fraction of sequences ``sparse_rl`` rejected (0 for the other
      modes, which never discard samples).
    - peak KV: largest rollout KV cache actually allocated in any step (bytes).
    """
    _, gap = _series(history, "mismatch/max_abs_logprob_diff")
    _, gap_dense = _series(history, "mismatch_dense/max_abs_logprob_diff")
    _, kl = _series(history, "mismatch/kl_k3")
    _, gn = _series(history, "train/grad_norm")
    _, rew = _series(history, "reward/train")
    _, ed = _series(history, "reward/eval_dense")
    _, ec = _series(history, "reward/eval_compressed")
    _, kv = _series(history, "kv/peak_bytes")
    _, tps = _series(history, "perf/rollout_tokens_per_s")
    _, rej = _series(history, "correction/rejection_rate")
    _, g_ppo = _series(history, "train/grad_norm_ppo")
    _, g_dis = _series(history, "train/grad_norm_distill")
    trained = [r for r in history if int(r["step"]) >= 1]  # step 0: the starting weights' eval only
    t_steps = [sum(float(r.get(f"time/{k}_s", 0.0)) for k in ("rollout", "learn", "sync")) for r in trained]
    return {
        "mode": mode,
        "steps": len(trained),
        "eval_reward_dense_final": ed[-1] if ed else None,
        "eval_reward_dense_best": max(ed) if ed else None,
        "eval_reward_compressed_final": ec[-1] if ec else None,
        "eval_reward_compressed_best": max(ec) if ec else None,
        "train_reward_mean": _mean(rew),
        "train_reward_last": rew[-1] if rew else None,
        "replay_gap_max": max(gap) if gap else None,
        "replay_gap_mean": _mean(gap),
        "replay_kl_k3_mean": _mean(kl),
        # smd only: the same compressed rollout scored by the dense learner (the gap smd removes)
        "dense_learner_gap_max": max(gap_dense) if gap_dense else None,
        "grad_norm_mean": _mean(gn),
        "grad_norm_var": _pvar(gn),
        **grad_norm_stats(gn),
        # per-term norms (logged only when the run asked for them): the norm of the PPO term's gradient
        # and of the distillation term's (coefficient included) over the whole mini-batch, mean over
        # the step's optimizer steps; median over steps, and at the spike steps (> SPIKE_FACTOR x the
        # median total norm) the largest ratio distillation / PPO
        "grad_norm_ppo_median": statistics.median(g_ppo) if g_ppo else None,
        "grad_norm_distill_median": statistics.median(g_dis) if g_dis else None,
        "grad_norm_spike_distill_over_ppo": _spike_ratio(history, gn),
        "rejected_fraction": (_mean(rej) if rej else 0.0) if mode == "sparse_rl" else 0.0,
        "peak_kv_bytes": max(kv) if kv else None,
        "rollout_tokens_per_s": _mean(tps),
        "wall_s": wall_s,
        "step_time_s": sum(t_steps) if t_steps else None,
    }


def _spike_ratio(history: list[dict], gn: list[float]) -> float | None:
    """Largest ``train/grad_norm_distill / train/grad_norm_ppo`` over the spike steps (None: no spike
    step or no per-term norms)."""
    if not gn:
        return None
    med = statistics.median(gn)
    r = [float(h["train/grad_norm_distill"]) / max(float(h["train/grad_norm_ppo"]), 1e-30) for h in history
         if h.get("train/grad_norm") is not None and h["train/grad_norm"] > SPIKE_FACTOR * med
         and h.get("train/grad_norm_ppo") is not None and h.get("train/grad_norm_distill") is not None]
    return max(r) if r else None


def _reward_threshold(n_eval: int) -> float:
    """Two standard errors of a difference of two mean rewards in [0, 1] over ``n_eval`` prompts at
    the worst case p = 0.5: ``2 * sqrt(2 * 0.25 / n)``. Differences below it are not resolvable."""
    return 2.0 * math.sqrt(0.5 / max(n_eval, 1))


def summarize(runs: dict[str, dict]) -> dict:
    """``{mode: run.json}`` -> the results dict (table rows, per-step series, findings, setup)."""
    modes = [m for m in MODES if m in runs]
    rows = {m: summarize_mode(m, runs[m]["history"], runs[m].get("wall_s")) for m in modes}
    series: dict[str, dict] = {m: {} for m in modes}
    for m in modes:
        for k in SERIES_KEYS:
            steps, vals = _series(runs[m]["history"], k)
            if steps:
                series[m][k] = {"steps": steps, "values": vals}
    cfg = runs[modes[0]]["config"]
    if "dense" in rows and rows["dense"]["peak_kv_bytes"]:
        for m, r in rows.items():
            r["kv_ratio_vs_dense"] = r["peak_kv_bytes"] / rows["dense"]["peak_kv_bytes"] if r["peak_kv_bytes"] else None
    return {
        "generated_utc": _now(),
        "setup": _setup(cfg, runs),
        "environment": _run_environment(runs),
        "modes": rows,
        "series": series,
        "findings": findings(rows, series, n_eval=int(cfg["train"]["eval_prompts"])),
    }


def _run_environment(runs: dict[str, dict]) -> dict:
    """The environment the modes trained in (recorded in run.json); ``mixed`` lists any that differ."""
    envs = {m: r.get("environment") or _environment() for m, r in runs.items()}
    first = next(iter(envs.values()))
    return {**first, "mixed": sorted(m for m, e in envs.items() if e != first)}


def _setup(cfg: dict, runs: dict[str, dict], ignore: tuple[str, ...] = ()) -> dict:
    pol = cfg["rollout"]["policy"]
    return {
        "model": cfg["model"]["path"], "model_init": cfg["model"].get("init"),
        "task": cfg["task"], "policy": pol,
        "rollout": {k: cfg["rollout"][k] for k in ("num_prompts", "group_size", "max_new_tokens", "temperature", "seed")},
        "train": cfg["train"], "learner": {k: cfg["learner"][k] for k in ("lr", "grad_clip", "seed", "attention_backend")},
        "algorithm": {k: v for k, v in cfg["algorithm"].items() if k != "correction"},
        "sft": cfg["sft"],
        "shared_config": _shared(runs, ignore),
    }


def _shared(runs: dict[str, dict], ignore: tuple[str, ...] = ()) -> bool:
    """True iff the modes' configs differ only in ``algorithm.correction``, ``output_dir``, cosmetics
    and the keys in ``ignore`` (a several-seed comparison: the seeds)."""
    flat = []
    for r in runs.values():
        f = _flatten(r["config"])
        flat.append({k: v for k, v in f.items() if k not in ("algorithm.correction", "output_dir", *ignore)
                     and k.split(".")[0] not in _COSMETIC})
    return all(f == flat[0] for f in flat)


def findings(rows: dict[str, dict], series: dict[str, dict], *, n_eval: int) -> dict:
    """The claims of the issue, each decided from the numbers with a stated criterion.

    Returns ``{claim: {"holds": bool | None, "text": str, ...numbers}}``; ``holds`` is None when the
    modes needed to decide it were not run.
    """
    out: dict[str, dict] = {}
    thr = _reward_threshold(n_eval)
    d, s, nv = rows.get("dense"), rows.get("smd"), rows.get("naive")

    # 1. smd's replay gap at the dense floor, every step
    if s is not None and "mismatch/max_abs_logprob_diff" in series.get("smd", {}):
        gaps = series["smd"]["mismatch/max_abs_logprob_diff"]["values"]
        if d is not None and d["replay_gap_max"] is not None:
            floor = d["replay_gap_max"]
            tol = max(FLOOR_FACTOR * floor, REPLAY_TOL)
            crit = (f"<= max({FLOOR_FACTOR:g} x the dense run's largest gap {_fmt(floor)}, {REPLAY_TOL:g}) "
                    f"= {_fmt(tol)}")
        else:
            floor, tol = None, REPLAY_TOL
            crit = f"<= {REPLAY_TOL:g} (the project's fp32 replay tolerance; no dense run to measure the floor)"
        at = sum(g <= tol for g in gaps)
        holds = at == len(gaps)
        txt = (f"smd's replay gap is at the dense floor at {at} of {len(gaps)} steps (criterion: {crit}); "
               f"its largest gap is {_fmt(max(gaps))}")
        if s.get("dense_learner_gap_max") is not None:
            txt += (f", while the dense learner scoring the same compressed rollouts is off by up to "
                    f"{_fmt(s['dense_learner_gap_max'])} (the gap that smd removes)")
        if nv is not None and nv["replay_gap_max"] is not None:
            txt += f"; naive's gap reaches {_fmt(nv['replay_gap_max'])}"
        out["smd_gap_at_dense_floor"] = {"holds": holds, "steps_at_floor": at, "steps": len(gaps), "floor": floor,
                                         "tolerance": tol, "text": txt + "."}
    else:
        out["smd_gap_at_dense_floor"] = {"holds": None, "text": "smd was not run."}

    # 2. smd's rollout holds >= 2x less peak KV than dense
    if s is not None and d is not None and s["peak_kv_bytes"] and d["peak_kv_bytes"]:
        ratio = d["peak_kv_bytes"] / s["peak_kv_bytes"]
        out["smd_kv_2x_less"] = {
            "holds": ratio >= 2.0, "ratio_dense_over_smd": ratio,
            "text": (f"smd's rollout held at most {_bytes(s['peak_kv_bytes'])} of KV cache against dense's "
                     f"{_bytes(d['peak_kv_bytes'])}: {ratio:.2f}x less (criterion: >= 2x).")}
    else:
        out["smd_kv_2x_less"] = {"holds": None, "text": "needs both dense and smd."}

    # 3. smd and dense reach similar eval reward
    if s is not None and d is not None and s["eval_reward_dense_final"] is not None and d["eval_reward_dense_final"] is not None:
        diff = s["eval_reward_dense_final"] - d["eval_reward_dense_final"]
        diff_best = s["eval_reward_dense_best"] - d["eval_reward_dense_best"]
        diff_c = (s["eval_reward_compressed_final"] - d["eval_reward_compressed_final"]
                  if s["eval_reward_compressed_final"] is not None and d["eval_reward_compressed_final"] is not None else None)
        holds = abs(diff) <= thr
        out["smd_reward_similar_to_dense"] = {
            "holds": holds, "diff_final": diff, "diff_best": diff_best, "diff_compressed_final": diff_c,
            "threshold": thr,
            "text": (f"final eval reward (dense decoding): smd {_fmt(s['eval_reward_dense_final'])} vs dense "
                     f"{_fmt(d['eval_reward_dense_final'])} (difference {diff:+.3f}; best {diff_best:+.3f}); with compressed "
                     f"decoding smd {_fmt(s['eval_reward_compressed_final'])} vs dense "
                     f"{_fmt(d['eval_reward_compressed_final'])}. Criterion: |difference| <= {thr:.3f}, two standard "
                     f"errors of a difference of two means over {n_eval} eval prompts; "
                     + ("similar." if holds else "NOT similar."))}
    else:
        out["smd_reward_similar_to_dense"] = {"holds": None, "text": "needs both dense and smd with eval steps."}

    # 4. naive is worse or unstable
    ref = [r for r in (d, s) if r is not None and r["eval_reward_dense_final"] is not None]
    if nv is not None and nv["eval_reward_dense_final"] is not None and ref:
        best_ref = max(r["eval_reward_dense_final"] for r in ref)
        worse = nv["eval_reward_dense_final"] < best_ref - thr
        drop = nv["eval_reward_dense_best"] - nv["eval_reward_dense_final"]
        gv = [r["grad_norm_var"] for r in ref if r["grad_norm_var"] is not None]
        var_ratio = nv["grad_norm_var"] / max(gv) if gv and max(gv) > 0 and nv["grad_norm_var"] is not None else None
        unstable = drop > thr or (var_ratio is not None and var_ratio >= 2.0)
        out["naive_worse_or_unstable"] = {
            "holds": bool(worse or unstable), "worse": bool(worse), "unstable": bool(unstable),
            "best_to_final_drop": drop, "grad_norm_var_ratio": var_ratio,
            "text": (f"naive's final eval reward {_fmt(nv['eval_reward_dense_final'])} vs the better of dense/smd "
                     f"{_fmt(best_ref)} ({'worse' if worse else 'not measurably worse'} at threshold {thr:.3f}); "
                     f"it fell {drop:+.3f} from its best eval; its gradient-norm variance is "
                     f"{_fmt(var_ratio, '.2f')}x the larger of dense/smd "
                     f"({'unstable' if unstable else 'not unstable'} by the criteria: drop > {thr:.3f} or variance >= 2x).")}
    else:
        out["naive_worse_or_unstable"] = {"holds": None, "text": "needs naive and dense or smd with eval steps."}

    # 5. what the statistical corrections pay
    parts = []
    for m in ("tis", "sparse_rl"):
        r = rows.get(m)
        if r is None:
            continue
        p = f"{m}: gradient-norm variance {_fmt(r['grad_norm_var'])}"
        if s is not None and s["grad_norm_var"] and r["grad_norm_var"] is not None:
            p += f" ({r['grad_norm_var'] / s['grad_norm_var']:.2f}x smd's)"
        if m == "sparse_rl":
            p += f", {100 * r['rejected_fraction']:.1f}% of samples rejected"
        p += f", final eval reward {_fmt(r['eval_reward_dense_final'])}"
        parts.append(p)
    out["corrections_cost"] = {"holds": None, "text": ("; ".join(parts) + ".") if parts else "tis and sparse_rl were not run."}
    return out
