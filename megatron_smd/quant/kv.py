"""FP8 KV cache as SGLang 0.5.23 stores and reads it, reproduced bit for bit for the learner.

SGLang can keep K and V in FP8 (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``), halving the KV bytes
of a bf16 model. The sampler then attends to rounded keys and values; the learner replays that
rounding ("quantisation joins eviction in the shadow") with :func:`fake_quant_kv` on K and V,
with the same per-layer scales and the same arithmetic, before attention.

What SGLang 0.5.23 does (paths under ``site-packages/sglang/``; read from the installed sources)
============================================================================================

Storage (``srt/mem_cache/memory_pool.py``, class ``MHATokenToKVPool``, 2184)
    * ``--kv-cache-dtype fp8_e4m3`` maps to ``torch.float8_e4m3fn`` and ``fp8_e5m2`` to
      ``torch.float8_e5m2`` on CUDA (``srt/mem_cache/kv_cache_dtype.py`` 60-71; HIP uses the
      ``fnuz`` variants; ``fp8_e5m2`` is refused on CPU, 61-62). The buffers are allocated as
      ``uint8`` and viewed as the FP8 dtype (``memory_pool.py`` 2029-2033: ``index_put`` is not
      implemented for FP8).
    * ``set_kv_buffer(layer, loc, cache_k, cache_v, k_scale=None, v_scale=None)`` (2891): when the
      incoming K/V are not already FP8 (2926), it divides **in place in the model's dtype**
      (``cache_k.div_(k_scale)``, 2927-2930; skipped when the scale is ``None``), then casts with
      plain ``.to(fp8)`` (2931-2932), then stores the bytes (2934-2936). No clamp on this path.
    * The division is PyTorch's ``div_``, whose rounding depends on where the scale lives:

      - SGLang on CPU (any scale: a Python float or a 0-dim CPU tensor): correctly rounded fp32
        division ``fp32(x) / fp32(s)``, rounded once to the model dtype. Measured here against
        SGLang's own ``set_kv_buffer`` on CPU for every bf16 and fp16 bit pattern and adversarial
        fp32 values (tests/test_kv_quant.py). This module's ``division="exact"``.
      - CUDA, scale a Python float or a CPU scalar (the ``--quantization-param-path`` route, where
        ``layer.k_scale`` is a float): PyTorch's ``div_true_kernel_cuda`` multiplies by the fp32
        reciprocal, ``fp32(x) * fp32(1 / fp32(s))``; SGLang's fused commit kernel says the same of
        eager host-scalar division (``kernels/ops/kvcache/cache_move.py`` 125-126).
        ``division="reciprocal"``.
      - CUDA, scale a 0-dim CUDA tensor (the checkpoint route: ``layer.k_scale`` is an fp32
        ``Parameter`` on the GPU, ``srt/layers/quantization/kv_cache.py`` 39-44): the divisor is
        first rounded to the model dtype, then ``fp32(x) / fp32(dtype(s))``
        (``cache_move.py`` 119-123: "Tensor division rounds the divisor first").
        ``division="rounded_divisor"``. With a bf16 model and a scale like 0.37 this divides by
        0.369140625 while the read multiplies by 0.37: SGLang's own store/read mismatch.

      The three agree bit for bit whenever ``s`` is a power of two (the quotient is exact before
      its single rounding), which is why calibration rounds scales up to powers of two by default
      (:mod:`megatron_smd.quant.calibrate`). The two CUDA rules are read from the sources, not
      measured: no GPU was available when this was written; tests/test_kv_quant.py has the GPU
      check (marked ``gpu``).
    * The cast is PyTorch's c10 conversion, one function for host and device
      (``torch/include/torch/headeronly/util/Float8_e4m3fn.h`` 171-239, ``Float8_e5m2.h``
      77-144): round to nearest even from fp32 (bf16/fp16 widen exactly first), subnormals
      included, signed zero kept. ``float8_e4m3fn`` **saturates**: every finite ``|x| > 448`` and
      ±inf become ±448 (torch 2.13; older torch releases gave NaN), NaN stays NaN (0x7f|sign).
      ``float8_e5m2`` does not saturate: ``|x| >= 61440`` rounds to ±inf, NaN stays NaN.
    * ``set_kv_buffer_prefix_valid`` (3292, speculative-decoding commits only) clamps to
      ``±finfo.max`` before the cast (``saturate_to_fp8_range``, 3399-3401 and
      ``kernels/ops/quantization/fp8_kernel.py`` 111-129); it differs from ``set_kv_buffer`` only for
      e5m2 overflow. The rollout never takes it.

Which scale reaches ``set_kv_buffer``
    * ``torch_native`` backend (SGLang on CPU): ``set_kv_buffer(layer, loc, k, v)`` without scales
      (``srt/layers/attention/torch_native_backend.py`` 299-301, 367-369) and the read is a plain
      ``k_cache[tokens].to(q.dtype)`` (140-146, 241-247): **scales are ignored on both sides**, the
      cache holds ``fp8(x)``. Use unit scales (:meth:`KVQuantConfig.unit`) to replay it.
    * ``triton`` backend: store with ``layer.k_scale`` / ``layer.v_scale`` when set
      (``srt/layers/attention/triton_backend.py`` 1721-1745 extend, 2340-2351 decode), no division
      when ``layer.k_scale is None``.
    * ``flashinfer`` backend: stores with ``layer.k_scale`` / ``layer.v_scale``
      (``flashinfer_backend.py`` 997-1000) and hands ``layer.k_scale_float`` / ``v_scale_float`` to
      the flashinfer kernels (1437-1438, 1499-1500, 1572-1573); flashinfer itself is not
      installed here, so how it folds them was not read.

Reading back (what attention sees)
    * ``get_key_buffer`` returns the bytes viewed as the FP8 dtype (``memory_pool.py`` 2836-2850).
      No backend materialises ``fp8 * scale``: the scale is folded into the kernel.
    * ``triton``, cached keys: ``k_descale = layer.k_scale_float`` (else 1.0;
      ``triton_backend.py`` 1835-1840, 2368-2373). Prefix part of extend
      (``kernels/ops/attention/extend_attention.py``): ``qk = dot(q.to(fp8), k_fp8)`` (617-619),
      ``qk *= sm_scale * k_scale`` (642-645), ``acc += dot(p.to(fp8), v_fp8) * v_scale`` (702-712).
      GQA decode (``kernels/ops/attention/decode_attention.py``, grouped kernel, used when
      ``kv_group_num > 1``, 1269): ``q.to(fp8)`` (661) and ``p.to(fp8)`` (762) likewise, with
      ``k_scale`` folded into ``sm_scale`` (1255-1258) and the output multiplied by ``v_scale``.
      MHA decode (``kv_group_num == 1``): ``q * k`` in the model dtype, fp32 sums (345-352), no
      rounding of q or p. So on Triton with GQA, **q and the softmax weights are also rounded to
      the KV's FP8 dtype (unscaled)** wherever a cached key is read: a replay that fake-quantises
      K/V alone is not bit-exact there.
    * ``triton``, extend: the tokens of the chunk being prefilled attend to each other with the
      **unquantised** K/V of the chunk (``extend_attention.py`` 717-870 read ``K_Extend`` /
      ``V_Extend``, the raw tensors passed at ``triton_backend.py`` 1888-1891); only the cached
      prefix (radix-cache hits, earlier chunks) comes from the FP8 pool. Decode reads everything
      from the pool, the new token's own K/V included (stored first, 2340-2351).
    * ``torch_native``: extend and decode both read every key from the pool after storing, so
      every K/V it attends to is ``fp8(x)`` (prefill included).

Scales: where they come from, and the default
    * No quantization config and no ``--quantization-param-path``: ``RadixAttention.k_scale`` stays
      ``None`` (``srt/layers/radix_attention.py`` 94-97): no division, descale 1.0, i.e. scale 1.0.
      With ``fp8_e4m3`` SGLang warns "Defaulting to scaling factors of 1.0"
      (``srt/model_executor/model_runner_components/load_model_utils.py`` 119-139).
    * ``--quantization-param-path FILE`` (fp8_e4m3 only, 122-130): JSON
      ``{"model_type", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {tp_rank:
      {layer: s}}}}`` validated by ``KVCacheQuantSchema`` / ``QuantParamSchema``
      (``srt/model_loader/weight_utils.py`` 1861-1931; every TP rank, every layer). **One factor per
      layer** sets both ``attn.k_scale`` and ``attn.v_scale`` to a Python float
      (``srt/models/qwen2.py`` 480-496, ``llama.py`` 510-527) and leaves ``k_scale_float`` at
      ``None``, which the Triton backend then passes as the descale (1835-1837): that route looks
      broken for Triton in 0.5.23 (not run here: no GPU). A file that fails to load is *ignored*
      with a warning and scales default to 1.0 (``weight_utils.py`` 1961-1975).
    * ModelOpt checkpoints: ``hf_quant_config.json`` / ``quantization_config`` with
      ``kv_cache_quant_algo: FP8`` gives ``RadixAttention`` fp32 ``k_scale``/``v_scale`` parameters
      initialised to -1 (``srt/layers/quantization/kv_cache.py`` 32-46, via
      ``modelopt_quant.py`` 347-348); tensors named ``...self_attn.k_proj.k_scale`` /
      ``v_proj.v_scale`` (modelopt's export) are remapped to ``...self_attn.attn.k_scale``
      (``weight_utils.py`` 1779-1857, called by ``llama.py`` 748; Qwen2's legacy loader does not
      call it). After loading (``kv_cache.py`` 51-83): both positive → kept (×2 on fnuz/HIP);
      both ≤ 0 (absent) → 1.0; one → duplicated. ``k_scale_float`` = the fp32 value as a Python
      float. A KV-only export (``quant_algo: null``) is not recognised by
      ``srt/configs/model_config.py`` 1838-1894, so its scales are not loaded at all: with bf16
      weights the per-layer scales must be applied by our server patch (a later phase).

This module
===========
:func:`quantize_kv` is the store (division rule selectable, cast by torch exactly as SGLang's),
:func:`dequantize_kv` the elementwise read ``fp32(q) * fp32(s)`` rounded to the compute dtype
(exact for power-of-two scales; with other scales no elementwise read matches SGLang's folded
kernels to the bit), :func:`fake_quant_kv` both. :class:`KVQuantConfig` holds the FP8 dtype and
per-layer scales; :class:`KVScales` adds the weights they were calibrated on, stored as
``kv_scales.json`` (:func:`save_kv_scales`, :func:`load_kv_scales`). :func:`sglang_quant_param_json`
and :func:`modelopt_scale_tensors` write the two forms SGLang itself reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, FormatError
from ..model.hf import weight_files

#: ``--kv-cache-dtype`` value -> torch FP8 dtype (NVIDIA; SGLang maps HIP to the fnuz variants).
KV_CACHE_DTYPES: dict[str, torch.dtype] = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
#: Largest finite value of each format (``torch.finfo(dtype).max``).
FP8_MAX: dict[str, float] = {name: float(torch.finfo(dt).max) for name, dt in KV_CACHE_DTYPES.items()}
#: How the store divides by the scale (see the module docstring).
DIVISIONS = ("exact", "reciprocal", "rounded_divisor")
#: dtype names SGLang's own files use (``KVCacheQuantSchema.dtype``).
TORCH_DTYPE_NAMES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}

SCALES_FORMAT = "megatron-smd.kv_scales"
SCALES_FORMAT_VERSION = 1
_FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_FP8_TORCH = tuple(KV_CACHE_DTYPES.values())


def fp8_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--kv-cache-dtype`` name; :class:`ConfigError` for anything else."""
    try:
        return KV_CACHE_DTYPES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"kv cache dtype {name!r} is not supported (supported: {sorted(KV_CACHE_DTYPES)})") from None


def _f32(v: float) -> float:
    """``v`` rounded to fp32 (round to nearest even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def is_fp32_exact(v: float) -> bool:
    """Whether ``v`` is exactly representable in fp32 (SGLang holds scales as fp32)."""
    try:
        return math.isfinite(v) and _f32(v) == v
    except OverflowError:
        return False


def is_power_of_two(v: float) -> bool:
    return v > 0 and math.isfinite(v) and math.frexp(v)[0] == 0.5


def round_up_pow2(v: float) -> float:
    """Smallest power of two ``>= v`` (``v`` itself when it is one), for a positive finite ``v``."""
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"round_up_pow2: needs a positive finite value, got {v!r}")
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
    return v if m == 0.5 else math.ldexp(1.0, e)


def _check_scale(scale: Any, what: str = "scale") -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{what}: one scale per call (per-tensor), got a tensor of shape {list(scale.shape)}")
        scale = float(scale.detach().to(torch.float32).cpu().item())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{what}: expected a number, got {type(scale).__name__}")
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{what}: must be a positive finite number, got {s!r}")
    return _f32(s)


def quantize_kv(x: torch.Tensor, scale: float | torch.Tensor | None, dtype: str = "fp8_e4m3", *,
                division: str = "exact") -> torch.Tensor:
    """SGLang's FP8 store of K or V: ``x.div_(scale)`` in ``x.dtype``, then ``.to(fp8)``.

    Args:
        x: K or V in the model's compute dtype (bf16, fp16 or fp32), any shape, any device.
        scale: the layer's per-tensor scale (a positive float or 1-element tensor, taken as fp32),
            or ``None`` for SGLang's "no scale" (no division; the torch_native backend always).
        dtype: ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        division: ``"exact"`` (SGLang on CPU), ``"reciprocal"`` (CUDA, host scalar scale) or
            ``"rounded_divisor"`` (CUDA, scale a device tensor); see the module docstring. All three
            are identical for a power-of-two scale.

    Returns:
        The FP8 tensor (``torch.float8_e4m3fn`` / ``torch.float8_e5m2``), same shape and device; its
        bytes are what SGLang's pool holds. ``x`` is not modified.
    """
    fdt = fp8_dtype(dtype)
    if not x.is_floating_point() or x.dtype in _FP8_TORCH or x.dtype == torch.float64:
        raise TypeError(f"quantize_kv: x must be bf16, fp16 or fp32 (the model's dtype), got {x.dtype}")
    if division not in DIVISIONS:
        raise ValueError(f"quantize_kv: division must be one of {DIVISIONS}, got {division!r}")
    if scale is None:
        return x.to(fdt)
    s = _check_scale(scale)
    xf = x.to(torch.float32)
    if division == "exact":
        # a 0-dim tensor on x's device: true division on every device (a Python float would make
        # CUDA multiply by the reciprocal instead)
        y = xf / torch.tensor(s, dtype=torch.float32, device=x.device)
    elif division == "reciprocal":
        r = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)  # fp32, correctly rounded
        y = xf * r.to(x.device)
    else:
        d = torch.tensor(s, dtype=torch.float32).to(x.dtype).to(torch.float32)
        y = xf / d.to(x.device)
    return y.to(x.dtype).to(fdt)


def dequantize_kv(q: torch.Tensor, scale: float | torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 K or V back to ``out_dtype``: ``fp32(q) * fp32(scale)`` rounded once to ``out_dtype``.

    ``scale`` ``None`` or 1.0: a plain cast, exact (every e4m3/e5m2 value is a bf16/fp16/fp32 value),
    which is the torch_native read. SGLang's kernels never form this product (they fold the scale
    into the softmax scale and the output); it equals their math exactly when the scale is a
    power of two.
    """
    if q.dtype not in _FP8_TORCH:
        raise TypeError(f"dequantize_kv: q must be float8_e4m3fn or float8_e5m2, got {q.dtype}")
    if scale is None:
        return q.to(out_dtype)
    s = _check_scale(scale)
    if s == 1.0:
        return q.to(out_dtype)
    return (q.to(torch.float32) * torch.tensor(s, dtype=torch.float32, device=q.device)).to(out_dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the FP8 round trip; backward: the incoming gradient unchanged (straight through)."""

    @staticmethod
    def forward(ctx, x, scale, dtype, division):
        return dequantize_kv(quantize_kv(x, scale, dtype, division=division), scale, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def fake_quant_kv(x: torch.Tensor, scale: float | torch.Tensor | None, dtype: str = "fp8_e4m3", *,
                  division: str = "exact") -> torch.Tensor:
    """``dequantize_kv(quantize_kv(x, scale, dtype), scale, x.dtype)``: what attention reads for ``x``.

    Differentiable with a straight-through gradient (d out / d x = 1, saturated values included):
    autograd through the casts themselves would round the *gradient* to FP8 on its way back
    (the backward of ``q.to(fp32)`` casts the gradient to ``q``'s dtype).
    """
    if isinstance(scale, torch.Tensor):
        scale = _check_scale(scale)
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, scale, dtype, division)
    return dequantize_kv(quantize_kv(x, scale, dtype, division=division), scale, x.dtype)


# ------------------------------------------------------------------------------------ per-layer scales


@dataclass(frozen=True)
class KVQuantConfig:
    """FP8 KV quantisation of one model: the format and one K and one V scale per layer.

    ``division`` is how the serving engine divides by the scale (:data:`DIVISIONS`); it matters
    only for scales that are not powers of two.
    """

    dtype: str
    k_scales: tuple[float, ...]
    v_scales: tuple[float, ...]
    division: str = "exact"

    def __post_init__(self) -> None:
        fp8_dtype(self.dtype)
        if self.division not in DIVISIONS:
            raise ConfigError(f"KVQuantConfig.division must be one of {DIVISIONS}, got {self.division!r}")
        object.__setattr__(self, "k_scales", tuple(self.k_scales))
        object.__setattr__(self, "v_scales", tuple(self.v_scales))
        if not self.k_scales:
            raise ConfigError("KVQuantConfig: needs at least one layer of scales")
        if len(self.k_scales) != len(self.v_scales):
            raise ConfigError(f"KVQuantConfig: {len(self.k_scales)} k scales but {len(self.v_scales)} v scales")
        for key, vals in (("k_scales", self.k_scales), ("v_scales", self.v_scales)):
            for i, v in enumerate(vals):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"KVQuantConfig.{key}[{i}]: expected a number, got {type(v).__name__}")
                if not (math.isfinite(v) and v > 0):
                    raise ConfigError(f"KVQuantConfig.{key}[{i}]: must be a positive finite number, got {v!r}")
                if not is_fp32_exact(float(v)):
                    raise ConfigError(f"KVQuantConfig.{key}[{i}]: {v!r} is not an fp32 value (SGLang holds "
                                      f"scales in fp32; round it with struct/np.float32 first)")
        object.__setattr__(self, "k_scales", tuple(float(v) for v in self.k_scales))
        object.__setattr__(self, "v_scales", tuple(float(v) for v in self.v_scales))

    @classmethod
    def unit(cls, num_layers: int, dtype: str = "fp8_e4m3") -> KVQuantConfig:
        """Scale 1.0 everywhere: SGLang's default without scales, and the torch_native backend always."""
        return cls(dtype, (1.0,) * num_layers, (1.0,) * num_layers)

    @property
    def num_layers(self) -> int:
        return len(self.k_scales)

    @property
    def torch_dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.dtype]

    @property
    def power_of_two(self) -> bool:
        """All scales are powers of two: every division rule and dequantisation is then exact."""
        return all(is_power_of_two(v) for v in self.k_scales + self.v_scales)

    def scales(self, layer: int) -> tuple[float, float]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_layers} layers of KV scales")
        return self.k_scales[layer], self.v_scales[layer]

    def fake_quant(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` as the sampler's attention reads them back from its FP8 cache."""
        ks, vs = self.scales(layer)
        return (fake_quant_kv(k, ks, self.dtype, division=self.division),
                fake_quant_kv(v, vs, self.dtype, division=self.division))

    def merged(self) -> KVQuantConfig:
        """K = V = ``max(k, v)`` per layer: what SGLang applies from a ``--quantization-param-path``
        file, which has one factor per layer (see :func:`sglang_quant_param_json`)."""
        m = tuple(max(k, v) for k, v in zip(self.k_scales, self.v_scales))
        return replace(self, k_scales=m, v_scales=m)


# ------------------------------------------------------------------------------------ weights identity


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + json.dumps(list(t.shape)).encode() + b"\0")
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_fingerprint(weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` of a model's tensors: names, dtypes, shapes and bytes, in name order.

    ``weights``: a Hugging Face model directory (its ``model.safetensors`` or indexed shards; the
    split into files and the safetensors metadata do not count) or a name -> tensor mapping with the
    same tensors. Ties a scales file to the exact weights it was calibrated on.
    """
    h = hashlib.sha256()
    if isinstance(weights, Mapping):
        for name in sorted(weights):
            _hash_tensor(h, name, weights[name])
        return "sha256:" + h.hexdigest()
    from safetensors import SafetensorError, safe_open

    d = Path(weights)
    where: dict[str, Path] = {}
    for f in weight_files(d):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    where[name] = f
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{f}: cannot read safetensors ({e})") from None
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in sorted(set(where.values()))}
        for name in sorted(where):
            _hash_tensor(h, name, handles[where[name]].get_tensor(name))
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------ the scales file


@dataclass(frozen=True)
class KVScales:
    """A :class:`KVQuantConfig` with the weights it belongs to: the content of ``kv_scales.json``.

    ``weights_fingerprint`` (:func:`weights_fingerprint`) and ``weights_version`` (the sync's weight
    version, a training step, a tag) identify the weights that produced the scales; the loader
    refuses a file made for other weights when the caller says which ones it has. ``calibration``
    is free-form provenance (method, prompts, amax per layer).
    """

    config: KVQuantConfig
    weights_fingerprint: str | None = None
    weights_version: str | None = None
    calibration: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        c = self.config
        return {
            "format": SCALES_FORMAT,
            "format_version": SCALES_FORMAT_VERSION,
            "kv_cache_dtype": c.dtype,
            "num_layers": c.num_layers,
            "k_scale": list(c.k_scales),
            "v_scale": list(c.v_scales),
            "weights": {"fingerprint": self.weights_fingerprint, "version": self.weights_version},
            "calibration": self.calibration,
        }


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_kv_scales(path: str | os.PathLike, scales: KVScales) -> Path:
    """Write ``kv_scales.json`` atomically (floats as shortest round-trip decimals: exact fp32)."""
    p = Path(path)
    _atomic_write(p, (json.dumps(scales.to_json(), indent=2) + "\n").encode())
    return p


_TOP_KEYS = {"format", "format_version", "kv_cache_dtype", "num_layers", "k_scale", "v_scale", "weights",
             "calibration"}


def check_weights_entry(w: Any, bad: Callable[[str, str], Exception]) -> tuple[str | None, str | int | None]:
    """``(fingerprint, version)`` of a ``weights`` entry (scales file or rollout meta), validated;
    ``bad(key, msg)`` makes the error that names the file and key."""
    if not isinstance(w, dict) or set(w) - {"fingerprint", "version"}:
        raise bad("weights", f"expected {{'fingerprint': ..., 'version': ...}}, got {w!r}")
    fp, ver = w.get("fingerprint"), w.get("version")
    if fp is not None and (not isinstance(fp, str) or not _FINGERPRINT_RE.match(fp)):
        raise bad("weights.fingerprint", f"expected 'sha256:' and 64 hex digits or null, got {fp!r}")
    if ver is not None and (isinstance(ver, bool) or not isinstance(ver, (str, int))):
        raise bad("weights.version", f"expected a string, an integer or null, got {ver!r}")
    return fp, ver


def load_kv_scales(path: str | os.PathLike, *, num_layers: int | None = None, kv_cache_dtype: str | None = None,
                   weights_fingerprint: str | None = None, division: str = "exact") -> KVScales:
    """Read and validate ``kv_scales.json``; every error is a :class:`FormatError` naming file and key.

    Checks: the format tag and version, ``kv_cache_dtype`` (and that it equals ``kv_cache_dtype`` when
    given), ``num_layers`` (and that it equals ``num_layers`` when given), one positive finite fp32
    scale per layer in ``k_scale`` and ``v_scale``, ``weights.fingerprint`` well formed (and equal
    to ``weights_fingerprint`` when given), no unknown keys. ``division`` goes to the config (how the
    serving engine divides; not a property of the file).
    """
    p = Path(path)

    def bad(key: str, msg: str) -> FormatError:
        return FormatError(f"{p}: key {key!r}: {msg}")

    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise FormatError(f"{p}: KV scales file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{p}: expected a JSON object at the top level, got {type(d).__name__}")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (expected {sorted(_TOP_KEYS)})")
    for key in ("format", "format_version", "kv_cache_dtype", "num_layers", "k_scale", "v_scale"):
        if key not in d:
            raise bad(key, "missing")
    if d["format"] != SCALES_FORMAT:
        raise bad("format", f"expected {SCALES_FORMAT!r}, got {d['format']!r}")
    if d["format_version"] != SCALES_FORMAT_VERSION or isinstance(d["format_version"], bool):
        raise bad("format_version", f"version {d['format_version']!r} is not supported (this code reads "
                                    f"{SCALES_FORMAT_VERSION})")
    dt = d["kv_cache_dtype"]
    if dt not in KV_CACHE_DTYPES:
        raise bad("kv_cache_dtype", f"{dt!r} is not supported (supported: {sorted(KV_CACHE_DTYPES)})")
    if kv_cache_dtype is not None and dt != kv_cache_dtype:
        raise bad("kv_cache_dtype", f"the file is for {dt!r}, the run uses {kv_cache_dtype!r}")
    n = d["num_layers"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad("num_layers", f"must be a positive integer, got {n!r}")
    if num_layers is not None and n != num_layers:
        raise bad("num_layers", f"the file has scales for {n} layers, the model has {num_layers}")
    vals: dict[str, list[float]] = {}
    for key in ("k_scale", "v_scale"):
        xs = d[key]
        if not isinstance(xs, list):
            raise bad(key, f"expected a list of {n} numbers, got {type(xs).__name__}")
        if len(xs) != n:
            raise bad(key, f"has {len(xs)} scales for num_layers={n}")
        for i, v in enumerate(xs):
            k = f"{key}[{i}]"
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(k, f"expected a number, got {v!r}")
            if not (math.isfinite(v) and v > 0):
                raise bad(k, f"must be a positive finite number, got {v!r}")
            if not is_fp32_exact(float(v)):
                raise bad(k, f"{v!r} is not an fp32 value (SGLang holds scales in fp32)")
        vals[key] = [float(v) for v in xs]
    fp, ver = check_weights_entry(d.get("weights", {"fingerprint": None, "version": None}), bad)
    if weights_fingerprint is not None and fp != weights_fingerprint:
        raise bad("weights.fingerprint", f"scales were calibrated on weights {fp}, the run has {weights_fingerprint}")
    cal = d.get("calibration", {})
    if not isinstance(cal, dict):
        raise bad("calibration", f"expected an object, got {type(cal).__name__}")
    try:
        cfg = KVQuantConfig(dt, tuple(vals["k_scale"]), tuple(vals["v_scale"]), division=division)
    except ConfigError as e:  # only `division` can still be wrong here
        raise FormatError(f"{p}: {e}") from None
    return KVScales(cfg, fp, None if ver is None else str(ver), cal)


# ------------------------------------------------------------------------------------ SGLang's own forms


def sglang_quant_param_json(config: KVQuantConfig, model_type: str, tp_size: int = 1) -> dict:
    """The ``--quantization-param-path`` file SGLang 0.5.23 loads (fp8_e4m3 only).

    SGLang's schema has one factor per layer, applied to both K and V: the file carries
    ``max(k, v)`` per layer (:meth:`KVQuantConfig.merged` is what the server then uses), the same
    for every attention-TP rank (the scales are per tensor). ``model_type`` must equal the
    ``model_type`` of the model's ``config.json`` (SGLang checks it).
    """
    if config.dtype != "fp8_e4m3":
        raise ConfigError(f"SGLang reads --quantization-param-path only for fp8_e4m3, not {config.dtype}")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"tp_size must be a positive integer, got {tp_size!r}")
    m = config.merged()
    per_layer = {str(i): s for i, s in enumerate(m.k_scales)}
    return {"model_type": model_type,
            "kv_cache": {"dtype": TORCH_DTYPE_NAMES[config.dtype],
                         "scaling_factor": {str(r): dict(per_layer) for r in range(tp_size)}}}


def modelopt_scale_tensors(config: KVQuantConfig) -> dict[str, torch.Tensor]:
    """Per-layer scales under the names modelopt's Hugging Face export writes
    (``model.layers.{i}.self_attn.k_proj.k_scale`` / ``v_proj.v_scale``, fp32 scalars), which
    SGLang's ``maybe_remap_kv_scale_name`` maps to ``...self_attn.attn.k_scale`` / ``v_scale``."""
    out: dict[str, torch.Tensor] = {}
    for i, (k, v) in enumerate(zip(config.k_scales, config.v_scales)):
        out[f"model.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(k, dtype=torch.float32)
        out[f"model.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(v, dtype=torch.float32)
    return out
