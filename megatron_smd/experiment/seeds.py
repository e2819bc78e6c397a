"""The numbers of a several-seed comparison (``OUT/seed<k>/<arm>/run.json``): per arm the mean and
95% t-interval over seeds of every table column, paired differences ``smd - naive`` and
``smd - dense`` per seed with their intervals, the budget sweep, and the findings, each decided
from those intervals with a stated criterion (:func:`summarize_seeds`)."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from .common import _bytes, _fmt, _now, arm_order, t975
from .stats import FLOOR_FACTOR, REPLAY_TOL, SERIES_KEYS, SPIKE_FACTOR, _run_environment, _series, _setup, summarize_mode

# Columns averaged over seeds (each gets a mean and a 95% interval).
METRICS = ("eval_reward_dense_final", "eval_reward_dense_best", "eval_reward_compressed_final",
           "eval_reward_compressed_best", "train_reward_mean", "replay_gap_max", "replay_gap_mean",
           "dense_learner_gap_max", "grad_norm_mean", "grad_norm_var", "grad_norm_median", "grad_norm_iqr",
           "grad_norm_spike_share", "grad_norm_logvar", "grad_norm_ppo_median", "grad_norm_distill_median",
           "grad_norm_spike_distill_over_ppo",
           "rejected_fraction", "peak_kv_bytes", "kv_ratio_vs_dense", "rollout_tokens_per_s", "wall_s",
           "step_time_s")
# Columns of the paired differences (smd - other, seed by seed).
PAIRED = ("eval_reward_dense_final", "eval_reward_dense_best", "eval_reward_compressed_final",
          "eval_reward_compressed_best", "grad_norm_var", "grad_norm_median", "grad_norm_spike_share",
          "grad_norm_logvar")
# "smd and dense reach similar reward": the paired difference's 95% interval lies within this margin.
REWARD_MARGIN = 0.1


def interval(xs: Sequence[float | None]) -> dict:
    """Mean and two-sided 95% Student-t interval over ``xs`` (None values dropped): ``{"mean", "lo",
    "hi", "n", "values"}``; ``lo``/``hi`` are None with fewer than two values."""
    v = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "values": []}
    m = sum(v) / len(v)
    if len(v) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "values": v}
    h = t975(len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
    return {"mean": m, "lo": m - h, "hi": m + h, "n": len(v), "values": v}


def fmt_ci(ci: dict | None, spec: str = ".3g") -> str:
    """``mean [lo, hi]`` (or just the mean with one seed)."""
    if not ci or ci.get("mean") is None:
        return "n/a"
    if ci.get("lo") is None:
        return _fmt(ci["mean"], spec)
    return f"{_fmt(ci['mean'], spec)} [{_fmt(ci['lo'], spec)}, {_fmt(ci['hi'], spec)}]"


def summarize_seeds(runs: dict[str, dict[int, dict]], arms: dict[str, dict]) -> dict:
    """``{arm: {seed_index: run.json}}`` and the manifest's arms -> the results dict.

    ``modes`` holds the mean over seeds of every column (so a one-seed comparison reads as before),
    ``intervals`` their 95% intervals, ``per_seed`` the per-seed rows, ``paired`` the paired
    differences, ``sweep`` the budget sweep, ``series`` seed 0's per-step series (the plots).
    """
    names = sorted((a for a in arms if a in runs), key=lambda a: arm_order(a, arms[a]))
    per_seed: dict[str, dict[int, dict]] = {
        a: {k: summarize_mode(arms[a]["mode"], r["history"], r.get("wall_s")) for k, r in sorted(runs[a].items())}
        for a in names}
    if "dense" in per_seed:  # KV ratio against the dense run of the same seed
        for a, rows in per_seed.items():
            for k, r in rows.items():
                d = per_seed["dense"].get(k)
                r["kv_ratio_vs_dense"] = (r["peak_kv_bytes"] / d["peak_kv_bytes"]
                                          if d and d["peak_kv_bytes"] and r["peak_kv_bytes"] else None)
    intervals = {a: {m: interval([r.get(m) for r in rows.values()]) for m in METRICS} for a, rows in per_seed.items()}
    modes = {a: {"mode": arms[a]["mode"], "arm": a, "seeds": len(per_seed[a]),
                 "steps": min(r["steps"] for r in per_seed[a].values()),
                 **{m: intervals[a][m]["mean"] for m in METRICS}} for a in names}
    series: dict[str, dict] = {}
    for a in names:
        k0 = min(runs[a])
        series[a] = {}
        for key in SERIES_KEYS:
            steps, vals = _series(runs[a][k0]["history"], key)
            if steps:
                series[a][key] = {"steps": steps, "values": vals}
    paired = {}
    ppo_naive = [a for a in names if arms[a].get("kind") == "ppo" and arms[a]["mode"] == "naive"]
    for other_arm, smd_arm in (("naive", "smd"), ("dense", "smd"), *[(a, a.replace("naive", "smd", 1)) for a in ppo_naive],
                               ("smd-nodistill", "smd"), ("naive", "smd-nodistill"),
                               *[(a.replace("naive", "smd-nodistill", 1), a.replace("naive", "smd", 1)) for a in ppo_naive]):
        if other_arm in per_seed and smd_arm in per_seed:
            common = sorted(set(per_seed[other_arm]) & set(per_seed[smd_arm]))
            paired[f"{smd_arm} - {other_arm}"] = {
                m: interval([_diff(per_seed[smd_arm][k].get(m), per_seed[other_arm][k].get(m)) for k in common])
                for m in PAIRED}
    first = runs[names[0]][min(runs[names[0]])]
    cfg = first["config"]
    all_runs = {f"{a}@{k}": r for a in names for k, r in runs[a].items() if arms[a].get("kind") == "main"}
    setup = _setup(cfg, all_runs or {names[0]: first}, ignore=("rollout.seed", "learner.seed"))
    setup["seeds"] = sorted({k for a in names for k in runs[a]})
    setup["arms"] = {a: {k: v for k, v in arms[a].items() if k != "overrides"} | {"overrides": arms[a]["overrides"]}
                     for a in names}
    sweep = _sweep(runs, arms, per_seed)
    res = {"generated_utc": _now(), "layout": "seeds", "setup": setup, "environment": _run_environment(
        {f"{a}@{k}": r for a in names for k, r in runs[a].items()}), "modes": modes, "intervals": intervals,
        "per_seed": {a: {str(k): r for k, r in rows.items()} for a, rows in per_seed.items()},
        "paired": paired, "sweep": sweep, "series": series}
    res["findings"] = findings_seeds(res, runs, n_eval=int(cfg["train"]["eval_prompts"]))
    return res


def _diff(a, b):
    return None if a is None or b is None else a - b


def _sweep(runs, arms, per_seed) -> dict | None:
    names = sorted((a for a in per_seed if arms[a].get("kind") == "sweep"), key=lambda a: arms[a]["fraction"])
    if not names:
        return None
    out = {"arms": names, "fractions": [arms[a]["fraction"] for a in names], "budgets": [arms[a]["budget"] for a in names],
           "length": arms[names[0]]["length"], "dense_learner_gap": [], "shadow_gap": [], "shadow_gap_all_steps": []}
    for a in names:
        out["dense_learner_gap"].append(interval([r["dense_learner_gap_max"] for r in per_seed[a].values()]))
        out["shadow_gap"].append(interval([r["replay_gap_max"] for r in per_seed[a].values()]))
        out["shadow_gap_all_steps"].append(max(v for r in runs[a].values()
                                               for v in _series(r["history"], "mismatch/max_abs_logprob_diff")[1]))
    return out


def findings_seeds(res: dict, runs: dict, *, n_eval: int) -> dict:
    """The claims, each decided from the seeds' intervals with a stated criterion. ``holds`` is None
    when the arms needed were not run (or, for a descriptive item, never)."""
    out: dict[str, dict] = {}
    iv, P, rows = res["intervals"], res["paired"], res["modes"]
    K = len(res["setup"]["seeds"])
    t = t975(K - 1) if K > 1 else None
    ivl = f"95% t-interval over {K} seeds (t = {t:.2f})" if t else "one seed: no interval"

    # 1. smd's replay gap at the dense floor: every step of every seed (main, ppo and sweep arms)
    dense_gaps = [v for r in runs.get("dense", {}).values() for v in _series(r["history"], "mismatch/max_abs_logprob_diff")[1]]
    floor = max(dense_gaps) if dense_gaps else None
    tol = max(FLOOR_FACTOR * floor, REPLAY_TOL) if floor is not None else REPLAY_TOL
    smd_arms = [a for a in rows if rows[a]["mode"] == "smd"]
    if smd_arms:
        gaps = [(a, v) for a in smd_arms for r in runs[a].values() for v in _series(r["history"], "mismatch/max_abs_logprob_diff")[1]]
        at = sum(v <= tol for _, v in gaps)
        dl = [rows[a]["dense_learner_gap_max"] for a in smd_arms if rows[a]["dense_learner_gap_max"] is not None]
        txt = (f"smd's replay gap is at the dense floor at {at} of {len(gaps)} steps over all its runs ({', '.join(smd_arms)}; "
               f"criterion: <= max({FLOOR_FACTOR:g} x the dense runs' largest gap {_fmt(floor)}, {REPLAY_TOL:g}) = {_fmt(tol)}); "
               f"its largest gap is {_fmt(max(v for _, v in gaps))}")
        if dl:
            txt += f", while the dense learner scoring the same compressed rollouts is off by up to {_fmt(max(dl))} (mean over seeds of the per-run maximum)"
        if "naive" in iv:
            txt += f"; naive's per-run maximum gap: {fmt_ci(iv['naive']['replay_gap_max'])}"
        out["smd_gap_at_dense_floor"] = {"holds": at == len(gaps), "steps_at_floor": at, "steps": len(gaps),
                                         "floor": floor, "tolerance": tol, "text": txt + "."}
    else:
        out["smd_gap_at_dense_floor"] = {"holds": None, "text": "smd was not run."}

    # 2. peak KV
    if "smd" in iv and "dense" in iv and iv["smd"]["kv_ratio_vs_dense"]["mean"]:
        r = iv["smd"]["kv_ratio_vs_dense"]
        worst = max(r["values"])
        out["smd_kv_2x_less"] = {"holds": worst <= 0.5, "ratio_dense_over_smd": 1.0 / worst,
                                 "text": (f"smd's rollout held {_bytes(rows['smd']['peak_kv_bytes'])} of KV cache at peak against dense's "
                                          f"{_bytes(rows['dense']['peak_kv_bytes'])} (means over seeds); smd/dense per seed "
                                          f"{', '.join(f'{x:.2f}' for x in r['values'])} (criterion: <= 0.5 in every seed, i.e. >= 2x less).")}
    else:
        out["smd_kv_2x_less"] = {"holds": None, "text": "needs both dense and smd."}

    # 3. smd vs dense reward (paired)
    pd = P.get("smd - dense")
    if pd and pd["eval_reward_dense_final"]["mean"] is not None:
        c = pd["eval_reward_dense_final"]
        holds = None if c["lo"] is None else (-REWARD_MARGIN <= c["lo"] and c["hi"] <= REWARD_MARGIN)
        zero = c["lo"] is not None and c["lo"] <= 0 <= c["hi"]
        out["smd_reward_similar_to_dense"] = {
            "holds": holds, "diff_final": c, "diff_best": pd["eval_reward_dense_best"], "margin": REWARD_MARGIN,
            "text": (f"paired difference smd - dense of the final eval reward (dense decoding): {fmt_ci(c)}; best: "
                     f"{fmt_ci(pd['eval_reward_dense_best'])}; compressed decoding final: {fmt_ci(pd['eval_reward_compressed_final'])} "
                     f"({ivl}). Criterion for 'similar': the interval lies within +-{REWARD_MARGIN:g}; "
                     + ("it does." if holds else ("it does NOT: the interval is wider than the margin, so "
                                                 f"{K} seeds cannot show similarity here" if zero else
                                                 "it does NOT: the rewards differ") + "."
                        if holds is False else "not decidable with one seed.")
                     + (" The interval contains 0 (no difference detected)." if zero else
                        " The interval excludes 0." if c["lo"] is not None else ""))}
    else:
        out["smd_reward_similar_to_dense"] = {"holds": None, "text": "needs both dense and smd with eval steps."}

    # 4. smd better than naive (paired), in the main and the off-policy arms, under each decoding:
    # compressed (the rollout's own cache: the policy the runs sample and are rewarded for) and dense
    st = _start_eval(runs)
    for dec, col in (("compressed", "eval_reward_compressed_final"), ("dense", "eval_reward_dense_final")):
        parts, verdicts = [], []
        for key, p in P.items():
            if not (key == "smd - naive" or (key.startswith("smd-ppo") and "naive" in key)):
                continue
            c = p[col]
            if c["mean"] is None:
                continue
            better = c["lo"] is not None and c["lo"] > 0
            verdicts.append(better)
            parts.append(f"{key}: {fmt_ci(c)}, " + ("smd better" if better else "no difference resolved"
                                                    if c["lo"] is not None and c["lo"] <= 0 <= c["hi"] else "smd worse"
                                                    if c["hi"] is not None and c["hi"] < 0 else "one seed"))
        holds = all(verdicts) if verdicts and K > 1 else None
        txt = (f"final eval reward with {dec} decoding, paired per seed: " + "; ".join(parts)
               + f" ({ivl}; criterion: the paired interval of smd - naive lies above 0 in every pair of arms).")
        if st is not None and dec == "compressed":
            txt += (f" At the shared starting weights greedy eval scores {st[0]:.3f} with a dense cache and {st[1]:.3f} "
                    f"with compressed decoding ({st[1] - st[0]:+.3f}): the room a policy adapted to its cache can win back.")
        abl = {k: P[k][col] for k in P if k.startswith("smd") and " - smd-nodistill" in k}
        if holds is False and abl:
            def verdict(c):
                return ("resolvably below 0: the term costs reward here" if c["hi"] is not None and c["hi"] < 0 else
                        "resolvably above 0" if c["lo"] is not None and c["lo"] > 0 else "not resolved")
            txt += (" The same arms without smd's distillation term, paired: " + "; ".join(
                f"{k}: {fmt_ci(c)} ({verdict(c)})" for k, c in abl.items()) + ".")
        out[f"smd_better_than_naive_{dec}"] = {"holds": holds, "text": txt} if parts else \
            {"holds": None, "text": "needs naive and smd."}

    # 4b. what smd's distillation term does to the rewards (the ablation arms, paired per seed)
    out["distill_term"] = _distill_finding(P, ivl, runs)

    # 5. gradient norm: where smd's variance comes from
    out["smd_grad_norm"] = _grad_finding(res, ivl, K)

    # 6. budget sweep
    sw = res.get("sweep")
    if sw:
        dl = [c["mean"] for c in sw["dense_learner_gap"]]
        grows = all(a > b for a, b in zip(dl, dl[1:]))  # fractions ascending -> gap descending
        sep = sw["dense_learner_gap"][0]["lo"] is not None and sw["dense_learner_gap"][-1]["hi"] is not None and \
            sw["dense_learner_gap"][0]["lo"] > sw["dense_learner_gap"][-1]["hi"]
        flat = all(g <= tol for g in sw["shadow_gap_all_steps"])
        pts = ", ".join(f"{round(100 * f)}% ({b} tokens): dense learner {fmt_ci(d)}, shadow {fmt_ci(s, '.2e')}"
                        for f, b, d, s in zip(sw["fractions"], sw["budgets"], sw["dense_learner_gap"], sw["shadow_gap"]))
        out["budget_sweep"] = {
            "holds": bool(grows and flat and (sep or K == 1)), "grows": grows, "separated": sep, "shadow_at_floor": flat,
            "text": (f"per-run maximum replay gap by budget (of a {sw['length']}-token prompt + completion): {pts}. "
                     f"Criteria: the dense learner's gap falls strictly as the budget grows (means: "
                     f"{'yes' if grows else 'NO'}), the smallest budget's interval lies above the largest's "
                     f"({'yes' if sep else 'NO' if K > 1 else 'n/a: one seed'}), and the shadow gap stays <= {_fmt(tol)} at every step of every run "
                     f"({'yes' if flat else 'NO'}).")}
    else:
        out["budget_sweep"] = {"holds": None, "text": "no budget sweep was run."}

    # 7. what tis and sparse_rl pay (descriptive)
    parts = []
    for m in ("tis", "sparse_rl"):
        if m in iv:
            p = (f"{m}: final eval reward {fmt_ci(iv[m]['eval_reward_dense_final'])}, gradient-norm variance "
                 f"{fmt_ci(iv[m]['grad_norm_var'])}")
            if m == "sparse_rl":
                p += f", rejected {fmt_ci({k: (100 * v if isinstance(v, float) else v) for k, v in iv[m]['rejected_fraction'].items()}, '.1f')}% of samples"
            parts.append(p)
    out["corrections_cost"] = {"holds": None, "text": ("; ".join(parts) + ".") if parts else "tis and sparse_rl were not run."}
    return out


def _dead_share(runs: dict, arm: str) -> list[float]:
    """Per seed: the share of ``arm``'s steps whose whole batch scored 0 (every group all wrong, so
    GRPO's advantages and the PPO term's gradient are 0: only the other loss terms move the weights)."""
    out = []
    for r in runs.get(arm, {}).values():
        rw = [float(h["reward/train"]) for h in r["history"] if int(h["step"]) > 0 and "reward/train" in h]
        if rw:
            out.append(sum(x == 0.0 for x in rw) / len(rw))
    return out


def _distill_finding(P: dict, ivl: str, runs: dict) -> dict:
    """Descriptive: smd with and without its distillation term (``smd-nodistill`` arms), paired per
    seed, under both decodings; and smd without the term against naive. Also, per smd arm, the share
    of steps with a batch reward of 0 (no RL signal left: a collapsed run)."""
    pairs = [k for k in P if "smd-nodistill" in k]
    if not pairs:
        return {"holds": None, "text": "no smd-nodistill arm was run (the config's smd does not distil, or smd was not run)."}
    parts = []
    for k in pairs:
        p = P[k]
        parts.append(f"{k}: dense decoding {fmt_ci(p['eval_reward_dense_final'])}, compressed decoding "
                     f"{fmt_ci(p['eval_reward_compressed_final'])}")
    dead = {a: _dead_share(runs, a) for a in runs if a.startswith("smd") and not a.startswith("sweep")}
    dead_s = "; ".join(f"{a} {', '.join(f'{100 * x:.0f}%' for x in v)}" for a, v in dead.items() if v)
    return {"holds": None, "text": "final eval rewards, paired per seed: " + "; ".join(parts) + f" ({ivl}). An "
            "interval below 0 in a 'smd - smd-nodistill' row is reward the distillation term (sampler into the dense "
            "view) costs; above 0, reward it adds. Share of training steps whose whole batch scored 0, per seed (no "
            "advantage, so the PPO term's gradient is 0 and only the distillation term, which fits the dense view to "
            f"the sampled answers whatever their reward, moves the weights): {dead_s}."}


def _start_eval(runs: dict) -> tuple[float, float] | None:
    """Greedy eval of the shared starting weights (the step-0 record), dense and compressed decoding,
    from the first main-matrix run that logged it with compression (``naive`` or ``smd``)."""
    for a in ("naive", "smd"):
        for r in runs.get(a, {}).values():
            for h in r["history"]:
                if int(h["step"]) == 0 and "reward/eval_dense" in h and "reward/eval_compressed" in h:
                    return float(h["reward/eval_dense"]), float(h["reward/eval_compressed"])
    return None


def _grad_finding(res: dict, ivl: str, K: int) -> dict:
    """Where smd's gradient-norm spread comes from. Descriptive (``holds`` None) unless the per-term
    norms were logged; then ``holds`` answers "the spread is inherent (the PPO term's), not an
    artefact of the distillation term": the distillation term's median norm (coefficient included)
    lies resolvably below the PPO term's, and at every spike step of every seed it is below the PPO
    term's."""
    iv, P = res["intervals"], res["paired"]
    if "smd" not in iv:
        return {"holds": None, "text": "smd was not run."}
    s = iv["smd"]
    txt = (f"smd's gradient norm: variance {fmt_ci(s['grad_norm_var'])}, median {fmt_ci(s['grad_norm_median'])}, "
           f"IQR {fmt_ci(s['grad_norm_iqr'])}, share of steps > {SPIKE_FACTOR:g}x the median {fmt_ci(s['grad_norm_spike_share'])}, "
           f"variance of log norm {fmt_ci(s['grad_norm_logvar'])}")
    pn = P.get("smd - naive")
    if pn:
        v, sp, lv = pn["grad_norm_var"], pn["grad_norm_spike_share"], pn["grad_norm_logvar"]
        txt += (f". Paired smd - naive: variance {fmt_ci(v)}, spike share {fmt_ci(sp)}, variance of log norm {fmt_ci(lv)} "
                f"({ivl})")
        if v["lo"] is not None:
            txt += ("; smd's variance is " + ("resolvably higher than" if v["lo"] > 0 else "resolvably lower than"
                                              if v["hi"] < 0 else "not resolvably different from") + " naive's")
            if lv["lo"] is not None:
                txt += (" and the variance of its log norm is " + ("resolvably higher" if lv["lo"] > 0 else "resolvably lower"
                                                                   if lv["hi"] < 0 else "not resolvably different"))
    holds = None
    ppo, dis = s["grad_norm_ppo_median"], s["grad_norm_distill_median"]
    if ppo["mean"] is not None and dis["mean"] is not None:
        sp = s["grad_norm_spike_distill_over_ppo"]
        if dis["hi"] is not None and ppo["lo"] is not None:
            holds = dis["hi"] < ppo["lo"] and (not sp["values"] or max(sp["values"]) < 1.0)
        txt += (f". Per term (norm of each term's gradient over the whole mini-batch, median over steps): PPO term "
                f"{fmt_ci(ppo)}, distillation term (coefficient included) {fmt_ci(dis)}"
                + (f"; at the spike steps the distillation term's norm is at most {fmt_ci(sp)} x the PPO term's "
                   f"({sp['n']} of {K} seeds had spike steps)" if sp["mean"] is not None else "; no spike steps")
                + "; "
                + ("the distillation term is resolvably the smaller part (and the smaller one at every spike step), so the spread is the PPO term's (inherent to "
                   "the policy-gradient update, which every mode has), not an artefact of the distillation term" if holds else
                   "the distillation term is NOT resolvably smaller than the PPO term (or not at every spike step): its "
                   "share of the spread cannot be ruled out" if holds is False else "one seed: not decided"))
    else:
        txt += ". Per-term norms were not logged in these runs (`learner.term_grad_norms`), so the source is not decided here"
    return {"holds": holds, "text": txt + "."}
