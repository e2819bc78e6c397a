"""The learner's core attention: Megatron-Core attention that replays the rollout's shadow mask.

``ShadowCoreAttention`` drops into a Megatron GPT layer spec in place of the local
``DotProductAttention`` (or TE's ``TEDotProductAttention``)::

    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=ShadowCoreAttention, params={"backend": "flex"})

and takes the shadow mask (the int32 ``evict`` of :mod:`megatron_smd.mask`, query ``i`` sees key
``j`` iff ``j <= i < evict[j]``) as its ``attention_mask``. The package has three parts:

* :mod:`.masks` - the mask math, only torch: the ``evict`` format, ``evict`` -> dense masks,
  FlexAttention block masks from column intervals, the padding rules;
* :mod:`.kernels` - the SDPA / FlexAttention / Transformer Engine kernels and their memory;
* :mod:`.core` - ``ShadowCoreAttention`` itself (the Megatron module: input checks, tensor,
  context and THD handling), the only part that imports Megatron-Core.

Every name is re-exported here. ``ShadowCoreAttention`` is loaded on first access, so importing
the package (or :mod:`.masks` / :mod:`.kernels`) does not import Megatron-Core. The flex kernel's
compile switches (``FLEX_COMPILE_BACKEND``, the compiled-kernel cache) live in :mod:`.kernels`;
set them there.
"""

from __future__ import annotations

from typing import Any

from .kernels import (
    BACKENDS,
    TE_FALLBACK_ORDER,
    Backend,
    TEMaskForm,
    flex_shadow_attention,
    sdpa_shadow_attention,
    te_form_candidates,
    te_select_form,
    te_shadow_attention,
    te_shadow_score_mod,
    te_shadow_score_mod_bprop,
    te_supports_score_mod,
)
from .masks import (
    DEFAULT_FLEX_BLOCK,
    block_mask_by_enumeration,
    block_mask_from_intervals,
    effective_evict,
    flex_bucket_length,
    interval_block_tables,
    pad_rows_for_flex,
    shadow_mask_mod,
    visible_dense,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_FLEX_BLOCK",
    "TE_FALLBACK_ORDER",
    "Backend",
    "ShadowCoreAttention",
    "TEMaskForm",
    "block_mask_by_enumeration",
    "block_mask_from_intervals",
    "effective_evict",
    "flex_bucket_length",
    "flex_shadow_attention",
    "interval_block_tables",
    "pad_rows_for_flex",
    "sdpa_shadow_attention",
    "shadow_mask_mod",
    "te_form_candidates",
    "te_select_form",
    "te_shadow_attention",
    "te_shadow_score_mod",
    "te_shadow_score_mod_bprop",
    "te_supports_score_mod",
    "visible_dense",
]


def __getattr__(name: str) -> Any:
    """``ShadowCoreAttention`` from :mod:`.core`, imported (with Megatron-Core) on first use."""
    if name == "ShadowCoreAttention":
        from .core import ShadowCoreAttention  # noqa: PLC0415 (keeps Megatron-Core out of .masks)

        globals()[name] = ShadowCoreAttention
        return ShadowCoreAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
