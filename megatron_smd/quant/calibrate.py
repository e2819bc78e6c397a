"""Per-layer FP8 KV scales, calibrated with nvidia-modelopt on the project's task.

:func:`calibrate_kv` is what ``smd calibrate-kv --config CFG --out DIR`` runs: it samples the
configured task, feeds prompt + reference answer (the tokens a rollout caches) through the
Hugging Face model with modelopt's KV-cache quantisation config, reads each layer's K and V
``amax`` (max |x| over every calibration token, K after RoPE, as SGLang caches it) and turns them
into scales the way modelopt's Hugging Face export does (``modelopt/torch/export/quant_utils.py``
``postprocess_state_dict``: ``scale = amax.float() / 448``, written as ``k_proj.k_scale`` /
``v_proj.v_scale``). It writes

* ``kv_scales.json``: the project's file (:func:`megatron_smd.quant.kv.load_kv_scales`), per-layer
  K and V scales with the fingerprint of the weights they were calibrated on;
* ``kv_scales.safetensors``: the same scales under modelopt's checkpoint names;
* ``kv_cache_scales.json`` (fp8_e4m3 only): SGLang's ``--quantization-param-path`` form, one
  factor per layer (``max(k, v)``; see :func:`megatron_smd.quant.kv.sglang_quant_param_json`).

Choices (keyword arguments):

* ``power_of_two=True`` rounds each scale *up* to a power of two. Then SGLang's three division
  rules (CPU true division, CUDA reciprocal, CUDA rounded divisor; :mod:`megatron_smd.quant.kv`)
  store identical bytes and ``fp8 * scale`` is exact, so the learner's replay cannot depend on
  how the server was handed the scale. It costs at most one binade of headroom at the bottom
  of the range (FP8's relative precision is the same in every normal binade).
* ``clamp_to_one=False``: modelopt's Hugging Face export writes ``amax / 448`` unclamped; its
  TensorRT-LLM path (``get_kv_cache_scaling_factor``) clamps to at least 1.0. ``True`` does that.
* ``fp8_e5m2``: modelopt has no E5M2 KV format; the amax is the same statistic, and the scale is
  ``amax / 57344`` (E5M2's largest finite value).

Where it runs: modelopt 0.47.0 (installed ``--no-deps`` beside torch 2.13.0+cpu, with omegaconf
and pulp added by hand) imports, inserts its quantizers into transformers 5.19's Qwen2/Llama
attention, calibrates, fake-quantises and exports on CPU; no step of this path needs CUDA. It
warns that transformers 5.19 is newer than it was tested with (it pins ``<5.15`` for its ``hf``
extra). ``method="reference"`` computes the same statistic with the project's pure-torch model
(:class:`megatron_smd.model.transformer.RefTransformer`) and needs no modelopt; ``"auto"`` uses
modelopt when it imports and falls back to the reference otherwise, and records which one ran.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, FormatError, SMDError
from .kv import (
    FP8_MAX,
    KV_CACHE_DTYPES,
    KVQuantConfig,
    KVScales,
    _atomic_write,
    _f32,
    modelopt_scale_tensors,
    round_up_pow2,
    save_kv_scales,
    sglang_quant_param_json,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from ..config import ExperimentConfig, ModelConfig

METHODS = ("auto", "modelopt", "reference")
SCALES_FILE = "kv_scales.json"
SCALES_TENSORS_FILE = "kv_scales.safetensors"
SGLANG_PARAM_FILE = "kv_cache_scales.json"


def modelopt_kv_only_config() -> dict:
    """modelopt's ``FP8_KV_CFG`` (``*[kv]_bmm_quantizer`` in E4M3, per tensor) with every other
    quantizer disabled and the ``max`` calibration algorithm: calibrate K/V only, weights untouched."""
    import modelopt.torch.quantization as mtq

    return {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])],
            "algorithm": "max"}


def modelopt_version() -> str | None:
    """The installed nvidia-modelopt version, or None when it cannot be imported."""
    try:
        import modelopt
        import modelopt.torch.quantization  # noqa: F401  (the part we use; fails without its deps)
    except Exception:  # any import failure means "not usable here"
        return None
    return str(modelopt.__version__)


# ------------------------------------------------------------------------------------ calibration data


def calibration_sequences(cfg: ExperimentConfig, model_dir: Path, num_prompts: int,
                          seed: int | None = None) -> list[list[int]]:
    """Token ids of ``num_prompts`` task examples: ``<bos> prompt answer <eos>``.

    The rollout caches the prompt and the completion; the reference answer stands in for the
    completion. Uses the model's own tokenizer: the project's character tokenizer when
    ``tokenizer.json`` is one, else the Hugging Face tokenizer of ``model_dir``.
    """
    from ..tasks import make_task

    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ConfigError(f"calibrate-kv: num_prompts must be a positive integer, got {num_prompts!r}")
    examples = make_task(cfg.task).sample(num_prompts, seed)
    try:
        from ..model.tokenizer import CharTokenizer

        tok = CharTokenizer.from_file(model_dir / "tokenizer.json")
    except SMDError:
        tok = None
    if tok is not None:
        return [tok.encode(e.prompt) + tok.encode(e.answer, add_bos=False) + [tok.eos_id] for e in examples]
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for e in examples:
        ids = list(hf_tok(e.prompt, add_special_tokens=True)["input_ids"])
        ids += list(hf_tok(e.answer, add_special_tokens=False)["input_ids"])
        if hf_tok.eos_token_id is not None:
            ids.append(int(hf_tok.eos_token_id))
        out.append(ids)
    return out


def _batches(seqs: Sequence[Sequence[int]], batch_size: int):
    """Equal-length groups (no padding: padded positions would add their K/V to the amax)."""
    by_len: dict[int, list[Sequence[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch_size):
            yield torch.tensor(group[i:i + batch_size], dtype=torch.int64)


# ------------------------------------------------------------------------------------ amax collection


def _amax_modelopt(model_dir: Path, seqs, dtype: torch.dtype, device: str, batch_size: int,
                   num_layers: int) -> tuple[list[float], list[float]]:
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()

    def forward_loop(m) -> None:
        with torch.no_grad():
            for ids in _batches(seqs, batch_size):
                m(input_ids=ids.to(device), use_cache=False)

    model = mtq.quantize(model, modelopt_kv_only_config(), forward_loop)
    layers = model.model.layers
    if len(layers) != num_layers:
        raise FormatError(f"{model_dir}: transformers built {len(layers)} layers, config.json says {num_layers}")
    amax_k, amax_v = [], []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        kq, vq = getattr(attn, "k_bmm_quantizer", None), getattr(attn, "v_bmm_quantizer", None)
        if kq is None or vq is None or kq.amax is None or vq.amax is None:
            raise SMDError(f"calibrate-kv: modelopt inserted no calibrated K/V quantizer in layer {i} "
                           f"({type(attn).__name__}); use method='reference'")
        amax_k.append(float(kq.amax.float().cpu()))
        amax_v.append(float(vq.amax.float().cpu()))
    return amax_k, amax_v


def _amax_reference(model_dir: Path, seqs, dtype: torch.dtype, device: str, batch_size: int,
                    num_layers: int) -> tuple[list[float], list[float]]:
    from ..model.transformer import RefTransformer

    model = RefTransformer.from_pretrained(model_dir, dtype=dtype).to(device)
    amax_k = torch.zeros(num_layers, dtype=torch.float32)
    amax_v = torch.zeros(num_layers, dtype=torch.float32)

    def recorder(i: int, qkv):
        def wrapped(x, cos, sin):
            q, k, v = qkv(x, cos, sin)  # k after RoPE, as it is cached
            amax_k[i] = torch.maximum(amax_k[i], k.detach().abs().amax().float().cpu())
            amax_v[i] = torch.maximum(amax_v[i], v.detach().abs().amax().float().cpu())
            return q, k, v
        return wrapped

    attns = [layer.self_attn for layer in model.model.layers]
    for i, attn in enumerate(attns):
        attn.qkv = recorder(i, attn.qkv)
    try:
        with torch.no_grad():
            for ids in _batches(seqs, batch_size):
                model(ids.to(device))
    finally:
        for attn in attns:
            del attn.qkv  # back to the class method
    return amax_k.tolist(), amax_v.tolist()


def collect_kv_amax(model_dir: str | os.PathLike, seqs: Sequence[Sequence[int]], *, method: str = "auto",
                    dtype: torch.dtype = torch.float32, device: str = "cpu",
                    batch_size: int = 16) -> tuple[list[float], list[float], str]:
    """Per-layer max |K| (after RoPE) and max |V| over ``seqs``; returns ``(amax_k, amax_v, method_used)``."""
    from ..model.hf import read_arch

    if method not in METHODS:
        raise ConfigError(f"calibrate-kv: method must be one of {METHODS}, got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"calibrate-kv: batch_size must be a positive integer, got {batch_size!r}")
    if not seqs:
        raise ConfigError("calibrate-kv: no calibration sequences")
    d = Path(model_dir)
    arch = read_arch(d)
    if method == "auto":
        method = "modelopt" if modelopt_version() is not None else "reference"
    if method == "modelopt" and modelopt_version() is None:
        raise SMDError("calibrate-kv: method='modelopt' but nvidia-modelopt cannot be imported here "
                       "(pip install --no-deps nvidia-modelopt omegaconf pulp); method='reference' needs no modelopt")
    fn = _amax_modelopt if method == "modelopt" else _amax_reference
    amax_k, amax_v = fn(d, seqs, dtype, device, batch_size, arch.num_layers)
    return amax_k, amax_v, method


def scales_from_amax(amax_k: Sequence[float], amax_v: Sequence[float], kv_cache_dtype: str = "fp8_e4m3", *,
                     power_of_two: bool = True, clamp_to_one: bool = False) -> tuple[KVQuantConfig, dict]:
    """``scale = fp32(amax) / fp8_max`` (fp32 division, as modelopt's export), then the options.

    Returns the config and ``{"raw_k_scale", "raw_v_scale"}`` (the scales before rounding). Raises
    :class:`SMDError` naming the layer for an amax that is zero or not finite.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv cache dtype {kv_cache_dtype!r} is not supported (supported: {sorted(KV_CACHE_DTYPES)})")
    if len(amax_k) != len(amax_v) or not amax_k:
        raise ValueError(f"scales_from_amax: {len(amax_k)} K and {len(amax_v)} V amax values")
    fmax = torch.tensor(FP8_MAX[kv_cache_dtype], dtype=torch.float32)
    raw: dict[str, list[float]] = {"raw_k_scale": [], "raw_v_scale": []}
    final: dict[str, list[float]] = {"k": [], "v": []}
    for kind, amaxes in (("k", amax_k), ("v", amax_v)):
        for i, a in enumerate(amaxes):
            if not (math.isfinite(a) and a > 0):
                raise SMDError(f"calibrate-kv: layer {i} {kind.upper()} amax is {a!r}; the calibration prompts "
                               f"gave no usable {kind.upper()} statistics")
            s = float(torch.tensor(_f32(a), dtype=torch.float32) / fmax)
            raw[f"raw_{kind}_scale"].append(s)
            if clamp_to_one:
                s = max(s, 1.0)
            if power_of_two:
                s = round_up_pow2(s)
            final[kind].append(s)
    return KVQuantConfig(kv_cache_dtype, tuple(final["k"]), tuple(final["v"])), raw


# ------------------------------------------------------------------------------------ the command


def _ensure_model_dir(mc: ModelConfig) -> Path:
    """``model.path``, created from ``model.init`` when missing (the tiny presets)."""
    path = Path(mc.path)
    if not path.exists() and mc.init is not None:
        from ..model.tiny import init_model_dir

        kw = mc.init.model_dump()
        init_model_dir(path, kw.pop("arch"), seed=kw.pop("seed"), **kw)
    if not path.exists():
        raise FormatError(f"{path}: model directory does not exist (model.path)")
    return path


def resolve_kv_cache_dtype(cfg: ExperimentConfig, explicit: str | None = None) -> str:
    """The FP8 format to calibrate for: ``explicit``, else ``rollout.kv_cache_dtype`` when it is an
    FP8 format, else ``sglang.kv_cache_dtype`` when that is one, else ``fp8_e4m3``."""
    if explicit is not None:
        if explicit not in KV_CACHE_DTYPES:
            raise ConfigError(f"calibrate-kv: kv cache dtype {explicit!r} is not supported "
                              f"(supported: {sorted(KV_CACHE_DTYPES)})")
        return explicit
    for v in (getattr(cfg.rollout, "kv_cache_dtype", None), cfg.sglang.get("kv_cache_dtype")):
        if v in KV_CACHE_DTYPES:
            return v
    return "fp8_e4m3"


def calibrate_kv(cfg: ExperimentConfig, out_dir: str | os.PathLike, *, model_dir: str | os.PathLike | None = None,
                 kv_cache_dtype: str | None = None, method: str = "auto", num_prompts: int = 64,
                 seed: int | None = None, batch_size: int = 16, power_of_two: bool = True,
                 clamp_to_one: bool = False, weights_version: str | None = None, tp_size: int = 1,
                 device: str | None = None) -> KVScales:
    """Calibrate per-layer K/V scales for ``cfg``'s model on ``cfg``'s task and write them to ``out_dir``.

    Args:
        cfg: the resolved experiment config (``megatron_smd.config.load_config``).
        out_dir: created if missing; receives ``kv_scales.json``, ``kv_scales.safetensors`` and,
            for fp8_e4m3, SGLang's ``kv_cache_scales.json``.
        model_dir: the weights to calibrate (the ones the rollout will serve); default
            ``cfg.model.path`` (created from ``model.init`` for the tiny presets).
        kv_cache_dtype: ``fp8_e4m3`` / ``fp8_e5m2``; default from the config
            (:func:`resolve_kv_cache_dtype`).
        method: ``"modelopt"``, ``"reference"`` or ``"auto"`` (module docstring).
        num_prompts, seed: calibration examples ``make_task(cfg.task).sample(num_prompts, seed)``
            (``seed`` default: ``cfg.task.seed``).
        batch_size: sequences per forward (equal lengths only, nothing padded).
        power_of_two, clamp_to_one: scale rounding (module docstring).
        weights_version: recorded next to the weights' fingerprint (e.g. the training step).
        tp_size: attention-TP size written into SGLang's ``kv_cache_scales.json``.
        device: default ``"cuda"`` when available, else ``"cpu"``.

    Returns:
        The :class:`~megatron_smd.quant.kv.KVScales` written to ``out_dir/kv_scales.json``.
    """
    from ..model.hf import read_arch

    d = Path(model_dir) if model_dir is not None else _ensure_model_dir(cfg.model)
    arch = read_arch(d)
    dt = resolve_kv_cache_dtype(cfg, kv_cache_dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    seqs = calibration_sequences(cfg, d, num_prompts, seed)
    amax_k, amax_v, used = collect_kv_amax(d, seqs, method=method, dtype=model_dtype, device=device,
                                           batch_size=batch_size)
    config, raw = scales_from_amax(amax_k, amax_v, dt, power_of_two=power_of_two, clamp_to_one=clamp_to_one)
    calibration = {
        "method": used,
        "modelopt_version": modelopt_version() if used == "modelopt" else None,
        "algorithm": "max",
        "statistic": "per-layer max |K| (after RoPE) and max |V| over every calibration token",
        "task": cfg.task.model_dump(mode="json"),
        "num_prompts": num_prompts,
        "seed": cfg.task.seed if seed is None else int(seed),
        "num_tokens": sum(len(s) for s in seqs),
        "model_dtype": cfg.model.dtype,
        "device": device,
        "fp8_max": FP8_MAX[dt],
        "clamp_to_one": bool(clamp_to_one),
        "power_of_two": bool(power_of_two),
        "amax_k": amax_k,
        "amax_v": amax_v,
        **raw,
    }
    scales = KVScales(config, weights_fingerprint(d), None if weights_version is None else str(weights_version),
                      calibration)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kv_scales(out / SCALES_FILE, scales)
    from safetensors.torch import save

    _atomic_write(out / SCALES_TENSORS_FILE,
                  save(modelopt_scale_tensors(config), metadata={"kv_cache_dtype": dt,
                                                                 "weights_fingerprint": scales.weights_fingerprint}))
    if dt == "fp8_e4m3":
        model_type = json.loads((d / "config.json").read_text()).get("model_type", arch.arch)
        param = sglang_quant_param_json(config, model_type, tp_size)
        _atomic_write(out / SGLANG_PARAM_FILE, (json.dumps(param, indent=2) + "\n").encode())
    return scales
