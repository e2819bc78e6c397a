"""What every field does: :data:`SETTINGS` classifies each field of the schema as changing a run
(:data:`RUN`) or as planning/launch only (:data:`PLAN`); :func:`schema_fields` lists the schema's
fields, which ``tests/test_settings.py`` compares with it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .schema import ExperimentConfig

RUN = "run"
"""The field changes what a run computes or writes (rollouts, updates, logs, checkpoints)."""
PLAN = "plan"
"""Planning/launch only: read by `smd plan` and the launch scripts, never by a run (the field's
docstring says "Planning/launch only")."""

#: Every field of :class:`ExperimentConfig` (dotted, leaves; a ``dict`` passthrough is one entry)
#: -> its class and what it reaches. ``tests/test_settings.py`` checks that this covers the schema
#: exactly, that planning/launch-only fields say so in their docstrings, and that every field is
#: seen to take effect: a run field by changing it and comparing runs bit for bit (rollout tensors,
#: TensorBoard scalars, weights or written files), a planning field by changing `smd plan`'s
#: result or the launchers' variables.
SETTINGS: dict[str, tuple[str, str]] = {
    "preset": (RUN, "loading: the model preset layered under the experiment"),
    "model.path": (RUN, "weights and tokenizer of every engine and learner"),
    **{f"model.init.{k}": (RUN, "the tiny model created when model.path is missing")
       for k in ("arch", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                 "tie_word_embeddings", "seed")},
    "model.dtype": (RUN, "the reference engine's compute dtype; smd plan"),
    **{f"model.arch.{k}": (PLAN, "smd plan / launchers; checked against config.json by every run")
       for k in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                 "max_position_embeddings")},
    "model.max_seq_len": (RUN, "refuses runs whose sequences could be longer; smd plan"),
    **{f"task.{k}": (RUN, "prompts, answers and rewards")
       for k in ("name", "num_pairs", "num_queries", "seed", "key_digits", "value_digits", "modulus", "max_depth",
                 "literal_prob", "num_keys", "num_values", "note_prob")},
    "rollout.backend": (RUN, "the rollout engine"),
    "rollout.sglang_urls": (RUN, "the servers the sglang engine and transport talk to"),
    **{f"rollout.{k}": (RUN, "rollout tensors")
       for k in ("num_prompts", "group_size", "max_new_tokens", "temperature", "top_p", "top_k", "seed")},
    "rollout.stop_at_eos": (RUN, "rollout tensors and the periodic evals"),
    "rollout.kv_growth": (RUN, "KV statistics of the rollout and of the periodic evals"),
    "rollout.kv_cache_dtype": (RUN, "FP8 K/V in the rollout engine (reference engine; the SGLang servers' "
                                    "--kv-cache-dtype from smd plan, checked by the trainer), KV bytes, the "
                                    "compressed eval, and the learner's shadow forward"),
    "rollout.kv_scales": (RUN, "the FP8 cache's per-layer scales (engine or servers' --smd-kv-scales, rollout "
                               "tensors, the learner's rounding)"),
    **{f"rollout.faults.{k}": (RUN, "retries against failing rollout servers (backend sglang)")
       for k in ("request_timeout_s", "max_attempts", "wait_healthy_s", "mask_retries", "probe_atol")},
    **{f"rollout.faults.{k}": (PLAN, "the launchers' server supervisor")
       for k in ("server_max_restarts", "server_hang_timeout_s")},
    **{f"rollout.policy.{k}": (RUN, "eviction in the rollout (shadow masks), the compressed eval, the servers' --smd-*")
       for k in ("name", "budget", "granularity", "sinks", "window", "pool_kernel", "pooling", "buffer", "rkv_lambda")},
    **{f"algorithm.{k}": (RUN, "the learner's loss")
       for k in ("correction", "clip_low", "clip_high", "aggregation", "normalize_adv_std", "epochs", "minibatches",
                 "kl_coef", "kl_estimator", "tis_cap", "sparse_rl.reject_min", "sparse_rl.reject_mean",
                 "sparse_rl.weight_min", "sparse_rl.weight_max", "distill.coef", "distill.direction",
                 "distill.estimator")},
    **{f"learner.{k}": (RUN, "the learner's optimizer and forward (and SFT's)")
       for k in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip", "micro_batch_size",
                 "attention_backend", "seed", "precision", "distributed_optimizer", "megatron")},
    **{f"resources.{k}": (RUN, "the learner's process layout (torchrun world)") for k in ("tp", "pp", "cp", "dp")},
    **{f"resources.{k}": (PLAN, "smd plan / launchers")
       for k in ("nodes", "gpus_per_node", "rollout_nodes", "rollout_tp", "gpu_memory_gb")},
    "resources.cpu_threads": (RUN, "torch intra-op threads of smd train / sft / rollout"),
    "train.steps": (RUN, "the RL loop"),
    "train.eval_every": (RUN, "when the periodic evals run"),
    "train.eval_prompts": (RUN, "the periodic evals"),
    "train.save_every": (RUN, "when checkpoints are written"),
    "train.keep_checkpoints": (RUN, "which checkpoints are kept"),
    **{f"sft.{k}": (RUN, "the SFT warm start") for k in ("enabled", "out", "steps", "batch_size", "lr", "warmup_steps",
                                                         "target_reward", "eval_every")},
    "sync.transport": (RUN, "the weight sync"),
    "sync.bucket_mb": (RUN, "the weight sync's buckets"),
    "sync.verify": (RUN, "the weight sync's checks"),
    "sync.dir": (RUN, "where the disk transport writes"),
    "logging.tensorboard": (RUN, "TensorBoard events"),
    "logging.mask_images": (RUN, "TensorBoard images"),
    "logging.sample_text": (RUN, "TensorBoard text"),
    "logging.progress_bar": (RUN, "the progress bar"),
    "logging.term_grad_norms": (RUN, "per-term gradient norms in the step's statistics (an extra backward per term)"),
    "sglang": (PLAN, "the SGLang servers' command line (launchers); smd plan"),
    "output_dir": (RUN, "where a run writes"),
}


def schema_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf fields of ``model`` -> their pydantic ``FieldInfo`` (nested models flattened)."""
    import typing

    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        sub = [a for a in (f.annotation, *typing.get_args(f.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            out.update(schema_fields(sub[0], f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = f
    return out
