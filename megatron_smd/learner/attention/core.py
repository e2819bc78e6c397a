"""``ShadowCoreAttention``: Megatron-Core core attention that replays the rollout's shadow mask.

It drops into a Megatron GPT layer spec in place of the local ``DotProductAttention`` (or TE's
``TEDotProductAttention``)::

    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=ShadowCoreAttention, params={"backend": "flex"})

Megatron builds it with the same keyword arguments it gives its own core attention and calls
``forward(query, key, value, attention_mask, attn_mask_type=..., attention_bias=...,
packed_seq_params=...)`` with RoPE already applied and GQA heads not expanded.
``attention_mask`` is the shadow mask ``evict`` (format: :mod:`megatron_smd.learner.attention.masks`);
the kernels it runs are in :mod:`megatron_smd.learner.attention.kernels`. This is the only part
of the package that imports Megatron-Core.

**Tensor parallelism.** Each TP rank holds ``hq = np / tp`` query heads and ``ng / tp`` KV groups;
rank ``r`` uses KV heads ``[r * ng/tp, (r+1) * ng/tp)`` of a per-head mask. When
``num_query_groups < tp`` Megatron replicates KV groups and hands the core attention a config
with ``num_query_groups = tp``; then a per-head mask with ``H_kv`` heads (``H_kv`` dividing
``tp``) is read as the model's true head count and rank ``r`` uses head ``r // (tp / H_kv)``,
exactly the group Megatron gave it.

**Context parallelism.** With a CP group of size ``cp > 1`` (from ``pg_collection.cp``, else
``megatron.core.parallel_state``), K and V are all-gathered in global order
(:func:`megatron_smd.parallel.cp.all_gather_cp`) and each rank computes exact attention for its
``s / cp`` local query rows (global positions :func:`megatron_smd.parallel.cp.local_positions`)
against all ``s`` keys with the global ``evict``. All-gather rather than a ring or Ulysses a2a
(details in :mod:`megatron_smd.parallel.cp`): one exact masked softmax per rank for any
column-interval mask, the ``O(s)`` mask is never sliced or sent, any KV-head count works; the
cost is the gathered K/V, ``2 * s * b * ng_local * hn`` elements per rank per layer. The
``cp_comm_type`` argument is accepted for interface compatibility; the exchange is always this
all-gather. THD with CP is refused (Megatron's THD CP layout partitions each document separately).

**THD.** With ``packed_seq_params.qkv_format == "thd"`` Megatron squeezes the batch dim and
passes ``[t, heads, hn]``; this module treats it as one packed row (``b = 1``; ``evict`` is
``[1, L, t]`` / ``[1, L, H_kv, t]`` with absolute positions, or ``None`` for causal-per-document
from ``cu_seqlens_q(_padded)``) and returns ``[t, hq * hn]``.

**FP8 KV replay.** An FP8 rollout's sampler attended to K and V rounded to its FP8 cache. The
learner replays that rounding when Megatron's per-call ``attention_bias`` argument carries a
:class:`~megatron_smd.quant.cache.KVReplay` (the learner's micro-batches do, for the shadow rows of
an FP8 rollout; :mod:`megatron_smd.learner.runner` passes it as ``extra_block_kwargs``): each
layer's K and V are rounded exactly as the sampler stored them (:meth:`KVReplay.apply
<megatron_smd.quant.cache.KVReplay.apply>`: the layer's K and V scale, the FP8 cast, the read
back; straight-through gradient) on the rows it names, before any backend runs (so ``sdpa``,
``flex`` and ``te`` all attend to the rounded values). Under TP each rank rounds its own KV heads
(the scales are per layer, the same scalar for every head); under CP each rank rounds its local
rows before the all-gather (elementwise, so the gathered K/V are the rounded ones). The argument
is otherwise refused: there is no additive attention bias.

Numerics: no dropout (replay must be deterministic; a non-zero ``attention_dropout`` is refused),
vanilla softmax only, ``softmax_scale`` default ``1/sqrt(hn)``. ``apply_query_key_layer_scaling``
is ignored: Megatron divides the scale by ``layer_number`` and multiplies the scores back by it
inside its fused softmax, so the product is the same.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import get_pg_rank, get_pg_size

from ...errors import ConfigError, MaskError, SMDError
from ...mask import EVICT_DTYPE, seq_end_from_cu
from ...parallel import cp as cp_utils
from ...quant.cache import KVReplay
from .kernels import (
    _TE_FORM_CHOICE,
    BACKENDS,
    Backend,
    TEMaskForm,
    _import_te,
    flex_shadow_attention,
    sdpa_shadow_attention,
    te_form_candidates,
    te_select_form,
    te_shadow_attention,
    te_supports_score_mod,
)
from .masks import DEFAULT_FLEX_BLOCK, block_mask_from_intervals, effective_evict, flex_bucket_length, pad_rows_for_flex


class ShadowCoreAttention(MegatronModule):
    """Megatron core attention that applies the shadow mask ``evict`` (see the module docstring;
    the mask format is in :mod:`megatron_smd.learner.attention.masks`).

    Constructor arguments are those of Megatron's ``DotProductAttention`` plus:

    Args:
        backend: ``"sdpa"`` (reference, CPU), ``"flex"`` (GPU) or ``"te"`` (GPU, Transformer Engine).
        flex_block_size: FlexAttention tile size (query and key).
        flex_compile: compile ``flex_attention`` (default: on CUDA only).
        flex_cpu_grad_fallback: on CPU under autograd, compute the same mask with SDPA instead of
            raising (FlexAttention has no CPU backward). Off by default: no silent fallback.
        te_mask_form: how the mask reaches TE (``"auto"``, ``"score_mod"``, ``"bias"``,
            ``"arbitrary"``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        backend: Backend = "sdpa",
        flex_block_size: int = DEFAULT_FLEX_BLOCK,
        flex_compile: Optional[bool] = None,
        flex_cpu_grad_fallback: bool = False,
        te_mask_form: TEMaskForm = "auto",
        **kwargs: Any,
    ):
        super().__init__(config=config)
        if kwargs:
            raise ConfigError(f"ShadowCoreAttention: unknown arguments {sorted(kwargs)}")
        if backend not in BACKENDS:
            raise ConfigError(f"ShadowCoreAttention: backend must be one of {list(BACKENDS)}, got {backend!r}")
        if te_mask_form not in ("auto", "score_mod", "bias", "arbitrary"):
            raise ConfigError(
                f"ShadowCoreAttention: te_mask_form must be auto/score_mod/bias/arbitrary, got {te_mask_form!r}"
            )
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.backend: str = backend
        self.flex_block_size = int(flex_block_size)
        self.flex_compile = flex_compile
        self.flex_cpu_grad_fallback = bool(flex_cpu_grad_fallback)
        self.te_mask_form: str = te_mask_form
        self.cp_comm_type = cp_comm_type  # accepted for interface compatibility; CP is always all-gather

        if attention_type != "self":
            raise ConfigError(
                "ShadowCoreAttention: attention_type must be 'self' (a shadow mask is causal self-attention), "
                f"got {attention_type!r}"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ConfigError(
                "ShadowCoreAttention: attn_mask_type must be causal (the shadow mask is causal by construction), "
                f"got {attn_mask_type}"
            )
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConfigError(
                f"ShadowCoreAttention: attention_dropout={dropout}; replaying the rollout needs deterministic "
                "attention, set TransformerConfig.attention_dropout=0.0"
            )
        if config.softmax_type != "vanilla":
            raise ConfigError(
                f"ShadowCoreAttention: softmax_type={config.softmax_type!r} is not supported (only 'vanilla')"
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ConfigError(
                f"ShadowCoreAttention: window_size={config.window_size} on layer {layer_number}; encode sliding "
                "windows in the shadow mask (evict[j] = j + window) instead"
            )

        # Process groups: pg_collection if given, else Megatron's parallel_state when initialized,
        # else a single process.
        if pg_collection is not None:
            self.tp_group = getattr(pg_collection, "tp", None)
            self.cp_group = getattr(pg_collection, "cp", None)
        elif parallel_state.model_parallel_is_initialized():
            self.tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        else:
            self.tp_group = None
            self.cp_group = None
        self.pg_collection = pg_collection
        self.tp_size, self.tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        self.cp_size, self.cp_rank = get_pg_size(self.cp_group), get_pg_rank(self.cp_group)

        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        if heads % self.tp_size or groups % self.tp_size:
            raise ConfigError(
                f"ShadowCoreAttention: num_attention_heads={heads} and num_query_groups={groups} must be divisible "
                f"by the tensor-parallel size {self.tp_size}"
            )
        self.num_heads_local = heads // self.tp_size
        self.num_groups_global = groups  # == tp when Megatron replicated KV groups (num_query_groups < tp)
        self.num_groups_local = groups // self.tp_size
        self.head_dim = config.kv_channels or config.hidden_size // heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

        self._block_mask_cache: Optional[tuple[tuple, Tensor, BlockMask]] = None
        self._q_pos_cache: Optional[Tensor] = None
        self._te_attention: Any = None
        if backend == "te":
            te = _import_te()
            # Kept out of the nn.Module tree on purpose: it has no parameters, and registering it
            # would add TE's "_extra_state" to checkpoints, tying them to the backend.
            object.__setattr__(
                self,
                "_te_attention",
                te.DotProductAttention(
                    num_attention_heads=self.num_heads_local,
                    kv_channels=self.head_dim,
                    num_gqa_groups=self.num_groups_local,
                    attention_dropout=0.0,
                    qkv_format="sbhd",
                    attn_mask_type="causal",
                    layer_number=self.layer_number,
                    attention_type="self",
                    softmax_scale=self.softmax_scale,
                ),
            )

    # ---- input handling ------------------------------------------------------------------------

    def _kv_head_slice(self, h_mask: int) -> tuple[int, int]:
        """(first head, count) of a per-head mask with ``h_mask`` global KV heads on this TP rank."""
        if h_mask == self.num_groups_global:
            return self.tp_rank * self.num_groups_local, self.num_groups_local
        if self.num_groups_global == self.tp_size and h_mask < self.tp_size and self.tp_size % h_mask == 0:
            # Megatron replicated KV groups (num_query_groups < tp): rank r holds group r // (tp / ng).
            return self.tp_rank // (self.tp_size // h_mask), 1
        raise MaskError(
            f"attention_mask (evict) has {h_mask} KV heads; layer {self.layer_number} has {self.num_groups_global} "
            f"KV heads (num_query_groups) over tensor-parallel size {self.tp_size}; "
            f"expected 1 or {self.num_groups_global}"
        )

    def _layer_evict(self, evict: Tensor, batch: int, seq_len: int, device: torch.device) -> Tensor:
        """Validate the micro-batch mask and return this layer's effective rows.

        Returns ``[b, s]`` (per-layer, or per-head with one head) or ``[b, ng_local, s]``.
        """
        if not isinstance(evict, Tensor):
            raise MaskError(f"attention_mask must be the int32 shadow mask tensor or None, got {type(evict).__name__}")
        if evict.dtype != EVICT_DTYPE or evict.dim() not in (3, 4):
            raise MaskError(
                f"attention_mask must be the int32 shadow mask evict [b, L, s] or [b, L, H_kv, s], got dtype "
                f"{evict.dtype} shape {list(evict.shape)} (a Megatron boolean [b, 1, s, s] mask is not a shadow mask)"
            )
        b, L, s = evict.shape[0], evict.shape[1], evict.shape[-1]
        if b != batch:
            raise MaskError(f"attention_mask (evict) has batch {b}, the query has batch {batch}")
        if L != self.config.num_layers:
            raise MaskError(f"attention_mask (evict) has {L} layers, the model has num_layers={self.config.num_layers}")
        if self.layer_number > L:
            raise MaskError(f"attention_mask (evict) has {L} layers, cannot index layer_number={self.layer_number}")
        if s != seq_len:
            cp_note = ""
            if self.cp_size > 1:
                cp_note = f" (= {seq_len // self.cp_size} local rows x cp {self.cp_size}; evict must stay global)"
            raise MaskError(f"attention_mask (evict) has length {s}, the sequence has length {seq_len}{cp_note}")
        row = evict[:, self.layer_number - 1]
        if row.dim() == 3:
            h = row.shape[1]
            if h == 1:
                row = row[:, 0]
            else:
                first, count = self._kv_head_slice(h)
                row = row[:, first : first + count]
        return effective_evict(row.to(device, non_blocking=True))

    def _local_q_pos(self, seq_len: int, device: torch.device) -> Optional[Tensor]:
        if self.cp_size == 1:
            return None
        q = self._q_pos_cache
        if q is None or q.numel() != seq_len // self.cp_size or q.device != device:
            q = cp_utils.local_positions(seq_len, self.cp_rank, self.cp_size, device=device)
            self._q_pos_cache = q
        return q

    def _block_mask(
        self, mask_source: Optional[Tensor], evict_eff: Optional[Tensor], q_pos: Optional[Tensor], seq_len: int, hq: int
    ) -> BlockMask:
        """BlockMask of this layer and micro-batch, cached on the memory of ``mask_source``.

        ``mask_source`` is the tensor the mask came from (the micro-batch ``evict``, or THD
        ``cu_seqlens``; ``None`` for plain causal). The key is its storage address, offset, shape,
        strides and version counter, not its Python identity, so the detached copy that
        activation recompute (``tensor_parallel.checkpoint``) passes back in still hits; the cache
        holds a reference to the tensor, so its memory cannot be reused by another tensor while
        cached, and an in-place write bumps the (shared) version counter. Inference-mode tensors
        have no version counter and are never cached.
        """
        if mask_source is not None and mask_source.is_inference():
            return block_mask_from_intervals(evict_eff, q_pos, seq_len, num_q_heads=hq, block=self.flex_block_size)
        src = None
        if mask_source is not None:
            src = (
                mask_source.untyped_storage().data_ptr(),
                mask_source.storage_offset(),
                tuple(mask_source.shape),
                mask_source.stride(),
                mask_source.dtype,
                mask_source.device,
                mask_source._version,
            )
        key = (src, seq_len, q_pos.numel() if q_pos is not None else None, hq,
               evict_eff.device if evict_eff is not None else None)
        cached = self._block_mask_cache
        if cached is not None and cached[0] == key:
            return cached[2]
        bm = block_mask_from_intervals(evict_eff, q_pos, seq_len, num_q_heads=hq, block=self.flex_block_size)
        self._block_mask_cache = (key, mask_source, bm)  # the reference pins mask_source's memory
        return bm

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Masked attention.

        Args:
            query: ``[sq, b, hq, hn]`` (THD: ``[t, hq, hn]``), RoPE applied.
            key, value: ``[sk, b, hkv, hn]`` (THD: ``[t, hkv, hn]``), GQA not expanded. Under CP,
                ``sq = sk = s / cp`` local rows in Megatron's chunk layout.
            attention_mask: int32 ``evict`` ``[b, L, s]`` / ``[b, L, H_kv, s]`` (global ``s``), or
                ``None`` for causal.
            attention_bias: ``None``, or a :class:`~megatron_smd.quant.cache.KVReplay` (the FP8 K/V
                rounding to replay; module docstring).
        Returns:
            ``[sq, b, hq * hn]`` (THD: ``[t, hq * hn]``).
        """
        kv_replay = None
        if isinstance(attention_bias, KVReplay):
            kv_replay = attention_bias
            if kv_replay.config.num_layers != self.config.num_layers:
                raise SMDError(f"ShadowCoreAttention: the FP8 KV replay has scales for {kv_replay.config.num_layers} "
                               f"layers, the model has num_layers={self.config.num_layers}")
        elif attention_bias is not None:
            raise SMDError("ShadowCoreAttention: attention_bias is not supported (only an FP8 KV replay, "
                           "megatron_smd.quant.cache.KVReplay); the shadow mask is the only mask")
        if attn_mask_type not in (None, AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ConfigError(f"ShadowCoreAttention: attn_mask_type must be causal, got {attn_mask_type}")
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise SMDError(
                f"ShadowCoreAttention: packed_seq_params with qkv_format={packed_seq_params.qkv_format!r} is not "
                "supported; pack documents into the absolute evict (megatron_smd.mask.pack) instead"
            )
        if thd:
            if self.cp_size > 1:
                raise SMDError(
                    "ShadowCoreAttention: THD with context parallelism is not supported (Megatron's THD CP layout "
                    "partitions each document); use sbhd rows with an absolute evict"
                )
            if query.dim() != 3:
                raise SMDError(f"ShadowCoreAttention: THD query must be [t, heads, hn], got {list(query.shape)}")
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
            raise SMDError(
                f"ShadowCoreAttention: expected query [sq, b, hq, hn] and key/value [sk, b, hkv, hn], got "
                f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
            )
        sq, b, hq, hn = query.shape
        if hq != self.num_heads_local or key.shape[2] != self.num_groups_local or hn != self.head_dim:
            raise SMDError(
                f"ShadowCoreAttention (layer {self.layer_number}): got {hq} query heads, {key.shape[2]} KV heads, "
                f"head dim {hn}; expected {self.num_heads_local}, {self.num_groups_local}, {self.head_dim} "
                "per tensor-parallel rank"
            )
        seq_len = key.shape[0] * self.cp_size
        if sq * self.cp_size != seq_len:
            raise SMDError(
                f"ShadowCoreAttention: {sq} query rows but {key.shape[0]} key rows; self-attention needs equal lengths"
            )

        mask_source = attention_mask  # the tensor the flex BlockMask cache is keyed on
        if attention_mask is not None:
            evict_eff = self._layer_evict(attention_mask, b, seq_len, query.device)
        elif thd:
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = cu if cu is not None else packed_seq_params.cu_seqlens_q
            if cu is None or int(cu[-1]) != seq_len:
                raise SMDError(f"ShadowCoreAttention: THD cu_seqlens must end at the packed length {seq_len}, got {cu}")
            evict_eff = seq_end_from_cu(cu).to(device=query.device, dtype=EVICT_DTYPE).view(1, seq_len)
            mask_source = cu
        else:
            evict_eff = None

        if kv_replay is not None:  # the sampler's FP8 rounding, on this rank's heads and rows (before CP)
            key, value = kv_replay.apply(self.layer_number - 1, key, value, batch_dim=1)
        q_pos = self._local_q_pos(seq_len, query.device)
        if self.cp_size > 1:
            key = cp_utils.all_gather_cp(key, 0, self.cp_group)
            value = cp_utils.all_gather_cp(value, 0, self.cp_group)

        out = self._attend(query, key, value, mask_source, evict_eff, q_pos, seq_len)
        return out.squeeze(1) if thd else out

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask_source: Optional[Tensor],
        evict_eff: Optional[Tensor],
        q_pos: Optional[Tensor],
        seq_len: int,
    ) -> Tensor:
        if self.backend == "sdpa":
            return sdpa_shadow_attention(q, k, v, evict_eff, q_pos, self.softmax_scale)
        if self.backend == "te":
            te = self._te_attention
            if self.te_mask_form != "auto" or (evict_eff is None and q_pos is None):
                return te_shadow_attention(te, q, k, v, evict_eff, q_pos, self.te_mask_form)  # type: ignore[arg-type]
            key = (q.dtype, q.device.type, tuple(q.shape[2:]), k.shape[2], tuple(evict_eff.shape[1:-1])
                   if evict_eff is not None else None, q_pos is None)
            if key in _TE_FORM_CHOICE:
                return te_shadow_attention(te, q, k, v, evict_eff, q_pos, _TE_FORM_CHOICE[key])
            candidates, skipped = te_form_candidates(q.dtype, te_supports_score_mod(te))
            form, out = te_select_form(lambda f: te_shadow_attention(te, q, k, v, evict_eff, q_pos, f),
                                       candidates, skipped)
            _TE_FORM_CHOICE[key] = form
            return out
        # flex
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if q.device.type == "cpu":
            if needs_grad:
                if not self.flex_cpu_grad_fallback:
                    raise ConfigError(
                        f"backend='flex' cannot run backward on CPU (torch {torch.__version__} FlexAttention has "
                        "no CPU backward); use backend='sdpa' for CPU training, run forward under torch.no_grad(), "
                        "or pass flex_cpu_grad_fallback=True to compute the same mask with SDPA"
                    )
                return sdpa_shadow_attention(q, k, v, evict_eff, q_pos, self.softmax_scale)
            # torch refuses CPU inputs that require grad even under no_grad; nothing needs grad here.
            q, k, v = q.detach(), k.detach(), v.detach()
        if q_pos is None:  # no CP: run at a bucketed length (a handful of compiled kernels per run)
            padded = flex_bucket_length(seq_len, self.flex_block_size)
            if padded != seq_len:
                q, k, v, evict_eff = pad_rows_for_flex(q, k, v, evict_eff, padded)
                block_mask = self._block_mask(mask_source, evict_eff, None, padded, q.shape[2])
                return flex_shadow_attention(q, k, v, block_mask, self.softmax_scale, self.flex_compile)[:seq_len]
        block_mask = self._block_mask(mask_source, evict_eff, q_pos, seq_len, q.shape[2])
        return flex_shadow_attention(q, k, v, block_mask, self.softmax_scale, self.flex_compile)
