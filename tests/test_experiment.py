"""`smd experiment compare` and `smd bench all`: outputs exist, numbers are those of the runs
(per seed, their intervals and paired differences), resume does no work, the per-term gradient norms
change nothing, and every benchmark figure carries its baseline.

Small sizes (as tests/test_train.py): 2 prompts x 2 samples, 4 new tokens, H2O at a 12-token budget
on ~45-token prompts, 2 steps, modes dense and smd on 2 seeds, an off-policy arm and a 2-point sweep.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest

from megatron_smd.cli import add_cli
from megatron_smd.errors import ConfigError
from megatron_smd.experiment import (FLOOR_FACTOR, PLOTS, REPLAY_TOL, compare, render_markdown, render_markdown_seeds,
                                     summarize)

pytestmark = pytest.mark.slow  # runs the comparison and every benchmark

REPO = Path(__file__).resolve().parent.parent
CFG = REPO / "configs" / "tiny-cpu.yaml"
TOL = 1e-5


def _over(model_dir, **extra):
    base = [f"model.path={model_dir}", "sft.enabled=false", "task.name=kv_recall", "task.num_pairs=6", "task.num_queries=1",
            "task.key_digits=2", "task.value_digits=1", "rollout.num_prompts=2", "rollout.group_size=2",
            "rollout.max_new_tokens=4", "rollout.policy.name=h2o", "rollout.policy.budget=12",
            "rollout.policy.window=4", "train.steps=2", "train.eval_every=1", "train.eval_prompts=2",
            "train.save_every=1", "learner.micro_batch_size=4", "logging.progress_bar=false",
            "logging.tensorboard=false"]
    return base + [f"{k}={v}" for k, v in extra.items()]


def _is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def _ckpt_state(mode_dir: Path) -> dict:
    ck = mode_dir / "checkpoints"
    return {p.name: p.stat().st_mtime_ns for p in sorted(ck.iterdir())}


def test_compare_writes_results_and_resumes_without_work(tmp_path, tiny_qwen2_dir):
    out, docs = tmp_path / "cmp", tmp_path / "docs"
    kw = dict(seeds=2, ppo=(2, 2), sweep=(0.5, 1.0), sweep_steps=1)
    res = compare(CFG, out, ["smd", "dense"], _over(tiny_qwen2_dir), docs=docs, **kw)
    arms = ["dense", "smd", "smd-ppo2x2", "smd-nodistill", "smd-nodistill-ppo2x2", "sweep-b100", "sweep-b50"]
    assert list(res["modes"]) == arms  # canonical order: dense (the floor) first, then smd, its variants
    assert res["status"] == {f"seed{k}/{a}": "ran" for k in (0, 1) for a in arms}
    for d in (out, docs):
        assert (d / "results.md").is_file()
        for name in PLOTS:
            assert _is_png(d / "img" / name), d / "img" / name
    assert json.loads((out / "results.json").read_text())["modes"] == res["modes"]
    assert (docs / "results.md").read_text() == (out / "results.md").read_text()

    # the per-seed rows are the runs' numbers; the table holds their mean and t-interval
    for a in ("dense", "smd"):
        for k in (0, 1):
            run = json.loads((out / f"seed{k}" / a / "run.json").read_text())
            assert run["config"]["rollout"]["seed"] == k and run["config"]["learner"]["seed"] == 1234 + k
            hist = run["history"]
            row = res["per_seed"][a][str(k)]
            trained = [r for r in hist if r["step"] >= 1]
            assert [r["step"] for r in trained] == [1, 2] and row["steps"] == 2
            gaps = [r["mismatch/max_abs_logprob_diff"] for r in trained]
            gn = [r["train/grad_norm"] for r in trained]
            assert row["replay_gap_max"] == max(gaps) and math.isclose(row["replay_gap_mean"], sum(gaps) / 2)
            assert math.isclose(row["grad_norm_var"], statistics.pvariance(gn), rel_tol=1e-12, abs_tol=1e-15)
            assert row["grad_norm_median"] == statistics.median(gn)
            assert row["eval_reward_dense_final"] == hist[-1]["reward/eval_dense"]
            assert row["replay_gap_max"] <= TOL  # dense: the fp32 floor; smd: on it
        iv = res["intervals"][a]["replay_gap_max"]
        vals = [res["per_seed"][a][str(k)]["replay_gap_max"] for k in (0, 1)]
        m, h = sum(vals) / 2, 12.706 * statistics.stdev(vals) / math.sqrt(2)
        assert iv["mean"] == pytest.approx(m) and iv["lo"] == pytest.approx(m - h) and iv["hi"] == pytest.approx(m + h)
        assert res["modes"][a]["replay_gap_max"] == pytest.approx(m)
    # the two seeds sampled different completions on the same eval prompts
    h0, h1 = (json.loads((out / f"seed{k}" / "smd" / "run.json").read_text())["history"] for k in (0, 1))
    assert [r["reward/eval_dense"] for r in h0 if r["step"] == 0] == [r["reward/eval_dense"] for r in h1 if r["step"] == 0]
    assert [r["mismatch_dense/max_abs_logprob_diff"] for r in h0 if r["step"] >= 1] != \
        [r["mismatch_dense/max_abs_logprob_diff"] for r in h1 if r["step"] >= 1]
    pd = res["paired"]["smd - dense"]["eval_reward_dense_final"]
    assert pd["values"] == [res["per_seed"]["smd"][str(k)]["eval_reward_dense_final"]
                            - res["per_seed"]["dense"][str(k)]["eval_reward_dense_final"] for k in (0, 1)]
    # the off-policy arm really ran 2 epochs x 2 mini-batches; the sweep arms their budgets
    cfg = json.loads((out / "seed0" / "smd-ppo2x2" / "run.json").read_text())["config"]
    assert (cfg["algorithm"]["epochs"], cfg["algorithm"]["minibatches"]) == (2, 2)
    sw = res["sweep"]
    assert sw["fractions"] == [0.5, 1.0] and sw["budgets"][1] == sw["length"] and sw["budgets"][0] < sw["length"]
    assert sw["dense_learner_gap"][0]["mean"] > 100 * TOL >= sw["dense_learner_gap"][1]["mean"]  # evicting vs not
    assert all(g <= TOL for g in sw["shadow_gap_all_steps"])
    d, s = res["modes"]["dense"], res["modes"]["smd"]
    assert s["peak_kv_bytes"] < d["peak_kv_bytes"]  # the 12-token budget really evicted
    assert s["dense_learner_gap_max"] > 100 * TOL  # the gap smd removes is there
    fl = res["findings"]["smd_gap_at_dense_floor"]
    assert fl["holds"] is True and fl["steps_at_floor"] == 2 * (2 + 2 + 2 + 2 + 1 + 1)  # smd, smd-ppo2x2, both without distillation, 2 sweep runs
    md = (out / "results.md").read_text()
    assert "| `dense` |" in md and "| `smd-ppo2x2` |" in md and "](img/budget_sweep.png)" in md
    assert "## What holds" in md and "smd - dense" in md

    # smd's per-term gradient norms: logged in its main and off-policy arms (not the sweep), and they
    # change nothing: the same run without them has the same gradient norms, bit for bit
    for a, want in (("smd", True), ("smd-ppo2x2", True), ("sweep-b50", False), ("dense", False)):
        h = json.loads((out / "seed0" / a / "run.json").read_text())["history"]
        assert all(("train/grad_norm_ppo" in r and "train/grad_norm_distill" in r) == want for r in h if r["step"] >= 1), a
    assert res["modes"]["smd"]["grad_norm_distill_median"] > 0 and res["modes"]["smd"]["grad_norm_ppo_median"] is not None
    plain = compare(CFG, tmp_path / "plain", ["smd"], _over(tiny_qwen2_dir), seeds=1, ppo=None, sweep=(), term_grads=False,
                    ablation=False)
    hp = json.loads((tmp_path / "plain" / "seed0" / "smd" / "run.json").read_text())["history"]
    assert all("train/grad_norm_ppo" not in r for r in hp) and list(plain["modes"]) == ["smd"]
    assert [r.get("train/grad_norm") for r in hp] == [r.get("train/grad_norm") for r in h0]

    # a finished comparison: nothing trains, nothing is rewritten
    runs = {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/run.json")}
    ck = {p.parent.name + p.parent.parent.name: _ckpt_state(p.parent) for p in runs}
    again = compare(CFG, out, ["dense", "smd"], _over(tiny_qwen2_dir), **kw)
    assert set(again["status"].values()) == {"cached"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed*/*/run.json")} == runs
    assert {p.parent.name + p.parent.parent.name: _ckpt_state(p.parent) for p in runs} == ck
    assert again["modes"]["smd"]["replay_gap_max"] == s["replay_gap_max"]
    # an invocation for a subset still reports every finished arm of the comparison
    only = compare(CFG, out, ["dense"], _over(tiny_qwen2_dir), **kw)
    assert set(only["status"]) == {"seed0/dense", "seed1/dense"} and list(only["modes"]) == arms

    # a run killed after its last checkpoint but before run.json: it resumes and redoes no step
    f = out / "seed1" / "smd" / "run.json"
    old = json.loads(f.read_text())["history"]
    f.unlink()
    res3 = compare(CFG, out, ["dense", "smd"], _over(tiny_qwen2_dir), **kw)
    assert res3["status"]["seed1/smd"] == "resumed" and res3["status"]["seed0/smd"] == "cached"
    assert json.loads(f.read_text())["history"] == old
    assert len(json.loads((out / "seed1" / "smd" / "wall.json").read_text())["sessions"]) == 2

    # a different config under the same directory is refused, naming the key
    with pytest.raises(ConfigError, match=r"train\.steps \(2 -> 3\)"):
        compare(CFG, out, ["dense", "smd"], _over(tiny_qwen2_dir, **{"train.steps": 3}), **kw)


def test_bad_modes_and_reserved_overrides(tmp_path, tiny_qwen2_dir):
    with pytest.raises(ConfigError, match="bogus"):
        compare(CFG, tmp_path, ["dense", "bogus"], _over(tiny_qwen2_dir))
    with pytest.raises(ConfigError, match="algorithm.correction"):
        compare(CFG, tmp_path, ["dense"], _over(tiny_qwen2_dir, **{"algorithm.correction": "smd"}))
    with pytest.raises(ConfigError, match="rollout.seed"):
        compare(CFG, tmp_path, ["dense"], _over(tiny_qwen2_dir, **{"rollout.seed": 3}))
    with pytest.raises(ConfigError, match="twice"):
        compare(CFG, tmp_path, "smd,smd", _over(tiny_qwen2_dir))
    assert not any(tmp_path.iterdir())


def test_cli_wiring():
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["experiment", "compare", "--config", "c.yaml", "--modes", "dense,smd", "--out", "o",
                      "train.steps=3", "rollout.policy.budget=32"])
    assert (a.config, a.modes, a.out, a.overrides) == ("c.yaml", "dense,smd", "o", ["train.steps=3", "rollout.policy.budget=32"])
    assert (a.seeds, a.ppo, a.sweep, a.sweep_steps) == (3, "4x2", "25,50,100", 10)
    assert callable(a.fn)
    from megatron_smd.cli import _ppo_arg, _sweep_arg

    assert _ppo_arg("4x2") == (4, 2) and _ppo_arg("none") is None
    assert _sweep_arg("25,50,100") == (0.25, 0.5, 1.0) and _sweep_arg("none") == ()
    for bad in ("4", "0x2"):
        with pytest.raises(ConfigError):
            _ppo_arg(bad)
    with pytest.raises(ConfigError):
        _sweep_arg("0,50")


def _hist(steps, gap, gn, kv, ed, ec, gap_dense=None, rej=None):
    out = []
    for i in range(steps):
        r = {"step": i + 1, "mismatch/max_abs_logprob_diff": gap[i], "train/grad_norm": gn[i], "kv/peak_bytes": kv,
             "reward/train": 0.5, "perf/rollout_tokens_per_s": 100.0, "reward/eval_dense": ed[i],
             "reward/eval_compressed": ec[i]}
        if gap_dense:
            r["mismatch_dense/max_abs_logprob_diff"] = gap_dense[i]
        if rej:
            r["correction/rejection_rate"] = rej[i]
        out.append(r)
    return out


def _runs(n_eval=16):
    cfg = {"model": {"path": "m"}, "task": {"name": "kv_recall"}, "train": {"eval_prompts": n_eval, "steps": 3, "eval_every": 1},
           "rollout": {"policy": {"name": "h2o", "budget": 64, "window": 16, "granularity": "layer"}, "num_prompts": 4,
                       "group_size": 4, "max_new_tokens": 16, "temperature": 1.0, "seed": 0},
           "learner": {"lr": 1e-4, "grad_clip": 1.0, "seed": 1, "attention_backend": "sdpa"},
           "algorithm": {"correction": "x"}, "sft": {"enabled": True, "out": "s"}}
    mk = lambda m, h: {"config": {**cfg, "algorithm": {"correction": m}}, "history": h, "wall_s": 10.0}
    return {
        "dense": mk("dense", _hist(3, [1e-6, 2e-6, 1.5e-6], [1.0, 1.0, 1.0], 4000, [0.5, 0.6, 0.7], [0.4, 0.4, 0.5])),
        "smd": mk("smd", _hist(3, [3e-6, 1e-6, 19e-6], [1.0, 2.0, 3.0], 1000, [0.5, 0.6, 0.6], [0.5, 0.6, 0.6],
                               gap_dense=[0.3, 0.4, 0.5])),
        "naive": mk("naive", _hist(3, [0.3, 0.5, 0.4], [1.0, 5.0, 9.0], 1000, [0.5, 0.5, 0.1], [0.4, 0.4, 0.1])),
        "sparse_rl": mk("sparse_rl", _hist(3, [0.3, 0.5, 0.4], [1.0, 1.0, 1.0], 1000, [0.5, 0.5, 0.5], [0.4, 0.4, 0.4],
                                           rej=[0.25, 0.5, 0.0])),
    }


def test_findings_from_hand_computed_numbers():
    res = summarize(_runs(n_eval=16))
    f, rows = res["findings"], res["modes"]
    # floor: dense max 2e-6 -> tolerance max(10 * 2e-6, 1e-5) = 2e-5; smd's 3 gaps are all below it
    assert f["smd_gap_at_dense_floor"]["tolerance"] == pytest.approx(2e-5)
    assert f["smd_gap_at_dense_floor"]["steps_at_floor"] == 3 and f["smd_gap_at_dense_floor"]["holds"]
    assert f["smd_kv_2x_less"]["ratio_dense_over_smd"] == 4.0 and f["smd_kv_2x_less"]["holds"]
    # reward: threshold 2 * sqrt(0.5 / 16) = 0.35355; smd 0.6 vs dense 0.7 -> similar
    sim = f["smd_reward_similar_to_dense"]
    assert sim["threshold"] == pytest.approx(0.353553, abs=1e-6) and sim["diff_final"] == pytest.approx(-0.1)
    assert sim["holds"]
    # naive: final 0.1 < 0.7 - 0.354 -> worse; var(1, 5, 9) = 32/3 vs smd's var(1, 2, 3) = 2/3 -> 16x
    nv = f["naive_worse_or_unstable"]
    assert nv["worse"] and nv["unstable"] and nv["grad_norm_var_ratio"] == pytest.approx(16.0)
    assert rows["sparse_rl"]["rejected_fraction"] == pytest.approx(0.25)
    assert rows["smd"]["dense_learner_gap_max"] == 0.5 and rows["naive"]["rejected_fraction"] == 0.0
    # one smd step off the floor flips the verdict
    runs = _runs(n_eval=16)
    runs["smd"]["history"][1]["mismatch/max_abs_logprob_diff"] = 1e-3
    f2 = summarize(runs)["findings"]["smd_gap_at_dense_floor"]
    assert f2["steps_at_floor"] == 2 and f2["holds"] is False
    md = render_markdown(res)
    assert "(does NOT hold)" not in md and md.count("(holds)") == 4 and "25.0%" in md


def test_seed_intervals_paired_differences_and_findings_by_hand():
    from megatron_smd.experiment import interval, summarize_seeds

    iv = interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303 -> half-width 4.303 / sqrt(3)
    assert iv["mean"] == 2.0 and iv["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3)) and iv["n"] == 3
    assert interval([5.0])["lo"] is None and interval([None])["mean"] is None
    base = _runs(n_eval=16)
    runs = {}
    for a in ("dense", "naive", "smd"):
        runs[a] = {}
        for k, shift in enumerate((0.0, 0.1, 0.2)):
            r = json.loads(json.dumps(base[a]))
            for rec in r["history"]:
                rec["reward/eval_dense"] += shift if a == "smd" else 0.0
            runs[a][k] = r
    arms = {a: {"mode": a, "kind": "main", "overrides": []} for a in runs}
    res = summarize_seeds(runs, arms)
    assert res["setup"]["seeds"] == [0, 1, 2] and list(res["modes"]) == ["dense", "naive", "smd"]
    # smd - naive, final eval: smd 0.6 + (0, .1, .2) vs naive 0.1 -> 0.5, 0.6, 0.7: mean 0.6, above 0
    p = res["paired"]["smd - naive"]["eval_reward_dense_final"]
    assert p["values"] == pytest.approx([0.5, 0.6, 0.7]) and p["mean"] == pytest.approx(0.6)
    assert p["lo"] == pytest.approx(0.6 - 4.303 * 0.1 / math.sqrt(3))
    f = res["findings"]
    # compressed decoding: smd 0.6 vs naive 0.1 in every seed -> 0.5 [0.5, 0.5]: above 0 too
    assert f["smd_better_than_naive_dense"]["holds"] is True and f["smd_better_than_naive_compressed"]["holds"] is True
    assert res["paired"]["smd - naive"]["eval_reward_compressed_final"]["values"] == pytest.approx([0.5] * 3)
    assert f["distill_term"]["holds"] is None and "no smd-nodistill arm" in f["distill_term"]["text"]
    # smd - dense: -0.1 + (0, .1, .2) = -0.1, 0, 0.1: the interval [-0.25, 0.25] is not within +-0.1
    sim = f["smd_reward_similar_to_dense"]
    assert sim["diff_final"]["mean"] == pytest.approx(0.0) and sim["holds"] is False
    assert f["smd_gap_at_dense_floor"]["holds"] is True and f["smd_gap_at_dense_floor"]["steps"] == 9
    assert f["budget_sweep"]["holds"] is None and f["smd_grad_norm"]["holds"] is None
    # robust grad-norm statistics of smd's (1, 2, 3): median 2, no step above 3x the median
    assert res["modes"]["smd"]["grad_norm_median"] == 2.0 and res["modes"]["smd"]["grad_norm_spike_share"] == 0.0
    md = render_markdown_seeds(res)
    assert "## What holds" in md and "## What does not hold" in md and "`smd - naive`" in md
    # the ablation: smd without its distillation term, 0.2 better with dense decoding in every seed
    runs["smd-nodistill"] = {k: json.loads(json.dumps(r)) for k, r in runs["smd"].items()}
    for r in runs["smd-nodistill"].values():
        for rec in r["history"]:
            rec["reward/eval_dense"] += 0.2
    arms["smd-nodistill"] = {"mode": "smd", "kind": "ablation", "overrides": ["algorithm.distill.coef=0"]}
    res = summarize_seeds(runs, arms)
    d = res["paired"]["smd - smd-nodistill"]["eval_reward_dense_final"]
    assert d["values"] == pytest.approx([-0.2] * 3) and "smd - smd-nodistill: dense decoding -0.2" in \
        res["findings"]["distill_term"]["text"]
    assert list(res["modes"]) == ["dense", "naive", "smd", "smd-nodistill"]


def test_bench_all_quick_every_figure_has_its_baseline():
    from megatron_smd.bench.all import bench_all

    rep = bench_all(quick=True, threads=1)
    sections = {f["section"] for f in rep["figures"]}
    assert {"rollout", "attention", "mask_bytes"} <= sections
    for f in rep["figures"]:
        assert isinstance(f["ratio"], float) and math.isfinite(f["ratio"]) and f["ratio"] > 0, f
        assert f["baseline"], f
        if "value" in f:  # own figures: value / baseline_value measured in this run
            assert f["baseline_value"] > 0 and f["ratio"] == pytest.approx(f["value"] / f["baseline_value"]), f
        else:  # taken from bench_sync: the numbers it reported beside its ratio travel with it
            assert f["section"] == "sync" and f["context"], f
    backends = {f["backend"] for f in rep["figures"] if f["section"] == "attention"}
    assert "sdpa" in backends
    if "sync" not in sections:
        assert rep["missing"]["sync"], "weight sync neither measured nor reported missing"
    assert rep["problems"] == [] and rep["seconds"]["total"] > 0
    assert json.loads(json.dumps(rep)) == rep  # JSON-able as printed by `smd bench all --json`
    kv = {f["name"]: f["ratio"] for f in rep["figures"] if f["name"].startswith("peak_kv_bytes")}
    assert kv["peak_kv_bytes[streaming]"] < 1.0  # decode-time eviction holds less than the dense cache
    print(f"\nbench all --quick: {rep['seconds']['total']:.1f} s; KV ratios vs none {kv}")
