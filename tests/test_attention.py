"""ShadowCoreAttention (megatron_smd/learner/attention/) against an independent reference.

The reference is written out here: for every (batch, query head) it builds the allowed set
``{(i, j): j <= i < evict[j]}`` with Python loops, takes ``softmax(q k^T * scale)`` over it with
einsum in float64 and multiplies by ``v``; gradients are autograd through that explicit
computation. The module runs in float32; tolerance 1e-5 (absolute) on outputs and dq/dk/dv.
Single process here; CP and TP on gloo processes are in tests/test_cp_attention.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_smd.errors import ConfigError, MaskError, SMDError
from megatron_smd.learner.attention import (
    ShadowCoreAttention,
    block_mask_by_enumeration,
    block_mask_from_intervals,
    effective_evict,
    interval_block_tables,
    shadow_mask_mod,
)

warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager-flex "use torch.compile" hint

TOL = 1e-5
L, HQ, HKV, D = 3, 4, 2, 8


def make_config(num_layers: int = L, heads: int = HQ, groups: int = HKV, **kw) -> TransformerConfig:
    return TransformerConfig(
        num_layers=num_layers, hidden_size=heads * D, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=D, attention_dropout=0.0, hidden_dropout=0.0, **kw,
    )


def make_attn(layer_number: int = 1, backend: str = "sdpa", config: TransformerConfig | None = None, **kw):
    return ShadowCoreAttention(config or make_config(), layer_number, AttnMaskType.causal, "self", backend=backend, **kw)


def random_evict(gen: torch.Generator, doc_lens_per_row: list[list[int]], heads: int | None, layers: int = L,
                 keep: float = 0.3) -> torch.Tensor:
    """Valid packed evict ``[b, L, (H,) s]``: for key j of document [a, c), evict in [j+1, c];
    a fraction ``keep`` of keys is never evicted (evict = c)."""
    s = sum(doc_lens_per_row[0])
    rows = []
    for docs in doc_lens_per_row:
        assert sum(docs) == s
        end = torch.cat([torch.full((n,), a + n) for a, n in zip([sum(docs[:k]) for k in range(len(docs))], docs)])
        j = torch.arange(s)
        shape = (layers, s) if heads is None else (layers, heads, s)
        u = torch.rand(shape, generator=gen)
        e = j + 1 + (u * (end - j).float()).long()  # in [j+1, end]
        kept = torch.rand(shape, generator=gen) < keep
        rows.append(torch.where(kept, end, e.clamp(max=end)))
    return torch.stack(rows).to(torch.int32)


def allowed_matrix(e_row: torch.Tensor) -> torch.Tensor:
    """Python-loop rule: allowed[i, j] = j <= i < e_row[j]."""
    s = e_row.numel()
    ev = e_row.tolist()
    return torch.tensor([[j <= i < ev[j] for j in range(s)] for i in range(s)])


def reference_attention(q, k, v, evict_layer, scale):
    """Explicit float64 masked softmax attention. q [s,b,hq,d], k/v [s,b,hkv,d]; evict_layer
    [b, s] or [b, hkv, s] (or None = causal). Returns [s, b, hq*d]."""
    s, b, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    q, k, v = q.double(), k.double(), v.double()
    outs = []
    for bi in range(b):
        heads = []
        for h in range(hq):
            kh = h // g
            if evict_layer is None:
                e_row = torch.full((s,), s)
            elif evict_layer.dim() == 2:
                e_row = evict_layer[bi]
            else:
                e_row = evict_layer[bi, kh]
            allowed = allowed_matrix(e_row)
            scores = torch.einsum("id,jd->ij", q[:, bi, h], k[:, bi, kh]) * scale
            p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            heads.append(torch.einsum("ij,jd->id", p, v[:, bi, kh]))
        outs.append(torch.stack(heads, dim=1))  # [s, hq, d]
    return torch.stack(outs, dim=1).reshape(s, b, hq * d)


def qkv(gen, s, b, hq=HQ, hkv=HKV, requires_grad=True):
    q = torch.randn(s, b, hq, D, generator=gen)
    k = torch.randn(s, b, hkv, D, generator=gen)
    v = torch.randn(s, b, hkv, D, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_with_grads(fn, q, k, v, dout):
    q, k, v = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def max_errs(a, b):
    return [float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)]


def layer_rows(evict, layer_number):
    row = evict[:, layer_number - 1]
    return row


# ------------------------------------------------------------------------------------------------
# sdpa == independent reference (outputs and gradients)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True], ids=["per_layer", "per_head"])
@pytest.mark.parametrize("layer_number", [1, 3])
def test_sdpa_matches_reference(per_head, layer_number):
    gen = torch.Generator().manual_seed(10 * layer_number + per_head)
    s, b = 24, 2
    # row 0 packs two documents (10 + 14), row 1 one document of 24
    evict = random_evict(gen, [[10, 14], [24]], HKV if per_head else None)
    q, k, v = qkv(gen, s, b)
    dout = torch.randn(s, b, HQ * D, generator=gen)
    attn = make_attn(layer_number)
    got = run_with_grads(lambda q, k, v: attn(q, k, v, evict), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, layer_rows(evict, layer_number), 1 / math.sqrt(D)),
                         q, k, v, dout)
    errs = max_errs(got, ref)
    print(f"sdpa vs reference ({'per-head' if per_head else 'per-layer'}, layer {layer_number}): "
          f"max|d out, dq, dk, dv| = {errs}")
    assert max(errs) <= TOL
    # the layer index matters: another layer's rows give a different answer
    other = run_with_grads(lambda q, k, v: reference_attention(q, k, v, layer_rows(evict, 2), 1 / math.sqrt(D)),
                           q, k, v, dout)
    assert float((other[0] - got[0]).abs().max()) > 1e-3


def test_no_cross_document_attention():
    gen = torch.Generator().manual_seed(3)
    s, b, n1 = 20, 1, 8
    evict = random_evict(gen, [[n1, s - n1]], None)
    # by construction: no query of document 2 may see a key of document 1, in any layer
    for layer in range(L):
        allowed = allowed_matrix(evict[0, layer])
        assert not allowed[n1:, :n1].any()
        assert allowed.diagonal().all()
    q, k, v = qkv(gen, s, b, requires_grad=False)
    attn = make_attn(2)
    base = attn(q, k, v, evict)
    k2, v2 = k.clone(), v.clone()
    k2[:n1] += 5.0
    v2[:n1] -= 3.0
    moved = attn(q, k2, v2, evict)
    assert torch.equal(moved[n1:], base[n1:])  # document 2 is untouched by document 1's keys
    assert (moved[:n1] - base[:n1]).abs().max() > 1e-2


def test_causal_when_mask_is_none():
    gen = torch.Generator().manual_seed(4)
    s, b = 16, 2
    q, k, v = qkv(gen, s, b)
    dout = torch.randn(s, b, HQ * D, generator=gen)
    attn = make_attn(1)
    got = run_with_grads(lambda q, k, v: attn(q, k, v, None), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, None, 1 / math.sqrt(D)), q, k, v, dout)
    errs = max_errs(got, ref)
    print(f"causal (mask None) vs reference: {errs}")
    assert max(errs) <= TOL


def test_thd_layout():
    gen = torch.Generator().manual_seed(5)
    lens = [7, 9]
    t = sum(lens)
    q, k, v = qkv(gen, t, 1, requires_grad=False)
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    attn = make_attn(2)
    # None + THD: causal inside each cu_seqlens document
    out = attn(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)
    assert out.shape == (t, HQ * D)
    doc_end = torch.tensor([7] * 7 + [16] * 9, dtype=torch.int32).view(1, t)
    ref = reference_attention(q, k, v, doc_end, 1 / math.sqrt(D))[:, 0]
    assert float((out - ref).abs().max()) <= TOL
    # evict given in THD: same as the sbhd call with b = 1
    evict = random_evict(gen, [lens], HKV)
    out_thd = attn(q[:, 0], k[:, 0], v[:, 0], evict, packed_seq_params=psp)
    out_sbhd = attn(q, k, v, evict)[:, 0]
    assert torch.equal(out_thd, out_sbhd)


def test_padded_rows_stay_finite():
    gen = torch.Generator().manual_seed(6)
    s, real = 16, 11
    evict = random_evict(gen, [[real]], None)
    padded = torch.zeros(1, L, s, dtype=torch.int32)
    padded[..., :real] = evict
    q, k, v = qkv(gen, s, 1)
    dout = torch.randn(s, 1, HQ * D, generator=gen)
    dout[real:] = 0  # loss-masked padding
    attn = make_attn(3)
    out, dq, dk, dv = run_with_grads(lambda q, k, v: attn(q, k, v, padded), q, k, v, dout)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    ref = run_with_grads(lambda q, k, v: reference_attention(q, k, v, evict[:, 2], 1 / math.sqrt(D)),
                         q[:real], k[:real], v[:real], dout[:real])
    errs = max_errs((out[:real], dq[:real], dk[:real], dv[:real]), ref)
    assert max(errs) <= TOL
    assert float(dk[real:].abs().max()) == 0.0 and float(dv[real:].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------
# flex
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True], ids=["per_layer", "per_head"])
def test_flex_forward_matches_sdpa(per_head):
    gen = torch.Generator().manual_seed(7 + per_head)
    s, b = 40, 2
    evict = random_evict(gen, [[15, 25], [40]], HKV if per_head else None)
    q, k, v = qkv(gen, s, b)  # requires_grad: the module must still run flex under no_grad
    ref = make_attn(2)(q, k, v, evict).detach()
    flex = make_attn(2, "flex", flex_block_size=16)  # several tiles: partial, full and empty ones
    with torch.no_grad():
        out = flex(q, k, v, evict)
        causal = flex(q, k, v, None)
    err = float((out - ref).abs().max())
    print(f"flex vs sdpa forward ({'per-head' if per_head else 'per-layer'}): max|d| = {err:.2e}")
    assert err <= TOL
    assert float((causal - make_attn(2)(q, k, v, None).detach()).abs().max()) <= TOL


def test_flex_cpu_backward_is_refused_not_silently_replaced():
    gen = torch.Generator().manual_seed(8)
    s, b = 16, 1
    evict = random_evict(gen, [[s]], None)
    q, k, v = qkv(gen, s, b)
    with pytest.raises(ConfigError, match="backend='sdpa'"):
        make_attn(1, "flex")(q, k, v, evict)
    # explicit opt-in: same numbers as sdpa, gradients included
    dout = torch.randn(s, b, HQ * D, generator=gen)
    fb = run_with_grads(lambda q, k, v: make_attn(1, "flex", flex_cpu_grad_fallback=True)(q, k, v, evict), q, k, v, dout)
    sd = run_with_grads(lambda q, k, v: make_attn(1)(q, k, v, evict), q, k, v, dout)
    assert max(max_errs(fb, sd)) == 0.0


def _tables(bm):
    return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices


@pytest.mark.parametrize("s,block", [(96, 16), (100, 16), (300, 128)])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_layer", "per_head"])
@pytest.mark.parametrize("rows", ["all", "cp2_rank0", "cp2_rank1"])
def test_block_mask_from_intervals_equals_create_block_mask(s, block, per_head, rows):
    gen = torch.Generator().manual_seed(s + block)
    row_docs = [[s // 3, s - s // 3], [s]]
    # mostly-kept keys, so that 16-wide tiles can be full
    e = effective_evict(random_evict(gen, row_docs, HKV if per_head else None, keep=0.97)[:, 1])
    if rows == "all":
        q_pos = None
    else:  # Megatron CP=2 layout: rank r holds chunks r and 3-r of 4 (chunk length may not be a tile multiple)
        c = s // 4
        r = 0 if rows == "cp2_rank0" else 1
        q_pos = torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((3 - r) * c, (4 - r) * c)])
    fast = block_mask_from_intervals(e, q_pos, s, num_q_heads=HQ, block=block)
    slow = block_mask_by_enumeration(e, q_pos, s, num_q_heads=HQ, block=block)
    for a, b in zip(_tables(fast), _tables(slow)):
        assert torch.equal(a, b)
    # and the tiles are sound element-wise: every pair in a full tile is visible, and every
    # visible pair lies in a listed (partial or full) tile
    e3 = e.unsqueeze(1) if e.dim() == 2 else e
    qp = q_pos if q_pos is not None else torch.arange(s)
    partial, full = interval_block_tables(e3, qp, s, block)
    vis = (torch.arange(s).view(1, -1) <= qp.view(-1, 1)) & (qp.view(-1, 1) < e3.unsqueeze(-2))  # [b,h,sq,s]
    q_tile, k_tile = torch.arange(qp.numel()) // block, torch.arange(s) // block
    full_el = full[:, :, q_tile][:, :, :, k_tile]
    listed_el = (partial | full)[:, :, q_tile][:, :, :, k_tile]
    assert bool((vis | ~full_el).all())
    assert bool((~vis | listed_el).all())
    assert bool(partial.any()) and (block == 128 or bool(full.any()))


def test_block_mask_cache_follows_the_mask_tensor():
    gen = torch.Generator().manual_seed(9)
    s = 32
    evict = random_evict(gen, [[s]], None)
    q, k, v = qkv(gen, s, 1, requires_grad=False)
    attn = make_attn(2, "flex", flex_block_size=16)
    attn(q, k, v, evict)
    first = attn._block_mask_cache[2]
    attn(q, k, v, evict)
    assert attn._block_mask_cache[2] is first  # same micro-batch: reused
    attn(q, k, v, evict.detach())
    assert attn._block_mask_cache[2] is first  # activation recompute passes a detached copy back in
    evict[0, 1, -1] = s  # an in-place write bumps the tensor version: rebuilt
    attn(q, k, v, evict)
    assert attn._block_mask_cache[2] is not first
    second = attn._block_mask_cache[2]
    attn(q, k, v, evict.clone())
    assert attn._block_mask_cache[2] is not second  # a new micro-batch tensor


def test_mask_mod_reads_evict():
    e = torch.tensor([[3, 2, 4, 4]], dtype=torch.int32)  # key 0 visible to rows 0..2
    mm = shadow_mask_mod(e, None)
    t = lambda x: torch.tensor(x)  # noqa: E731
    assert bool(mm(t(0), t(0), t(2), t(0))) and not bool(mm(t(0), t(0), t(3), t(0)))
    assert not bool(mm(t(0), t(0), t(1), t(2)))  # future key


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_shape_mismatches_name_the_numbers():
    gen = torch.Generator().manual_seed(11)
    s = 12
    q, k, v = qkv(gen, s, 2, requires_grad=False)
    attn = make_attn(2)
    good = random_evict(gen, [[s], [s]], HKV)
    with pytest.raises(MaskError, match=r"has 4 layers, the model has num_layers=3"):
        attn(q, k, v, random_evict(gen, [[s], [s]], None, layers=4))
    with pytest.raises(MaskError, match=r"has 3 KV heads.*2 KV heads"):
        attn(q, k, v, random_evict(gen, [[s], [s]], 3))
    with pytest.raises(MaskError, match=r"has length 13, the sequence has length 12"):
        attn(q, k, v, random_evict(gen, [[13], [13]], None))
    with pytest.raises(MaskError, match=r"has batch 1, the query has batch 2"):
        attn(q, k, v, good[:1])
    with pytest.raises(MaskError, match=r"int32 shadow mask.*torch.bool"):
        attn(q, k, v, torch.ones(2, 1, s, s, dtype=torch.bool))
    with pytest.raises(SMDError, match=r"got 2 query heads.*expected 4"):
        attn(q[:, :, :2], k, v, good)
    with pytest.raises(MaskError, match=r"has 2 layers, the model has num_layers=3"):
        make_attn(3)(q, k, v, good[:, :2])


def test_config_errors():
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1"):
        # TransformerConfig's default attention_dropout is 0.1
        ShadowCoreAttention(TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4),
                            1, AttnMaskType.causal, "self")
    with pytest.raises(ConfigError, match=r"backend must be one of"):
        make_attn(1, "bogus")
    with pytest.raises(ConfigError, match=r"attn_mask_type must be causal"):
        ShadowCoreAttention(make_config(), 1, AttnMaskType.no_mask, "self")
    with pytest.raises(SMDError, match=r"attention_bias is not supported"):
        make_attn(1)(*qkv(torch.Generator().manual_seed(0), 4, 1, requires_grad=False), None,
                     attention_bias=torch.zeros(1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_te_backend_refuses_clearly_without_cuda():
    with pytest.raises(ConfigError, match=r"backend='te' needs a CUDA device"):
        make_attn(1, "te")


def test_built_from_a_megatron_module_spec():
    """SelfAttention builds core attention via ``submodules.core_attention(config=..., ...)``."""
    spec = ModuleSpec(module=ShadowCoreAttention, params={"backend": "flex", "flex_block_size": 16})
    kwargs = dict(config=make_config(), layer_number=2, attn_mask_type=AttnMaskType.causal, attention_type="self",
                  cp_comm_type=None, softmax_scale=None, pg_collection=None)
    for built in (spec(**kwargs), build_module(spec, **kwargs)):
        assert isinstance(built, ShadowCoreAttention)
        assert built.backend == "flex" and built.flex_block_size == 16 and built.layer_number == 2


# ------------------------------------------------------------------------------------------------
# GPU (skipped on CPU with the reason)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend,form", [("flex", "auto"), ("te", "auto"), ("te", "bias"), ("te", "arbitrary")])
@pytest.mark.parametrize("per_head", [False, True], ids=["per_layer", "per_head"])
def test_gpu_backends_match_sdpa(backend, form, per_head):
    if backend == "te":
        pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    gen = torch.Generator().manual_seed(12)
    s, b = 256, 2
    evict = random_evict(gen, [[100, 156], [256]], HKV if per_head else None).cuda()
    q, k, v = [t.detach().cuda().to(torch.bfloat16) for t in qkv(gen, s, b)]
    dout = torch.randn(s, b, HQ * D, generator=gen).cuda().to(torch.bfloat16)
    kw = {"te_mask_form": form} if backend == "te" else {}
    got = run_with_grads(lambda q, k, v: make_attn(2, backend, **kw)(q, k, v, evict), q, k, v, dout)
    ref = run_with_grads(lambda q, k, v: make_attn(2)(q.float(), k.float(), v.float(), evict), q, k, v, dout)
    errs = max_errs(got, ref)
    print(f"{backend}/{form} bf16 vs sdpa fp32: {errs}")
    assert max(errs) <= 3e-2


# ------------------------------------------------------------------------------------------------
# benchmark smoke (not timed: checks the report's shape and the mask-size arithmetic)
# ------------------------------------------------------------------------------------------------


def test_attention_bench_smoke():
    import json

    from megatron_smd.bench.attention import run_attention_bench, synthetic_evict

    report = run_attention_bench(seq_lens=(48,), backends=("sdpa", "flex"), repeats=1, warmup=1,
                                 num_heads=4, num_kv_heads=2, head_dim=8, bytes_num_layers=2)
    json.dumps(report)  # JSON-able
    assert {r["backend"] for r in report["results"]} == {"sdpa", "flex"}
    for r in report["results"]:
        assert r["masked_ms"] > 0 and r["causal_ms"] > 0 and r["ratio"] > 0
        assert r["mode"] == ("forward" if r["backend"] == "flex" and not torch.cuda.is_available() else "fwd+bwd")
    sizes = report["mask_bytes"][0]
    assert sizes["evict_bytes_per_layer"] == 4 * 48 and sizes["dense_bool_bytes_per_layer"] == 48 * 48
    assert sizes["dense_bit_bytes_per_layer"] == 48 * 48 // 8 and sizes["evict_bytes_2_layers"] == 2 * 4 * 48
    assert 0 < sizes["kept_fraction"] < 1
    assert any("forward-only" in n for n in report["notes"]) or torch.cuda.is_available()
    # the synthetic schedules obey the mask invariants: j + 1 <= evict[j] <= T
    for policy in ("streaming", "h2o_like"):
        e = synthetic_evict(100, 0.25, policy)
        j = torch.arange(100)
        assert bool(((e >= j + 1) & (e <= 100)).all())
    with pytest.raises(ConfigError, match="backend 'te' is not usable here"):
        if torch.cuda.is_available():
            pytest.skip("checks the refusal without CUDA")
        run_attention_bench(seq_lens=(16,), backends=("te",))


# ------------------------------------------------------------------------------------------------
# flex: bucketed row lengths, a handful of compiled graphs
# ------------------------------------------------------------------------------------------------


def test_flex_compiles_a_handful_of_graphs_for_20_row_lengths(monkeypatch):
    """20 micro-batches, every one a new row length (20..200): the compiled flex kernel sees only
    bucketed lengths, so dynamo builds one graph per bucket (counted by a stand-in backend that
    runs each captured graph eagerly), and every output equals SDPA on the unpadded rows."""
    from megatron_smd.learner import attention as A
    from megatron_smd.learner.attention import kernels  # where the compile switches live

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(kernels, "_COMPILED_FLEX", None)
    monkeypatch.setattr(kernels, "FLEX_COMPILE_BACKEND", counting_backend)
    gen = torch.Generator().manual_seed(21)
    lengths = torch.randperm(181, generator=gen)[:20].add(20).tolist()
    assert len(set(lengths)) == 20
    flex = make_attn(2, "flex", flex_block_size=16, flex_compile=True)
    worst = 0.0
    for s in lengths:
        evict = random_evict(gen, [[s]], None)
        q, k, v = qkv(gen, s, 1, requires_grad=False)
        with torch.no_grad():
            out = flex(q, k, v, evict)
        if s in lengths[:3]:
            worst = max(worst, float((out - make_attn(2)(q, k, v, evict)).abs().max()))
    buckets = {A.flex_bucket_length(s, 16) for s in lengths}
    print(f"\nflex: 20 row lengths {min(lengths)}..{max(lengths)} -> {len(buckets)} buckets, {len(graphs)} graphs "
          f"compiled; max |flex - sdpa| {worst:.1e}")
    torch._dynamo.reset()
    assert len(graphs) <= len(buckets) <= 6
    assert worst <= TOL


# ------------------------------------------------------------------------------------------------
# TE mask form: chosen once by trying what TE accepts, score_mod -> bias -> arbitrary
# ------------------------------------------------------------------------------------------------


class _RefusingTE:
    """Stand-in for TE's DotProductAttention: refuses the mask forms in ``refuse`` the way TE does
    when no backend takes the inputs, and records the forms it was called with."""

    def __init__(self, refuse):
        self.refuse, self.calls = set(refuse), []

    def forward(self, q, k, v, score_mod=None, **kw):  # has score_mod: a TE >= 2.17 signature
        raise AssertionError("called through __call__")

    def __call__(self, q, k, v, **kw):
        form = ("score_mod" if "score_mod" in kw else "bias" if "core_attention_bias" in kw
                else "arbitrary" if kw.get("attn_mask_type") == "arbitrary" else "causal")
        self.calls.append(form)
        if form in self.refuse:
            raise ValueError("No dot product attention backend is available for the provided inputs.")
        return torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype)


@pytest.mark.parametrize("refuse,want", [((), "score_mod"), (("score_mod",), "bias"),
                                         (("score_mod", "bias"), "arbitrary")])
def test_te_fallback_order_against_a_refusing_stand_in(refuse, want, caplog):
    from megatron_smd.learner.attention import te_form_candidates, te_select_form, te_shadow_attention

    gen = torch.Generator().manual_seed(3)
    s = 12
    evict = random_evict(gen, [[s]], None)[:, 0]
    q, k, v = [t.to(torch.bfloat16) for t in qkv(gen, s, 1, requires_grad=False)]
    te = _RefusingTE(refuse)
    cands, skipped = te_form_candidates(torch.bfloat16, has_score_mod=True)
    assert cands == ["score_mod", "bias", "arbitrary"] and not skipped

    def run(form):  # the real call for bias / arbitrary; score_mod's needs cuDNN's graph API, so it is
        if form == "score_mod":  # called directly (the stand-in only looks at the keyword)
            return te(q, k, v, score_mod=1)
        return te_shadow_attention(te, q, k, v, evict.to(torch.int32), None, form)

    with caplog.at_level("WARNING"):
        form, out = te_select_form(run, cands, skipped)
    assert form == want and te.calls == list(cands[: cands.index(want) + 1])
    assert out.shape == (s, 1, HQ * D)
    for f in refuse:
        assert f"{f!r} not used" in caplog.text and "No dot product attention backend" in caplog.text
    assert f"using mask form {want!r}" in caplog.text


def test_te_fallback_fp32_and_total_refusal():
    from megatron_smd.learner.attention import te_form_candidates, te_select_form

    cands, skipped = te_form_candidates(torch.float32, has_score_mod=True)
    assert cands == ["bias", "arbitrary"] and "unfused" in skipped["score_mod"]
    cands, skipped = te_form_candidates(torch.bfloat16, has_score_mod=False)
    assert cands == ["bias", "arbitrary"] and "2.17" in skipped["score_mod"]
    te = _RefusingTE({"bias", "arbitrary"})

    def run(f):
        return te(torch.zeros(2, 1, 1, 1), None, None, **({"core_attention_bias": 1} if f == "bias" else
                                                            {"attn_mask_type": "arbitrary"}))

    with pytest.raises(ConfigError, match=r"score_mod: .*2\.17.*bias: ValueError: No dot product.*arbitrary: ValueError"):
        te_select_form(run, cands, skipped)


# ------------------------------------------------------------------------------------------------
# package layout: the mask math and the kernels load without Megatron-Core
# ------------------------------------------------------------------------------------------------


def test_masks_and_kernels_import_without_megatron():
    """A fresh interpreter importing the mask math, the kernels and the package has no ``megatron``
    module loaded; ``ShadowCoreAttention`` (the Megatron module) loads it on first access."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import megatron_smd.learner.attention.masks, megatron_smd.learner.attention.kernels\n"
        "import megatron_smd.learner.attention as A\n"
        "assert not [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')], sorted(sys.modules)\n"
        "cls = A.ShadowCoreAttention\n"
        "assert 'megatron.core' in sys.modules and cls.__module__ == 'megatron_smd.learner.attention.core'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
