"""Loss and advantage math against hand-computed numbers (no model involved)."""

import math

import pytest
import torch

from megatron_smd import losses as Lo


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = Lo.group_advantages(r, g)
    # group 0: mean .5, population std .5 -> +-1; group 1: all equal -> 0 (no signal, no blow-up)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-5)
    a = Lo.group_advantages(r, g, normalize_std=False)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))


def test_aggregate_token_vs_seq_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert Lo.aggregate(x, m, "token_mean").item() == pytest.approx(16 / 4)
    assert Lo.aggregate(x, m, "seq_mean").item() == pytest.approx((2.0 + 10.0) / 2)


def test_ppo_clip_by_hand():
    lp_old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([2.0])
    m = torch.ones(1, 3, dtype=torch.bool)
    loss, st = Lo.ppo_clip_loss(lp, lp_old, adv, m, clip_low=0.2, clip_high=0.2)
    # A>0: min(r A, clip(r) A): 1.5->1.2*2=2.4 ; 0.5->0.5*2=1.0 ; 1.1->2.2
    assert loss.item() == pytest.approx(-(2.4 + 1.0 + 2.2) / 3, rel=1e-6)
    assert st["clip_frac"] == pytest.approx(1 / 3)
    # negative advantage: 1.5 -> -3.0 (unclipped is smaller), 0.5 -> -1.6 (clipped 0.8 * -2)
    loss, st = Lo.ppo_clip_loss(lp, lp_old, -adv, m)
    assert loss.item() == pytest.approx(-(-3.0 - 1.6 - 2.2) / 3, rel=1e-6)
    # gradient flows only through unclipped tokens: d/dlp of -r*A at r=1.1, A=2 is -2.2 (token mean /3)
    lp = lp.clone().requires_grad_(True)
    Lo.ppo_clip_loss(lp, lp_old, adv, m)[0].backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -1.0 / 3, -2.2 / 3]]), atol=1e-6)


def test_ppo_weights_multiply_per_token_loss():
    lp = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = Lo.ppo_clip_loss(lp, lp, torch.tensor([1.0]), m, weights=w)
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)


def test_truncated_is_weights():
    w = Lo.truncated_is_weights(torch.log(torch.tensor([0.2, 0.9])), torch.log(torch.tensor([0.4, 0.1])), cap=2.0)
    assert torch.allclose(w, torch.tensor([0.5, 2.0]))


def test_sparse_rl_rejection_and_weights():
    lp_s = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    lp_do = torch.log(torch.tensor([[0.5, 0.6, 0.4],      # xi = 1, 1.2, .8 -> kept
                                    [0.5, 0.0001, 0.5],   # xi_min = 2e-4 < 1e-3 -> rejected
                                    [1.0, 1.0, 1.0]]))    # geo-mean xi = 2 -> kept at the edge (<= 2)
    m = torch.ones(3, 3, dtype=torch.bool)
    keep, w = Lo.sparse_rl_filter(lp_do, lp_s, m, reject_min=1e-3, reject_mean=2.0, weight_max=1.5)
    assert keep.tolist() == [True, False, True]
    assert torch.allclose(w[0], torch.tensor([1.0, 1.2, 0.8]), atol=1e-6)
    assert w[1].eq(0).all()
    assert torch.allclose(w[2], torch.tensor([1.5, 1.5, 1.5]))
    keep, _ = Lo.sparse_rl_filter(lp_do, lp_s, m, reject_mean=1.9)
    assert keep.tolist() == [True, False, False]


def test_distill_estimators_by_hand_and_gradient_direction():
    lp_sh = torch.log(torch.tensor([[0.5, 0.25]]))
    lp_de = torch.log(torch.tensor([[0.25, 0.25]]))
    m = torch.ones(1, 2, dtype=torch.bool)
    # log r = log(pd/ps) = [-log 2, 0]
    k1 = Lo.distill_kl(lp_sh, lp_de, m, estimator="k1")
    assert k1.item() == pytest.approx(math.log(2) / 2)
    k3 = Lo.distill_kl(lp_sh, lp_de, m, estimator="k3")
    assert k3.item() == pytest.approx(((0.5 - 1 + math.log(2)) + 0.0) / 2)
    for direction, grads in (("sparse_to_dense", (False, True)), ("dense_to_sparse", (True, False)), ("both", (True, True))):
        a, b = lp_sh.clone().requires_grad_(True), lp_de.clone().requires_grad_(True)
        Lo.distill_kl(a, b, m, direction=direction).backward()
        got = (a.grad is not None and bool(a.grad.abs().sum() > 0), b.grad is not None and bool(b.grad.abs().sum() > 0))
        assert got == grads, direction


def test_distill_full_vocab_equals_kl_definition():
    ls = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    ld = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]]))
    m = torch.ones(1, 1, dtype=torch.bool)
    kl_sd = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    got = Lo.distill_kl(ls[..., 0], ld[..., 0], m, estimator="full", logits_shadow=ls, logits_dense=ld)
    assert got.item() == pytest.approx(kl_sd, rel=1e-6)
    got = Lo.distill_kl(ls[..., 0], ld[..., 0], m, estimator="full", logits_shadow=ls, logits_dense=ld,
                        direction="dense_to_sparse")
    assert got.item() == pytest.approx(0.25 * math.log(0.5) + 0.5 * math.log(2), rel=1e-6)


def test_kl_penalty_and_mismatch_metrics():
    lp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    assert torch.allclose(Lo.kl_penalty(lp, ref, "k1"), torch.tensor([[math.log(2), 0.0]]), atol=1e-6)
    assert torch.allclose(Lo.kl_penalty(lp, ref, "k3"), torch.tensor([[0.5 - 1 + math.log(2), 0.0]]), atol=1e-6)
    mm = Lo.mismatch_metrics(lp, ref, torch.tensor([[True, False]]))
    assert mm["max_abs_logprob_diff"] == pytest.approx(math.log(2), rel=1e-6)


def test_sum_aggregation_with_coefficients_equals_token_mean_split_across_microbatches():
    """The learner splits a mini-batch over micro-batches and ranks with pre-normalised coefficients."""
    torch.manual_seed(0)
    lp, lp_old = torch.randn(4, 6) * 0.1, torch.randn(4, 6) * 0.1
    adv = torch.randn(4)
    m = torch.rand(4, 6) > 0.3
    full, _ = Lo.ppo_clip_loss(lp, lp_old, adv, m, aggregation="token_mean")
    coef = m.float() / m.sum()
    parts = sum(Lo.ppo_clip_loss(lp[i:i + 2], lp_old[i:i + 2], adv[i:i + 2], m[i:i + 2], weights=coef[i:i + 2],
                                 aggregation="sum")[0] for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    d_full = Lo.distill_kl(lp, lp_old, m)
    d_parts = sum(Lo.distill_kl(lp[i:i + 2], lp_old[i:i + 2], m[i:i + 2], weights=coef[i:i + 2], aggregation="sum")
                  for i in (0, 2))
    assert d_parts.item() == pytest.approx(d_full.item(), rel=1e-6)


def _alg(**kw):
    from megatron_smd.config import AlgorithmConfig

    return AlgorithmConfig.model_validate(kw)


def test_apply_correction_every_mode_by_hand():
    lp_s = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    lp_do = torch.log(torch.tensor([[0.5, 0.6, 0.4], [0.5, 0.0001, 0.5], [1.0, 1.0, 1.0]]))
    m = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    for mode in ("dense", "naive", "smd"):  # the sampler's log-prob is the ratio's denominator, no weights
        c = Lo.apply_correction(_alg(correction=mode), lp_sampler=lp_s, lp_dense_old=lp_do, mask=m)
        assert torch.equal(c.lp_old, lp_s) and c.weights.eq(1).all() and torch.equal(c.mask, m) and c.stats == {}
    c = Lo.apply_correction(_alg(correction="tis", tis_cap=1.5), lp_sampler=lp_s, lp_dense_old=lp_do, mask=m)
    assert torch.equal(c.lp_old, lp_do) and torch.equal(c.mask, m)
    assert torch.allclose(c.weights, torch.tensor([[1.0, 1.2, 0.8], [1.0, 2e-4, 1.0], [1.5, 1.5, 1.5]]), atol=1e-6)
    assert c.stats["correction/weight_mean"] == pytest.approx((1 + 1.2 + 0.8 + 1 + 2e-4 + 1 + 1.5 + 1.5) / 8, rel=1e-6)
    c = Lo.apply_correction(_alg(correction="sparse_rl", sparse_rl={"weight_max": 1.5}), lp_sampler=lp_s,
                            lp_dense_old=lp_do, mask=m)
    assert torch.equal(c.lp_old, lp_do)
    assert c.mask.tolist() == [[True, True, True], [False, False, False], [False, True, True]]  # row 1 rejected
    assert c.stats["correction/rejection_rate"] == pytest.approx(1 / 3)
    assert c.stats["correction/weight_mean"] == pytest.approx((1 + 1.2 + 0.8 + 1.5 + 1.5) / 5, rel=1e-6)
    assert Lo.learner_mode("smd") == "shadow" and Lo.learner_mode("tis") == "dense"
    assert Lo.distills(_alg(correction="smd")) and not Lo.distills(_alg(correction="smd", distill={"coef": 0}))


def test_correction_loss_is_the_sum_of_its_terms():
    torch.manual_seed(1)
    lp, lp_old, lp_ref, lp_de = (torch.randn(3, 5) * 0.2 - 1 for _ in range(4))
    adv, w = torch.randn(3), torch.rand(3, 5) + 0.5
    m = torch.rand(3, 5) > 0.3
    coef = Lo.minibatch_coefficients(m, [0, 1, 2], "token_mean")
    assert float(coef.sum()) == pytest.approx(1.0) and torch.equal(coef > 0, m)
    full = torch.rand(3, 5)
    for distill in ({"estimator": "k1"}, {"estimator": "k3", "direction": "both"}, {"estimator": "full"}):
        alg = _alg(correction="smd", kl_coef=0.3, kl_estimator="k1", clip_low=0.1, clip_high=0.3,
                   distill={"coef": 0.7, **distill})
        got, sums, ntok = Lo.correction_loss(alg, lp, lp_old=lp_old, adv=adv, coef=coef, weights=w, lp_ref=lp_ref,
                                             lp_dense=lp_de, full_kl_per_token=full)
        ppo, st = Lo.ppo_clip_loss(lp, lp_old, adv, m, clip_low=0.1, clip_high=0.3, weights=coef * w, aggregation="sum")
        kl = (Lo.kl_penalty(lp, lp_ref, "k1") * coef).sum()
        dk = ((full * coef * m).sum() if distill["estimator"] == "full" else
              Lo.distill_kl(lp, lp_de, m, estimator=distill["estimator"], weights=coef, aggregation="sum"))
        assert got.item() == pytest.approx((ppo + 0.3 * kl + 0.7 * dk).item(), rel=1e-6)
        assert ntok == int(m.sum()) and sums["action_tokens"] == ntok and sums["clip_count"] == st["clip_count"]
        assert sums["kl_ref_sum"] == pytest.approx(kl.item()) and sums["distill_sum"] == pytest.approx(dk.item())
    # no reference model, no distillation: the PPO term alone
    got, sums, _ = Lo.correction_loss(_alg(correction="naive"), lp, lp_old=lp_old, adv=adv, coef=coef, weights=w)
    assert got.item() == pytest.approx(Lo.ppo_clip_loss(lp, lp_old, adv, m, weights=coef * w, aggregation="sum")[0].item())
    assert set(sums) == {"clip_count", "action_tokens", "coef_sum"}


def test_train_batch_from_rollout_is_in_the_model_alignment():
    """The sampler's log-prob of ``tokens[t]`` sits at entry ``t - 1`` (the prediction made there), the
    completion mask covers exactly those entries, and nothing else changes."""
    from megatron_smd.learner.batch import from_rollout, to_file_alignment, to_model_alignment
    from megatron_smd.rollout.io import RolloutBatch, completion_mask

    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    lps = torch.tensor([[0.0, 0.0, -0.1, -0.2, -0.3], [0.0, -0.4, -0.5, 0.0, 0.0]])
    rb = RolloutBatch(tokens=tokens, prompt_lens=torch.tensor([2, 1]), seq_lens=torch.tensor([5, 3]),
                      sampler_logprobs=lps, evict=torch.zeros(2, 1, 5, dtype=torch.int32),
                      prompt_index=torch.tensor([0, 0]), sample_index=torch.tensor([0, 1]),
                      meta={"rewards": [1.0, 0.5], "sampling": {"temperature": 0.0}})
    tb = from_rollout(rb)
    assert tb.completion_mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]
    assert torch.equal(tb.sampler_logprobs, torch.tensor([[0.0, -0.1, -0.2, -0.3, 0.0], [-0.4, -0.5, 0.0, 0.0, 0.0]]))
    assert torch.equal(tb.sampler_logprobs[tb.completion_mask], rb.sampler_logprobs[completion_mask(rb)])
    assert torch.equal(to_file_alignment(tb.sampler_logprobs), lps) and torch.equal(to_model_alignment(lps),
                                                                                   tb.sampler_logprobs)
    assert tb.rewards.dtype == torch.float32 and tb.rewards.tolist() == [1.0, 0.5]
    assert tb.group_ids is rb.prompt_index and tb.temperature == 1.0  # greedy scores at temperature 1
    assert from_rollout(rb, rewards=[0.0, 0.0], temperature=0.7).rewards.tolist() == [0.0, 0.0]
    assert from_rollout(rb, temperature=0.7).temperature == 0.7
