"""The learner: a Megatron-Core GPTModel built from a Qwen2 / Llama config, with the shadow-mask attention.

:func:`build_gpt_model` maps a :class:`~megatron_smd.model.hf.ModelArch` onto Megatron's
``TransformerConfig`` (RMSNorm with the model's eps, SwiGLU = ``gated_linear_unit`` + SiLU, RoPE with
the model's theta, GQA via ``num_query_groups``, a QKV bias for Qwen2 and no other bias, tied or
untied embeddings, the vocabulary padded to a multiple of ``vocab_divisor * tp``, fp32 by default)
and builds it with the local layer spec (``get_gpt_layer_local_spec``: plain Megatron modules, no
Transformer Engine) whose core attention is replaced by ours. It must be called inside an
initialized :class:`~megatron_smd.parallel.layout.ParallelLayout`; the TP / PP / CP sizes and the
stage (``pre_process`` / ``post_process``) come from there.

Calling convention (sbhd inside, ``[b, s]`` at the boundary)::

    logits = model(input_ids [b, s], position_ids [b, s], attention_mask=evict)   # last stage
    # -> [b, s, Vp / tp] vocab-parallel logits; columns past the HF vocabulary come from zero
    #    rows (logit 0) and are excluded by the log-prob functions

``evict`` is the shadow mask, an int32 tensor ``[b, L, S]`` or ``[b, L, H_kv, S]`` with global layer,
KV-head and (never CP-sliced) sequence axes (see :mod:`megatron_smd.mask`); ``None`` is plain causal.
It travels through Megatron's ``attention_mask`` argument untouched, so every stage and every TP rank
must be given it (the runner does). Under context parallelism ``input_ids`` / ``position_ids`` are the
rank's two chunks (``s = S / cp``) while ``evict`` stays global.

RoPE from ``position_ids`` (departure from Megatron)
----------------------------------------------------
Megatron's GPTModel computes RoPE for positions ``0..S-1`` of the row from the sequence length and
ignores ``position_ids``. Replay needs each token's *original* position inside its own sequence:
packed rows restart at 0 for every trajectory, rows may start at a non-zero position, and under CP a
rank's tokens are two non-adjacent chunks. (Within one document RoPE scores depend only on position
differences, so a constant per-document shift changes the result only by fp32 rounding of the
cos/sin tables; that rounding is still what the 1e-5 replay budget is spent on, and any attention
that spans a position discontinuity changes outright.) :class:`SMDGPTModel` therefore overrides
``_preprocess`` and replaces the rotary tensor with one computed from ``position_ids``:
``freqs[s, b, 1, hn] = cat(pos * inv_freq, pos * inv_freq)``, which Megatron's unfused
``apply_rotary_pos_emb`` (sbhd) broadcasts per batch row. We chose this over THD
``packed_seq_params`` because the project's packing is sbhd with ``b = 1`` packed rows plus an
absolute ``evict`` (which already encodes the document boundaries, so attention needs no
``cu_seqlens``), and because position ids arrive CP-sliced with the tokens, so no separate CP
slicing of the rotary table is needed. ``position_ids=None`` falls back to Megatron's own RoPE.
(Megatron still computes its own table in ``super()._preprocess``; it is cached per length and
discarded, which costs nothing measurable and keeps the override to a few lines.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..model.hf import ModelArch
from .convert import DEFAULT_VOCAB_DIVISOR, padded_vocab_size

# "megatron": Megatron's own local DotProductAttention: dense causal only, it cannot read `evict`.
# Kept as an independent reference for the dense path.
MEGATRON_DENSE_BACKEND = "megatron"


def rope_from_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Rotary angles for explicit positions.

    Args:
        inv_freq: ``[hn / 2]`` fp32, ``1 / theta ** (2k / hn)``.
        position_ids: ``[b, s]`` integer positions of each token in its own sequence.
    Returns:
        ``[s, b, 1, hn]`` fp32 angles in Megatron's non-interleaved layout (``[freqs | freqs]``).
        The product ``pos * inv_freq`` is one fp32 multiply, as in Hugging Face's RoPE, so the
        angles are bit-equal to theirs.
    """
    pos = position_ids.to(device=inv_freq.device, dtype=torch.float32).t()  # [s, b]
    freqs = pos.unsqueeze(-1) * inv_freq.float()  # [s, b, hn/2]
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)


class SMDGPTModel(GPTModel):
    """GPTModel whose RoPE honours ``position_ids`` (see the module docstring for why).

    Attributes:
        arch: the HF architecture it was built from.
        vocab_divisor: the ``make_vocab_size_divisible_by`` used for the padded vocabulary.
    """

    arch: ModelArch
    vocab_divisor: int

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  padding_mask=padding_mask)
        if position_ids is None or inference_context is not None or out[1] is None:
            return out
        if packed_seq_params is not None:
            raise ValueError("SMDGPTModel: packed_seq_params (THD) is not supported; pack as sbhd rows with "
                             "position_ids and an absolute evict mask")
        rope = rope_from_positions(self.rotary_pos_emb.inv_freq, position_ids)
        expected = out[1].shape[0]  # Megatron's local sequence length on this rank
        if rope.shape[0] != expected:
            raise ValueError(f"SMDGPTModel: position_ids cover {rope.shape[0]} tokens, this rank's "
                             f"sequence has {expected}")
        return (out[0], rope, *out[2:])


def transformer_config(arch: ModelArch, *, tp: int = 1, pp: int = 1, cp: int = 1,
                       params_dtype: torch.dtype = torch.float32, use_cpu_initialization: bool | None = None,
                       init_method_std: float = 0.02, recompute: bool = False,
                       **overrides: Any) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of a Qwen2 / Llama architecture.

    ``recompute=True`` turns on full activation recomputation (one checkpoint per layer).
    ``overrides`` are passed to ``TransformerConfig`` last (e.g. ``cp_comm_type``).
    """
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=False,
        use_cpu_initialization=use_cpu_initialization,
        init_method_std=init_method_std,
        # the plain-torch paths; fusions need TE/apex kernels
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # losses are token sums; normalization is the caller's (see runner.py)
        calculate_per_token_loss=True,
    )
    if recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(attention_backend: str = "sdpa", core_attention: type | ModuleSpec | None = None) -> ModuleSpec:
    """The local GPT layer spec with the project's core attention.

    ``core_attention`` overrides everything; otherwise ``attention_backend`` selects
    ``ShadowCoreAttention(backend=attention_backend)``, or Megatron's own ``DotProductAttention``
    for ``"megatron"`` (dense causal reference; it cannot take a shadow mask).
    """
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention is None:
        if attention_backend == MEGATRON_DENSE_BACKEND:
            from megatron.core.transformer.dot_product_attention import DotProductAttention

            core_attention = DotProductAttention
        else:
            from .attention import ShadowCoreAttention

            core_attention = ModuleSpec(module=ShadowCoreAttention, params={"backend": attention_backend})
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def build_gpt_model(arch: ModelArch, *, attention_backend: str = "sdpa",
                    core_attention: type | ModuleSpec | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR, params_dtype: torch.dtype = torch.float32,
                    recompute: bool = False, init_method_std: float = 0.02,
                    **config_overrides: Any) -> SMDGPTModel:
    """Build this rank's part of the learner (requires an initialized layout).

    Args:
        arch: the HF architecture.
        attention_backend: passed to ``ShadowCoreAttention`` (``"sdpa"``, ``"flex"``, ...), or
            ``"megatron"`` for Megatron's dense ``DotProductAttention``.
        core_attention: a class or ``ModuleSpec`` replacing the core attention outright.
        pre_process / post_process: default to "this is the first / last pipeline stage".
        vocab_divisor: Megatron's ``make_vocab_size_divisible_by``; the embedding and output layer
            have ``padded_vocab_size(arch.vocab_size, tp, vocab_divisor)`` rows in total.
        params_dtype: fp32 by default (the replay-exactness setting).
        recompute: full activation recomputation.
        config_overrides: extra ``TransformerConfig`` fields.

    Weights are Megatron's random init; load real ones with
    :func:`megatron_smd.learner.convert.load_hf_into_model`.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_gpt_model: initialize a ParallelLayout first")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    config = transformer_config(arch, tp=tp, pp=pp, cp=cp, params_dtype=params_dtype,
                                init_method_std=init_method_std, recompute=recompute, **config_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = SMDGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention_backend, core_attention),
        vocab_size=padded_vocab_size(arch.vocab_size, tp, vocab_divisor),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
    )
    model.arch = arch
    model.vocab_divisor = vocab_divisor
    if params_dtype != torch.float32:
        # Without apex/TE the local spec's norms are torch's, created in fp32 whatever params_dtype
        # says; Megatron's Float16Module would cast them. Cast parameters only (buffers such as
        # RoPE's inv_freq stay fp32), before DDP and the optimizer see them.
        for p in model.parameters():
            if p.dtype != params_dtype and p.is_floating_point():
                p.data = p.data.to(params_dtype)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model

