"""The comparison's four PNGs (:data:`~megatron_smd.experiment.common.PLOTS`), drawn from the results dict."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SMDError
from .common import MODES, _fmt

MODE_COLORS = {"dense": "black", "naive": "tab:red", "tis": "tab:orange", "sparse_rl": "tab:purple",
               "smd": "tab:blue"}
# Distinct markers and dashes: modes that coincide (dense and smd on the floor, the three dense-learner
# modes on one gap) stay visible on top of each other.
MODE_STYLE = {"dense": dict(marker="s", ls="-"), "naive": dict(marker="v", ls="-"), "tis": dict(marker="^", ls="--"),
              "sparse_rl": dict(marker="D", ls="-."), "smd": dict(marker="o", ls=":")}


def write_plots(results: dict, img_dir: str | os.PathLike) -> list[Path]:
    """Write the PNGs of :data:`PLOTS` (matplotlib, Agg backend) and return their paths; the budget
    sweep's only when the comparison has one. With several seeds the per-step curves are seed 0's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SMDError("the comparison plots need matplotlib: pip install matplotlib") from None
    img = Path(img_dir)
    img.mkdir(parents=True, exist_ok=True)
    S, rows = results["series"], results["modes"]
    modes = [m for m in MODES if m in rows]

    from matplotlib.ticker import MaxNLocator

    def line(ax, m, key, **kw):
        s = S[m].get(key)
        if s:
            ax.plot(s["steps"], s["values"], color=MODE_COLORS[m], **{**MODE_STYLE[m], "ms": 4, **kw})

    def steps_axis(*axes):
        for a in axes:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.grid(alpha=0.3)

    paths = []
    seed_note = " [seed 0]" if results.get("layout") == "seeds" and len(results["setup"].get("seeds", [])) > 1 else ""
    # reward curves: training reward per step (faint) and its trailing mean, greedy eval reward
    n_steps = max((len(S[m].get("reward/train", {}).get("steps", [])) for m in modes), default=0)
    win = max(1, n_steps // 10)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in modes:
        s = S[m].get("reward/train")
        if s:
            v = s["values"]
            smooth = [sum(v[max(0, i - win + 1): i + 1]) / len(v[max(0, i - win + 1): i + 1]) for i in range(len(v))]
            a1.plot(s["steps"], v, color=MODE_COLORS[m], alpha=0.25, lw=1)
            a1.plot(s["steps"], smooth, color=MODE_COLORS[m], ls=MODE_STYLE[m]["ls"], lw=1.8, label=m)
        line(a2, m, "reward/eval_dense", label=f"{m} (dense eval)", lw=1.5)
        line(a2, m, "reward/eval_compressed", label=f"{m} (compressed eval)", lw=0.8, alpha=0.6, mfc="none")
    a1.set(title="training reward (batch mean" + (f"; bold: trailing mean of {win} steps)" if win > 1 else ")"),
           xlabel="step", ylabel="reward")
    a2.set(title="greedy eval reward on held-out prompts (hollow: compressed decoding)", xlabel="step", ylabel="reward")
    for a in (a1, a2):
        a.set_ylim(-0.03, 1.03)
        a.title.set_fontsize(10)
    a1.legend(fontsize=8)
    a2.legend(fontsize=7, ncol=2)
    steps_axis(a1, a2)
    paths.append(_save(fig, img / "reward.png"))

    # replay gap per step, log scale
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for m in modes:
        s = S[m].get("mismatch/max_abs_logprob_diff")
        if s:
            ax.plot(s["steps"], [max(v, 1e-10) for v in s["values"]], color=MODE_COLORS[m], ms=4, label=m,
                    **MODE_STYLE[m])
    sd = S.get("smd", {}).get("mismatch_dense/max_abs_logprob_diff")
    if sd:
        ax.plot(sd["steps"], [max(v, 1e-10) for v in sd["values"]], color=MODE_COLORS["smd"], ls="--", marker="x",
                ms=4, alpha=0.6, label="smd rollouts, dense learner")
    tol = results["findings"]["smd_gap_at_dense_floor"].get("tolerance")
    if tol:
        ax.axhline(tol, color="gray", ls="--", lw=1, label="floor criterion")
    ax.set_yscale("log")
    ax.set(title="replay gap: max |log p_learner - log p_sampler| per step (values < 1e-10 drawn at 1e-10)",
           xlabel="step", ylabel="max |Δ log p|")
    ax.title.set_fontsize(9)
    steps_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, img / "replay_gap.png"))

    # gradient norm per step
    fig, ax = plt.subplots(figsize=(8, 4))
    for m in modes:
        var_s = "var, mean over seeds" if seed_note else "var"
        line(ax, m, "train/grad_norm", label=f"{m} ({var_s} {_fmt(rows[m]['grad_norm_var'], '.2g')})")
    for key, lab in (("train/grad_norm_ppo", "smd: PPO term"), ("train/grad_norm_distill", "smd: distillation term")):
        s = S.get("smd", {}).get(key)
        if s:
            ax.plot(s["steps"], s["values"], color=MODE_COLORS["smd"], lw=0.8, alpha=0.7,
                    ls="--" if key.endswith("ppo") else "-.", label=lab)
    ax.set(title="gradient norm (mean over the step's optimizer steps, before clipping)" + seed_note, xlabel="step",
           ylabel="‖g‖")
    steps_axis(ax)
    ax.legend(fontsize=8)
    paths.append(_save(fig, img / "grad_norm.png"))

    # rollout KV memory: peak per mode (bars) and per step (lines)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    peaks = [(rows[m]["peak_kv_bytes"] or 0) / 2**20 for m in modes]
    bars = a1.bar(modes, peaks, color=[MODE_COLORS[m] for m in modes])
    for b, m in zip(bars, modes):
        r = rows[m].get("kv_ratio_vs_dense")
        if r is not None:
            a1.annotate(f"{r:.2f}x dense", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
    a1.set(title="peak rollout KV cache (allocated)", ylabel="MiB")
    for m in modes:
        s = S[m].get("kv/peak_bytes")
        if s:
            a2.plot(s["steps"], [v / 2**20 for v in s["values"]], color=MODE_COLORS[m], label=m, ms=4, **MODE_STYLE[m])
    a2.set(title="peak rollout KV cache per step", xlabel="step", ylabel="MiB")
    a2.set_ylim(bottom=0)
    steps_axis(a2)
    a2.legend(fontsize=8)
    paths.append(_save(fig, img / "kv_memory.png"))

    sw = results.get("sweep")
    if sw:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [100 * f for f in sw["fractions"]]
        for key, lab, st in (("dense_learner_gap", "dense learner on the compressed rollouts (naive/tis/sparse_rl's gap)",
                              dict(color=MODE_COLORS["naive"], marker="v")),
                             ("shadow_gap", "smd's shadow learner", dict(color=MODE_COLORS["smd"], marker="o", ls=":"))):
            cis = sw[key]
            mean = [max(c["mean"], 1e-10) for c in cis]
            ax.plot(x, mean, label=lab + " (mean)", **st)
            for xi, c in zip(x, cis):  # every seed's value; the interval only where it stays above 0
                ax.scatter([xi] * len(c["values"]), [max(v, 1e-10) for v in c["values"]], s=12, alpha=0.5,
                           color=st["color"])
                if c["lo"] is not None and c["lo"] > 0:
                    ax.errorbar([xi], [c["mean"]], yerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]], capsize=4,
                                color=st["color"], lw=1)
        tol = results["findings"]["smd_gap_at_dense_floor"].get("tolerance")
        if tol:
            ax.axhline(tol, color="gray", ls="--", lw=1, label="floor criterion")
        ax.set_yscale("log")
        ax.set(title=f"replay gap vs KV budget ({sw['length']}-token sequences): max over a run's steps; dots: seeds,\n"
                     "line: their mean, bars: 95% interval (drawn where its lower end is > 0)",
               xlabel="budget, % of prompt + completion", ylabel="max |Δ log p|")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths.append(_save(fig, img / "budget_sweep.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
