"""FP8 KV quantisation (megatron_smd.quant): bit-exactness against SGLang 0.5.23's own store/read,
the division rules, the saturation rules, the scales file and its validation, and calibration
with nvidia-modelopt on the tiny model.

What runs for real: SGLang's ``MHATokenToKVPool.set_kv_buffer`` / ``get_key_buffer`` on CPU
(imported through sglang_patch.cpu_import), SGLang's ``kv_cache_scales_loader``,
``maybe_remap_kv_scale_name`` and ``BaseKVCacheMethod``, modelopt's ``mtq.quantize`` and
``export_hf_checkpoint`` on a transformers model. The CUDA division rules are checked only on a
GPU machine (``gpu`` marker).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import struct

import pytest
import torch

from megatron_smd.errors import ConfigError, FormatError, SMDError
from megatron_smd.quant.kv import (
    FP8_MAX,
    KVQuantConfig,
    KVScales,
    dequantize_kv,
    fake_quant_kv,
    fp8_dtype,
    load_kv_scales,
    modelopt_scale_tensors,
    quantize_kv,
    round_up_pow2,
    save_kv_scales,
    sglang_quant_param_json,
    weights_fingerprint,
)

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
HAVE_MODELOPT = importlib.util.find_spec("modelopt") is not None
needs_sglang = pytest.mark.skipif(not HAVE_SGLANG, reason="sglang is not installed")
needs_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason="nvidia-modelopt is not installed")

FP8_NAMES = ("fp8_e4m3", "fp8_e5m2")
COMPUTE = (torch.bfloat16, torch.float16, torch.float32)
S_ODD = struct.unpack("<f", struct.pack("<f", 0.37))[0]  # an fp32 scale that is not a power of two


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _all_16bit(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 16-bit float: ±0, subnormals, normals, ±inf, NaNs."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def _fp32_adversarial(scale: float | None) -> torch.Tensor:
    """fp32 values whose quotient by ``scale`` lands on or next to an FP8 value or rounding boundary
    (both formats), walked ±64 fp32 ulps, plus the specials and the overflow thresholds."""
    s = torch.tensor(1.0 if scale is None else scale, dtype=torch.float32)
    pts = []
    for name in FP8_NAMES:
        v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype(name)).float()
        v = torch.sort(v[torch.isfinite(v)].unique()).values
        pts += [v, (v[1:] + v[:-1]) / 2]
    base = torch.cat(pts) * s
    walk = torch.arange(-64, 65, dtype=torch.int32)
    x = (base.view(torch.int32).unsqueeze(1) + walk).view(torch.float32).reshape(-1)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1e-40,
                            3.4e38, -3.4e38, 449.0, 464.0, 479.9, 480.0, 57344.0, 61439.0, 61440.0, 65536.0])
    return torch.cat([x, special * s, special])  # walking ±0 by int32 steps also yields NaN payloads


def _inputs(dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    return _all_16bit(dtype) if dtype != torch.float32 else _fp32_adversarial(scale)


# ------------------------------------------------------------------------------------ SGLang itself


@pytest.fixture(scope="module")
def sg():
    if not HAVE_SGLANG:
        pytest.skip("sglang is not installed")
    from sglang_patch.cpu_import import import_sglang_memory_modules

    mods = import_sglang_memory_modules()
    for name in ("sglang.srt.model_loader.weight_utils", "sglang.srt.layers.quantization.kv_cache"):
        mods[name] = importlib.import_module(name)
    return mods


class _Layer:
    layer_id = 0


def _sglang_store(sg, x: torch.Tensor, y: torch.Tensor, fdt: torch.dtype, k_scale, v_scale):
    """Store K=x, V=y through SGLang's MHATokenToKVPool (CPU); return the pool, the K and V bytes."""
    D = 16
    n = x.numel()
    pad = (-n) % D
    xk = torch.cat([x, x.new_zeros(pad)]).view(-1, 1, D)
    yv = torch.cat([y, y.new_zeros(pad)]).view(-1, 1, D)
    N = xk.shape[0]
    MP = sg["sglang.srt.mem_cache.memory_pool"]
    pool = MP.MHATokenToKVPool(N, 1, fdt, 1, D, 1, "cpu", False, enable_alt_stream=False)
    loc = torch.arange(N)
    pool.set_kv_buffer(_Layer(), loc, xk.clone(), yv.clone(), k_scale, v_scale)
    kb = pool.k_buffer[0][loc].reshape(-1)[:n]
    vb = pool.v_buffer[0][loc].reshape(-1)[:n]
    assert kb.dtype == torch.uint8  # SGLang stores FP8 as uint8 bytes
    return pool, loc, kb, vb


@needs_sglang
@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_store_is_bit_exact_with_sglang_cpu(sg, name, dtype):
    """quantize_kv(division='exact') == SGLang's set_kv_buffer bytes on CPU, for every bf16/fp16 bit
    pattern and adversarial fp32 values (rounding boundaries, overflow, subnormals, ±0, inf, NaN),
    without a scale, with scale 1, a power of two, a non-power-of-two, a large one; the scale as a
    Python float and as a 0-dim tensor."""
    fdt = fp8_dtype(name)
    for scale in (None, 1.0, 2.0 ** -9, S_ODD, 3.0, 1000.0):
        x = _inputs(dtype, scale)
        y = -x.flip(0)  # V: other values, other scale
        vs = None if scale is None else scale * 2.0
        for as_tensor in (False, True):
            ks = scale if (scale is None or not as_tensor) else torch.tensor(scale, dtype=torch.float32)
            vst = vs if (vs is None or not as_tensor) else torch.tensor(vs, dtype=torch.float32)
            _, _, kb, vb = _sglang_store(sg, x, y, fdt, ks, vst)
            assert torch.equal(_bits(quantize_kv(x, scale, name)), kb), (name, dtype, scale, as_tensor)
            assert torch.equal(_bits(quantize_kv(y, vs, name)), vb), (name, dtype, vs, as_tensor)
            assert torch.equal(_bits(quantize_kv(x, ks, name)), kb)  # tensor scale accepted too


@needs_sglang
@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_read_is_bit_exact_with_sglang_torch_native(sg, name, dtype):
    """The torch_native read (``get_key_buffer(...)[tokens].to(q.dtype)``, scales ignored) equals
    dequantize_kv(q, None or 1.0) and fake_quant_kv(x, None) on every input."""
    x = _inputs(dtype, None)
    pool, loc, _, _ = _sglang_store(sg, x, x, fp8_dtype(name), None, None)
    buf = pool.get_key_buffer(0)
    assert buf.dtype == fp8_dtype(name)  # viewed back as FP8
    read = buf[loc].reshape(-1)[: x.numel()].to(dtype)
    q = quantize_kv(x, None, name)
    for got in (dequantize_kv(q, None, dtype), dequantize_kv(q, 1.0, dtype), fake_quant_kv(x, None, name)):
        assert torch.equal(got.view(torch.uint8) if dtype == torch.float32 else got.view(torch.int16),
                           read.view(torch.uint8) if dtype == torch.float32 else read.view(torch.int16))


@needs_sglang
def test_sglang_scale_loading_rules(sg):
    """SGLang's BaseKVCacheMethod keeps our fp32 scales exactly, defaults absent ones to 1.0, and
    duplicates a single one; its remap takes modelopt's names to the attention's parameters."""
    kvm = sg["sglang.srt.layers.quantization.kv_cache"]
    wu = sg["sglang.srt.model_loader.weight_utils"]
    cfg = KVQuantConfig("fp8_e4m3", (2.0 ** -9, S_ODD), (3.0, 2.0 ** -7))
    for li, (ks, vs) in enumerate(zip(cfg.k_scales, cfg.v_scales)):
        layer = torch.nn.Module()
        m = kvm.BaseKVCacheMethod(None)
        m.create_weights(layer)
        tensors = modelopt_scale_tensors(cfg)
        layer.k_scale.data.copy_(tensors[f"model.layers.{li}.self_attn.k_proj.k_scale"])
        layer.v_scale.data.copy_(tensors[f"model.layers.{li}.self_attn.v_proj.v_scale"])
        m.process_weights_after_loading(layer)
        assert (layer.k_scale_float, layer.v_scale_float) == (ks, vs)
    absent = torch.nn.Module()
    kvm.BaseKVCacheMethod(None).create_weights(absent)
    kvm.BaseKVCacheMethod(None).process_weights_after_loading(absent)
    assert (absent.k_scale_float, absent.v_scale_float) == (1.0, 1.0)  # SGLang's default = KVQuantConfig.unit
    params = {f"model.layers.{i}.self_attn.attn.{kv}_scale": None for i in range(2) for kv in "kv"}
    for name in modelopt_scale_tensors(cfg):
        i, kv = name.split(".")[2], name.split(".")[-1]
        assert wu.maybe_remap_kv_scale_name(name, params) == f"model.layers.{i}.self_attn.attn.{kv}"


@needs_sglang
def test_sglang_quant_param_file_loads_in_sglang(sg, tmp_path):
    """SGLang's own kv_cache_scales_loader reads our --quantization-param-path file: one factor per
    layer (max of K and V) for every TP rank; a wrong model_type makes SGLang fall back to 1.0."""
    wu = sg["sglang.srt.model_loader.weight_utils"]
    cfg = KVQuantConfig("fp8_e4m3", (2.0 ** -9, S_ODD, 4.0), (2.0 ** -8, 0.25, 1.0))
    f = tmp_path / "kv_cache_scales.json"
    f.write_text(json.dumps(sglang_quant_param_json(cfg, "qwen2", tp_size=2)))
    for rank in range(2):
        got = dict(wu.kv_cache_scales_loader(str(f), rank, 2, 3, "qwen2"))
        assert got == {0: 2.0 ** -8, 1: S_ODD, 2: 4.0} == dict(enumerate(cfg.merged().k_scales))
    assert list(wu.kv_cache_scales_loader(str(f), 0, 2, 3, "llama")) == []  # SGLang: mismatch -> defaults
    assert list(wu.kv_cache_scales_loader(str(f), 0, 1, 3, "qwen2")) == []  # TP size must match
    with pytest.raises(ConfigError, match="fp8_e4m3"):
        sglang_quant_param_json(KVQuantConfig("fp8_e5m2", (1.0,), (1.0,)), "qwen2")


@pytest.mark.gpu
@needs_sglang
@pytest.mark.parametrize("name", FP8_NAMES)
def test_cuda_division_rules_match_sglang(sg, name):
    """On CUDA: a host float scale stores x * fp32(1/s) ('reciprocal'), a device-tensor scale
    divides by the scale rounded to the model dtype ('rounded_divisor'); fp32 model, unscaled cast."""
    MP = sg["sglang.srt.mem_cache.memory_pool"]
    fdt = fp8_dtype(name)
    for dtype in COMPUTE:
        x = _inputs(dtype, S_ODD)
        D = 16
        pad = (-x.numel()) % D
        xk = torch.cat([x, x.new_zeros(pad)]).view(-1, 1, D).cuda()
        N = xk.shape[0]
        loc = torch.arange(N, device="cuda")
        for scale, rule in ((S_ODD, "reciprocal"), (torch.tensor(S_ODD, device="cuda"), "rounded_divisor"),
                            (None, "exact")):
            pool = MP.MHATokenToKVPool(N, 1, fdt, 1, D, 1, "cuda", False, enable_alt_stream=False)
            pool.set_kv_buffer(_Layer(), loc, xk.clone(), xk.clone(), scale, scale)
            got = pool.k_buffer[0][loc].reshape(-1)[: x.numel()].cpu()
            want = _bits(quantize_kv(x, None if scale is None else S_ODD, name, division=rule))
            assert torch.equal(got, want), (name, dtype, rule)


# ------------------------------------------------------------------------------------ semantics


@pytest.mark.parametrize("name", FP8_NAMES)
@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
def test_division_rules_agree_exactly_for_power_of_two_scales(name, dtype):
    for scale in (2.0 ** -9, 1.0, 4.0):
        x = _inputs(dtype, scale)
        ref = _bits(quantize_kv(x, scale, name, division="exact"))
        for rule in ("reciprocal", "rounded_divisor"):
            assert torch.equal(_bits(quantize_kv(x, scale, name, division=rule)), ref), (rule, scale)


def test_division_rules_differ_for_other_scales():
    """The three rules are really distinct: with 0.37, fp32 inputs next to FP8 rounding boundaries
    tell true division from the reciprocal, and bf16 rounding of the divisor shows everywhere."""
    x = _inputs(torch.float32, S_ODD)
    e = _bits(quantize_kv(x, S_ODD, "fp8_e4m3"))
    assert int((_bits(quantize_kv(x, S_ODD, "fp8_e4m3", division="reciprocal")) != e).sum()) > 0
    xb = _inputs(torch.bfloat16, S_ODD)
    eb = _bits(quantize_kv(xb, S_ODD, "fp8_e4m3"))
    assert int((_bits(quantize_kv(xb, S_ODD, "fp8_e4m3", division="rounded_divisor")) != eb).sum()) > 100
    assert torch.equal(_bits(quantize_kv(x, S_ODD, "fp8_e4m3", division="rounded_divisor")), e)  # fp32: no-op


def test_cast_saturation_and_special_values():
    """Overflow, inf, NaN, signed zero and subnormals as SGLang's pool gets them from torch 2.13."""
    def q(vals, name, scale=None):
        return [b for b in _bits(quantize_kv(torch.tensor(vals, dtype=torch.float32), scale, name)).tolist()]

    # e4m3fn saturates every finite overflow and inf to ±448 (0x7e), keeps NaN (0x7f)
    assert q([448.0, 449.0, 464.0, 479.0, 480.0, 1e30, float("inf")], "fp8_e4m3") == [0x7E] * 7
    assert q([-1e30, -float("inf"), float("nan"), -0.0, 0.0], "fp8_e4m3") == [0xFE, 0xFE, 0x7F, 0x80, 0x00]
    # e5m2 rounds to nearest even and overflows to inf from 61440 (midpoint 57344 | 65536) on
    assert q([57344.0, 61439.0, 61440.0, 1e30, float("inf"), float("nan")], "fp8_e5m2") == \
        [0x7B, 0x7B, 0x7C, 0x7C, 0x7C, 0x7F]
    # subnormals: e4m3's smallest is 2^-9; half of it ties to even (0), 1.5x rounds up
    assert q([2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -10, -(2.0 ** -10)], "fp8_e4m3") == [0x01, 0x00, 0x01, 0x80]
    assert q([2.0 ** -16, 2.0 ** -17, 3 * 2.0 ** -18], "fp8_e5m2") == [0x01, 0x00, 0x01]
    # the scale moves the range: 448 * 4 is the largest unsaturated value at scale 4
    assert q([1792.0, 1800.0], "fp8_e4m3", 4.0) == [0x7E, 0x7E]
    assert float(fake_quant_kv(torch.tensor([1e6]), 4.0, "fp8_e4m3")) == 1792.0


@pytest.mark.parametrize("name", FP8_NAMES)
def test_round_trips(name):
    """Every finite FP8 value survives dequantize -> quantize at power-of-two scales (bf16, fp16,
    fp32); fake_quant is idempotent; relative error bounded by half an FP8 ulp in the normal range."""
    fdt = fp8_dtype(name)
    allq = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fdt)
    finite = allq[torch.isfinite(allq.float())]
    for scale in (2.0 ** -9, 1.0, 8.0):
        for dtype in COMPUTE:
            if dtype == torch.float16 and name == "fp8_e5m2" and scale != 1.0:
                continue  # 57344 * 8 overflows fp16, 2^-16 * 2^-9 underflows it
            back = quantize_kv(dequantize_kv(finite, scale, dtype), scale, name)
            assert torch.equal(_bits(back), _bits(finite)), (scale, dtype)
            # dequantisation at a power of two is exact
            assert torch.equal(dequantize_kv(finite, scale, torch.float64), finite.double() * scale)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10
    for scale in (2.0 ** -3, S_ODD):
        once = fake_quant_kv(x, scale, name)
        if scale == 2.0 ** -3:
            assert torch.equal(fake_quant_kv(once, scale, name), once)
        mant = 3 if name == "fp8_e4m3" else 2
        tiny = scale * (2.0 ** -6 if name == "fp8_e4m3" else 2.0 ** -14)  # smallest normal, scaled
        normal = x.abs() >= tiny
        rel = ((once - x).abs() / x.abs())[normal]
        assert float(rel.max()) <= 2.0 ** -(mant + 1) + 1e-6
    assert quantize_kv(x, S_ODD, name).dtype == fdt and quantize_kv(x.bfloat16(), 1.0, name).shape == x.shape


def test_fake_quant_gradient_is_straight_through():
    """The gradient passes unchanged (autograd through the FP8 casts would round it to FP8), the
    forward value is the no-grad one bit for bit."""
    g = torch.Generator().manual_seed(1)
    for dtype in COMPUTE:
        x = (torch.randn(64, generator=g) * 50).to(dtype).requires_grad_()
        up = (torch.randn(64, generator=g) * 1e-3).to(dtype)  # far below FP8's resolution at these magnitudes
        for scale in (None, S_ODD, 0.25):
            y = fake_quant_kv(x, scale, "fp8_e4m3")
            assert torch.equal(y.detach(), fake_quant_kv(x.detach(), scale, "fp8_e4m3"))
            (grad,) = torch.autograd.grad(y, x, up)
            assert torch.equal(grad, up)
    k = torch.randn(1, 2, 3, 4, requires_grad=True)
    fk, _ = KVQuantConfig("fp8_e5m2", (S_ODD,), (1.0,)).fake_quant(0, k, k)
    (grad,) = torch.autograd.grad(fk.sum(), k)
    assert torch.equal(grad, torch.ones_like(k))


def test_quantize_arguments():
    x = torch.ones(4)
    with pytest.raises(ConfigError, match="fp8_e4m4"):
        quantize_kv(x, 1.0, "fp8_e4m4")
    with pytest.raises(ValueError, match="division"):
        quantize_kv(x, 1.0, division="fast")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            quantize_kv(x, bad)
    with pytest.raises(TypeError):
        quantize_kv(torch.ones(4, dtype=torch.int32), 1.0)
    with pytest.raises(TypeError):
        dequantize_kv(x, 1.0, torch.float32)
    with pytest.raises(ValueError, match="per-tensor"):
        quantize_kv(x, torch.ones(2))


def test_round_up_pow2():
    assert [round_up_pow2(v) for v in (1.0, 0.75, 0.5, 3.0, 2.0 ** -130, 0.0015)] == \
        [1.0, 1.0, 0.5, 4.0, 2.0 ** -130, 2.0 ** -9]
    with pytest.raises(ValueError):
        round_up_pow2(0.0)


# ------------------------------------------------------------------------------------ config and file


def test_kv_quant_config():
    c = KVQuantConfig("fp8_e4m3", (0.5, S_ODD), (2.0, 0.25))
    assert c.num_layers == 2 and c.torch_dtype == torch.float8_e4m3fn and not c.power_of_two
    assert c.scales(1) == (S_ODD, 0.25) and c.merged().k_scales == c.merged().v_scales == (2.0, S_ODD)
    assert KVQuantConfig.unit(3, "fp8_e5m2").power_of_two and KVQuantConfig.unit(3).k_scales == (1.0,) * 3
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    fk, fv = c.fake_quant(1, k, v)
    assert torch.equal(fk, fake_quant_kv(k, S_ODD, "fp8_e4m3")) and torch.equal(fv, fake_quant_kv(v, 0.25, "fp8_e4m3"))
    with pytest.raises(IndexError):
        c.scales(2)
    for kw, match in ((dict(k_scales=(0.0,), v_scales=(1.0,)), r"k_scales\[0\].*positive"),
                      (dict(k_scales=(1.0,), v_scales=(float("nan"),)), r"v_scales\[0\]"),
                      (dict(k_scales=(0.1,), v_scales=(1.0,)), "not an fp32 value"),
                      (dict(k_scales=(1.0, 1.0), v_scales=(1.0,)), "2 k scales but 1 v"),
                      (dict(k_scales=(), v_scales=()), "at least one layer"),
                      (dict(k_scales=(True,), v_scales=(1.0,)), "expected a number")):
        with pytest.raises(ConfigError, match=match):
            KVQuantConfig("fp8_e4m3", **kw)
    with pytest.raises(ConfigError, match="division"):
        KVQuantConfig("fp8_e4m3", (1.0,), (1.0,), division="x")
    with pytest.raises(ConfigError, match="not supported"):
        KVQuantConfig("int8", (1.0,), (1.0,))


FP = "sha256:" + "ab" * 32


def _good(tmp_path, **changes):
    d = KVScales(KVQuantConfig("fp8_e4m3", (2.0 ** -9, S_ODD), (1.0, 4.0)), FP, "step-3",
                 {"method": "test"}).to_json()
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    f = tmp_path / "kv_scales.json"
    f.write_text(json.dumps(d))
    return f


_DROP = object()


def test_scales_file_round_trip(tmp_path):
    s = KVScales(KVQuantConfig("fp8_e5m2", (2.0 ** -9, S_ODD, 3.0), (1.0, 4.0, 2.0 ** -20)), FP, "7",
                 {"method": "reference", "amax_k": [0.1, 0.2, 0.3]})
    f = save_kv_scales(tmp_path / "sub" / "kv_scales.json", s)
    back = load_kv_scales(f, num_layers=3, kv_cache_dtype="fp8_e5m2", weights_fingerprint=FP)
    assert back == s and back.config.k_scales[1] == S_ODD  # fp32 value survives JSON exactly
    assert load_kv_scales(f, division="reciprocal").config.division == "reciprocal"
    assert not list((tmp_path / "sub").glob(".*tmp*"))  # atomic write leaves nothing behind


@pytest.mark.parametrize("changes,key,match", [
    (dict(extra=1), "extra", "unknown key"),
    (dict(k_scale=_DROP), "k_scale", "missing"),
    (dict(format="something"), "format", "expected"),
    (dict(format_version=2), "format_version", "not supported"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype", "not supported"),
    (dict(num_layers=0), "num_layers", "positive integer"),
    (dict(num_layers=3), "k_scale", "2 scales for num_layers=3"),
    (dict(k_scale="x"), "k_scale", "list"),
    (dict(v_scale=[1.0, -2.0]), "v_scale[1]", "positive finite"),
    (dict(v_scale=[0.0, 1.0]), "v_scale[0]", "positive finite"),
    (dict(k_scale=[1.0, float("nan")]), "k_scale[1]", "positive finite"),
    (dict(k_scale=[float("inf"), 1.0]), "k_scale[0]", "positive finite"),
    (dict(k_scale=[0.1, 1.0]), "k_scale[0]", "not an fp32 value"),
    (dict(k_scale=[True, 1.0]), "k_scale[0]", "expected a number"),
    (dict(weights={"fingerprint": "md5:1"}), "weights.fingerprint", "sha256"),
    (dict(weights={"fingerprint": FP, "step": 1}), "weights", "expected"),
    (dict(weights={"fingerprint": FP, "version": [1]}), "weights.version", "string"),
    (dict(calibration=[]), "calibration", "object"),
])
def test_scales_file_errors_name_file_and_key(tmp_path, changes, key, match):
    f = _good(tmp_path, **changes)
    with pytest.raises(FormatError) as e:
        load_kv_scales(f)
    msg = str(e.value)
    assert str(f) in msg and repr(key) in msg and match in msg, msg


def test_scales_file_expectations(tmp_path):
    f = _good(tmp_path)
    load_kv_scales(f, num_layers=2, kv_cache_dtype="fp8_e4m3", weights_fingerprint=FP)
    for kw, key in ((dict(num_layers=28), "num_layers"), (dict(kv_cache_dtype="fp8_e5m2"), "kv_cache_dtype"),
                    (dict(weights_fingerprint="sha256:" + "0" * 64), "weights.fingerprint")):
        with pytest.raises(FormatError, match=f"{str(f)}: key {key!r}"):
            load_kv_scales(f, **kw)
    with pytest.raises(FormatError, match="does not exist"):
        load_kv_scales(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match="bad.json: not a readable JSON"):
        load_kv_scales(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(FormatError, match="top level"):
        load_kv_scales(tmp_path / "list.json")


def test_weights_fingerprint(tiny_qwen2_dir, tmp_path):
    """Same tensors -> same fingerprint (directory, state dict, sharded copy); one ulp -> different."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_qwen2_dir / "model.safetensors"))
    fp = weights_fingerprint(tiny_qwen2_dir)
    assert fp.startswith("sha256:") and len(fp) == 71 and weights_fingerprint(sd) == fp
    names = sorted(sd)
    shard = tmp_path / "sharded"
    shard.mkdir()
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: sd[k] for k in keys}, str(shard / fname))
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    assert weights_fingerprint(shard) == fp
    bumped = dict(sd)
    w = bumped[names[0]].clone()
    w.view(-1).view(torch.int32)[0] += 1
    bumped[names[0]] = w
    assert weights_fingerprint(bumped) != fp
    assert weights_fingerprint({k: v.bfloat16() for k, v in sd.items()}) != fp
    with pytest.raises(FormatError, match="no model.safetensors"):
        weights_fingerprint(tmp_path)


# ------------------------------------------------------------------------------------ calibration


@pytest.fixture(scope="module")
def calib_cfg(tmp_path_factory):
    from megatron_smd.config import load_config

    d = tmp_path_factory.mktemp("calib")
    return load_config("configs/tiny-cpu.yaml", [f"model.path={d / 'tiny-qwen2'}"])


@pytest.fixture(scope="module")
def modelopt_run(calib_cfg, tmp_path_factory, one_torch_thread):
    if not HAVE_MODELOPT:
        pytest.skip("nvidia-modelopt is not installed")
    from megatron_smd.quant.calibrate import calibrate_kv

    out = tmp_path_factory.mktemp("kv_modelopt")
    return out, calibrate_kv(calib_cfg, out, method="modelopt", num_prompts=24, weights_version="step-0")


@needs_modelopt
def test_calibration_modelopt_writes_valid_scales(modelopt_run, calib_cfg, sg):
    """modelopt on the tiny model: finite positive power-of-two scales per layer, accepted by our
    loader (layer count, dtype, fingerprint of the calibrated weights) and by SGLang's loader."""
    from pathlib import Path

    from megatron_smd.model.hf import read_arch

    out, s = modelopt_run
    model_dir = Path(calib_cfg.model.path)
    L = read_arch(model_dir).num_layers
    c = s.config
    assert s.calibration["method"] == "modelopt" and s.calibration["modelopt_version"]
    assert c.num_layers == L and c.power_of_two and c.dtype == "fp8_e4m3"
    assert all(math.isfinite(v) and v > 0 for v in c.k_scales + c.v_scales)
    back = load_kv_scales(out / "kv_scales.json", num_layers=L, kv_cache_dtype="fp8_e4m3",
                          weights_fingerprint=weights_fingerprint(model_dir))
    assert back.config == c and back.weights_version == "step-0"
    # every scale keeps its layer's calibration maximum in range and is the smallest power of two that does
    for amax, sc in zip(s.calibration["amax_k"] + s.calibration["amax_v"], c.k_scales + c.v_scales):
        assert amax / sc <= FP8_MAX["fp8_e4m3"] < 2 * amax / sc
    from safetensors.torch import load_file

    assert {k: float(v) for k, v in load_file(str(out / "kv_scales.safetensors")).items()} == \
        {k: float(v) for k, v in modelopt_scale_tensors(c).items()}
    wu = sg["sglang.srt.model_loader.weight_utils"]
    assert dict(wu.kv_cache_scales_loader(str(out / "kv_cache_scales.json"), 0, 1, L, "qwen2")) == \
        dict(enumerate(c.merged().k_scales))


@needs_modelopt
def test_calibration_modelopt_matches_reference_and_modelopt_export(modelopt_run, calib_cfg, tmp_path):
    """The modelopt amax equals the project's own model's max |K| (after RoPE) / |V| to fp32 noise,
    and the raw scales are bit-identical to what modelopt's Hugging Face export writes."""
    from pathlib import Path

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_smd.quant.calibrate import _batches, calibration_sequences, collect_kv_amax, modelopt_kv_only_config

    _, s = modelopt_run
    model_dir = Path(calib_cfg.model.path)
    seqs = calibration_sequences(calib_cfg, model_dir, 24)
    ref_k, ref_v, used = collect_kv_amax(model_dir, seqs, method="reference")
    assert used == "reference"
    torch.testing.assert_close(torch.tensor(s.calibration["amax_k"]), torch.tensor(ref_k), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(s.calibration["amax_v"]), torch.tensor(ref_v), rtol=1e-5, atol=0)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()

    def loop(mm):
        with torch.no_grad():
            for ids in _batches(seqs, 16):
                mm(input_ids=ids, use_cache=False)

    m = mtq.quantize(m, modelopt_kv_only_config(), loop)
    export_hf_checkpoint(m, export_dir=str(tmp_path / "export"))
    sd = load_file(str(tmp_path / "export" / "model.safetensors"))
    L = len(s.config.k_scales)
    exported_k = [float(sd[f"model.layers.{i}.self_attn.k_proj.k_scale"]) for i in range(L)]
    exported_v = [float(sd[f"model.layers.{i}.self_attn.v_proj.v_scale"]) for i in range(L)]
    assert exported_k == s.calibration["raw_k_scale"] and exported_v == s.calibration["raw_v_scale"]


def test_calibration_reference_path_and_options(calib_cfg, tmp_path, one_torch_thread):
    """method='reference' needs no modelopt; e5m2 scales use 57344 and write no SGLang param file;
    the options and argument errors."""
    from megatron_smd.quant.calibrate import calibrate_kv, resolve_kv_cache_dtype, scales_from_amax

    cfg = calib_cfg.model_copy(update={"sglang": {"kv_cache_dtype": "fp8_e5m2"}})
    assert resolve_kv_cache_dtype(cfg) == "fp8_e5m2" and resolve_kv_cache_dtype(calib_cfg) == "fp8_e4m3"
    s = calibrate_kv(cfg, tmp_path, method="reference", num_prompts=8, power_of_two=False)
    assert s.calibration["method"] == "reference" and s.config.dtype == "fp8_e5m2"
    assert list(s.config.k_scales) == s.calibration["raw_k_scale"]
    for a, sc in zip(s.calibration["amax_k"], s.config.k_scales):
        assert sc == float(torch.tensor(a, dtype=torch.float32) / torch.tensor(57344.0))
    assert (tmp_path / "kv_scales.json").is_file() and not (tmp_path / "kv_cache_scales.json").exists()
    load_kv_scales(tmp_path / "kv_scales.json", kv_cache_dtype="fp8_e5m2")
    c, raw = scales_from_amax([0.5, 900.0], [448.0, 0.001], power_of_two=False, clamp_to_one=True)
    assert c.k_scales[0] == 1.0 and c.k_scales[1] == float(torch.tensor(900.0) / 448.0) and c.v_scales == (1.0, 1.0)
    c2, _ = scales_from_amax([0.5, 900.0], [448.0, 0.001])
    assert c2.k_scales == (2.0 ** -9, 4.0) and c2.v_scales == (1.0, 2.0 ** -18)
    with pytest.raises(SMDError, match="layer 1 V amax"):
        scales_from_amax([1.0, 1.0], [1.0, 0.0])
    with pytest.raises(ConfigError, match="method"):
        calibrate_kv(calib_cfg, tmp_path, method="fast")
    with pytest.raises(ConfigError, match="num_prompts"):
        calibrate_kv(calib_cfg, tmp_path, num_prompts=0)
    with pytest.raises(ConfigError, match="not supported"):
        calibrate_kv(calib_cfg, tmp_path, kv_cache_dtype="int8")
