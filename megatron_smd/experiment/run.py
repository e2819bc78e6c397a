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
from .common import (MANIFEST, MODES, RESULTS_JSON, RUN_FILE, WALL_FILE, _COSMETIC, _environment, _flatten, _now,
                     _write_json)
from .report import report


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
    from ..config import load_config
    from ..parallel.layout import env_rank
    from ..trainer import train

    overrides = list(overrides or [])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("algorithm.correction", "output_dir"):
            raise ConfigError(f"command line: {key} is set per mode by `smd experiment compare` and cannot be overridden")
    modes = _check_modes(modes)
    base = load_config(cfg_path, overrides)
    out_dir = Path(out) if out is not None else Path(base.output_dir) / "compare"
    rank0 = env_rank() == 0
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
