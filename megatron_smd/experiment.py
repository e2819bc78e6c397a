"""``smd experiment``: the paper's comparison of correction modes, reproduced by one command.

Run it (CPU, the embedded default; each mode is one ``smd train`` run)::

    smd experiment compare --config configs/tiny-cpu.yaml --out runs/compare --docs docs
    smd experiment compare --config configs/tiny-cpu.yaml --modes dense,smd train.steps=10
    smd experiment report  --out runs/compare --docs docs          # re-render tables and plots only
    python -m megatron_smd.experiment golden --out tests/golden/replay_gap_tiny.json

``compare`` trains the five correction modes (``dense``, ``naive``, ``tis``, ``sparse_rl``, ``smd``)
one after another from the same resolved config -- same seeds, data, SFT warm start, eviction
policy and step budget; only ``algorithm.correction`` differs (and ``dense`` turns the rollout's
compression off, which is what the mode means). Mode ``m`` writes its run under ``OUT/m`` (the
trainer's checkpoints, TensorBoard logs and ``config.yaml``) and, when it has finished,
``OUT/m/run.json`` (resolved config, per-step history, wall time). Re-running the same command
therefore resumes the comparison: a mode with ``run.json`` is not touched, an interrupted mode
continues from its newest checkpoint (``--resume auto``), a mode never started starts. Changing
the config under an existing ``OUT`` is refused (the modes would no longer share one setup).

Then it writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/img/*.png`` (reward curves,
replay gap per step on a log scale, gradient norm, rollout KV memory); with ``--docs DIR`` also
``DIR/results.md`` and ``DIR/img/*.png``. Every number on those pages is computed from the runs'
histories by :func:`summarize`; nothing is typed by hand.

``golden`` regenerates the checked-in replay-gap golden file (see :func:`golden_replay_gaps` and
``tests/test_golden.py``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from .errors import ConfigError, FormatError, SMDError

MODES: tuple[str, ...] = ("dense", "naive", "tis", "sparse_rl", "smd")
RUN_FILE = "run.json"          # OUT/<mode>/run.json: written once the mode has finished
WALL_FILE = "wall.json"        # OUT/<mode>/wall.json: wall-clock seconds of every session that ran it
MANIFEST = "compare.json"      # OUT/compare.json: config path, overrides, modes of the comparison
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
IMG = "img"
PLOTS = ("reward.png", "replay_gap.png", "grad_norm.png", "kv_memory.png")
# Sections of the resolved config that do not change what a run computes (progress bar, images in
# TensorBoard): they may differ between the sessions of one comparison.
_COSMETIC = ("logging",)
# The project's stated fp32 replay tolerance (tests/test_train.py, tests/test_engine_replay.py):
# the floor criterion when no dense run is available to measure the floor.
REPLAY_TOL = 1e-5
# SMD "sits at the dense floor" at a step when its gap is at most this multiple of the largest gap
# the dense mode measured over its run (and never below REPLAY_TOL): both are fp32 summation-order
# noise of the same two code paths (cached decode vs parallel learner forward) and wander within an
# order of magnitude from batch to batch, while an off-policy gap is 3-5 orders above it.
FLOOR_FACTOR = 10.0
MODE_COLORS = {"dense": "black", "naive": "tab:red", "tis": "tab:orange", "sparse_rl": "tab:purple",
               "smd": "tab:blue"}
# Distinct markers and dashes: modes that coincide (dense and smd on the floor, the three dense-learner
# modes on one gap) stay visible on top of each other.
MODE_STYLE = {"dense": dict(marker="s", ls="-"), "naive": dict(marker="v", ls="-"), "tis": dict(marker="^", ls="--"),
              "sparse_rl": dict(marker="D", ls="-."), "smd": dict(marker="o", ls=":")}


# ============================================================================================ compare
def compare(cfg_path: str | os.PathLike, out: str | os.PathLike | None = None, modes: Sequence[str] | None = None,
            overrides: Sequence[str] | None = None, *, docs: str | os.PathLike | None = None) -> dict:
    """Run (or resume) every requested mode, then write ``results.{json,md}`` and the plots.

    Args:
        cfg_path: experiment YAML (e.g. ``configs/tiny-cpu.yaml``).
        out: comparison directory (default ``<output_dir>/compare`` of the resolved config).
        modes: subset of :data:`MODES` (default all five, run in that order: ``dense`` first, it is
            the numeric-floor reference).
        overrides: ``key=value`` config overrides applied to every mode. ``algorithm.correction``
            and ``output_dir`` are set per mode by this function and may not be overridden.
        docs: if given, also write ``docs/results.md`` and ``docs/img/*.png``.
    Returns:
        the results dict written to ``results.json`` (``modes``, ``findings``, ``setup``, ...), with
        ``status[mode]`` in ``{"cached", "resumed", "ran"}``. On non-zero ranks of a multi-process
        run: ``{}`` (rank 0 writes everything).
    """
    from .config import load_config
    from .trainer import train

    overrides = list(overrides or [])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("algorithm.correction", "output_dir"):
            raise ConfigError(f"command line: {key} is set per mode by `smd experiment compare` and cannot be overridden")
    modes = _check_modes(modes)
    base = load_config(cfg_path, overrides)
    out_dir = Path(out) if out is not None else Path(base.output_dir) / "compare"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfgs = {m: load_config(cfg_path, [*overrides, f"algorithm.correction={m}", f"output_dir={out_dir / m}"])
            for m in modes}
    # Every mode already under out_dir (requested now or not) must share this config.
    for m in MODES:
        if (out_dir / m).is_dir():
            _check_same_config(cfgs[modes[0]], out_dir / m)
    # Decide everything from the state on disk before any rank trains, so all ranks agree.
    status: dict[str, str] = {}
    for m in modes:
        if (out_dir / m / RUN_FILE).is_file():
            status[m] = "cached"
        elif _has_checkpoint(out_dir / m):
            status[m] = "resumed"
        else:
            status[m] = "ran"
    # The comparison's modes: those of earlier invocations on this directory plus these (one may run
    # the modes in separate invocations; the report covers all of them).
    prev = json.loads((out_dir / MANIFEST).read_text())["modes"] if (out_dir / MANIFEST).is_file() else []
    all_modes = [m for m in MODES if m in prev or m in modes]
    if rank0:
        _write_json(out_dir / MANIFEST, {"config": str(cfg_path), "overrides": overrides, "modes": all_modes})
    todo = [m for m in modes if status[m] != "cached"]
    warm = _warm_start(cfgs[todo[0]]) if todo else None
    for m in modes:
        if status[m] == "cached":
            if rank0:
                print(f"[smd] {m}: finished earlier ({out_dir / m / RUN_FILE}), skipped", flush=True)
            continue
        if rank0:
            print(f"[smd] {m}: {'resuming' if status[m] == 'resumed' else 'training'} -> {out_dir / m}", flush=True)
        t0 = time.perf_counter()
        try:
            res = train(cfgs[m], resume="auto")
        finally:
            if rank0:
                _add_wall(out_dir / m, time.perf_counter() - t0, status[m])
        if rank0:
            _write_json(out_dir / m / RUN_FILE, {
                "mode": m, "config": cfgs[m].model_dump(mode="json"), "history": res["history"],
                "wall_s": _wall(out_dir / m), "finished_utc": _now(), "environment": _environment()})
    if not rank0:
        return {}
    results = report(out_dir, docs=docs, modes=[m for m in all_modes if m in modes or (out_dir / m / RUN_FILE).is_file()])
    results["status"] = status
    if warm is not None:
        results["warm_start"] = warm
    results["out"] = str(out_dir)
    _write_json(out_dir / RESULTS_JSON, results)
    return results


def report(out: str | os.PathLike, *, docs: str | os.PathLike | None = None,
           modes: Sequence[str] | None = None) -> dict:
    """Re-render ``results.{json,md}`` and the plots from the finished runs under ``out``.

    ``modes`` defaults to those in ``out/compare.json`` (or every mode with a ``run.json``).
    """
    out = Path(out)
    if modes is None:
        man = out / MANIFEST
        modes = json.loads(man.read_text())["modes"] if man.is_file() else [m for m in MODES if (out / m / RUN_FILE).is_file()]
    runs = {}
    for m in modes:
        f = out / m / RUN_FILE
        if not f.is_file():
            raise FormatError(f"{f}: missing; mode {m!r} has not finished (run `smd experiment compare` again to resume it)")
        try:
            runs[m] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise FormatError(f"{f}: not valid JSON ({e})") from None
    if not runs:
        raise FormatError(f"{out}: no finished mode (no */{RUN_FILE}); run `smd experiment compare` first")
    results = summarize(runs)
    prev = out / RESULTS_JSON
    if prev.is_file():  # keep what only `compare` knows (status of the last session, warm start)
        old = json.loads(prev.read_text())
        for k in ("status", "warm_start"):
            if k in old:
                results[k] = old[k]
    write_plots(results, out / IMG)
    (out / RESULTS_MD).write_text(render_markdown(results, img_rel=IMG))
    _write_json(out / RESULTS_JSON, results)
    if docs is not None:
        d = Path(docs)
        (d / IMG).mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            shutil.copyfile(out / IMG / name, d / IMG / name)
        (d / RESULTS_MD).write_text(render_markdown(results, img_rel=IMG))
    return results


def _check_modes(modes: Sequence[str] | str | None) -> list[str]:
    if modes is None:
        return list(MODES)
    if isinstance(modes, str):
        modes = [m for m in modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"command line: --modes {','.join(modes)!s}: unknown {bad} (choose from {','.join(MODES)})"
                          if bad else "command line: --modes is empty")
    if len(set(modes)) != len(modes):
        raise ConfigError(f"command line: --modes {','.join(modes)}: a mode is listed twice")
    return [m for m in MODES if m in modes]  # canonical order: dense first


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _check_same_config(cfg, mode_dir: Path) -> None:
    """Refuse to mix runs of different configs under one comparison directory (the mode's own
    ``algorithm.correction`` and ``output_dir`` aside)."""
    prev = None
    if (mode_dir / RUN_FILE).is_file():
        prev = json.loads((mode_dir / RUN_FILE).read_text()).get("config")
    elif (mode_dir / "config.yaml").is_file():  # written by the trainer when the run started
        prev = yaml.safe_load((mode_dir / "config.yaml").read_text())
    if prev is None:
        return
    def keep(k: str) -> bool:
        return k.split(".")[0] not in _COSMETIC and k not in ("algorithm.correction", "output_dir")

    now = {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if keep(k)}
    old = {k: v for k, v in _flatten(prev).items() if keep(k)}
    diff = sorted(k for k in set(now) | set(old) if now.get(k, "<unset>") != old.get(k, "<unset>"))
    if diff:
        shown = ", ".join(f"{k} ({old.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r})" for k in diff[:5])
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        raise ConfigError(f"{mode_dir}: holds a run with a different config: {shown}{more}. All modes of a comparison "
                          f"share one config; choose another --out (or delete {mode_dir}) to start over")


def _has_checkpoint(mode_dir: Path) -> bool:
    from .checkpoint import complete_checkpoints

    return bool(complete_checkpoints(mode_dir / "checkpoints"))


def _warm_start(cfg) -> dict:
    """Train (or find) the SFT warm start once, before the modes, so no mode's wall time includes it
    and every mode starts from the same weights (``sft.out`` is shared by construction)."""
    if not cfg.sft.enabled:
        return {"enabled": False}
    if (Path(cfg.sft.out) / "config.json").is_file():
        return {"enabled": True, "path": cfg.sft.out, "trained_now": False}
    from .model.hf import read_arch
    from .sft import ensure_sft
    from .trainer import ensure_model_once, init_layout

    t0 = time.perf_counter()
    model_dir = ensure_model_once(cfg)
    layout = init_layout(cfg, read_arch(model_dir))
    try:
        ensure_sft(cfg, layout, Path(model_dir))
    finally:
        layout.destroy()
    return {"enabled": True, "path": cfg.sft.out, "trained_now": True, "seconds": time.perf_counter() - t0}


def _add_wall(mode_dir: Path, seconds: float, how: str) -> None:
    f = mode_dir / WALL_FILE
    sessions = json.loads(f.read_text())["sessions"] if f.is_file() else []
    sessions.append({"seconds": seconds, "start": how, "ended_utc": _now()})
    _write_json(f, {"sessions": sessions})


def _wall(mode_dir: Path) -> float:
    f = mode_dir / WALL_FILE
    return sum(s["seconds"] for s in json.loads(f.read_text())["sessions"]) if f.is_file() else float("nan")


def _write_json(path: Path, obj: Any) -> None:
    from .rollout.io import atomic_write_json

    atomic_write_json(path, obj)


def _environment() -> dict:
    """Where a run ran: fp32 CPU results depend on the intra-op thread count (reduction order)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ============================================================================================ summary
def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in history if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _pvar(xs: Sequence[float]) -> float | None:
    return statistics.pvariance(xs) if len(xs) >= 1 else None


SERIES_KEYS = ("reward/train", "reward/eval_dense", "reward/eval_compressed", "mismatch/max_abs_logprob_diff",
               "mismatch_dense/max_abs_logprob_diff", "mismatch/kl_k3", "train/grad_norm", "kv/peak_bytes",
               "correction/rejection_rate")


def summarize_mode(mode: str, history: list[dict], wall_s: float | None) -> dict:
    """The per-mode row of the results table, computed from the trainer's per-step history.

    - eval rewards: greedy eval on the fixed held-out set at eval steps, decoded with a dense cache
      (``dense``) and with the configured eviction policy (``compressed``); final = last eval, best =
      best eval including step 0 (the starting weights, when the trainer logged it).
    - replay gap: ``mismatch/max_abs_logprob_diff`` of every step (max |log p_learner - log
      p_sampler| on the rollout's actions, at the parameters that sampled them, in the learner's
      forward for this mode: shadow-masked for ``smd``, dense otherwise); max and mean over steps.
    - grad-norm variance: population variance over steps of the per-step mean gradient norm.
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
        "rejected_fraction": (_mean(rej) if rej else 0.0) if mode == "sparse_rl" else 0.0,
        "peak_kv_bytes": max(kv) if kv else None,
        "rollout_tokens_per_s": _mean(tps),
        "wall_s": wall_s,
        "step_time_s": sum(t_steps) if t_steps else None,
    }


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


def _setup(cfg: dict, runs: dict[str, dict]) -> dict:
    pol = cfg["rollout"]["policy"]
    return {
        "model": cfg["model"]["path"], "model_init": cfg["model"].get("init"),
        "task": cfg["task"], "policy": pol,
        "rollout": {k: cfg["rollout"][k] for k in ("num_prompts", "group_size", "max_new_tokens", "temperature", "seed")},
        "train": cfg["train"], "learner": {k: cfg["learner"][k] for k in ("lr", "grad_clip", "seed", "attention_backend")},
        "algorithm": {k: v for k, v in cfg["algorithm"].items() if k != "correction"},
        "sft": cfg["sft"],
        "shared_config": _shared(runs),
    }


def _shared(runs: dict[str, dict]) -> bool:
    """True iff the modes' configs differ only in ``algorithm.correction``, ``output_dir`` and cosmetics."""
    flat = []
    for r in runs.values():
        f = _flatten(r["config"])
        flat.append({k: v for k, v in f.items() if k not in ("algorithm.correction", "output_dir")
                     and k.split(".")[0] not in _COSMETIC})
    return all(f == flat[0] for f in flat)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


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


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{int(n)} B"


def _secs(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


# ============================================================================================ plots
def write_plots(results: dict, img_dir: str | os.PathLike) -> list[Path]:
    """Write the four PNGs of :data:`PLOTS` (matplotlib, Agg backend) and return their paths."""
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
        line(ax, m, "train/grad_norm", label=f"{m} (var {_fmt(rows[m]['grad_norm_var'], '.2g')})")
    ax.set(title="gradient norm (mean over the step's optimizer steps, before clipping)", xlabel="step", ylabel="‖g‖")
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
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ============================================================================================ markdown
def render_markdown(results: dict, img_rel: str = IMG) -> str:
    """The results page: setup, table, plots and the findings, all from ``results``."""
    su, rows, f = results["setup"], results["modes"], results["findings"]
    modes = [m for m in MODES if m in rows]
    pol = su["policy"]
    pol_s = pol["name"] if pol["name"] == "none" else (
        f"{pol['name']} (budget {pol['budget']} tokens per layer, window {pol.get('window')}, {pol.get('granularity')})")
    task = su["task"]
    task_s = ", ".join(f"{k}={v}" for k, v in task.items() if v is not None)
    ro, tr = su["rollout"], su["train"]
    env = results["environment"]
    L = []
    L.append("# Correction modes compared: dense, naive, tis, sparse_rl, smd\n")
    L.append("<!-- generated by `smd experiment compare` / `smd experiment report`; do not edit by hand -->\n")
    mixed = f"; NOTE: modes {', '.join(env['mixed'])} ran in a different environment" if env.get("mixed") else ""
    L.append(f"Generated {results['generated_utc']} by `smd experiment compare` (trained with torch {env['torch']}, "
             f"{env['threads']} threads, {env['machine']}{mixed}). Every number and plot below is computed from the "
             "runs' histories; to regenerate, run the command again (finished modes are reused, interrupted ones "
             "resume):\n")
    L.append("```\nsmd experiment compare --config configs/tiny-cpu.yaml --out runs/compare --docs docs\n"
             "smd experiment report --out runs/compare --docs docs   # re-render only\n```\n")
    L.append("## Setup\n")
    mi = su.get("model_init")
    init_s = (f" (random init: {mi['arch']}, hidden {mi['hidden_size']}, {mi['num_layers']} layers, {mi['num_heads']} heads / "
              f"{mi['num_kv_heads']} KV heads, seed {mi['seed']})") if mi else ""
    L.append(f"- model: `{su['model']}`{init_s}")
    L.append(f"- task: {task_s}")
    L.append(f"- rollout: {ro['num_prompts']} prompts x {ro['group_size']} samples per step, up to {ro['max_new_tokens']} "
             f"new tokens, temperature {ro['temperature']}; eviction policy {pol_s} (`dense` rolls out uncompressed)")
    L.append(f"- training: {tr['steps']} steps, eval every {tr['eval_every']} steps on {tr['eval_prompts']} held-out "
             f"prompts (greedy); learner lr {su['learner']['lr']}, grad clip {su['learner']['grad_clip']}; "
             f"SFT warm start: {'on (`' + su['sft']['out'] + '`, shared by all modes)' if su['sft']['enabled'] else 'off'}")
    L.append(f"- same seeds, data and budget for every mode: "
             f"{'yes (configs differ only in algorithm.correction)' if su['shared_config'] else 'NO: the configs differ'}\n")
    L.append("## Results\n")
    head = ["mode", "eval reward dense (final / best)", "eval reward compressed (final / best)",
            "replay gap max", "replay gap mean", "grad-norm var", "rejected", "peak KV", "KV vs dense",
            "rollout tok/s", "wall"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for m in modes:
        r = rows[m]
        L.append("| " + " | ".join([
            f"`{m}`",
            f"{_fmt(r['eval_reward_dense_final'])} / {_fmt(r['eval_reward_dense_best'])}",
            f"{_fmt(r['eval_reward_compressed_final'])} / {_fmt(r['eval_reward_compressed_best'])}",
            _fmt(r["replay_gap_max"], ".2e"), _fmt(r["replay_gap_mean"], ".2e"), _fmt(r["grad_norm_var"], ".3g"),
            f"{100 * r['rejected_fraction']:.1f}%", _bytes(r["peak_kv_bytes"]),
            _fmt(r.get("kv_ratio_vs_dense"), ".2f") + ("x" if r.get("kv_ratio_vs_dense") is not None else ""),
            _fmt(r["rollout_tokens_per_s"], ".0f"), _secs(r["wall_s"])]) + " |")
    L.append("")
    L.append("## Plots\n")
    L.append(f"![reward curves]({img_rel}/reward.png)\n")
    L.append(f"![replay gap per step]({img_rel}/replay_gap.png)\n")
    L.append(f"![gradient norm]({img_rel}/grad_norm.png)\n")
    L.append(f"![rollout KV memory]({img_rel}/kv_memory.png)\n")
    L.append("## What they show\n")
    names = {"smd_gap_at_dense_floor": "Replay gap", "smd_kv_2x_less": "KV memory",
             "smd_reward_similar_to_dense": "Reward, smd vs dense", "naive_worse_or_unstable": "naive",
             "corrections_cost": "What tis and sparse_rl pay"}
    for k, title in names.items():
        v = f[k]
        mark = "" if v["holds"] is None else (" (holds)" if v["holds"] else " (does NOT hold)")
        L.append(f"- **{title}**{mark}: {v['text']}")
    L.append("")
    L.append("## Columns\n")
    L.append("- *eval reward*: mean task reward of greedy completions on a fixed held-out prompt set, decoded with a "
             "dense KV cache and with the rollout's eviction policy; final = last eval, best = best eval of the run "
             "(step 0, the shared starting weights, included).")
    L.append("- *replay gap*: per step, max |log p_learner - log p_sampler| over the rollout's actions, at the "
             "parameters that sampled them, in the learner forward the mode trains with (shadow-masked for `smd`, "
             "dense otherwise); max and mean over steps. `dense`'s value is the fp32 numeric floor of the two code paths.")
    L.append("- *grad-norm var*: population variance over steps of the step's mean gradient norm (before clipping).")
    L.append("- *rejected*: mean fraction of sampled sequences that `sparse_rl` discards (the others keep every sample).")
    L.append("- *peak KV*: the largest rollout KV cache the engine actually allocated in any step (K and V of every "
             "layer, padding included); *KV vs dense*: its ratio to the `dense` run's.")
    L.append("- *rollout tok/s*: generated tokens per second of the reference engine, mean over steps; *wall*: "
             "wall-clock time of the mode's training sessions (excluding the shared SFT warm start).")
    return "\n".join(L) + "\n"


# ============================================================================================ golden
GOLDEN_POLICIES: tuple[tuple[str, dict], ...] = (
    ("none", {}),
    ("streaming", dict(name="streaming", budget=20, sinks=4)),
    ("h2o", dict(name="h2o", budget=20, window=6)),
    ("snapkv", dict(name="snapkv", budget=16, window=4)),
    ("snapkv-head", dict(name="snapkv", granularity="head", budget=16, window=4)),
    ("rkv", dict(name="rkv", budget=20, window=6, buffer=6)),
    ("rkv-head", dict(name="rkv", granularity="head", budget=20, window=6, buffer=6)),
)
# Per-head policies are snapkv and rkv: on this random-init model H2O's accumulated attention is
# nearly uniform, so both KV heads of an h2o-head run keep the same positions (no per-head coverage).
GOLDEN_SETUP = {"arch": "qwen2", "model_seed": 0, "prompt_lens": [40, 28], "prompt_seed": 0, "group_size": 2,
                "max_new_tokens": 24, "temperature": 1.0, "sampling_seed": 0, "threads": 1}
GOLDEN_METRICS = ("max_abs_logprob_diff", "mean_abs_logprob_diff", "mean_kl")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tokens_digest(tokens: torch.Tensor, seq_lens: torch.Tensor) -> str:
    """sha256 of the unpadded token ids of every trajectory (detects a changed sample)."""
    h = hashlib.sha256()
    for n in range(tokens.shape[0]):
        h.update(json.dumps(tokens[n, : int(seq_lens[n])].tolist()).encode())
    return h.hexdigest()


def golden_replay_gaps(model_dir: str | os.PathLike | None = None) -> dict:
    """The replay gap per learner mode (dense / shadow) and per policy on the tiny preset.

    The model is ``init_model_dir(path, "qwen2", seed=0)`` (the tiny preset's init), prompts are
    ``GOLDEN_SETUP["prompt_lens"]`` random token ids (seeded), each sampled ``group_size`` times at
    temperature 1 by the reference engine with the policy, then replayed by :func:`replay_torch`.
    Runs single-threaded: the reduction order then does not depend on the machine's core count,
    and tiny tensors are faster on one thread anyway.
    """
    import tempfile

    from .model.hf import read_arch
    from .model.tiny import init_model_dir
    from .policies import PolicyConfig
    from .replay import replay_torch
    from .rollout.engine import ReferenceEngine, SamplingParams
    from .rollout.io import RolloutBatch

    G = GOLDEN_SETUP
    tmp = None
    with _torch_threads(G["threads"]):
        if model_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="smd-golden-")
            model_dir = init_model_dir(Path(tmp.name) / "tiny-qwen2", G["arch"], seed=G["model_seed"])
        try:
            vocab = read_arch(model_dir).vocab_size
            g = torch.Generator().manual_seed(G["prompt_seed"])
            prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in G["prompt_lens"]]
            sp = SamplingParams(max_new_tokens=G["max_new_tokens"], temperature=G["temperature"], seed=G["sampling_seed"])
            out: dict[str, Any] = {}
            for name, kw in GOLDEN_POLICIES:
                pc = PolicyConfig(**kw)
                trajs, _ = ReferenceEngine.from_pretrained(model_dir, pc).generate(prompts, n=G["group_size"], sampling=sp)
                batch = RolloutBatch.from_trajectories(trajs, {"model_path": str(model_dir),
                                                               "sampling": {"temperature": G["temperature"]}})
                gaps = replay_torch(batch, model_dir)
                out[name] = {
                    "policy": pc.model_dump(mode="json"), "compressed": pc.name != "none",
                    "num_tokens": gaps["dense"]["num_tokens"],
                    "tokens_sha256": tokens_digest(batch.tokens, batch.seq_lens),
                    **{mode: {k: gaps[mode][k] for k in GOLDEN_METRICS} for mode in ("dense", "shadow")},
                }
        finally:
            if tmp is not None:
                tmp.cleanup()
    return {"setup": dict(G), "generated_with": {"torch": torch.__version__}, "policies": out}


def write_golden(path: str | os.PathLike) -> dict:
    res = golden_replay_gaps()
    _write_json(Path(path), res)
    return res


# ============================================================================================ CLI
def _cmd_compare(a) -> int:
    from .trainer import install_signal_handlers

    install_signal_handlers()
    try:
        res = compare(a.config, a.out, a.modes, a.overrides, docs=a.docs)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): finished modes are kept, the current one resumes from its last "
              f"checkpoint. Continue with the same command.", file=sys.stderr)
        return 130
    if res:
        out = Path(res["out"])
        print(render_summary(res))
        print(f"wrote {out / RESULTS_MD}, {out / RESULTS_JSON} and {out / IMG}/*.png"
              + (f"; and {Path(a.docs) / RESULTS_MD}" if a.docs else ""))
    return 0


def render_summary(res: dict) -> str:
    lines = []
    for m, r in res["modes"].items():
        lines.append(f"{m:>9}: eval {_fmt(r['eval_reward_dense_final'])}/{_fmt(r['eval_reward_compressed_final'])} "
                     f"(dense/compressed)  gap max {_fmt(r['replay_gap_max'], '.2e')}  grad-norm var "
                     f"{_fmt(r['grad_norm_var'])}  peak KV {_bytes(r['peak_kv_bytes'])}  wall {_secs(r['wall_s'])}")
    for k, v in res["findings"].items():
        if v["holds"] is not None:
            lines.append(f"[{'ok' if v['holds'] else 'NO'}] {k}")
    return "\n".join(lines)


def _cmd_report(a) -> int:
    res = report(a.out, docs=a.docs)
    print(render_summary(res))
    return 0


def _cmd_golden(a) -> int:
    res = write_golden(a.out)
    for name, r in res["policies"].items():
        print(f"{name:>10}: dense {r['dense']['max_abs_logprob_diff']:.3e}  shadow {r['shadow']['max_abs_logprob_diff']:.3e}")
    print(f"wrote {a.out}")
    return 0


def _add_commands(sub) -> None:
    c = sub.add_parser("compare", help="train the five correction modes with one config; write results and plots")
    c.add_argument("--config", required=True)
    c.add_argument("--out", help="comparison directory (default: <output_dir>/compare)")
    c.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    c.add_argument("--docs", help="also write DOCS/results.md and DOCS/img/*.png")
    c.add_argument("overrides", nargs="*", help="key=value config overrides (applied to every mode)")
    c.set_defaults(fn=_cmd_compare)
    r = sub.add_parser("report", help="re-render results.{md,json} and plots from a finished comparison")
    r.add_argument("--out", required=True)
    r.add_argument("--docs")
    r.set_defaults(fn=_cmd_report)
    g = sub.add_parser("golden", help="regenerate the replay-gap golden file (tests/golden/replay_gap_tiny.json)")
    g.add_argument("--out", required=True)
    g.set_defaults(fn=_cmd_golden)


def add_cli(subparsers) -> None:
    """Add ``smd experiment {compare,report,golden}`` to the ``smd`` parser's subparsers."""
    p = subparsers.add_parser("experiment", help="the correction-mode comparison (results, plots) and golden files")
    _add_commands(p.add_subparsers(dest="experiment_cmd", required=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_smd.experiment", description=__doc__.split("\n")[0])
    _add_commands(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except SMDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
