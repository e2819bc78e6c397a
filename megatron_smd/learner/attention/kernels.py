"""The attention kernels of the learner's shadow attention: SDPA, FlexAttention, Transformer Engine.

All take ``q: [sq, b, hq, hn]`` and ``k, v: [s, b, hkv, hn]`` in global key order (GQA not
expanded), one layer's effective mask ``evict_eff: None | [b, s] | [b, hkv_local, s]``
(:func:`megatron_smd.learner.attention.masks.effective_evict`) and ``q_pos: None`` (rows are
``0..s-1``) ``| [sq]``, and return ``[sq, b, hq * hn]``. No Megatron-Core here: the module that
calls them from a Megatron layer is :mod:`megatron_smd.learner.attention.core`.

**Backends** (``backend=``), with their memory per layer and micro-batch (``sq`` local query
rows, ``s`` keys, ``hq`` local query heads):

* ``"sdpa"`` - the reference and the CPU training path. Builds a dense boolean mask from
  ``evict`` (``megatron_smd.mask.layer_dense``) and calls ``torch.nn.functional.
  scaled_dot_product_attention`` (GQA via ``enable_gqa``). Mask memory ``b * sq * s`` bytes for
  per-layer masks, ``b * hq * sq * s`` for per-head masks (expanded to query heads), kept alive
  for backward. Plain causal (``attention_mask=None``, no CP) takes SDPA's ``is_causal`` path
  with no mask tensor.
* ``"flex"`` - the GPU path. ``torch.nn.attention.flex_attention`` with a ``mask_mod`` that
  reads ``evict`` (``kv <= q < evict[b, (h,) kv]``) and a ``BlockMask`` built once per layer and
  micro-batch (cached on the ``evict`` tensor's memory and version, so activation recompute
  reuses it). The BlockMask is built directly from the per-block min/max of the column intervals
  (:func:`.masks.block_mask_from_intervals`, ``O(b * h * (s + (sq/B) * (s/B)))`` time and memory,
  ``B`` = block size), not by evaluating ``mask_mod`` on all ``sq * s`` pairs as
  ``create_block_mask`` does. Kernel memory is
  ``O(sq * hq * hn)``: no score or mask matrix. Compiled with ``torch.compile`` on CUDA. On CPU
  torch runs FlexAttention forward only (eager, unfused math: it materialises the scores) and
  refuses backward; under autograd on CPU this backend raises unless ``flex_cpu_grad_fallback=
  True`` was given, in which case it computes the identical mask with ``"sdpa"``.
* ``"te"`` - Transformer Engine ``DotProductAttention`` on GPU (imported lazily; refused with a
  clear message when TE or CUDA is missing). Mask forms (``te_mask_form=``), most compact first:

  - ``"score_mod"`` (TE >= 2.17 with ``nvidia-cudnn-frontend``, fp16/bf16 only): cuDNN score
    modifier evaluating ``kv <= q_pos[q] < evict[kv]`` from ``O(s)`` runtime tensors
    (``evict [b, 1|hq, 1, s]``, ``q_pos [1, 1, sq, 1]``). No mask matrix, but no tile skipping
    either (full ``sq * s`` compute).
  - ``"bias"``: post-scale bias ``[b, 1|hq, sq, s]`` (0 or the dtype's minimum), with TE's
    ``causal`` mask type when the local rows are ``0..s-1`` (no CP) so cuDNN skips the upper
    triangle, ``no_mask`` otherwise. ``2 * b * (1|hq) * sq * s`` bytes (bf16), freed after the
    layer's backward.
  - ``"arbitrary"``: boolean mask of the same shape (1 byte per entry); TE runs it only on its
    unfused backend (``O(sq * s)`` scores in memory).

  ``"auto"`` chooses once, on the first call for a dtype / head / mask layout, by trying what TE
  accepts for these inputs: ``score_mod`` (fp16/bf16 and a TE that has it), then ``bias``, then
  ``arbitrary``; every form left out or refused is logged with TE's reason
  (:func:`te_select_form`), and a :class:`ConfigError` lists them all if TE refuses every one.
  fp32 has no fused TE kernel: it runs TE's unfused attention (``O(sq * s)`` scores), logged.
  ``attention_mask=None`` without CP uses TE's own ``causal`` mask type (no mask tensor).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ...errors import ConfigError
from .masks import _expand_heads, visible_dense

_log = logging.getLogger(__name__)

Backend = Literal["sdpa", "flex", "te"]
TEMaskForm = Literal["auto", "score_mod", "bias", "arbitrary"]
BACKENDS: tuple[str, ...] = ("sdpa", "flex", "te")


def _to_bhsd(x: Tensor) -> Tensor:
    return x.permute(1, 2, 0, 3)


def _from_bhsd(o: Tensor) -> Tensor:
    b, h, sq, d = o.shape
    return o.permute(2, 0, 1, 3).reshape(sq, b, h * d)


def sdpa_shadow_attention(
    q: Tensor, k: Tensor, v: Tensor, evict_eff: Optional[Tensor], q_pos: Optional[Tensor], scale: float
) -> Tensor:
    """Dense-mask SDPA (the reference path). Mask memory: see the module docstring."""
    hq, hkv, s = q.shape[2], k.shape[2], k.shape[0]
    qb, kb, vb = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
    gqa = hq != hkv
    if evict_eff is None and q_pos is None:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        return _from_bhsd(out)
    mask = visible_dense(evict_eff, q_pos, s, q.device)
    if mask.shape[1] > 1:
        mask = _expand_heads(mask, hq // mask.shape[1])
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return _from_bhsd(out)


_COMPILED_FLEX: Optional[Callable] = None
#: ``torch.compile`` backend of the flex kernel (tests swap in a graph-counting backend).
FLEX_COMPILE_BACKEND: Any = "inductor"


def _flex_kernel(device: torch.device, compile_flex: Optional[bool]) -> Callable:
    """Compiled ``flex_attention`` on CUDA (the eager version is an unfused reference).

    Static shapes (``dynamic=False``: fixed-size kernels, no symbolic-shape guards), fed only
    bucketed row lengths (:func:`flex_bucket_length`), so a run compiles one graph per bucket and
    batch shape instead of one per row length (past dynamo's recompile limit torch would fall back
    to eager flex, which materialises the whole score matrix)."""
    global _COMPILED_FLEX
    use_compile = (device.type == "cuda") if compile_flex is None else compile_flex
    if not use_compile:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False, backend=FLEX_COMPILE_BACKEND)
    return _COMPILED_FLEX



def flex_shadow_attention(
    q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float, compile_flex: Optional[bool] = None
) -> Tensor:
    """FlexAttention with a prebuilt shadow BlockMask (its ``mask_mod`` reads ``evict``)."""
    qb, kb, vb = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v)
    kernel = _flex_kernel(q.device, compile_flex)
    out = kernel(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return _from_bhsd(out)


# ---- Transformer Engine ------------------------------------------------------------------------


def _import_te() -> Any:
    """``transformer_engine.pytorch``, or a clear refusal."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "backend='te' needs a CUDA device (Transformer Engine has no CPU kernels); "
            "use backend='sdpa' on CPU"
        )
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415 (optional GPU dependency)
    except ImportError as exc:
        raise ConfigError(
            "backend='te' needs Transformer Engine: pip install 'megatron-smd[gpu]' "
            f"(transformer-engine[pytorch]); import failed: {exc}"
        ) from exc
    return te


def _import_cudnn_frontend() -> Any:
    import cudnn  # noqa: PLC0415 (nvidia-cudnn-frontend; needed only by the score_mod path)

    return cudnn


def _te_keep(graph: Any, like: Any, tensors: dict) -> Any:
    """cuDNN graph ops for ``kv <= q_pos[q] < evict[kv]`` over the score tile ``like``."""
    cudnn = _import_cudnn_frontend()
    col = graph.gen_index(input=like, axis=3)
    col.set_data_type(cudnn.data_type.INT32)
    seen = graph.cmp_ge(input=tensors["q_pos"], comparison=col, compute_data_type=cudnn.data_type.BOOLEAN)
    seen.set_data_type(cudnn.data_type.BOOLEAN)
    alive = graph.cmp_gt(input=tensors["evict"], comparison=tensors["q_pos"], compute_data_type=cudnn.data_type.BOOLEAN)
    alive.set_data_type(cudnn.data_type.BOOLEAN)
    keep = graph.logical_and(a=seen, b=alive, compute_data_type=cudnn.data_type.BOOLEAN)
    keep.set_data_type(cudnn.data_type.BOOLEAN)
    return keep


def te_shadow_score_mod(graph: Any, score: Any, tensors: dict) -> Any:
    """TE/cuDNN ``score_mod``: the score where the shadow mask keeps it, else ``neg_inf``.

    A module-level function (no closure), so TE caches the cuDNN graph by its qualified name;
    ``evict`` and ``q_pos`` are runtime tensors and may change every call.
    """
    return graph.binary_select(input0=score, input1=tensors["neg_inf"], mask=_te_keep(graph, score, tensors))


def te_shadow_score_mod_bprop(graph: Any, d_score: Any, tensors: dict) -> Any:
    """Derivative of :func:`te_shadow_score_mod`: pass ``dP`` where kept, 0 where masked."""
    return graph.binary_select(input0=d_score, input1=tensors["zero"], mask=_te_keep(graph, d_score, tensors))


def te_supports_score_mod(te_attention: Any) -> bool:
    """Whether this TE build has the cuDNN score_mod path (TE >= 2.17 + cudnn frontend)."""
    if "score_mod" not in inspect.signature(te_attention.forward).parameters:
        return False
    try:
        _import_cudnn_frontend()
    except ImportError:
        return False
    return True


#: ``te_mask_form: auto``'s choice per (dtype, heads, head dim, mask shape, row layout), made once
#: by :func:`te_select_form` on the first call and reused by every layer after.
_TE_FORM_CHOICE: dict = {}
TE_FALLBACK_ORDER = ("score_mod", "bias", "arbitrary")


def te_form_candidates(dtype: torch.dtype, has_score_mod: bool) -> tuple[list[str], dict[str, str]]:
    """The forms ``auto`` tries, in order, and why any of :data:`TE_FALLBACK_ORDER` is left out."""
    skipped = {}
    if dtype not in (torch.float16, torch.bfloat16):
        skipped["score_mod"] = (f"cuDNN score_mod needs fp16/bf16, tensors are {dtype} (TE has no fused "
                                f"{dtype} attention: what it accepts runs unfused, O(sq * s) scores)")
    elif not has_score_mod:
        skipped["score_mod"] = "this Transformer Engine has no score_mod (needs TE >= 2.17 + nvidia-cudnn-frontend)"
    return [f for f in TE_FALLBACK_ORDER if f not in skipped], skipped


def te_select_form(run: Callable[[str], Tensor], candidates: Sequence[str], skipped: Optional[dict] = None
                   ) -> tuple[str, Tensor]:
    """Try ``run(form)`` for each candidate in order (score_mod -> post-scale bias -> arbitrary
    mask); the first one Transformer Engine accepts wins. Every refusal (TE raises when no backend
    takes the inputs: "No dot product attention backend is available ...") is logged with its
    reason; if none is accepted, a :class:`ConfigError` lists them all."""
    reasons = dict(skipped or {})
    for form in candidates:
        try:
            out = run(form)
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError) as e:
            reasons[form] = f"{type(e).__name__}: {e}"
            continue
        for f, why in reasons.items():
            _log.warning("shadow attention (te): mask form %r not used: %s", f, why)
        _log.warning("shadow attention (te): using mask form %r", form)
        return form, out
    raise ConfigError("Transformer Engine accepted none of the shadow-mask forms for these inputs: "
                      + "; ".join(f"{f}: {why}" for f, why in reasons.items())
                      + " (use backend 'flex' or 'sdpa')")


def te_shadow_attention(
    te_attention: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    evict_eff: Optional[Tensor],
    q_pos: Optional[Tensor],
    mask_form: TEMaskForm,
) -> Tensor:
    """Call a TE ``DotProductAttention`` (sbhd, no TE-side CP) with the most compact mask form."""
    hq, s, sq = q.shape[2], k.shape[0], q.shape[0]
    rows_are_causal = q_pos is None and sq == s
    if evict_eff is None and rows_are_causal:
        return te_attention(q, k, v, qkv_format="sbhd", attn_mask_type="causal")
    form = mask_form
    if form == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        form = "score_mod" if half and te_supports_score_mod(te_attention) else "bias"
    if form == "score_mod":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"te_mask_form='score_mod' needs fp16/bf16 tensors, got {q.dtype}")
        if not te_supports_score_mod(te_attention):
            raise ConfigError(
                "te_mask_form='score_mod' needs Transformer Engine >= 2.17 with nvidia-cudnn-frontend; "
                "use te_mask_form='bias'"
            )
        qp = q_pos if q_pos is not None else torch.arange(sq, device=q.device)
        if evict_eff is None:
            e4 = torch.full((1, 1, 1, s), s, dtype=torch.int32, device=q.device)
        elif evict_eff.dim() == 2:
            e4 = evict_eff.view(evict_eff.shape[0], 1, 1, s)
        else:
            e4 = _expand_heads(evict_eff, hq // evict_eff.shape[1]).unsqueeze(2)
        common = {"evict": e4.to(torch.int32).contiguous(), "q_pos": qp.to(torch.int32).view(1, 1, sq, 1).contiguous()}
        return te_attention(
            q,
            k,
            v,
            qkv_format="sbhd",
            attn_mask_type="no_mask",
            score_mod=te_shadow_score_mod,
            score_mod_bprop=te_shadow_score_mod_bprop,
            score_mod_tensors={**common, "neg_inf": torch.full((1, 1, 1, 1), -1e9)},
            score_mod_bprop_tensors={**common, "zero": torch.zeros((1, 1, 1, 1))},
        )
    vis = visible_dense(evict_eff, q_pos, s, q.device)  # [b|1, 1|h, sq, s]
    if vis.shape[1] > 1:
        vis = _expand_heads(vis, hq // vis.shape[1])
    if form == "bias":
        bias = torch.zeros(vis.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~vis, torch.finfo(q.dtype).min)
        return te_attention(
            q,
            k,
            v,
            qkv_format="sbhd",
            attn_mask_type="causal" if rows_are_causal else "no_mask",
            core_attention_bias_type="post_scale_bias",
            core_attention_bias=bias,
        )
    if form == "arbitrary":
        return te_attention(q, k, v, qkv_format="sbhd", attention_mask=~vis, attn_mask_type="arbitrary")
    raise ConfigError(f"te_mask_form must be one of auto/score_mod/bias/arbitrary, got {mask_form!r}")
