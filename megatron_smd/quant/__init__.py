"""KV-cache quantisation that the learner replays exactly (FP8, SGLang's ``--kv-cache-dtype``).

* :mod:`megatron_smd.quant.kv`: SGLang 0.5.23's FP8 store/read semantics reproduced bit for bit
  (:func:`quantize_kv`, :func:`dequantize_kv`, :func:`fake_quant_kv`), the per-layer scales
  (:class:`KVQuantConfig`) and their file (``kv_scales.json``, :func:`load_kv_scales`).
* :mod:`megatron_smd.quant.cache`: the FP8 cache a rollout was sampled with (:class:`RolloutKV`, in
  ``meta.json`` as ``kv_cache``) and the learner's replay of it (:class:`KVReplay`,
  :func:`fp8_replay_check`).
* :mod:`megatron_smd.quant.calibrate`: per-layer K/V scale calibration with nvidia-modelopt
  (:func:`~megatron_smd.quant.calibrate.calibrate_kv`), imported on demand (it loads the model).
"""

from .cache import (
    FP8_REPLAY_FRACTION,
    FP8_REPLAY_MAX,
    FP8_REPLAY_TOL,
    KV_AUTO,
    KVReplay,
    RolloutKV,
    fp8_replay_check,
    load_rollout_kv,
)
from .kv import (
    DIVISIONS,
    FP8_MAX,
    KV_CACHE_DTYPES,
    KVQuantConfig,
    KVScales,
    dequantize_kv,
    fake_quant_kv,
    fp8_dtype,
    load_kv_scales,
    quantize_kv,
    save_kv_scales,
    weights_fingerprint,
)

__all__ = [
    "DIVISIONS",
    "FP8_MAX",
    "FP8_REPLAY_FRACTION",
    "FP8_REPLAY_MAX",
    "FP8_REPLAY_TOL",
    "KV_AUTO",
    "KVReplay",
    "RolloutKV",
    "fp8_replay_check",
    "load_rollout_kv",
    "KV_CACHE_DTYPES",
    "KVQuantConfig",
    "KVScales",
    "dequantize_kv",
    "fake_quant_kv",
    "fp8_dtype",
    "load_kv_scales",
    "quantize_kv",
    "save_kv_scales",
    "weights_fingerprint",
]
