"""``smd experiment compare``: run (or resume) the correction modes one after another from one config
(the package docstring says how a comparison directory is laid out and resumed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import yaml

from ..errors import ConfigError
from .common import (LAYOUT, MANIFEST, MODES, RESULTS_JSON, RUN_FILE, WALL_FILE, _COSMETIC, _environment, _flatten,
                     _now, _write_json, seed_dir, arm_order)
from .report import report


# The off-policy arm: several PPO epochs over mini-batches of each rollout (the update moves away
# from the sampling policy within a step: where an uncorrected mismatch should hurt most).
PPO_MODES = ("naive", "smd")
DEFAULT_PPO = (4, 2)               # algorithm.epochs, algorithm.minibatches
DEFAULT_SWEEP = (0.25, 0.5, 1.0)   # budget sweep, fractions of prompt + completion length (tokens)
DEFAULT_SWEEP_STEPS = 10


def plan_arms(cfg, modes: Sequence[str], *, ppo: tuple[int, int] | None = DEFAULT_PPO,
              sweep: Sequence[float] = DEFAULT_SWEEP, sweep_steps: int = DEFAULT_SWEEP_STEPS,
              ablation: bool = True) -> dict[str, dict]:
    """The comparison's arms: ``{name: {"mode", "kind", "overrides", ...}}``.

    - ``main``: one arm per correction mode, the config as given.
    - ``ppo``: ``naive`` and ``smd`` (when requested) with ``algorithm.epochs`` x ``algorithm.minibatches``
      = ``ppo`` (arm ``<mode>-ppo<E>x<M>``); skipped when ``ppo`` is None or the config already uses it.
    - ``ablation``: ``smd`` without its distillation term (``algorithm.distill.coef=0``; arm
      ``smd-nodistill``, and ``smd-nodistill-ppo<E>x<M>`` beside the off-policy arms), when the
      config's smd distils and ``ablation`` is on: what the term itself does to the rewards.
    - ``sweep``: ``smd`` only (it logs both gaps of one rollout: its shadow learner's and the dense
      learner's, which is what ``naive``/``tis``/``sparse_rl`` train with) at each budget fraction of
      the prompt + completion length, for ``sweep_steps`` steps with one final eval
      (arm ``sweep-b<pct>``, ``rollout.policy.budget`` in tokens, at least the policy's window + 1).
    """
    arms: dict[str, dict] = {m: {"mode": m, "kind": "main", "overrides": []} for m in modes}
    alg = cfg.algorithm
    if ppo is not None and (alg.epochs, alg.minibatches) != tuple(ppo):
        e, mb = ppo
        for m in PPO_MODES:
            if m in modes:
                arms[f"{m}-ppo{e}x{mb}"] = {"mode": m, "kind": "ppo", "epochs": e, "minibatches": mb,
                                            "overrides": [f"algorithm.epochs={e}", f"algorithm.minibatches={mb}"]}
    if ablation and "smd" in modes and alg.distill.coef > 0:
        off = ["algorithm.distill.coef=0"]
        arms["smd-nodistill"] = {"mode": "smd", "kind": "ablation", "overrides": off}
        e, mb = ppo if ppo is not None else (0, 0)
        if f"smd-ppo{e}x{mb}" in arms:
            arms[f"smd-nodistill-ppo{e}x{mb}"] = {"mode": "smd", "kind": "ablation", "epochs": e, "minibatches": mb,
                                                  "overrides": [*off, f"algorithm.epochs={e}", f"algorithm.minibatches={mb}"]}
    if sweep and "smd" in modes and cfg.rollout.policy.name != "none":
        length = sequence_length(cfg)
        window = cfg.rollout.policy.window or 0
        for frac in sweep:
            budget = max(window + 1, round(frac * length))
            arms[f"sweep-b{round(100 * frac)}"] = {
                "mode": "smd", "kind": "sweep", "fraction": frac, "budget": budget, "length": length,
                "overrides": [f"rollout.policy.budget={budget}", f"train.steps={sweep_steps}", "train.eval_every=0",
                              f"train.save_every={sweep_steps}"]}
    return arms


def sequence_length(cfg) -> int:
    """Longest prompt + completion of the task in tokens (one per character plus ``<bos>``, the
    character tokenizer's count), over the first 64 training prompts."""
    from ..tasks import make_task

    ex = make_task(cfg.task).sample(64, seed=cfg.task.seed * 1_000_003)
    return 1 + max(len(e.prompt) for e in ex) + cfg.rollout.max_new_tokens


def seed_overrides(cfg, k: int) -> list[str]:
    """Seed index ``k``: ``rollout.seed`` and ``learner.seed`` shifted by ``k`` (the sampler's randomness,
    the mini-batch order). ``task.seed`` stays: the eval prompts (and the training prompt stream) are
    the same for every seed, so differences between modes are paired on the same prompts."""
    return [f"rollout.seed={cfg.rollout.seed + k}", f"learner.seed={cfg.learner.seed + k}"]


def compare(cfg_path: str | os.PathLike, out: str | os.PathLike | None = None, modes: Sequence[str] | None = None,
            overrides: Sequence[str] | None = None, *, docs: str | os.PathLike | None = None, seeds: int = 3,
            ppo: tuple[int, int] | None = DEFAULT_PPO, sweep: Sequence[float] = DEFAULT_SWEEP,
            sweep_steps: int = DEFAULT_SWEEP_STEPS, term_grads: bool = True, ablation: bool = True) -> dict:
    """Run (or resume) every arm on every seed, then write ``results.{json,md}`` and the plots.

    Args:
        cfg_path: experiment YAML (e.g. ``configs/tiny-cpu.yaml``).
        out: comparison directory (default ``<output_dir>/compare`` of the resolved config).
        modes: subset of :data:`MODES` (default all five, run in that order: ``dense`` first, it is
            the numeric-floor reference).
        overrides: ``key=value`` config overrides applied to every run. ``algorithm.correction``,
            ``output_dir``, ``rollout.seed`` and ``learner.seed`` are set per run by this function.
        docs: if given, also write ``docs/results.md`` and ``docs/img/*.png``.
        seeds: number of seeds K; every arm runs on the same K seeds (:func:`seed_overrides`).
        ppo: ``(epochs, minibatches)`` of the off-policy arms of ``naive`` and ``smd`` (None: none).
        sweep: budget fractions of the budget sweep (empty: none); ``sweep_steps`` steps each.
        ablation: also run smd without its distillation term (:func:`plan_arms`).
        term_grads: log the per-term gradient norms (PPO term, distillation term) in the ``smd``
            runs of the main and off-policy arms (``logging.term_grad_norms``; one extra backward
            per term and micro-batch; the update itself is unchanged).
    Returns:
        the results dict written to ``results.json``, with ``status["seed<k>/<arm>"]`` in
        ``{"cached", "resumed", "ran"}``. On non-zero ranks of a multi-process run: ``{}``.
    """
    from ..config import load_config
    from ..parallel.layout import env_rank
    from ..trainer import train

    overrides = list(overrides or [])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("algorithm.correction", "output_dir", "rollout.seed", "learner.seed"):
            raise ConfigError(f"command line: {key} is set per run by `smd experiment compare` and cannot be overridden")
    if seeds < 1:
        raise ConfigError(f"command line: --seeds {seeds}: needs at least 1")
    modes = _check_modes(modes)
    base = load_config(cfg_path, overrides)
    out_dir = Path(out) if out is not None else Path(base.output_dir) / "compare"
    rank0 = env_rank() == 0
    arms = plan_arms(base, modes, ppo=ppo, sweep=sweep, sweep_steps=sweep_steps, ablation=ablation)
    jobs: dict[str, tuple[str, object]] = {}  # "seed<k>/<arm>" -> (arm, config)
    for k in range(seeds):
        for name, arm in arms.items():
            rel = f"{seed_dir(k)}/{name}"
            jobs[rel] = (name, load_config(cfg_path, [*overrides, *arm["overrides"], *seed_overrides(base, k),
                                                      f"algorithm.correction={arm['mode']}",
                                                      f"output_dir={out_dir / rel}"]))
    # Every run already under out_dir must have been started with the config it would get now.
    for rel, (_, cfg) in jobs.items():
        if (out_dir / rel).is_dir():
            _check_same_config(cfg, out_dir / rel)
    # Decide everything from the state on disk before any rank trains, so all ranks agree.
    status: dict[str, str] = {}
    for rel in jobs:
        if (out_dir / rel / RUN_FILE).is_file():
            status[rel] = "cached"
        elif _has_checkpoint(out_dir / rel):
            status[rel] = "resumed"
        else:
            status[rel] = "ran"
    # Arms of earlier invocations on this directory are kept in the report (one may run the modes
    # in separate invocations); so are their seeds.
    prev = json.loads((out_dir / MANIFEST).read_text()) if (out_dir / MANIFEST).is_file() else {}
    prev_arms = prev.get("arms", {}) if prev.get("layout") == LAYOUT else {}
    all_arms = {**prev_arms, **{n: {k: v for k, v in a.items()} for n, a in arms.items()}}
    all_arms = dict(sorted(all_arms.items(), key=lambda kv: arm_order(kv[0], kv[1])))
    if rank0:
        _write_json(out_dir / MANIFEST, {"layout": LAYOUT, "config": str(cfg_path), "overrides": overrides,
                                         "seeds": max(seeds, int(prev.get("seeds", 0) or 0)), "arms": all_arms,
                                         "modes": [m for m in MODES if any(a["mode"] == m for a in all_arms.values())]})
    todo = [rel for rel in jobs if status[rel] != "cached"]
    warm = _warm_start(jobs[todo[0]][1]) if todo else None
    for rel, (name, cfg) in jobs.items():
        if status[rel] == "cached":
            if rank0:
                print(f"[smd] {rel}: finished earlier ({out_dir / rel / RUN_FILE}), skipped", flush=True)
            continue
        if rank0:
            print(f"[smd] {rel}: {'resuming' if status[rel] == 'resumed' else 'training'} -> {out_dir / rel}", flush=True)
        per_term = term_grads and arms[name]["mode"] == "smd" and arms[name]["kind"] != "sweep"
        t0 = time.perf_counter()
        try:
            logging = cfg.logging.model_copy(update={"term_grad_norms": per_term})  # a diagnostic: _COSMETIC
            res = train(cfg.model_copy(update={"logging": logging}), resume="auto")
        finally:
            if rank0:
                _add_wall(out_dir / rel, time.perf_counter() - t0, status[rel])
        if rank0:
            _write_json(out_dir / rel / RUN_FILE, {
                "mode": arms[name]["mode"], "arm": name, "seed_index": int(rel.split("/")[0][len("seed"):]),
                "config": cfg.model_dump(mode="json"), "history": res["history"], "term_grad_norms": per_term,
                "wall_s": _wall(out_dir / rel), "finished_utc": _now(), "environment": _environment()})
    if not rank0:
        return {}
    results = report(out_dir, docs=docs)
    results["status"] = status
    if warm is not None:
        results["warm_start"] = warm
    results["out"] = str(out_dir)
    _write_json(out_dir / RESULTS_JSON, results)
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


def _check_same_config(cfg, mode_dir: Path) -> None:
    """Refuse to reuse a run directory started with another config than the one it would get now
    (``output_dir`` and cosmetic sections aside)."""
    prev = None
    if (mode_dir / RUN_FILE).is_file():
        prev = json.loads((mode_dir / RUN_FILE).read_text()).get("config")
    elif (mode_dir / "config.yaml").is_file():  # written by the trainer when the run started
        prev = yaml.safe_load((mode_dir / "config.yaml").read_text())
    if prev is None:
        return
    def keep(k: str) -> bool:
        return k.split(".")[0] not in _COSMETIC and k != "output_dir"

    now = {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items() if keep(k)}
    old = {k: v for k, v in _flatten(prev).items() if keep(k)}
    diff = sorted(k for k in set(now) | set(old) if now.get(k, "<unset>") != old.get(k, "<unset>"))
    if diff:
        shown = ", ".join(f"{k} ({old.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r})" for k in diff[:5])
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        raise ConfigError(f"{mode_dir}: holds a run with a different config: {shown}{more}. All modes of a comparison "
                          f"share one config per arm and seed; choose another --out (or delete {mode_dir}) to start over")


def _has_checkpoint(mode_dir: Path) -> bool:
    from ..checkpoint import complete_checkpoints

    return bool(complete_checkpoints(mode_dir / "checkpoints"))


def _warm_start(cfg) -> dict:
    """Train (or find) the SFT warm start once, before the modes, so no mode's wall time includes it
    and every mode starts from the same weights (``sft.out`` is shared by construction)."""
    if not cfg.sft.enabled:
        return {"enabled": False}
    if (Path(cfg.sft.out) / "config.json").is_file():
        return {"enabled": True, "path": cfg.sft.out, "trained_now": False}
    from ..model.hf import read_arch
    from ..sft import ensure_sft
    from ..trainer import ensure_model_once, init_layout

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
