"""The Megatron learner: dense logits vs transformers, exact HF<->Megatron conversion, TP/PP/CP equivalence,
and shadow-mask replay against an independent pure-torch reference.

All Megatron work happens in one spawn of 2 gloo processes (tests/_dist.py), so Megatron's global
state and the CPU shim never enter the pytest process. The two processes run four layouts one
after the other (the process group is kept, Megatron's groups rebuilt):

* ``ref``: TP=1, PP=1 (world 2 = DP 2; each rank is a complete unsharded replica, rank 0 is used),
* ``tp2``: TP=2, ``pp2``: PP=2 (1F1B over 3 micro-batches), ``cp2``: CP=2 (shadow-mask runs only).

Tiny models: hidden 64, 4 layers, 4 heads, 2 KV heads (plus a 1-KV-head Llama, where TP=2 exceeds
the KV heads), vocabulary 250 (padded to 256, so the padded-vocabulary path is exercised), weights
N(0, 0.1) so attention is far from uniform, 2 x 64 tokens per micro-batch.

Tolerances (fp32, CPU): logits and log-probs vs transformers <= 1e-4 absolute; TP/PP/CP logits and
log-probs vs the unsharded run, and shadow-mask log-probs vs the pure-torch reference, <= 1e-5
absolute; gradients (of a weighted sum of token log-probs) <= 1e-4 / 1e-5 relative to each
tensor's largest entry (see ``_grad_rel_diff``); conversion round trips bit-exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_smd.errors import ConfigError
from megatron_smd.learner import convert
from megatron_smd.learner.logprobs import token_logprobs
from megatron_smd.mask import pack, to_dense, validate_evict
from megatron_smd.model.hf import expected_shapes, save_model_dir
from megatron_smd.model.tiny import init_weights, tiny_arch
from megatron_smd.parallel.layout import ParallelLayout

from _dist import run_distributed

pytestmark = pytest.mark.slow  # a spawn of 2 gloo ranks building Megatron models

HF_TOL = 1e-4
PAR_TOL = 1e-5
VOCAB = 250
SEQ = 64
BATCH = 2
N_MB = 3
WEIGHT_STD = 0.1
ADAM_LR = 1e-2

# pad_token_id=None: transformers builds nn.Embedding(padding_idx=pad_token_id), which zeroes that
# row's gradient; Megatron's embedding has no such exception, so the reference must not have one.
CASES = {
    "qwen2": dict(arch="qwen2", vocab_size=VOCAB, pad_token_id=None),  # tied embeddings, QKV bias
    "llama": dict(arch="llama", vocab_size=VOCAB, pad_token_id=None),  # untied
    "llama_kv1": dict(arch="llama", vocab_size=VOCAB, pad_token_id=None, num_kv_heads=1),  # TP=2 > KV heads
}
LAYOUTS = [("ref", 1, 1, 1), ("tp2", 2, 1, 1), ("pp2", 1, 2, 1), ("cp2", 1, 1, 2)]


def _arch(case: str):
    kw = dict(CASES[case])
    return tiny_arch(kw.pop("arch"), **kw)


def _weights(case: str) -> dict[str, torch.Tensor]:
    return init_weights(_arch(case), seed=sorted(CASES).index(case), std=WEIGHT_STD)


# ------------------------------------------------------------------------------------------------
# data (plain dicts: the pytest process never imports Megatron; workers wrap them in MicroBatch)
# ------------------------------------------------------------------------------------------------


def _dense_batches(arch, seed: int = 0) -> list[dict]:
    """Three causal micro-batches: plain positions, a packed-style row (positions restart), an offset."""
    g = torch.Generator().manual_seed(seed)
    half = torch.arange(SEQ // 2)
    positions = [torch.arange(SEQ), torch.cat([half, half]), torch.arange(SEQ) + 3]
    out = []
    for k in range(N_MB):
        out.append(dict(tokens=torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g),
                        targets=torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g),
                        w=torch.rand((BATCH, SEQ), generator=g),
                        position_ids=positions[k].expand(BATCH, SEQ).clone(), evict=None))
    return out


def _random_evict(g: torch.Generator, lead: tuple[int, ...], lens: list[int]) -> torch.Tensor:
    """A random valid packed mask: per document, evict[j] uniform in [j+1, doc_end], half never evicted."""
    parts = []
    for n in lens:
        j = torch.arange(n)
        e = j + 1 + (torch.rand((*lead, n), generator=g) * (n - j)).long()  # in [j+1, n]
        keep = torch.rand((*lead, n), generator=g) < 0.5
        parts.append(torch.where(keep, torch.full_like(e, n), e).to(torch.int32))
    packed, cu = pack(parts)
    validate_evict(packed, seq_end=torch.repeat_interleave(cu[1:].long(), torch.tensor(lens)))
    return packed


def _mask_batches(arch, seed: int = 1) -> list[dict]:
    """Shadow-mask micro-batches. Row 0 packs two 32-token trajectories (positions restart, document
    boundary in evict), row 1 is one 64-token trajectory. Micro-batch 0: per-layer evict [b, L, S];
    1: per-KV-head [b, L, H_kv, S]; 2: per-layer again with other draws."""
    g = torch.Generator().manual_seed(seed)
    L, H = arch.num_layers, arch.num_kv_heads
    rows = [[SEQ // 2, SEQ // 2], [SEQ]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in rows])
    out = []
    for k in range(N_MB):
        lead = (L, H) if k == 1 else (L,)
        evict = torch.stack([_random_evict(g, lead, r) for r in rows])
        out.append(dict(tokens=torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g),
                        targets=torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=g),
                        w=torch.rand((BATCH, SEQ), generator=g), position_ids=pos.clone(), evict=evict))
    return out


def _microbatches(batches: list[dict]):
    from megatron_smd.learner.runner import MicroBatch

    return [MicroBatch(tokens=b["tokens"], position_ids=b["position_ids"], targets=b["targets"],
                       evict=b["evict"], extras={"w": b["w"]}) for b in batches]


def _weighted_logprob_sum(logp: torch.Tensor, mb) -> tuple[torch.Tensor, int]:
    return (logp * mb.extras["w"]).sum(), mb.tokens.numel()


# ------------------------------------------------------------------------------------------------
# worker (runs in each spawned rank)
# ------------------------------------------------------------------------------------------------


def _train(model, layout, arch, mbs) -> dict:
    from megatron_smd.learner.runner import run_microbatches

    model.zero_grad(set_to_none=True)
    r = run_microbatches(model, layout, mbs, vocab_size=arch.vocab_size, forward_only=False,
                         loss_fn=_weighted_logprob_sum)
    return {"logprobs": torch.stack(r.logprobs), "losses": r.losses,
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def _vocab_parallel_check(layout, arch, logits_shard: torch.Tensor, mb) -> tuple[float, float]:
    """Vocab-parallel log-probs (value, gradient) vs token_logprobs on the all-gathered logits."""
    from megatron_smd.parallel.vocab_parallel import vocab_parallel_token_logprobs

    shard = logits_shard.clone().requires_grad_(True)
    parts = [torch.empty_like(shard) for _ in range(layout.tp)]
    torch.distributed.all_gather(parts, shard.detach(), group=layout.tp_group)
    full = torch.cat(parts, -1).requires_grad_(True)
    par = vocab_parallel_token_logprobs(shard, mb.targets, vocab_size=arch.vocab_size, temperature=0.7)
    ref = token_logprobs(full, mb.targets, vocab_size=arch.vocab_size, temperature=0.7)
    (par * mb.extras["w"]).sum().backward()
    (ref * mb.extras["w"]).sum().backward()
    v = shard.shape[-1]
    own = full.grad[..., layout.tp_rank * v:(layout.tp_rank + 1) * v]
    return (par - ref).abs().max().item(), (shard.grad - own).abs().max().item()


def _learner_worker(rank: int, world: int, model_dirs: dict[str, str]) -> dict:
    from megatron_smd.learner.convert import load_hf_into_model
    from megatron_smd.learner.model import build_gpt_model
    from megatron_smd.learner.runner import run_microbatches

    from megatron_smd.parallel import cpu_shim

    out: dict[str, dict] = {}
    for name, tp, pp, cp in LAYOUTS:
        layout = ParallelLayout.from_env(tp=tp, pp=pp, cp=cp)
        layout.initialize(seed=0)
        assert cpu_shim.is_applied() and cpu_shim.apply()  # applied by initialize; idempotent
        out[name] = {}
        for case in CASES:
            arch = _arch(case)
            layout.validate(arch, SEQ)
            if name == "pp2" and case == "llama_kv1":
                continue
            model = build_gpt_model(arch, attention_backend="sdpa")
            load_hf_into_model(model, model_dirs.get(case) or _weights(case), layout)
            res: dict = {"tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
                         "layer_numbers": [int(layer.layer_number) for layer in model.decoder.layers]}
            dense = _microbatches(_dense_batches(arch))
            if cp == 1:
                if pp == 1:  # direct forward: this rank's vocabulary shard of the logits
                    with torch.no_grad():
                        res["logits"] = [model(mb.tokens, mb.position_ids, None) for mb in dense]
                    if tp > 1:
                        res["vp_diffs"] = _vocab_parallel_check(layout, arch, res["logits"][0], dense[0])
                fwd = run_microbatches(model, layout, dense, vocab_size=arch.vocab_size, forward_only=True)
                res["dense_fwd_only"] = torch.stack(fwd.logprobs)
                res["dense"] = _train(model, layout, arch, dense)
            res["mask"] = _train(model, layout, arch, _microbatches(_mask_batches(arch)))
            if name == "ref":  # Megatron's own DotProductAttention: an independent dense reference
                meg = build_gpt_model(arch, attention_backend="megatron")
                load_hf_into_model(meg, _weights(case), layout)
                with torch.no_grad():
                    res["logits_megatron_attn"] = [meg(mb.tokens, mb.position_ids, None) for mb in dense]
            out[name][case] = res
        layout.destroy(process_group=False)
    layout = ParallelLayout.from_env()  # DP=2: Megatron DDP + distributed optimizer (shim check)
    layout.initialize(seed=0)
    out["dp2_optim"] = {"qwen2": _ddp_adam_step(layout, _arch("qwen2"))}
    layout.destroy(process_group=False)
    return out


def _ddp_adam_step(layout, arch) -> dict:
    """One step of Megatron's DistributedOptimizer (Adam) over Megatron DDP on the dense batches.

    Exercises the CPU shim's DDP / optimizer / grad-clipping stand-ins. Both DP ranks see the same
    micro-batches, so the reduced gradient is the single-replica gradient / its 384 tokens.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_smd.learner.convert import load_hf_into_model
    from megatron_smd.learner.model import build_gpt_model
    from megatron_smd.learner.runner import run_microbatches

    model = build_gpt_model(arch, attention_backend="sdpa")
    load_hf_into_model(model, _weights("qwen2"), layout)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=ADAM_LR, weight_decay=0.0, clip_grad=1e9,
                                                 use_distributed_optimizer=True), [ddp])
    ddp.zero_grad_buffer()
    opt.zero_grad()
    run_microbatches(ddp, layout, _microbatches(_dense_batches(arch)), vocab_size=arch.vocab_size,
                     forward_only=False, loss_fn=_weighted_logprob_sum)
    ok, grad_norm, _ = opt.step()
    return {"ok": bool(ok), "grad_norm": float(grad_norm), "tp_rank": 0, "pp_rank": 0,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


# ------------------------------------------------------------------------------------------------
# references (pytest process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per rank: {layout: {case: results}}; qwen2 is loaded from a model directory on disk."""
    d = tmp_path_factory.mktemp("learner") / "qwen2"
    save_model_dir(d, _arch("qwen2"), _weights("qwen2"))
    return run_distributed(_learner_worker, 2, args=({"qwen2": str(d)},), timeout=300)


def _ranks(runs, layout: str, case: str) -> list[dict]:
    return [r[layout][case] for r in runs]


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


def _masked_reference_logits(case: str, tokens: torch.Tensor, position_ids: torch.Tensor,
                             evict: torch.Tensor) -> torch.Tensor:
    """Independent pure-torch Qwen2/Llama forward under a shadow mask (HF weights, HF math).

    Per layer, the dense mask ``to_dense(evict[:, l])`` (``[b, S, S]`` or ``[b, H_kv, S, S]``) goes
    into ``F.scaled_dot_product_attention``; RoPE at ``position_ids``. Returns ``[b, S, V]``.
    """
    a, w = _arch(case), _weights(case)
    b, S = tokens.shape
    H, Hkv, hd, eps = a.num_heads, a.num_kv_heads, a.head_dim, a.rms_norm_eps

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = position_ids.float()[..., None] * inv_freq  # [b, S, hd/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rope(x):  # [b, h, S, hd]
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    def proj(x, name, heads):
        y = x @ w[name + ".weight"].T
        if a.qkv_bias:
            y = y + w[name + ".bias"]
        return y.view(b, S, heads, hd).transpose(1, 2)

    h = w["model.embed_tokens.weight"][tokens]
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "input_layernorm.weight"])
        q = rope(proj(x, p + "self_attn.q_proj", H))
        k = rope(proj(x, p + "self_attn.k_proj", Hkv)).repeat_interleave(H // Hkv, 1)
        v = proj(x, p + "self_attn.v_proj", Hkv).repeat_interleave(H // Hkv, 1)
        dense = to_dense(evict[:, i])
        mask = dense[:, None] if dense.dim() == 3 else dense.repeat_interleave(H // dense.shape[1], 1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + att.transpose(1, 2).reshape(b, S, H * hd) @ w[p + "self_attn.o_proj.weight"].T
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        mlp = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
        h = h + mlp @ w[p + "mlp.down_proj.weight"].T
    h = rms(h, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if a.tie_word_embeddings else w["lm_head.weight"]
    return h @ head.T


def _grad_rel_diff(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|ours - want| / max|want|: the gradient error relative to its scale.

    Gradients of a token *sum* over 256 tokens reach |g| ~ 25, where fp32 summation order alone
    moves them by ~1e-5 absolute (~1e-6 relative); a mis-sharded tensor is off by O(1) relative.
    """
    assert set(ours) == set(want), set(ours) ^ set(want)
    return max(((ours[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


def _hf_grads(ranks: list[dict], case: str, key: str, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Gather the ranks' local gradients back to HF names (the conversion table run on gradients)."""
    per_rank = {(r["tp_rank"], r["pp_rank"]): r[key]["grads"] for r in ranks}
    return convert.megatron_to_hf(per_rank, _arch(case), tp, pp)


# ------------------------------------------------------------------------------------------------
# dense path vs transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_dense_logits_match_transformers(runs, case):
    """Megatron (TP=1) logits == transformers' Qwen2/LlamaForCausalLM, incl. RoPE at given positions,
    with ShadowCoreAttention (sdpa, no mask) and with Megatron's own DotProductAttention."""
    arch, hf = _arch(case), _hf_model(case)
    res = _ranks(runs, "ref", case)[0]
    assert res["layer_numbers"] == [1, 2, 3, 4]
    for k, mb in enumerate(_dense_batches(arch)):
        with torch.no_grad():
            ref = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        for key in ("logits", "logits_megatron_attn"):
            ours = res[key][k]
            assert ours.shape == (BATCH, SEQ, 256)
            diff = (ours[..., :VOCAB] - ref).abs().max().item()
            print(f"{case} mb{k} {key}: max |logits - transformers| = {diff:.2e}")
            assert diff <= HF_TOL
            assert ours[..., VOCAB:].abs().max().item() == 0.0  # padded vocabulary rows are zero
    # position_ids matter: the packed-style row (positions restart at S/2) differs from the same
    # tokens at positions 0..S-1 (a constant offset, micro-batch 2, would not: RoPE is relative)
    mb = _dense_batches(arch)[1]
    with torch.no_grad():
        plain = hf(input_ids=mb["tokens"]).logits
    assert (res["logits"][1][..., :VOCAB] - plain).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_logprobs_and_grads_match_transformers(runs, case):
    """Runner log-probs and the gradient of sum(w * logp), against autograd through transformers."""
    arch, hf = _arch(case), _hf_model(case)
    res = _ranks(runs, "ref", case)[0]
    hf.zero_grad()
    total, ref_lp = 0.0, []
    for mb in _dense_batches(arch):
        logits = hf(input_ids=mb["tokens"], position_ids=mb["position_ids"]).logits
        lp = token_logprobs(logits, mb["targets"], vocab_size=VOCAB)
        loss = (lp * mb["w"]).sum()
        loss.backward()
        total += loss.item()
        ref_lp.append(lp.detach())
    assert torch.equal(res["dense_fwd_only"], res["dense"]["logprobs"])
    lp_diff = (res["dense"]["logprobs"] - torch.stack(ref_lp)).abs().max().item()
    ref = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    gdiff = _grad_rel_diff(_hf_grads([res], case, "dense", 1, 1), ref)
    print(f"{case}: logprobs diff {lp_diff:.2e}, grad rel diff {gdiff:.2e}")
    assert lp_diff <= HF_TOL
    assert gdiff <= HF_TOL
    assert abs(sum(res["dense"]["losses"]) - total) <= HF_TOL * abs(total)


# ------------------------------------------------------------------------------------------------
# TP / PP vs the unsharded run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_unsharded(runs, case):
    ref, ranks = _ranks(runs, "ref", case)[0], _ranks(runs, "tp2", case)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for k in range(N_MB):
        full = torch.cat([r["logits"][k] for r in ranks], dim=-1)  # vocabulary shards in rank order
        assert (full - ref["logits"][k]).abs().max().item() <= PAR_TOL
    for r in ranks:
        lp_diff = (r["dense"]["logprobs"] - ref["dense"]["logprobs"]).abs().max().item()
        assert lp_diff <= PAR_TOL, lp_diff
        vp_value, vp_grad = r["vp_diffs"]
        assert vp_value <= 1e-6 and vp_grad <= 1e-6, r["vp_diffs"]
    gdiff = _grad_rel_diff(_hf_grads(ranks, case, "dense", 2, 1), _hf_grads([ref], case, "dense", 1, 1))
    print(f"{case} TP=2: logprobs diff {lp_diff:.2e}, grad rel diff {gdiff:.2e}")
    assert gdiff <= PAR_TOL


@pytest.mark.parametrize("case", ["qwen2", "llama"])
def test_pp2_matches_unsharded(runs, case):
    """PP=2, 1F1B over 3 micro-batches; the tied qwen2 embedding's two copies get the summed gradient."""
    ref, ranks = _ranks(runs, "ref", case)[0], _ranks(runs, "pp2", case)
    assert [(r["pp_rank"], r["layer_numbers"]) for r in ranks] == [(0, [1, 2]), (1, [3, 4])]
    for r in ranks:  # log-probs are broadcast from the last stage to every rank
        lp_diff = (r["dense"]["logprobs"] - ref["dense"]["logprobs"]).abs().max().item()
        assert lp_diff <= PAR_TOL, lp_diff
        assert abs(sum(r["dense"]["losses"]) - sum(ref["dense"]["losses"])) <= PAR_TOL * abs(sum(ref["dense"]["losses"]))
    if _arch(case).tie_word_embeddings:
        first = ranks[0]["dense"]["grads"]["embedding.word_embeddings.weight"]
        assert torch.equal(first, ranks[1]["dense"]["grads"]["output_layer.weight"])
    gdiff = _grad_rel_diff(_hf_grads(ranks, case, "dense", 1, 2), _hf_grads([ref], case, "dense", 1, 1))
    print(f"{case} PP=2: logprobs diff {lp_diff:.2e}, grad rel diff {gdiff:.2e}")
    assert gdiff <= PAR_TOL


# ------------------------------------------------------------------------------------------------
# shadow-mask replay: every layout vs the pure-torch masked reference
# ------------------------------------------------------------------------------------------------


# PP x KV-head replication (llama_kv1) is not run: the worker skips it, tp2 covers the replication.
MASK_RUNS = [(lay, tp, pp, case) for lay, tp, pp, _ in LAYOUTS for case in CASES
             if not (lay == "pp2" and case == "llama_kv1")]


@pytest.mark.parametrize("layout,tp,pp,case", MASK_RUNS)
def test_shadow_mask_logprobs_match_torch_reference(runs, layout, tp, pp, case):
    """Packed rows, per-layer and per-KV-head evict, RoPE restarting per trajectory: learner log-probs
    == an SDPA forward with the dense mask of every layer; gradients == the unsharded learner's."""
    arch = _arch(case)
    ranks = _ranks(runs, layout, case)
    want = []
    for mb in _mask_batches(arch):
        logits = _masked_reference_logits(case, mb["tokens"], mb["position_ids"], mb["evict"])
        want.append(token_logprobs(logits, mb["targets"], vocab_size=VOCAB))
    want = torch.stack(want)
    # the mask matters: the same micro-batches without it give different log-probs
    ref_nomask = _masked_reference_logits(case, *(_mask_batches(arch)[0][k] for k in ("tokens", "position_ids")),
                                          evict=torch.full((BATCH, arch.num_layers, SEQ), SEQ, dtype=torch.int32))
    assert (token_logprobs(ref_nomask, _mask_batches(arch)[0]["targets"], vocab_size=VOCAB) - want[0]).abs().max() > 1e-2
    for r in ranks:
        diff = (r["mask"]["logprobs"] - want).abs().max().item()
        assert diff <= PAR_TOL, diff
    unsharded = _ranks(runs, "ref", case)[0]
    gdiff = _grad_rel_diff(_hf_grads(ranks, case, "mask", tp, pp), _hf_grads([unsharded], case, "mask", 1, 1))
    print(f"{case} {layout}: masked logprobs vs torch reference {diff:.2e}, grad rel diff vs unsharded {gdiff:.2e}")
    assert gdiff <= PAR_TOL


def test_ddp_distributed_optimizer_step_matches_torch_adamw(runs):
    """Megatron DDP + DistributedOptimizer (DP=2, gloo, CPU shim) == torch AdamW on the unsharded
    gradient / token count: the reported grad norm and every updated parameter."""
    arch = _arch("qwen2")
    ref = _ranks(runs, "ref", "qwen2")[0]
    grads = {n: g / (N_MB * BATCH * SEQ) for n, g in _hf_grads([ref], "qwen2", "dense", 1, 1).items()}
    params = {n: t.clone().requires_grad_(True) for n, t in _weights("qwen2").items()}
    for n, p in params.items():
        p.grad = grads[n]
    want_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    torch.optim.AdamW(list(params.values()), lr=ADAM_LR, weight_decay=0.0).step()
    for r in runs:
        res = r["dp2_optim"]["qwen2"]
        assert res["ok"]
        assert abs(res["grad_norm"] - want_norm) <= 1e-5 * want_norm, (res["grad_norm"], want_norm)
        got = convert.megatron_to_hf({(0, 0): {n: t for n, t in res["params"].items()}}, arch, 1, 1)
        diff = max((got[n] - params[n].detach()).abs().max().item() for n in params)
        moved = max((got[n] - _weights("qwen2")[n]).abs().max().item() for n in params)
        print(f"DDP+DistributedOptimizer: grad norm {res['grad_norm']:.6f} vs {want_norm:.6f}, "
              f"param diff {diff:.2e} (update size {moved:.2e})")
        assert diff <= 1e-6 and moved > 0.5 * ADAM_LR


# ------------------------------------------------------------------------------------------------
# conversion (no processes)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)])
def test_conversion_round_trip_is_bit_exact(case, tp, pp):
    arch = _arch(case)
    hf_sd = _weights(case)
    ranks = {(t, p): convert.hf_to_megatron(hf_sd, arch, t, tp, p, pp) for t in range(tp) for p in range(pp)}
    vp = convert.padded_vocab_size(arch.vocab_size, tp)
    for (t, p), local in ranks.items():
        assert sorted(local) == sorted(convert.local_param_names(arch, p, pp))
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
    hd, qpg, F_, D = arch.head_dim, arch.num_heads // arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    q, k, v = (hf_sd[f"model.layers.3.self_attn.{x}_proj.weight"] for x in "qkv")
    qb, kb, vb = (hf_sd[f"model.layers.3.self_attn.{x}_proj.bias"] for x in "qkv")
    gate, up = hf_sd["model.layers.3.mlp.gate_proj.weight"], hf_sd["model.layers.3.mlp.up_proj.weight"]
    o, emb = hf_sd["model.layers.3.self_attn.o_proj.weight"], hf_sd["model.embed_tokens.weight"]
    for t in range(2):
        local = convert.hf_to_megatron(hf_sd, arch, t, 2, 1, 2)  # stage 1 holds layers 2, 3 as 0, 1
        # TP rank t owns KV group t: [q heads of group t; k_t; v_t], bias alike
        qs, ks = slice(t * qpg * hd, (t + 1) * qpg * hd), slice(t * hd, (t + 1) * hd)
        assert torch.equal(local["decoder.layers.1.self_attention.linear_qkv.weight"], torch.cat([q[qs], k[ks], v[ks]]))
        assert torch.equal(local["decoder.layers.1.self_attention.linear_qkv.bias"], torch.cat([qb[qs], kb[ks], vb[ks]]))
        fs = slice(t * F_ // 2, (t + 1) * F_ // 2)
        assert torch.equal(local["decoder.layers.1.mlp.linear_fc1.weight"], torch.cat([gate[fs], up[fs]]))
        assert torch.equal(local["decoder.layers.1.self_attention.linear_proj.weight"], o[:, t * D // 2:(t + 1) * D // 2])
        out = local["output_layer.weight"]  # tied: the last stage's copy of the embedding
        rows = emb[t * 128:min((t + 1) * 128, VOCAB)]
        assert torch.equal(out[: rows.shape[0]], rows) and not out[rows.shape[0]:].any()
    # the tied copy on the last stage maps to no HF tensor; the first stage's embedding does
    assert list(convert.iter_hf_from_local("output_layer.weight", [out, out], arch, pp_rank=1, pp_size=2)) == []
    fc1 = local["decoder.layers.1.mlp.linear_fc1.weight"]
    names = [n for n, _ in convert.iter_hf_from_local("decoder.layers.1.mlp.linear_fc1.weight", [fc1, fc1],
                                                      arch, pp_rank=1, pp_size=2)]
    assert names == ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="decoder.layers.7"):
        list(convert.iter_hf_from_local("decoder.layers.7.mlp.linear_fc1.weight", fc1, arch, pp_rank=0, pp_size=2))


def test_cpu_shim_cp_rope_slice_matches_megatron_chunk_layout():
    """The CPU replacement of rope_utils.get_pos_emb_on_this_cp_rank keeps chunks r and 2cp-1-r."""
    from megatron_smd.parallel.cp import split_for_cp
    from megatron_smd.parallel.cpu_shim import get_pos_emb_on_this_cp_rank

    class Group:  # the two methods Megatron calls on the CP group
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

    emb = torch.randn(24, 1, 1, 8)  # [S, 1, 1, hn] as RotaryEmbedding.get_emb returns it
    for cp in (2, 3):
        for r in range(cp):
            got = get_pos_emb_on_this_cp_rank(emb, 0, Group(r, cp))
            assert torch.equal(got, split_for_cp(emb, 0, r, cp))


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
    lay.validate(_arch("qwen2"), seq_len=SEQ)  # 4 heads / 2 KV heads over TP=2, 4 layers over PP=2
    ParallelLayout(world_size=2, tp=2).validate(_arch("llama_kv1"))  # KV head replicated over TP=2
