"""FP8 K/V in the patched server, stored and read exactly as the learner replays them.

SGLang 0.5.23 keeps an FP8 KV cache (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``) as one byte per
element, but on CPU its ``torch_native`` backend stores ``k.to(fp8)`` and reads ``fp8.to(q.dtype)``:
per-layer scales reach neither side. The learner replays ``fake_quant_kv`` (divide by the layer's
scale in the compute dtype, cast to FP8; read back as ``fp32(fp8) * fp32(scale)`` rounded to the
compute dtype: :mod:`megatron_smd.quant.kv`). This module makes the server do exactly that:

* **Store**: SGLang's own ``MHATokenToKVPool.set_kv_buffer`` receives K and V already cast to FP8
  by :func:`~megatron_smd.quant.kv.quantize_kv` with the layer's scales (bit for bit SGLang's own
  scaled store, without its in-place division of the caller's tensors). Both pools use it: the
  per-layer pool of the evicting policies and SGLang's dense pool under ``--smd-policy none``.
* **Read**: every attention read dequantises with the layer's scales. torch_native's extend and
  decode get a compact cache of just the slots the batch reads (:meth:`ServerKV.compact`); the
  patch's batched decode attention and the eviction policies' key reads go through
  :meth:`ServerKV.load`. Unit scales need neither: SGLang's plain cast is already exact.
* **Which scales**: a ``kv_scales.json`` from ``smd calibrate-kv`` (``--smd-kv-scales``), checked
  by the launcher against the weights the server loads, or unit scales without one. The launcher
  hands the server processes a :class:`~megatron_smd.quant.cache.RolloutKV` as JSON in
  :data:`ENV_KV`; the server reports it back under ``/server_info`` (``smd.kv_cache``) and the
  trainer's client refuses servers whose cache differs from the config's, then stamps it on every
  trajectory, so the learner replays the rounding.

Served: ``fp8_e5m2`` on CPU (``torch_native``), through SGLang's generic FP8 pool
(``MHATokenToKVPool`` with an FP8 dtype, the pool its GPU backends use). SGLang 0.5.23 refuses
``fp8_e5m2`` on CPU in ``configure_kv_cache_dtype``, because its CPU attention kernels cannot read
it; the torch_native backend the patch serves CPU with reads any FP8 pool, so
:func:`install_cpu_dtype` lets e5m2 through there, only for a server the launcher configured
(:data:`ENV_KV` set). The launcher
refuses, with the reason, ``fp8_e4m3`` on CPU (SGLang 0.5.23 builds an e4m3 CPU cache only with
Intel AMX, for its ``intel_amx`` attention kernels) and FP8 on the Triton backend (its GQA decode
also rounds the query and the softmax weights to FP8, and its extend reads the chunk's own K/V
unrounded, which the learner does not replay).
"""

from __future__ import annotations

import json
import os

import torch

from megatron_smd.quant.cache import META_KEY as KV_META_KEY
from megatron_smd.quant.cache import RolloutKV
from megatron_smd.quant.kv import dequantize_kv, quantize_kv

#: Environment variable carrying the server's FP8 KV cache (``RolloutKV.to_meta()`` as JSON).
ENV_KV = "SMD_KV_CACHE"
#: ``--kv-cache-dtype`` values the patch serves (SGLang's ``auto`` plus the two FP8 formats).
SUPPORTED_KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")


def kv_from_env(env: dict | None = None) -> RolloutKV | None:
    """The FP8 cache :data:`ENV_KV` describes, or None (the model's dtype)."""
    raw = (os.environ if env is None else env).get(ENV_KV)
    if not raw:
        return None
    return RolloutKV.from_meta(json.loads(raw), where=f"${ENV_KV}")


def kv_to_env(kv: RolloutKV) -> str:
    return json.dumps(kv.to_meta())


def same_cache(a: dict | None, b: dict | None) -> bool:
    """Whether two ``RolloutKV.to_meta()`` dicts describe the same rounding (format, division,
    scales, calibration weights); where the scales file lives does not matter."""
    if a is None or b is None:
        return a is None and b is None
    keys = ("dtype", "division", "k_scale", "v_scale")
    return all(a.get(k) == b.get(k) for k in keys) and \
        (a.get("weights") or {}).get("fingerprint") == (b.get("weights") or {}).get("fingerprint")


class ServerKV:
    """The server process's FP8 cache: per-layer scales and the store / read rules above."""

    def __init__(self, kv: RolloutKV, compute_dtype: torch.dtype):
        self.kv = kv
        self.config = kv.config
        self.fp8 = kv.config.torch_dtype
        self.compute_dtype = compute_dtype
        #: any scale other than 1.0: reads must multiply (SGLang's cast alone is exact otherwise)
        self.scaled = any(s != 1.0 for s in kv.config.k_scales + kv.config.v_scales)

    def meta(self) -> dict:
        return self.kv.to_meta()

    def store(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer_id`` as FP8 tensors for SGLang's ``set_kv_buffer`` (already FP8: passed through)."""
        if k.dtype == self.fp8 and v.dtype == self.fp8:
            return k, v
        c = self.config
        ks, vs = c.scales(layer_id)
        return (quantize_kv(k, ks, c.dtype, division=c.division),
                quantize_kv(v, vs, c.dtype, division=c.division))

    def load(self, layer_id: int, which: int, stored: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """K (``which`` 0) or V (1) read from the pool (FP8, or its ``uint8`` bytes) as attention sees it."""
        if stored.dtype == torch.uint8:
            stored = stored.view(self.fp8)
        return dequantize_kv(stored, self.config.scales(layer_id)[which], dtype or self.compute_dtype)

    def compact(self, layer_id: int, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor,
                req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, dtype: torch.dtype):
        """torch_native's ``(k_cache, v_cache, req_to_token, req_pool_indices)`` replaced by the
        dequantised K/V of only the slots the batch reads (``req_to_token[row, :seq_len]`` of each
        request), with a table that indexes them: what SGLang's read would give with scales."""
        bs = int(req_pool_indices.shape[0])
        n = int(seq_lens.max()) if bs else 0
        slots = req_to_token[req_pool_indices.long(), :n].long().reshape(-1)
        k = self.load(layer_id, 0, k_cache[slots], dtype)
        v = self.load(layer_id, 1, v_cache[slots], dtype)
        table = torch.arange(bs * n, device=slots.device, dtype=req_to_token.dtype).view(bs, n)
        return k, v, table, torch.arange(bs, device=slots.device)


def install_store(MHATokenToKVPool, get_kv) -> None:
    """Wrap SGLang's ``MHATokenToKVPool.set_kv_buffer`` so every write of a scaled FP8 cache stores
    ``quantize_kv`` bytes (``get_kv()``: the process's :class:`ServerKV`, or None)."""
    import functools

    orig = MHATokenToKVPool.set_kv_buffer

    @functools.wraps(orig)
    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        skv = get_kv()
        if skv is not None and skv.scaled and self.dtype == skv.fp8 and cache_k is not None:
            lid = kwargs.get("layer_id_override")
            cache_k, cache_v = skv.store(layer.layer_id if lid is None else lid, cache_k, cache_v)
        return orig(self, layer, loc_info, cache_k, cache_v, *args, **kwargs)

    MHATokenToKVPool.set_kv_buffer = set_kv_buffer


def install_cpu_dtype(kv_cache_dtype_module, get_kv) -> None:
    """Wrap SGLang's ``configure_kv_cache_dtype`` so an ``fp8_e5m2`` cache is built on CPU when the
    patch serves it (``get_kv()`` not None: the launcher set :data:`ENV_KV`, and refuses any
    attention backend other than torch_native with FP8); anything else goes to SGLang unchanged."""
    import functools

    from sglang.srt.platforms import current_platform

    orig = kv_cache_dtype_module.configure_kv_cache_dtype

    @functools.wraps(orig)
    def configure_kv_cache_dtype(*, server_args_kv_cache_dtype: str, is_draft_worker: bool, **kwargs):
        kv = get_kv()
        if (server_args_kv_cache_dtype == "fp8_e5m2" and current_platform.is_cpu() and not is_draft_worker
                and kv is not None and kv.dtype == "fp8_e5m2"):
            return "fp8_e5m2", torch.float8_e5m2
        return orig(server_args_kv_cache_dtype=server_args_kv_cache_dtype, is_draft_worker=is_draft_worker, **kwargs)

    kv_cache_dtype_module.configure_kv_cache_dtype = configure_kv_cache_dtype


__all__ = ["ENV_KV", "KV_META_KEY", "SUPPORTED_KV_DTYPES", "ServerKV", "install_cpu_dtype", "install_store", "kv_from_env", "kv_to_env",
           "same_cache"]
