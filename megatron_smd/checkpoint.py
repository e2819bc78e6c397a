"""Checkpoints: Megatron-Core distributed checkpointing of model + optimizer, plus loop state and config.

Layout of a run's checkpoint directory::

    CKPT_ROOT/
      step_00000010/          one complete checkpoint
        model/                 dist_checkpointing (torch_dist) of the model's sharded state dict
        optim/                 dist_checkpointing of the optimizer's sharded state dict
        loop_state.json        step, metric history, ... (written last: it marks completeness)
        config.yaml            the resolved config of the run
      latest                   name of the newest complete checkpoint (atomic replace)

Atomicity: every rank writes into ``step_XXXXXXXX.tmp-<nonce>``; after a barrier rank 0 writes
``loop_state.json``, renames the directory to its final name and then replaces ``latest``. A run
killed at any point leaves either the previous checkpoint or the new one, never a half-written
directory under a final name (leftover ``.tmp-*`` directories are ignored and cleaned up).

Distributed checkpoints reshard on load, so a checkpoint saved at one TP/PP layout loads at
another (e.g. ``smd export-hf`` loads at TP=PP=1).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FormatError
from .rollout.io import atomic_write_bytes, atomic_write_json

LOOP_STATE = "loop_state.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _bcast_str(s: str | None) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return s  # type: ignore[return-value]
    obj = [s]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer, loop_state: dict,
                    config_yaml: str, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / step_dir_name(step)
    tmp_name = None
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        tmp_name = f"{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        (root / tmp_name / "model").mkdir(parents=True)
        (root / tmp_name / "optim").mkdir(parents=True)
    tmp = root / _bcast_str(tmp_name)
    _barrier()
    model_sd = model.sharded_state_dict()
    dist_checkpointing.save(model_sd, str(tmp / "model"))
    if optimizer is not None:
        opt_sd = optimizer.sharded_state_dict(model.sharded_state_dict())
        dist_checkpointing.save(opt_sd, str(tmp / "optim"))
    _barrier()
    if _is_rank0():
        atomic_write_bytes(tmp / "config.yaml", config_yaml.encode())
        atomic_write_json(tmp / LOOP_STATE, {**loop_state, "step": step})
        if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_bytes(root / "latest", (final.name + "\n").encode())
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(complete_checkpoints(root))
    for d in done[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("step_*.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step_*") if d.is_dir() and ".tmp-" not in d.name and (d / LOOP_STATE).is_file())


def find_checkpoint(root: str | os.PathLike, resume: str | None) -> Path | None:
    """``resume``: ``None``/``"none"`` (start fresh), ``"auto"`` (newest complete one under
    ``root`` if any), or a path to a checkpoint directory."""
    if resume in (None, "none", "no", False):
        return None
    if resume == "auto":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    p = Path(resume)
    if not (p / LOOP_STATE).is_file():
        raise FormatError(f"{p}: not a complete checkpoint (no {LOOP_STATE})")
    return p


def read_loop_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / LOOP_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{ckpt / LOOP_STATE}: unreadable ({e})") from None


def load_checkpoint(ckpt: str | os.PathLike, model, optimizer=None) -> dict:
    """Collective: load model (and optimizer) state in place; returns the loop state."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    for sub in ("model",) + (("optim",) if optimizer is not None else ()):
        if not (ckpt / sub).is_dir():
            raise FormatError(f"{ckpt / sub}: missing (checkpoint incomplete or not a megatron-smd checkpoint)")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt / "model"))
    model.load_state_dict(state)
    if optimizer is not None:
        # is_loading=True makes Megatron create the (still empty) Adam moments first, so that the
        # loaded ones have somewhere to go; without it a fresh optimizer silently keeps no state.
        opt_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True)
        opt_state = dist_checkpointing.load(opt_sd, str(ckpt / "optim"))
        with torch.no_grad():  # fp32 params: the optimizer copies into leaf views in place
            optimizer.load_state_dict(opt_state)
    return read_loop_state(ckpt)


# ------------------------------------------------------------------------------------- resuming
#: learner settings a resumed run applies to the restored optimizer (the checkpoint's values are
#: replaced and the change is logged)
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip")
#: layout fields a resume must keep: the optimizer state is saved per TP / PP shard, and resuming it
#: at another TP or PP degree is not supported (DP and CP replicas hold whole shards: they may change)
FIXED_LAYOUT = ("tp", "pp")


def run_identity(cfg, arch) -> dict:
    """What a checkpoint was trained from (saved in its loop state, compared on resume)."""
    from dataclasses import asdict

    r = cfg.resources
    return {"model_path": str(Path(cfg.model.path).resolve()), "arch": asdict(arch),
            "layout": {"tp": r.tp, "pp": r.pp, "cp": r.cp, "dp": r.dp},
            "learner": {k: getattr(cfg.learner, k) for k in OPTIMIZER_SETTINGS}}


def _saved_identity(ckpt: Path, state: dict) -> dict:
    """The checkpoint's identity: its loop state's, or (older checkpoints) what its config.yaml says."""
    if isinstance(state.get("run"), dict):
        return state["run"]
    import yaml

    try:
        c = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict = {}
    path = (c.get("model") or {}).get("path")
    if path is not None:
        out["model_path"] = str(Path(path).resolve())
    res = c.get("resources") or {}
    if all(k in res for k in ("tp", "pp", "cp", "dp")):
        out["layout"] = {k: res[k] for k in ("tp", "pp", "cp", "dp")}
    lrn = c.get("learner") or {}
    out["learner"] = {k: lrn[k] for k in OPTIMIZER_SETTINGS if k in lrn}
    return out


def check_resume(ckpt: str | os.PathLike, cfg, arch) -> dict:
    """Refuse to resume ``ckpt`` into a run of another model, architecture or TP/PP layout (naming
    the checkpoint's value and the new one); returns the checkpoint's identity."""
    from .errors import ConfigError

    ckpt = Path(ckpt)
    saved = _saved_identity(ckpt, read_loop_state(ckpt))
    now = run_identity(cfg, arch)
    how = (f"start fresh (--resume none, or another output_dir), or resume with the checkpoint's settings")
    if "model_path" in saved and saved["model_path"] != now["model_path"]:
        raise ConfigError(f"--resume: {ckpt} was trained from model.path={saved['model_path']}, this run has "
                          f"model.path={now['model_path']}; {how}")
    if "arch" in saved:
        bad = [f"{k}: checkpoint {saved['arch'].get(k)!r}, now {v!r}" for k, v in now["arch"].items()
               if saved["arch"].get(k) != v]
        if bad:
            raise ConfigError(f"--resume: {ckpt} was trained on another architecture than "
                              f"{cfg.model.path}/config.json ({'; '.join(bad)}); {how}")
    lay = saved.get("layout") or {}
    bad = [f"resources.{k}: checkpoint {lay[k]}, now {now['layout'][k]}" for k in FIXED_LAYOUT
           if k in lay and lay[k] != now["layout"][k]]
    if bad:
        raise ConfigError(f"--resume: {ckpt}: {'; '.join(bad)}: resuming the optimizer state at another "
                          f"tensor/pipeline-parallel degree is not supported; resume with the checkpoint's "
                          f"layout, or export its weights (smd export-hf) and start a new run from them "
                          f"(model.path)")
    return saved


def apply_optimizer_settings(optimizer, lc, saved: dict | None = None) -> list[str]:
    """Put ``learner.{lr, weight_decay, adam_beta1, adam_beta2, adam_eps, grad_clip}`` of ``lc`` (a
    :class:`~megatron_smd.config.LearnerConfig`) into a restored Megatron optimizer, whose loaded
    param groups carry the checkpoint's values. Per-group multipliers (``lr_mult``, ``wd_mult``:
    no weight decay on norms and biases) are kept. Returns one line per setting that changed
    (``saved``: the checkpoint's ``learner`` values)."""
    for g in optimizer.param_groups:
        g["lr"] = lc.lr * g.get("lr_mult", 1.0)
        for k in ("max_lr", "min_lr"):
            if k in g:
                g[k] = lc.lr
        g["weight_decay"] = lc.weight_decay * g.get("wd_mult", 1.0)
        g["betas"] = (lc.adam_beta1, lc.adam_beta2)
        g["eps"] = lc.adam_eps
    for o in (optimizer, *getattr(optimizer, "chained_optimizers", ())):
        if getattr(o, "config", None) is not None:
            o.config.clip_grad = lc.grad_clip
    saved = saved or {}
    return [f"learner.{k}: {saved[k]!r} -> {getattr(lc, k)!r}" for k in OPTIMIZER_SETTINGS
            if k in saved and saved[k] != getattr(lc, k)]
