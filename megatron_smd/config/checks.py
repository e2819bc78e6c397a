"""Run-time checks: refuse, before anything is built, a config whose settings a run would not
honour (``learner.megatron`` passthrough keys the run sets itself, transports the command cannot
drive, sequences longer than ``model.max_seq_len``, a ``model.arch`` that disagrees with the model
directory, FP8 KV scales calibrated on other weights than the run starts from), and apply
``resources.cpu_threads``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .schema import ExperimentConfig, LearnerConfig


#: learner.megatron keys a run sets itself from the model directory, the layout or the learner's
#: precision: a passthrough value would silently disagree with the weights the engine runs.
MEGATRON_OWNED = {
    "num_layers": "config.json", "hidden_size": "config.json", "ffn_hidden_size": "config.json",
    "num_attention_heads": "config.json", "num_query_groups": "config.json", "kv_channels": "config.json",
    "layernorm_epsilon": "config.json (rms_norm_eps)", "add_qkv_bias": "config.json",
    "normalization": "the architecture", "gated_linear_unit": "the architecture",
    "activation_func": "the architecture", "params_dtype": "learner.precision (fp32 or bf16)",
    "pipeline_dtype": "learner.precision (fp32 or bf16)", "fp16": "learner.precision (fp32 or bf16)",
    "bf16": "learner.precision (fp32 or bf16)",
    "tensor_model_parallel_size": "resources.tp", "pipeline_model_parallel_size": "resources.pp",
    "context_parallel_size": "resources.cp", "calculate_per_token_loss": "the learner (losses arrive normalised)",
    "core_attention": "learner.attention_backend", "pre_process": "the pipeline layout",
    "post_process": "the pipeline layout",
}


def check_megatron_passthrough(lc: LearnerConfig) -> None:
    """``learner.megatron`` must name ``TransformerConfig`` fields the run does not set itself,
    with values YAML can express (a dtype or a function cannot come from a config file)."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    for k, v in lc.megatron.items():
        key = f"learner.megatron.{k}"
        if k in MEGATRON_OWNED:
            raise ConfigError(f"{key}={v!r}: set by the run from {MEGATRON_OWNED[k]}, not passed through to "
                              f"Megatron; remove it")
        if k in ("recompute", "vocab_divisor"):  # build_gpt_model's own switches
            if not isinstance(v, bool if k == "recompute" else int) or (k == "vocab_divisor" and v < 1):
                raise ConfigError(f"{key}={v!r}: expected {'true/false' if k == 'recompute' else 'a positive integer'}")
            continue
        if k not in fields:
            raise ConfigError(f"{key}: not a field of Megatron-Core's TransformerConfig (a typo?)")
        t = str(fields[k].type)
        if "dtype" in t or "Callable" in t:
            raise ConfigError(f"{key}={v!r}: a TransformerConfig field of type {t} cannot come from a config file")


def check_runnable(cfg: ExperimentConfig, command: str, model_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is built, a config whose settings a run would not honour.

    ``command``: ``train``, ``sft`` or ``rollout``. ``model_dir``: the model directory the run
    uses (its config.json is compared with ``model.arch``). Raises :class:`ConfigError` naming
    the key, why, and what to use instead.
    """
    from ..tasks import make_task

    if command == "train":
        if cfg.sync.transport == "broadcast":
            raise ConfigError(
                "sync.transport=broadcast: smd train has no broadcast receiver (that transport feeds external "
                "engine receivers, megatron_smd.sync.receiver). Use sync.transport=inprocess for the reference "
                "engine, or rollout.backend=sglang with sync.transport=sglang (the same broadcast, through "
                "SGLang's update_weights_from_distributed)")
        if cfg.rollout.backend == "sglang" and cfg.sync.transport != "sglang":
            raise ConfigError(f"rollout.backend=sglang needs sync.transport=sglang (the servers get the learner's "
                              f"weights after every step), got {cfg.sync.transport!r}")
        if cfg.sync.transport == "sglang" and cfg.rollout.backend != "sglang":
            raise ConfigError("sync.transport=sglang feeds SGLang servers, but rollout.backend="
                              f"{cfg.rollout.backend}: set rollout.backend=sglang, or use sync.transport=inprocess")
    if command in ("train", "sft"):
        check_megatron_passthrough(cfg.learner)
    task = make_task(cfg.task)
    prompt = task.approx_prompt_tokens()
    if command == "sft":
        need, what = prompt + task.max_answer_tokens(), "the answer and <eos>"
    else:
        need, what = prompt + cfg.rollout.max_new_tokens, f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
    if need > cfg.model.max_seq_len:
        raise ConfigError(
            f"model.max_seq_len={cfg.model.max_seq_len}: the task's prompts ({prompt} tokens at most) plus {what} "
            f"need up to {need} tokens; raise model.max_seq_len to {need}, or shorten the task (task.num_pairs) "
            f"or the completion")
    if model_dir is not None and cfg.model.arch is not None:
        check_arch_matches(cfg, model_dir)
    if model_dir is not None and command in ("train", "rollout"):
        check_kv_scales(cfg, command, model_dir)


def check_kv_scales(cfg: ExperimentConfig, command: str, model_dir: str | os.PathLike) -> None:
    """``rollout.kv_scales`` must be a valid scales file for this model and ``rollout.kv_cache_dtype``,
    calibrated on the weights the engine starts from: ``model_dir`` for `smd rollout`; for
    `smd train` the SFT warm start (``sft.out``) when ``sft.enabled``, else ``model_dir``."""
    r = cfg.rollout
    if r.kv_cache_dtype == "auto" or r.kv_scales is None:
        return
    from ..model.hf import read_arch
    from ..quant.cache import load_rollout_kv

    weights = Path(model_dir)
    if command == "train" and cfg.sft.enabled:
        weights = Path(cfg.sft.out)
        if not (weights / "config.json").is_file():
            raise ConfigError(
                f"rollout.kv_scales={r.kv_scales}: the run starts from the SFT warm start sft.out={weights}, which "
                f"does not exist yet, so no scales can have been calibrated on it: run `smd sft` with this config "
                f"first, then `smd calibrate-kv` (which calibrates sft.out), or set sft.enabled=false")
    load_rollout_kv(r.kv_cache_dtype, r.kv_scales, read_arch(model_dir).num_layers, weights)


def check_arch_matches(cfg: ExperimentConfig, model_dir: str | os.PathLike):
    """``model.arch`` against ``model_dir/config.json``, every field; returns the directory's arch."""
    from ..model.hf import read_arch

    disk = read_arch(model_dir)
    if cfg.model.arch is None:
        return disk
    declared = cfg.model.arch.to_model_arch()
    names = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
    bad = [f"{f}: model.arch={getattr(declared, f)!r}, config.json={getattr(disk, f)!r}"
           for f in names if getattr(declared, f) != getattr(disk, f)]
    if bad:
        raise ConfigError(f"model.arch disagrees with {Path(model_dir) / 'config.json'}: " + "; ".join(bad)
                          + " (the run uses config.json; fix model.arch or remove it)")
    return disk


def apply_cpu_threads(cfg: ExperimentConfig) -> None:
    """``resources.cpu_threads``: torch's intra-op threads for this process."""
    if cfg.resources.cpu_threads is not None:
        import torch

        torch.set_num_threads(cfg.resources.cpu_threads)
