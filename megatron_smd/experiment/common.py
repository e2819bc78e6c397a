"""What every part of ``smd experiment`` shares: the modes, the files of a comparison directory,
and small helpers (JSON writes, the environment a run ran in, number formatting)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

MODES: tuple[str, ...] = ("dense", "naive", "tis", "sparse_rl", "smd")
RUN_FILE = "run.json"          # OUT/<mode>/run.json: written once the mode has finished
WALL_FILE = "wall.json"        # OUT/<mode>/wall.json: wall-clock seconds of every session that ran it
MANIFEST = "compare.json"      # OUT/compare.json: config path, overrides, modes of the comparison
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
IMG = "img"
PLOTS = ("reward.png", "replay_gap.png", "grad_norm.png", "kv_memory.png", "budget_sweep.png")
LAYOUT = 2                     # compare.json "layout": 2 = OUT/seed<k>/<arm>/ (several seeds, extra arms)
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom (``df >= 1``)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def seed_dir(k: int) -> str:
    """Directory of seed index ``k`` under a comparison directory."""
    return f"seed{k}"
# Sections of the resolved config that do not change what a run computes (progress bar, images in
# TensorBoard): they may differ between the sessions of one comparison.
_COSMETIC = ("logging",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _write_json(path: Path, obj: Any) -> None:
    from ..rollout.io import atomic_write_json

    atomic_write_json(path, obj)


def _environment() -> dict:
    """Where a run ran: fp32 CPU results depend on the intra-op thread count (reduction order)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


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


def arm_order(name: str, arm: dict) -> tuple:
    """Sort key of an arm: the main matrix (modes in :data:`MODES` order), the off-policy arms, the
    ablations, then the budget sweep from the largest budget down."""
    kinds = {"main": 0, "ppo": 1, "ablation": 2, "sweep": 3}
    return (kinds.get(arm.get("kind"), 4), MODES.index(arm["mode"]) if arm["mode"] in MODES else 99,
            -float(arm.get("fraction", 0.0)), name)
