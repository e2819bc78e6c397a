"""``smd export-hf CKPT OUT``: a training checkpoint -> a Hugging Face model directory.

The checkpoint is loaded into a single-process learner (distributed checkpoints reshard on load, so
any training layout works), gathered to HF names, and written atomically together with the
tokenizer files of the run's model.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import FormatError


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    from .checkpoint import find_checkpoint, load_checkpoint
    from .config import ExperimentConfig
    from .learner.learner import Learner, LearnerSettings
    from .model.hf import read_arch, read_tokenizer_files, save_model_dir
    from .parallel.layout import ParallelLayout, free_port

    # a checkpoint directory, or a run's checkpoint root (then the newest complete checkpoint)
    given = Path(ckpt)
    ckpt = given if (given / "loop_state.json").is_file() else find_checkpoint(given, "auto")
    if ckpt is None:
        raise FormatError(f"{given}: neither a checkpoint nor a directory holding a complete one")
    cfg_path = Path(ckpt) / "config.yaml"
    if not cfg_path.is_file():
        raise FormatError(f"{cfg_path}: missing (not a megatron-smd checkpoint)")
    cfg = ExperimentConfig.model_validate(yaml.safe_load(cfg_path.read_text()))
    model_dir = Path(cfg.sft.out) if cfg.sft.enabled and (Path(cfg.sft.out) / "config.json").is_file() else Path(cfg.model.path)
    arch = read_arch(model_dir)
    os.environ["MASTER_PORT"] = str(free_port())
    layout = ParallelLayout(world_size=1)
    layout.initialize()
    try:
        learner = Learner(arch, layout, LearnerSettings(), weights=None, train=False)
        load_checkpoint(ckpt, learner.model, None)
        sd = learner.gather_hf_state()
    finally:
        layout.destroy()
    save_model_dir(out, arch, sd, extra_files=read_tokenizer_files(model_dir))
    return Path(out)
