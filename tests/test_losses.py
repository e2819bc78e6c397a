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
