"""The Megatron learner: dense logits vs transformers, exact HF<->Megatron conversion, TP/PP equivalence.

Every Megatron run happens in spawned gloo processes (tests/_dist.py), so Megatron's global state
and the CPU shim never enter the pytest process. Tiny models: hidden 64, 4 layers, 4 heads, 2 KV
heads (plus a 1-KV-head Llama, where TP=2 exceeds the KV heads), vocabulary 250 (padded to 256, so
the padded-vocabulary path is exercised), weights N(0, 0.1) so attention is far from uniform.

Tolerances (fp32, CPU): logits and log-probs vs transformers <= 1e-4 absolute; TP=2 / PP=2 logits
and log-probs vs the single-process Megatron run <= 1e-5 absolute; gradients (of a weighted sum of
token log-probs) <= 1e-4 / 1e-5 relative to each tensor's largest gradient entry (see
``_grad_rel_diff``); conversion round trips bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from megatron_smd.errors import ConfigError
from megatron_smd.learner import convert
from megatron_smd.learner.logprobs import token_logprobs
from megatron_smd.model.hf import expected_shapes, save_model_dir
from megatron_smd.model.tiny import init_weights, tiny_arch
from megatron_smd.parallel.layout import ParallelLayout

from _dist import run_distributed

HF_TOL = 1e-4
PAR_TOL = 1e-5
VOCAB = 250
SEQ = 64
BATCH = 2
N_MB = 3
WEIGHT_STD = 0.1
BACKEND = "megatron"

# pad_token_id=None: transformers builds nn.Embedding(padding_idx=pad_token_id), which zeroes that
# row's gradient; Megatron's embedding has no such exception, so the reference must not have one.
CASES = {
    "qwen2": dict(arch="qwen2", vocab_size=VOCAB, pad_token_id=None),  # tied embeddings, QKV bias
    "llama": dict(arch="llama", vocab_size=VOCAB, pad_token_id=None),  # untied
    "llama_kv1": dict(arch="llama", vocab_size=VOCAB, pad_token_id=None, num_kv_heads=1),  # TP=2 > KV heads
}


def _arch(case: str):
    kw = dict(CASES[case])
    return tiny_arch(kw.pop("arch"), **kw)


def _weights(case: str) -> dict[str, torch.Tensor]:
    return init_weights(_arch(case), seed=sorted(CASES).index(case), std=WEIGHT_STD)


def _batches(arch, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three micro-batches: plain positions, a packed-style row (positions restart), an offset start.

    Plain dicts (the pytest process never imports Megatron); workers wrap them in ``MicroBatch``.
    """
    g = torch.Generator().manual_seed(seed)
    half = torch.arange(SEQ // 2)
    positions = [torch.arange(SEQ), torch.cat([half, half]), torch.arange(SEQ) + 3]
    out = []
    for k in range(N_MB):
        tokens = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g)
        targets = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g)
        w = torch.rand((BATCH, SEQ), generator=g)
        out.append(dict(tokens=tokens, position_ids=positions[k].expand(BATCH, SEQ).clone(), targets=targets, w=w))
    return out


def _microbatches(arch, seed: int = 0):
    from megatron_smd.learner.runner import MicroBatch

    return [MicroBatch(tokens=b["tokens"], position_ids=b["position_ids"], targets=b["targets"],
                       extras={"w": b["w"]}) for b in _batches(arch, seed)]


def _weighted_logprob_sum(logp: torch.Tensor, mb) -> tuple[torch.Tensor, int]:
    return (logp * mb.extras["w"]).sum(), mb.tokens.numel()


# ------------------------------------------------------------------------------------------------
# worker (runs in each spawned rank)
# ------------------------------------------------------------------------------------------------


def _learner_worker(rank: int, world: int, tp: int, pp: int, cases: list[str], model_dirs: dict[str, str]):
    from megatron_smd.learner.convert import load_hf_into_model
    from megatron_smd.learner.model import build_gpt_model
    from megatron_smd.learner.runner import run_microbatches
    from megatron_smd.parallel.vocab_parallel import vocab_parallel_token_logprobs

    layout = ParallelLayout.from_env(tp=tp, pp=pp)
    layout.initialize(seed=0)
    out: dict[str, dict] = {}
    for case in cases:
        arch = _arch(case)
        layout.validate(arch, SEQ)
        model = build_gpt_model(arch, attention_backend=BACKEND)
        load_hf_into_model(model, model_dirs.get(case) or _weights(case), layout)
        mbs = _microbatches(arch)
        res: dict = {"tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
                     "layer_numbers": [int(layer.layer_number) for layer in model.decoder.layers]}
        if pp == 1:  # direct forward: this rank's vocabulary shard of the logits
            with torch.no_grad():
                res["logits"] = [model(mb.tokens, mb.position_ids, None) for mb in mbs]
            if tp > 1:  # vocab-parallel log-probs (values and gradient) vs the gathered-logits math
                shard = res["logits"][0].clone().requires_grad_(True)
                full = [torch.empty_like(shard) for _ in range(tp)]
                torch.distributed.all_gather(full, shard.detach(), group=layout.tp_group)
                full = torch.cat(full, -1).requires_grad_(True)
                t = mbs[0].targets
                par = vocab_parallel_token_logprobs(shard, t, vocab_size=arch.vocab_size, temperature=0.7)
                ref = token_logprobs(full, t, vocab_size=arch.vocab_size, temperature=0.7)
                (par * mbs[0].extras["w"]).sum().backward()
                (ref * mbs[0].extras["w"]).sum().backward()
                v = shard.shape[-1]
                res["vp_value_diff"] = (par - ref).abs().max().item()
                res["vp_grad_diff"] = (shard.grad - full.grad[..., layout.tp_rank * v:(layout.tp_rank + 1) * v]).abs().max().item()
        fwd = run_microbatches(model, layout, mbs, vocab_size=arch.vocab_size, forward_only=True)
        model.zero_grad(set_to_none=True)
        trained = run_microbatches(model, layout, mbs, vocab_size=arch.vocab_size, forward_only=False,
                                   loss_fn=_weighted_logprob_sum)
        res["logprobs_fwd_only"] = torch.stack(fwd.logprobs)
        res["logprobs"] = torch.stack(trained.logprobs)
        res["losses"] = trained.losses
        res["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        out[case] = res
    layout.destroy()
    return out


def _grad_rel_diff(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|ours - want| / max|want|: the gradient error relative to its scale.

    Gradients of a token *sum* over 384 tokens reach |g| ~ 25, where fp32 summation order alone
    moves them by ~1e-5 absolute (~1e-6 relative); a mis-sharded tensor is off by O(1) relative.
    """
    assert set(ours) == set(want), set(ours) ^ set(want)
    return max(((ours[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


def _hf_grads(results: list[dict], case: str, tp: int, pp: int) -> dict[str, torch.Tensor]:
    per_rank = {(r[case]["tp_rank"], r[case]["pp_rank"]): r[case]["grads"] for r in results}
    return convert.megatron_to_hf(per_rank, _arch(case), tp, pp)


# ------------------------------------------------------------------------------------------------
# the single-process reference run (shared by the tests below)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """TP=1, PP=1 Megatron run of every case; qwen2 is loaded from a model directory on disk."""
    d = tmp_path_factory.mktemp("learner") / "qwen2"
    save_model_dir(d, _arch("qwen2"), _weights("qwen2"))
    (res,) = run_distributed(_learner_worker, 1, args=(1, 1, list(CASES), {"qwen2": str(d)}))
    return res


def _hf_model(case: str):
    transformers = pytest.importorskip("transformers")
    arch = _arch(case)
    cfg = transformers.AutoConfig.for_model(**arch.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(_weights(case), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if arch.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_dense_logits_match_transformers(single, case):
    """Megatron (TP=1) logits == transformers' Qwen2/LlamaForCausalLM, incl. RoPE at given positions."""
    arch, hf = _arch(case), _hf_model(case)
    res = single[case]
    assert res["layer_numbers"] == [1, 2, 3, 4]
    for k, mb in enumerate(_batches(arch)):
        with torch.no_grad():
            ref = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        ours = res["logits"][k]
        assert ours.shape == (BATCH, SEQ, 256)
        diff = (ours[..., :VOCAB] - ref).abs().max().item()
        print(f"{case} mb{k}: max |logits - transformers| = {diff:.2e}")
        assert diff <= HF_TOL
        assert ours[..., VOCAB:].abs().max().item() == 0.0  # padded vocabulary rows are zero
    # position_ids matter: the packed-style row (positions restart at S/2) differs from the same
    # tokens at positions 0..S-1 (a constant offset, micro-batch 2, would not: RoPE is relative)
    mb = _batches(arch)[1]
    with torch.no_grad():
        plain = hf(input_ids=mb["tokens"]).logits
    assert (res["logits"][1][..., :VOCAB] - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_single_process_logprobs_and_grads_match_transformers(single, case):
    """Runner log-probs and the gradient of sum(w * logp), against autograd through transformers."""
    arch, hf = _arch(case), _hf_model(case)
    res = single[case]
    hf.zero_grad()
    total = 0.0
    ref_lp = []
    for mb in _batches(arch):
        logits = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        lp = token_logprobs(logits, mb["targets"], vocab_size=VOCAB)
        loss = (lp * mb["w"]).sum()
        loss.backward()
        total += loss.item()
        ref_lp.append(lp.detach())
    lp_diff = (res["logprobs"] - torch.stack(ref_lp)).abs().max().item()
    assert (res["logprobs_fwd_only"] == res["logprobs"]).all()
    ours = _hf_grads([single], case, 1, 1)
    ref = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    if arch.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    assert set(ours) == set(ref)
    gdiff = _grad_rel_diff(ours, ref)
    print(f"{case}: logprobs diff {lp_diff:.2e}, grad diff {gdiff:.2e}, loss {sum(res['losses']):.4f} vs {total:.4f}")
    assert lp_diff <= HF_TOL
    assert gdiff <= HF_TOL
    assert abs(sum(res["losses"]) - total) <= HF_TOL * abs(total)


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_learner_worker, 2, args=(2, 1, list(CASES), {}))


@pytest.fixture(scope="module")
def pp2():
    return run_distributed(_learner_worker, 2, args=(1, 2, ["qwen2", "llama"], {}))


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_single_process(single, tp2, case):
    ref = single[case]
    assert [r[case]["tp_rank"] for r in tp2] == [0, 1]
    for k in range(N_MB):
        full = torch.cat([r[case]["logits"][k] for r in tp2], dim=-1)  # vocab shards, rank order
        d = (full - ref["logits"][k]).abs().max().item()
        assert d <= PAR_TOL, (k, d)
    for r in tp2:
        lp_diff = (r[case]["logprobs"] - ref["logprobs"]).abs().max().item()
        assert lp_diff <= PAR_TOL, lp_diff
        assert r[case]["vp_value_diff"] <= 1e-6 and r[case]["vp_grad_diff"] <= 1e-6
    ours, want = _hf_grads(tp2, case, 2, 1), _hf_grads([single], case, 1, 1)
    gdiff = _grad_rel_diff(ours, want)
    print(f"{case} TP=2: logprobs diff {lp_diff:.2e}, grad diff {gdiff:.2e}")
    assert gdiff <= PAR_TOL


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_pp2_matches_single_process(single, pp2, case):
    """PP=2 with 1F1B over 3 micro-batches; tied qwen2 embedding gradients summed over both copies."""
    ref = single[case]
    assert [(r[case]["pp_rank"], r[case]["layer_numbers"]) for r in pp2] == [(0, [1, 2]), (1, [3, 4])]
    for r in pp2:  # log-probs are broadcast from the last stage to every rank
        lp_diff = (r[case]["logprobs"] - ref["logprobs"]).abs().max().item()
        assert lp_diff <= PAR_TOL, lp_diff
        assert abs(sum(r[case]["losses"]) - sum(ref["losses"])) <= PAR_TOL * abs(sum(ref["losses"]))
    if _arch(case).tie_word_embeddings:  # both stages hold the full (summed) embedding gradient
        first = pp2[0][case]["grads"]["embedding.word_embeddings.weight"]
        last = pp2[1][case]["grads"]["output_layer.weight"]
        assert torch.equal(first, last)
    ours, want = _hf_grads(pp2, case, 1, 2), _hf_grads([single], case, 1, 1)
    gdiff = _grad_rel_diff(ours, want)
    print(f"{case} PP=2: logprobs diff {lp_diff:.2e}, grad diff {gdiff:.2e}")
    assert gdiff <= PAR_TOL


# ------------------------------------------------------------------------------------------------
# conversion (no processes)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)])
def test_conversion_round_trip_is_bit_exact(case, tp, pp):
    arch = _arch(case)
    if arch.num_kv_heads < tp and tp % arch.num_kv_heads:
        pytest.skip("layout not allowed")
    hf_sd = _weights(case)
    ranks = {(t, p): convert.hf_to_megatron(hf_sd, arch, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    for (t, p), local in ranks.items():
        assert sorted(local) == sorted(convert.local_param_names(arch, p, pp))
        vp = convert.padded_vocab_size(arch.vocab_size, tp)
        for name, tensor in local.items():
            if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
                assert tensor.shape == (vp // tp, arch.hidden_size)
    back = convert.megatron_to_hf(ranks, arch, tp, pp)
    assert list(back) == list(expected_shapes(arch))
    for name, t in hf_sd.items():
        assert torch.equal(back[name], t), name


def test_conversion_layout_details():
    """Spot-check the layouts against their definitions (independent of the round trip)."""
    arch = _arch("qwen2")  # 4 heads, 2 KV groups, head_dim 16, F = 256, tied
    hf_sd = _weights("qwen2")
    hd, qpg = arch.head_dim, arch.num_heads // arch.num_kv_heads
    q, k, v = (hf_sd[f"model.layers.3.self_attn.{x}_proj.weight"] for x in "qkv")
    for t in range(2):
        local = convert.hf_to_megatron(hf_sd, arch, t, 2, 1, 2)  # stage 1 holds layers 2, 3 as 0, 1
        qkv = local["decoder.layers.1.self_attention.linear_qkv.weight"]
        # TP rank t owns KV group t: [q heads of group t; k_t; v_t]
        want = torch.cat([q[t * qpg * hd:(t + 1) * qpg * hd], k[t * hd:(t + 1) * hd], v[t * hd:(t + 1) * hd]])
        assert torch.equal(qkv, want)
        bias = local["decoder.layers.1.self_attention.linear_qkv.bias"]
        qb, kb, vb = (hf_sd[f"model.layers.3.self_attn.{x}_proj.bias"] for x in "qkv")
        assert torch.equal(bias, torch.cat([qb[t * qpg * hd:(t + 1) * qpg * hd], kb[t * hd:(t + 1) * hd],
                                            vb[t * hd:(t + 1) * hd]]))
        fc1 = local["decoder.layers.1.mlp.linear_fc1.weight"]
        F = arch.intermediate_size
        gate, up = hf_sd["model.layers.3.mlp.gate_proj.weight"], hf_sd["model.layers.3.mlp.up_proj.weight"]
        assert torch.equal(fc1, torch.cat([gate[t * F // 2:(t + 1) * F // 2], up[t * F // 2:(t + 1) * F // 2]]))
        o = hf_sd["model.layers.3.self_attn.o_proj.weight"]
        D = arch.hidden_size
        assert torch.equal(local["decoder.layers.1.self_attention.linear_proj.weight"], o[:, t * D // 2:(t + 1) * D // 2])
        out = local["output_layer.weight"]  # tied: the last stage's copy of the embedding
        emb = hf_sd["model.embed_tokens.weight"]
        rows = emb[t * 128:min((t + 1) * 128, VOCAB)]
        assert torch.equal(out[: rows.shape[0]], rows) and not out[rows.shape[0]:].any()
    # the tied copy on the last stage maps to no HF tensor; the first stage's embedding does
    assert list(convert.iter_hf_from_local("output_layer.weight", [out, out], arch, pp_rank=1, pp_size=2)) == []
    names = [n for n, _ in convert.iter_hf_from_local("decoder.layers.1.mlp.linear_fc1.weight", [fc1, fc1],
                                                      arch, pp_rank=1, pp_size=2)]
    assert names == ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="decoder.layers.7"):
        list(convert.iter_hf_from_local("decoder.layers.7.mlp.linear_fc1.weight", fc1, arch, pp_rank=0, pp_size=2))


def test_padded_vocab_size():
    assert convert.padded_vocab_size(250, 1) == 256
    assert convert.padded_vocab_size(250, 2) == 256
    assert convert.padded_vocab_size(257, 2) == 512
    assert convert.padded_vocab_size(151936, 4, 128) == 152064  # Qwen2.5 at TP=4


# ------------------------------------------------------------------------------------------------
# log-probs math and layout validation (no processes)
# ------------------------------------------------------------------------------------------------


def test_token_logprobs_excludes_padded_vocab_and_applies_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, generator=g)
    logits[..., 6:] = 50.0  # padded columns with large logits must not count
    targets = torch.randint(0, 6, (2, 5), generator=g)
    got = token_logprobs(logits, targets, vocab_size=6, temperature=0.5)
    x = logits[..., :6] / 0.5
    want = x.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(x, -1)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="vocab_size=9"):
        token_logprobs(logits, targets, vocab_size=9)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(world_size=4, tp=3), r"world size 4 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"),
    (dict(world_size=2, tp=0), r"tp must be a positive integer, got 0"),
])
def test_layout_world_size_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        ParallelLayout(**kwargs)


def test_layout_model_and_sequence_errors():
    a = tiny_arch("llama", vocab_size=VOCAB, hidden_size=96, num_heads=6, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"num_attention_heads=6 is not divisible by tp=4"):
        ParallelLayout(world_size=4, tp=4).validate(a)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=3 and tp=2"):
        ParallelLayout(world_size=2, tp=2).validate(a)
    with pytest.raises(ConfigError, match=r"num_hidden_layers=4 is not divisible by pp=3"):
        ParallelLayout(world_size=3, pp=3).validate(a)
    with pytest.raises(ConfigError, match=r"sequence length 60 is not divisible by 2\*cp = 8"):
        ParallelLayout(world_size=4, cp=4).validate(seq_len=60)
    lay = ParallelLayout(world_size=8, tp=2, pp=2)
    assert lay.dp == 2
    lay.validate(_arch("qwen2"), seq_len=SEQ)  # ok: 4 heads / 2 KV heads over TP=2, 4 layers over PP=2
    ParallelLayout(world_size=2, tp=2).validate(_arch("llama_kv1"))  # KV head replicated over TP=2
