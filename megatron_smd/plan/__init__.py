"""``smd plan``: size a job (per-GPU memory of the learner and of the rollout) before it burns GPU hours.

Run it on any machine, no GPU needed; the model directory need not exist (real-model presets carry
their architecture under ``model.arch``)::

    smd plan --config configs/qwen2.5-7b-grpo.yaml                 # table
    smd plan --config configs/qwen2.5-7b-grpo.yaml resources.tp=8  # try another layout
    smd plan --config configs/models/qwen2.5-32b.yaml --json       # machine-readable
    python -m megatron_smd.plan --config CFG --shell               # what the launch scripts eval

Layouts that cannot work raise :class:`~megatron_smd.errors.ConfigError` naming the numbers (heads
not divisible by TP, layers not divisible by PP, ``model.max_seq_len`` not divisible by ``2*cp``, a
learner world that does not fill the declared nodes, a rollout TP that does not divide the heads or
the node). Layouts that work but do not fit the declared GPU (``resources.gpu_memory_gb``, 80 GB
H100 by default) are *flagged* (``status: does not fit``), not rejected: the number is the answer.

Modules: :mod:`.memory` (the memory model and :func:`plan`; its docstring derives every formula),
:mod:`.validate` (the architecture and the layouts that cannot work), :mod:`.table`
(:func:`format_plan`), :mod:`.launch` (the launch scripts' variables and the servers' flags). The
command line is ``smd plan`` in :mod:`megatron_smd.cli`.
"""

from __future__ import annotations

# The rollout KV arithmetic is the SGLang pools' own (megatron_smd.kv_budget), re-exported here.
from ..kv_budget import batch_peak_tokens, decode_peak_tokens, kv_bytes_per_token, prefill_kept_tokens, request_peak_tokens
from .launch import check_server_args, format_shell, launch_vars, policy_flags
from .memory import (DEFAULT_MEM_FRACTION_STATIC, DTYPE_BYTES, GB, GIB, TIGHT, StageParams, hf_param_count,
                     kv_dtype_bytes, layer_activation_bytes, layer_params, learner_memory, learner_precision,
                     microbatch_activation_bytes, microbatches_per_step, padded_vocab, plan, recompute_mode,
                     rollout_memory, rows_per_microbatch, stage_params)
from .table import format_plan
from .validate import VOCAB_DIVISOR, padded_seq_len, resolve_arch, validate_layout

__all__ = ["DEFAULT_MEM_FRACTION_STATIC", "DTYPE_BYTES", "GB", "GIB", "TIGHT", "VOCAB_DIVISOR", "StageParams",
           "batch_peak_tokens", "check_server_args", "decode_peak_tokens", "format_plan", "format_shell",
           "hf_param_count", "kv_bytes_per_token", "kv_dtype_bytes", "launch_vars", "layer_activation_bytes",
           "layer_params", "learner_memory", "learner_precision", "microbatch_activation_bytes",
           "microbatches_per_step", "padded_seq_len", "padded_vocab", "plan", "policy_flags",
           "prefill_kept_tokens", "recompute_mode", "request_peak_tokens", "resolve_arch", "rollout_memory",
           "rows_per_microbatch", "stage_params", "validate_layout"]
