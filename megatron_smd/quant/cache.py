"""The FP8 KV cache of a rollout: what travels with it, and how the learner replays it.

"Quantisation joins eviction in the shadow": a sampler that keeps K and V in FP8 attends to
rounded keys and values, so the learner's shadow forward rounds them the same way (same FP8
format, same per-layer scales, same division and cast, :func:`megatron_smd.quant.kv.fake_quant_kv`)
before it attends, with the straight-through gradient.

* :class:`RolloutKV`: the rollout's KV format (:class:`~megatron_smd.quant.kv.KVQuantConfig`)
  plus the scales file it came from and the weights those scales were calibrated on
  (``kv_scales.json``'s ``weights.fingerprint`` / ``weights.version``). The reference engine stamps
  it on every trajectory; the rollout directory keeps it in ``meta.json`` under ``kv_cache``
  (:meth:`RolloutKV.to_meta`, read back and validated by :meth:`RolloutKV.from_meta`); the
  learner's :class:`~megatron_smd.learner.batch.TrainBatch` carries it as ``kv_cache``.
* :class:`KVReplay`: one micro-batch's instruction to the learner's core attention: which rows
  replay the FP8 cache (the ``shadow`` rows; ``dense`` rows are never quantised) and with which
  scales. :meth:`KVReplay.apply` is called on every layer's K and V, before the context-parallel
  all-gather (elementwise, so gathering quantised K/V equals quantising the gathered ones) and on
  each tensor-parallel rank's own KV heads (the scales are per layer, one scalar for all heads).
* :func:`load_rollout_kv`: ``rollout.kv_cache_dtype`` / ``rollout.kv_scales`` -> a :class:`RolloutKV`
  (unit scales without a file), refusing a scales file calibrated on other weights than the ones
  the engine serves.
* :func:`fp8_replay_check`: the replay tolerance of an FP8 rollout (fp32 compute, FP8 storage):
  at least :data:`FP8_REPLAY_FRACTION` of the completion tokens within :data:`FP8_REPLAY_TOL` of
  the sampler, none beyond :data:`FP8_REPLAY_MAX`. Not every token can be bit-for-bit: a K/V value
  that lies within the ~1e-7 difference between the sampler's cached decode and the learner's
  parallel forward of an FP8 rounding midpoint rounds to neighbouring FP8 values on the two sides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from .kv import (
    DIVISIONS,
    KV_CACHE_DTYPES,
    KVQuantConfig,
    KVScales,
    check_weights_entry,
    fake_quant_kv,
    is_fp32_exact,
    load_kv_scales,
    weights_fingerprint,
)

#: ``rollout.kv_cache_dtype`` meaning "the model's dtype, no quantisation" (SGLang's default).
KV_AUTO = "auto"
#: Replay tolerance of FP8 rollouts (module docstring).
FP8_REPLAY_TOL = 1e-5
FP8_REPLAY_FRACTION = 0.999
FP8_REPLAY_MAX = 1e-3
META_KEY = "kv_cache"
_META_KEYS = {"dtype", "division", "k_scale", "v_scale", "scales_file", "weights"}


@dataclass(frozen=True)
class RolloutKV:
    """The FP8 KV cache a rollout was sampled with (module docstring).

    Attributes:
        config: FP8 format, per-layer K and V scales, the engine's division rule.
        scales_file: the ``kv_scales.json`` the scales were read from (None: unit scales).
        weights_fingerprint, weights_version: the weights the scales were calibrated on (from the
            scales file; None for unit scales, which belong to no weights).
    """

    config: KVQuantConfig
    scales_file: str | None = None
    weights_fingerprint: str | None = None
    weights_version: str | None = None

    @classmethod
    def unit(cls, num_layers: int, dtype: str = "fp8_e4m3") -> RolloutKV:
        """Scale 1.0 for every layer: SGLang without scales (and its torch_native backend always)."""
        return cls(KVQuantConfig.unit(num_layers, dtype))

    @classmethod
    def from_scales(cls, scales: KVScales, path: str | os.PathLike | None = None) -> RolloutKV:
        return cls(scales.config, None if path is None else str(path), scales.weights_fingerprint,
                   scales.weights_version)

    @property
    def dtype(self) -> str:
        return self.config.dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    def weights_text(self) -> str:
        """``fingerprint (version v)`` of the scales' weights, for messages."""
        v = f" (version {self.weights_version})" if self.weights_version is not None else ""
        return f"{self.weights_fingerprint}{v}"

    def to_meta(self) -> dict:
        """The ``meta.json`` form (``meta["kv_cache"]``): every number exact (fp32 scales)."""
        c = self.config
        return {"dtype": c.dtype, "division": c.division, "k_scale": list(c.k_scales), "v_scale": list(c.v_scales),
                "scales_file": self.scales_file,
                "weights": {"fingerprint": self.weights_fingerprint, "version": self.weights_version}}

    @classmethod
    def from_meta(cls, d: Any, where: str, num_layers: int | None = None) -> RolloutKV:
        """Read and validate ``meta["kv_cache"]``; :class:`FormatError` naming ``where`` and the key."""

        def bad(key: str, msg: str) -> FormatError:
            return FormatError(f"{where}: key '{META_KEY}.{key}': {msg}" if key else f"{where}: key '{META_KEY}': {msg}")

        if not isinstance(d, dict):
            raise bad("", f"expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - _META_KEYS)
        if unknown:
            raise bad(unknown[0], f"unknown key (expected {sorted(_META_KEYS)})")
        for k in ("dtype", "k_scale", "v_scale"):
            if k not in d:
                raise bad(k, "missing")
        if d["dtype"] not in KV_CACHE_DTYPES:
            raise bad("dtype", f"{d['dtype']!r} is not supported (supported: {sorted(KV_CACHE_DTYPES)})")
        division = d.get("division", "exact")
        if division not in DIVISIONS:
            raise bad("division", f"{division!r} is not one of {list(DIVISIONS)}")
        scales = {}
        for k in ("k_scale", "v_scale"):
            xs = d[k]
            if not isinstance(xs, list) or not xs:
                raise bad(k, f"expected a non-empty list of numbers, got {xs!r}")
            for i, v in enumerate(xs):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0) \
                        or not is_fp32_exact(float(v)):
                    raise bad(f"{k}[{i}]", f"expected a positive finite fp32 number, got {v!r}")
            scales[k] = tuple(float(v) for v in xs)
        if len(scales["k_scale"]) != len(scales["v_scale"]):
            raise bad("v_scale", f"{len(scales['v_scale'])} scales, k_scale has {len(scales['k_scale'])}")
        if num_layers is not None and len(scales["k_scale"]) != num_layers:
            raise bad("k_scale", f"scales for {len(scales['k_scale'])} layers, the rollout has {num_layers}")
        f = d.get("scales_file")
        if f is not None and not isinstance(f, str):
            raise bad("scales_file", f"expected a path or null, got {f!r}")
        fp, ver = check_weights_entry(d.get("weights") or {}, bad)
        cfg = KVQuantConfig(d["dtype"], scales["k_scale"], scales["v_scale"], division=division)
        return cls(cfg, f, fp, None if ver is None else str(ver))

    def check_weights(self, fingerprint: str, where: str, weights: str) -> None:
        """Refuse weights other than the ones the scales were calibrated on.

        ``where``: the file that carries these scales (``meta.json`` of a rollout, or the scales
        file itself); ``weights``: what the caller trains / replays against (a directory). No-op
        for unit scales (no weights recorded)."""
        if self.weights_fingerprint is None or fingerprint == self.weights_fingerprint:
            return
        raise FormatError(f"{where}: key '{META_KEY}.weights.fingerprint': the rollout's FP8 KV scales were "
                          f"calibrated on weights {self.weights_text()}"
                          f"{f' ({self.scales_file})' if self.scales_file else ''}, but it is trained/replayed "
                          f"against {weights} with weights {fingerprint}: calibrate scales for these weights "
                          f"(smd calibrate-kv) and sample again")

    def replay(self, rows: list[bool] | torch.Tensor) -> KVReplay | None:
        """The :class:`KVReplay` of a micro-batch whose rows ``rows`` (True: shadow) replay this
        cache; None when no row does (nothing to quantise)."""
        r = torch.as_tensor(rows, dtype=torch.bool).reshape(-1)
        return KVReplay(self.config, r) if bool(r.any()) else None


@dataclass(frozen=True)
class KVReplay:
    """The FP8 K/V rounding one micro-batch replays in the learner's core attention.

    ``rows``: bool ``[b]``, True for the rows that replay the rollout's FP8 cache (shadow rows).
    Handed to :class:`~megatron_smd.learner.attention.core.ShadowCoreAttention` through
    Megatron's per-call ``attention_bias`` argument (see the learner's runner): it travels with
    the micro-batch, so recomputation and pipeline schedules see the right rows.
    """

    config: KVQuantConfig
    rows: torch.Tensor

    def apply(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch_dim: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of 0-based ``layer`` as the sampler's FP8 cache holds them, on the replaying rows
        (others unchanged). Straight-through gradient (:func:`~megatron_smd.quant.kv.fake_quant_kv`)."""
        if k.shape[batch_dim] != self.rows.numel():
            raise ValueError(f"KVReplay: {self.rows.numel()} rows, K has batch {k.shape[batch_dim]} (dim {batch_dim})")
        ks, vs = self.config.scales(layer)
        c = self.config
        kq = fake_quant_kv(k, ks, c.dtype, division=c.division)
        vq = fake_quant_kv(v, vs, c.dtype, division=c.division)
        if bool(self.rows.all()):  # decided on the host copy: no device sync
            return kq, vq
        shape = [1] * k.dim()
        shape[batch_dim] = -1
        m = self.rows.to(k.device, non_blocking=True).view(shape)
        return torch.where(m, kq, k), torch.where(m, vq, v)


def load_rollout_kv(kv_cache_dtype: str, kv_scales: str | os.PathLike | None, num_layers: int,
                    weights_dir: str | os.PathLike | None = None) -> RolloutKV | None:
    """``rollout.kv_cache_dtype`` and ``rollout.kv_scales`` -> the engine's :class:`RolloutKV`.

    ``"auto"``: None (the model's dtype, no quantisation). FP8 without a scales file: unit scales.
    With a file: :func:`~megatron_smd.quant.kv.load_kv_scales` (format, layer count, FP8 format),
    and, given ``weights_dir``, the file's ``weights.fingerprint`` must be that of the weights the
    engine serves (:class:`FormatError` naming the file, the key and both fingerprints).
    """
    if kv_cache_dtype == KV_AUTO:
        return None
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise FormatError(f"kv cache dtype {kv_cache_dtype!r} is not supported (auto or {sorted(KV_CACHE_DTYPES)})")
    if kv_scales is None:
        return RolloutKV.unit(num_layers, kv_cache_dtype)
    s = load_kv_scales(kv_scales, num_layers=num_layers, kv_cache_dtype=kv_cache_dtype)
    kv = RolloutKV.from_scales(s, Path(kv_scales))
    if weights_dir is not None and kv.weights_fingerprint is not None:
        fp = weights_fingerprint(weights_dir)
        if fp != kv.weights_fingerprint:
            raise FormatError(f"{Path(kv_scales)}: key 'weights.fingerprint': these FP8 KV scales were calibrated on "
                              f"weights {kv.weights_text()}, the engine serves {Path(weights_dir)} with weights "
                              f"{fp}: calibrate scales for the weights the run serves (smd calibrate-kv)")
    return kv


def fp8_replay_check(lp_learner: torch.Tensor, lp_sampler: torch.Tensor, mask: torch.Tensor) -> dict:
    """The FP8 replay criterion on the masked (completion) tokens (module docstring).

    Returns ``frac_within_tol`` (share of tokens with ``|d log p| <= FP8_REPLAY_TOL``),
    ``tokens_over_tol``, ``max_abs_logprob_diff`` and ``ok`` (1.0 / 0.0).
    """
    d = (lp_learner.detach().double() - lp_sampler.detach().double()).abs()[mask.bool()]
    if d.numel() == 0:
        return {"frac_within_tol": 1.0, "tokens_over_tol": 0, "max_abs_logprob_diff": 0.0, "ok": 1.0}
    over = int((d > FP8_REPLAY_TOL).sum())
    frac = 1.0 - over / d.numel()
    worst = float(d.max())
    ok = frac >= FP8_REPLAY_FRACTION and worst <= FP8_REPLAY_MAX
    return {"frac_within_tol": frac, "tokens_over_tol": over, "max_abs_logprob_diff": worst, "ok": float(ok)}
